//! The actor against real services on loopback ports: grading through a verifier (with and
//! without the shared token), and `run_actor`'s behaviour when the learner is not up, never
//! comes up, or the address holds another service. The full actor-learner-verifier run is
//! tested in the workspace's end-to-end tests.
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{closed_port_url, runtime, start_verifier, write_tokenizer};
use prime_actor::rollout::{grade_items, response_text, scores_from_grades};
use prime_actor::{run_actor, ActorConfig, ActorError};
use prime_model::Tokenizer;
use prime_proto::client::{lazy_channel, request, verifier_client, with_deadline};
use prime_proto::v1 as pb;

#[test]
fn responses_are_graded_by_a_real_verifier_in_row_order() {
    let runtime = runtime();
    let url = start_verifier(&runtime, Some("s3cret-s3cret-s3cret"));
    let dir = tempfile::tempdir().unwrap();
    write_tokenizer(dir.path());
    let tokenizer = Tokenizer::from_dir(dir.path()).unwrap();

    let items = [
        pb::WorkItem {
            work_id: "w1".into(),
            prompt_ids: vec![1],
            ground_truth: "4".into(),
            ability: pb::GradeAbility::Math as i32,
            k: 2,
            ..Default::default()
        },
        pb::WorkItem {
            work_id: "w2".into(),
            prompt_ids: vec![2],
            ground_truth: "5".into(),
            ability: pb::GradeAbility::Math as i32,
            k: 1,
            ..Default::default()
        },
    ];
    let rows: [&[i64]; 3] = [&[1, 2, 3, 4, 6], &[1, 2, 3, 5], &[3, 5, 6]];
    let texts: Vec<String> = rows
        .iter()
        .map(|ids| response_text(&tokenizer, ids).unwrap())
        .collect();
    let requested = grade_items(&items, &texts).unwrap();

    let grade = |token: Option<&str>| {
        let requested = requested.clone();
        let url = url.clone();
        let token = token.map(String::from);
        runtime.block_on(async move {
            let channel =
                lazy_channel("verifier", &url, Duration::from_secs(5), token.as_deref()).unwrap();
            let mut client = verifier_client(channel);
            let deadline = Duration::from_secs(30);
            with_deadline("Verifier", "Grade", deadline, async move {
                let call = client.grade(request(pb::GradeRequest { items: requested }, deadline));
                call.await.map(|r| r.into_inner().results)
            })
            .await
            .map_err(ActorError::from)
        })
    };
    let results = grade(Some("s3cret-s3cret-s3cret")).unwrap();
    assert_eq!(
        scores_from_grades(&requested, &results).unwrap(),
        [1.0, 0.0, 1.0]
    );
    assert_eq!(results[0].extracted_answer, "4");

    for token in [None, Some("wrong-wrong-wrong-wrong")] {
        let err = grade(token).unwrap_err();
        assert_eq!(err.code(), Some(tonic::Code::Unauthenticated), "{err}");
        assert!(err.is_fatal());
    }
}

fn config(learner: &str, verifier: &str, tokenizer: &std::path::Path) -> ActorConfig {
    let mut config = ActorConfig::new(learner, verifier, tokenizer);
    config.max_backoff = Duration::from_millis(200);
    config.connect_timeout = Duration::from_secs(1);
    config.rpc_timeout = Duration::from_secs(5);
    config
}

#[test]
fn an_absent_learner_is_retried_until_stopped() {
    let dir = tempfile::tempdir().unwrap();
    write_tokenizer(dir.path());
    let learner = closed_port_url();
    let stop = Arc::new(AtomicBool::new(false));
    let setter = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(800));
            stop.store(true, Ordering::Relaxed);
        })
    };
    // Registering fails (connection refused) and is retried until the stop flag is set; the
    // actor then returns without having done anything.
    let stats = run_actor(config(&learner, &closed_port_url(), dir.path()), stop).unwrap();
    setter.join().unwrap();
    assert_eq!(stats, prime_actor::ActorStats::default());
}

#[test]
fn an_actor_gives_up_when_told_to() {
    let dir = tempfile::tempdir().unwrap();
    write_tokenizer(dir.path());
    let learner = closed_port_url();
    let mut config = config(&learner, &closed_port_url(), dir.path());
    config.give_up_after = Some(Duration::from_millis(500));
    let stop = Arc::new(AtomicBool::new(false));
    match run_actor(config, stop) {
        Err(ActorError::GaveUp { url, waited }) => {
            assert_eq!(url, learner);
            assert!(waited >= Duration::from_millis(500));
        }
        other => panic!("expected GaveUp, got {other:?}"),
    }
}

#[test]
fn another_service_at_the_learner_address_is_a_fatal_error() {
    let runtime = runtime();
    let verifier = start_verifier(&runtime, None);
    let dir = tempfile::tempdir().unwrap();
    write_tokenizer(dir.path());
    // The verifier's server answers UNIMPLEMENTED for the Learner service: no retrying helps.
    let stop = Arc::new(AtomicBool::new(false));
    let err = run_actor(config(&verifier, &verifier, dir.path()), stop).unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::Unimplemented), "{err}");
    assert!(err.to_string().starts_with("Learner.Register"), "{err}");
}

#[test]
fn a_bad_configuration_is_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    write_tokenizer(dir.path());
    let stop = Arc::new(AtomicBool::new(false));
    let mut zero = config("http://127.0.0.1:1", "http://127.0.0.1:1", dir.path());
    zero.max_prompts = 0;
    assert!(matches!(
        run_actor(zero, stop.clone()),
        Err(ActorError::Config(_))
    ));
    for gib in [0.0, -2.0, f64::NAN] {
        let mut no_cache = config("http://127.0.0.1:1", "http://127.0.0.1:1", dir.path());
        no_cache.kv_cache_gib = Some(gib);
        match run_actor(no_cache, stop.clone()) {
            Err(ActorError::Config(message)) => assert!(message.contains("kv_cache_gib")),
            other => panic!("kv_cache_gib {gib}: expected a config error, got {other:?}"),
        }
    }
    let no_scheme = config("127.0.0.1:1", "http://127.0.0.1:1", dir.path());
    assert!(matches!(
        run_actor(no_scheme, stop.clone()),
        Err(ActorError::Url {
            service: "learner",
            ..
        })
    ));
    let no_tokenizer = config(
        "http://127.0.0.1:1",
        "http://127.0.0.1:1",
        &dir.path().join("missing"),
    );
    assert!(matches!(
        run_actor(no_tokenizer, stop),
        Err(ActorError::Model(_))
    ));
}

//! A `prime learner serve` process on a loopback port against clients that misbehave: no token or a
//! wrong one, malformed groups (token ids outside the vocabulary, too long, wrong K, non-finite
//! log-probs, future versions, unknown ids), resubmissions, a stream cut off mid-way, an
//! oversized message and requests for weights that do not exist. Each gets a clear answer
//! naming what is wrong, the learner keeps serving, and its counters show every group counted
//! once: one accepted, the resubmissions as duplicates, the rest rejected.
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use prime_proto::client::{lazy_channel, learner_client, request, LearnerClient};
use prime_proto::v1 as pb;
use prime_tests::{free_addr, gauge, write_tiny_start_model};

const CONFIG: &str = r#"
[world]
seed = 4
sft = { size = 20 }
rl = { size = 40 }
heldout = { size = 4 }

[learner]
steps = 100

[learner.algo]
filter = { enabled = false }

[learner.rollout]
batch_prompts = 4
samples_per_prompt = 2
max_response_tokens = 12

[learner.eval]
every = 0
problems = 4
greedy = false

[learner.checkpoint]
every = 0
"#;

const TOKEN: &str = "s3cret-token-0123456789";

struct Learner(Child);

impl Drop for Learner {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One of the learner's Prometheus gauges, which must be there.
fn learner_gauge(addr: SocketAddr, name: &str) -> f64 {
    gauge(addr, &format!("prime_learner_{name}"))
        .unwrap_or_else(|| panic!("no gauge prime_learner_{name} at {addr}"))
}

fn client(url: &str, token: Option<&str>) -> LearnerClient {
    learner_client(lazy_channel("learner", url, Duration::from_secs(5), token).unwrap())
}

fn deadline() -> Duration {
    Duration::from_secs(30)
}

/// A well-formed group of K responses for `work`.
fn group(work: &pb::WorkItem, actor_id: &str, policy_version: u64) -> pb::RolloutGroup {
    pb::RolloutGroup {
        group_id: work.work_id.clone(),
        actor_id: actor_id.into(),
        policy_version,
        prompt_ids: work.prompt_ids.clone(),
        responses: (0..work.k)
            .map(|i| pb::Response {
                token_ids: vec![5, 6, 7],
                sampling_logprobs: vec![-1.0, -2.0, -0.5],
                score: (i % 2) as f32,
                finish_reason: pb::FinishReason::Stop as i32,
            })
            .collect(),
    }
}

async fn submit(
    client: &mut LearnerClient,
    groups: Vec<pb::RolloutGroup>,
) -> Result<pb::SubmitReply, tonic::Status> {
    let stream = tokio_stream::iter(groups);
    client
        .submit_groups(request(stream, deadline()))
        .await
        .map(|r| r.into_inner())
}

#[test]
fn hostile_clients_get_clear_errors_and_the_learner_keeps_count() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let config_path = tmp.path().join("config.toml");
    std::fs::write(&config_path, CONFIG).unwrap();
    let config = prime_learner::RunConfig::from_file(&config_path).unwrap();
    write_tiny_start_model(&run_dir, &config, 3);
    let vocab = {
        let tokenizer = prime_learner::checkpoint::sft_checkpoint(&run_dir);
        prime_model::Tokenizer::from_dir(&tokenizer)
            .unwrap()
            .vocab_size() as i64
    };
    let (addr, metrics) = (free_addr(), free_addr());
    let log = std::fs::File::create(tmp.path().join("learner.log")).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let mut learner = Learner(
        Command::new(env!("CARGO_BIN_EXE_prime"))
            .args([
                "learner",
                "serve",
                "--config",
                &s(&config_path),
                "--run-dir",
                &s(&run_dir),
                "--listen",
                &addr.to_string(),
                "--metrics-listen",
                &metrics.to_string(),
            ])
            .env("PRIME_TOKEN", TOKEN)
            .env("PRIME_THREADS", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let url = format!("http://{addr}");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    runtime.block_on(async {
        let register = pb::RegisterRequest {
            actor_name: "hostile".into(),
            ..Default::default()
        };
        // Wait until the learner serves (it evaluates nothing first: eval.every = 0).
        let start = Instant::now();
        let registered = loop {
            match client(&url, Some(TOKEN))
                .register(request(register.clone(), deadline()))
                .await
            {
                Ok(reply) => break reply.into_inner(),
                Err(status) => {
                    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
                    assert!(
                        start.elapsed() < Duration::from_secs(120),
                        "learner never up"
                    );
                    assert!(learner.0.try_wait().unwrap().is_none(), "learner exited");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };

        // No token, a wrong one, a near miss: UNAUTHENTICATED on every RPC.
        for token in [
            None,
            Some("wrong-wrong-wrong-wrong"),
            Some("s3cret-token-012345678"),
        ] {
            let mut c = client(&url, token);
            let err = c
                .register(request(register.clone(), deadline()))
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated);
            let err = c
                .status(request(pb::LearnerStatusRequest {}, deadline()))
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated);
            let err = submit(&mut c, vec![]).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated);
        }

        // The weight broadcast is off: every actor fetches over gRPC.
        assert_eq!(
            registered.weight_broadcast,
            pb::BroadcastTransport::Unspecified as i32
        );
        let mut c = client(&url, Some(TOKEN));
        let actor = registered.actor_id.clone();
        // An empty or unknown actor id cannot pull work.
        for nobody in ["", "nobody-1"] {
            let pull = pb::PullWorkRequest {
                actor_id: nobody.into(),
                max_prompts: 1,
            };
            let err = c.pull_work(request(pull, deadline())).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
        }
        let pull = pb::PullWorkRequest {
            actor_id: actor.clone(),
            max_prompts: 2,
        };
        let batch = c
            .pull_work(request(pull, deadline()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(batch.items.len(), 2, "{batch:?}");
        // The embedded world's rows are math, graded as such.
        assert!(
            batch
                .items
                .iter()
                .all(|w| w.ability == pb::GradeAbility::Math as i32),
            "{batch:?}"
        );
        let (work, other) = (&batch.items[0], &batch.items[1]);
        let version = batch.policy_version;

        // Malformed groups, each rejected with a reason naming the problem.
        let mut cases: Vec<(pb::RolloutGroup, &str)> = Vec::new();
        let mut g = group(work, &actor, version);
        g.responses[0].token_ids[1] = vocab;
        cases.push((g, "outside the vocabulary"));
        let mut g = group(work, &actor, version);
        g.responses[1].token_ids[0] = -3;
        cases.push((g, "outside the vocabulary"));
        let mut g = group(work, &actor, version);
        g.responses[0].token_ids = vec![5; 13];
        g.responses[0].sampling_logprobs = vec![-1.0; 13];
        cases.push((g, "13 tokens, over the limit of 12"));
        let mut g = group(work, &actor, version);
        g.responses.pop();
        cases.push((g, "1 responses, but K = 2"));
        let mut g = group(work, &actor, version);
        g.responses[0].sampling_logprobs[2] = f32::NAN;
        cases.push((g, "non-finite sampling log-prob"));
        let mut g = group(work, &actor, version);
        g.responses[1].score = 7.0;
        cases.push((g, "outside [0, 1]"));
        let mut g = group(work, &actor, version);
        g.responses[0].token_ids.clear();
        g.responses[0].sampling_logprobs.clear();
        cases.push((g, "no tokens"));
        cases.push((group(work, &actor, version + 5), "newer than"));
        let mut g = group(work, &actor, version);
        g.group_id = "v0-p99999-n1".into();
        cases.push((g, "not a work id"));
        let mut g = group(work, &actor, version);
        g.group_id = String::new();
        cases.push((g, "work id"));
        let mut g = group(work, &actor, version);
        g.prompt_ids.push(1);
        cases.push((g, "prompt_ids"));
        let mut g = group(work, &actor, version);
        g.responses[1].finish_reason = 0;
        cases.push((g, "no valid finish_reason"));
        let mut g = group(work, &actor, version);
        g.responses[0].finish_reason = 99;
        cases.push((g, "no valid finish_reason"));
        let rejected_cases = cases.len();
        for (bad, expected) in cases {
            let reply = submit(&mut c, vec![bad]).await.unwrap();
            assert_eq!(reply.rejected, 1, "{expected}: {reply:?}");
            assert!(
                reply.first_rejection.contains(expected),
                "expected {expected:?} in {:?}",
                reply.first_rejection
            );
        }

        // The good group, then twice again: counted once.
        let good = group(work, &actor, version);
        let reply = submit(&mut c, vec![good.clone()]).await.unwrap();
        assert_eq!((reply.accepted, reply.rejected), (1, 0), "{reply:?}");
        let reply = submit(&mut c, vec![good.clone(), good.clone()])
            .await
            .unwrap();
        assert_eq!((reply.accepted, reply.duplicates), (0, 2), "{reply:?}");

        // A message over the size limit is refused by the transport; nothing is counted.
        let mut huge = group(other, &actor, version);
        huge.responses[0].token_ids = vec![5; 5_000_000];
        huge.responses[0].sampling_logprobs = vec![-1.0; 5_000_000];
        let err = submit(&mut c, vec![huge]).await.unwrap_err();
        assert!(
            matches!(
                err.code(),
                tonic::Code::OutOfRange | tonic::Code::ResourceExhausted | tonic::Code::Internal
            ),
            "{err}"
        );

        // A stream cut off after its first group: that group counts, once, and the cut
        // does no harm to the learner; resubmitting the group later is a duplicate.
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::RolloutGroup>(4);
        let mut cut = c.clone();
        let call = tokio::spawn(async move {
            let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
            cut.submit_groups(request(stream, deadline())).await
        });
        tx.send(group(other, &actor, version)).await.unwrap();
        let metrics_accepted = || learner_gauge(metrics, "groups_total{outcome=\"kept\"}");
        let start = Instant::now();
        while metrics_accepted() < 2.0 {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "streamed group not counted"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        call.abort();
        let _ = call.await;
        drop(tx);
        let reply = submit(&mut c, vec![group(other, &actor, version)])
            .await
            .unwrap();
        assert_eq!(reply.duplicates, 1, "{reply:?}");

        // Weights of a version that does not exist.
        let fetch = pb::FetchWeightsRequest {
            policy_version: version + 100,
            ..Default::default()
        };
        let err = match c.fetch_weights(request(fetch, deadline())).await {
            Ok(_) => panic!("weights of a future version were served"),
            Err(err) => err,
        };
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");

        // Still serving, and every group counted once.
        let status = c
            .status(request(pb::LearnerStatusRequest {}, deadline()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(status.step, 0);
        // Two of the four groups a batch needs: still collecting.
        assert_eq!(status.phase, pb::LearnerPhase::Collecting as i32);
        assert_eq!(
            learner_gauge(metrics, "groups_total{outcome=\"kept\"}"),
            2.0
        );
        assert_eq!(
            learner_gauge(metrics, "groups_total{outcome=\"duplicate\"}"),
            3.0
        );
        assert_eq!(
            learner_gauge(metrics, "groups_total{outcome=\"rejected\"}"),
            rejected_cases as f64
        );
    });
    assert!(
        learner.0.try_wait().unwrap().is_none(),
        "the learner must survive hostile clients"
    );
}

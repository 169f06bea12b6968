//! The verifier over a loopback connection against hostile requests: pathological math answers
//! (deep nesting, megabytes of LaTeX, unbalanced braces, control characters), random strings
//! (proptest), empty and oversized batches. Every request gets an answer within its deadline,
//! a bad item fails alone with a reason, and the server keeps serving.
use std::time::Duration;

use prime_proto::v1 as pb;
use prime_proto::v1::verifier_client::VerifierClient;
use prime_verifier::grade::{Grader, GraderConfig};
use prime_verifier::service::{serve_on, MAX_BATCH_ITEMS};
use proptest::prelude::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Starts a verifier and returns a connected client.
fn start(runtime: &tokio::runtime::Runtime) -> VerifierClient<tonic::transport::Channel> {
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let grader = Grader::new(GraderConfig::default());
        tokio::spawn(async move {
            serve_on(listener, grader, None, std::future::pending())
                .await
                .unwrap();
        });
        for _ in 0..100 {
            if let Ok(client) = VerifierClient::connect(addr.clone()).await {
                return client.max_decoding_message_size(64 << 20);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("verifier never came up");
    })
}

fn math(id: &str, response: String, ground_truth: &str) -> pb::GradeItem {
    pb::GradeItem {
        id: id.into(),
        ability: pb::GradeAbility::Math as i32,
        response,
        ground_truth: ground_truth.into(),
        ..Default::default()
    }
}

fn grade(
    runtime: &tokio::runtime::Runtime,
    client: &mut VerifierClient<tonic::transport::Channel>,
    items: Vec<pb::GradeItem>,
) -> Result<Vec<pb::GradeResult>, tonic::Status> {
    runtime.block_on(async {
        let mut request = tonic::Request::new(pb::GradeRequest { items });
        request.set_timeout(Duration::from_secs(60));
        client.grade(request).await.map(|r| r.into_inner().results)
    })
}

/// The server still grades a plain answer right.
fn still_serving(
    runtime: &tokio::runtime::Runtime,
    client: &mut VerifierClient<tonic::transport::Channel>,
) {
    let results = grade(
        runtime,
        client,
        vec![math("ok", "so \\boxed{4}".into(), "4")],
    )
    .expect("the verifier stopped serving");
    assert_eq!(results[0].score, 1.0);
}

#[test]
fn pathological_answers_are_graded_or_refused_and_the_server_survives() {
    let runtime = runtime();
    let mut client = start(&runtime);
    let deep = 100_000;
    let cases = vec![
        math(
            "nested-braces",
            format!("\\boxed{{{}4{}}}", "{".repeat(deep), "}".repeat(deep)),
            "4",
        ),
        math(
            "nested-frac",
            format!(
                "\\boxed{{{}1{}}}",
                "\\frac{1}{".repeat(20_000),
                "}".repeat(20_000)
            ),
            "4",
        ),
        math(
            "nested-parens",
            format!("\\boxed{{{}4{}}}", "(".repeat(deep), ")".repeat(deep)),
            "4",
        ),
        math("unbalanced", format!("\\boxed{{{}", "{".repeat(deep)), "4"),
        math("many-boxes", "\\boxed{1} ".repeat(200_000), "1"),
        math(
            "huge-number",
            format!("\\boxed{{{}}}", "9".repeat(1_000_000)),
            "4",
        ),
        math("huge-power", "\\boxed{10^{10^{10^{10^{10}}}}}".into(), "4"),
        math("factorial", "\\boxed{100000000!}".into(), "4"),
        math("control", "\\boxed{\u{0}\u{7}\u{1b}[2J4}".into(), "4"),
        math(
            "ground-truth-huge",
            "\\boxed{4}".into(),
            &"4+".repeat(100_000),
        ),
        math("empty", String::new(), ""),
    ];
    let ids: Vec<String> = cases.iter().map(|c| c.id.clone()).collect();
    let results = grade(&runtime, &mut client, cases).expect("a batch of hostile answers");
    let returned: Vec<String> = results.iter().map(|r| r.id.clone()).collect();
    assert_eq!(returned, ids, "one result per item, in request order");
    for result in &results {
        assert!(
            (0.0..=1.0).contains(&result.score),
            "{}: {}",
            result.id,
            result.score
        );
    }
    // Wrong answers never pass.
    for id in [
        "nested-frac",
        "huge-number",
        "huge-power",
        "factorial",
        "empty",
    ] {
        let result = results.iter().find(|r| r.id == id).unwrap();
        assert_eq!(result.score, 0.0, "{id} graded correct: {result:?}");
    }
    still_serving(&runtime, &mut client);

    // An empty batch gets an empty answer; one over the item limit is refused as invalid,
    // with the limit named.
    assert!(grade(&runtime, &mut client, Vec::new()).unwrap().is_empty());
    let too_many = (0..=MAX_BATCH_ITEMS)
        .map(|i| math(&i.to_string(), "4".into(), "4"))
        .collect();
    let err = grade(&runtime, &mut client, too_many).unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(
        err.message().contains(&MAX_BATCH_ITEMS.to_string()),
        "{err}"
    );
    // A message over the server's size limit is refused by the transport.
    let huge = vec![math("huge", "x".repeat(70 << 20), "4")];
    assert!(grade(&runtime, &mut client, huge).is_err());
    still_serving(&runtime, &mut client);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_answers_never_break_the_verifier(
        responses in proptest::collection::vec(any::<String>(), 1..16),
        ground_truth in "[0-9a-z\\\\{}^_()+\\-*/., ]{0,40}",
        latex in proptest::collection::vec("[\\\\{}^_()a-z0-9 ]{0,60}", 1..8),
    ) {
        let runtime = runtime();
        let mut client = start(&runtime);
        let mut items: Vec<pb::GradeItem> = responses
            .into_iter()
            .enumerate()
            .map(|(i, r)| math(&format!("r{i}"), r, &ground_truth))
            .collect();
        items.extend(
            latex
                .into_iter()
                .enumerate()
                .map(|(i, l)| math(&format!("l{i}"), format!("\\boxed{{{l}}}"), &ground_truth)),
        );
        let n = items.len();
        let results = grade(&runtime, &mut client, items).expect("an answer");
        prop_assert_eq!(results.len(), n);
        for r in &results {
            prop_assert!((0.0..=1.0).contains(&r.score));
        }
        still_serving(&runtime, &mut client);
    }
}

//! The Verifier service over a real loopback connection on an ephemeral port.

use prime_proto::v1 as pb;
use prime_proto::v1::verifier_client::VerifierClient;
use prime_verifier::code::sandbox::SandboxLimits;
use prime_verifier::grade::{Grader, GraderConfig};
use prime_verifier::service::serve_on;
use std::time::Duration;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

async fn start(config: GraderConfig, token: Option<String>) -> (String, Grader) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let grader = Grader::new(config);
    let served = grader.clone();
    tokio::spawn(async move {
        serve_on(listener, served, token, std::future::pending())
            .await
            .unwrap();
    });
    (addr, grader)
}

fn item(id: &str, ability: pb::GradeAbility, response: &str, gt: &str) -> pb::GradeItem {
    pb::GradeItem {
        id: id.into(),
        ability: ability as i32,
        response: response.into(),
        ground_truth: gt.into(),
        ..Default::default()
    }
}

async fn connect(addr: &str) -> VerifierClient<tonic::transport::Channel> {
    for _ in 0..50 {
        if let Ok(c) = VerifierClient::connect(addr.to_string()).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("server at {addr} never came up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grade_batch_stream_status_and_health() {
    let (addr, _grader) = start(GraderConfig::default(), None).await;
    let mut client = connect(&addr).await;

    let code_tests = r#"{"inputs": ["2\n"], "outputs": ["4\n"]}"#;
    let batch = pb::GradeRequest {
        items: vec![
            item(
                "m-right",
                pb::GradeAbility::Math,
                "so \\boxed{\\frac{1}{2}}",
                "0.5",
            ),
            item("m-wrong", pb::GradeAbility::Math, "so \\boxed{3}", "4"),
            item("bad-ability", pb::GradeAbility::Unspecified, "x", "y"),
            item("bad-spec", pb::GradeAbility::Code, "print(1)", "{not json"),
            item(
                "c-right",
                pb::GradeAbility::Code,
                "```python\nprint(int(input())*2)\n```",
                code_tests,
            ),
        ],
    };
    let results = client.grade(batch).await.unwrap().into_inner().results;
    let ids: Vec<&str> = results.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(
        ids,
        ["m-right", "m-wrong", "bad-ability", "bad-spec", "c-right"]
    );
    let scores: Vec<f64> = results.iter().map(|r| r.score).collect();
    assert_eq!(scores, [1.0, 0.0, 0.0, 0.0, 1.0]);
    assert_eq!(results[0].extracted_answer, "\\frac{1}{2}");
    assert_eq!(results[2].outcome, pb::GradeOutcome::Error as i32);
    assert_eq!(results[3].outcome, pb::GradeOutcome::Error as i32);
    assert_eq!(results[4].outcome, pb::GradeOutcome::Graded as i32);

    // Streaming: results come back by id, in any order.
    let items: Vec<pb::GradeItem> = (0..20)
        .map(|i| {
            item(
                &format!("s{i}"),
                pb::GradeAbility::Math,
                &format!("\\boxed{{{i}}}"),
                "7",
            )
        })
        .collect();
    let mut stream = client
        .grade_stream(tokio_stream::iter(items))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(r) = stream.message().await.unwrap() {
        got.push((r.id, r.score));
    }
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(got.len(), 20);
    for (id, score) in got {
        assert_eq!(score, if id == "s7" { 1.0 } else { 0.0 }, "{id}");
    }

    let status = client
        .status(pb::VerifierStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.items_graded, 25);
    assert_eq!(status.errors, 2);
    assert_eq!(status.timeouts, 0);
    assert!(status.latency_p99_ms >= status.latency_p50_ms);
    assert_eq!(status.build.unwrap().role, pb::Role::Verifier as i32);
    assert!(!status.sandbox_backend.is_empty());

    let channel = tonic::transport::Channel::from_shared(addr)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "prime.v1.Verifier".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, 1, "SERVING");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_item_times_out_without_failing_the_batch() {
    let config = GraderConfig {
        item_timeout: Duration::from_millis(700),
        sandbox: SandboxLimits {
            wall_time: Duration::from_secs(5),
            ..SandboxLimits::default()
        },
        ..GraderConfig::default()
    };
    let (addr, _grader) = start(config, None).await;
    let mut client = connect(&addr).await;
    let tests = r#"{"inputs": ["", ""], "outputs": ["x", "x"]}"#;
    let results = client
        .grade(pb::GradeRequest {
            items: vec![
                item(
                    "slow",
                    pb::GradeAbility::Code,
                    "import time\ntime.sleep(30)",
                    tests,
                ),
                item("fast", pb::GradeAbility::Math, "\\boxed{2}", "2"),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results[0].outcome, pb::GradeOutcome::Timeout as i32);
    assert_eq!(results[0].score, 0.0);
    assert!(results[0].reason.contains("timed out"));
    assert_eq!(results[1].score, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_is_required_when_configured() {
    let (addr, _grader) = start(GraderConfig::default(), Some("s3cret-s3cret-s3cret".into())).await;
    let mut client = connect(&addr).await;
    let err = client
        .status(pb::VerifierStatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let mut request = tonic::Request::new(pb::VerifierStatusRequest {});
    request.metadata_mut().insert(
        "authorization",
        "Bearer s3cret-s3cret-s3cret".parse().unwrap(),
    );
    assert!(client.status(request).await.is_ok());
}

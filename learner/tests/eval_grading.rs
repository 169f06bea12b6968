//! Held-out responses are graded by ability: math by the math grader, code by the code grader,
//! in this process's sandbox or by a real Verifier service on a loopback port, with the same
//! scores either way; accuracy is reported per ability and per data source.
use prime_learner::data::EvalProblem;
use prime_learner::eval::{Accuracy, CodeGrading, Grading, ToGrade};
use prime_verifier::{Ability, Grader, GraderConfig};

/// A stdin problem: print the sum of two numbers; three tests.
const SPEC: &str = r#"{"inputs": ["1 2\n", "10 -3\n", "0 0\n"], "outputs": ["3\n", "7\n", "0\n"]}"#;
const RIGHT: &str = "```python\na, b = map(int, input().split())\nprint(a + b)\n```";
/// Right on two of the three tests.
const PARTLY: &str =
    "```python\na, b = map(int, input().split())\nprint(a + b if a < 5 else 0)\n```";
const WRONG: &str = "```python\nprint(42)\n```";

fn items() -> Vec<ToGrade<'static>> {
    let code = |response| ToGrade {
        ability: Ability::Code,
        ground_truth: SPEC,
        response,
    };
    let math = |response| ToGrade {
        ability: Ability::Math,
        ground_truth: "\\frac{1}{2}",
        response,
    };
    vec![
        math("so the answer is \\boxed{0.5}"),
        code(RIGHT),
        math("\\boxed{2}"),
        code(WRONG),
        code(PARTLY),
    ]
}

const EXPECTED: [f64; 5] = [1.0, 1.0, 0.0, 0.0, 2.0 / 3.0];

#[test]
fn code_is_graded_by_the_code_grader_in_process() {
    let scores = Grading::default().grade(&items()).unwrap();
    assert_eq!(scores, EXPECTED);
}

#[test]
fn a_verifier_service_grades_code_the_same() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = runtime.spawn(prime_verifier::service::serve_on(
        listener,
        Grader::new(GraderConfig::default()),
        Some("grading-token-0123".into()),
        async {
            let _ = stopped.await;
        },
    ));
    let mut grading = Grading::new(CodeGrading::Service {
        url: url.clone(),
        token: Some("grading-token-0123".into()),
        tls: Default::default(),
    });
    let scores = grading.grade(&items()).unwrap();
    assert_eq!(scores, EXPECTED);
    // A wrong token is refused, not graded as zero.
    let mut refused = Grading::new(CodeGrading::Service {
        url,
        token: Some("not-the-token-0123".into()),
        tls: Default::default(),
    });
    let error = refused.grade(&items()).unwrap_err().to_string();
    assert!(error.contains("verifier"), "{error}");
    let _ = stop.send(());
    runtime.block_on(server).unwrap().unwrap();
}

#[test]
fn accuracy_is_reported_per_ability_and_source() {
    let problem = |ability, source: &str| EvalProblem {
        prompt_ids: vec![1],
        ground_truth: String::new(),
        ability,
        data_source: source.into(),
    };
    let problems = [
        problem(Ability::Math, "numina_olympiads"),
        problem(Ability::Code, "taco"),
        problem(Ability::Math, "numina_amc_aime"),
    ];
    // Two samples per problem; code scores are shares of tests passed.
    let scores = [(0, 1.0), (0, 0.0), (1, 0.5), (1, 1.0), (2, 1.0), (2, 1.0)];
    let accuracy = Accuracy::of(&problems, &scores);
    assert!((accuracy.overall - 4.5 / 6.0).abs() < 1e-12);
    assert_eq!(accuracy.by_ability["math"], 0.75);
    assert_eq!(accuracy.by_ability["code"], 0.75);
    assert_eq!(accuracy.by_source["numina_olympiads"], 0.5);
    assert_eq!(accuracy.by_source["taco"], 0.75);
    assert_eq!(accuracy.by_source["numina_amc_aime"], 1.0);
}

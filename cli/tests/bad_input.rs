//! Every command against careless and hostile input, run as a real `prime` process: the
//! catalogue of probes below (classes in docs/reliability.md, "Bad input") and generated bad
//! files and flag values (proptest). Each run must succeed correctly or exit with status 1 or
//! 2 and a message naming the file, line, key or flag at fault, leave every file that was
//! there unchanged, and never panic or hang (see `probes::Fixture::check`).
mod probes;

use probes::Content::{Bytes, Repeat, Text};
use probes::*;
use proptest::prelude::*;

/// Runs `probes`, three at a time, each in a fixture of its own (a process start is mostly
/// waiting on the dynamic loader).
fn check_all(probes: &[Probe]) {
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..3)
            .map(|worker| {
                scope.spawn(move || {
                    let fixture = Fixture::new();
                    for probe in probes.iter().skip(worker).step_by(3) {
                        fixture.check(probe);
                    }
                })
            })
            .collect();
        for worker in workers {
            if let Err(panic) = worker.join() {
                std::panic::resume_unwind(panic);
            }
        }
    });
}

const LONG_IDS: &str = "{\"input_ids\": [1,2,3,4,5,6,7,8,9,10,1,2,3,4,5,6,7,8,9,10,1,2,3,4,5,6,7,8,9,10,1,2,3,4,5,6,7,8,9,10,1,2,3,4,5,6,7,8,9,10,1,2,3,4,5,6,7,8,9,10,1,2,3,4,5,6,7,8,9,10]}\n";

/// `prime grade`: its output is never its input, a bad line is found before anything is
/// written, rows it cannot grade are errors, not zeros.
#[test]
fn grade_probes() {
    check_all(&[
        Probe::new("same input and output", &["grade", "--input", "{d}/grade.jsonl", "--output", "{d}/grade.jsonl"])
            .fails(&["--output must be another file than --input", "grade.jsonl"]),
        Probe::new("same input and output", &["grade", "--input", "{d}/grade.jsonl", "--output", "{d}/./grade.jsonl"])
            .fails(&["--output must be another file"]),
        Probe::new("same input and output", &["grade", "--input", "{d}/link.jsonl", "--output", "{d}/grade.jsonl"])
            .fails(&["--output must be another file"]),
        Probe::new("truncated JSON", &["grade", "--input", "{d}/bad.jsonl", "--output", "{d}/out.jsonl"])
            .files(&[("bad.jsonl", Text("{\"id\": 1, \"ability\": \"math\", \"response\": \"2\", \"ground_truth\": \"2\"}\n{\"id\": 2, \"abil"))])
            .fails(&["bad.jsonl line 2", "invalid JSON"]),
        Probe::new("missing field", &["grade", "--input", "{d}/bad.jsonl", "--output", "{d}/out.jsonl"])
            .files(&[("bad.jsonl", Text("{\"id\": 1, \"ability\": \"math\", \"response\": \"2\"}\n"))])
            .fails(&["bad.jsonl line 1", "ground_truth"]),
        Probe::new("unknown enum value", &["grade", "--input", "{d}/bad.jsonl", "--output", "{d}/out.jsonl"])
            .files(&[("bad.jsonl", Text("{\"id\": 1, \"ability\": \"physics\", \"response\": \"2\", \"ground_truth\": \"2\"}\n"))])
            .fails(&["bad.jsonl line 1", "physics"]),
        Probe::new("wrong type", &["grade", "--input", "{d}/bad.jsonl", "--output", "{d}/out.jsonl"])
            .files(&[("bad.jsonl", Text("[\"not\", \"an\", \"object\"]\n"))])
            .fails(&["bad.jsonl line 1", "not a JSON object"]),
        Probe::new("not UTF-8", &["grade", "--input", "{d}/bad.jsonl", "--output", "{d}/out.jsonl"])
            .files(&[("bad.jsonl", Bytes(b"{\"id\": \"\xff\xfe\"}\n"))])
            .fails(&["bad.jsonl line 1", "UTF-8"]),
        Probe::new("huge file", &["grade", "--input", "{d}/bad.jsonl", "--output", "{d}/out.jsonl"])
            .files(&[("bad.jsonl", Repeat("[1,2,3,4,5,6,7,8]", 200_000))])
            .fails(&["bad.jsonl line 1"]),
        Probe::new("missing input", &["grade", "--input", "{d}/absent.jsonl", "--output", "{d}/out.jsonl"])
            .fails(&["absent.jsonl"]),
        Probe::new("directory as a file", &["grade", "--input", "{d}/out", "--output", "{d}/out.jsonl"])
            .fails(&["out"]),
        Probe::new("unwritable output", &["grade", "--input", "{d}/grade.jsonl", "--output", "{d}/nowhere/out.jsonl"])
            .fails(&["nowhere/out.jsonl"]),
        Probe::new("BOM and CRLF", &["grade", "--input", "{d}/bom.jsonl", "--output", "{d}/out.jsonl"])
            .files(&[("bom.jsonl", Bytes(b"\xEF\xBB\xBF{\"ability\": \"math\", \"response\": \"\\\\boxed{2}\", \"ground_truth\": \"2\"}\r\n\r\n"))])
            .succeeds(&["out.jsonl"]),
        Probe::new("out-of-range number", &["grade", "--input", "{d}/grade.jsonl", "--output", "{d}/out.jsonl", "--item-timeout-secs", "1e300"])
            .fails(&["--item-timeout-secs"]),
        Probe::new("out-of-range number", &["grade", "--input", "{d}/grade.jsonl", "--output", "{d}/out.jsonl", "--concurrency", "0"])
            .fails(&["--concurrency"]),
        Probe::new("empty or short token", &["grade", "--input", "{d}/grade.jsonl", "--output", "{d}/out.jsonl", "--addr", "http://127.0.0.1:9"])
            .env(&[("PRIME_TOKEN", "short")])
            .fails(&["at least 16"]),
    ]);
}

/// The rows `prime grade` writes for the BOM and CRLF input: graded, one per line.
#[test]
fn grade_reads_boms_and_crlf_and_writes_its_output_whole() {
    let fixture = Fixture::new();
    let d = fixture.path();
    std::fs::write(
        d.join("in.jsonl"),
        format!("\u{feff}{GRADE_ROW}\r\n\r\n{GRADE_ROW}\r\n"),
    )
    .unwrap();
    let run = run_prime(
        &[
            "grade".into(),
            "--input".into(),
            d.join("in.jsonl").to_str().unwrap().into(),
            "--output".into(),
            d.join("out.jsonl").to_str().unwrap().into(),
        ],
        &[("PRIME_THREADS", "0")],
    );
    run.assert_no_crash("grade");
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let out = std::fs::read_to_string(d.join("out.jsonl")).unwrap();
    let scores: Vec<f64> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["score"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(scores, [1.0, 1.0]);
}

/// `prime model logprobs` and `prime model generate`.
#[test]
fn model_tool_probes() {
    check_all(&[
        Probe::new(
            "same input and output",
            &[
                "model",
                "logprobs",
                "--model",
                "{d}/model",
                "--input",
                "{d}/ids.jsonl",
                "--output",
                "{d}/ids.jsonl",
            ],
        )
        .fails(&["--output must be another file than --input"]),
        Probe::new(
            "same input and output",
            &[
                "model",
                "generate",
                "--model",
                "{d}/model",
                "--input",
                "{d}/ids.jsonl",
                "--output",
                "{d}/./ids.jsonl",
                "--max-new-tokens",
                "2",
                "--temperature",
                "0",
            ],
        )
        .fails(&["--output must be another file than --input"]),
        Probe::new(
            "sequence longer than the model's context",
            &[
                "model",
                "logprobs",
                "--model",
                "{d}/model",
                "--input",
                "{d}/long.jsonl",
                "--output",
                "{d}/out.jsonl",
            ],
        )
        .files(&[("long.jsonl", Text(LONG_IDS))])
        .fails(&["long.jsonl line 1", "max_position_embeddings (64)"]),
        Probe::new(
            "sequence longer than the model's context",
            &[
                "model",
                "generate",
                "--model",
                "{d}/model",
                "--input",
                "{d}/ids.jsonl",
                "--output",
                "{d}/out.jsonl",
                "--max-new-tokens",
                "62",
                "--temperature",
                "0",
            ],
        )
        .fails(&["ids.jsonl line 1", "max_position_embeddings (64)"]),
        Probe::new(
            "token id outside the vocabulary",
            &[
                "model",
                "logprobs",
                "--model",
                "{d}/model",
                "--input",
                "{d}/bad.jsonl",
                "--output",
                "{d}/out.jsonl",
            ],
        )
        .files(&[(
            "bad.jsonl",
            Text("{\"input_ids\": [1, 2]}\n{\"input_ids\": [1, 40]}\n"),
        )])
        .fails(&["bad.jsonl line 2", "vocabulary"]),
        Probe::new(
            "out-of-range number",
            &[
                "model",
                "logprobs",
                "--model",
                "{d}/model",
                "--input",
                "{d}/bad.jsonl",
                "--output",
                "{d}/out.jsonl",
            ],
        )
        .files(&[("bad.jsonl", Text("{\"input_ids\": [1, -3]}\n"))])
        .fails(&["bad.jsonl line 1", "vocabulary"]),
        Probe::new(
            "wrong type",
            &[
                "model",
                "logprobs",
                "--model",
                "{d}/model",
                "--input",
                "{d}/bad.jsonl",
                "--output",
                "{d}/out.jsonl",
            ],
        )
        .files(&[("bad.jsonl", Text("{\"input_ids\": [1, 2.5]}\n"))])
        .fails(&["bad.jsonl line 1", "input_ids"]),
        Probe::new(
            "NaN and infinity",
            &[
                "model",
                "logprobs",
                "--model",
                "{d}/model",
                "--input",
                "{d}/bad.jsonl",
                "--output",
                "{d}/out.jsonl",
            ],
        )
        .files(&[("bad.jsonl", Text("{\"input_ids\": [1, NaN]}\n"))])
        .fails(&["bad.jsonl line 1"]),
        Probe::new(
            "truncated JSON",
            &[
                "model",
                "logprobs",
                "--model",
                "{d}/model",
                "--input",
                "{d}/bad.jsonl",
                "--output",
                "{d}/out.jsonl",
            ],
        )
        .files(&[(
            "bad.jsonl",
            Text("{\"input_ids\": [1, 2]}\n{\"input_ids\": [1,"),
        )])
        .fails(&["bad.jsonl line 2"]),
        Probe::new(
            "missing field",
            &[
                "model",
                "generate",
                "--model",
                "{d}/model",
                "--input",
                "{d}/bad.jsonl",
                "--output",
                "{d}/out.jsonl",
                "--max-new-tokens",
                "2",
                "--temperature",
                "0",
            ],
        )
        .files(&[("bad.jsonl", Text("{\"text\": \"hi\"}\n"))])
        .fails(&["bad.jsonl line 1", "input_ids"]),
        Probe::new(
            "missing model file",
            &[
                "model",
                "generate",
                "--model",
                "{d}/model",
                "--input",
                "{d}/bad.jsonl",
                "--output",
                "{d}/out.jsonl",
                "--max-new-tokens",
                "2",
                "--temperature",
                "0",
            ],
        )
        .files(&[("bad.jsonl", Text("{\"prompt\": \"hi\"}\n"))])
        .fails(&["bad.jsonl line 1", "tokenizer.json"]),
        Probe::new(
            "empty file",
            &[
                "model",
                "generate",
                "--model",
                "{d}/model",
                "--input",
                "{d}/bad.jsonl",
                "--output",
                "{d}/out.jsonl",
                "--max-new-tokens",
                "2",
                "--temperature",
                "0",
            ],
        )
        .files(&[("bad.jsonl", Text("{\"input_ids\": []}\n"))])
        .fails(&["bad.jsonl line 1", "no tokens"]),
        Probe::new(
            "NaN and infinity",
            &[
                "model",
                "generate",
                "--model",
                "{d}/model",
                "--input",
                "{d}/ids.jsonl",
                "--output",
                "{d}/out.jsonl",
                "--max-new-tokens",
                "2",
                "--temperature",
                "NaN",
            ],
        )
        .fails(&["--temperature"]),
        Probe::new(
            "out-of-range number",
            &[
                "model",
                "generate",
                "--model",
                "{d}/model",
                "--input",
                "{d}/ids.jsonl",
                "--output",
                "{d}/out.jsonl",
                "--max-new-tokens",
                "2",
                "--temperature",
                "1",
                "--top-p",
                "0",
            ],
        )
        .fails(&["--top-p", "(0, 1]"]),
        Probe::new(
            "out-of-range number",
            &[
                "model",
                "generate",
                "--model",
                "{d}/model",
                "--input",
                "{d}/ids.jsonl",
                "--output",
                "{d}/out.jsonl",
                "--max-new-tokens",
                "2",
                "--temperature",
                "1",
                "--top-k",
                "-1",
            ],
        )
        .fails(&["--top-k"]),
        Probe::new(
            "out-of-range number",
            &[
                "model",
                "generate",
                "--model",
                "{d}/model",
                "--input",
                "{d}/ids.jsonl",
                "--output",
                "{d}/out.jsonl",
                "--max-new-tokens",
                "2",
                "--temperature",
                "0",
                "--batch-size",
                "0",
            ],
        )
        .fails(&["--batch-size"]),
        Probe::new(
            "out-of-range number",
            &[
                "model",
                "logprobs",
                "--model",
                "{d}/model",
                "--input",
                "{d}/ids.jsonl",
                "--output",
                "{d}/out.jsonl",
                "--max-batch-tokens",
                "0",
            ],
        )
        .fails(&["--max-batch-tokens"]),
        Probe::new(
            "unknown device or dtype",
            &[
                "model",
                "logprobs",
                "--model",
                "{d}/model",
                "--input",
                "{d}/ids.jsonl",
                "--output",
                "{d}/out.jsonl",
                "--device",
                "tpu",
            ],
        )
        .fails(&["tpu"]),
        Probe::new(
            "unknown device or dtype",
            &[
                "model",
                "logprobs",
                "--model",
                "{d}/model",
                "--input",
                "{d}/ids.jsonl",
                "--output",
                "{d}/out.jsonl",
                "--dtype",
                "f8",
            ],
        )
        .fails(&["f8"]),
        Probe::new(
            "missing model file",
            &[
                "model",
                "logprobs",
                "--model",
                "{d}/absent",
                "--input",
                "{d}/ids.jsonl",
                "--output",
                "{d}/out.jsonl",
            ],
        )
        .fails(&["absent"]),
        Probe::new(
            "BOM and CRLF",
            &[
                "model",
                "logprobs",
                "--model",
                "{d}/model",
                "--input",
                "{d}/bom.jsonl",
                "--output",
                "{d}/out.jsonl",
            ],
        )
        .files(&[(
            "bom.jsonl",
            Bytes(b"\xEF\xBB\xBF{\"input_ids\": [1, 2, 3]}\r\n"),
        )])
        .succeeds(&["out.jsonl"]),
    ]);
}

/// `--device cuda` where torch sees no CUDA device: one clear error from every command that
/// takes a device, before anything else happens (the model tools, `learner step`, the
/// prm-server, `prime train`, whose learner would otherwise fail the same way).
#[test]
fn cuda_without_a_device_is_a_clear_error_everywhere() {
    if !no_cuda() {
        return;
    }
    check_all(&[
        Probe::new(
            "CUDA device that is not there",
            &[
                "model",
                "logprobs",
                "--model",
                "{d}/model",
                "--input",
                "{d}/ids.jsonl",
                "--output",
                "{d}/out.jsonl",
                "--device",
                "cuda",
            ],
        )
        .fails(&["no CUDA device"]),
        Probe::new(
            "CUDA device that is not there",
            &[
                "model",
                "generate",
                "--model",
                "{d}/model",
                "--input",
                "{d}/ids.jsonl",
                "--output",
                "{d}/out.jsonl",
                "--max-new-tokens",
                "2",
                "--temperature",
                "0",
                "--device",
                "cuda:1",
            ],
        )
        .fails(&["no CUDA device"]),
        Probe::new(
            "CUDA device that is not there",
            &[
                "learner",
                "step",
                "--policy",
                "{d}/model",
                "--prm",
                "{d}/model",
                "--ref",
                "{d}/model",
                "--rollouts",
                "{d}/rollouts.jsonl",
                "--out",
                "{d}/out",
                "--device",
                "cuda",
            ],
        )
        .fails(&["no CUDA device"]),
        Probe::new(
            "CUDA device that is not there",
            &[
                "prm-server",
                "serve",
                "--prm",
                "{d}/model",
                "--ref",
                "{d}/model",
                "--listen",
                "127.0.0.1:0",
                "--device",
                "cuda",
            ],
        )
        .fails(&["no CUDA device"]),
        Probe::new(
            "CUDA device that is not there",
            &[
                "train",
                "--config",
                "{d}/config.toml",
                "--run-dir",
                "{d}/run",
                "--device",
                "cuda",
            ],
        )
        .fails(&["no CUDA device"]),
        Probe::new(
            "CUDA device that is not there",
            &[
                "learner",
                "serve",
                "--config",
                "{d}/config.toml",
                "--run-dir",
                "{d}/run",
                "--listen",
                "127.0.0.1:0",
                "--device",
                "cuda",
            ],
        )
        .fails(&["no CUDA device"]),
        Probe::new(
            "CUDA device that is not there",
            &[
                "sft",
                "--config",
                "{d}/config.toml",
                "--run-dir",
                "{d}/run",
                "--device",
                "cuda",
            ],
        )
        .fails(&["no CUDA device"]),
        Probe::new(
            "CUDA device that is not there",
            &[
                "actor",
                "run",
                "--learner",
                "http://127.0.0.1:9",
                "--verifier",
                "http://127.0.0.1:9",
                "--tokenizer",
                "{d}/model",
                "--device",
                "cuda",
            ],
        )
        .fails(&["no CUDA device"]),
        Probe::new(
            "CUDA device that is not there",
            &[
                "eval",
                "--model",
                "{d}/model",
                "--data",
                "{d}/grade.jsonl",
                "--out",
                "{d}/eval",
                "--device",
                "cuda",
            ],
        )
        .fails(&["no CUDA device"]),
    ]);
}

/// `prime learner step`: NaN and out-of-range learning rates and β, groups the step cannot
/// use (named by line), sequences longer than the models' context; `--out` replaced only by a
/// complete step.
#[test]
fn learner_step_probes() {
    check_all(&[
        Probe::new("NaN and infinity", &["learner", "step", "--policy", "{d}/model", "--prm", "{d}/model", "--ref", "{d}/model", "--rollouts", "{d}/rollouts.jsonl", "--out", "{d}/out", "--policy-lr", "NaN"])
            .fails(&["--policy-lr", "finite"]),
        Probe::new("NaN and infinity", &["learner", "step", "--policy", "{d}/model", "--prm", "{d}/model", "--ref", "{d}/model", "--rollouts", "{d}/rollouts.jsonl", "--out", "{d}/out", "--beta", "nan"])
            .fails(&["--beta"]),
        Probe::new("out-of-range number", &["learner", "step", "--policy", "{d}/model", "--prm", "{d}/model", "--ref", "{d}/model", "--rollouts", "{d}/rollouts.jsonl", "--out", "{d}/out", "--beta", "0"])
            .fails(&["--beta"]),
        Probe::new("out-of-range number", &["learner", "step", "--policy", "{d}/model", "--prm", "{d}/model", "--ref", "{d}/model", "--rollouts", "{d}/rollouts.jsonl", "--out", "{d}/out", "--off-policy", "--behavior-weight-cap", "0"])
            .fails(&["--behavior-weight-cap"]),
        Probe::new("NaN and infinity", &["learner", "step", "--policy", "{d}/model", "--prm", "{d}/model", "--ref", "{d}/model", "--rollouts", "{d}/bad.jsonl", "--out", "{d}/out", "--mini-batches", "1"])
            .files(&[("bad.jsonl", Text("{\"prompt_ids\": [3, 4], \"responses\": [{\"ids\": [5, 6], \"score\": 1.0, \"sampling_logprobs\": [-0.5, -1e39]}, {\"ids\": [6], \"score\": 0.0}]}\n"))])
            .fails(&["bad.jsonl line 1", "response 0", "sampling_logprobs"]),
        Probe::new("missing field", &["learner", "step", "--policy", "{d}/model", "--prm", "{d}/model", "--ref", "{d}/model", "--rollouts", "{d}/rollouts.jsonl", "--out", "{d}/out", "--mini-batches", "1", "--off-policy"])
            .fails(&["rollouts.jsonl line 1", "sampling_logprobs", "--off-policy"]),
        Probe::new("out-of-range number", &["learner", "step", "--policy", "{d}/model", "--prm", "{d}/model", "--ref", "{d}/model", "--rollouts", "{d}/rollouts.jsonl", "--out", "{d}/out", "--prm-lr", "-1e-6"])
            .fails(&["--prm-lr"]),
        Probe::new("out-of-range number", &["learner", "step", "--policy", "{d}/model", "--prm", "{d}/model", "--ref", "{d}/model", "--rollouts", "{d}/rollouts.jsonl", "--out", "{d}/out", "--mini-batches", "3"])
            .fails(&["--mini-batches 3", "rollouts.jsonl"]),
        Probe::new("out-of-range number", &["learner", "step", "--policy", "{d}/model", "--prm", "{d}/model", "--ref", "{d}/model", "--rollouts", "{d}/rollouts.jsonl", "--out", "{d}/out", "--collective-timeout-seconds", "0"])
            .fails(&["--collective-timeout-seconds"]),
        Probe::new("sequence longer than the model's context", &["learner", "step", "--policy", "{d}/model", "--prm", "{d}/model", "--ref", "{d}/model", "--rollouts", "{d}/bad.jsonl", "--out", "{d}/out", "--mini-batches", "1"])
            .files(&[("bad.jsonl", Text("{\"prompt_ids\": [3, 4], \"responses\": [{\"ids\": [5], \"score\": 1.0}, {\"ids\": [1,2,3,4,5,6,7,8,9,10,1,2,3,4,5,6,7,8,9,10,1,2,3,4,5,6,7,8,9,10,1,2,3,4,5,6,7,8,9,10,1,2,3,4,5,6,7,8,9,10,1,2,3,4,5,6,7,8,9,10,1,2,3], \"score\": 0.0}]}\n"))])
            .fails(&["bad.jsonl line 1", "response 1", "max_position_embeddings (64)"]),
        Probe::new("token id outside the vocabulary", &["learner", "step", "--policy", "{d}/model", "--prm", "{d}/model", "--ref", "{d}/model", "--rollouts", "{d}/bad.jsonl", "--out", "{d}/out", "--mini-batches", "1"])
            .files(&[("bad.jsonl", Text("{\"prompt_ids\": [3, 4], \"responses\": [{\"ids\": [5], \"score\": 1.0}, {\"ids\": [99], \"score\": 0.0}]}\n"))])
            .fails(&["bad.jsonl line 1", "vocabulary"]),
        Probe::new("out-of-range number", &["learner", "step", "--policy", "{d}/model", "--prm", "{d}/model", "--ref", "{d}/model", "--rollouts", "{d}/bad.jsonl", "--out", "{d}/out", "--mini-batches", "1"])
            .files(&[("bad.jsonl", Text("\n{\"prompt_ids\": [3, 4], \"responses\": [{\"ids\": [5], \"score\": 1.5}, {\"ids\": [6], \"score\": 0.0}]}\n"))])
            .fails(&["bad.jsonl line 2", "score"]),
        Probe::new("missing field", &["learner", "step", "--policy", "{d}/model", "--prm", "{d}/model", "--ref", "{d}/model", "--rollouts", "{d}/bad.jsonl", "--out", "{d}/out", "--mini-batches", "1"])
            .files(&[("bad.jsonl", Text("{\"prompt_ids\": [3, 4], \"responses\": [{\"ids\": [5]}, {\"ids\": [6], \"score\": 0.0}]}\n"))])
            .fails(&["bad.jsonl line 1", "score"]),
        Probe::new("wrong shape", &["learner", "step", "--policy", "{d}/model", "--prm", "{d}/model", "--ref", "{d}/model", "--rollouts", "{d}/bad.jsonl", "--out", "{d}/out", "--mini-batches", "1"])
            .files(&[("bad.jsonl", Text("{\"prompt_ids\": [3, 4], \"responses\": [{\"ids\": [5], \"score\": 1.0}, {\"ids\": [6], \"score\": 0.0}]}\n{\"prompt_ids\": [3], \"responses\": [{\"ids\": [5], \"score\": 1.0}]}\n"))])
            .fails(&["bad.jsonl line 2", "responses"]),
        Probe::new("empty file", &["learner", "step", "--policy", "{d}/model", "--prm", "{d}/model", "--ref", "{d}/model", "--rollouts", "{d}/bad.jsonl", "--out", "{d}/out"])
            .files(&[("bad.jsonl", Text("\n  \n"))])
            .fails(&["bad.jsonl", "no lines"]),
        Probe::new("output in the way", &["learner", "step", "--policy", "{d}/model", "--prm", "{d}/model", "--ref", "{d}/model", "--rollouts", "{d}/rollouts.jsonl", "--out", "{d}/out.jsonl", "--mini-batches", "1"])
            .fails(&["out.jsonl", "not a directory"]),
        Probe::new("BOM and CRLF", &["learner", "step", "--policy", "{d}/model", "--prm", "{d}/model", "--ref", "{d}/model", "--rollouts", "{d}/bom.jsonl", "--out", "{d}/out", "--mini-batches", "1"])
            .files(&[("bom.jsonl", Bytes(b"\xEF\xBB\xBF{\"prompt_ids\": [3, 4], \"responses\": [{\"ids\": [5, 2], \"score\": 1.0}, {\"ids\": [6, 7], \"score\": 0.0}]}\r\n"))])
            .succeeds(&["out/"]),
    ]);
}

/// Run configs through `prime train`, `prime learner serve` and `prime sft`: a value the actors or
/// the step would choke on is refused at load, naming the key, before any process starts.
#[test]
fn config_probes() {
    check_all(&[
        Probe::new(
            "out-of-range number",
            &[
                "train",
                "--config",
                "{d}/config.toml",
                "--run-dir",
                "{d}/run",
                "--set",
                "learner.rollout.top_p=0",
            ],
        )
        .fails(&[
            "config.toml",
            "learner.rollout.top_p must be a number in (0, 1], got 0",
        ]),
        Probe::new(
            "NaN and infinity",
            &[
                "train",
                "--config",
                "{d}/config.toml",
                "--run-dir",
                "{d}/run",
                "--set",
                "learner.rollout.temperature=nan",
            ],
        )
        .fails(&["learner.rollout.temperature", "NaN"]),
        Probe::new(
            "NaN and infinity",
            &[
                "learner",
                "serve",
                "--config",
                "{d}/config.toml",
                "--run-dir",
                "{d}/run",
                "--listen",
                "127.0.0.1:0",
                "--set",
                "learner.algo.prm.beta=nan",
            ],
        )
        .fails(&["learner.algo.prm.beta"]),
        Probe::new(
            "out-of-range number",
            &[
                "learner",
                "serve",
                "--config",
                "{d}/config.toml",
                "--run-dir",
                "{d}/run",
                "--listen",
                "127.0.0.1:0",
                "--set",
                "learner.policy_optimizer.lr=-1e-6",
            ],
        )
        .fails(&["learner.policy_optimizer.lr"]),
        Probe::new(
            "NaN and infinity",
            &[
                "sft",
                "--config",
                "{d}/config.toml",
                "--run-dir",
                "{d}/run",
                "--set",
                "sft.max_seconds=inf",
            ],
        )
        .fails(&["sft.max_seconds"]),
        Probe::new(
            "out-of-range number",
            &[
                "train",
                "--config",
                "{d}/config.toml",
                "--run-dir",
                "{d}/run",
                "--set",
                "learner.rollout.lease_seconds=0",
            ],
        )
        .fails(&["learner.rollout.lease_seconds"]),
        Probe::new(
            "out-of-range number",
            &[
                "train",
                "--config",
                "{d}/config.toml",
                "--run-dir",
                "{d}/run",
                "--set",
                "learner.policy_optimizer.adamw.beta2=1.0",
            ],
        )
        .fails(&["learner.policy_optimizer.adamw.beta2"]),
        Probe::new(
            "out-of-range number",
            &[
                "train",
                "--config",
                "{d}/config.toml",
                "--run-dir",
                "{d}/run",
                "--set",
                "model.rope_theta=-1",
            ],
        )
        .fails(&["model.rope_theta"]),
        Probe::new(
            "wrong type",
            &[
                "train",
                "--config",
                "{d}/config.toml",
                "--run-dir",
                "{d}/run",
                "--set",
                "learner.rollout.top_k=\"all\"",
            ],
        )
        .fails(&["top_k"]),
        Probe::new(
            "truncated TOML",
            &["train", "--config", "{d}/bad.toml", "--run-dir", "{d}/run"],
        )
        .files(&[("bad.toml", Text("[learner.rollout]\nbatch_prompts = "))])
        .fails(&["bad.toml"]),
        Probe::new(
            "BOM and CRLF",
            &[
                "train",
                "--config",
                "{d}/bad.toml",
                "--run-dir",
                "{d}/run",
                "--actors",
                "0",
            ],
        )
        .files(&[("bad.toml", Text("\u{feff}[learner]\r\nsteps = 1\r\n"))])
        .fails(&["--actors must be at least 1"]),
        Probe::new(
            "out-of-range number",
            &[
                "train",
                "--config",
                "{d}/config.toml",
                "--run-dir",
                "{d}/run",
                "--learners",
                "0",
            ],
        )
        .fails(&["--learners"]),
        Probe::new(
            "missing input",
            &[
                "train",
                "--config",
                "{d}/absent.toml",
                "--run-dir",
                "{d}/run",
            ],
        )
        .fails(&["absent.toml"]),
        Probe::new(
            "threads",
            &[
                "train",
                "--config",
                "{d}/config.toml",
                "--run-dir",
                "{d}/run",
            ],
        )
        .env(&[("PRIME_THREADS", "-1")])
        .fails(&["--threads", "0..=1024"]),
        Probe::new(
            "threads",
            &[
                "train",
                "--config",
                "{d}/config.toml",
                "--run-dir",
                "{d}/run",
                "--threads",
                "many",
            ],
        )
        .fails(&["--threads"]),
    ]);
}

/// Servers and clients: bad numbers and tokens are refused before anything listens or
/// connects; an empty token is no token (refused off loopback), a short one is refused.
#[test]
fn service_probes() {
    check_all(&[
        Probe::new(
            "empty or short token",
            &["verifier", "serve", "--listen", "0.0.0.0:0"],
        )
        .env(&[("PRIME_TOKEN", "")])
        .fails(&["refusing to serve on 0.0.0.0:0", "is empty"]),
        Probe::new(
            "empty or short token",
            &[
                "verifier",
                "serve",
                "--listen",
                "0.0.0.0:0",
                "--token",
                "   ",
            ],
        )
        .fails(&["is empty"]),
        Probe::new(
            "empty or short token",
            &[
                "verifier",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--token",
                "s3cret",
            ],
        )
        .fails(&["6 characters", "at least 16"]),
        Probe::new(
            "empty or short token",
            &[
                "prm-server",
                "serve",
                "--prm",
                "{d}/model",
                "--ref",
                "{d}/model",
                "--listen",
                "0.0.0.0:0",
            ],
        )
        .env(&[("PRIME_TOKEN", " ")])
        .fails(&["is empty"]),
        Probe::new(
            "empty or short token",
            &[
                "learner",
                "serve",
                "--config",
                "{d}/config.toml",
                "--run-dir",
                "{d}/run",
                "--listen",
                "0.0.0.0:0",
                "--token",
                "short",
            ],
        )
        .fails(&["at least 16"]),
        Probe::new(
            "empty or short token",
            &["status", "--addr", "http://127.0.0.1:9", "--token", "short"],
        )
        .fails(&["at least 16"]),
        Probe::new(
            "empty or short token",
            &[
                "actor",
                "run",
                "--learner",
                "http://127.0.0.1:9",
                "--verifier",
                "http://127.0.0.1:9",
                "--tokenizer",
                "{d}/model",
                "--token",
                "short",
            ],
        )
        .fails(&["at least 16"]),
        Probe::new(
            "NaN and infinity",
            &[
                "verifier",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--item-timeout-secs",
                "nan",
            ],
        )
        .fails(&["--item-timeout-secs"]),
        Probe::new(
            "out-of-range number",
            &[
                "verifier",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--code-memory-mib",
                "0",
            ],
        )
        .fails(&["--code-memory-mib"]),
        Probe::new(
            "NaN and infinity",
            &[
                "prm-server",
                "serve",
                "--prm",
                "{d}/model",
                "--ref",
                "{d}/model",
                "--listen",
                "127.0.0.1:0",
                "--beta",
                "NaN",
            ],
        )
        .fails(&["--beta"]),
        Probe::new(
            "out-of-range number",
            &[
                "prm-server",
                "serve",
                "--prm",
                "{d}/model",
                "--ref",
                "{d}/model",
                "--listen",
                "127.0.0.1:0",
                "--poll-secs",
                "-5",
            ],
        )
        .fails(&["--poll-secs"]),
        Probe::new(
            "out-of-range number",
            &[
                "actor",
                "run",
                "--learner",
                "http://127.0.0.1:9",
                "--verifier",
                "http://127.0.0.1:9",
                "--tokenizer",
                "{d}/model",
                "--rpc-timeout-secs",
                "1e300",
            ],
        )
        .fails(&["--rpc-timeout-secs"]),
        Probe::new(
            "out-of-range number",
            &[
                "actor",
                "run",
                "--learner",
                "http://127.0.0.1:9",
                "--verifier",
                "http://127.0.0.1:9",
                "--tokenizer",
                "{d}/model",
                "--max-prompts",
                "0",
            ],
        )
        .fails(&["--max-prompts"]),
        Probe::new(
            "out-of-range number",
            &[
                "status",
                "--addr",
                "http://127.0.0.1:9",
                "--timeout-secs",
                "0",
            ],
        )
        .fails(&["--timeout-secs"]),
        Probe::new(
            "out-of-range number",
            &[
                "eval",
                "--model",
                "{d}/model",
                "--data",
                "{d}/grade.jsonl",
                "--out",
                "{d}/eval",
                "--top-p",
                "0",
            ],
        )
        .fails(&["--top-p"]),
        Probe::new(
            "out-of-range number",
            &[
                "eval",
                "--model",
                "{d}/model",
                "--data",
                "{d}/grade.jsonl",
                "--out",
                "{d}/eval",
                "--k",
                "0",
            ],
        )
        .fails(&["--k"]),
        Probe::new(
            "same input and output",
            &[
                "eval",
                "--model",
                "{d}/model",
                "--data",
                "{d}/grade.jsonl",
                "--out",
                "{d}/grade.jsonl",
            ],
        )
        .fails(&["--out must be another file than --data"]),
    ]);
}

/// The data and plotting tools.
#[test]
fn tool_probes() {
    check_all(&[
        Probe::new("same input and output", &["data", "check", "--files", "{d}/grade.jsonl", "--tokenizer", "{d}/model", "--json", "{d}/grade.jsonl"])
            .fails(&["--json must be another file than --files"]),
        Probe::new("out-of-range number", &["data", "check", "--files", "{d}/grade.jsonl", "--tokenizer", "{d}/model", "--max-prompt-tokens", "0"])
            .fails(&["--max-prompt-tokens"]),
        Probe::new("missing model file", &["data", "check", "--files", "{d}/grade.jsonl", "--tokenizer", "{d}/model"])
            .fails(&["model"]),
        Probe::new("missing input", &["compare", "--run", "a={d}/absent", "--out", "{d}/c.png"])
            .fails(&["absent"]),
        Probe::new("wrong type", &["compare", "--run", "no-label", "--out", "{d}/c.png"])
            .fails(&["LABEL=DIR"]),
        Probe::new("same input and output", &["compare", "--run", "a={d}/run", "--out", "{d}/run/metrics.jsonl"])
            .files(&[("run/metrics.jsonl", Text("{\"kind\": \"eval\", \"step\": 0, \"accuracy\": 0.5, \"greedy_accuracy\": null, \"problems\": 4, \"seconds\": 1.0, \"wall_seconds\": 1.0}\n"))])
            .fails(&["--out must be another file than --run"]),
        Probe::new("out-of-range number", &["world", "--out", "{d}/world", "--sft-size", "0", "--rl-size", "0"])
            .fails(&["empty"]),
    ]);
}

/// `PRIME_THREADS=0` (or empty, an unset variable) leaves the thread count to torch.
#[test]
fn zero_or_empty_threads_mean_torch_chooses() {
    check_all(&[
        Probe::new(
            "threads",
            &[
                "grade",
                "--input",
                "{d}/grade.jsonl",
                "--output",
                "{d}/out.jsonl",
            ],
        )
        .env(&[("PRIME_THREADS", "0")])
        .succeeds(&["out.jsonl"]),
        Probe::new(
            "threads",
            &[
                "model",
                "logprobs",
                "--model",
                "{d}/model",
                "--input",
                "{d}/ids.jsonl",
                "--output",
                "{d}/out.jsonl",
                "--threads",
                "0",
            ],
        )
        .succeeds(&["out.jsonl"]),
        Probe::new(
            "threads",
            &[
                "model",
                "logprobs",
                "--model",
                "{d}/model",
                "--input",
                "{d}/ids.jsonl",
                "--output",
                "{d}/out.jsonl",
            ],
        )
        .env(&[("PRIME_THREADS", "")])
        .succeeds(&["out.jsonl"]),
    ]);
}

/// A generated file's run: succeeded with one output line per input line, or refused naming
/// the input file; nothing else changed, no crash, no hang.
fn check_generated(fixture: &Fixture, args: &[&str], input: &str, bytes: &[u8], output: &str) {
    let d = fixture.path();
    std::fs::write(d.join(input), bytes).unwrap();
    if !output.ends_with('/') {
        std::fs::write(d.join(output), EXISTING).unwrap();
    }
    let args: Vec<String> = args
        .iter()
        .map(|a| a.replace("{d}", d.to_str().unwrap()))
        .collect();
    let before = snapshot(d);
    let run = run_prime(&args, &[]);
    let what = format!(
        "prime {} on {:?}",
        args.join(" "),
        String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
    );
    run.assert_no_crash(&what);
    let changed = changes(&before, &snapshot(d));
    if run.code == Some(0) {
        assert!(
            changed.iter().all(|c| c.starts_with(output)),
            "{what}: changed {changed:?}"
        );
        if let Some(lines) = nonblank_lines(bytes) {
            if !output.ends_with('/') {
                let written = std::fs::read_to_string(d.join(output)).unwrap();
                assert_eq!(written.lines().count(), lines, "{what}: {written}");
            }
        }
    } else {
        assert!(
            matches!(run.code, Some(1 | 2)),
            "{what}: status {:?}",
            run.code
        );
        assert!(
            run.stderr.contains(input),
            "{what}: the message does not name {input}:\n{}",
            run.stderr
        );
        assert!(
            changed.is_empty(),
            "{what}: a failed run changed {changed:?}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn generated_grade_inputs(damage in damage_strategy()) {
        let fixture = Fixture::new();
        let text = format!("{GRADE_ROW}\n{GRADE_ROW}\n");
        check_generated(
            &fixture,
            &["grade", "--input", "{d}/in.jsonl", "--output", "{d}/out.jsonl"],
            "in.jsonl",
            &probes::damage(&text, &damage),
            "out.jsonl",
        );
    }

    #[test]
    fn generated_logprobs_inputs(damage in damage_strategy()) {
        let fixture = Fixture::new();
        check_generated(
            &fixture,
            &["model", "logprobs", "--model", "{d}/model", "--input", "{d}/in.jsonl", "--output", "{d}/out.jsonl"],
            "in.jsonl",
            &probes::damage("{\"input_ids\": [1, 2, 3]}\n{\"input_ids\": [4, 5]}\n", &damage),
            "out.jsonl",
        );
    }

    #[test]
    fn generated_generate_inputs(damage in damage_strategy()) {
        let fixture = Fixture::new();
        check_generated(
            &fixture,
            &["model", "generate", "--model", "{d}/model", "--input", "{d}/in.jsonl", "--output", "{d}/out.jsonl", "--max-new-tokens", "3", "--temperature", "0"],
            "in.jsonl",
            &probes::damage("{\"input_ids\": [1, 2, 3]}\n", &damage),
            "out.jsonl",
        );
    }

    #[test]
    fn generated_rollouts(damage in damage_strategy()) {
        let fixture = Fixture::new();
        check_generated(
            &fixture,
            &["learner", "step", "--policy", "{d}/model", "--prm", "{d}/model", "--ref", "{d}/model", "--rollouts", "{d}/in.jsonl", "--out", "{d}/out/", "--mini-batches", "1"],
            "in.jsonl",
            &probes::damage(&rollouts(2, 2), &damage),
            "out/",
        );
    }
}

/// Numeric flags of every command with the command line around them; a bad value must be
/// refused by name before anything else happens (servers included: nothing listens).
const NUMERIC_FLAGS: &[(&[&str], &str)] = &[
    (
        &[
            "grade",
            "--input",
            "{d}/grade.jsonl",
            "--output",
            "{d}/out.jsonl",
        ],
        "--item-timeout-secs",
    ),
    (
        &[
            "grade",
            "--input",
            "{d}/grade.jsonl",
            "--output",
            "{d}/out.jsonl",
        ],
        "--code-timeout-secs",
    ),
    (
        &[
            "grade",
            "--input",
            "{d}/grade.jsonl",
            "--output",
            "{d}/out.jsonl",
        ],
        "--code-memory-mib",
    ),
    (
        &[
            "grade",
            "--input",
            "{d}/grade.jsonl",
            "--output",
            "{d}/out.jsonl",
        ],
        "--concurrency",
    ),
    (
        &[
            "model",
            "logprobs",
            "--model",
            "{d}/model",
            "--input",
            "{d}/ids.jsonl",
            "--output",
            "{d}/out.jsonl",
        ],
        "--max-batch-tokens",
    ),
    (
        &[
            "model",
            "generate",
            "--model",
            "{d}/model",
            "--input",
            "{d}/ids.jsonl",
            "--output",
            "{d}/out.jsonl",
            "--max-new-tokens",
            "2",
        ],
        "--temperature",
    ),
    (
        &[
            "model",
            "generate",
            "--model",
            "{d}/model",
            "--input",
            "{d}/ids.jsonl",
            "--output",
            "{d}/out.jsonl",
            "--temperature",
            "1",
        ],
        "--max-new-tokens",
    ),
    (
        &[
            "model",
            "generate",
            "--model",
            "{d}/model",
            "--input",
            "{d}/ids.jsonl",
            "--output",
            "{d}/out.jsonl",
            "--max-new-tokens",
            "2",
            "--temperature",
            "1",
        ],
        "--top-p",
    ),
    (
        &[
            "model",
            "generate",
            "--model",
            "{d}/model",
            "--input",
            "{d}/ids.jsonl",
            "--output",
            "{d}/out.jsonl",
            "--max-new-tokens",
            "2",
            "--temperature",
            "1",
        ],
        "--top-k",
    ),
    (
        &[
            "model",
            "generate",
            "--model",
            "{d}/model",
            "--input",
            "{d}/ids.jsonl",
            "--output",
            "{d}/out.jsonl",
            "--max-new-tokens",
            "2",
            "--temperature",
            "1",
        ],
        "--batch-size",
    ),
    (
        &[
            "learner",
            "step",
            "--policy",
            "{d}/model",
            "--prm",
            "{d}/model",
            "--ref",
            "{d}/model",
            "--rollouts",
            "{d}/rollouts.jsonl",
            "--out",
            "{d}/out",
        ],
        "--policy-lr",
    ),
    (
        &[
            "learner",
            "step",
            "--policy",
            "{d}/model",
            "--prm",
            "{d}/model",
            "--ref",
            "{d}/model",
            "--rollouts",
            "{d}/rollouts.jsonl",
            "--out",
            "{d}/out",
        ],
        "--prm-lr",
    ),
    (
        &[
            "learner",
            "step",
            "--policy",
            "{d}/model",
            "--prm",
            "{d}/model",
            "--ref",
            "{d}/model",
            "--rollouts",
            "{d}/rollouts.jsonl",
            "--out",
            "{d}/out",
        ],
        "--beta",
    ),
    (
        &[
            "learner",
            "step",
            "--policy",
            "{d}/model",
            "--prm",
            "{d}/model",
            "--ref",
            "{d}/model",
            "--rollouts",
            "{d}/rollouts.jsonl",
            "--out",
            "{d}/out",
        ],
        "--mini-batches",
    ),
    (
        &[
            "learner",
            "step",
            "--policy",
            "{d}/model",
            "--prm",
            "{d}/model",
            "--ref",
            "{d}/model",
            "--rollouts",
            "{d}/rollouts.jsonl",
            "--out",
            "{d}/out",
        ],
        "--collective-timeout-seconds",
    ),
    (
        &["verifier", "serve", "--listen", "127.0.0.1:0"],
        "--item-timeout-secs",
    ),
    (
        &["verifier", "serve", "--listen", "127.0.0.1:0"],
        "--concurrency",
    ),
    (
        &[
            "prm-server",
            "serve",
            "--prm",
            "{d}/model",
            "--ref",
            "{d}/model",
            "--listen",
            "127.0.0.1:0",
        ],
        "--beta",
    ),
    (
        &[
            "prm-server",
            "serve",
            "--prm",
            "{d}/model",
            "--ref",
            "{d}/model",
            "--listen",
            "127.0.0.1:0",
        ],
        "--poll-secs",
    ),
    (
        &[
            "prm-server",
            "serve",
            "--prm",
            "{d}/model",
            "--ref",
            "{d}/model",
            "--listen",
            "127.0.0.1:0",
        ],
        "--max-batch-tokens",
    ),
    (
        &[
            "prm-server",
            "serve",
            "--prm",
            "{d}/model",
            "--ref",
            "{d}/model",
            "--listen",
            "127.0.0.1:0",
        ],
        "--max-batch-responses",
    ),
    (
        &[
            "actor",
            "run",
            "--learner",
            "http://127.0.0.1:9",
            "--verifier",
            "http://127.0.0.1:9",
            "--tokenizer",
            "{d}/model",
        ],
        "--rpc-timeout-secs",
    ),
    (
        &[
            "actor",
            "run",
            "--learner",
            "http://127.0.0.1:9",
            "--verifier",
            "http://127.0.0.1:9",
            "--tokenizer",
            "{d}/model",
        ],
        "--weights-timeout-secs",
    ),
    (
        &[
            "actor",
            "run",
            "--learner",
            "http://127.0.0.1:9",
            "--verifier",
            "http://127.0.0.1:9",
            "--tokenizer",
            "{d}/model",
        ],
        "--grade-timeout-secs",
    ),
    (
        &[
            "actor",
            "run",
            "--learner",
            "http://127.0.0.1:9",
            "--verifier",
            "http://127.0.0.1:9",
            "--tokenizer",
            "{d}/model",
        ],
        "--max-backoff-secs",
    ),
    (
        &[
            "actor",
            "run",
            "--learner",
            "http://127.0.0.1:9",
            "--verifier",
            "http://127.0.0.1:9",
            "--tokenizer",
            "{d}/model",
        ],
        "--give-up-after-secs",
    ),
    (
        &[
            "actor",
            "run",
            "--learner",
            "http://127.0.0.1:9",
            "--verifier",
            "http://127.0.0.1:9",
            "--tokenizer",
            "{d}/model",
        ],
        "--broadcast-wait-secs",
    ),
    (
        &[
            "actor",
            "run",
            "--learner",
            "http://127.0.0.1:9",
            "--verifier",
            "http://127.0.0.1:9",
            "--tokenizer",
            "{d}/model",
        ],
        "--max-prompts",
    ),
    (
        &[
            "actor",
            "run",
            "--learner",
            "http://127.0.0.1:9",
            "--verifier",
            "http://127.0.0.1:9",
            "--tokenizer",
            "{d}/model",
        ],
        "--max-chunk-bytes",
    ),
    (
        &["status", "--addr", "http://127.0.0.1:9"],
        "--timeout-secs",
    ),
    (
        &[
            "eval",
            "--model",
            "{d}/model",
            "--data",
            "{d}/grade.jsonl",
            "--out",
            "{d}/eval",
        ],
        "--k",
    ),
    (
        &[
            "eval",
            "--model",
            "{d}/model",
            "--data",
            "{d}/grade.jsonl",
            "--out",
            "{d}/eval",
        ],
        "--temperature",
    ),
    (
        &[
            "eval",
            "--model",
            "{d}/model",
            "--data",
            "{d}/grade.jsonl",
            "--out",
            "{d}/eval",
        ],
        "--top-p",
    ),
    (
        &[
            "eval",
            "--model",
            "{d}/model",
            "--data",
            "{d}/grade.jsonl",
            "--out",
            "{d}/eval",
        ],
        "--max-new-tokens",
    ),
    (
        &[
            "eval",
            "--model",
            "{d}/model",
            "--data",
            "{d}/grade.jsonl",
            "--out",
            "{d}/eval",
        ],
        "--batch-rows",
    ),
    (
        &[
            "data",
            "check",
            "--files",
            "{d}/grade.jsonl",
            "--tokenizer",
            "{d}/model",
        ],
        "--max-prompt-tokens",
    ),
    (
        &[
            "train",
            "--config",
            "{d}/config.toml",
            "--run-dir",
            "{d}/run",
        ],
        "--learners",
    ),
    (
        &[
            "actor",
            "run",
            "--learner",
            "http://127.0.0.1:9",
            "--verifier",
            "http://127.0.0.1:9",
            "--tokenizer",
            "{d}/model",
        ],
        "--kv-cache-gib",
    ),
    (
        &[
            "model",
            "generate",
            "--model",
            "{d}/model",
            "--input",
            "{d}/ids.jsonl",
            "--output",
            "{d}/out.jsonl",
            "--max-new-tokens",
            "2",
            "--temperature",
            "1",
        ],
        "--kv-cache-gib",
    ),
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 10, failure_persistence: None, ..ProptestConfig::default() })]

    /// A bad number for any numeric flag: refused by clap (status 2) with the flag's name and
    /// its rule, nothing written, nothing started.
    #[test]
    fn generated_flag_values(
        flag in proptest::sample::select(NUMERIC_FLAGS),
        value in proptest::sample::select(BAD_NUMBERS),
    ) {
        let fixture = Fixture::new();
        let (command, name) = flag;
        let mut args: Vec<&'static str> = command.to_vec();
        args.extend([name, value]);
        let args: &'static [&'static str] = Box::leak(args.into_boxed_slice());
        let mentions: &'static [&'static str] = Box::leak(vec![name].into_boxed_slice());
        fixture.check(&Probe::new("generated flag value", args).fails(mentions));
    }

    /// A damaged run config: `prime train --actors 0` (which cannot run, so nothing starts)
    /// refuses it naming the file, or finds it valid and refuses the flag.
    #[test]
    fn generated_configs(
        damage in damage_strategy(),
        index in any::<usize>(),
        raw in proptest::sample::select(BAD_TOML_VALUES),
        edit in any::<bool>(),
    ) {
        let fixture = Fixture::new();
        let d = fixture.path();
        let bytes = if edit {
            replace_toml_value(TINY_CONFIG, index, raw).into_bytes()
        } else {
            match damage {
                Damage::Field(..) | Damage::Drop(_) => TINY_CONFIG.as_bytes().to_vec(),
                other => probes::damage(TINY_CONFIG, &other),
            }
        };
        std::fs::write(d.join("cfg.toml"), &bytes).unwrap();
        let args: Vec<String> = ["train", "--config", "{d}/cfg.toml", "--run-dir", "{d}/run", "--actors", "0"]
            .iter()
            .map(|a| a.replace("{d}", d.to_str().unwrap()))
            .collect();
        let before = snapshot(d);
        let run = run_prime(&args, &[]);
        let what = format!("prime train on {:?}", String::from_utf8_lossy(&bytes[..bytes.len().min(400)]));
        run.assert_no_crash(&what);
        prop_assert!(matches!(run.code, Some(1 | 2)), "{}: status {:?}", what, run.code);
        prop_assert!(
            run.stderr.contains("cfg.toml") || run.stderr.contains("--actors must be at least 1"),
            "{}: {}", what, run.stderr
        );
        prop_assert!(changes(&before, &snapshot(d)).is_empty(), "{}", what);
    }
}

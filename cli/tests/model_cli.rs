//! The fixed `prime model logprobs|generate` interface, run as a real process against
//! transformers on the same checkpoint.
use std::path::Path;
use std::process::Command;

use prime_tests::*;
use serde_json::json;

fn prime() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_prime"));
    cmd.env("PRIME_THREADS", "1").env("RUST_LOG", "warn");
    cmd
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("prime runs");
    assert!(
        out.status.success(),
        "prime failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn paths(dir: &Path) -> (String, String, String) {
    let s = |name: &str| dir.join(name).to_str().unwrap().to_string();
    (s("model"), s("in.jsonl"), s("out.jsonl"))
}

#[test]
fn logprobs_and_generate_match_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, input, output) = paths(tmp.path());
    qwen2_ref(&["make", "--out", &model, "--vocab", "300", "--tied"]);
    let sequences = random_sequences(3, 2, 25, 300, 42);
    let rows: Vec<_> = sequences
        .iter()
        .map(|s| json!({ "input_ids": s }))
        .collect();
    write_jsonl(Path::new(&input), &rows);

    run(prime().args([
        "model", "logprobs", "--model", &model, "--input", &input, "--output", &output,
    ]));
    let ours = read_jsonl(Path::new(&output));
    let reference = reference_logprobs(Path::new(&model), &sequences, "float32");
    assert_eq!(ours.len(), sequences.len());
    for ((o, r), seq) in ours.iter().zip(&reference).zip(&sequences) {
        let o = f32s(&o["logprobs"]);
        assert_eq!(o.len(), seq.len() - 1);
        assert!(max_abs_diff(&o, r) < 1e-4);
    }

    run(prime().args([
        "model",
        "generate",
        "--model",
        &model,
        "--input",
        &input,
        "--output",
        &output,
        "--max-new-tokens",
        "9",
        "--temperature",
        "0",
    ]));
    let ours = read_jsonl(Path::new(&output));
    for (o, r) in ours
        .iter()
        .zip(reference_greedy(Path::new(&model), &sequences, 9))
    {
        assert_eq!(i64s(&o["output_ids"]), r);
    }
}

#[test]
fn text_prompts_use_the_chat_template_and_sampling_is_seeded() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, input, output) = paths(tmp.path());
    let tokenizer = tmp.path().join("tok");
    let made = qwen2_ref(&[
        "make-tokenizer",
        "--out",
        tokenizer.to_str().unwrap(),
        "--vocab-size",
        "400",
    ]);
    let eos = made["special_ids"]["<|im_end|>"]
        .as_i64()
        .unwrap()
        .to_string();
    qwen2_ref(&["make", "--out", &model, "--vocab", "400", "--eos-id", &eos]);
    prime_model::checkpoint::copy_tokenizer_files(&tokenizer, Path::new(&model)).unwrap();
    write_jsonl(
        Path::new(&input),
        &[
            json!({"prompt": "What is 2 + 3?"}),
            json!({"input_ids": [5, 6, 7]}),
        ],
    );
    let generate = |seed: &str, out: &str| {
        run(prime().args([
            "model",
            "generate",
            "--model",
            &model,
            "--input",
            &input,
            "--output",
            out,
            "--max-new-tokens",
            "6",
            "--temperature",
            "1.0",
            "--top-p",
            "0.9",
            "--top-k",
            "50",
            "--seed",
            seed,
        ]));
        read_jsonl(Path::new(out))
    };
    let first = generate("3", &output);
    let again = generate("3", tmp.path().join("again.jsonl").to_str().unwrap());
    assert_eq!(first, again, "same seed, different samples");
    assert_eq!(first.len(), 2);
    for row in &first {
        let ids = i64s(&row["output_ids"]);
        assert!(!ids.is_empty() && ids.len() <= 6);
        assert!(row["text"].is_string());
    }
    // The text prompt went through the chat template: the same prompt as input_ids behaves alike.
    let tok = prime_model::Tokenizer::from_dir(Path::new(&model)).unwrap();
    let messages = [prime_model::ChatMessage {
        role: "user".into(),
        content: "What is 2 + 3?".into(),
    }];
    let ids = tok.encode_chat(&messages, true).unwrap();
    write_jsonl(
        Path::new(&input),
        &[json!({"input_ids": ids}), json!({"input_ids": [5, 6, 7]})],
    );
    assert_eq!(
        generate("3", tmp.path().join("ids.jsonl").to_str().unwrap()),
        first
    );
}

#[test]
fn bad_input_is_reported_with_its_line() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, input, output) = paths(tmp.path());
    qwen2_ref(&["make", "--out", &model, "--vocab", "300"]);
    std::fs::write(&input, "{\"input_ids\":[1,2]}\n{\"input_ids\":[1,\"x\"]}\n").unwrap();
    let out = prime()
        .args([
            "model", "logprobs", "--model", &model, "--input", &input, "--output", &output,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 2"), "{stderr}");
    std::fs::write(&input, "{\"input_ids\":[1,999]}\n").unwrap();
    let out = prime()
        .args([
            "model", "logprobs", "--model", &model, "--input", &input, "--output", &output,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("outside the vocabulary"));
}

/// `--kv-cache-gib` changes how many rows decode at once, not what they sample; a budget
/// below one sequence is refused with the numbers.
#[test]
fn generate_within_a_kv_cache_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, input, _) = paths(tmp.path());
    // 2 layers x 2 kv heads x head dim 16 (hidden 64 over 4 heads): 2 x 2 x 2 x 16 x 4 bytes
    // (f32) = 512 bytes per token.
    qwen2_ref(&["make", "--out", &model, "--vocab", "300"]);
    let prompts = [
        vec![5, 6, 7, 8, 9],
        vec![1, 2, 3],
        vec![4, 4, 4, 4],
        vec![9, 8],
    ];
    let rows: Vec<_> = prompts.iter().map(|p| json!({ "input_ids": p })).collect();
    write_jsonl(Path::new(&input), &rows);
    let generate = |name: &str, budget: Option<u64>| {
        let output = tmp.path().join(name);
        let mut cmd = prime();
        cmd.args(["model", "generate", "--model", &model, "--input", &input])
            .args(["--output", output.to_str().unwrap()])
            .args([
                "--max-new-tokens",
                "6",
                "--temperature",
                "1.0",
                "--seed",
                "3",
            ]);
        if let Some(bytes) = budget {
            let gib = bytes as f64 / (1u64 << 30) as f64;
            cmd.args(["--kv-cache-gib", &gib.to_string()]);
        }
        let out = cmd.output().expect("prime runs");
        let rows = out.status.success().then(|| {
            read_jsonl(&output)
                .iter()
                .map(|r| i64s(&r["output_ids"]))
                .collect::<Vec<_>>()
        });
        (rows, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    // The longest sequence: 5 prompt tokens + 6 new = 11 tokens = 5,632 bytes.
    let (unbounded, _) = generate("all.jsonl", None);
    let unbounded = unbounded.expect("generates");
    for (name, bytes) in [("one.jsonl", 5_632), ("two.jsonl", 2 * 5_632)] {
        let (bounded, stderr) = generate(name, Some(bytes));
        assert_eq!(
            bounded.as_ref(),
            Some(&unbounded),
            "{bytes} bytes: {stderr}"
        );
    }
    let (refused, stderr) = generate("none.jsonl", Some(5_631));
    assert!(refused.is_none());
    for number in [
        "11 tokens",
        "5632 bytes",
        "512 bytes per token",
        "5631 bytes",
    ] {
        assert!(stderr.contains(number), "{number:?} missing from {stderr}");
    }
}

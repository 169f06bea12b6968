//! The saved tokenizer against Hugging Face transformers: `AutoTokenizer.from_pretrained`
//! must load it, render the same chat text and produce the same token ids as the Rust side.
//!
//! Uses the Python venv at `$PRIME_VENV` (default `~/.cache/prime-rs/venv`), which `make test`
//! installs; without it the test says so and passes without checking.

use std::path::PathBuf;
use std::process::Command;

use prime_world::tokenizer::{encode, render_chatml, ENDOFTEXT, IM_END};
use prime_world::{build_world, read_rows, ChatMessage, SplitConfig, WorldConfig};
use serde_json::json;

const SCRIPT: &str = r#"
import json, sys
from transformers import AutoTokenizer

tok = AutoTokenizer.from_pretrained(sys.argv[1])
cases = json.load(open(sys.argv[2]))
out = {
    "eos_token_id": tok.eos_token_id,
    "pad_token_id": tok.pad_token_id,
    "bos_token": tok.bos_token,
    "vocab_size": len(tok),
    "cases": [],
}
for case in cases:
    text = tok.apply_chat_template(
        case["messages"], tokenize=False, add_generation_prompt=case["add_generation_prompt"]
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    templated = tok.apply_chat_template(
        case["messages"], tokenize=True, add_generation_prompt=case["add_generation_prompt"]
    )
    if hasattr(templated, "keys"):
        templated = templated["input_ids"]
    out["cases"].append({
        "text": text,
        "ids": ids,
        "templated_ids": list(templated),
        "decoded": tok.decode(ids, skip_special_tokens=False),
        "plain_ids": tok(case["plain"], add_special_tokens=False)["input_ids"],
    })
print(json.dumps(out))
"#;

fn python() -> Option<PathBuf> {
    let venv = std::env::var_os("PRIME_VENV")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/prime-rs/venv"))
        })?;
    let python = venv.join("bin/python");
    python.exists().then_some(python)
}

#[test]
fn transformers_loads_the_tokenizer_and_agrees_on_ids() {
    let python = python().expect(
        "no Python venv: run `make test` (it creates ~/.cache/prime-rs/venv) or set PRIME_VENV",
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = WorldConfig {
        sft: SplitConfig::with_size(400),
        rl: SplitConfig::with_size(100),
        heldout: SplitConfig::with_size(50),
        ..WorldConfig::default()
    };
    let files = build_world(&cfg, dir.path()).unwrap();
    let tokenizer = tokenizers::Tokenizer::from_file(&files.tokenizer_json).unwrap();

    let mut cases: Vec<(Vec<ChatMessage>, bool, String)> = Vec::new();
    for row in read_rows(&files.sft.jsonl).unwrap().iter().take(40) {
        let response = row.response.clone().unwrap();
        let mut messages = row.prompt.clone();
        cases.push((messages.clone(), true, response.clone()));
        messages.push(ChatMessage::new("assistant", response));
        cases.push((messages, false, row.prompt[0].content.clone()));
    }
    for row in read_rows(&files.heldout.parquet).unwrap().iter().take(10) {
        let mut messages = vec![ChatMessage::new("system", "Be brief.")];
        messages.extend(row.prompt.iter().cloned());
        cases.push((
            messages,
            true,
            "unseen: Ünïcödé 😀 12,345.6 \t x".to_string(),
        ));
    }
    let input = dir.path().join("cases.json");
    let payload: Vec<_> = cases
        .iter()
        .map(|(messages, gen, plain)| {
            json!({"messages": messages, "add_generation_prompt": gen, "plain": plain})
        })
        .collect();
    std::fs::write(&input, serde_json::to_string(&payload).unwrap()).unwrap();

    let output = Command::new(&python)
        .arg("-c")
        .arg(SCRIPT)
        .arg(&files.tokenizer_dir)
        .arg(&input)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "python failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();

    assert_eq!(
        result["eos_token_id"],
        json!(tokenizer.token_to_id(IM_END).unwrap())
    );
    assert_eq!(
        result["pad_token_id"],
        json!(tokenizer.token_to_id(ENDOFTEXT).unwrap())
    );
    assert_eq!(result["bos_token"], json!(null));
    assert_eq!(result["vocab_size"], json!(tokenizer.get_vocab_size(true)));

    let answers = result["cases"].as_array().unwrap();
    assert_eq!(answers.len(), cases.len());
    for ((messages, gen, plain), answer) in cases.iter().zip(answers) {
        let text = render_chatml(messages, *gen);
        assert_eq!(answer["text"], json!(text), "chat template differs");
        let ids = encode(&tokenizer, &text).unwrap();
        assert_eq!(answer["ids"], json!(ids), "ids differ for {text:?}");
        assert_eq!(answer["templated_ids"], json!(ids));
        assert_eq!(answer["decoded"], json!(text));
        assert_eq!(
            answer["plain_ids"],
            json!(encode(&tokenizer, plain).unwrap()),
            "ids differ for {plain:?}"
        );
    }
}

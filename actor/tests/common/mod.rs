//! Helpers shared by the actor's integration tests: a small hand-written tokenizer, a tiny
//! random policy, and a real verifier server on a loopback port.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::Path;

use prime_model::{CausalLm, Qwen2Config};
use prime_verifier::grade::{Grader, GraderConfig};
use tch::{Device, Kind};

/// Id of `<|im_end|>` in [`write_tokenizer`]'s vocabulary.
pub const IM_END: i64 = 6;

/// Writes a word-level `tokenizer.json` with 7 entries (`<|im_end|>` special) into `dir`.
/// With no decoder configured, decoding joins the tokens with spaces.
pub fn write_tokenizer(dir: &Path) {
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{
            "id": IM_END, "content": "<|im_end|>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }],
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null,
        "decoder": null,
        "model": {
            "type": "WordLevel",
            "vocab": {
                "<unk>": 0, "the": 1, "answer": 2, "is": 3, "\\boxed{4}": 4, "\\boxed{5}": 5,
                "<|im_end|>": IM_END
            },
            "unk_token": "<unk>"
        }
    });
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
}

/// A tiny Qwen2 config with a vocabulary larger than [`write_tokenizer`]'s, as models padded
/// past their tokenizer have.
pub fn tiny_config() -> Qwen2Config {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 61,
        "hidden_size": 16,
        "intermediate_size": 24,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "eos_token_id": IM_END,
    }))
    .unwrap()
}

/// A random f32 policy on the CPU.
/// torch's random generator is global to the process and tests run in parallel: a test whose
/// result depends on it (seeded initialisation, seeded sampling) holds this for its duration.
pub fn torch_rng() -> std::sync::MutexGuard<'static, ()> {
    static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TORCH_RNG.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn tiny_model(seed: i64) -> CausalLm {
    tch::set_num_threads(1);
    tch::manual_seed(seed);
    CausalLm::random(&tiny_config(), Device::Cpu, Kind::Float, Kind::Float).unwrap()
}

/// A two-thread runtime for the tests' clients and servers.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Starts a real verifier (optionally checking `token`) on an ephemeral loopback port of
/// `runtime` and returns its URL.
pub fn start_verifier(runtime: &tokio::runtime::Runtime, token: Option<&str>) -> String {
    let token = token.map(String::from);
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let grader = Grader::new(GraderConfig::default());
        tokio::spawn(async move {
            prime_verifier::service::serve_on(listener, grader, token, std::future::pending())
                .await
                .unwrap();
        });
        url
    })
}

/// A loopback URL where nothing listens (a port just released).
pub fn closed_port_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    url
}

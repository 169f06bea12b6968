//! `prime plan` as a real process: the paper's run on three 8-GPU nodes does not fit and says
//! what would; the embedded demo fits one small GPU; a cluster without a learner GPU is an
//! error.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn prime_plan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_prime"))
        .arg("plan")
        .args(args)
        .current_dir(repo())
        .env("RUST_LOG", "warn")
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("prime runs")
}

#[test]
fn the_papers_run_does_not_fit_and_says_what_would() {
    let out = prime_plan(&[
        "--config",
        "configs/eurus-2-7b.toml",
        "--model-config",
        "configs/models/eurus-2-7b-sft.config.json",
        "--nodes",
        "3",
        "--gpus-per-node",
        "8",
        "--gpu-memory-gib",
        "79",
        "--actor-gpus",
        "16",
        "--actor-max-prompts",
        "32",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    for part in [
        "8 learner ranks, 16 actor GPUs",
        "learner rank (W = 8, ZeRO-2, recomputed activations, micro-batch 1 x 4096 tokens",
        "ep (P + P')",
        "70.93",
        "change: no memory key makes the step fit 8 ranks",
        "actor: ",
        "prm-server: ",
        "with ZeRO-3 (not implemented)",
        "verdicts:",
    ] {
        assert!(stdout.contains(part), "{part:?} missing from:\n{stdout}");
    }
    assert!(stderr.contains("the run does not fit"), "{stderr}");
}

#[test]
fn the_demo_fits_a_small_gpu() {
    let out = prime_plan(&[
        "--config",
        "configs/demo.toml",
        "--gpus-per-node",
        "1",
        "--gpu-memory-gib",
        "16",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("learner rank: "), "{stdout}");
    assert!(!stdout.contains("does not fit"), "{stdout}");
}

#[test]
fn every_gpu_an_actor_is_an_error() {
    let out = prime_plan(&[
        "--config",
        "configs/demo.toml",
        "--gpus-per-node",
        "2",
        "--gpu-memory-gib",
        "16",
        "--actor-gpus",
        "2",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("leave none of the 2 GPUs for the learner"),
        "{stderr}"
    );
}

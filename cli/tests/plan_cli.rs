//! `prime plan` as a real process: the paper's run on three 8-GPU nodes fits with ZeRO-3, and
//! with ZeRO-2 does not and says what would; the embedded demo fits one small GPU; a cluster without a learner GPU is an
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

/// `prime plan` on the paper's run, three 8-GPU nodes with 16 actors, and `extra` arguments.
fn papers_run(extra: &[&str]) -> Output {
    let mut args = vec![
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
    ];
    args.extend_from_slice(extra);
    prime_plan(&args)
}

#[test]
fn the_papers_run_fits_with_zero3() {
    let out = papers_run(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for part in [
        "8 learner ranks, 16 actor GPUs",
        "learner rank (W = 8, ZeRO-3, recomputed activations, micro-batch 1 x 4096 tokens",
        "ep (P + P') / W",
        "35.72",
        "learner rank: 65.45 GiB of 79.00 GiB: fits",
        "actor: ",
        "prm-server: ",
        "verdicts:",
    ] {
        assert!(stdout.contains(part), "{part:?} missing from:\n{stdout}");
    }
}

#[test]
fn the_papers_run_with_zero2_does_not_fit_and_says_what_would() {
    let out = papers_run(&[
        "--set",
        "learner.parallel.zero3=false",
        "--set",
        "learner.parallel.zero2=true",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    for part in [
        "learner rank (W = 8, ZeRO-2, recomputed activations, micro-batch 1 x 4096 tokens",
        "70.93",
        "change: learner.parallel.zero3 = true",
        "with ZeRO-3: learner rank: 65.45 GiB of 79.00 GiB: fits",
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

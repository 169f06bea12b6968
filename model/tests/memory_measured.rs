//! The memory plan's terms (`prime_model::memory`) against what libtorch allocates.
//!
//! Each case runs in a child process of this test binary (`measure_child`), so that nothing
//! else allocates there. The child builds the model, runs the operation once (code pages,
//! thread pools and library buffers come in), then resets the peak resident set
//! (`/proc/self/clear_refs` = 5), reads the resident set, runs the operation again and reads
//! the peak (`VmHWM`): the difference is what the operation allocated at its peak. glibc is
//! told to serve every allocation above 64 KiB with its own mapping and to give freed memory
//! back at once (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`), so the resident set
//! follows libtorch's live tensors to the page. The plan's largest phase must be within 15%
//! of the measured peak.
//!
//! Shapes: the paper's 7B (hidden 3,584, 28 query / 4 key-value heads, MLP 18,944, vocabulary
//! 152,064) cut to one or two layers where the vocabulary terms are measured, and narrower
//! models where a term grows with the square of the sequence (same formulas, smaller
//! numbers). libtorch's CPU backend runs a fused (flash) attention kernel for the model's
//! masked attention; the math kernel, which CUDA runs for it, is selected in the child by
//! turning flash off in libtorch's global context.
use std::process::Command;
use std::sync::Mutex;

use prime_model::logprobs::PaddedBatch;
use prime_model::memory::{
    frozen_phases, kv_cache, peak, sampling_phases, training_phases, AttentionKernel, Batch, Dims,
    Dtypes, Gradients, Phase, Sampling, TrainingPass,
};
use prime_model::qwen2::{Init, Qwen2};
use prime_model::{generate_batched, token_logprobs, Qwen2Config, SamplingParams};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

const CASE_ENV: &str = "PRIME_MEMORY_CASE";

/// What a case runs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
enum Op {
    /// `token_logprobs_backward` (`recompute`) or `token_logprobs_backward_to` (`sink`).
    Training { recompute: bool, sink: bool },
    /// `token_logprobs` without autograd.
    Frozen,
    /// `generate_batched`: `groups` prompts, each repeated `samples` times, all rows at once.
    Generate { samples: u64, max_new: u64 },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Case {
    name: String,
    config: serde_json::Value,
    /// bf16 weights and activations, or f32 both.
    bf16: bool,
    math: bool,
    op: Op,
    rows: u64,
    width: u64,
    chunk: u64,
}

impl Case {
    fn config(&self) -> Qwen2Config {
        serde_json::from_value(self.config.clone()).unwrap()
    }

    fn kind(&self) -> Kind {
        if self.bf16 {
            Kind::BFloat16
        } else {
            Kind::Float
        }
    }

    fn kernel(&self) -> AttentionKernel {
        if self.math {
            AttentionKernel::Math
        } else {
            AttentionKernel::Flash
        }
    }

    /// The plan's phases for this case.
    fn phases(&self) -> Vec<Phase> {
        let dims = Dims::of(&self.config());
        let dtypes = Dtypes::new(self.kind(), self.kind());
        let batch = Batch {
            rows: self.rows,
            width: self.width,
        };
        match self.op {
            Op::Training { recompute, sink } => training_phases(
                &dims,
                &TrainingPass {
                    dtypes,
                    kernel: self.kernel(),
                    batch,
                    logit_chunk: self.chunk,
                    logprob_positions: self.width - 1,
                    recompute,
                    gradients: if sink {
                        Gradients::Sink
                    } else {
                        Gradients::Accumulate
                    },
                },
            ),
            Op::Frozen => frozen_phases(
                &dims,
                dtypes,
                self.kernel(),
                batch,
                self.chunk,
                self.width - 1,
            ),
            Op::Generate { samples, max_new } => {
                let sampling = Sampling {
                    rows: self.rows * samples,
                    groups: self.rows,
                    prompt: self.width,
                    max_new,
                };
                let kv = kv_cache(&dims, dtypes.compute, sampling);
                sampling_phases(&dims, dtypes.compute, self.kernel(), sampling, kv)
            }
        }
    }
}

/// A token id per position, fixed and spread over the vocabulary.
fn sequence(row: u64, width: u64, vocab: i64) -> Vec<i64> {
    (0..width)
        .map(|t| ((row * 7919 + t * 104_729) % vocab as u64) as i64)
        .collect()
}

extern "C" {
    #[link_name = "_ZN2at13globalContextEv"]
    fn at_global_context() -> *mut std::ffi::c_void;
    #[link_name = "_ZN2at7Context14setSDPUseFlashEb"]
    fn at_context_set_sdp_use_flash(context: *mut std::ffi::c_void, enabled: bool);
}

/// A value of `/proc/self/status` in bytes.
fn status_bytes(key: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {key} in /proc/self/status"));
    let kb: u64 = line.trim().trim_end_matches("kB").trim().parse().unwrap();
    kb * 1024
}

/// Runs `case` twice in this process and returns the second run's peak allocation.
fn measure_here(case: &Case) -> u64 {
    tch::set_num_threads(1);
    tch::manual_seed(0);
    if case.math {
        // SAFETY: at::globalContext() returns the process-wide context; setSDPUseFlash is a
        // plain setter of it (this, bool), as ATen/Context.h declares.
        unsafe { at_context_set_sdp_use_flash(at_global_context(), false) };
    }
    let config = case.config();
    let mut vs = nn::VarStore::new(Device::Cpu);
    // New variables take the store's kind: the weights are created in it directly. Their
    // values change no tensor's size, and zeros are the quickest to make.
    vs.set_kind(case.kind());
    let model = Qwen2::new(&vs.root(), &config, Init::Zeros, case.kind());
    let vocab = config.vocab_size;
    let run = || -> Tensor {
        match case.op {
            Op::Training { recompute, sink } => {
                let rows: Vec<Vec<i64>> = (0..case.rows)
                    .map(|r| sequence(r, case.width, vocab))
                    .collect();
                let batch = PaddedBatch::new(&rows, vocab, 0, Device::Cpu).unwrap();
                let loss = |logprobs: &Tensor| logprobs.sum(Kind::Float);
                let chunk = case.chunk as i64;
                if sink {
                    let mut drop_them = |_: &[Tensor], _: Vec<Tensor>| {};
                    model
                        .token_logprobs_backward_to(&batch, chunk, &mut drop_them, loss)
                        .loss
                } else {
                    model
                        .token_logprobs_backward(&batch, chunk, recompute, loss)
                        .loss
                }
            }
            Op::Frozen => {
                let rows: Vec<Vec<i64>> = (0..case.rows)
                    .map(|r| sequence(r, case.width, vocab))
                    .collect();
                let batch = PaddedBatch::new(&rows, vocab, 0, Device::Cpu).unwrap();
                let _guard = tch::no_grad_guard();
                token_logprobs(&model, &batch, case.chunk as i64)
            }
            Op::Generate { samples, max_new } => {
                let prompts: Vec<Vec<i64>> = (0..case.rows)
                    .flat_map(|r| (0..samples).map(move |_| r))
                    .map(|r| sequence(r, case.width, vocab))
                    .collect();
                let params = SamplingParams {
                    max_new_tokens: max_new as usize,
                    seed: Some(7),
                    ..SamplingParams::default()
                };
                let out = generate_batched(&model, &prompts, &params, prompts.len()).unwrap();
                // No stop ids: every row generates max_new tokens, the cache's full width.
                assert!(out.iter().all(|g| g.token_ids.len() as u64 == max_new));
                Tensor::new()
            }
        }
    };
    drop(run());
    std::fs::write("/proc/self/clear_refs", "5").expect("resetting the peak resident set");
    let before = status_bytes("VmRSS");
    drop(run());
    status_bytes("VmHWM") - before
}

#[test]
#[ignore = "the measuring child process that `measure` starts"]
fn measure_child() {
    let case: Case = serde_json::from_str(&std::env::var(CASE_ENV).unwrap()).unwrap();
    println!("MEASURED {}", measure_here(&case));
}

/// One measuring child at a time: some hold several GB.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Measures `case` in a fresh child process.
fn measure(case: &Case) -> u64 {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "measure_child", "--ignored", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(CASE_ENV, serde_json::to_string(case).unwrap())
        .env("MALLOC_MMAP_THRESHOLD_", "65536")
        .env("MALLOC_TRIM_THRESHOLD_", "0")
        .env("MALLOC_ARENA_MAX", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| {
            l.split_once("MEASURED ")
                .map(|(_, n)| n.trim().parse().unwrap())
        })
        .unwrap_or_else(|| {
            panic!(
                "{}: no measurement\n{stdout}\n{}",
                case.name,
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// Measures `case` and checks that the plan's largest phase is within 15% of it.
fn check(case: Case) {
    let phases = case.phases();
    let planned = peak(&phases).expect("phases");
    let measured = measure(&case);
    let ratio = planned.bytes() as f64 / measured as f64;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "| {} | {:.1} MiB | {:.1} MiB | {:+.1}% | {} |",
        case.name,
        mib(measured),
        mib(planned.bytes()),
        (ratio - 1.0) * 100.0,
        planned.name
    );
    assert!(
        (ratio - 1.0).abs() <= 0.15,
        "{}: planned {} bytes ({}), measured {measured}: {:+.1}%\n{phases:#?}",
        case.name,
        planned.bytes(),
        planned.name,
        (ratio - 1.0) * 100.0
    );
}

/// The paper's 7B shape with `layers` layers.
fn qwen7b(layers: u64) -> serde_json::Value {
    serde_json::json!({
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": layers,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": false,
    })
}

/// The 7B's 28 query / 4 key-value heads on a hidden width of 224 (head width 8), a short
/// MLP and vocabulary: the `T^2` terms dominate at a few hundred tokens.
fn narrow_heads() -> serde_json::Value {
    serde_json::json!({
        "vocab_size": 4096,
        "hidden_size": 224,
        "intermediate_size": 512,
        "num_hidden_layers": 1,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": false,
    })
}

/// The 7B's head width (128) and 7:1 grouped-query attention, at hidden 896 (7 / 1 heads).
fn sampler(layers: u64, vocab: u64) -> serde_json::Value {
    serde_json::json!({
        "vocab_size": vocab,
        "hidden_size": 896,
        "intermediate_size": 1024,
        "num_hidden_layers": layers,
        "num_attention_heads": 7,
        "num_key_value_heads": 1,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": false,
    })
}

fn case(name: &str, config: serde_json::Value, math: bool, op: Op, rows: u64, width: u64) -> Case {
    Case {
        name: name.into(),
        config,
        bf16: true,
        math,
        op,
        rows,
        width,
        chunk: 64,
    }
}

const SINK: Op = Op::Training {
    recompute: true,
    sink: true,
};
const RECOMPUTE: Op = Op::Training {
    recompute: true,
    sink: false,
};
const PLAIN: Op = Op::Training {
    recompute: false,
    sink: false,
};

#[test]
fn training_at_the_7b_shape_one_layer() {
    // The LM head's gradient summed over chunks next to a fresh one: 2 ep V D = 2.03 GiB.
    check(Case {
        chunk: 16,
        ..case(
            "7B shape, 1 layer: recompute + sink (ZeRO-2), 1 x 32",
            qwen7b(1),
            false,
            SINK,
            1,
            32,
        )
    });
}

#[test]
fn a_frozen_forward_at_the_7b_shape_two_layers() {
    check(Case {
        chunk: 48,
        ..case(
            "7B shape, 2 layers: forward without autograd, 2 x 64",
            qwen7b(2),
            false,
            Op::Frozen,
            2,
            64,
        )
    });
}

#[test]
fn training_with_the_math_kernel() {
    check(case(
        "28/4 heads, hidden 224: recompute + sink, math kernel, 1 x 512",
        narrow_heads(),
        true,
        SINK,
        1,
        512,
    ));
    check(case(
        "28/4 heads, hidden 224: recompute, math kernel, 2 x 256",
        narrow_heads(),
        true,
        RECOMPUTE,
        2,
        256,
    ));
}

#[test]
fn training_with_the_flash_kernel() {
    let mut wide_mlp = narrow_heads();
    wide_mlp["intermediate_size"] = 4096.into();
    check(case(
        "28/4 heads, hidden 224, MLP 4096: recompute + sink, flash kernel, 1 x 1024",
        wide_mlp,
        false,
        SINK,
        1,
        1024,
    ));
    let mut vocab = narrow_heads();
    vocab["vocab_size"] = 32768.into();
    check(case(
        "28/4 heads, hidden 224, vocabulary 32768: recompute, flash kernel, 4 x 128",
        vocab,
        false,
        RECOMPUTE,
        4,
        128,
    ));
}

#[test]
fn training_without_recomputation() {
    check(case(
        "28/4 heads, hidden 224: no recompute, math kernel, 2 x 256",
        narrow_heads(),
        true,
        PLAIN,
        2,
        256,
    ));
    let mut vocab = narrow_heads();
    vocab["vocab_size"] = 32768.into();
    check(case(
        "28/4 heads, hidden 224, vocabulary 32768: no recompute, flash kernel, 1 x 256",
        vocab,
        false,
        PLAIN,
        1,
        256,
    ));
}

#[test]
fn frozen_forwards() {
    check(case(
        "28/4 heads, hidden 224: forward, math kernel, 1 x 1024",
        narrow_heads(),
        true,
        Op::Frozen,
        1,
        1024,
    ));
    check(case(
        "28/4 heads, hidden 224: forward, flash kernel, 4 x 512",
        narrow_heads(),
        false,
        Op::Frozen,
        4,
        512,
    ));
}

#[test]
fn sampling() {
    let generate = |samples, max_new| Op::Generate { samples, max_new };
    check(case("head width 128, 7/1 heads, 8 layers: generate 8 prompts x 4 samples, 64 + 32 tokens, flash", sampler(8, 4096), false, generate(4, 32), 8, 64));
    check(case(
        "7/1 heads, 2 layers: generate 16 prompts x 1 sample, 128 + 8 tokens, math",
        sampler(2, 4096),
        true,
        generate(1, 8),
        16,
        128,
    ));
    check(case(
        "7/1 heads, 2 layers, vocabulary 152064: generate 8 prompts x 4 samples, 32 + 8 tokens",
        sampler(2, 152_064),
        false,
        generate(4, 8),
        8,
        32,
    ));
}

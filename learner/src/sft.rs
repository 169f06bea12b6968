//! Supervised warm-up: next-token cross-entropy on response tokens only, AdamW with warm-up
//! and cosine decay, and a stop rule on held-out accuracy rather than on a step count: on the
//! embedded world accuracy jumps steeply (demo-notes), so a fixed count lands anywhere.
use std::io::Write;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use prime_model::{token_logprobs, CausalLm, PaddedBatch, SamplingParams, Tokenizer};
use prime_world::DataRow;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::config::SftConfig;
use crate::data::{to_chat, EvalProblem};
use crate::error::{LearnerError, Result};
use crate::models::trainable_parameters;
use crate::optim::{lr_at, AdamW};
use crate::plot::{line_chart, Series};

/// A tokenized supervised example: the chat prompt (with the generation prompt) and the
/// response it should produce, ending with the end-of-turn token.
#[derive(Debug, Clone)]
pub struct SftExample {
    pub prompt_ids: Vec<i64>,
    pub response_ids: Vec<i64>,
}

/// Tokenizes the supervised rows; each must carry a `response`.
pub fn sft_examples(
    rows: &[DataRow],
    tokenizer: &Tokenizer,
    eos_id: i64,
) -> Result<Vec<SftExample>> {
    rows.iter()
        .enumerate()
        .map(|(i, row)| {
            let response = row
                .response
                .as_deref()
                .ok_or_else(|| LearnerError::Data(format!("supervised row {i} has no response")))?;
            let mut response_ids = tokenizer.encode(response)?;
            response_ids.push(eos_id);
            Ok(SftExample {
                prompt_ids: tokenizer.encode_chat(&to_chat(row), true)?,
                response_ids,
            })
        })
        .collect()
}

/// Mean negative log-likelihood of the response tokens of `batch` (the prompt is context
/// only). Returns the loss tensor, with gradients when grad mode is on.
pub fn response_nll(lm: &CausalLm, batch: &[&SftExample]) -> Result<Tensor> {
    let sequences: Vec<Vec<i64>> = batch
        .iter()
        .map(|e| [e.prompt_ids.as_slice(), &e.response_ids].concat())
        .collect();
    let padded = PaddedBatch::new(&sequences, lm.config.vocab_size, 0, lm.model.device())?;
    let width = padded.input_ids.size()[1] as usize;
    // Entry t-1 of the log-probs predicts token t; train on t in the response.
    let mut mask = vec![0f32; batch.len() * (width - 1)];
    for (row, example) in batch.iter().enumerate() {
        let start = example.prompt_ids.len();
        let end = start + example.response_ids.len();
        mask[row * (width - 1) + start - 1..row * (width - 1) + end - 1].fill(1.0);
    }
    let mask = Tensor::from_slice(&mask)
        .view([batch.len() as i64, width as i64 - 1])
        .to_device(lm.model.device());
    let logprobs = token_logprobs(&lm.model, &padded, 512);
    Ok(-(logprobs * &mask).sum(Kind::Float) / mask.sum(Kind::Float))
}

/// Samples one response per held-out problem at `temperature` and returns the mean score,
/// graded by ability in this process.
pub fn heldout_accuracy(
    lm: &CausalLm,
    tokenizer: &Tokenizer,
    problems: &[EvalProblem],
    temperature: f64,
    max_new_tokens: usize,
    seed: u64,
) -> Result<f64> {
    let params = SamplingParams {
        max_new_tokens,
        temperature,
        top_p: 1.0,
        top_k: 0,
        seed: Some(seed),
        stop_token_ids: lm.eos_token_ids(),
    };
    // The warm-up's held-out problems are graded in this process.
    let grading = &mut crate::eval::Grading::default();
    let kv_budget = prime_model::KvBudget::device_default(lm.model.device());
    Ok(crate::eval::accuracy(lm, tokenizer, problems, 1, &params, kv_budget, grading)?.overall)
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SftRecord {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heldout_accuracy: Option<f64>,
}

/// How a warm-up ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SftStop {
    /// Held-out accuracy entered the band.
    InBand,
    /// Accuracy jumped past the band between two evaluations.
    Overshot,
    /// `max_steps` ran out before the band was reached.
    MaxSteps,
    /// `max_seconds` ran out before the band was reached.
    OutOfTime,
}

/// What a warm-up produced (also written to `result.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SftResult {
    pub steps: u64,
    pub heldout_accuracy: f64,
    pub eval_temperature: f64,
    pub eval_problems: usize,
    pub stop: SftStop,
    pub checkpoint: PathBuf,
    pub seconds: f64,
}

/// Trains `lm` on `examples` until held-out accuracy enters the band, writing
/// `metrics.jsonl`, `loss.png`, `accuracy.png`, `result.json` and the HF checkpoint
/// (`checkpoint/`, with the tokenizer files from `tokenizer_dir`) under `out_dir`.
pub fn run_sft(
    lm: &CausalLm,
    tokenizer: &Tokenizer,
    tokenizer_dir: &Path,
    examples: &[SftExample],
    heldout: &[EvalProblem],
    config: &SftConfig,
    out_dir: &Path,
) -> Result<SftResult> {
    config.validate().map_err(LearnerError::Data)?;
    if examples.is_empty() {
        return Err(LearnerError::Data("no supervised examples".into()));
    }
    std::fs::create_dir_all(out_dir).map_err(LearnerError::io(out_dir))?;
    let metrics_path = out_dir.join("metrics.jsonl");
    let mut metrics =
        std::fs::File::create(&metrics_path).map_err(LearnerError::io(&metrics_path))?;
    let heldout = &heldout[..config.eval_problems.min(heldout.len())];
    let params = trainable_parameters(lm);
    let mut optimizer = AdamW::new(params, config.adamw);
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut order: Vec<usize> = Vec::new();
    let [low, high] = config.accuracy_band;
    let started = std::time::Instant::now();
    let bar = ProgressBar::new(config.max_steps);
    bar.set_style(
        ProgressStyle::with_template("sft {bar:30} step {pos}/{len} {msg} [{elapsed}]")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let (mut losses, mut accuracies) = (Vec::new(), Vec::new());
    let mut last_accuracy = f64::NAN;
    let mut stop = SftStop::MaxSteps;
    let mut step = 0;
    while step < config.max_steps {
        if order.len() < config.batch_size {
            let mut epoch: Vec<usize> = (0..examples.len()).collect();
            epoch.shuffle(&mut rng);
            order.extend(epoch);
        }
        let batch: Vec<&SftExample> = order
            .drain(..config.batch_size)
            .map(|i| &examples[i])
            .collect();
        let lr = lr_at(
            step,
            config.lr,
            config.warmup_steps,
            config.decay_steps,
            config.min_lr_ratio,
        );
        optimizer.zero_grad();
        let loss = response_nll(lm, &batch)?;
        loss.backward();
        let grad_norm = optimizer.clip_grad_norm(config.max_grad_norm);
        optimizer.step(lr);
        step += 1;
        let loss = loss.double_value(&[]);
        losses.push((step as f64, loss));
        let mut record = SftRecord {
            step,
            loss,
            lr,
            grad_norm,
            seconds: started.elapsed().as_secs_f64(),
            heldout_accuracy: None,
        };
        let out_of_time = config
            .max_seconds
            .is_some_and(|limit| started.elapsed().as_secs_f64() >= limit);
        if step % config.eval_every == 0 || step == config.max_steps || out_of_time {
            let accuracy = {
                let _guard = tch::no_grad_guard();
                heldout_accuracy(
                    lm,
                    tokenizer,
                    heldout,
                    config.eval_temperature,
                    config.max_new_tokens,
                    config.seed.wrapping_add(step),
                )?
            };
            accuracies.push((step as f64, accuracy));
            record.heldout_accuracy = Some(accuracy);
            last_accuracy = accuracy;
            tracing::info!(step, loss, accuracy, "held-out evaluation");
            if accuracy >= low {
                stop = if accuracy <= high {
                    SftStop::InBand
                } else {
                    SftStop::Overshot
                };
            }
        }
        writeln!(
            metrics,
            "{}",
            serde_json::to_string(&record).expect("record serialises")
        )
        .map_err(LearnerError::io(&metrics_path))?;
        bar.set_position(step);
        bar.set_message(format!("loss {loss:.3} acc {last_accuracy:.2}"));
        if out_of_time && stop == SftStop::MaxSteps {
            stop = SftStop::OutOfTime;
        }
        if stop != SftStop::MaxSteps {
            break;
        }
    }
    bar.finish_and_clear();
    if stop == SftStop::Overshot {
        tracing::warn!(accuracy = last_accuracy, ?config.accuracy_band, "accuracy jumped past the band between evaluations; evaluate more often to land inside it");
    }
    if stop == SftStop::MaxSteps {
        tracing::warn!(
            accuracy = last_accuracy,
            max_steps = config.max_steps,
            "accuracy never entered the band"
        );
    }
    let checkpoint = out_dir.join("checkpoint");
    lm.save(&checkpoint, None, prime_model::DEFAULT_MAX_SHARD_BYTES)?;
    prime_model::checkpoint::copy_tokenizer_files(tokenizer_dir, &checkpoint)?;
    plot_curves(out_dir, &losses, &accuracies, config.accuracy_band);
    let result = SftResult {
        steps: step,
        heldout_accuracy: last_accuracy,
        eval_temperature: config.eval_temperature,
        eval_problems: heldout.len(),
        stop,
        checkpoint,
        seconds: started.elapsed().as_secs_f64(),
    };
    let result_path = out_dir.join("result.json");
    std::fs::write(
        &result_path,
        serde_json::to_string_pretty(&result).expect("result serialises") + "\n",
    )
    .map_err(LearnerError::io(&result_path))?;
    Ok(result)
}

/// Writes `loss.png` and `accuracy.png`; a plotting failure is logged, not fatal.
fn plot_curves(out_dir: &Path, losses: &[(f64, f64)], accuracies: &[(f64, f64)], band: [f64; 2]) {
    let loss_chart = line_chart(
        &out_dir.join("loss.png"),
        "Supervised warm-up: training loss",
        "step",
        "response NLL",
        &[Series {
            name: "loss",
            points: losses,
        }],
    );
    let last = accuracies.last().map_or(0.0, |p| p.0);
    let band_low = [(0.0, band[0]), (last, band[0])];
    let band_high = [(0.0, band[1]), (last, band[1])];
    let accuracy_chart = line_chart(
        &out_dir.join("accuracy.png"),
        "Supervised warm-up: held-out accuracy",
        "step",
        "accuracy",
        &[
            Series {
                name: "held-out accuracy",
                points: accuracies,
            },
            Series {
                name: "band low",
                points: &band_low,
            },
            Series {
                name: "band high",
                points: &band_high,
            },
        ],
    );
    for result in [loss_chart, accuracy_chart] {
        if let Err(e) = result {
            tracing::warn!("{e}");
        }
    }
}

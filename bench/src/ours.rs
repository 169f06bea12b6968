//! Timing our implementation: the same work the reference script does, in this process.
use std::time::Instant;

use prime_model::{generate, sequence_logprobs, Qwen2, SamplingParams};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{BenchError, Result};

/// What is timed, with its lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "task", rename_all = "snake_case")]
pub enum Task {
    /// Sampling at temperature 1 with no stop tokens: exactly `new_tokens` per row after a
    /// prompt of `prompt_len` random ids. Counts generated tokens.
    Generate {
        prompt_len: usize,
        new_tokens: usize,
    },
    /// One no-grad forward over `seq_len` random ids per row and the next-token log-probs.
    /// Counts scored input tokens.
    Logprobs { seq_len: usize },
}

impl Task {
    pub fn name(&self) -> &'static str {
        match self {
            Task::Generate { .. } => "generate",
            Task::Logprobs { .. } => "logprobs",
        }
    }

    /// Tokens one run processes at this batch size (the numerator of tokens/s).
    pub fn tokens(&self, batch: usize) -> usize {
        match *self {
            Task::Generate { new_tokens, .. } => batch * new_tokens,
            Task::Logprobs { seq_len } => batch * seq_len,
        }
    }

    /// The longest sequence a run needs the model to handle.
    pub fn max_len(&self) -> usize {
        match *self {
            Task::Generate {
                prompt_len,
                new_tokens,
            } => prompt_len + new_tokens,
            Task::Logprobs { seq_len } => seq_len,
        }
    }

    /// The lengths as the reference script's arguments.
    pub fn reference_args(&self) -> Vec<String> {
        match *self {
            Task::Generate {
                prompt_len,
                new_tokens,
            } => vec![
                "--prompt-len".into(),
                prompt_len.to_string(),
                "--new-tokens".into(),
                new_tokens.to_string(),
            ],
            Task::Logprobs { seq_len } => vec!["--seq-len".into(), seq_len.to_string()],
        }
    }

    pub fn validate(&self) -> Result<()> {
        let ok = match *self {
            Task::Generate {
                prompt_len,
                new_tokens,
            } => prompt_len > 0 && new_tokens > 0,
            Task::Logprobs { seq_len } => seq_len >= 2,
        };
        if ok {
            Ok(())
        } else {
            Err(BenchError::Settings(format!(
                "{self:?}: lengths must be positive (seq_len at least 2)"
            )))
        }
    }
}

/// Timings of one implementation at one batch size.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    /// Median wall-clock seconds of one run.
    pub seconds: f64,
    /// Every timed run, warm-up excluded.
    pub seconds_all: Vec<f64>,
    pub tokens_per_s: f64,
}

impl Measurement {
    pub fn new(seconds_all: Vec<f64>, tokens: usize) -> Self {
        let seconds = median(&seconds_all);
        Self {
            seconds,
            seconds_all,
            tokens_per_s: tokens as f64 / seconds,
        }
    }
}

/// Median of a non-empty list (mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

/// Times `task` on our model: one warm-up run, then `repeats` timed runs. Every run ends with
/// its results on the host, so no device synchronisation is missed.
pub fn measure(
    model: &Qwen2,
    task: Task,
    batch: usize,
    repeats: usize,
    seed: u64,
) -> Result<Measurement> {
    let vocab = model.config().vocab_size;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut random_rows = |len: usize| -> Vec<Vec<i64>> {
        (0..batch)
            .map(|_| (0..len).map(|_| rng.gen_range(0..vocab)).collect())
            .collect()
    };
    let mut run: Box<dyn FnMut() -> Result<()>> = match task {
        Task::Generate {
            prompt_len,
            new_tokens,
        } => {
            let prompts = random_rows(prompt_len);
            let params = SamplingParams {
                max_new_tokens: new_tokens,
                temperature: 1.0,
                top_p: 1.0,
                top_k: 0,
                seed: Some(seed),
                stop_token_ids: Vec::new(),
            };
            Box::new(move || {
                let out = generate(model, &prompts, &params)?;
                debug_assert!(out.iter().all(|g| g.token_ids.len() == new_tokens));
                Ok(())
            })
        }
        Task::Logprobs { seq_len } => {
            let sequences = random_rows(seq_len);
            // One forward for the whole batch, as the reference does.
            let budget = batch * seq_len;
            Box::new(move || {
                sequence_logprobs(model, &sequences, budget)?;
                Ok(())
            })
        }
    };
    run()?;
    let mut seconds = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let start = Instant::now();
        run()?;
        seconds.push(start.elapsed().as_secs_f64());
    }
    Ok(Measurement::new(seconds, task.tokens(batch)))
}

//! The run config: one TOML file per run, every field documented, defaults from the paper or,
//! for the embedded demo, from the measured prototype (../shared/demo-notes.md).
use std::path::{Path, PathBuf};

use prime_model::Qwen2Config;
use prime_world::WorldConfig;
use serde::{Deserialize, Serialize};

use crate::error::{LearnerError, Result};
use crate::optim::AdamWConfig;

/// A whole run config file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The embedded default world (generated problems and the project's tokenizer).
    #[serde(default)]
    pub world: WorldConfig,
    /// The policy model to start from.
    #[serde(default)]
    pub model: ModelSource,
    /// Supervised warm-up.
    #[serde(default)]
    pub sft: SftConfig,
}

impl RunConfig {
    /// Reads a TOML config; unknown keys are errors that name the key.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(LearnerError::io(path))?;
        toml::from_str(&text).map_err(|e| LearnerError::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// The resolved config as TOML, saved in the run dir.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }
}

/// Where the policy comes from: an existing Hugging Face model directory, or a tiny Qwen2
/// trained from scratch (the embedded demo) with the world's tokenizer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSource {
    /// A Hugging Face model directory. When set, the architecture fields below are ignored.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Width of the residual stream.
    #[serde(default = "d_hidden")]
    pub hidden_size: i64,
    /// Number of decoder layers.
    #[serde(default = "d_layers")]
    pub num_hidden_layers: i64,
    /// Query heads.
    #[serde(default = "d_heads")]
    pub num_attention_heads: i64,
    /// Key/value heads (grouped-query attention).
    #[serde(default = "d_kv_heads")]
    pub num_key_value_heads: i64,
    /// Width of the SwiGLU MLP.
    #[serde(default = "d_intermediate")]
    pub intermediate_size: i64,
    /// Longest sequence (prompt plus response) the model handles.
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: i64,
    /// RoPE base.
    #[serde(default = "d_theta")]
    pub rope_theta: f64,
    /// Share the embedding matrix with the LM head.
    #[serde(default = "d_tied")]
    pub tie_word_embeddings: bool,
}

fn d_hidden() -> i64 {
    128
}
fn d_layers() -> i64 {
    4
}
fn d_heads() -> i64 {
    4
}
fn d_kv_heads() -> i64 {
    2
}
fn d_intermediate() -> i64 {
    384
}
fn d_max_pos() -> i64 {
    256
}
fn d_theta() -> f64 {
    10000.0
}
fn d_tied() -> bool {
    true
}

impl Default for ModelSource {
    fn default() -> Self {
        Self {
            path: None,
            hidden_size: d_hidden(),
            num_hidden_layers: d_layers(),
            num_attention_heads: d_heads(),
            num_key_value_heads: d_kv_heads(),
            intermediate_size: d_intermediate(),
            max_position_embeddings: d_max_pos(),
            rope_theta: d_theta(),
            tie_word_embeddings: d_tied(),
        }
    }
}

impl ModelSource {
    /// The Qwen2 config of a from-scratch model for a tokenizer of `vocab_size` ids.
    pub fn qwen2_config(
        &self,
        vocab_size: i64,
        eos_token_id: i64,
        pad_token_id: i64,
    ) -> Qwen2Config {
        let json = serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": 1e-6,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "use_sliding_window": false,
            "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id,
        });
        serde_json::from_value(json).expect("valid Qwen2 config")
    }
}

/// Supervised warm-up: next-token cross-entropy on the response tokens of the supervised
/// split, until held-out accuracy enters `accuracy_band`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftConfig {
    /// Sequences per optimizer step.
    #[serde(default = "s_batch")]
    pub batch_size: usize,
    /// Peak learning rate.
    #[serde(default = "s_lr")]
    pub lr: f64,
    /// Linear warm-up steps.
    #[serde(default = "s_warmup")]
    pub warmup_steps: u64,
    /// Cosine decay horizon (steps); the rate stays at `lr * min_lr_ratio` after it.
    #[serde(default = "s_decay")]
    pub decay_steps: u64,
    /// Final learning rate as a fraction of `lr`.
    #[serde(default = "s_min_lr")]
    pub min_lr_ratio: f64,
    /// AdamW moments and weight decay.
    #[serde(default = "s_adamw")]
    pub adamw: AdamWConfig,
    /// Clip the global gradient norm to this (0 disables).
    #[serde(default = "s_clip")]
    pub max_grad_norm: f64,
    /// Give up after this many steps if accuracy never entered the band.
    #[serde(default = "s_max_steps")]
    pub max_steps: u64,
    /// Evaluate held-out accuracy every this many steps.
    #[serde(default = "s_eval_every")]
    pub eval_every: u64,
    /// Held-out problems per evaluation (the first ones of the held-out split).
    #[serde(default = "s_eval_problems")]
    pub eval_problems: usize,
    /// Sampling temperature of the evaluation.
    #[serde(default = "s_eval_temperature")]
    pub eval_temperature: f64,
    /// Response length limit during evaluation.
    #[serde(default = "s_max_new")]
    pub max_new_tokens: usize,
    /// Stop once held-out accuracy lies in `[low, high]`.
    #[serde(default = "s_band")]
    pub accuracy_band: [f64; 2],
    /// Seed of initialisation, data order and evaluation sampling.
    #[serde(default)]
    pub seed: u64,
}

fn s_batch() -> usize {
    64
}
fn s_lr() -> f64 {
    3e-3
}
fn s_warmup() -> u64 {
    50
}
fn s_decay() -> u64 {
    1200
}
fn s_min_lr() -> f64 {
    0.1
}
fn s_adamw() -> AdamWConfig {
    AdamWConfig {
        beta2: 0.95,
        weight_decay: 0.0,
        ..AdamWConfig::default()
    }
}
fn s_clip() -> f64 {
    1.0
}
fn s_max_steps() -> u64 {
    3000
}
fn s_eval_every() -> u64 {
    25
}
fn s_eval_problems() -> usize {
    200
}
fn s_eval_temperature() -> f64 {
    1.0
}
fn s_max_new() -> usize {
    96
}
fn s_band() -> [f64; 2] {
    [0.2, 0.6]
}

impl Default for SftConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

impl SftConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        let [low, high] = self.accuracy_band;
        if !(0.0..=1.0).contains(&low) || !(low..=1.0).contains(&high) {
            return Err(format!(
                "sft.accuracy_band must satisfy 0 <= low <= high <= 1, got {:?}",
                self.accuracy_band
            ));
        }
        if self.batch_size == 0 || self.eval_every == 0 || self.eval_problems == 0 {
            return Err(
                "sft.batch_size, sft.eval_every and sft.eval_problems must be positive".into(),
            );
        }
        if self.lr.is_nan() || self.lr <= 0.0 {
            return Err(format!("sft.lr must be positive, got {}", self.lr));
        }
        Ok(())
    }
}

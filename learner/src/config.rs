//! The run config: one TOML file per run, every field documented, defaults from the paper or,
//! for the embedded demo, from the measured prototype (../shared/demo-notes.md).
use std::path::{Path, PathBuf};

use prime_model::Qwen2Config;
use prime_world::WorldConfig;
use serde::{Deserialize, Serialize};

use crate::algo::{AdvantageConfig, AlgoConfig, Estimator, FilterConfig, PpoConfig, PrmConfig};
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
    /// PRIME: the algorithm, the batch, evaluation and checkpoints.
    #[serde(default)]
    pub learner: LearnerConfig,
}

impl RunConfig {
    /// Reads a TOML config; unknown keys are errors that name the key.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_file_with_overrides(path, &[])
    }

    /// Reads a TOML config, then applies `key.path=value` overrides (the CLI's `--set`):
    /// `value` is read as a TOML value (`0.05`, `true`, `"rloo"`, `[0.2, 0.8]`) and as a
    /// string when it is not one (`learner.estimator=rloo`).
    pub fn from_file_with_overrides(path: &Path, overrides: &[String]) -> Result<Self> {
        let config_error = |message: String| LearnerError::Config {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(LearnerError::io(path))?;
        let mut table: toml::Table =
            toml::from_str(&text).map_err(|e| config_error(e.to_string()))?;
        for assignment in overrides {
            apply_override(&mut table, assignment).map_err(config_error)?;
        }
        table
            .try_into()
            .map_err(|e: toml::de::Error| config_error(e.to_string()))
    }

    /// The resolved config as TOML, saved in the run dir.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }
}

/// Sets `a.b.c = value` in `table`, creating the tables on the way.
fn apply_override(table: &mut toml::Table, assignment: &str) -> std::result::Result<(), String> {
    let (key, raw) = assignment
        .split_once('=')
        .ok_or_else(|| format!("--set {assignment:?}: expected key.path=value"))?;
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.trim().split('.').collect();
    let (last, parents) = parts.split_last().expect("split yields one part");
    let mut current = table;
    for part in parents {
        current = current
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| format!("--set {key}: {part} is not a table"))?;
    }
    current.insert(last.to_string(), value);
    Ok(())
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

/// The PRIME learner: the algorithm (spec §2-6), the batch it collects, the sampling it asks
/// actors for, evaluation and checkpoints. Defaults are the paper's main run (spec §7).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LearnerConfig {
    /// `prime` (process plus outcome rewards, the paper) or `rloo` (outcome only, the
    /// paper's baseline; the PRM is not trained).
    #[serde(default)]
    pub estimator: Estimator,
    /// Implicit PRM: β, token rewards, normalisation.
    #[serde(default)]
    pub prm: PrmConfig,
    /// Leave-one-out baselines and discounts.
    #[serde(default)]
    pub advantage: AdvantageConfig,
    /// The clipped surrogate, entropy and KL terms.
    #[serde(default)]
    pub ppo: PpoConfig,
    /// Online filter on group mean scores.
    #[serde(default)]
    pub filter: FilterConfig,
    /// Rewards from the forward before the PRM's update (the paper) or after it.
    #[serde(default)]
    pub prm_update: PrmUpdate,
    /// The PRM's reference: the frozen start model or the old policy.
    #[serde(default)]
    pub reference: ReferenceType,
    /// The policy's optimizer.
    #[serde(
        default = "default_policy_optimizer",
        deserialize_with = "policy_optimizer_over_defaults"
    )]
    pub policy_optimizer: OptimizerConfig,
    /// The PRM's optimizer.
    #[serde(
        default = "default_prm_optimizer",
        deserialize_with = "prm_optimizer_over_defaults"
    )]
    pub prm_optimizer: OptimizerConfig,
    /// Optimizer steps per iteration for the PRM and for the policy: the batch's groups are
    /// split into this many mini-batches, whole and in order (the paper: 4).
    #[serde(default = "l_mini_batches")]
    pub mini_batches: usize,
    /// Token budget of a micro-batch (rows × padded width); gradients accumulate over the
    /// micro-batches of a mini-batch, so it bounds memory without changing the result.
    #[serde(default = "l_micro_batch_tokens")]
    pub micro_batch_tokens: usize,
    /// Positions per chunk of the vocabulary log-softmax.
    #[serde(default = "l_logit_chunk")]
    pub logit_chunk_tokens: i64,
    /// Recompute each decoder layer's activations during the backward pass instead of
    /// keeping them (same gradients, far less memory, about a third more compute).
    #[serde(default)]
    pub recompute_activations: bool,
    /// Keep f32 master copies of bf16/f16 weights in the optimizers (needed for PRIME's tiny
    /// learning rates with bf16 weights; see docs/memory.md).
    #[serde(default)]
    pub master_weights: bool,
    /// Storage dtype of the policy's and the PRM's weights: `f32` (default; computed in bf16
    /// on CUDA) or `bf16` (half the memory; pair it with `master_weights`).
    #[serde(default)]
    pub param_dtype: ParamDtype,
    /// Prompts (groups) per iteration after filtering, B.
    #[serde(default = "l_batch_prompts")]
    pub batch_prompts: usize,
    /// Responses sampled per prompt, K.
    #[serde(default = "l_k")]
    pub samples_per_prompt: u32,
    /// RL iterations to run.
    #[serde(default = "l_steps")]
    pub steps: u64,
    /// Prompts sampled per rollout round as a multiple of `batch_prompts` (`oversample` in
    /// the authors' config): above 1 fills a filtered batch in fewer rounds; kept groups
    /// beyond B go back to the queue.
    #[serde(default = "l_one")]
    pub oversample: f64,
    /// Prompts longer than this (tokens, chat template applied) are dropped at load.
    #[serde(default = "l_max_prompt")]
    pub max_prompt_tokens: usize,
    /// Longest response sampled.
    #[serde(default = "l_max_response")]
    pub max_response_tokens: usize,
    /// Sampling temperature of rollouts.
    #[serde(default = "l_one")]
    pub temperature: f64,
    /// Nucleus sampling mass (1 = off).
    #[serde(default = "l_one")]
    pub top_p: f64,
    /// Top-k sampling (0 = off).
    #[serde(default)]
    pub top_k: i64,
    /// Versions a group may lag behind the policy (0: synchronous on-policy).
    #[serde(default)]
    pub max_staleness: u64,
    /// Seconds an actor has to return a work item before it is handed out again.
    #[serde(default = "l_lease")]
    pub lease_seconds: u64,
    /// Evaluate on the held-out set every this many steps (and at the start and end).
    #[serde(default = "l_eval_every")]
    pub eval_every: u64,
    /// Held-out problems per evaluation (0: all).
    #[serde(default)]
    pub eval_problems: usize,
    /// Samples per held-out problem at `eval_temperature`; accuracy is their mean.
    #[serde(default = "l_eval_samples")]
    pub eval_samples: usize,
    /// Temperature of the sampled evaluation.
    #[serde(default = "l_one")]
    pub eval_temperature: f64,
    /// Also report greedy accuracy (the paper's protocol).
    #[serde(default = "l_true")]
    pub eval_greedy: bool,
    /// Checkpoint every this many steps (0: only at the end).
    #[serde(default = "l_eval_every")]
    pub checkpoint_every: u64,
    /// Checkpoints kept (older ones are deleted).
    #[serde(default = "l_keep")]
    pub keep_checkpoints: usize,
    /// Seed of data order, rollout sampling seeds and evaluation.
    #[serde(default)]
    pub seed: u64,
    /// Training prompts (Eurus-2-RL-Data schema, parquet or jsonl); empty: the embedded
    /// world's RL split.
    #[serde(default)]
    pub train_files: Vec<PathBuf>,
    /// Held-out prompts; empty: the embedded world's held-out split.
    #[serde(default)]
    pub heldout_files: Vec<PathBuf>,
    /// The PRM's and the reference's start model; unset: the policy's start model (the
    /// paper: all three are the SFT model).
    #[serde(default)]
    pub prm_path: Option<PathBuf>,
    /// Data parallelism across learner ranks: optimizer sharding, buckets, backend and
    /// timeouts (the ranks themselves come from the environment).
    #[serde(default)]
    pub parallel: crate::parallel::ParallelConfig,
    /// Pushing each new version to the actors in one broadcast (TCP ring or NCCL) instead
    /// of a gRPC transfer per actor; off by default.
    #[serde(default)]
    pub weight_broadcast: crate::broadcast::WeightBroadcastConfig,
}

fn l_mini_batches() -> usize {
    4
}
fn l_micro_batch_tokens() -> usize {
    16384
}
fn l_logit_chunk() -> i64 {
    1024
}
fn l_batch_prompts() -> usize {
    256
}
fn l_k() -> u32 {
    4
}
fn l_steps() -> u64 {
    592
}
fn l_max_prompt() -> usize {
    1024
}
fn l_max_response() -> usize {
    3072
}
fn l_one() -> f64 {
    1.0
}
fn l_true() -> bool {
    true
}
fn l_lease() -> u64 {
    600
}
fn l_eval_every() -> u64 {
    16
}
fn l_eval_samples() -> usize {
    1
}
fn l_keep() -> usize {
    2
}

impl Default for LearnerConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

impl LearnerConfig {
    /// The algorithm core's view: the sub-tables with the estimator filled in.
    pub fn algo(&self) -> AlgoConfig {
        AlgoConfig {
            prm: self.prm.clone(),
            advantage: self.advantage_config(),
            ppo: self.ppo.clone(),
            filter: self.filter.clone(),
        }
    }

    /// The advantage settings with the estimator filled in.
    pub fn advantage_config(&self) -> AdvantageConfig {
        AdvantageConfig {
            estimator: self.estimator,
            ..self.advantage.clone()
        }
    }

    /// Checks values serde cannot: positive sizes, a K the baselines can use, a sane filter.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.samples_per_prompt < 2 {
            return Err(format!(
                "learner.samples_per_prompt must be at least 2 for the leave-one-out baselines, got {}",
                self.samples_per_prompt
            ));
        }
        if self.batch_prompts == 0 || self.mini_batches == 0 || self.micro_batch_tokens == 0 {
            return Err(
                "learner.batch_prompts, learner.mini_batches and learner.micro_batch_tokens must be positive"
                    .into(),
            );
        }
        if self.mini_batches > self.batch_prompts {
            return Err(format!(
                "learner.mini_batches ({}) cannot exceed learner.batch_prompts ({}): mini-batches hold whole groups",
                self.mini_batches, self.batch_prompts
            ));
        }
        let f = &self.filter;
        if !(0.0..=1.0).contains(&f.lower) || !(f.lower..=1.0).contains(&f.upper) {
            return Err(format!(
                "learner.filter needs 0 <= lower <= upper <= 1, got [{}, {}]",
                f.lower, f.upper
            ));
        }
        for (name, opt) in [
            ("policy_optimizer", &self.policy_optimizer),
            ("prm_optimizer", &self.prm_optimizer),
        ] {
            if opt.lr.is_nan() || opt.lr < 0.0 {
                return Err(format!("learner.{name}.lr must be >= 0, got {}", opt.lr));
            }
        }
        if self.oversample.is_nan() || self.oversample < 1.0 {
            return Err(format!(
                "learner.oversample must be >= 1, got {}",
                self.oversample
            ));
        }
        if self.temperature <= 0.0 || self.eval_temperature < 0.0 {
            return Err("learner.temperature must be positive and eval_temperature >= 0".into());
        }
        if self.max_response_tokens == 0 || self.max_prompt_tokens == 0 {
            return Err(
                "learner.max_prompt_tokens and max_response_tokens must be positive".into(),
            );
        }
        self.weight_broadcast.validate()?;
        if self.parallel.zero2 && !self.recompute_activations {
            return Err(
                "learner.parallel.zero2 = true needs learner.recompute_activations = true: \
                 gradients are handed over layer by layer from the recomputing backward pass"
                    .into(),
            );
        }
        Ok(())
    }
}

/// An optimizer with its schedule and clipping. In a config file every key is optional and
/// falls back to that optimizer's default (the policy's and the PRM's differ).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up over this many RL iterations (0: constant, the main run).
    #[serde(default)]
    pub warmup_steps: u64,
    /// Largest global gradient norm; larger gradients are scaled down (0 disables).
    pub max_grad_norm: f64,
    /// AdamW moments and weight decay.
    pub adamw: AdamWConfig,
}

impl OptimizerConfig {
    /// The policy's optimizer in the main run (spec §6): lr 5e-7 constant, weight decay 0.01,
    /// clip 1.0.
    pub fn policy_default() -> Self {
        Self {
            lr: 5e-7,
            warmup_steps: 0,
            max_grad_norm: 1.0,
            adamw: AdamWConfig {
                weight_decay: 0.01,
                ..AdamWConfig::default()
            },
        }
    }

    /// The PRM's optimizer in the main run (spec §3.2): lr 1e-6 constant, no weight decay,
    /// clip 10.
    pub fn prm_default() -> Self {
        Self {
            lr: 1e-6,
            warmup_steps: 0,
            max_grad_norm: 10.0,
            adamw: AdamWConfig {
                weight_decay: 0.0,
                ..AdamWConfig::default()
            },
        }
    }

    /// Learning rate at RL iteration `iteration` (0-based): linear warm-up, then constant.
    pub fn lr_at(&self, iteration: u64) -> f64 {
        if iteration < self.warmup_steps {
            self.lr * (iteration + 1) as f64 / self.warmup_steps as f64
        } else {
            self.lr
        }
    }
}

/// The keys of an optimizer table; each one given replaces the default of its optimizer.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct OptimizerTable {
    lr: Option<f64>,
    warmup_steps: Option<u64>,
    max_grad_norm: Option<f64>,
    adamw: Option<AdamWTable>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdamWTable {
    beta1: Option<f64>,
    beta2: Option<f64>,
    eps: Option<f64>,
    weight_decay: Option<f64>,
}

impl OptimizerTable {
    fn over(self, mut base: OptimizerConfig) -> OptimizerConfig {
        base.lr = self.lr.unwrap_or(base.lr);
        base.warmup_steps = self.warmup_steps.unwrap_or(base.warmup_steps);
        base.max_grad_norm = self.max_grad_norm.unwrap_or(base.max_grad_norm);
        if let Some(a) = self.adamw {
            let b = &mut base.adamw;
            b.beta1 = a.beta1.unwrap_or(b.beta1);
            b.beta2 = a.beta2.unwrap_or(b.beta2);
            b.eps = a.eps.unwrap_or(b.eps);
            b.weight_decay = a.weight_decay.unwrap_or(b.weight_decay);
        }
        base
    }
}

fn policy_optimizer_over_defaults<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<OptimizerConfig, D::Error> {
    Ok(OptimizerTable::deserialize(d)?.over(OptimizerConfig::policy_default()))
}

fn prm_optimizer_over_defaults<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<OptimizerConfig, D::Error> {
    Ok(OptimizerTable::deserialize(d)?.over(OptimizerConfig::prm_default()))
}

fn default_policy_optimizer() -> OptimizerConfig {
    OptimizerConfig::policy_default()
}
fn default_prm_optimizer() -> OptimizerConfig {
    OptimizerConfig::prm_default()
}

/// How trainable weights are stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamDtype {
    /// 32-bit floats.
    #[default]
    F32,
    /// bfloat16.
    Bf16,
}

impl ParamDtype {
    /// The tch kind.
    pub fn kind(self) -> tch::Kind {
        match self {
            Self::F32 => tch::Kind::Float,
            Self::Bf16 => tch::Kind::BFloat16,
        }
    }
}

/// When the PRM's rewards are taken relative to its update (spec §3.3).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrmUpdate {
    /// Single-forward ([REPO] `after`, the paper): each mini-batch's rewards come from the
    /// forward that computes its loss, before its own update.
    #[default]
    ScoreThenUpdate,
    /// Double-forward ([RECIPE] `before`): update on every mini-batch, then score the whole
    /// batch with the updated PRM.
    UpdateThenScore,
}

/// The reference of the implicit PRM (spec §2.3).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReferenceType {
    /// A frozen copy of the SFT model (the paper's default).
    #[default]
    Freeze,
    /// The policy that sampled the batch: its old log-probs.
    Policy,
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
    /// Also stop after this many seconds (evaluating once more): continued supervised
    /// training on the same time budget as an RL run, the baseline of docs/results.md.
    #[serde(default)]
    pub max_seconds: Option<f64>,
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

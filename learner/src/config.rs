//! The run config: one TOML file per run, every field documented, defaults from the paper or,
//! for the embedded demo, from the measured prototype (../shared/demo-notes.md).
use std::path::{Path, PathBuf};

use prime_algo::AlgoConfig;
use prime_model::Qwen2Config;
use prime_world::WorldConfig;
use serde::{Deserialize, Serialize};
use tch::Device;

use prime_check::number::{at_least, within};
use prime_check::{rules, Range};

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
    /// Which verifier grades the actors' rollouts.
    #[serde(default)]
    pub verifier: VerifierRoutes,
}

/// `[verifier]`: verifiers by `data_source` for the actors' rollouts (`prime actor run
/// --verifier-route`, which `prime train` passes from here), e.g. `routes = { my_task =
/// "http://127.0.0.1:50060" }`: items of `my_task` rows go to that server of the
/// `prime.v1.Verifier` service (a custom reward, docs/verifier.md), the rest to the default
/// verifier. Held-out evaluation still grades with the built-in graders.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifierRoutes {
    /// `data_source` to gRPC URL.
    #[serde(default)]
    pub routes: std::collections::BTreeMap<String, String>,
}

impl VerifierRoutes {
    /// Every route names a data source and an http(s) URL.
    pub fn validate(&self) -> std::result::Result<(), String> {
        for (source, url) in &self.routes {
            if source.trim().is_empty() {
                return Err("verifier.routes: an empty data_source".into());
            }
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!(
                    "verifier.routes.{source}: {url:?} is not an http:// or https:// URL"
                ));
            }
        }
        Ok(())
    }
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
        // Editors on some systems start a UTF-8 file with a byte-order mark.
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| config_error(e.to_string()))?;
        for assignment in overrides {
            apply_override(&mut table, assignment).map_err(config_error)?;
        }
        refuse_moved_keys(&table).map_err(config_error)?;
        let config: Self = table
            .try_into()
            .map_err(|e: toml::de::Error| config_error(e.to_string()))?;
        config.validate().map_err(config_error)?;
        Ok(config)
    }

    /// Every table checked, as the loader does before anything else happens: the world, the
    /// start model, the warm-up, the learner, and the prompt plus response budget against the
    /// model's positions.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.world.validate().map_err(|e| format!("world: {e}"))?;
        self.model.validate()?;
        self.sft.validate()?;
        self.learner.validate()?;
        self.verifier.validate()?;
        self.check_lengths()
    }

    /// The start model's `max_position_embeddings` and where it was read: `model.path`'s
    /// config.json when that file exists, else the from-scratch `[model]` shape. `None` when
    /// `model.path` names a model that is not there (yet) or cannot be read: opening the run
    /// then stops with that model's own error.
    fn model_positions(&self) -> Option<(i64, String)> {
        match &self.model.path {
            Some(dir) => {
                let file = dir.join("config.json");
                let config = Qwen2Config::from_file(&file).ok()?;
                Some((config.max_position_embeddings, file.display().to_string()))
            }
            None => Some((
                self.model.max_position_embeddings,
                "model.max_position_embeddings".into(),
            )),
        }
    }

    /// Refuses a prompt budget plus a response budget the model cannot hold, so that no kept
    /// prompt can run out of positions mid-run.
    pub fn check_lengths(&self) -> std::result::Result<(), String> {
        let Some((positions, source)) = self.model_positions() else {
            return Ok(());
        };
        let prompt = self.learner.data.max_prompt_tokens;
        let response = self.learner.rollout.max_response_tokens;
        let total = prompt.saturating_add(response);
        if i64::try_from(total).map_or(true, |t| t > positions) {
            return Err(format!(
                "learner.data.max_prompt_tokens ({prompt}) + learner.rollout.max_response_tokens \
                 ({response}) = {total} exceeds the model's max_position_embeddings ({positions}, \
                 from {source}): lower one of the two keys so that they add up to at most \
                 {positions}"
            ));
        }
        Ok(())
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
    /// Embedding (and LM head) rows; unset: the tokenizer's size. A larger value pads the
    /// vocabulary past the tokenizer the way released checkpoints do (Qwen2.5-Math-7B has
    /// 152,064 rows for a tokenizer of 151,665 ids); a smaller one is refused.
    #[serde(default)]
    pub vocab_size: Option<i64>,
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
    // The paper's Qwen2.5-Math-7B, and what the default learner lengths need (1,024 + 3,072).
    4096
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
            vocab_size: None,
        }
    }
}

impl ModelSource {
    /// Embedding rows of a from-scratch model for a tokenizer of `tokenizer_size` ids:
    /// `vocab_size` when set (at least the tokenizer's size), else the tokenizer's size.
    pub fn embedding_rows(&self, tokenizer_size: i64) -> Result<i64, String> {
        match self.vocab_size {
            None => Ok(tokenizer_size),
            Some(rows) if rows >= tokenizer_size => Ok(rows),
            Some(rows) => Err(format!(
                "model.vocab_size = {rows} is smaller than the tokenizer's {tokenizer_size} ids: \
                 every token id needs an embedding row (leave it unset, or pad past the tokenizer)"
            )),
        }
    }

    /// The Qwen2 config of a from-scratch model for a tokenizer of `tokenizer_size` ids, with
    /// [`embedding_rows`](Self::embedding_rows) rows (the tokenizer's size when `vocab_size`
    /// is too small; check it first with `embedding_rows` to refuse that).
    pub fn qwen2_config(
        &self,
        tokenizer_size: i64,
        eos_token_id: i64,
        pad_token_id: i64,
    ) -> Qwen2Config {
        let vocab_size = self
            .embedding_rows(tokenizer_size)
            .unwrap_or(tokenizer_size);
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

/// `[learner]`: PRIME, composed of one sub-config per TOML table. Defaults are the paper's main
/// run (spec §7).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LearnerConfig {
    /// RL iterations to run.
    #[serde(default = "l_steps")]
    pub steps: u64,
    /// Seed of data order, rollout sampling seeds and evaluation.
    #[serde(default)]
    pub seed: u64,
    /// The PRM's and the reference's start model; unset: the policy's start model (the
    /// paper: all three are the SFT model).
    #[serde(default)]
    pub prm_path: Option<PathBuf>,
    /// `[learner.algo]`: the estimator, mini-batches, PRM rewards, advantages, PPO, filter.
    #[serde(default)]
    pub algo: AlgoConfig,
    /// `[learner.rollout]`: the batch collected per iteration and the sampling actors use.
    #[serde(default)]
    pub rollout: RolloutConfig,
    /// `[learner.data]`: training and held-out prompts.
    #[serde(default)]
    pub data: DataConfig,
    /// `[learner.eval]`: held-out evaluation.
    #[serde(default)]
    pub eval: EvalConfig,
    /// `[learner.checkpoint]`: how often and how many.
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// `[learner.memory]`: micro-batching, recomputation and weight storage.
    #[serde(default)]
    pub memory: MemoryConfig,
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
    /// Data parallelism across learner ranks: optimizer sharding, buckets, backend and
    /// timeouts (the ranks themselves come from the environment).
    #[serde(default)]
    pub parallel: ParallelConfig,
    /// Pushing each new version to the actors in one broadcast (TCP ring or NCCL) instead
    /// of a gRPC transfer per actor; off by default.
    #[serde(default)]
    pub weight_broadcast: WeightBroadcastConfig,
}

fn l_steps() -> u64 {
    592
}
fn l_one() -> f64 {
    1.0
}

/// `[learner.rollout]`: the batch one iteration trains on and how actors sample it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutConfig {
    /// Prompts (groups) per iteration after filtering, B.
    #[serde(default = "r_batch_prompts")]
    pub batch_prompts: usize,
    /// Responses sampled per prompt, K.
    #[serde(default = "r_k")]
    pub samples_per_prompt: u32,
    /// Prompts sampled per rollout round as a multiple of `batch_prompts` (`oversample` in
    /// the authors' config): above 1 fills a filtered batch in fewer rounds; kept groups
    /// beyond B go back to the queue.
    #[serde(default = "l_one")]
    pub oversample: f64,
    /// Longest response sampled.
    #[serde(default = "r_max_response")]
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
    #[serde(default = "r_lease")]
    pub lease_seconds: u64,
}

fn r_batch_prompts() -> usize {
    256
}
fn r_k() -> u32 {
    4
}
fn r_max_response() -> usize {
    3072
}
fn r_lease() -> u64 {
    600
}

/// `[learner.data]`: where prompts come from and which are kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training prompts (Eurus-2-RL-Data schema, parquet or jsonl); empty: the embedded
    /// world's RL split.
    #[serde(default)]
    pub train_files: Vec<PathBuf>,
    /// Held-out prompts; empty: the embedded world's held-out split.
    #[serde(default)]
    pub heldout_files: Vec<PathBuf>,
    /// Prompts longer than this (tokens, chat template applied) are dropped and counted at
    /// load, training and held-out alike.
    #[serde(default = "d_max_prompt")]
    pub max_prompt_tokens: usize,
    /// What a bad row (unreadable, empty prompt or ground truth, unknown role or ability, a
    /// code ground truth that is not a JSON test spec) does: `skip` counts it and names it in
    /// the data summary, `fail` stops the run naming its file and row.
    #[serde(default)]
    pub on_bad_row: OnBadRow,
}

/// `learner.data.on_bad_row`: what a bad data row does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBadRow {
    /// Skip it; it is counted, and named in the data summary.
    #[default]
    Skip,
    /// Stop, naming its file, row and what is wrong.
    Fail,
}

fn d_max_prompt() -> usize {
    1024
}

/// `[learner.eval]`: held-out evaluation of the policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Evaluate on the held-out set every this many steps (and at the start and end).
    #[serde(default = "e_every")]
    pub every: u64,
    /// Held-out problems per evaluation (0: all); fewer than the split are taken one per
    /// ability in turn, each ability's data sources in turn, the same problems every time.
    #[serde(default)]
    pub problems: usize,
    /// Samples per held-out problem at `temperature`; accuracy is their mean.
    #[serde(default = "e_samples")]
    pub samples: usize,
    /// Temperature of the sampled evaluation.
    #[serde(default = "l_one")]
    pub temperature: f64,
    /// Also report greedy accuracy (the paper's protocol).
    #[serde(default = "e_true")]
    pub greedy: bool,
}

fn e_every() -> u64 {
    16
}
fn e_samples() -> usize {
    1
}
fn e_true() -> bool {
    true
}

/// `[learner.checkpoint]`: when checkpoints are written and how many are kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Checkpoint every this many steps (0: only at the end).
    #[serde(default = "e_every")]
    pub every: u64,
    /// Checkpoints kept (older ones are deleted).
    #[serde(default = "c_keep")]
    pub keep: usize,
}

fn c_keep() -> usize {
    2
}

/// `[learner.memory]`: what bounds the step's memory without changing its result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Token budget of a micro-batch (rows × padded width); gradients accumulate over the
    /// micro-batches of a mini-batch, so it bounds memory without changing the result.
    #[serde(default = "m_micro_batch_tokens")]
    pub micro_batch_tokens: usize,
    /// Positions per chunk of the vocabulary log-softmax.
    #[serde(default = "m_logit_chunk")]
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
    /// Most GiB the KV cache of the learner's own sampling (held-out evaluation, the
    /// rollouts of a single-process run) may take: rows decode as many at once as it holds,
    /// with the same outputs. Unset: unbounded on the CPU; on CUDA half of the device memory
    /// free when each evaluation starts (docs/memory.md, "The sampler's KV cache").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_gib: Option<f64>,
}

fn m_micro_batch_tokens() -> usize {
    16384
}
fn m_logit_chunk() -> i64 {
    1024
}

/// `Default` for config tables whose every key has a serde default: the empty table.
macro_rules! default_is_the_empty_table {
    ($($table:ty),+ $(,)?) => {
        $(impl Default for $table {
            fn default() -> Self {
                toml::from_str("").expect("every key has a default")
            }
        })+
    };
}

default_is_the_empty_table!(
    LearnerConfig,
    RolloutConfig,
    DataConfig,
    EvalConfig,
    CheckpointConfig,
    MemoryConfig,
    ParallelConfig,
    SftConfig
);

/// Keys of `[learner]` that moved into its tables, with their new place.
const MOVED_KEYS: &[(&str, &str)] = &[
    ("estimator", "algo.estimator"),
    ("mini_batches", "algo.mini_batches"),
    ("prm_update", "algo.prm_update"),
    ("reference", "algo.reference"),
    ("prm", "algo.prm"),
    ("advantage", "algo.advantage"),
    ("ppo", "algo.ppo"),
    ("filter", "algo.filter"),
    ("batch_prompts", "rollout.batch_prompts"),
    ("samples_per_prompt", "rollout.samples_per_prompt"),
    ("oversample", "rollout.oversample"),
    ("max_response_tokens", "rollout.max_response_tokens"),
    ("temperature", "rollout.temperature"),
    ("top_p", "rollout.top_p"),
    ("top_k", "rollout.top_k"),
    ("max_staleness", "rollout.max_staleness"),
    ("lease_seconds", "rollout.lease_seconds"),
    ("train_files", "data.train_files"),
    ("heldout_files", "data.heldout_files"),
    ("max_prompt_tokens", "data.max_prompt_tokens"),
    ("eval_every", "eval.every"),
    ("eval_problems", "eval.problems"),
    ("eval_samples", "eval.samples"),
    ("eval_temperature", "eval.temperature"),
    ("eval_greedy", "eval.greedy"),
    ("checkpoint_every", "checkpoint.every"),
    ("keep_checkpoints", "checkpoint.keep"),
    ("micro_batch_tokens", "memory.micro_batch_tokens"),
    ("logit_chunk_tokens", "memory.logit_chunk_tokens"),
    ("recompute_activations", "memory.recompute_activations"),
    ("master_weights", "memory.master_weights"),
    ("param_dtype", "memory.param_dtype"),
];

/// Refuses a `[learner]` key of the flat layout, naming where it lives now.
fn refuse_moved_keys(table: &toml::Table) -> std::result::Result<(), String> {
    let Some(learner) = table.get("learner").and_then(toml::Value::as_table) else {
        return Ok(());
    };
    match MOVED_KEYS
        .iter()
        .find(|(old, _)| learner.contains_key(*old))
    {
        Some((old, new)) => Err(format!(
            "learner.{old} has moved: write it as learner.{new} (docs/configuration.md lists \
             every key)"
        )),
        None => Ok(()),
    }
}

impl LearnerConfig {
    /// Checks values serde cannot, naming the key: every number finite and in its range
    /// (the rules of `prime_check`, shared with the flags of the same meaning), a K the
    /// baselines can use, mini-batches that hold whole groups, a sane filter.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let (rollout, algo) = (&self.rollout, &self.algo);
        if rollout.samples_per_prompt < 2 {
            return Err(format!(
                "learner.rollout.samples_per_prompt must be at least 2 for the leave-one-out baselines, got {}",
                rollout.samples_per_prompt
            ));
        }
        if rollout.batch_prompts == 0
            || algo.mini_batches == 0
            || self.memory.micro_batch_tokens == 0
        {
            return Err(
                "learner.rollout.batch_prompts, learner.algo.mini_batches and learner.memory.micro_batch_tokens must be positive"
                    .into(),
            );
        }
        if algo.mini_batches > rollout.batch_prompts {
            return Err(format!(
                "learner.algo.mini_batches ({}) cannot exceed learner.rollout.batch_prompts ({}): mini-batches hold whole groups",
                algo.mini_batches, rollout.batch_prompts
            ));
        }
        algo.validate("learner.algo")?;
        rollout.validate()?;
        self.data.validate()?;
        self.eval.validate()?;
        self.checkpoint.validate()?;
        self.memory.validate()?;
        self.parallel.validate()?;
        self.policy_optimizer.validate("learner.policy_optimizer")?;
        self.prm_optimizer.validate("learner.prm_optimizer")?;
        self.weight_broadcast.validate()?;
        for (on, key) in [
            (self.parallel.zero2, "learner.parallel.zero2"),
            (self.parallel.zero3, "learner.parallel.zero3"),
        ] {
            if on && !self.memory.recompute_activations {
                return Err(format!(
                    "{key} = true needs learner.memory.recompute_activations = true: \
                     gradients are handed over layer by layer from the recomputing backward pass"
                ));
            }
        }
        Ok(())
    }
}

/// The most seconds a config's time limit may hold: far beyond any run, and safe to add to
/// an `Instant`.
const MAX_SECONDS: u64 = 1_000_000_000;

impl RolloutConfig {
    /// Sampling the actors can do: a temperature above 0 and a top-p in (0, 1] (a value the
    /// sampler refuses would have every actor give up every batch, forever).
    pub fn validate(&self) -> std::result::Result<(), String> {
        at_least("learner.rollout.batch_prompts", self.batch_prompts, 1)?;
        Range::at_least(1.0).check("learner.rollout.oversample", self.oversample)?;
        at_least(
            "learner.rollout.max_response_tokens",
            self.max_response_tokens,
            1,
        )?;
        rules::ROLLOUT_TEMPERATURE.check("learner.rollout.temperature", self.temperature)?;
        rules::TOP_P.check("learner.rollout.top_p", self.top_p)?;
        at_least("learner.rollout.top_k", self.top_k, 0)?;
        within(
            "learner.rollout.lease_seconds",
            self.lease_seconds,
            1,
            MAX_SECONDS,
        )?;
        Ok(())
    }
}

impl DataConfig {
    /// A prompt budget above 0.
    pub fn validate(&self) -> std::result::Result<(), String> {
        at_least("learner.data.max_prompt_tokens", self.max_prompt_tokens, 1)?;
        Ok(())
    }
}

impl EvalConfig {
    /// At least one sample per problem, a temperature of 0 (greedy) or more.
    pub fn validate(&self) -> std::result::Result<(), String> {
        at_least("learner.eval.samples", self.samples, 1)?;
        rules::TEMPERATURE.check("learner.eval.temperature", self.temperature)?;
        Ok(())
    }
}

impl CheckpointConfig {
    /// At least one checkpoint kept (the latest is what a resume starts from).
    pub fn validate(&self) -> std::result::Result<(), String> {
        at_least("learner.checkpoint.keep", self.keep, 1)?;
        Ok(())
    }
}

impl MemoryConfig {
    /// Budgets above 0 (and a finite KV cache budget when one is set).
    pub fn validate(&self) -> std::result::Result<(), String> {
        at_least(
            "learner.memory.micro_batch_tokens",
            self.micro_batch_tokens,
            1,
        )?;
        at_least(
            "learner.memory.logit_chunk_tokens",
            self.logit_chunk_tokens,
            1,
        )?;
        if let Some(gib) = self.kv_cache_gib {
            rules::GIB.check("learner.memory.kv_cache_gib", gib)?;
        }
        Ok(())
    }
}

impl ParallelConfig {
    /// Buckets above 0 MiB and time limits a rank can wait for.
    pub fn validate(&self) -> std::result::Result<(), String> {
        at_least("learner.parallel.bucket_mb", self.bucket_mb, 1)?;
        for (name, value) in [
            (
                "collective_timeout_seconds",
                self.collective_timeout_seconds,
            ),
            ("join_timeout_seconds", self.join_timeout_seconds),
            ("idle_timeout_seconds", self.idle_timeout_seconds),
        ] {
            within(&format!("learner.parallel.{name}"), value, 1, MAX_SECONDS)?;
        }
        Ok(())
    }
}

impl OptimizerConfig {
    /// A finite learning rate of 0 or more (a NaN rate writes an all-NaN model), a finite
    /// clip, AdamW moments in [0, 1) and an ε above 0; keys named under `prefix`.
    pub fn validate(&self, prefix: &str) -> std::result::Result<(), String> {
        rules::LEARNING_RATE.check(&format!("{prefix}.lr"), self.lr)?;
        rules::COEFFICIENT.check(&format!("{prefix}.max_grad_norm"), self.max_grad_norm)?;
        self.adamw.validate(&format!("{prefix}.adamw"))?;
        Ok(())
    }
}

impl ModelSource {
    /// The from-scratch shape (what `prime model init` and a run without `path` build):
    /// sizes above 0 and a finite RoPE base. A model directory's own config.json is checked
    /// when it is read.
    pub fn validate(&self) -> std::result::Result<(), String> {
        for (name, value) in [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            at_least(&format!("model.{name}"), value, 1)?;
        }
        Range::POSITIVE.check("model.rope_theta", self.rope_theta)?;
        if let Some(rows) = self.vocab_size {
            at_least("model.vocab_size", rows, 1)?;
        }
        // The rest of the shape rules (heads dividing the width, ...) are the model's own.
        self.qwen2_config(2, 0, 0)
            .validate()
            .map_err(|e| format!("model: {e}"))
    }
}

/// Which collective implementation the ranks use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// NCCL on CUDA devices (when built with the `nccl` feature), the TCP ring otherwise.
    #[default]
    Auto,
    /// The TCP ring (any device; tensors go through host memory).
    Tcp,
    /// NCCL (CUDA only; needs the `nccl` feature).
    Nccl,
}

impl Backend {
    /// Whether this choice means NCCL for a process on `device`: `nccl` always, `auto` on
    /// CUDA in a build with the `nccl` feature.
    pub fn uses_nccl(self, device: Device) -> bool {
        match self {
            Backend::Auto => cfg!(feature = "nccl") && device.is_cuda(),
            Backend::Tcp => false,
            Backend::Nccl => true,
        }
    }
}

/// `[learner.parallel]`: how data-parallel ranks cooperate. The number of ranks and each
/// one's index come from the environment (`WORLD_SIZE`, `RANK`, ...), not from the config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelConfig {
    /// Shard the optimizer state over the ranks (ZeRO stage 1): AdamW's moments (and master
    /// weights) take 1/W of the memory on each rank; results are the same.
    #[serde(default)]
    pub zero1: bool,
    /// Shard the gradients too (ZeRO stage 2; implies `zero1`): each decoder layer's
    /// gradients are reduce-scattered as soon as the backward pass has them, so no rank holds
    /// a whole model's gradients. Needs `learner.memory.recompute_activations = true`.
    #[serde(default)]
    pub zero2: bool,
    /// Shard the parameters too (ZeRO stage 3; implies `zero2`): each rank keeps 1/W of the
    /// policy's, the PRM's and the reference's weights; a decoder layer's weights (and the
    /// embeddings', the head's) are all-gathered just before the layer runs, forward or
    /// recomputed backward, and freed after. Checkpoints stay whole Hugging Face
    /// directories. Needs `learner.memory.recompute_activations = true`.
    #[serde(default)]
    pub zero3: bool,
    /// Size of a gradient bucket (MiB of f32) all-reduced at once without `zero1`, or
    /// reduce-scattered (and all-gathered back) at once with `zero2` and `zero3`.
    #[serde(default = "p_bucket_mb")]
    pub bucket_mb: usize,
    /// `auto`, `tcp` or `nccl`.
    #[serde(default)]
    pub backend: Backend,
    /// Seconds one collective may take before the rank fails (and the watchdog ends the
    /// process): a dead or stuck rank never hangs the others.
    #[serde(default = "p_collective_timeout")]
    pub collective_timeout_seconds: u64,
    /// Seconds every rank has to join the group.
    #[serde(default = "p_join_timeout")]
    pub join_timeout_seconds: u64,
    /// Seconds the other ranks wait for rank 0's next instruction: rank 0 collects rollouts
    /// and evaluates between steps, which takes far longer than a collective.
    #[serde(default = "p_idle_timeout")]
    pub idle_timeout_seconds: u64,
}

fn p_bucket_mb() -> usize {
    64
}
fn p_collective_timeout() -> u64 {
    600
}
fn p_join_timeout() -> u64 {
    600
}
fn p_idle_timeout() -> u64 {
    86_400
}

/// `[learner.weight_broadcast]`: pushing new weights to the actors in one broadcast.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightBroadcastConfig {
    /// Offer the broadcast to actors (each follows unless started with
    /// `--no-weight-broadcast`); actors outside it fetch over gRPC as before.
    #[serde(default)]
    pub enabled: bool,
    /// `auto` (NCCL when the learner trains on CUDA and is built with the `nccl` feature, the
    /// TCP ring otherwise), `tcp` or `nccl` (every member on a CUDA device).
    #[serde(default)]
    pub backend: Backend,
    /// TCP port the learner listens on while a group forms; 0 picks a free one each time.
    /// Set it where a network policy must name the port.
    #[serde(default)]
    pub port: u16,
    /// Milliseconds a round waits after a publish for the last group's members to ask; the
    /// round then goes on without the missing ones (a new group, a new epoch).
    #[serde(default = "default_join_window_ms")]
    pub join_window_ms: u64,
    /// Seconds the members of a new group have to join it; past it the round fails and its
    /// members fetch over gRPC.
    #[serde(default = "default_join_timeout_seconds")]
    pub join_timeout_seconds: u64,
    /// Seconds one broadcast may take. The bytes pass from member to member, so a stalled
    /// member holds up the ones after it until this runs out; then the round fails, its
    /// members fetch over gRPC and the next group is formed without the stalled one.
    #[serde(default = "default_timeout_seconds")]
    pub timeout_seconds: u64,
}

fn default_join_window_ms() -> u64 {
    2000
}
fn default_join_timeout_seconds() -> u64 {
    30
}
fn default_timeout_seconds() -> u64 {
    120
}

impl Default for WeightBroadcastConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            backend: Backend::Auto,
            port: 0,
            join_window_ms: default_join_window_ms(),
            join_timeout_seconds: default_join_timeout_seconds(),
            timeout_seconds: default_timeout_seconds(),
        }
    }
}

impl WeightBroadcastConfig {
    /// Checks the values that cannot work.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let limit = u64::from(u32::MAX);
        for (name, value) in [
            ("join_timeout_seconds", self.join_timeout_seconds),
            ("timeout_seconds", self.timeout_seconds),
        ] {
            if value == 0 || value > limit {
                return Err(format!(
                    "learner.weight_broadcast.{name} must be in 1..={limit}, got {value}"
                ));
            }
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
        Range::POSITIVE.check("sft.lr", self.lr)?;
        rules::PROBABILITY.check("sft.min_lr_ratio", self.min_lr_ratio)?;
        rules::COEFFICIENT.check("sft.max_grad_norm", self.max_grad_norm)?;
        self.adamw.validate("sft.adamw")?;
        if let Some(seconds) = self.max_seconds {
            rules::SECONDS.check("sft.max_seconds", seconds)?;
        }
        rules::TEMPERATURE.check("sft.eval_temperature", self.eval_temperature)?;
        at_least("sft.max_new_tokens", self.max_new_tokens, 1)?;
        Ok(())
    }
}

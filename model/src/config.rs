//! `config.json` and `generation_config.json` of a Hugging Face Qwen2 model directory.
//!
//! The structs mirror the JSON files: unknown keys are kept in `extra` so that a saved
//! checkpoint writes back everything it read.
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{read_json, ModelError, Result};

/// RoPE parameters as transformers >= 5 writes them (`rope_parameters`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    pub rope_theta: f64,
    #[serde(default = "default_rope_type")]
    pub rope_type: String,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_rope_type() -> String {
    "default".into()
}

/// The architecture fields of a Qwen2 `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Qwen2Config {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    /// Grouped-query attention: key/value heads shared by `num_attention_heads / this` query
    /// heads. Defaults to `num_attention_heads` (plain multi-head attention).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<i64>,
    /// Per-head width; Qwen2 derives it as `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<i64>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: i64,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Older layout: `rope_theta` at the top level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// transformers >= 5 layout: `rope_parameters.rope_theta`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<i64>,
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Every other key of the file, written back unchanged on save.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// A token id or a list of them (`eos_token_id` may be either).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(i64),
    Many(Vec<i64>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<i64> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

fn default_max_pos() -> i64 {
    32768
}
fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "silu".into()
}
fn default_model_type() -> String {
    "qwen2".into()
}

impl Qwen2Config {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let config: Self = read_json(path)?;
        config
            .validate()
            .map_err(|message| ModelError::checkpoint(path, message))?;
        Ok(config)
    }

    /// Checks that the shapes fit together; the message names the offending fields.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_kv_heads()),
            ("head_dim", self.head_dim()),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some((name, value)) = positive.iter().find(|(_, v)| *v <= 0) {
            return Err(format!("{name} must be positive, got {value}"));
        }
        if self.num_attention_heads % self.num_kv_heads() != 0 {
            return Err(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.num_kv_heads()
            ));
        }
        if self.head_dim() % 2 != 0 {
            return Err(format!(
                "head_dim must be even for RoPE, got {}",
                self.head_dim()
            ));
        }
        for (name, value) in [
            ("rope_theta", self.rope_theta()),
            ("rms_norm_eps", self.rms_norm_eps),
        ] {
            prime_check::Range::POSITIVE.check(name, value)?;
        }
        self.refuse_unsupported_positions()?;
        if self.hidden_act != "silu" {
            return Err(format!(
                "hidden_act {:?} is not supported (silu only)",
                self.hidden_act
            ));
        }
        Ok(())
    }

    /// Refuses position schemes this implementation does not compute, naming the key: RoPE
    /// scaling of any type but the default (`rope_scaling`, or transformers 5's
    /// `rope_parameters.rope_type`) and sliding-window attention (`use_sliding_window: true`).
    /// Silently running them as plain RoPE and full attention would give other log-probs.
    fn refuse_unsupported_positions(&self) -> std::result::Result<(), String> {
        if let Some(scaling) = self.extra.get("rope_scaling").filter(|v| !v.is_null()) {
            let kind = scaling
                .get("rope_type")
                .or_else(|| scaling.get("type"))
                .and_then(|t| t.as_str())
                .unwrap_or("(no type)");
            if kind != "default" {
                return Err(format!(
                    "rope_scaling of type {kind:?} is not supported (only plain RoPE is \
                     implemented): remove rope_scaling from config.json, or set it to null, to \
                     run the model at its native max_position_embeddings"
                ));
            }
        }
        if let Some(parameters) = &self.rope_parameters {
            if parameters.rope_type != "default" {
                return Err(format!(
                    "rope_parameters.rope_type {:?} is not supported (only \"default\" RoPE is \
                     implemented)",
                    parameters.rope_type
                ));
            }
        }
        if self.extra.get("use_sliding_window") == Some(&serde_json::Value::Bool(true)) {
            return Err(
                "use_sliding_window: true is not supported (attention is over the whole \
                 sequence): set use_sliding_window to false in config.json"
                    .into(),
            );
        }
        Ok(())
    }

    pub fn num_kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> i64 {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// RoPE base frequency from either layout (10000 when absent, as transformers does).
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .map(|p| p.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10000.0)
    }

    /// Number of parameters of the architecture (tied embeddings counted once).
    pub fn num_parameters(&self) -> i64 {
        let (d, f, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let (h, kv, hd) = (
            self.num_attention_heads,
            self.num_kv_heads(),
            self.head_dim(),
        );
        let attention = d * h * hd + h * hd + 2 * (d * kv * hd + kv * hd) + h * hd * d;
        let layer = attention + 3 * d * f + 2 * d;
        let head = if self.tie_word_embeddings { 0 } else { v * d };
        v * d + self.num_hidden_layers * layer + d + head
    }
}

/// `generation_config.json`: the sampling defaults shipped with a model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GenerationConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i64>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl GenerationConfig {
    /// Token ids that end a response: the union of this file's `eos_token_id` and
    /// `config.json`'s (each an id or a list), this file's first, without repeats. Qwen2.5
    /// instruct models stop at `<|im_end|>` (generation config) and `<|endoftext|>` (config).
    pub fn stop_ids(&self, config: &Qwen2Config) -> Vec<i64> {
        let mut ids: Vec<i64> = Vec::new();
        for id in [&self.eos_token_id, &config.eos_token_id]
            .into_iter()
            .flatten()
            .flat_map(TokenIds::to_vec)
        {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: serde_json::Value) -> Qwen2Config {
        let mut json = serde_json::json!({
            "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2, "eos_token_id": 7
        });
        json.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn position_schemes_we_do_not_compute_are_refused_by_name() {
        let refused = |extra| config(extra).validate().unwrap_err();
        for kind in ["yarn", "linear", "dynamic"] {
            let e = refused(serde_json::json!({"rope_scaling": {"type": kind, "factor": 4.0}}));
            assert!(e.contains("rope_scaling") && e.contains(kind), "{e}");
            let e =
                refused(serde_json::json!({"rope_scaling": {"rope_type": kind, "factor": 2.0}}));
            assert!(e.contains("rope_scaling") && e.contains(kind), "{e}");
            let e = refused(serde_json::json!({
                "rope_parameters": {"rope_theta": 10000.0, "rope_type": kind, "factor": 4.0}
            }));
            assert!(
                e.contains("rope_parameters.rope_type") && e.contains(kind),
                "{e}"
            );
        }
        let e = refused(serde_json::json!({"use_sliding_window": true, "sliding_window": 4096}));
        assert!(e.contains("use_sliding_window"), "{e}");
        // What Qwen2.5 checkpoints ship passes: no scaling, the window off.
        for ok in [
            serde_json::json!({"rope_scaling": null, "use_sliding_window": false, "sliding_window": 4096}),
            serde_json::json!({"rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}}),
            serde_json::json!({"rope_scaling": {"rope_type": "default"}}),
        ] {
            config(ok.clone())
                .validate()
                .unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn stop_ids_are_the_union_of_both_files() {
        let cfg = config(serde_json::json!({}));
        let generation = |ids: serde_json::Value| -> GenerationConfig {
            serde_json::from_value(serde_json::json!({ "eos_token_id": ids })).unwrap()
        };
        assert_eq!(
            generation(serde_json::json!([9, 7])).stop_ids(&cfg),
            vec![9, 7]
        );
        assert_eq!(generation(serde_json::json!(9)).stop_ids(&cfg), vec![9, 7]);
        assert_eq!(GenerationConfig::default().stop_ids(&cfg), vec![7]);
        let many = config(serde_json::json!({"eos_token_id": [7, 8]}));
        assert_eq!(generation(serde_json::json!(8)).stop_ids(&many), vec![8, 7]);
    }
}

//! `WorldConfig`: the `[world]` table of a run config.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::WorldError;

/// Smallest vocabulary that holds the 256 byte symbols and the special tokens, plus one merge.
const MIN_VOCAB_SIZE: usize = 256 + crate::tokenizer::SPECIAL_TOKENS.len() + 1;

/// How to generate the embedded default world. Every field has a default, so an empty
/// `[world]` table (or none at all) gives the demo world.
///
/// The numbers follow the PyTorch prototype in `demo-notes.md`: start values 1..=20, operands
/// 1..=20, factors 2..=5, every intermediate value in 1..=999.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorldConfig {
    /// Seed of every random choice. The same seed and config give byte-identical files.
    pub seed: u64,
    /// `data_source` column of every row; the verifier routes on `ability`, not on this.
    pub data_source: String,
    /// System message put before the user message of every prompt. `None` (the default) writes
    /// prompts with the user message only: the tiny model gains nothing from the paper's long
    /// action-centric prompt, and each prompt token costs training time on a CPU.
    pub system_prompt: Option<String>,
    /// The supervised split: rows carry the full solution trace in `response`.
    pub sft: SplitConfig,
    /// The supervised traces come from a teacher with a systematic error (a `[world.flawed_teacher]`
    /// table turns it on); `None` (the default): every trace is right. The RL and held-out
    /// splits and every row's ground truth stay the true answers either way.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flawed_teacher: Option<FlawedTeacherConfig>,
    /// The RL split: prompts and final answers only.
    pub rl: SplitConfig,
    /// The held-out evaluation split: prompts and final answers only.
    pub heldout: SplitConfig,
    /// Largest start value (the smallest is 1).
    pub max_start: u32,
    /// Largest number added or subtracted in one step (the smallest is 1).
    pub max_addend: u32,
    /// Largest multiplication factor (the smallest is 2).
    pub max_factor: u32,
    /// Largest value any step may produce. Subtractions never go below 1.
    pub max_value: u32,
    /// Largest tokenizer vocabulary, special tokens and the 256 byte symbols included. Training
    /// stops earlier once every word of the world is a single token: the default world
    /// saturates at 499.
    pub vocab_size: usize,
}

/// A teacher that writes the supervised traces with one systematic, local error: a
/// multiplication `a x n` written as `a x (n - 1)` (`13x4=39`), after which it carries on
/// from its own value, so the boxed answer follows its chain ([`crate::problem::teacher_steps`]).
/// Errors are drawn per multiplication from their own stream of the world's seed, so the
/// problems themselves (questions, true answers) are those of the same world without the flaw.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlawedTeacherConfig {
    /// Probability that the teacher writes a multiplication one copy short (in `[0, 1]`;
    /// default 0.5). Only multiplications where the short product keeps the chain's values at
    /// least 1 are eligible, so the realised share of all multiplications is slightly lower
    /// (the manifest records it).
    pub rate: f64,
}

impl Default for FlawedTeacherConfig {
    fn default() -> Self {
        FlawedTeacherConfig { rate: 0.5 }
    }
}

/// Size and difficulty of one split. The difficulty level of a problem is its number of
/// operations, drawn uniformly from `min_ops..=max_ops`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitConfig {
    /// Number of problems (rows).
    pub size: usize,
    /// Fewest operations per problem (default 2).
    #[serde(default = "default_min_ops")]
    pub min_ops: usize,
    /// Most operations per problem (default 5).
    #[serde(default = "default_max_ops")]
    pub max_ops: usize,
}

fn default_min_ops() -> usize {
    2
}

fn default_max_ops() -> usize {
    5
}

impl SplitConfig {
    /// A split of `size` problems with the default 2..=5 operations.
    pub fn with_size(size: usize) -> Self {
        SplitConfig {
            size,
            min_ops: default_min_ops(),
            max_ops: default_max_ops(),
        }
    }
}

impl Default for WorldConfig {
    fn default() -> Self {
        WorldConfig {
            seed: 0,
            data_source: "prime_arith".to_string(),
            system_prompt: None,
            sft: SplitConfig::with_size(20_000),
            flawed_teacher: None,
            rl: SplitConfig::with_size(20_000),
            heldout: SplitConfig::with_size(600),
            max_start: 20,
            max_addend: 20,
            max_factor: 5,
            max_value: 999,
            vocab_size: 512,
        }
    }
}

/// Upper bound on operations per problem: keeps prompts and traces short enough for a tiny
/// model's context (with 6 to 12 operations, prompts of at most about 140 tokens and traces
/// of at most about 135 under the world's tokenizer).
pub const MAX_OPS: usize = 12;

impl WorldConfig {
    /// Parses the `[world]` table of a TOML run config; a document without one gives the
    /// defaults. Unknown keys inside `[world]` are errors, so typos do not go unnoticed.
    pub fn from_toml_str(text: &str) -> Result<Self, WorldError> {
        #[derive(Deserialize)]
        struct Document {
            #[serde(default)]
            world: WorldConfig,
        }
        let document: Document =
            toml::from_str(text).map_err(|e| WorldError::Config(e.to_string()))?;
        document.world.validate()?;
        Ok(document.world)
    }

    /// Reads a TOML run config file and parses its `[world]` table (see [`Self::from_toml_str`]).
    pub fn from_toml_file(path: &Path) -> Result<Self, WorldError> {
        let text = std::fs::read_to_string(path).map_err(|e| WorldError::io(path, e))?;
        Self::from_toml_str(&text)
            .map_err(|e| WorldError::Config(format!("{}: {e}", path.display())))
    }

    /// Checks that the ranges can produce problems and the vocabulary can hold the tokenizer.
    pub fn validate(&self) -> Result<(), WorldError> {
        let bad = |msg: String| Err(WorldError::Config(msg));
        for (name, split) in [
            ("sft", &self.sft),
            ("rl", &self.rl),
            ("heldout", &self.heldout),
        ] {
            if split.min_ops == 0 || split.min_ops > split.max_ops || split.max_ops > MAX_OPS {
                return bad(format!(
                    "{name}: need 1 <= min_ops <= max_ops <= {MAX_OPS}, got {}..={}",
                    split.min_ops, split.max_ops
                ));
            }
        }
        if self.sft.size + self.rl.size == 0 {
            return bad("sft and rl are both empty: nothing to train the tokenizer on".into());
        }
        if self.max_start == 0 || self.max_addend == 0 {
            return bad("max_start and max_addend must be at least 1".into());
        }
        if self.max_factor < 2 {
            return bad(format!(
                "max_factor must be at least 2, got {}",
                self.max_factor
            ));
        }
        if self.max_value < self.max_start.max(2) {
            return bad(format!(
                "max_value ({}) must be at least max_start ({}) and 2",
                self.max_value, self.max_start
            ));
        }
        if self.vocab_size < MIN_VOCAB_SIZE {
            return bad(format!(
                "vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes, special tokens, one merge), got {}",
                self.vocab_size
            ));
        }
        if self.data_source.is_empty() {
            return bad("data_source must not be empty".into());
        }
        if let Some(teacher) = &self.flawed_teacher {
            prime_check::rules::PROBABILITY
                .check("world.flawed_teacher.rate", teacher.rate)
                .map_err(|e| WorldError::Config(e.to_string()))?;
        }
        Ok(())
    }
}

/// The three splits of the world, in the order they are generated (held-out first, so its
/// problems do not change when the training splits are resized).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Held-out evaluation problems.
    Heldout,
    /// RL prompts with final answers.
    Rl,
    /// Supervised warm-up problems with full traces.
    Sft,
}

impl Split {
    /// All splits in generation order.
    pub const ALL: [Split; 3] = [Split::Heldout, Split::Rl, Split::Sft];

    /// The split's name as used in file names and `extra_info.split`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Heldout => "heldout",
            Split::Rl => "rl",
            Split::Sft => "sft",
        }
    }

    /// This split's settings in `cfg`.
    pub fn config(self, cfg: &WorldConfig) -> &SplitConfig {
        match self {
            Split::Heldout => &cfg.heldout,
            Split::Rl => &cfg.rl,
            Split::Sft => &cfg.sft,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_document_gives_defaults() {
        assert_eq!(
            WorldConfig::from_toml_str("").unwrap(),
            WorldConfig::default()
        );
        assert_eq!(
            WorldConfig::from_toml_str("[other]\nx = 1\n").unwrap(),
            WorldConfig::default()
        );
    }

    #[test]
    fn world_table_overrides_fields() {
        let cfg = WorldConfig::from_toml_str(
            "[world]\nseed = 7\nsystem_prompt = \"Be brief.\"\n[world.sft]\nsize = 100\nmax_ops = 3\n",
        )
        .unwrap();
        assert_eq!(cfg.seed, 7);
        assert_eq!(cfg.system_prompt.as_deref(), Some("Be brief."));
        assert_eq!(
            cfg.sft,
            SplitConfig {
                size: 100,
                min_ops: 2,
                max_ops: 3
            }
        );
        assert_eq!(cfg.rl, WorldConfig::default().rl);
    }

    #[test]
    fn unknown_keys_and_bad_ranges_are_rejected() {
        let err = WorldConfig::from_toml_str("[world]\nsede = 7\n").unwrap_err();
        assert!(err.to_string().contains("sede"), "{err}");
        let err = WorldConfig::from_toml_str("[world.rl]\nsize = 5\nmin_ops = 4\nmax_ops = 3\n")
            .unwrap_err();
        assert!(err.to_string().contains("rl: need"), "{err}");
        let err = WorldConfig::from_toml_str("[world]\nvocab_size = 100\n").unwrap_err();
        assert!(err.to_string().contains("vocab_size"), "{err}");
    }
}

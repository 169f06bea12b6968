//! The algorithm's knobs: one documented serde struct per phase, defaults from the paper's
//! main run (spec §7). Where the authors' repo ([REPO]) and the later veRL recipe ([RECIPE])
//! differ, the default is the repo and the recipe is an option.
use serde::{Deserialize, Serialize};

/// `[learner.algo]`: everything the PRIME algorithm reads: the estimator, how one iteration
/// splits its batch and scores it, PRM rewards, advantages, policy loss and the online filter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlgoConfig {
    /// `prime` (process plus outcome rewards, the paper) or `rloo` (outcome only, the
    /// paper's baseline; the PRM is not trained).
    #[serde(default)]
    pub estimator: Estimator,
    /// Optimizer steps per iteration for the PRM and for the policy: the batch's groups are
    /// split into this many mini-batches, whole and in order (the paper: 4).
    #[serde(default = "default_mini_batches")]
    pub mini_batches: usize,
    /// Rewards from the forward before the PRM's update (the paper) or after it.
    #[serde(default)]
    pub prm_update: PrmUpdate,
    /// The PRM's reference: the frozen start model or the old policy.
    #[serde(default)]
    pub reference: ReferenceType,
    /// Implicit PRM: reward scale, token rewards, normalisation (spec §2, §3).
    #[serde(default)]
    pub prm: PrmConfig,
    /// Advantage estimation (spec §4).
    #[serde(default)]
    pub advantage: AdvantageConfig,
    /// Policy loss (spec §6).
    #[serde(default)]
    pub ppo: PpoConfig,
    /// Online prompt filtering (spec §5).
    #[serde(default)]
    pub filter: FilterConfig,
}

fn default_mini_batches() -> usize {
    4
}

impl Default for AlgoConfig {
    fn default() -> Self {
        Self {
            estimator: Estimator::default(),
            mini_batches: default_mini_batches(),
            prm_update: PrmUpdate::default(),
            reference: ReferenceType::default(),
            prm: PrmConfig::default(),
            advantage: AdvantageConfig::default(),
            ppo: PpoConfig::default(),
            filter: FilterConfig::default(),
        }
    }
}

impl AlgoConfig {
    /// Refuses values the formulas cannot use, naming the key under `prefix`
    /// (`learner.algo`): every float finite and in its range (a NaN β or clip ratio would turn
    /// every loss into NaN), at least one mini-batch, a filter band inside [0, 1].
    pub fn validate(&self, prefix: &str) -> Result<(), String> {
        use prime_check::number::at_least;
        use prime_check::{rules, Range};
        let key = |name: &str| format!("{prefix}.{name}");
        at_least(&key("mini_batches"), self.mini_batches, 1)?;
        rules::BETA.check(&key("prm.beta"), self.prm.beta)?;
        rules::DISCOUNT.check(
            &key("advantage.process_gamma"),
            self.advantage.process_gamma,
        )?;
        rules::DISCOUNT.check(
            &key("advantage.outcome_gamma"),
            self.advantage.outcome_gamma,
        )?;
        Range::POSITIVE.check(&key("ppo.clip_ratio"), self.ppo.clip_ratio)?;
        Range::POSITIVE.check(
            &key("ppo.behavior_weight_cap"),
            self.ppo.behavior_weight_cap,
        )?;
        rules::COEFFICIENT.check(&key("ppo.entropy_coeff"), self.ppo.entropy_coeff)?;
        rules::COEFFICIENT.check(&key("ppo.kl_coeff"), self.ppo.kl_coeff)?;
        let f = &self.filter;
        rules::PROBABILITY.check(&key("filter.lower"), f.lower)?;
        rules::PROBABILITY.check(&key("filter.upper"), f.upper)?;
        if f.lower > f.upper {
            return Err(format!(
                "{prefix}.filter needs 0 <= lower <= upper <= 1, got [{}, {}]",
                f.lower, f.upper
            ));
        }
        Ok(())
    }
}

/// When the PRM's rewards are computed relative to its update (spec §3.3).
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

/// The implicit PRM's reward and loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrmConfig {
    /// β of `r_φ(y) = β · log π_φ(y)/π_ref(y)` (paper §3.1, `beta_train`).
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// How per-token log-ratios become process rewards (spec §2.2).
    #[serde(default)]
    pub process_reward: ProcessRewardVariant,
    /// Per token (the paper) or the whole-sequence sum on the last token (ORM-like).
    #[serde(default)]
    pub granularity: RewardGranularity,
    /// Normalisation of the process rewards before the advantages (spec §2.5, `prime_norm`).
    #[serde(default)]
    pub norm: RewardNorm,
}

fn default_beta() -> f64 {
    0.05
}

impl Default for PrmConfig {
    fn default() -> Self {
        Self {
            beta: default_beta(),
            process_reward: ProcessRewardVariant::default(),
            granularity: RewardGranularity::default(),
            norm: RewardNorm::default(),
        }
    }
}

/// Token process rewards from the log-ratio `q` (spec §2.2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessRewardVariant {
    /// [REPO]: `q` itself (β only enters the loss) on every valid token, EOS included.
    #[default]
    Repo,
    /// [RECIPE]: `β·q` on every valid token but the last one, which gets 0.
    Recipe,
}

/// Where process rewards sit (spec §2.2, `granularity`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardGranularity {
    /// One reward per token (the paper, and the main run).
    #[default]
    Token,
    /// The sequence sum on the last valid token.
    Whole,
}

/// Process-reward normalisation (spec §2.5).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardNorm {
    /// Divide by the largest absolute reverse cumulative sum in the batch (+1e-6).
    #[default]
    BatchNorm,
    /// Keep the raw values.
    None,
}

/// Advantage estimation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdvantageConfig {
    /// Leave-one-out baseline of the process rewards (spec §4.1 vs §4.2).
    #[serde(default)]
    pub process_baseline: ProcessBaseline,
    /// Discount of the process-reward returns (`reward_model_gamma`).
    #[serde(default = "default_gamma")]
    pub process_gamma: f64,
    /// Discount of the outcome-reward returns (`verifier_gamma`).
    #[serde(default = "default_gamma")]
    pub outcome_gamma: f64,
}

fn default_gamma() -> f64 {
    1.0
}

impl Default for AdvantageConfig {
    fn default() -> Self {
        Self {
            process_baseline: ProcessBaseline::default(),
            process_gamma: default_gamma(),
            outcome_gamma: default_gamma(),
        }
    }
}

/// Which rewards feed the advantages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Estimator {
    /// RLOO on the process rewards plus RLOO on the outcome reward (paper Eq. 5).
    #[default]
    Prime,
    /// RLOO on the outcome reward only.
    Rloo,
}

/// Leave-one-out baseline for the process rewards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessBaseline {
    /// [REPO] `compute_rloo_returns`: `p·K/(K−1) − Σ_j m_j/(K−1)`.
    #[default]
    Repo,
    /// Paper Eq. 5: `p − Σ_{j≠i} m_j/(K−1)`; the same total return, other per-token values.
    Paper,
}

/// The PPO policy loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PpoConfig {
    /// ε of the clipped surrogate.
    #[serde(default = "default_clip_ratio")]
    pub clip_ratio: f64,
    /// How token losses are averaged (spec §6 "Aggregation").
    #[serde(default)]
    pub loss_aggregation: LossAggregation,
    /// Weight of the entropy bonus (`loss −= entropy_coeff · entropy`); 0 in the main run.
    #[serde(default)]
    pub entropy_coeff: f64,
    /// Weight of a KL term to the reference policy (`loss += kl_coeff · KL`); 0 in the paper.
    #[serde(default)]
    pub kl_coeff: f64,
    /// The per-token KL estimator used when `kl_coeff > 0`.
    #[serde(default)]
    pub kl_estimator: KlEstimator,
    /// How the loss treats groups sampled by an older policy than the one being trained
    /// (only with `learner.rollout.max_staleness >= 1`; with 0 nothing changes).
    #[serde(default)]
    pub off_policy: OffPolicyCorrection,
    /// Truncation of decoupled PPO's behaviour weights `π_old/π_behav` (> 0).
    #[serde(default = "default_behavior_weight_cap")]
    pub behavior_weight_cap: f64,
}

/// The correction for tokens sampled by an older (behaviour) policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OffPolicyCorrection {
    /// Decoupled PPO (AReaL): the clip is taken around the learner's policy at the start of
    /// the step (the recomputed old log-probs) and each token's term is weighted by
    /// `π_old/π_behav` from the sampling log-probs the actors send, truncated at
    /// `behavior_weight_cap`. Chosen over truncated importance sampling on the ratio itself
    /// because it keeps PPO's trust region where the update happens (around the current
    /// weights) while correcting the sampling distribution, and it equals plain PPO when the
    /// behaviour and proximal policies agree.
    #[default]
    Decoupled,
    /// Train stale groups as if they were on-policy (the behaviour log-probs are ignored).
    None,
}

fn default_behavior_weight_cap() -> f64 {
    5.0
}

fn default_clip_ratio() -> f64 {
    0.2
}

impl Default for PpoConfig {
    fn default() -> Self {
        Self {
            clip_ratio: default_clip_ratio(),
            loss_aggregation: LossAggregation::default(),
            entropy_coeff: 0.0,
            kl_coeff: 0.0,
            kl_estimator: KlEstimator::default(),
            off_policy: OffPolicyCorrection::default(),
            behavior_weight_cap: default_behavior_weight_cap(),
        }
    }
}

/// Averaging of per-token losses over a mini-batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossAggregation {
    /// Token mean within each sequence, then the mean over sequences: what [REPO] computes
    /// with its one-sequence micro-batches.
    #[default]
    SeqMeanTokenMean,
    /// One mean over all valid tokens of the mini-batch.
    TokenMean,
}

/// Per-token estimators of KL(π_θ ‖ π_ref).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// `log π_θ − log π_ref` (k1).
    #[default]
    K1,
    /// `exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1`, clamped to ±10 (k3, "low_var_kl").
    LowVarKl,
}

/// Online prompt filtering (spec §5.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Filter at all (`data.filter_accuracy`).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Smallest kept group mean score, inclusive.
    #[serde(default = "default_lower")]
    pub lower: f64,
    /// Largest kept group mean score, inclusive.
    #[serde(default = "default_upper")]
    pub upper: f64,
    /// Also drop a group when any of its responses was truncated (`data.filter_truncated`).
    #[serde(default)]
    pub drop_truncated: bool,
}

fn default_true() -> bool {
    true
}
fn default_lower() -> f64 {
    0.2
}
fn default_upper() -> f64 {
    0.8
}

impl Default for FilterConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            lower: default_lower(),
            upper: default_upper(),
            drop_truncated: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_papers_and_parse_from_toml() {
        let config: AlgoConfig = toml::from_str("").unwrap();
        assert_eq!(config, AlgoConfig::default());
        assert_eq!(config.prm.beta, 0.05);
        assert_eq!(config.mini_batches, 4);
        assert_eq!(config.ppo.clip_ratio, 0.2);
        assert_eq!((config.filter.lower, config.filter.upper), (0.2, 0.8));
        let config: AlgoConfig = toml::from_str(
            "[prm]\nprocess_reward = \"recipe\"\nnorm = \"none\"\n\
             [advantage]\nprocess_baseline = \"paper\"\n[ppo]\nloss_aggregation = \"token_mean\"\n",
        )
        .unwrap();
        assert_eq!(config.prm.process_reward, ProcessRewardVariant::Recipe);
        assert_eq!(config.prm.norm, RewardNorm::None);
        assert_eq!(config.advantage.process_baseline, ProcessBaseline::Paper);
        assert_eq!(config.ppo.loss_aggregation, LossAggregation::TokenMean);
        assert!(toml::from_str::<AlgoConfig>("[prm]\nbetta = 1.0\n").is_err());
    }

    #[test]
    fn validation_names_the_key_of_a_value_the_formulas_cannot_use() {
        AlgoConfig::default().validate("learner.algo").unwrap();
        for (table, expected) in [
            (
                "[prm]\nbeta = nan\n",
                "learner.algo.prm.beta must be a finite number > 0, got NaN",
            ),
            ("[prm]\nbeta = 0.0\n", "learner.algo.prm.beta"),
            ("[prm]\nbeta = inf\n", "learner.algo.prm.beta"),
            (
                "mini_batches = 0\n",
                "learner.algo.mini_batches must be at least 1",
            ),
            (
                "[advantage]\nprocess_gamma = 1.5\n",
                "advantage.process_gamma",
            ),
            (
                "[advantage]\noutcome_gamma = -inf\n",
                "advantage.outcome_gamma",
            ),
            ("[ppo]\nclip_ratio = 0.0\n", "ppo.clip_ratio"),
            (
                "[ppo]\nbehavior_weight_cap = nan\n",
                "ppo.behavior_weight_cap",
            ),
            ("[ppo]\nentropy_coeff = -0.1\n", "ppo.entropy_coeff"),
            ("[ppo]\nkl_coeff = nan\n", "ppo.kl_coeff"),
            ("[filter]\nlower = nan\n", "filter.lower"),
            (
                "[filter]\nlower = 0.9\nupper = 0.1\n",
                "filter needs 0 <= lower <= upper",
            ),
        ] {
            let config: AlgoConfig = toml::from_str(table).unwrap();
            let message = config.validate("learner.algo").unwrap_err();
            assert!(message.contains(expected), "{table:?}: {message}");
        }
    }
}

//! The PRIME algorithm core (arXiv 2502.01456; ../shared/reference/prime-spec.md §1-6) as
//! small pure functions on `[B, T]` response tensors, in the order one iteration uses them:
//!
//! 1. [`filter::keep_groups`]: keep groups whose mean score is in [0.2, 0.8] (§5).
//! 2. [`masks::response_mask`]: valid tokens, up to and including the first EOS (§0).
//! 3. [`implicit_prm::token_log_ratio`] → [`implicit_prm::prm_ce_loss`] for the PRM update and
//!    [`implicit_prm::process_rewards`] from the same forward (§2-3);
//!    [`implicit_prm::dpo_accuracy`] to monitor it.
//! 4. [`implicit_prm::normalize_process_rewards`] (§2.5).
//! 5. [`advantages::advantages`]: leave-one-out process and outcome rewards, returns, whitening
//!    (§4).
//! 6. [`ppo::policy_loss`]: the clipped surrogate plus optional entropy and KL terms (§6).
//!
//! Responses of one prompt are contiguous rows (`g*K + i`); every group function takes `k`.
pub mod advantages;
pub mod config;
pub mod filter;
pub mod implicit_prm;
pub mod masks;
pub mod ppo;

pub use config::{
    AdvantageConfig, AlgoConfig, Estimator, FilterConfig, KlEstimator, LossAggregation,
    OffPolicyCorrection, PpoConfig, PrmConfig, PrmUpdate, ProcessBaseline, ProcessRewardVariant,
    ReferenceType, RewardGranularity, RewardNorm,
};

/// Helpers shared by the unit tests of the algorithm modules.
#[cfg(test)]
pub(crate) mod test_util {
    use tch::Tensor;

    pub fn values(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
    }

    pub fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-6, "{a:?} vs {b:?}");
        }
    }
}

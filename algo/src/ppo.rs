//! The policy loss (paper Eq. 6, spec §6): PPO's clipped surrogate on the PRIME advantages,
//! with optional entropy bonus and KL term (both off in the paper).
use tch::Tensor;

use super::config::{KlEstimator, LossAggregation, PpoConfig};
use super::masks::{masked_mean, masked_row_mean};

/// Averages per-token values over a mini-batch (spec §6 "Aggregation"). Scalar.
///
/// `SeqMeanTokenMean` is the token mean of each response, then the mean over responses (a
/// response without valid tokens counts as 0); `TokenMean` is one mean over all valid tokens.
pub fn aggregate(values: &Tensor, mask: &Tensor, aggregation: LossAggregation) -> Tensor {
    match aggregation {
        LossAggregation::SeqMeanTokenMean => masked_row_mean(values, mask).mean(values.kind()),
        LossAggregation::TokenMean => masked_mean(values, mask),
    }
}

/// The clipped surrogate and its monitoring figures.
#[derive(Debug)]
pub struct Surrogate {
    /// `agg_t max(−A_t ρ_t, −A_t clip(ρ_t, 1−ε, 1+ε))`, differentiable in `logprobs`.
    pub loss: Tensor,
    /// Share of tokens where the clipped term is the larger one (the gradient is cut).
    pub clip_fraction: Tensor,
    /// `agg_t (log π_old − log π_θ)`, the first-order KL estimate between old and new policy.
    pub approx_kl: Tensor,
}

/// Decoupled PPO's behaviour weights (AReaL, Fu et al. 2025, "decoupled PPO objective"):
/// `w_t = π_prox(y_t) / π_behav(y_t) = exp(log π_old − log π_behav)`, the importance weight
/// of the token under the policy the learner holds at the start of the step (the proximal
/// policy, whose log-probs are the recomputed old log-probs) against the one that sampled it.
/// Detached, and truncated at `cap` (> 0) so that one stale token cannot dominate a batch;
/// 0 off the mask. `[B, T]`.
pub fn behavior_weights(
    old_logprobs: &Tensor,
    behavior_logprobs: &Tensor,
    mask: &Tensor,
    cap: f64,
) -> Tensor {
    (old_logprobs - behavior_logprobs)
        .exp()
        .clamp_max(cap)
        .detach()
        * mask
}

/// PPO's clipped surrogate (paper Eq. 6, spec §6) with `ρ_t = exp(log π_θ − log π_old)`, ε =
/// `clip_ratio`, no dual clip. `logprobs` (with grad), `old_logprobs`, `advantages`, `mask`:
/// `[B, T]`; the scalars aggregated by `aggregation`. With `behavior_weights` (from
/// [`behavior_weights`]) each token's term is multiplied by its weight: decoupled PPO, where
/// the clip keeps the update near the proximal policy and the weight corrects for the
/// behaviour policy having sampled the tokens.
pub fn clipped_surrogate(
    logprobs: &Tensor,
    old_logprobs: &Tensor,
    advantages: &Tensor,
    mask: &Tensor,
    clip_ratio: f64,
    aggregation: LossAggregation,
    behavior_weights: Option<&Tensor>,
) -> Surrogate {
    let log_ratio = logprobs - old_logprobs;
    let ratio = log_ratio.exp();
    let unclipped = -advantages * &ratio;
    let clipped = -advantages * ratio.clamp(1.0 - clip_ratio, 1.0 + clip_ratio);
    let token_loss = match behavior_weights {
        Some(weights) => unclipped.maximum(&clipped) * weights,
        None => unclipped.maximum(&clipped),
    };
    let was_clipped = clipped.gt_tensor(&unclipped).to_kind(logprobs.kind());
    Surrogate {
        loss: aggregate(&token_loss, mask, aggregation),
        clip_fraction: aggregate(&was_clipped, mask, aggregation),
        approx_kl: aggregate(&(-&log_ratio), mask, aggregation).detach(),
    }
}

/// Entropy of the next-token distribution at each position, `H = logsumexp(z) − Σ softmax(z)·z`,
/// from `[B, T, V]` logits to `[B, T]`.
pub fn token_entropy(logits: &Tensor) -> Tensor {
    let log_probs = logits.log_softmax(-1, logits.kind());
    -(log_probs.exp() * &log_probs).sum_dim_intlist(-1, false, logits.kind())
}

/// Per-token KL(π_θ ‖ π_ref) estimates from the two log-probs of the sampled tokens, `[B, T]`.
pub fn kl_penalty(logprobs: &Tensor, ref_logprobs: &Tensor, estimator: KlEstimator) -> Tensor {
    match estimator {
        KlEstimator::K1 => logprobs - ref_logprobs,
        KlEstimator::LowVarKl => {
            let log_ratio = ref_logprobs - logprobs;
            (log_ratio.exp() - &log_ratio - 1.0).clamp(-10.0, 10.0)
        }
    }
}

/// The whole policy objective and its parts (spec §6).
#[derive(Debug)]
pub struct PolicyLoss {
    /// `surrogate − entropy_coeff · entropy + kl_coeff · kl`, the tensor to backpropagate.
    pub loss: Tensor,
    /// The clipped surrogate with its clip fraction and approximate KL.
    pub surrogate: Surrogate,
    /// Aggregated token entropy, when entropies were given.
    pub entropy: Option<Tensor>,
    /// Aggregated KL to the reference, when reference log-probs were given.
    pub kl: Option<Tensor>,
}

/// Combines the clipped surrogate with the entropy bonus and the KL term:
/// `loss = surrogate − c_H · agg(H) + c_KL · agg(KL(π_θ ‖ π_ref))`, all aggregated as the
/// config says. `entropy` (`[B, T]`, from [`token_entropy`]) and `ref_logprobs` are needed only
/// when their coefficients are non-zero; when given they are also reported. `behavior_weights`
/// weight the surrogate's tokens (decoupled PPO, [`clipped_surrogate`]).
#[allow(clippy::too_many_arguments)]
pub fn policy_loss(
    logprobs: &Tensor,
    old_logprobs: &Tensor,
    advantages: &Tensor,
    mask: &Tensor,
    entropy: Option<&Tensor>,
    ref_logprobs: Option<&Tensor>,
    behavior_weights: Option<&Tensor>,
    config: &PpoConfig,
) -> PolicyLoss {
    let aggregation = config.loss_aggregation;
    let surrogate = clipped_surrogate(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        config.clip_ratio,
        aggregation,
        behavior_weights,
    );
    let entropy = entropy.map(|h| aggregate(h, mask, aggregation));
    let kl = ref_logprobs.map(|r| {
        aggregate(
            &kl_penalty(logprobs, r, config.kl_estimator),
            mask,
            aggregation,
        )
    });
    let entropy_bonus = (config.entropy_coeff != 0.0).then(|| {
        let h = entropy
            .as_ref()
            .expect("entropy_coeff != 0 needs token entropies");
        h * -config.entropy_coeff
    });
    let kl_term = (config.kl_coeff != 0.0).then(|| {
        let kl = kl
            .as_ref()
            .expect("kl_coeff != 0 needs reference log-probs");
        kl * config.kl_coeff
    });
    let loss = [entropy_bonus, kl_term]
        .into_iter()
        .flatten()
        .fold(surrogate.loss.shallow_clone(), |loss, term| loss + term);
    PolicyLoss {
        loss,
        surrogate,
        entropy,
        kl,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn surrogate_by_hand() {
        let old = Tensor::from_slice2(&[[-1.0f32, -1.0], [-2.0, -2.0]]);
        // Row 0: ratio 1.5 with A = 1 (clipped at 1.2) and ratio 1 with A = 1; row 1: ratio 0.5
        // with A = −2 (clipped at 0.8: loss max(1, 1.6) = 1.6), then padding.
        let new = &old + Tensor::from_slice2(&[[1.5f32.ln(), 0.0], [0.5f32.ln(), 0.0]]);
        let new = new.set_requires_grad(true);
        let adv = Tensor::from_slice2(&[[1.0f32, 1.0], [-2.0, 9.0]]);
        let mask = Tensor::from_slice2(&[[true, true], [true, false]]);
        let per_seq = clipped_surrogate(
            &new,
            &old,
            &adv,
            &mask,
            0.2,
            LossAggregation::SeqMeanTokenMean,
            None,
        );
        let expected = ((-1.2 - 1.0) / 2.0 + 1.6) / 2.0;
        assert!((per_seq.loss.double_value(&[]) - expected).abs() < 1e-6);
        assert!((per_seq.clip_fraction.double_value(&[]) - 0.75).abs() < 1e-6);
        let kl_expected = (-(1.5f64.ln()) / 2.0 - 0.5f64.ln()) / 2.0;
        assert!((per_seq.approx_kl.double_value(&[]) - kl_expected).abs() < 1e-6);
        let token = clipped_surrogate(
            &new,
            &old,
            &adv,
            &mask,
            0.2,
            LossAggregation::TokenMean,
            None,
        );
        assert!((token.loss.double_value(&[]) - (-1.2 - 1.0 + 1.6) / 3.0).abs() < 1e-6);
        // Gradient flows only through the unclipped token.
        token.loss.backward();
        let grad = Vec::<f32>::try_from(new.grad().flatten(0, -1)).unwrap();
        assert!(grad[0].abs() < 1e-7 && (grad[1] + 1.0 / 3.0).abs() < 1e-6 && grad[2].abs() < 1e-7);
    }

    #[test]
    fn entropy_and_kl_terms() {
        let logits = Tensor::zeros([1, 1, 4], (Kind::Float, tch::Device::Cpu));
        let h = token_entropy(&logits);
        assert!((h.double_value(&[0, 0]) - 4f64.ln()).abs() < 1e-6);
        let lp = Tensor::from_slice2(&[[-1.0f32]]);
        let reference = Tensor::from_slice2(&[[-2.0f32]]);
        assert!(
            (kl_penalty(&lp, &reference, KlEstimator::K1).double_value(&[0, 0]) - 1.0).abs() < 1e-6
        );
        let k3 = (-1.0f64).exp() + 1.0 - 1.0;
        assert!(
            (kl_penalty(&lp, &reference, KlEstimator::LowVarKl).double_value(&[0, 0]) - k3).abs()
                < 1e-6
        );
        let mask = Tensor::from_slice2(&[[true]]);
        let adv = Tensor::from_slice2(&[[1.0f32]]);
        let config = PpoConfig {
            entropy_coeff: 0.1,
            kl_coeff: 0.5,
            ..Default::default()
        };
        let out = policy_loss(
            &lp,
            &lp,
            &adv,
            &mask,
            Some(&h),
            Some(&reference),
            None,
            &config,
        );
        let expected = -1.0 - 0.1 * 4f64.ln() + 0.5;
        assert!((out.loss.double_value(&[]) - expected).abs() < 1e-6);
    }

    #[test]
    fn behaviour_weights_by_hand() {
        // Proximal (old) and behaviour log-probs: weights exp(old − behav) = 2, 0.5, and
        // e^3 ≈ 20.1 truncated at 5; 0 on padding.
        let old = Tensor::from_slice2(&[[-1.0f32, -2.0], [-0.5, -0.5]]);
        let behav = Tensor::from_slice2(&[[-1.0 - 2f32.ln(), -2.0 + 2f32.ln()], [-3.5, 0.0]]);
        let mask = Tensor::from_slice2(&[[true, true], [true, false]]);
        let w = behavior_weights(&old, &behav, &mask, 5.0);
        let w = Vec::<f32>::try_from(w.flatten(0, -1)).unwrap();
        assert!((w[0] - 2.0).abs() < 1e-6 && (w[1] - 0.5).abs() < 1e-6);
        assert_eq!(w[2], 5.0);
        assert_eq!(w[3], 0.0);
        // The weighted surrogate at ratio 1 (new = old) with A = 1 everywhere: token loss
        // −A·w; token mean over the 3 valid tokens.
        let adv = Tensor::ones([2, 2], (Kind::Float, tch::Device::Cpu));
        let weights = behavior_weights(&old, &behav, &mask, 5.0);
        let s = clipped_surrogate(
            &old,
            &old,
            &adv,
            &mask,
            0.2,
            LossAggregation::TokenMean,
            Some(&weights),
        );
        assert!((s.loss.double_value(&[]) - (-(2.0 + 0.5 + 5.0) / 3.0)).abs() < 1e-6);
    }
}

//! Advantages (paper §3.2 Eq. 4-5, spec §4.1): leave-one-out baselines on the process and on
//! the outcome rewards, a discounted return for each, their sum, whitened over the batch.
use tch::Tensor;

use super::config::{AdvantageConfig, Estimator, ProcessBaseline};
use super::masks::{last_token_mask, masked_row_mean, weights};

/// Added to the variance before whitening (spec §4.1).
const WHITEN_EPS: f64 = 1e-8;

/// Leave-one-out centering of per-token rewards within each group of `k` contiguous responses
/// (spec §4.1, [REPO] `compute_rloo_returns`). With `m_j` the mean of response j's rewards over
/// its `reward_mask` tokens (0 if it has none):
///
/// * `Repo`: `r'_{i,t} = r_{i,t} · K/(K−1) − Σ_{j=1..K} m_j/(K−1)` (the sum includes i);
/// * `Paper` (Eq. 5): `r'_{i,t} = r_{i,t} − Σ_{j≠i} m_j/(K−1)`;
///
/// on `reward_mask` tokens, 0 elsewhere. Both give the same per-response total when
/// `reward_mask` is the response mask. `[B, T]` in and out; `k ≥ 2` must divide B.
pub fn leave_one_out(
    rewards: &Tensor,
    reward_mask: &Tensor,
    k: i64,
    baseline: ProcessBaseline,
) -> Tensor {
    let (b, t) = rewards.size2().expect("rewards are [B, T]");
    assert!(
        k >= 2 && b % k == 0,
        "leave-one-out needs groups of k >= 2 dividing the batch (B = {b}, k = {k})"
    );
    let w = weights(reward_mask, rewards);
    let masked = rewards * &w;
    let means = masked_row_mean(&masked, reward_mask).view([-1, k]);
    let total = means.sum_dim_intlist(1, true, means.kind());
    let denominator = (k - 1) as f64;
    let (scaled, baseline) = match baseline {
        ProcessBaseline::Repo => (
            masked.view([-1, k, t]) * (k as f64 / denominator),
            total / denominator,
        ),
        ProcessBaseline::Paper => (masked.view([-1, k, t]), (total - &means) / denominator),
    };
    ((scaled - baseline.unsqueeze(2)).view([b, t])) * w
}

/// The outcome reward placed on each response's last valid token and centred by leave-one-out
/// (spec §4.1 "Outcome part"): `acc_i − Σ_{j≠i} acc_j/(K−1)` at `t = L_i − 1`, 0 elsewhere.
/// `scores`: `[B]` floats; returns `[B, T]` of their kind.
pub fn rloo_outcome_rewards(scores: &Tensor, mask: &Tensor, k: i64) -> Tensor {
    let last = last_token_mask(mask);
    let placed = scores.unsqueeze(1) * weights(&last, scores);
    leave_one_out(&placed, &last, k, ProcessBaseline::Repo)
}

/// Discounted reward-to-go over the whole padded row: `G_t = Σ_{s≥t} γ^{s−t} r_s` (paper Eq. 4);
/// with γ = 1 (the default) the plain reverse cumulative sum. `[B, T]`.
pub fn discounted_returns(rewards: &Tensor, gamma: f64) -> Tensor {
    if gamma == 1.0 {
        return rewards.flip([1]).cumsum(1, rewards.kind()).flip([1]);
    }
    let t = rewards.size()[1];
    let mut next = rewards.select(1, 0).zeros_like();
    let mut columns: Vec<Tensor> = (0..t)
        .rev()
        .map(|s| {
            next = rewards.select(1, s) + &next * gamma;
            next.shallow_clone()
        })
        .collect();
    columns.reverse();
    Tensor::stack(&columns, 1)
}

/// Returns `R = G^p + G^o` (spec §4.1 "Returns"): the discounted returns of the leave-one-out
/// process rewards and of the leave-one-out outcome reward, weighted 1:1 as [REPO] does. The
/// `rloo` estimator keeps `G^o` only and ignores `process_rewards`. `process_rewards`: `[B, T]`
/// after normalisation; `scores`: `[B]`; `[B, T]` out.
pub fn returns(
    process_rewards: &Tensor,
    scores: &Tensor,
    mask: &Tensor,
    k: i64,
    estimator: Estimator,
    config: &AdvantageConfig,
) -> Tensor {
    let outcome = discounted_returns(&rloo_outcome_rewards(scores, mask, k), config.outcome_gamma);
    match estimator {
        Estimator::Rloo => outcome,
        Estimator::Prime => {
            let process = leave_one_out(process_rewards, mask, k, config.process_baseline);
            discounted_returns(&process, config.process_gamma) + outcome
        }
    }
}

/// Whitening over every valid token of the batch (spec §4.1 "Whitening"):
/// `A = (R − μ) / sqrt(σ² + 1e-8)`, μ the masked mean, σ² the **unbiased** masked variance.
/// Padding gets 0. Needs at least two valid tokens. `[B, T]`.
pub fn whiten(values: &Tensor, mask: &Tensor) -> Tensor {
    let w = weights(mask, values);
    let count = w.sum(values.kind());
    let mean = (values * &w).sum(values.kind()) / &count;
    let centered = (values - mean) * &w;
    let variance = centered.square().sum(values.kind()) / (count - 1.0);
    centered * (variance + WHITEN_EPS).rsqrt()
}

/// The PRIME advantages (paper Eq. 5 + whitening): [`whiten`] of [`returns`].
pub fn advantages(
    process_rewards: &Tensor,
    scores: &Tensor,
    mask: &Tensor,
    k: i64,
    estimator: Estimator,
    config: &AdvantageConfig,
) -> Tensor {
    whiten(
        &returns(process_rewards, scores, mask, k, estimator, config),
        mask,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    use crate::test_util::{close, values};

    #[test]
    fn outcome_rloo_is_plain_leave_one_out() {
        let mask = Tensor::from_slice2(&[[true, true], [true, false], [true, true], [true, true]]);
        let out = rloo_outcome_rewards(&Tensor::from_slice(&[1.0f32, 0.0, 0.0, 0.0]), &mask, 4);
        let third = 1.0 / 3.0;
        close(
            &values(&out),
            &[0.0, 1.0, -third, 0.0, 0.0, -third, 0.0, -third],
        );
        let out = rloo_outcome_rewards(&Tensor::from_slice(&[1.0f32, 0.0, 0.5, 0.5]), &mask, 2);
        close(&values(&out), &[0.0, 1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn process_baselines_by_hand() {
        // m_0 = 1 (rewards 0, 2), m_1 = 2 (one valid token); K = 2.
        let rewards = Tensor::from_slice2(&[[0.0f32, 2.0], [2.0, 7.0]]);
        let mask = Tensor::from_slice2(&[[true, true], [true, false]]);
        // Repo: r·2 − (1 + 2).
        let repo = leave_one_out(&rewards, &mask, 2, ProcessBaseline::Repo);
        close(&values(&repo), &[-3.0, 1.0, 1.0, 0.0]);
        // Paper: r − m_other.
        let paper = leave_one_out(&rewards, &mask, 2, ProcessBaseline::Paper);
        close(&values(&paper), &[-2.0, 0.0, 1.0, 0.0]);
        // Same totals per response.
        close(
            &values(&repo.sum_dim_intlist(1, false, Kind::Float)),
            &values(&paper.sum_dim_intlist(1, false, Kind::Float)),
        );
    }

    #[test]
    fn returns_and_whitening_by_hand() {
        let rewards = Tensor::from_slice2(&[[1.0f32, 2.0, 3.0]]);
        close(
            &values(&discounted_returns(&rewards, 1.0)),
            &[6.0, 5.0, 3.0],
        );
        close(
            &values(&discounted_returns(&rewards, 0.5)),
            &[2.75, 3.5, 3.0],
        );
        let mask = Tensor::from_slice2(&[[true, true, true, false]]);
        let white = whiten(&Tensor::from_slice2(&[[1.0f32, 2.0, 3.0, 50.0]]), &mask);
        let s = (1.0f64 + 1e-8).sqrt() as f32;
        close(&values(&white), &[-1.0 / s, 0.0, 1.0 / s, 0.0]);
    }

    #[test]
    fn rloo_estimator_ignores_process_rewards() {
        let mask = Tensor::from_slice2(&[[true, true], [true, true]]);
        let scores = Tensor::from_slice(&[1.0f32, 0.0]);
        let process = Tensor::from_slice2(&[[5.0f32, -1.0], [0.5, 2.0]]);
        let config = AdvantageConfig::default();
        let r = returns(&process, &scores, &mask, 2, Estimator::Rloo, &config);
        close(&values(&r), &[1.0, 1.0, -1.0, -1.0]);
        let prime = returns(&process, &scores, &mask, 2, Estimator::Prime, &config);
        // Process: m = (2, 1.25), p·2 − 3.25, reverse-summed, plus the outcome.
        close(
            &values(&prime),
            &[1.0 + 1.5, 1.0 - 5.25, -1.0 - 1.5, -1.0 + 0.75],
        );
    }
}

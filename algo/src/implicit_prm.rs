//! The implicit PRM (paper §3.1, spec §2-3): an outcome reward model parameterised as
//! `β · log π_φ(y)/π_ref(y)`, whose per-token log-ratios are free process rewards.
use tch::{Kind, Reduction, Tensor};

use super::advantages::discounted_returns;
use super::config::{ProcessRewardVariant, RewardGranularity, RewardNorm};
use super::masks::{last_token_mask, masked_row_sum, weights};

/// Added to the normaliser of `batch_norm` (spec §2.5).
const NORM_EPS: f64 = 1e-6;

/// `q_{i,t} = log π_φ(y_t | y_<t) − log π_ref(y_t | y_<t)` (paper Eq. 3 without β, spec §2.2)
/// on valid tokens, 0 elsewhere. All inputs `[B, T]`.
pub fn token_log_ratio(prm_logprobs: &Tensor, ref_logprobs: &Tensor, mask: &Tensor) -> Tensor {
    (prm_logprobs - ref_logprobs) * weights(mask, prm_logprobs)
}

/// The sequence reward `r_φ(y) = β · Σ_t q_t` (paper §3.1, spec §2.1), `[B]`.
pub fn sequence_reward(q: &Tensor, mask: &Tensor, beta: f64) -> Tensor {
    masked_row_sum(q, mask) * beta
}

/// Token-level process rewards from the log-ratios (spec §2.2), `[B, T]`, 0 off the mask.
///
/// * `Token` + `Repo` (default): `q_t` on every valid token, EOS included, without β.
/// * `Token` + `Recipe`: `β·q_t` on every valid token except the last.
/// * `Whole`: the sequence sum (`Σq`, or `β·Σq` for `Recipe`) on the last valid token.
pub fn process_rewards(
    q: &Tensor,
    mask: &Tensor,
    beta: f64,
    variant: ProcessRewardVariant,
    granularity: RewardGranularity,
) -> Tensor {
    let scale = match variant {
        ProcessRewardVariant::Repo => 1.0,
        ProcessRewardVariant::Recipe => beta,
    };
    let last = last_token_mask(mask);
    match (granularity, variant) {
        (RewardGranularity::Token, ProcessRewardVariant::Repo) => q * weights(mask, q),
        (RewardGranularity::Token, ProcessRewardVariant::Recipe) => {
            let all_but_last = mask.to_kind(Kind::Bool).logical_and(&last.logical_not());
            q * weights(&all_but_last, q) * scale
        }
        (RewardGranularity::Whole, _) => {
            masked_row_sum(q, mask).unsqueeze(1) * weights(&last, q) * scale
        }
    }
}

/// `prime_norm` (spec §2.5). `batch_norm`: `r ← r / (max_{i,t} |Σ_{s≥t} r_{i,s}| + 1e-6)`,
/// the max over every row and position of `rewards` (one data-parallel shard); `none`: as is.
/// `rewards` must be 0 off the mask, as [`process_rewards`] leaves them.
pub fn normalize_process_rewards(rewards: &Tensor, norm: RewardNorm) -> Tensor {
    match norm {
        RewardNorm::None => rewards.shallow_clone(),
        RewardNorm::BatchNorm => {
            let largest = discounted_returns(rewards, 1.0).abs().max();
            rewards / (largest + NORM_EPS)
        }
    }
}

/// The PRM's cross-entropy loss (paper Algorithm 1 line 8, spec §3.1):
/// `mean_i [ −acc_i · log σ(β Σ_t q_{i,t}) − (1 − acc_i) · log(1 − σ(β Σ_t q_{i,t})) ]`,
/// one logit per response, `acc` possibly fractional (code). Scalar.
///
/// Computed from the logit (log-sigmoid), which equals the formula where [REPO]'s
/// sigmoid-then-log is finite and stays finite where it saturates.
pub fn prm_ce_loss(q: &Tensor, mask: &Tensor, scores: &Tensor, beta: f64) -> Tensor {
    let logits = sequence_reward(q, mask, beta);
    logits.binary_cross_entropy_with_logits::<Tensor>(
        &scores.to_kind(logits.kind()),
        None,
        None,
        Reduction::Mean,
    )
}

/// The PRM accuracy metric `dpo_acc` (spec §3.5, paper Fig. 5). Per group of `k` contiguous
/// responses, over pairs `i < j` weighted by `|acc_i − acc_j|`, a hit is
/// `(S_i > S_j) == (acc_i > acc_j)` with `S` the sum of token rewards (as [REPO] compares; a
/// tie `S_i = S_j` reads as "j is not worse"). A group whose scores are all equal counts 0.5.
/// Returns the mean over groups, a scalar.
pub fn dpo_accuracy(token_rewards: &Tensor, mask: &Tensor, scores: &Tensor, k: i64) -> Tensor {
    let sums = masked_row_sum(token_rewards, mask).view([-1, k]);
    let acc = scores.to_kind(sums.kind()).view([-1, k]);
    let pairwise = |x: &Tensor| x.unsqueeze(2) - x.unsqueeze(1);
    let (sum_diff, acc_diff) = (pairwise(&sums), pairwise(&acc));
    let upper = Tensor::ones([k, k], (Kind::Bool, sums.device())).triu(1);
    let weight = acc_diff.abs() * weights(&upper, &sums);
    let hit = sum_diff.gt(0.0).eq_tensor(&acc_diff.gt(0.0));
    let total = weight.sum_dim_intlist([1, 2].as_slice(), false, sums.kind());
    let hits =
        (weights(&hit, &sums) * &weight).sum_dim_intlist([1, 2].as_slice(), false, sums.kind());
    // Groups without weight divide 0 by 0; `where` replaces them by 0.5.
    let group = (hits / &total).where_self(&total.gt(0.0), &total.full_like(0.5));
    group.mean(sums.kind())
}

/// The PRM's ranking within groups: in each group of `k` contiguous responses, every pair of
/// responses with different scores (for 0/1 grades: each correct response with each wrong
/// one) is a hit when the better-scored one has the larger sum of token rewards `S`, half a
/// hit on a tie. Returns the mean over the groups that hold such a pair of their share of
/// hits, or `None` when no group does.
///
/// Unlike [`dpo_accuracy`] a tie counts half either way and a group whose responses all score
/// the same is left out rather than counted 0.5, so chance is 0.5 and a PRM that ranks
/// nothing reads exactly 0.5. Unlike [`dpo_abs_accuracy`] it does not mix the PRM's overall
/// bias with the batch's share of correct answers.
pub fn ranking_accuracy(
    token_rewards: &Tensor,
    mask: &Tensor,
    scores: &Tensor,
    k: i64,
) -> Option<f64> {
    let to_vec = |t: Tensor| Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1));
    let sums = to_vec(masked_row_sum(token_rewards, mask)).ok()?;
    let scores = to_vec(scores.shallow_clone()).ok()?;
    group_ranking_accuracy(&sums, &scores, k as usize)
}

/// [`ranking_accuracy`] on plain per-response sums and scores, `k` responses per group.
pub fn group_ranking_accuracy(sums: &[f64], scores: &[f64], k: usize) -> Option<f64> {
    let mut total = 0.0;
    let mut groups = 0usize;
    for (s, a) in sums.chunks(k.max(1)).zip(scores.chunks(k.max(1))) {
        let (mut hits, mut pairs) = (0.0, 0usize);
        for i in 0..s.len() {
            for j in 0..s.len() {
                if a[i] > a[j] {
                    pairs += 1;
                    hits += match s[i].partial_cmp(&s[j]) {
                        Some(std::cmp::Ordering::Greater) => 1.0,
                        Some(std::cmp::Ordering::Equal) => 0.5,
                        _ => 0.0,
                    };
                }
            }
        }
        if pairs > 0 {
            total += hits / pairs as f64;
            groups += 1;
        }
    }
    (groups > 0).then(|| total / groups as f64)
}

/// `dpo_acc_abs` ([RECIPE], spec §3.5): the fraction of responses with
/// `sign(S_i) == sign(2·acc_i − 1)`, `S` the sum of token rewards. Scalar.
pub fn dpo_abs_accuracy(token_rewards: &Tensor, mask: &Tensor, scores: &Tensor) -> Tensor {
    let sums = masked_row_sum(token_rewards, mask);
    let target = scores.to_kind(sums.kind()) * 2.0 - 1.0;
    sums.sign()
        .eq_tensor(&target.sign())
        .to_kind(sums.kind())
        .mean(sums.kind())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_util::{close, values};

    #[test]
    fn log_ratio_and_rewards_by_variant() {
        let prm = Tensor::from_slice2(&[[-1.0f32, -2.0, -3.0], [-1.0, -1.0, -9.0]]);
        let reference = Tensor::from_slice2(&[[-2.0f32, -2.5, -1.0], [-0.5, -2.0, -1.0]]);
        let mask = Tensor::from_slice2(&[[true, true, true], [true, true, false]]);
        let q = token_log_ratio(&prm, &reference, &mask);
        close(&values(&q), &[1.0, 0.5, -2.0, -0.5, 1.0, 0.0]);
        close(&values(&sequence_reward(&q, &mask, 0.05)), &[-0.025, 0.025]);
        let token = |v| process_rewards(&q, &mask, 0.5, v, RewardGranularity::Token);
        close(
            &values(&token(ProcessRewardVariant::Repo)),
            &[1.0, 0.5, -2.0, -0.5, 1.0, 0.0],
        );
        close(
            &values(&token(ProcessRewardVariant::Recipe)),
            &[0.5, 0.25, 0.0, -0.25, 0.0, 0.0],
        );
        let whole = process_rewards(
            &q,
            &mask,
            0.5,
            ProcessRewardVariant::Repo,
            RewardGranularity::Whole,
        );
        close(&values(&whole), &[0.0, 0.0, -0.5, 0.0, 0.5, 0.0]);
    }

    #[test]
    fn batch_norm_divides_by_the_largest_return() {
        // Reverse cumsums: [0, -1, 1] and [3, 3, 0]: the largest magnitude is 3.
        let rewards = Tensor::from_slice2(&[[1.0f32, -2.0, 1.0], [0.0, 3.0, 0.0]]);
        let normed = normalize_process_rewards(&rewards, RewardNorm::BatchNorm);
        let d = 3.0 + 1e-6;
        close(
            &values(&normed),
            &[1.0 / d, -2.0 / d, 1.0 / d, 0.0, 3.0 / d, 0.0],
        );
        close(
            &values(&normalize_process_rewards(&rewards, RewardNorm::None)),
            &values(&rewards),
        );
    }

    #[test]
    fn ce_loss_by_hand() {
        let mask = Tensor::from_slice2(&[[true, true], [true, false]]);
        // Zero log-ratios: σ(0) = 1/2 whatever the label, loss ln 2.
        let zero = Tensor::zeros([2, 2], (Kind::Float, tch::Device::Cpu));
        let scores = Tensor::from_slice(&[1.0f32, 0.3]);
        let loss = prm_ce_loss(&zero, &mask, &scores, 0.05).double_value(&[]);
        assert!((loss - std::f64::consts::LN_2).abs() < 1e-6);
        // One response, β·Σq = 2, fractional label 0.25.
        let q = Tensor::from_slice2(&[[30.0f32, 10.0]]);
        let loss = prm_ce_loss(
            &q,
            &Tensor::from_slice2(&[[true, true]]),
            &Tensor::from_slice(&[0.25f32]),
            0.05,
        );
        let s = 1.0 / (1.0 + (-2.0f64).exp());
        let expected = -0.25 * s.ln() - 0.75 * (1.0 - s).ln();
        assert!((loss.double_value(&[]) - expected).abs() < 1e-6);
    }

    #[test]
    fn dpo_accuracy_by_hand() {
        let mask = Tensor::ones([4, 1], (Kind::Bool, tch::Device::Cpu));
        let acc = |s: &[f32], a: &[f32]| {
            dpo_accuracy(
                &Tensor::from_slice(s).view([-1, 1]),
                &mask,
                &Tensor::from_slice(a),
                2,
            )
            .double_value(&[])
        };
        // Group 1 ranks right, group 2 wrong.
        assert_eq!(acc(&[3.0, 1.0, 1.0, 3.0], &[1.0, 0.0, 1.0, 0.0]), 0.5);
        assert_eq!(acc(&[3.0, 1.0, 5.0, 3.0], &[1.0, 0.0, 1.0, 0.0]), 1.0);
        // Equal scores count 0.5; a tie of S with acc_i < acc_j is a hit, with acc_i > acc_j a miss.
        assert_eq!(acc(&[3.0, 1.0, 0.0, 0.0], &[1.0, 1.0, 0.0, 1.0]), 0.75);
        assert_eq!(acc(&[0.0, 0.0, 0.0, 0.0], &[1.0, 0.0, 1.0, 0.0]), 0.0);
        // Weighted by |Δacc| within a group of 4.
        let mask = Tensor::ones([4, 1], (Kind::Bool, tch::Device::Cpu));
        let s = Tensor::from_slice(&[4.0f32, 3.0, 2.0, 1.0]).view([-1, 1]);
        let a = Tensor::from_slice(&[0.5f32, 1.0, 0.0, 0.0]);
        // Pairs (Δacc, hit): (−.5, no) (.5, yes) (.5, yes) (1, yes) (1, yes) (0, −).
        let expected = 3.0 / 3.5;
        assert!((dpo_accuracy(&s, &mask, &a, 4).double_value(&[]) - expected).abs() < 1e-6);
        let abs = dpo_abs_accuracy(
            &Tensor::from_slice(&[1.0f32, 1.0, -1.0, 0.0]).view([-1, 1]),
            &mask,
            &a,
        );
        assert_eq!(abs.double_value(&[]), 0.5);
    }
}

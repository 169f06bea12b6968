//! Online prompt filtering (paper §3.3, spec §5.1): train only on groups of medium difficulty.
use tch::{Kind, Tensor};

use super::config::FilterConfig;

/// Slack on the bounds so that a mean on a bound stays on it whatever the float width of the
/// scores (0.8 as f32 is 0.800000012).
const BOUND_SLACK: f64 = 1e-6;

/// Mean score of each group of `k` contiguous responses: `[B]` → `[B / k]`, in f64.
pub fn group_mean_scores(scores: &Tensor, k: i64) -> Tensor {
    scores
        .to_kind(Kind::Double)
        .view([-1, k])
        .mean_dim(1, false, Kind::Double)
}

/// Which groups to keep (spec §5.1): `lower ≤ mean_k acc_k ≤ upper`, both bounds inclusive;
/// with `drop_truncated`, also only groups none of whose responses was truncated (`truncated`:
/// `[B]` bool, needed only then). A disabled filter keeps every group. Returns `[B / k]` bool.
pub fn keep_groups(
    scores: &Tensor,
    truncated: Option<&Tensor>,
    k: i64,
    config: &FilterConfig,
) -> Tensor {
    let means = group_mean_scores(scores, k);
    if !config.enabled {
        return means.ones_like().to_kind(Kind::Bool);
    }
    let in_range = means
        .ge(config.lower - BOUND_SLACK)
        .logical_and(&means.le(config.upper + BOUND_SLACK));
    if !config.drop_truncated {
        return in_range;
    }
    let truncated = truncated.expect("drop_truncated needs the truncation flags");
    let any_truncated = truncated
        .to_kind(Kind::Bool)
        .view([-1, k])
        .any_dim(1, false);
    in_range.logical_and(&any_truncated.logical_not())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(
        scores: &[f32],
        k: i64,
        config: &FilterConfig,
        truncated: Option<&[bool]>,
    ) -> Vec<bool> {
        let truncated = truncated.map(Tensor::from_slice);
        Vec::<bool>::try_from(keep_groups(
            &Tensor::from_slice(scores),
            truncated.as_ref(),
            k,
            config,
        ))
        .unwrap()
    }

    #[test]
    fn bounds_are_inclusive() {
        let config = FilterConfig::default();
        // K = 4 binary: 0, 1, 2, 3, 4 correct.
        let scores = [
            0., 0., 0., 0., 1., 0., 0., 0., 1., 1., 0., 0., 1., 1., 1., 0., 1., 1., 1., 1.,
        ];
        assert_eq!(
            kept(&scores, 4, &config, None),
            [false, true, true, true, false]
        );
        // K = 5: means exactly 0.2 and 0.8 are kept; fractional code scores 0.8 too.
        let scores = [
            1., 0., 0., 0., 0., 1., 1., 1., 1., 0., 0.8, 0.8, 0.8, 0.8, 0.8,
        ];
        assert_eq!(kept(&scores, 5, &config, None), [true, true, true]);
        // K = 2 fractional: means 0.15 and 0.85 are out.
        assert_eq!(
            kept(&[0.3, 0.0, 0.9, 0.8], 2, &config, None),
            [false, false]
        );
    }

    #[test]
    fn truncation_and_disabled() {
        let scores = [1., 0., 1., 0.];
        let config = FilterConfig {
            drop_truncated: true,
            ..Default::default()
        };
        assert_eq!(
            kept(&scores, 2, &config, Some(&[false, true, false, false])),
            [false, true]
        );
        let config = FilterConfig {
            enabled: false,
            ..Default::default()
        };
        assert_eq!(kept(&[1., 1., 0., 0.], 2, &config, None), [true, true]);
    }
}

//! Online prompt filtering (paper §3.3, spec §5.1): train only on groups of medium difficulty.
use tch::{Device, Kind, Tensor};

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

/// What the filter makes of one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The group trains.
    Kept,
    /// Mean score below `lower`: the prompt is too hard for the policy now.
    TooHard,
    /// Mean score above `upper`: the prompt is too easy.
    TooEasy,
    /// In range, but a response was truncated and `drop_truncated` is set.
    Truncated,
}

/// The filter rule on one group (spec §5.1): `lower ≤ mean ≤ upper`, both bounds inclusive;
/// with `drop_truncated`, also no truncated response. A disabled filter keeps every group.
/// The one place the rule lives: [`keep_groups`] and the prompt scheduler both call it.
pub fn verdict(mean_score: f64, any_truncated: bool, config: &FilterConfig) -> Verdict {
    if !config.enabled {
        Verdict::Kept
    } else if mean_score < config.lower - BOUND_SLACK {
        Verdict::TooHard
    } else if mean_score > config.upper + BOUND_SLACK {
        Verdict::TooEasy
    } else if config.drop_truncated && any_truncated {
        Verdict::Truncated
    } else {
        Verdict::Kept
    }
}

/// Whether the filter keeps one group (see [`verdict`]).
pub fn keeps(mean_score: f64, any_truncated: bool, config: &FilterConfig) -> bool {
    verdict(mean_score, any_truncated, config) == Verdict::Kept
}

/// Which groups to keep, [`keeps`] applied to each group of `k` contiguous responses
/// (`truncated`: `[B]` bool, needed only with `drop_truncated`). Returns `[B / k]` bool on the
/// device of `scores`. The decisions are taken on the host: a handful of numbers per batch.
pub fn keep_groups(
    scores: &Tensor,
    truncated: Option<&Tensor>,
    k: i64,
    config: &FilterConfig,
) -> Tensor {
    let means = Vec::<f64>::try_from(group_mean_scores(scores, k).to_device(Device::Cpu))
        .expect("group means are f64");
    let any_truncated = match truncated {
        Some(truncated) if config.enabled && config.drop_truncated => Vec::<bool>::try_from(
            truncated
                .to_kind(Kind::Bool)
                .view([-1, k])
                .any_dim(1, false)
                .to_device(Device::Cpu),
        )
        .expect("truncation flags are bool"),
        None if config.enabled && config.drop_truncated => {
            panic!("drop_truncated needs the truncation flags")
        }
        _ => vec![false; means.len()],
    };
    let kept: Vec<bool> = means
        .iter()
        .zip(&any_truncated)
        .map(|(&mean, &any_truncated)| keeps(mean, any_truncated, config))
        .collect();
    Tensor::from_slice(&kept).to_device(scores.device())
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

    #[test]
    fn verdicts_on_single_groups() {
        let config = FilterConfig {
            drop_truncated: true,
            ..Default::default()
        };
        assert_eq!(verdict(0.0, false, &config), Verdict::TooHard);
        assert_eq!(verdict(0.19, false, &config), Verdict::TooHard);
        // The bounds, also as they come out of f32 scores.
        assert_eq!(verdict(0.2, false, &config), Verdict::Kept);
        assert_eq!(verdict(f64::from(0.8f32), false, &config), Verdict::Kept);
        assert_eq!(verdict(0.81, false, &config), Verdict::TooEasy);
        assert_eq!(verdict(0.5, true, &config), Verdict::Truncated);
        assert_eq!(verdict(1.0, true, &config), Verdict::TooEasy);
        assert!(keeps(0.5, false, &config) && !keeps(0.5, true, &config));
        let disabled = FilterConfig {
            enabled: false,
            ..config
        };
        assert!(keeps(0.0, true, &disabled));
    }
}

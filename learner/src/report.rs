//! What a finished run shows: PNG curves against step, `summary.json` and a closing table,
//! all from the records of `metrics.jsonl`.
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{LearnerError, Result};
use crate::plot::{line_chart, Series};
use crate::trainer::{Record, StepRecord};

/// `summary.json` of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Advantage estimator of the run (`prime` or `rloo`).
    pub estimator: String,
    /// Held-out accuracy before the first step (sampled at the evaluation temperature).
    pub start_heldout_accuracy: f64,
    /// Held-out accuracy after the last step.
    pub final_heldout_accuracy: f64,
    /// Greedy held-out accuracy before the first step, when evaluated.
    pub start_heldout_greedy_accuracy: Option<f64>,
    /// Greedy held-out accuracy after the last step, when evaluated.
    pub final_heldout_greedy_accuracy: Option<f64>,
    /// Held-out problems per evaluation.
    pub heldout_size: usize,
    /// Samples per problem and temperature of the sampled evaluation.
    pub heldout_samples: usize,
    /// Temperature of the sampled evaluation.
    pub heldout_temperature: f64,
    /// RL iterations done.
    pub steps: u64,
    /// Wall-clock seconds of the RL phase.
    pub wall_seconds: f64,
    /// Mean training reward (outcome score before filtering) over the first and last quarter
    /// of the steps.
    pub train_reward_first_quarter: f64,
    /// See `train_reward_first_quarter`.
    pub train_reward_last_quarter: f64,
    /// Mean filter pass rate.
    pub filter_pass_rate: f64,
    /// Mean PRM accuracy over the steps (0.5 = chance), on each new batch before the PRM's
    /// update on it.
    pub prm_accuracy: f64,
    /// Mean PRM loss on each new batch before its update (0.693 = chance).
    pub prm_loss: f64,
    /// Mean PRM ranking within groups on each new batch before its update (0.5 = chance),
    /// over the steps that measured it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prm_ranking: Option<f64>,
    /// Seconds spent in rollout, PRM update and policy update, summed over steps.
    pub seconds_rollout: f64,
    /// See `seconds_rollout`.
    pub seconds_prm: f64,
    /// See `seconds_rollout`.
    pub seconds_policy: f64,
}

fn steps(records: &[Record]) -> Vec<&StepRecord> {
    records
        .iter()
        .filter_map(|r| match r {
            Record::Step(s) => Some(s.as_ref()),
            Record::Eval { .. } => None,
        })
        .collect()
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, count) = values.fold((0.0, 0usize), |(s, c), v| (s + v, c + 1));
    if count == 0 {
        f64::NAN
    } else {
        sum / count as f64
    }
}

/// The summary of `records` (needs an evaluation at the start and one at the end).
pub fn summarize(
    records: &[Record],
    estimator: &str,
    samples: usize,
    temperature: f64,
) -> Result<Summary> {
    let evals: Vec<(u64, &crate::eval::Evaluation)> = records
        .iter()
        .filter_map(|r| match r {
            Record::Eval { step, evaluation } => Some((*step, evaluation)),
            Record::Step(_) => None,
        })
        .collect();
    let (Some(first), Some(last)) = (evals.first(), evals.last()) else {
        return Err(LearnerError::Data(
            "the run has no held-out evaluation to summarise".into(),
        ));
    };
    let steps = steps(records);
    let quarter = (steps.len() / 4).max(1);
    let reward = |s: &[&StepRecord]| mean(s.iter().map(|r| r.train_reward));
    Ok(Summary {
        estimator: estimator.to_string(),
        start_heldout_accuracy: first.1.accuracy,
        final_heldout_accuracy: last.1.accuracy,
        start_heldout_greedy_accuracy: first.1.greedy_accuracy,
        final_heldout_greedy_accuracy: last.1.greedy_accuracy,
        heldout_size: last.1.problems,
        heldout_samples: samples,
        heldout_temperature: temperature,
        steps: steps.last().map_or(0, |s| s.step),
        wall_seconds: steps.last().map_or(0.0, |s| s.wall_seconds),
        train_reward_first_quarter: reward(&steps[..quarter.min(steps.len())]),
        train_reward_last_quarter: reward(&steps[steps.len().saturating_sub(quarter)..]),
        filter_pass_rate: mean(steps.iter().map(|s| s.filter_pass_rate)),
        prm_accuracy: mean(steps.iter().map(|s| s.metrics.prm_new_batch_accuracy)),
        prm_loss: mean(steps.iter().map(|s| s.metrics.prm_new_batch_loss)),
        prm_ranking: Some(mean(
            steps.iter().filter_map(|s| s.metrics.prm_new_batch_ranking),
        ))
        .filter(|m| !m.is_nan()),
        seconds_rollout: steps.iter().map(|s| s.rollout_seconds).sum(),
        seconds_prm: steps.iter().map(|s| s.metrics.time_prm_s).sum(),
        seconds_policy: steps.iter().map(|s| s.metrics.time_policy_s).sum(),
    })
}

/// Writes the run's PNG curves into `dir`; a failed chart is logged, not fatal.
pub fn plot_run(dir: &Path, records: &[Record]) {
    let steps = steps(records);
    let points = |f: &dyn Fn(&StepRecord) -> f64| -> Vec<(f64, f64)> {
        steps.iter().map(|s| (s.step as f64, f(s))).collect()
    };
    let reward = points(&|s| s.train_reward);
    let pass_rate = points(&|s| s.filter_pass_rate);
    let prm_accuracy = points(&|s| s.metrics.prm_accuracy);
    let prm_loss = points(&|s| s.metrics.prm_new_batch_loss);
    let prm_new_accuracy = points(&|s| s.metrics.prm_new_batch_accuracy);
    let prm_ranking: Vec<(f64, f64)> = steps
        .iter()
        .filter_map(|s| Some((s.step as f64, s.metrics.prm_new_batch_ranking?)))
        .collect();
    let tokens = points(&|s| s.tokens_per_second);
    let rollout = points(&|s| s.rollout_seconds);
    let prm_time = points(&|s| s.metrics.time_prm_s);
    let policy_time = points(&|s| s.metrics.time_policy_s);
    let (mut sampled, mut greedy) = (Vec::new(), Vec::new());
    for record in records {
        if let Record::Eval { step, evaluation } = record {
            sampled.push((*step as f64, evaluation.accuracy));
            if let Some(g) = evaluation.greedy_accuracy {
                greedy.push((*step as f64, g));
            }
        }
    }
    let charts: [(&str, &str, &str, Vec<Series<'_>>); 6] = [
        (
            "train_reward.png",
            "Training reward (mean score of sampled groups, before filtering)",
            "reward",
            vec![Series {
                name: "train reward",
                points: &reward,
            }],
        ),
        (
            "filter_pass_rate.png",
            "Filter pass rate",
            "share of groups kept",
            vec![Series {
                name: "pass rate",
                points: &pass_rate,
            }],
        ),
        (
            "prm.png",
            "Implicit PRM on each new batch, before its update",
            "accuracy / loss",
            vec![
                Series {
                    name: "ranking within groups on the new batch",
                    points: &prm_ranking,
                },
                Series {
                    name: "accuracy on the new batch (dpo_acc)",
                    points: &prm_new_accuracy,
                },
                Series {
                    name: "loss on the new batch (BCE)",
                    points: &prm_loss,
                },
                Series {
                    name: "accuracy of the rewards used (single-forward)",
                    points: &prm_accuracy,
                },
            ],
        ),
        (
            "heldout_accuracy.png",
            "Held-out accuracy",
            "accuracy",
            vec![
                Series {
                    name: "sampled",
                    points: &sampled,
                },
                Series {
                    name: "greedy",
                    points: &greedy,
                },
            ],
        ),
        (
            "tokens_per_second.png",
            "Sampled tokens per second",
            "tokens/s",
            vec![Series {
                name: "tokens/s",
                points: &tokens,
            }],
        ),
        (
            "time_split.png",
            "Seconds per step by phase",
            "seconds",
            vec![
                Series {
                    name: "rollout",
                    points: &rollout,
                },
                Series {
                    name: "PRM update",
                    points: &prm_time,
                },
                Series {
                    name: "policy update",
                    points: &policy_time,
                },
            ],
        ),
    ];
    for (file, title, y_label, series) in charts {
        let series: Vec<Series<'_>> = series
            .into_iter()
            .filter(|s| !s.points.is_empty())
            .collect();
        if series.is_empty() {
            continue;
        }
        if let Err(e) = line_chart(&dir.join(file), title, "step", y_label, &series) {
            tracing::warn!("{e}");
        }
    }
}

/// The closing table printed at the end of a run.
pub fn summary_table(summary: &Summary) -> String {
    let percent = |v: f64| format!("{:.1}%", 100.0 * v);
    let optional = |v: Option<f64>| v.map_or("-".to_string(), percent);
    let rows = [
        ("estimator", summary.estimator.clone()),
        ("steps", summary.steps.to_string()),
        ("wall time", format!("{:.0} s", summary.wall_seconds)),
        (
            "held-out accuracy",
            format!(
                "{} -> {} ({} problems x {} samples, temperature {})",
                percent(summary.start_heldout_accuracy),
                percent(summary.final_heldout_accuracy),
                summary.heldout_size,
                summary.heldout_samples,
                summary.heldout_temperature
            ),
        ),
        (
            "held-out greedy",
            format!(
                "{} -> {}",
                optional(summary.start_heldout_greedy_accuracy),
                optional(summary.final_heldout_greedy_accuracy)
            ),
        ),
        (
            "train reward",
            format!(
                "{:.3} (first quarter) -> {:.3} (last quarter)",
                summary.train_reward_first_quarter, summary.train_reward_last_quarter
            ),
        ),
        ("filter pass rate", percent(summary.filter_pass_rate)),
        (
            "PRM on new batches",
            format!(
                "ranking {}, accuracy {:.3}, loss {:.3} (chance: 0.5, 0.5, 0.693)",
                summary
                    .prm_ranking
                    .map_or("-".to_string(), |r| format!("{r:.3}")),
                summary.prm_accuracy,
                summary.prm_loss
            ),
        ),
        (
            "time split",
            format!(
                "rollout {:.0} s, PRM {:.0} s, policy {:.0} s",
                summary.seconds_rollout, summary.seconds_prm, summary.seconds_policy
            ),
        ),
    ];
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("  {k:<width$}  {v}\n"))
        .collect()
}

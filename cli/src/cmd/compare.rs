//! `prime compare --run LABEL=DIR ... --out FILE.png`: held-out accuracy of several runs
//! against wall-clock seconds in one chart (RL runs and supervised runs alike), plus a table.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use prime_learner::plot::{line_chart, Series};
use prime_learner::sft::SftRecord;
use prime_learner::trainer::Record;

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// A run to draw, as LABEL=DIR: a `prime train` run dir, or a `prime sft` run dir (its
    /// `sft/metrics.jsonl` is read). Repeatable.
    #[arg(long = "run", value_name = "LABEL=DIR", required = true)]
    pub runs: Vec<String>,
    /// The PNG to write.
    #[arg(long)]
    pub out: PathBuf,
}

/// The metrics file of a run and the `(seconds, accuracy)` points of its held-out
/// evaluations.
fn accuracy_curve(dir: &Path) -> Result<(PathBuf, Vec<(f64, f64)>)> {
    let rl = dir.join("metrics.jsonl");
    let sft = dir.join("sft").join("metrics.jsonl");
    let path = if rl.exists() { rl } else { sft };
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut points = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Ok(Record::Eval { evaluation, .. }) = serde_json::from_str::<Record>(line) {
            points.push((evaluation.wall_seconds, evaluation.accuracy));
        } else if let Ok(record) = serde_json::from_str::<SftRecord>(line) {
            if let Some(accuracy) = record.heldout_accuracy {
                points.push((record.seconds, accuracy));
            }
        }
    }
    if points.is_empty() {
        bail!("{} holds no held-out evaluation", path.display());
    }
    Ok((path, points))
}

pub fn run(args: CompareArgs) -> Result<()> {
    let mut curves = Vec::new();
    for run in &args.runs {
        let Some((label, dir)) = run.split_once('=') else {
            bail!("--run {run:?}: expected LABEL=DIR");
        };
        let (path, points) = accuracy_curve(Path::new(dir))?;
        prime_check::path::distinct("--run", &path, "--out", &args.out)?;
        curves.push((label.to_string(), points));
    }
    let series: Vec<Series<'_>> = curves
        .iter()
        .map(|(label, points)| Series {
            name: label,
            points,
        })
        .collect();
    // Drawn aside and moved onto --out once complete.
    prime_check::path::replace_with(&args.out, |path| -> Result<()> {
        line_chart(
            path,
            "Held-out accuracy from the same start",
            "seconds",
            "accuracy",
            &series,
        )?;
        Ok(())
    })?;
    for (label, points) in &curves {
        let (first, last) = (points[0], points[points.len() - 1]);
        println!(
            "{label}: {:.1}% -> {:.1}% in {:.0} s ({} evaluations)",
            100.0 * first.1,
            100.0 * last.1,
            last.0 - first.0,
            points.len()
        );
    }
    println!("{}", args.out.display());
    Ok(())
}

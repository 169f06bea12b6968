//! Progress bars on stderr for long work.
use indicatif::{ProgressBar, ProgressStyle};

/// A bar counting `total` items, labelled `what`; hidden when stderr is not a terminal.
pub fn progress_bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// A bar over training steps with a free-form status message after it.
pub fn step_bar(total: u64, label: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{label} [{{bar:30}}] step {{pos}}/{{len}} {{msg}} [{{elapsed}}]"
        ))
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}

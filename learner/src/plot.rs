//! PNG line charts of run curves (loss, accuracy) with plotters.
use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::error::LearnerError;

/// Registers the chart font once: `$PRIME_FONT` (a TrueType file) when set, else DejaVu Sans
/// compiled into the binary, so that a container image without fonts still writes plots.
fn ensure_font() -> Result<(), LearnerError> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let (name, bytes): (String, &'static [u8]) = match std::env::var("PRIME_FONT") {
            Ok(path) if !path.is_empty() => {
                let bytes =
                    std::fs::read(&path).map_err(|e| format!("$PRIME_FONT = {path}: {e}"))?;
                (path, Box::leak(bytes.into_boxed_slice()))
            }
            _ => ("the embedded DejaVu Sans".into(), dejavu::sans::regular()),
        };
        register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{name}: not a usable TrueType font"))
    })
    .clone()
    .map_err(LearnerError::Plot)
}

/// One named curve of `(x, y)` points.
pub struct Series<'a> {
    pub name: &'a str,
    pub points: &'a [(f64, f64)],
}

/// Draws `series` as lines into a 900x540 PNG at `path`.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series<'_>],
) -> Result<(), LearnerError> {
    ensure_font()?;
    let err = |e: &dyn std::fmt::Display| LearnerError::Plot(format!("{}: {e}", path.display()));
    let all = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return Err(LearnerError::Plot(format!(
            "{}: nothing to plot",
            path.display()
        )));
    }
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let x1 = if x1 > x0 { x1 } else { x0 + 1.0 };
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .map_err(|e| err(&e))?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|e| err(&e))?
            .label(s.name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Labels are drawn with the compiled-in font (no font file on the host is read unless
    /// `$PRIME_FONT` says so): a chart whose title differs is a different image.
    #[test]
    fn charts_are_labelled_with_the_embedded_font() {
        if std::env::var_os("PRIME_FONT").is_some() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let points = [(0.0, 0.1), (1.0, 0.4), (2.0, 0.3)];
        let draw = |name: &str, title: &str| {
            let path = dir.path().join(name);
            let series = [Series {
                name: "accuracy",
                points: &points,
            }];
            line_chart(&path, title, "step", "accuracy", &series).unwrap();
            std::fs::read(path).unwrap()
        };
        let a = draw("a.png", "held-out accuracy");
        let b = draw("b.png", "held-out accuracy");
        let c = draw("c.png", "a different title");
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}

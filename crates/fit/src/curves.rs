//! `curves.png`: loss and accuracy (training and validation) and the learning rate, per epoch,
//! redrawn at every epoch end so a run in progress can be looked at.

use crate::logs::EpochLogs;
use plotters::prelude::*;
use std::path::Path;

const FONT: &str = "sans-serif";

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // DejaVu Sans, embedded: no system fonts needed (the runtime image has none).
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
    });
}

/// A named line of (epoch, value) points.
type Series<'a> = (&'a str, Vec<(f64, f64)>, RGBColor);

/// Why the picture could not be drawn (plotters' error, whatever its backend).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DrawError(Box<dyn std::error::Error + Send + Sync>);

impl DrawError {
    fn of(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        DrawError(Box::new(e))
    }
}

/// One panel: a title and its series.
fn panel(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    title: &str,
    series: &[Series],
    epochs: usize,
) -> Result<(), DrawError> {
    let ys: Vec<f64> =
        series.iter().flat_map(|(_, p, _)| p.iter().map(|&(_, y)| y)).filter(|y| y.is_finite()).collect();
    let (lo, hi) = ys.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &y| (a.min(y), b.max(y)));
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    // A flat series (a constant learning rate) still gets a readable band around it.
    let pad = if hi - lo > hi.abs() * 1e-3 { (hi - lo) * 0.08 } else { hi.abs() * 0.1 }.max(1e-9);
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0.5f64..(epochs.max(1) as f64 + 0.5), (lo - pad)..(hi + pad))
        .map_err(DrawError::of)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .x_labels(epochs.clamp(2, 10))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| if hi.abs() >= 0.01 { format!("{y:.3}") } else { format!("{y:.2e}") })
        .label_style((FONT, 14))
        .draw()
        .map_err(DrawError::of)?;
    for (name, points, color) in series {
        if points.is_empty() {
            continue;
        }
        let style = ShapeStyle::from(*color).stroke_width(3);
        chart
            .draw_series(LineSeries::new(points.clone(), style))
            .map_err(DrawError::of)?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled()))).map_err(DrawError::of)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .draw()
        .map_err(DrawError::of)
}

/// Draws the history into `path` (PNG, 1500 x 450).
pub fn draw(path: &Path, history: &[EpochLogs]) -> Result<(), DrawError> {
    register_font();
    let root = BitMapBackend::new(path, (1500, 450)).into_drawing_area();
    root.fill(&WHITE).map_err(DrawError::of)?;
    let areas = root.split_evenly((1, 3));
    let pts = |f: &dyn Fn(&EpochLogs) -> Option<f32>| -> Vec<(f64, f64)> {
        history.iter().filter_map(|l| f(l).map(|v| (l.epoch as f64 + 1.0, f64::from(v)))).collect()
    };
    let n = history.last().map_or(1, |l| l.epoch + 1);
    let (train, val) = (RGBColor(31, 119, 180), RGBColor(255, 127, 14));
    panel(
        &areas[0],
        "loss",
        &[("training", pts(&|l| Some(l.loss)), train), ("validation", pts(&|l| l.val_loss), val)],
        n,
    )?;
    panel(
        &areas[1],
        "accuracy",
        &[("training", pts(&|l| l.accuracy), train), ("validation", pts(&|l| l.val_accuracy), val)],
        n,
    )?;
    panel(
        &areas[2],
        "learning rate (next step)",
        &[("learning rate", pts(&|l| Some(l.learning_rate)), RGBColor(44, 160, 44))],
        n,
    )?;
    root.present().map_err(DrawError::of)
}

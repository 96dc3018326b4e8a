//! The win-rate bar chart: one bar per subset and one for all prompts, with the 95% interval
//! as error bars and the 50% line. Text uses DejaVu Sans embedded in the binary, so the chart
//! renders the same on a machine without system fonts.
use crate::error::{EvalError, Result};
use crate::stats::Tally;
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

pub(crate) const FONT: &str = "sans-serif";

pub(crate) fn register_font() -> Result<()> {
    static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok =
        *ONCE.get_or_init(|| plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok());
    if ok {
        Ok(())
    } else {
        Err(EvalError::Plot("the embedded font did not load".into()))
    }
}

/// Draws `groups` (label, tally) as bars in percent, into a PNG at `path`.
pub fn win_rate_chart(path: &Path, title: &str, groups: &[(String, Tally)]) -> Result<()> {
    register_font()?;
    draw(path, title, groups).map_err(|e| EvalError::Plot(format!("{}: {e}", path.display())))
}

fn draw(path: &Path, title: &str, groups: &[(String, Tally)]) -> std::result::Result<(), Box<dyn std::error::Error>> {
    if groups.is_empty() {
        return Err("nothing to plot".into());
    }
    let k = groups.len() as i32;
    let width = (160 * groups.len() as u32 + 140).max(640);
    let root = BitMapBackend::new(path, (width, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 20))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d((0..k - 1).into_segmented(), 0.0..112.0f64)?;
    let names: Vec<String> = groups.iter().map(|(n, t)| format!("{n} (n={})", t.n)).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups.len())
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => names.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .y_labels(12)
        .max_light_lines(1)
        .y_label_formatter(&|y| if *y <= 100.0 { format!("{y:.0}%") } else { String::new() })
        .y_desc("win rate against the baseline")
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .draw()?;
    let subset_colour = RGBColor(100, 149, 214);
    let overall_colour = RGBColor(35, 70, 140);
    chart.draw_series(groups.iter().enumerate().map(|(i, (name, t))| {
        let colour = if name == "overall" { overall_colour } else { subset_colour };
        let v = if t.win_rate.is_finite() { t.win_rate * 100.0 } else { 0.0 };
        let mut r = Rectangle::new(
            [(SegmentValue::Exact(i as i32), 0.0), (SegmentValue::Exact(i as i32 + 1), v)],
            colour.filled(),
        );
        r.set_margin(0, 0, 22, 22);
        r
    }))?;
    chart.draw_series(LineSeries::new(
        [(SegmentValue::Exact(0), 50.0), (SegmentValue::Last, 50.0)],
        RED.mix(0.7).stroke_width(2),
    ))?;
    chart.draw_series(groups.iter().enumerate().map(|(i, (_, t))| {
        ErrorBar::new_vertical(
            SegmentValue::CenterOf(i as i32),
            t.ci_low * 100.0,
            if t.win_rate.is_finite() { t.win_rate * 100.0 } else { 0.0 },
            t.ci_high * 100.0,
            BLACK.stroke_width(2),
            14,
        )
    }))?;
    let label_style = TextStyle::from((FONT, 14).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    chart.draw_series(groups.iter().enumerate().map(|(i, (_, t))| {
        Text::new(
            format!("{:.1}%", t.win_rate * 100.0),
            (SegmentValue::CenterOf(i as i32), (t.ci_high * 100.0 + 1.0).min(111.0)),
            label_style.clone(),
        )
    }))?;
    root.present()?;
    Ok(())
}

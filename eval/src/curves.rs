//! Training curves from the learner's `steps.jsonl`: reward, self-reward, and the KL of each
//! role against the step, one line per run, as a 2 x 2 PNG.
use crate::error::{EvalError, Result};
use plotters::prelude::*;
use std::path::Path;

/// (step, reward mean, self-reward mean, solver KL, challenger KL) per logged step.
pub fn read_steps(path: &Path) -> Result<Vec<[f64; 5]>> {
    let text = std::fs::read_to_string(path).map_err(|e| EvalError::Plot(format!("{}: {e}", path.display())))?;
    let mut out = vec![];
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| EvalError::Plot(format!("{} line {}: {e}", path.display(), i + 1)))?;
        let s = &v["stats"];
        let f = |x: &serde_json::Value| x.as_f64().unwrap_or(f64::NAN);
        out.push([
            f(&s["step"]),
            f(&s["reward"]["mean"]),
            f(&s["self_reward"]["mean"]),
            f(&s["kl_solver"]),
            f(&s["kl_challenger"]),
        ]);
    }
    if out.is_empty() {
        return Err(EvalError::Plot(format!("{} has no steps", path.display())));
    }
    Ok(out)
}

/// Draws the curves of labelled runs into `out`.
pub fn training_curves(runs: &[(String, Vec<[f64; 5]>)], out: &Path) -> Result<()> {
    crate::plot::register_font()?;
    draw(runs, out).map_err(|e| EvalError::Plot(format!("{}: {e}", out.display())))
}

fn draw(runs: &[(String, Vec<[f64; 5]>)], out: &Path) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::new(out, (1100, 760)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((2, 2));
    let titles = [
        "reward R (mean)",
        "self-reward R_Q (mean)",
        "KL solver (k3, per sequence)",
        "KL challenger (k3, per sequence)",
    ];
    let max_step = runs.iter().flat_map(|(_, r)| r.iter().map(|x| x[0])).fold(1.0, f64::max);
    for (k, panel) in panels.iter().enumerate() {
        let vals: Vec<f64> =
            runs.iter().flat_map(|(_, r)| r.iter().map(|x| x[k + 1])).filter(|v| v.is_finite()).collect();
        let (lo, hi) = vals.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(*v), b.max(*v)));
        let (lo, hi) = if lo.is_finite() && hi > lo { (lo, hi) } else { (lo.min(0.0) - 1.0, hi.max(0.0) + 1.0) };
        let pad = (hi - lo) * 0.08;
        let mut chart = ChartBuilder::on(panel)
            .caption(titles[k], (crate::plot::FONT, 18))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..max_step, (lo - pad)..(hi + pad))?;
        chart.configure_mesh().x_desc("step").label_style((crate::plot::FONT, 12)).draw()?;
        for (i, (label, rows)) in runs.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(rows.iter().map(|r| (r[0], r[k + 1])), color.stroke_width(2)))?
                .label(label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .label_font((crate::plot::FONT, 12))
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

//! `upcycle report`: pictures and a Markdown summary of finished (or running) runs, from
//! their `metrics.jsonl`, `train.yaml`, checkpoints and `eval-*/results.json`.
//!
//! | file | what |
//! |---|---|
//! | `training.png` | loss parts (train, dev), dev CER, learning rate, gradient norm, frames/s, memory; for MoE runs the balance and z losses and the routers' balance |
//! | `routing.png` | MoE runs: one heatmap per layer, step x expert, colour = share of token copies |
//! | `compare.png` | several runs: dev CER against wall time and against steps |
//! | `summary.md` | config, parameters (total, active), final metrics per decoding mode, time |
//!
//! With several runs each gets its own folder `OUT/<name>/`, and `OUT/` holds the
//! comparison and one summary of all.

use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::Value;

use crate::inspect::RunRow;
use crate::metrics;

/// What `upcycle report` was asked to do.
#[derive(Debug, Clone)]
pub struct ReportOptions {
    /// The runs, in legend order.
    pub runs: Vec<RunRow>,
    /// Output folder (created).
    pub out: PathBuf,
    /// `(child, parent)` names: the child started from the parent's last checkpoint, so
    /// its steps and wall time are drawn after the parent's (the UME comparison counts
    /// the parent's cost).
    pub after: Vec<(String, String)>,
}

/// One run's metrics, split into training and evaluation lines.
struct Run {
    name: String,
    dir: PathBuf,
    train: Vec<Value>,
    dev: Vec<Value>,
    /// Steps and seconds spent before this run (its parent's, with `after`).
    offset: (f64, f64),
}

impl Run {
    fn load(row: &RunRow) -> Result<Self> {
        let lines = metrics::read(&row.dir)?;
        let (dev, train): (Vec<Value>, Vec<Value>) =
            lines.into_iter().partition(|l| l.get("dev_cer").is_some());
        let train: Vec<Value> = train
            .into_iter()
            .filter(|l| l.get("loss").is_some())
            .collect();
        if train.is_empty() && dev.is_empty() {
            bail!(
                "{}: no training or evaluation line yet (the run has not logged a step)",
                row.dir.join(metrics::FILE).display()
            );
        }
        Ok(Self {
            name: row.name.clone(),
            dir: row.dir.clone(),
            train,
            dev,
            offset: (0.0, 0.0),
        })
    }

    fn is_moe(&self) -> bool {
        self.train.iter().any(|l| l.get("moe").is_some())
    }

    fn last_step(&self) -> f64 {
        self.train
            .iter()
            .chain(&self.dev)
            .filter_map(|l| l["step"].as_f64())
            .fold(0.0, f64::max)
    }

    /// The offset of the axis `x` (`step` or `elapsed_s`).
    fn offset_of(&self, x: &str) -> f64 {
        if x == "step" {
            self.offset.0
        } else {
            self.offset.1
        }
    }

    fn seconds(&self) -> f64 {
        self.train
            .iter()
            .chain(&self.dev)
            .filter_map(|l| l["elapsed_s"].as_f64())
            .fold(0.0, f64::max)
    }
}

/// `(x, y)` of every line holding both keys.
fn points(lines: &[Value], x: &str, y: &str) -> Vec<(f64, f64)> {
    lines
        .iter()
        .filter_map(|l| Some((l[x].as_f64()?, l[y].as_f64()?)))
        .collect()
}

/// Writes the report of `opts.runs` into `opts.out`; returns the files written.
pub fn report(opts: &ReportOptions) -> Result<Vec<PathBuf>> {
    if opts.runs.is_empty() {
        bail!("no run given: `upcycle report RUN_DIR [NAME=RUN_DIR ...]`");
    }
    for (i, r) in opts.runs.iter().enumerate() {
        if opts.runs[..i].iter().any(|o| o.name == r.name) {
            bail!(
                "two runs are named {:?}: name them apart, e.g. dense={} upcycled=...",
                r.name,
                r.dir.display()
            );
        }
    }
    let mut runs = opts
        .runs
        .iter()
        .map(Run::load)
        .collect::<Result<Vec<_>>>()?;
    for (child, parent) in &opts.after {
        let find = |n: &str| {
            runs.iter().position(|r| r.name == n).ok_or_else(|| {
                anyhow!("--after {child}={parent}: no run is named {n:?} (name runs NAME=RUN_DIR)")
            })
        };
        let (c, p) = (find(child)?, find(parent)?);
        // A parent drawn after its own parent (an earlier --after) carries that on.
        let parent = &runs[p];
        runs[c].offset = (
            parent.offset.0 + parent.last_step(),
            parent.offset.1 + parent.seconds(),
        );
    }
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    register_font();
    let mut written = Vec::new();
    let several = runs.len() > 1;
    for run in &runs {
        let dir = if several {
            opts.out.join(&run.name)
        } else {
            opts.out.clone()
        };
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("training.png");
        training_plot(run, &path).with_context(|| format!("drawing {}", path.display()))?;
        written.push(path);
        if run.is_moe() {
            let path = dir.join("routing.png");
            routing_plot(run, &path).with_context(|| format!("drawing {}", path.display()))?;
            written.push(path);
        }
    }
    if several {
        let path = opts.out.join("compare.png");
        compare_plot(&runs, &opts.after, &path)
            .with_context(|| format!("drawing {}", path.display()))?;
        written.push(path);
    }
    let path = opts.out.join("summary.md");
    std::fs::write(&path, summary(&runs, &opts.after)?)
        .with_context(|| format!("writing {}", path.display()))?;
    written.push(path);
    Ok(written)
}

// ---------------------------------------------------------------- drawing

/// The font every plot uses, shipped with the crate (no system fonts needed).
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans-subset.ttf");

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let parsed = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
        assert!(parsed.is_ok(), "the shipped font parses");
    });
}

/// Line colours (Tableau 10), in legend order.
const COLOURS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// A named line.
struct Series {
    label: String,
    points: Vec<(f64, f64)>,
}

impl Series {
    fn new(label: &str, points: Vec<(f64, f64)>) -> Self {
        Self {
            label: label.into(),
            points,
        }
    }
}

/// `lo..hi` padded by 5% (and widened when flat) so lines do not run along the frame.
fn padded(lo: f64, hi: f64, from_zero: bool) -> std::ops::Range<f64> {
    let (lo, hi) = if from_zero {
        (lo.min(0.0), hi)
    } else {
        (lo, hi)
    };
    let span = if hi > lo { hi - lo } else { hi.abs().max(1.0) };
    let lo = if from_zero && lo >= 0.0 {
        0.0
    } else {
        lo - 0.05 * span
    };
    lo..hi + 0.05 * span
}

/// Tick labels short enough for a small panel (1.2k, 3e-4, 0.25).
fn tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 10.0 {
        format!("{v:.0}")
    } else if a >= 0.01 {
        format!("{v:.2}")
    } else {
        // Two significant digits: 1.5e-3 and 2e-3 are different ticks.
        format!("{v:.1e}").replace(".0e", "e")
    }
}

/// One line chart in `area` (its x axis from 0 with `x_from_zero`); empty series are
/// left out, and a panel with none says so.
fn line_panel(
    area: &Area<'_>,
    title: &str,
    (x_desc, x_from_zero): (&str, bool),
    y_desc: &str,
    series: &[Series],
) -> Result<()> {
    let drawn: Vec<(usize, &Series)> = series
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.points.is_empty())
        .collect();
    let all = drawn.iter().flat_map(|(_, s)| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        if y.is_finite() {
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
        }
    }
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 17))
        .margin(8)
        .x_label_area_size(38)
        .y_label_area_size(58)
        .build_cartesian_2d(
            if drawn.is_empty() {
                0.0..1.0
            } else {
                padded(x0, x1, x_from_zero)
            },
            if drawn.is_empty() {
                0.0..1.0
            } else {
                padded(y0, y1, false)
            },
        )?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_labels(6)
        .y_labels(6)
        .x_label_formatter(&|v| tick(*v))
        .y_label_formatter(&|v| tick(*v))
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 14))
        .light_line_style(WHITE)
        .draw()?;
    if drawn.is_empty() {
        chart.draw_series(std::iter::once(Text::new(
            "no data in metrics.jsonl",
            (0.3, 0.5),
            ("sans-serif", 14),
        )))?;
        return Ok(());
    }
    for (i, s) in &drawn {
        let colour = COLOURS[i % COLOURS.len()];
        let style = colour.stroke_width(2);
        if s.points.len() == 1 {
            chart.draw_series(std::iter::once(Circle::new(
                s.points[0],
                3,
                colour.filled(),
            )))?;
        }
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), style))?
            .label(s.label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
            });
    }
    if drawn.len() > 1 {
        chart
            .configure_series_labels()
            .label_font(("sans-serif", 13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
    }
    Ok(())
}

/// The run's training curves, one panel each.
fn training_plot(run: &Run, path: &Path) -> Result<()> {
    let (t, d) = (&run.train, &run.dev);
    let mut panels: Vec<(&str, &str, Vec<Series>)> = vec![
        (
            "Loss",
            "loss",
            vec![
                Series::new("train", points(t, "step", "loss")),
                Series::new("train CTC", points(t, "step", "loss_ctc")),
                Series::new("train attention", points(t, "step", "loss_att")),
                Series::new("dev", points(d, "step", "dev_loss")),
            ],
        ),
        (
            "Dev CER (CTC greedy)",
            "CER %",
            vec![Series::new("dev CER", points(d, "step", "dev_cer"))],
        ),
        (
            "Learning rate",
            "lr",
            vec![Series::new("lr", points(t, "step", "lr"))],
        ),
        (
            "Gradient norm (before clipping)",
            "norm",
            vec![Series::new("grad norm", points(t, "step", "grad_norm"))],
        ),
        (
            "Throughput",
            "frames/s",
            vec![Series::new("frames/s", points(t, "step", "frames_per_s"))],
        ),
        (
            "Peak memory (resident)",
            "MiB",
            vec![Series::new("peak RSS", points(t, "step", "peak_rss_mib"))],
        ),
    ];
    if run.is_moe() {
        panels.push((
            "MoE auxiliary losses",
            "loss",
            vec![
                Series::new("balance", points(t, "step", "loss_balance")),
                Series::new("router z", points(t, "step", "loss_z")),
                Series::new("distillation", points(t, "step", "loss_distill")),
            ],
        ));
        // Per logged step, every layer's busiest expert over an even share.
        let balance: Vec<(f64, Vec<f64>)> = t
            .iter()
            .filter_map(|l| {
                let v: Vec<f64> = metrics::moe_loads(l)
                    .iter()
                    .map(|(_, load)| metrics::max_over_even(load))
                    .collect();
                (!v.is_empty()).then_some((l["step"].as_f64()?, v))
            })
            .collect();
        let worst = balance
            .iter()
            .map(|(s, v)| (*s, v.iter().copied().fold(0.0, f64::max)))
            .collect();
        let mean = balance
            .iter()
            .map(|(s, v)| (*s, v.iter().sum::<f64>() / v.len() as f64))
            .collect();
        panels.push((
            "Router balance (1 = even)",
            "busiest expert / even share",
            vec![
                Series::new("worst layer", worst),
                Series::new("mean over layers", mean),
            ],
        ));
    }
    let rows = panels.len().div_ceil(2);
    let root = BitMapBackend::new(path, (1200, 330 * rows as u32 + 40)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!("{}: training ({})", run.name, run.dir.display()),
        ("sans-serif", 22),
    )?;
    for (area, (title, y_desc, series)) in root.split_evenly((rows, 2)).iter().zip(&panels) {
        line_panel(area, title, ("step", true), y_desc, series)?;
    }
    root.present()?;
    Ok(())
}

/// Short panel titles for MoE layer names.
fn short_layer(name: &str) -> String {
    name.replace("encoder.encoders.", "encoder ")
        .replace("decoder.left_decoder.decoders.", "left decoder ")
        .replace("decoder.right_decoder.decoders.", "right decoder ")
        .replace(".feed_forward_macaron", " macaron FFN")
        .replace(".feed_forward", " FFN")
}

/// Forward order: encoder blocks by number (macaron FFN first), then the decoders.
fn layer_order(name: &str) -> (bool, Vec<u64>, bool, String) {
    let numbers = name
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect();
    (
        name.starts_with("decoder"),
        numbers,
        !name.contains("macaron"),
        name.to_string(),
    )
}

/// A heatmap column: the log window's first and last step, each expert's share.
type Cell = (f64, f64, Vec<f64>);

/// One heatmap per MoE layer: x = step (each cell spans its log window), y = expert,
/// colour = the expert's share of the layer's token copies, on one scale for all.
fn routing_plot(run: &Run, path: &Path) -> Result<()> {
    let mut layers: Vec<(String, Vec<Cell>)> = Vec::new();
    let mut prev = 0.0;
    for l in &run.train {
        let Some(step) = l["step"].as_f64() else {
            continue;
        };
        for (name, load) in metrics::moe_loads(l) {
            let cells = match layers.iter_mut().find(|(n, _)| *n == name) {
                Some((_, c)) => c,
                None => {
                    layers.push((name, Vec::new()));
                    &mut layers.last_mut().expect("just pushed").1
                }
            };
            cells.push((prev, step, load));
        }
        prev = step;
    }
    layers.sort_by_key(|(n, _)| layer_order(n));
    let experts = layers
        .iter()
        .flat_map(|(_, c)| c.iter().map(|(_, _, l)| l.len()))
        .max()
        .unwrap_or(1);
    let vmax = layers
        .iter()
        .flat_map(|(_, c)| c.iter().flat_map(|(_, _, l)| l.iter().copied()))
        .fold(1.0 / experts as f64, f64::max);
    let x1 = run.last_step().max(1.0);
    let cols = layers.len().clamp(1, 4);
    let rows = layers.len().div_ceil(cols).max(1);
    let (w, h) = (cols as u32 * 290 + 120, rows as u32 * 210 + 60);
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!(
            "{}: expert load per MoE layer (share of token copies; even = 1/{experts} = {:.3}, the white line)",
            run.name,
            1.0 / experts as f64
        ),
        ("sans-serif", 20),
    )?;
    let (grid, bar) = root.split_horizontally(w - 120);
    let colour = |v: f64| {
        let c = ViridisRGB::get_color_normalized(v as f32, 0.0, vmax as f32);
        RGBColor(c.0, c.1, c.2)
    };
    for (area, (name, cells)) in grid.split_evenly((rows, cols)).iter().zip(&layers) {
        let mut chart = ChartBuilder::on(area)
            .caption(short_layer(name), ("sans-serif", 15))
            .margin(6)
            .x_label_area_size(34)
            .y_label_area_size(44)
            .build_cartesian_2d(0.0..x1, -0.5..experts as f64 - 0.5)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("step")
            .y_desc("expert")
            .x_labels(5)
            .y_labels(experts.min(8))
            .x_label_formatter(&|v| tick(*v))
            .y_label_formatter(&|v| format!("{}", v.round()))
            .label_style(("sans-serif", 12))
            .axis_desc_style(("sans-serif", 13))
            .draw()?;
        chart.draw_series(cells.iter().flat_map(|(a, b, load)| {
            load.iter().enumerate().map(move |(e, &v)| {
                Rectangle::new(
                    [(*a, e as f64 - 0.5), (*b, e as f64 + 0.5)],
                    colour(v).filled(),
                )
            })
        }))?;
    }
    // The colour scale.
    let mut scale = ChartBuilder::on(&bar)
        .caption("share", ("sans-serif", 14))
        .margin_top(10)
        .margin_bottom(50)
        .margin_left(20)
        .margin_right(10)
        .right_y_label_area_size(48)
        .build_cartesian_2d(0.0..1.0, 0.0..vmax)?;
    scale
        .configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_labels(8)
        .y_label_formatter(&|v| format!("{v:.2}"))
        .label_style(("sans-serif", 12))
        .axis_desc_style(("sans-serif", 13))
        .draw()?;
    let n = 100;
    scale.draw_series((0..n).map(|i| {
        let (a, b) = (vmax * i as f64 / n as f64, vmax * (i + 1) as f64 / n as f64);
        Rectangle::new([(0.0, a), (1.0, b)], colour((a + b) / 2.0).filled())
    }))?;
    let even = 1.0 / experts as f64;
    scale.draw_series(std::iter::once(PathElement::new(
        vec![(0.0, even), (1.0, even)],
        WHITE.stroke_width(2),
    )))?;
    root.present()?;
    Ok(())
}

/// Dev CER of every run against wall time and against steps (children drawn after
/// their parents, starting from the parent's last point).
fn compare_plot(runs: &[Run], after: &[(String, String)], path: &Path) -> Result<()> {
    let curve = |r: &Run, x: &str, scale: f64| -> Vec<(f64, f64)> {
        let offset = r.offset_of(x);
        let mut p: Vec<(f64, f64)> = points(&r.dev, x, "dev_cer")
            .into_iter()
            .map(|(v, y)| ((v + offset) / scale, y))
            .collect();
        // A child's line starts where its parent's ends.
        if let Some((_, parent)) = after.iter().find(|(c, _)| *c == r.name) {
            if let Some(par) = runs.iter().find(|p| p.name == *parent) {
                let last = points(&par.dev, x, "dev_cer")
                    .into_iter()
                    .map(|(v, y)| ((v + par.offset_of(x)) / scale, y))
                    .next_back();
                p.splice(0..0, last);
            }
        }
        p
    };
    let by_time: Vec<Series> = runs
        .iter()
        .map(|r| Series::new(&r.name, curve(r, "elapsed_s", 60.0)))
        .collect();
    let by_step: Vec<Series> = runs
        .iter()
        .map(|r| Series::new(&r.name, curve(r, "step", 1.0)))
        .collect();
    // The second half of the time axis on its own scale, where the runs' ends differ
    // by a few points that the first minutes' high CER would flatten.
    let x_max = by_time
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(0.0, f64::max);
    let tail: Vec<Series> = by_time
        .iter()
        .map(|s| Series {
            label: s.label.clone(),
            points: s
                .points
                .iter()
                .copied()
                .filter(|p| p.0 >= x_max / 2.0)
                .collect(),
        })
        .collect();
    let root = BitMapBackend::new(path, (1500, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled("Dev CER (CTC greedy) of the runs", ("sans-serif", 22))?;
    let panels = root.split_evenly((1, 3));
    let time_desc = if after.is_empty() {
        "wall time, minutes".to_string()
    } else {
        "wall time, minutes (children after their parents)".to_string()
    };
    line_panel(
        &panels[0],
        "against wall time",
        (&time_desc, true),
        "CER %",
        &by_time,
    )?;
    line_panel(
        &panels[1],
        "against wall time, second half",
        (&time_desc, false),
        "CER %",
        &tail,
    )?;
    let right = &panels[2];
    line_panel(
        right,
        "against optimizer steps",
        ("step", true),
        "CER %",
        &by_step,
    )?;
    root.present()?;
    Ok(())
}

// ---------------------------------------------------------------- summary

/// A `train.yaml` value by path (`encoder_conf.num_blocks`), as text; `-` when absent.
fn yaml_at(config: &serde_yaml::Value, path: &str) -> String {
    let v = path
        .split('.')
        .try_fold(config, |v, k| v.get(k))
        .cloned()
        .unwrap_or(serde_yaml::Value::Null);
    match v {
        serde_yaml::Value::Null => "-".into(),
        serde_yaml::Value::String(s) => s,
        other => serde_yaml::to_string(&other)
            .unwrap_or_default()
            .trim()
            .replace('\n', " "),
    }
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

/// Test-set results of `upcycle eval` found in the run: `(split, results)`.
fn eval_results(dir: &Path) -> Vec<(String, Vec<Value>)> {
    let mut found: Vec<(String, Vec<Value>)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let split = name.strip_prefix("eval-")?.to_string();
            let text = std::fs::read_to_string(e.path().join("results.json")).ok()?;
            Some((split, serde_json::from_str::<Vec<Value>>(&text).ok()?))
        })
        .collect();
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found
}

/// Parameters (total, active) of the run's latest checkpoint, when it has one.
fn parameters(dir: &Path) -> Option<(i64, i64)> {
    let ckpt = crate::checkpoint::resolve(&dir.join("checkpoints")).ok()?;
    crate::inspect::parameter_counts(&ckpt).ok()
}

fn summary(runs: &[Run], after: &[(String, String)]) -> Result<String> {
    let mut out = String::from("# Run report\n\n");
    let params: Vec<Option<(i64, i64)>> = runs.iter().map(|r| parameters(&r.dir)).collect();
    out += &comparison_table(runs, &params);
    for (child, parent) in after {
        out += &format!("\n{child} started from {parent}'s last checkpoint: the plots draw it after {parent}.\n");
    }
    for (r, p) in runs.iter().zip(&params) {
        out += &format!("\n## {} (`{}`)\n\n", r.name, r.dir.display());
        let yaml_path = r.dir.join("train.yaml");
        let config: serde_yaml::Value = std::fs::read_to_string(&yaml_path)
            .ok()
            .and_then(|t| serde_yaml::from_str(&t).ok())
            .unwrap_or(serde_yaml::Value::Null);
        out += &run_settings(&config, *p);
        out += &run_progress(r);
        out += &run_evaluations(r);
        if r.is_moe() {
            out += &run_routing(r);
        }
        if config.is_mapping() {
            out += &format!(
                "\n<details><summary>train.yaml</summary>\n\n```yaml\n{}```\n</details>\n",
                serde_yaml::to_string(&config)?
            );
        }
    }
    Ok(out)
}

/// The best dev CER of a run and its step.
fn best_dev_cer(r: &Run) -> Option<(f64, f64)> {
    r.dev
        .iter()
        .filter_map(|l| Some((l["dev_cer"].as_f64()?, l["step"].as_f64()?)))
        .min_by(|a, b| a.0.total_cmp(&b.0))
}

/// One line per run: size, steps, time, dev and test CER.
fn comparison_table(runs: &[Run], params: &[Option<(i64, i64)>]) -> String {
    let best = best_dev_cer;
    let mut out = String::new();
    out += "| run | params | active | steps | train min | last dev CER | best dev CER (step) | test CER, attention rescoring |\n|---|---:|---:|---:|---:|---:|---:|---:|\n";
    for (r, p) in runs.iter().zip(params) {
        let test = eval_results(&r.dir)
            .into_iter()
            .find(|(s, _)| s == "test")
            .and_then(|(_, res)| {
                res.iter()
                    .find(|m| m["method"] == "attention_rescoring" && m["chunk"] == 0)
                    .and_then(|m| m["cer"].as_f64())
            });
        out += &format!(
            "| {} | {} | {} | {:.0} | {:.1} | {} | {} | {} |\n",
            r.name,
            p.map_or("-".into(), |p| format!("{:.2}M", p.0 as f64 / 1e6)),
            p.map_or("-".into(), |p| format!("{:.2}M", p.1 as f64 / 1e6)),
            r.last_step(),
            r.seconds() / 60.0,
            fmt_opt(r.dev.last().and_then(|l| l["dev_cer"].as_f64()), 2),
            best(r).map_or("-".into(), |(c, s)| format!("{c:.2} ({s:.0})")),
            fmt_opt(test, 2),
        );
    }
    out
}

/// A run's model, MoE, parameter, optimizer and batch settings (the table's first rows).
fn run_settings(config: &serde_yaml::Value, p: Option<(i64, i64)>) -> String {
    let c = |k: &str| yaml_at(config, k);
    let mut out = String::new();
    out += "| | |\n|---|---|\n";
    out += &format!(
        "| model | {} encoder ({} blocks, width {}, FFN {}), {} decoder ({} + {} blocks) |\n",
        c("encoder"),
        c("encoder_conf.num_blocks"),
        c("encoder_conf.output_size"),
        c("encoder_conf.linear_units"),
        c("decoder"),
        c("decoder_conf.num_blocks"),
        c("decoder_conf.r_num_blocks"),
    );
    if c("encoder_conf.mlp_type") == "moe" || c("decoder_conf.mlp_type") == "moe" {
        out += &format!(
            "| MoE | encoder {} ({} experts, top-{}), decoder {} ({} experts, top-{}); balance loss weight {} |\n",
            c("encoder_conf.mlp_type"),
            c("encoder_conf.n_expert"),
            c("encoder_conf.n_expert_activated"),
            c("decoder_conf.mlp_type"),
            c("decoder_conf.n_expert"),
            c("decoder_conf.n_expert_activated"),
            c("moe_conf.balance_loss_weight"),
        );
    }
    out += &format!(
        "| parameters | {} |\n",
        p.map_or("- (no checkpoint)".into(), |(t, a)| format!(
            "{t} total, {a} active per token"
        ))
    );
    out += &format!(
        "| optimizer | {} lr {}, {} (warm-up {} steps), grad clip {}, accum {} |\n",
        c("optim"),
        c("optim_conf.lr"),
        c("scheduler"),
        c("scheduler_conf.warmup_steps"),
        c("grad_clip"),
        c("accum_grad"),
    );
    out += &format!(
        "| batches | {} (size {}, max frames {}) |\n",
        c("dataset_conf.batch_conf.batch_type"),
        c("dataset_conf.batch_conf.batch_size"),
        c("dataset_conf.batch_conf.max_frames_in_batch"),
    );
    out
}

/// A run's speed, memory, final loss and dev CER rows.
fn run_progress(r: &Run) -> String {
    let best = best_dev_cer;
    let mut out = String::new();
    let fps: Vec<f64> = points(&r.train, "step", "frames_per_s")
        .into_iter()
        .map(|p| p.1)
        .collect();
    out += &format!(
        "| time | {:.0} steps in {:.1} min; mean {:.0} frames/s; peak memory {} MiB |\n",
        r.last_step(),
        r.seconds() / 60.0,
        fps.iter().sum::<f64>() / fps.len().max(1) as f64,
        fmt_opt(
            points(&r.train, "step", "peak_rss_mib")
                .iter()
                .map(|p| p.1)
                .reduce(f64::max),
            0
        ),
    );
    out += &format!(
        "| final train loss | {} (CTC {}, attention {}) |\n",
        fmt_opt(r.train.last().and_then(|l| l["loss"].as_f64()), 3),
        fmt_opt(r.train.last().and_then(|l| l["loss_ctc"].as_f64()), 3),
        fmt_opt(r.train.last().and_then(|l| l["loss_att"].as_f64()), 3),
    );
    out += &format!(
        "| dev CER (CTC greedy) | last {}, best {} |\n",
        fmt_opt(r.dev.last().and_then(|l| l["dev_cer"].as_f64()), 2),
        best(r).map_or("-".into(), |(c, s)| format!("{c:.2} at step {s:.0}")),
    );
    out
}

/// The `upcycle eval` results of a run, one table per split.
fn run_evaluations(r: &Run) -> String {
    let mut out = String::new();
    for (split, results) in eval_results(&r.dir) {
        out += &format!("\n`upcycle eval` on {split}:\n\n| method | chunk | CER % | WER % | RTF |\n|---|---:|---:|---:|---:|\n");
        for m in &results {
            let chunk = m["chunk"].as_i64().unwrap_or(0);
            out += &format!(
                "| {} | {} | {} | {} | {} |\n",
                m["method"].as_str().unwrap_or("-"),
                if chunk == 0 {
                    "full".into()
                } else {
                    chunk.to_string()
                },
                fmt_opt(m["cer"].as_f64(), 2),
                fmt_opt(m["wer"].as_f64(), 2),
                fmt_opt(m["rtf"].as_f64(), 4),
            );
        }
    }
    out
}

/// How evenly an MoE run's layers routed, first and last log.
fn run_routing(r: &Run) -> String {
    let mut out = String::new();
    out += "\nRouting (busiest expert's share over an even share, 1 = balanced; router entropy, nats), first and last log:\n\n| layer | max/even first | max/even last | entropy last |\n|---|---:|---:|---:|\n";
    let (first, last) = (r.train.first(), r.train.last());
    let mut names: Vec<String> = last
        .map(metrics::moe_loads)
        .unwrap_or_default()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    names.sort_by_key(|n| layer_order(n));
    let at = |l: Option<&Value>, n: &str| {
        l.and_then(|l| metrics::moe_loads(l).into_iter().find(|(m, _)| m == n))
            .map(|(_, load)| metrics::max_over_even(&load))
    };
    for n in &names {
        out += &format!(
            "| {n} | {} | {} | {} |\n",
            fmt_opt(at(first, n), 2),
            fmt_opt(at(last, n), 2),
            fmt_opt(last.and_then(|l| l["moe"][n]["entropy"].as_f64()), 3),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_in_forward_order() {
        let mut names = vec![
            "decoder.left_decoder.decoders.0.feed_forward",
            "encoder.encoders.10.feed_forward",
            "encoder.encoders.2.feed_forward",
            "encoder.encoders.2.feed_forward_macaron",
        ];
        names.sort_by_key(|n| layer_order(n));
        assert_eq!(
            names,
            [
                "encoder.encoders.2.feed_forward_macaron",
                "encoder.encoders.2.feed_forward",
                "encoder.encoders.10.feed_forward",
                "decoder.left_decoder.decoders.0.feed_forward",
            ]
        );
        assert_eq!(short_layer(names[0]), "encoder 2 macaron FFN");
    }

    #[test]
    fn ticks_are_short() {
        assert_eq!(tick(12_500.0), "12k");
        assert_eq!(tick(1_500.0), "1.5k");
        assert_eq!(tick(0.25), "0.25");
        assert_eq!(tick(3e-4), "3e-4");
        assert_eq!(tick(1.5e-3), "1.5e-3");
    }
}

//! Loss-curve plots: reads a run's `metrics.jsonl` and draws the training loss, its exponential
//! moving average and the validation points into a PNG. Everything — lines, markers, axes and
//! text (a built-in 5×7 bitmap font) — is rasterised here, so no font files or plotting crates
//! are needed and the picture is identical on every machine.

use anyhow::{bail, Context, Result};
use plot_font::text_width;
use serde_json::{Map, Value};
use std::path::Path;

#[path = "plot_font.rs"]
mod plot_font;

/// What [`loss_curve_png`] plotted.
#[derive(Debug, Clone, PartialEq)]
pub struct PlotSummary {
    /// Training-loss points drawn (one per distinct step).
    pub points: usize,
    /// Validation-loss points drawn (one per distinct step).
    pub val_points: usize,
    /// Smallest loss drawn, training or validation.
    pub min_loss: f64,
    /// Largest loss drawn, training or validation.
    pub max_loss: f64,
}

/// Image width in pixels.
const WIDTH: usize = 800;
/// Image height in pixels.
const HEIGHT: usize = 480;
/// Smoothing factor of the exponential moving average drawn over the training loss.
const EMA_ALPHA: f64 = 0.1;

/// An RGB colour.
type Rgb = [u8; 3];
const WHITE: Rgb = [255, 255, 255];
const INK: Rgb = [30, 30, 30];
const GRID: Rgb = [228, 228, 228];
const TRAIN: Rgb = [150, 185, 235];
const EMA: Rgb = [20, 70, 170];
const VAL: Rgb = [235, 120, 20];
const VAL_EDGE: Rgb = [140, 60, 0];

/// Reads `metrics.jsonl` (one JSON object per line; training lines have "step" and "loss", eval lines have "step" and "val_loss"; lines with "skipped": true have no loss) and writes a loss-curve PNG.
///
/// Lines with neither loss are ignored, as are non-finite values (`null`, which is how NaN is
/// serialised). When a resumed run logged a step twice the later line wins. The PNG is written
/// atomically. Errors name the metrics path (and `file:line` for a malformed line); a file with
/// no loss points at all is an error.
pub fn loss_curve_png(metrics: &Path, out_png: &Path, title: &str) -> Result<PlotSummary> {
    let series = read_metrics(metrics)?;
    if series.train.is_empty() && series.val.is_empty() {
        let name = metrics.display();
        bail!("{name}: no \"loss\" or \"val_loss\" points to plot");
    }
    let (min_loss, max_loss) = span(series.train.iter().chain(&series.val).map(|p| p.1));
    let png = render(&series, title).with_context(|| format!("plotting {}", metrics.display()))?;
    reference::io::atomic_write(out_png, &png)
        .with_context(|| format!("writing {}", out_png.display()))?;
    Ok(PlotSummary {
        points: series.train.len(),
        val_points: series.val.len(),
        min_loss,
        max_loss,
    })
}

/// The (step, loss) points of one run, each sorted by step with distinct steps.
#[derive(Debug, Default)]
struct Series {
    train: Vec<(f64, f64)>,
    val: Vec<(f64, f64)>,
}

/// Parses `path` into its training and validation points.
fn read_metrics(path: &Path) -> Result<Series> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading metrics file {}", path.display()))?;
    let mut series = Series::default();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        parse_line(line, &mut series)
            .with_context(|| format!("{}:{}: malformed metrics line", path.display(), i + 1))?;
    }
    sort_dedup(&mut series.train);
    sort_dedup(&mut series.val);
    Ok(series)
}

/// Adds the finite points of one metrics line to `series`.
fn parse_line(line: &str, series: &mut Series) -> Result<()> {
    let value: Value = serde_json::from_str(line)?;
    let obj = value.as_object().context("expected a JSON object")?;
    if let Some(from) = number(obj, "resumed_from")? {
        // A resumed run writes the steps after its checkpoint again: drop the stale rows.
        series.train.retain(|p| p.0 <= from);
        series.val.retain(|p| p.0 <= from);
        return Ok(());
    }
    if obj.get("skipped").and_then(Value::as_bool) == Some(true) {
        return Ok(());
    }
    let loss = number(obj, "loss")?;
    let val = number(obj, "val_loss")?;
    if loss.is_none() && val.is_none() {
        return Ok(());
    }
    let step = number(obj, "step")?.context("a loss without a \"step\"")?;
    if !step.is_finite() {
        return Ok(());
    }
    for (v, out) in [(loss, &mut series.train), (val, &mut series.val)] {
        if let Some(v) = v.filter(|v| v.is_finite()) {
            out.push((step, v));
        }
    }
    Ok(())
}

/// The number in field `key`: `None` when absent, NaN when `null`, an error for other types.
fn number(obj: &Map<String, Value>, key: &str) -> Result<Option<f64>> {
    match obj.get(key) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(f64::NAN)),
        Some(v) => match v.as_f64() {
            Some(n) => Ok(Some(n)),
            None => bail!("\"{key}\" is not a number: {v}"),
        },
    }
}

/// Sorts `points` by step, keeping only the last-written point of each step.
fn sort_dedup(points: &mut Vec<(f64, f64)>) {
    points.reverse();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    points.dedup_by(|later, kept| later.0 == kept.0);
}

/// The exponential moving average of `values` with smoothing factor `alpha`, seeded with the
/// first value.
fn ema(values: &[f64], alpha: f64) -> Vec<f64> {
    let mut out: Vec<f64> = Vec::with_capacity(values.len());
    for &v in values {
        out.push(out.last().map_or(v, |&a| alpha * v + (1.0 - alpha) * a));
    }
    out
}

/// The smallest and largest of `values` (`(inf, -inf)` when there are none).
fn span(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    })
}

/// A point in pixel coordinates.
type Pt = (f64, f64);

/// A rectangle in pixel coordinates.
#[derive(Debug, Clone, Copy)]
struct Rect {
    left: f64,
    top: f64,
    right: f64,
    bottom: f64,
}

impl Rect {
    /// Whether pixel `(x, y)` lies inside (edges included).
    fn contains(&self, x: i64, y: i64) -> bool {
        let (x, y) = (x as f64, y as f64);
        x >= self.left && x <= self.right && y >= self.top && y <= self.bottom
    }
}

/// The plot area's edges in pixels.
const AREA: Rect = rect(72.0, 44.0, 780.0, 430.0);
/// The whole image.
const WHOLE: Rect = rect(0.0, 0.0, WIDTH as f64, HEIGHT as f64);

/// The rectangle with these edges.
const fn rect(left: f64, top: f64, right: f64, bottom: f64) -> Rect {
    Rect {
        left,
        top,
        right,
        bottom,
    }
}

/// Maps data coordinates (step, loss) into the plot area.
struct Frame {
    x: (f64, f64),
    y: (f64, f64),
}

impl Frame {
    /// A frame spanning every point of `series`, with the loss axis padded by 5%.
    fn new(series: &Series) -> Result<Frame> {
        let pts = || series.train.iter().chain(&series.val);
        let (x0, x1) = span(pts().map(|p| p.0));
        let (y0, y1) = span(pts().map(|p| p.1));
        let xpad = if x1 > x0 { 0.0 } else { 1.0 };
        let ypad = 0.05
            * if y1 > y0 {
                y1 - y0
            } else {
                10f64.max(y0.abs())
            };
        let (x, y) = ((x0 - xpad, x1 + xpad), (y0 - ypad, y1 + ypad));
        // Finite widths imply finite edges, as the data points themselves are finite.
        if ![x.1 - x.0, y.1 - y.0].iter().all(|d| d.is_finite()) {
            bail!("values span too wide a range to plot (steps {x0}..{x1}, losses {y0}..{y1})");
        }
        Ok(Frame { x, y })
    }

    /// The pixel position of data point `(step, loss)`.
    fn px(&self, (step, loss): (f64, f64)) -> Pt {
        let fx = (step - self.x.0) / (self.x.1 - self.x.0);
        let fy = (loss - self.y.0) / (self.y.1 - self.y.0);
        let (w, h) = (AREA.right - AREA.left, AREA.bottom - AREA.top);
        (AREA.left + fx * w, AREA.bottom - fy * h)
    }
}

/// An RGB raster of `WIDTH`×`HEIGHT` pixels, row by row.
struct Canvas(Vec<u8>);

impl Canvas {
    /// Paints pixel `(x, y)`; coordinates off the canvas are ignored.
    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if (0..WIDTH as i64).contains(&x) && (0..HEIGHT as i64).contains(&y) {
            let i = 3 * (y as usize * WIDTH + x as usize);
            self.0[i..i + 3].copy_from_slice(&c);
        }
    }

    /// Fills the pixels with `x0 <= x <= x1` and `y0 <= y <= y1`.
    fn fill(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb) {
        for y in y0.max(0)..=y1.min(HEIGHT as i64) {
            for x in x0.max(0)..=x1.min(WIDTH as i64) {
                self.set(x, y, c);
            }
        }
    }

    /// Fills the disc of radius `r` centred on `(cx, cy)`, keeping inside `clip`.
    fn disc(&mut self, cx: i64, cy: i64, r: i64, c: Rgb, clip: Rect) {
        for (dx, dy) in (-r..=r).flat_map(|dy| (-r..=r).map(move |dx| (dx, dy))) {
            if dx * dx + dy * dy <= r * r + r && clip.contains(cx + dx, cy + dy) {
                self.set(cx + dx, cy + dy, c);
            }
        }
    }

    /// A validation marker: an outlined disc centred on `p`.
    fn marker(&mut self, p: Pt) {
        let (x, y) = (p.0.round() as i64, p.1.round() as i64);
        self.disc(x, y, 5, VAL_EDGE, WHOLE);
        self.disc(x, y, 4, VAL, WHOLE);
    }

    /// Draws the segment `a`–`b` with pen radius `r` (0 is one pixel wide), painting only inside
    /// `clip`. Endpoints are clamped to the canvas (NaN to 0), which keeps the walk short; the
    /// callers' segments lie inside it anyway, as the frame spans all the data.
    fn line(&mut self, a: Pt, b: Pt, r: i64, c: Rgb, clip: Rect) {
        let px = |v: f64, max: usize| v.clamp(0.0, max as f64).round() as i64;
        let (mut x, mut y) = (px(a.0, WIDTH), px(a.1, HEIGHT));
        let (x1, y1) = (px(b.0, WIDTH), px(b.1, HEIGHT));
        let (dx, dy) = ((x1 - x).abs(), -(y1 - y).abs());
        let (sx, sy) = ((x1 - x).signum(), (y1 - y).signum());
        let mut err = dx + dy;
        loop {
            self.disc(x, y, r, c, clip);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Draws `text` in the ink colour with its top-left corner at `(x, y)`.
    fn text(&mut self, x: i64, y: i64, text: &str, scale: i64) {
        plot_font::draw_text(x, y, text, scale, |px, py| self.set(px, py, INK));
    }

    /// Encodes the canvas as an 8-bit RGB PNG.
    fn encode(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, WIDTH as u32, HEIGHT as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&self.0)?;
        writer.finish()?;
        Ok(out)
    }
}

/// Tick positions inside `lo..=hi`, about `target` of them at a 1-2-5 spacing of at least
/// `min_step`, and that spacing.
fn ticks(lo: f64, hi: f64, target: f64, min_step: f64) -> (Vec<f64>, f64) {
    let raw = (hi - lo) / target;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = [1.0, 2.0, 5.0, 10.0][[1.5, 3.0, 7.0].iter().filter(|&&l| norm >= l).count()];
    let step = (mag * nice).max(min_step);
    if !(step.is_finite() && step > 0.0) {
        return (vec![lo, hi], hi - lo);
    }
    let first = (lo / step).ceil();
    let ticks = (0..50)
        .map(|i| (first + i as f64) * step)
        .take_while(|&t| t <= hi + step * 1e-9);
    (ticks.collect(), step)
}

/// The label of tick `v` on an axis whose ticks are `step` apart.
fn tick_label(v: f64, step: f64) -> String {
    let v = v + 0.0; // turns -0 into 0
    if v.abs() >= 1e6 {
        return format!("{v:.2e}");
    }
    let decimals = (-step.log10().floor()).clamp(0.0, 8.0) as usize;
    format!("{v:.decimals$}")
}

/// Draws the grid, axes, ticks, tick labels and axis names.
fn draw_axes(canvas: &mut Canvas, frame: &Frame) {
    let [l, t, r, b] = [AREA.left, AREA.top, AREA.right, AREA.bottom].map(|v| v as i64);
    let (xticks, xstep) = ticks(frame.x.0, frame.x.1, 8.0, 1.0);
    for &v in &xticks {
        let x = frame.px((v, frame.y.0)).0.round() as i64;
        canvas.fill((x, t), (x, b), GRID);
        canvas.fill((x, b), (x, b + 5), INK);
        let label = tick_label(v, xstep);
        canvas.text(x - text_width(&label, 1) / 2, b + 9, &label, 1);
    }
    let (yticks, ystep) = ticks(frame.y.0, frame.y.1, 6.0, 0.0);
    for &v in &yticks {
        let y = frame.px((frame.x.0, v)).1.round() as i64;
        canvas.fill((l, y), (r, y), GRID);
        canvas.fill((l - 5, y), (l, y), INK);
        let label = tick_label(v, ystep);
        canvas.text(l - 9 - text_width(&label, 1), y - 3, &label, 1);
    }
    canvas.fill((l, t), (l, b), INK);
    canvas.fill((l, b), (r, b), INK);
    canvas.text((l + r - text_width("step", 1)) / 2, b + 24, "step", 1);
    canvas.text(l - text_width("loss", 1) / 2, t - 14, "loss", 1);
}

/// Draws the training line, its moving average and the validation markers.
fn draw_series(canvas: &mut Canvas, frame: &Frame, series: &Series) {
    let pts: Vec<Pt> = series.train.iter().map(|&p| frame.px(p)).collect();
    for w in pts.windows(2) {
        canvas.line(w[0], w[1], 0, TRAIN, AREA);
    }
    let losses: Vec<f64> = series.train.iter().map(|p| p.1).collect();
    let steps = series.train.iter().map(|p| p.0);
    let smoothed = ema(&losses, EMA_ALPHA);
    let smooth: Vec<Pt> = steps.zip(smoothed).map(|p| frame.px(p)).collect();
    for w in smooth.windows(2) {
        canvas.line(w[0], w[1], 1, EMA, AREA);
    }
    if let [only] = smooth[..] {
        canvas.disc(only.0.round() as i64, only.1.round() as i64, 2, EMA, AREA);
    }
    for &p in &series.val {
        canvas.marker(frame.px(p));
    }
}

/// Draws the legend box in the plot area's top-right corner, listing the series present.
/// Each entry's pen is a line (radius, colour) or, for `None`, a validation marker.
fn draw_legend(canvas: &mut Canvas, series: &Series) {
    let mut entries = Vec::new();
    if !series.train.is_empty() {
        entries.extend([("train", Some((0, TRAIN))), ("train (EMA)", Some((1, EMA)))]);
    }
    if !series.val.is_empty() {
        entries.push(("val", None));
    }
    let w = 34 + text_width("train (EMA)", 1);
    let h = 8 + 14 * entries.len() as i64;
    let (x0, y0) = (AREA.right as i64 - w - 8, AREA.top as i64 + 8);
    canvas.fill((x0, y0), (x0 + w, y0 + h), INK);
    canvas.fill((x0 + 1, y0 + 1), (x0 + w - 1, y0 + h - 1), WHITE);
    for (i, (label, pen)) in entries.into_iter().enumerate() {
        let y = (y0 + 10 + 14 * i as i64) as f64;
        let (a, b) = ((x0 + 6) as f64, (x0 + 24) as f64);
        match pen {
            Some((r, c)) => canvas.line((a, y), (b, y), r, c, WHOLE),
            None => canvas.marker(((a + b) / 2.0, y)),
        }
        canvas.text(x0 + 30, y as i64 - 3, label, 1);
    }
}

/// Renders `series` as a PNG titled `title` (cut to fit the width).
fn render(series: &Series, title: &str) -> Result<Vec<u8>> {
    let frame = Frame::new(series)?;
    let mut canvas = Canvas(WHITE.repeat(WIDTH * HEIGHT));
    draw_axes(&mut canvas, &frame);
    draw_series(&mut canvas, &frame, series);
    draw_legend(&mut canvas, series);
    let title: String = title.chars().take((WIDTH - 20) / 12).collect();
    canvas.text((WIDTH as i64 - text_width(&title, 2)) / 2, 10, &title, 2);
    canvas.encode()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// Writes `text` as `metrics.jsonl` in a fresh temp dir; returns its path.
    fn write_metrics(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vet-plot-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
        dir.join("metrics.jsonl")
    }

    /// Plots `text`, returning the error's full message with the metrics path shown as FILE.
    fn plot_error(name: &str, text: &str) -> String {
        let path = write_metrics(name, text);
        let err = loss_curve_png(&path, &path.with_extension("png"), "t").unwrap_err();
        assert!(!path.with_extension("png").exists(), "no PNG on error");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
        format!("{err:#}").replace(&path.display().to_string(), "FILE")
    }

    /// 600 steps of decreasing loss with seeded noise, a val point every 100 steps, skipped
    /// steps and a null loss; returns the text and the (min, max) loss it holds.
    fn synthetic_metrics() -> (String, f64, f64) {
        let mut rng = 0x5eed_1234_u64;
        let mut uniform = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng >> 11) as f64 / (1u64 << 53) as f64
        };
        let (mut text, mut lo, mut hi) = (String::new(), f64::INFINITY, f64::NEG_INFINITY);
        for step in 1..=600u32 {
            if step % 97 == 0 {
                text += &format!("{{\"step\":{step},\"skipped\":true,\"grad_norm\":\"NaN\"}}\n");
            }
            let decay = 4.0 * (-(step as f64) / 150.0).exp();
            let loss = 2.0 + decay + 0.6 * (uniform() - 0.5);
            (lo, hi) = (lo.min(loss), hi.max(loss));
            text += &format!("{{\"step\":{step},\"loss\":{loss},\"lr\":0.001}}\n");
            if step % 100 == 0 {
                let val = 2.1 + decay;
                (lo, hi) = (lo.min(val), hi.max(val));
                let ppl = val.exp();
                text += &format!("{{\"step\":{step},\"val_loss\":{val},\"val_ppl\":{ppl}}}\n");
            }
        }
        (text + "{\"step\":601,\"loss\":null}\n\n", lo, hi)
    }

    /// Renders the synthetic metrics; returns the PNG path, summary and true (min, max) loss.
    fn render_synthetic(name: &str) -> (PathBuf, PlotSummary, f64, f64) {
        let (text, lo, hi) = synthetic_metrics();
        let path = write_metrics(name, &text);
        let out = path.with_file_name("loss.png");
        let summary = loss_curve_png(&path, &out, "Vet-Mamba 130M: loss (seed 7)").unwrap();
        (out, summary, lo, hi)
    }

    /// Decodes an 8-bit RGB PNG into (width, height, pixels).
    fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
        let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    /// How many pixels of `pixels` have colour `c`.
    fn count(pixels: &[u8], c: Rgb) -> usize {
        pixels.chunks_exact(3).filter(|p| *p == c).count()
    }

    #[test]
    fn renders_curve_with_expected_size_colours_and_summary() {
        let (out, summary, lo, hi) = render_synthetic("render");
        assert_eq!((summary.points, summary.val_points), (600, 6));
        assert_eq!((summary.min_loss, summary.max_loss), (lo, hi));
        let (w, h, px) = decode(&out);
        assert_eq!((w, h), (WIDTH as u32, HEIGHT as u32));
        assert!(px[..3] == WHITE && px[px.len() - 3..] == WHITE);
        let [train, ema, val] = [TRAIN, EMA, VAL].map(|c| count(&px, c));
        assert!(train > 300 && ema > 600, "train {train}, EMA {ema} pixels");
        // The loss falls, so the EMA's pixels sit higher (smaller y) on the left than the right.
        let mean_y = |x0: usize, x1: usize| {
            let ys = (0..WIDTH * HEIGHT).filter(|i| (x0..x1).contains(&(i % WIDTH)));
            let ys: Vec<usize> = ys
                .filter(|i| px[3 * i..3 * i + 3] == EMA)
                .map(|i| i / WIDTH)
                .collect();
            ys.iter().sum::<usize>() as f64 / ys.len().max(1) as f64
        };
        let (left, right) = (mean_y(80, 200), mean_y(600, 770));
        assert!(
            left > 0.0 && left + 150.0 < right,
            "EMA mean y: left {left}, right {right}"
        );
        assert!(val > 6 * 40, "val marker pixels: {val}");
        let title = count(&px[3 * WIDTH * 10..3 * WIDTH * 24], INK);
        assert!(title > 200, "title text pixels: {title}");
        let files = std::fs::read_dir(out.parent().unwrap()).unwrap().count();
        assert_eq!(files, 2, "no temp file left beside loss.png");
        std::fs::remove_dir_all(out.parent().unwrap()).unwrap();
    }

    #[test]
    fn ema_uses_alpha_and_starts_at_first_value() {
        assert_eq!(ema(&[10.0, 0.0, 0.0], 0.1), [10.0, 9.0, 0.9 * 9.0]);
        assert!(ema(&[], 0.1).is_empty());
        assert_eq!(EMA_ALPHA, 0.1);
    }

    #[test]
    fn resumed_steps_keep_the_last_line() {
        let text = "{\"step\":1,\"loss\":5}\n{\"step\":2,\"loss\":9}\n{\"step\":2,\"loss\":4}\n\
                    {\"step\":3,\"loss\":3}\n{\"step\":2,\"val_loss\":6}\n";
        let path = write_metrics("resume", text);
        let s = loss_curve_png(&path, &path.with_extension("png"), "t").unwrap();
        assert_eq!(
            (s.points, s.val_points, s.min_loss, s.max_loss),
            (3, 1, 3.0, 6.0)
        );
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn file_without_loss_points_is_an_error() {
        let text = "{\"step\":1,\"skipped\":true}\n{\"step\":2,\"loss\":null}\n{\"cfg\":1}\n";
        let err = plot_error("empty", text);
        assert_eq!(err, "FILE: no \"loss\" or \"val_loss\" points to plot");
    }

    #[test]
    fn malformed_line_errors_with_file_and_line_number() {
        let good = "{\"step\":1,\"loss\":3}\n";
        let cases = [
            (
                format!("{good}\n{{\"step\":3,\"loss\":2\n"),
                "EOF while parsing",
            ),
            (
                format!("{good}{{\"step\":2,\"loss\":\"low\"}}\n"),
                "\"loss\" is not a number",
            ),
            (format!("{good}[1]\n"), "expected a JSON object"),
            (
                format!("{good}{good}{{\"loss\":1}}\n"),
                "a loss without a \"step\"",
            ),
        ];
        for (i, (text, why)) in cases.iter().enumerate() {
            let err = plot_error(&format!("malformed-{i}"), text);
            let line = text.lines().count();
            let want = format!("FILE:{line}: malformed metrics line: {why}");
            assert!(err.starts_with(&want), "{err}");
        }
    }

    #[test]
    fn missing_file_error_names_the_path() {
        let path = write_metrics("missing", "").with_file_name("nope.jsonl");
        let err = format!("{:#}", loss_curve_png(&path, &path, "t").unwrap_err());
        assert!(err.contains(&path.display().to_string()), "{err}");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn degenerate_and_extreme_inputs_do_not_panic() {
        let ok = [
            "{\"step\":5,\"loss\":2}",
            "{\"step\":5,\"val_loss\":2}",
            "{\"step\":1,\"loss\":1e300}\n{\"step\":2,\"loss\":-1e300}",
        ];
        for (i, text) in ok.iter().enumerate() {
            let path = write_metrics(&format!("extreme-{i}"), text);
            loss_curve_png(&path, &path.with_extension("png"), "t\u{263a}~").unwrap();
            assert_eq!(decode(&path.with_extension("png")).0, WIDTH as u32);
            std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
        }
        let text = "{\"step\":0,\"loss\":1e308}\n{\"step\":1,\"loss\":-1e308}\n";
        let err = plot_error("too-wide", text);
        assert!(err.contains("too wide"), "{err}");
    }

    #[test]
    fn tick_labels_are_round_numbers() {
        let (t, step) = ticks(1.8, 6.3, 6.0, 0.0);
        assert_eq!(step, 1.0);
        let labels: Vec<String> = t.iter().map(|&v| tick_label(v, step)).collect();
        assert_eq!(labels, ["2", "3", "4", "5", "6"]);
        let (t, step) = ticks(0.0, 1.0, 6.0, 0.0);
        assert_eq!(
            ticks(4.0, 6.0, 8.0, 1.0),
            (vec![4.0, 5.0, 6.0], 1.0),
            "whole steps"
        );
        assert_eq!(tick_label(t[1], step), "0.2");
        assert_eq!(tick_label(-0.0, 0.5), "0.0");
        assert_eq!(tick_label(2.5e7, 5e6), "2.50e7");
    }

    /// Writes an example plot for eyeballing: `cargo test -p trainer --lib plot -- --ignored`
    /// leaves it at `<temp dir>/loss_curve_example.png`.
    #[test]
    #[ignore]
    fn write_example_png() {
        let (out, ..) = render_synthetic("example");
        std::fs::copy(&out, std::env::temp_dir().join("loss_curve_example.png")).unwrap();
        std::fs::remove_dir_all(out.parent().unwrap()).unwrap();
    }
}

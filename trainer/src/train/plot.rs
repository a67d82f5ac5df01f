//! Loss-curve plots: reads a run's `metrics.jsonl` and draws the training loss, its exponential
//! moving average and the validation points into `loss_curve.png`, with `plotters`' bitmap
//! backend. Text goes through `ab_glyph` with a bundled font (a Latin-1 subset of DejaVu Sans,
//! `trainer/assets/`), so no system fonts or fontconfig are needed and the picture is the same
//! on every machine; the `png` crate encodes it.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use serde_json::{Map, Value};

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

pub(super) const PAPER: RGBColor = RGBColor(255, 255, 255);
pub(super) const INK: RGBColor = RGBColor(30, 30, 30);
pub(super) const GRID: RGBColor = RGBColor(228, 228, 228);
const TRAIN: RGBColor = RGBColor(150, 185, 235);
pub(super) const EMA: RGBColor = RGBColor(20, 70, 170);
pub(super) const VAL: RGBColor = RGBColor(235, 120, 20);
const VAL_EDGE: RGBColor = RGBColor(140, 60, 0);

/// The bundled font, registered with plotters as its sans-serif face.
const FONT: &[u8] = include_bytes!("../../assets/DejaVuSans-Latin1.ttf");
pub(super) const SANS: &str = "sans-serif";

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
    reference::fs::atomic_write(out_png, &png)
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

/// The data ranges of the plot: every point of `series`, with the loss axis padded by 5%.
struct Frame {
    x: (f64, f64),
    y: (f64, f64),
}

impl Frame {
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
}

/// The label of tick `v` on an axis `width` wide (about 6 ticks): as many decimals as the
/// tick spacing needs, exponent notation for large values.
pub(super) fn tick_label(v: f64, width: f64) -> String {
    let v = v + 0.0; // turns -0 into 0
    if v.abs() >= 1e6 {
        return format!("{v:.2e}");
    }
    let decimals = (-(width / 6.0).log10().floor()).clamp(0.0, 8.0) as usize;
    format!("{v:.decimals$}")
}

/// Registers the bundled font once; later calls return the first outcome.
pub(super) fn register_font() -> Result<()> {
    static DONE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        plotters::style::register_font(SANS, FontStyle::Normal, FONT)
            .map_err(|_| "the bundled plot font does not parse".to_string())
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// Renders `series` as an RGB PNG titled `title` (cut to fit the width).
fn render(series: &Series, title: &str) -> Result<Vec<u8>> {
    let frame = Frame::new(series)?;
    register_font()?;
    let mut pixels = vec![255u8; 3 * WIDTH * HEIGHT];
    draw(&mut pixels, &frame, series, title).map_err(|e| anyhow!("drawing: {e}"))?;
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, WIDTH as u32, HEIGHT as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&pixels)?;
    writer.finish()?;
    Ok(out)
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// Draws the axes, the training line, its moving average, the validation markers and a legend
/// into `pixels` (RGB, `WIDTH`×`HEIGHT`).
fn draw(pixels: &mut [u8], frame: &Frame, series: &Series, title: &str) -> DrawResult {
    let root =
        BitMapBackend::with_buffer(pixels, (WIDTH as u32, HEIGHT as u32)).into_drawing_area();
    root.fill(&PAPER)?;
    let title: String = title.chars().take((WIDTH - 20) / 11).collect();
    let (xw, yw) = (frame.x.1 - frame.x.0, frame.y.1 - frame.y.0);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (SANS, 20).into_font().color(&INK))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(frame.x.0..frame.x.1, frame.y.0..frame.y.1)?;
    chart
        .configure_mesh()
        .x_labels(8)
        .y_labels(6)
        .x_desc("step")
        .y_desc("loss")
        .x_label_formatter(&|v| tick_label(*v, xw.max(6.0)))
        .y_label_formatter(&|v| tick_label(*v, yw))
        .label_style((SANS, 12).into_font().color(&INK))
        .axis_desc_style((SANS, 13).into_font().color(&INK))
        .axis_style(INK)
        .bold_line_style(GRID)
        .light_line_style(TRANSPARENT)
        .draw()?;
    if !series.train.is_empty() {
        let train = series.train.iter().copied();
        chart
            .draw_series(LineSeries::new(train, TRAIN))?
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], TRAIN));
        let losses: Vec<f64> = series.train.iter().map(|p| p.1).collect();
        let steps = series.train.iter().map(|p| p.0);
        let smooth: Vec<(f64, f64)> = steps.zip(ema(&losses, EMA_ALPHA)).collect();
        let pen = EMA.stroke_width(2);
        chart
            .draw_series(
                LineSeries::new(smooth, pen).point_size(if series.train.len() == 1 {
                    2
                } else {
                    0
                }),
            )?
            .label("train (EMA)")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], pen));
    }
    if !series.val.is_empty() {
        let marker = |p: (f64, f64)| {
            EmptyElement::at(p)
                + Circle::new((0, 0), 4, VAL.filled())
                + Circle::new((0, 0), 4, VAL_EDGE)
        };
        chart
            .draw_series(series.val.iter().map(|&p| marker(p)))?
            .label("val")
            .legend(move |(x, y)| {
                EmptyElement::at((x + 9, y))
                    + Circle::new((0, 0), 4, VAL.filled())
                    + Circle::new((0, 0), 4, VAL_EDGE)
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(PAPER)
        .border_style(INK)
        .label_font((SANS, 12).into_font().color(&INK))
        .draw()?;
    root.present()?;
    Ok(())
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
    fn count(pixels: &[u8], c: RGBColor) -> usize {
        let c = [c.0, c.1, c.2];
        pixels.chunks_exact(3).filter(|p| *p == c).count()
    }

    /// How many pixels in rows `y0..y1`, columns `x0..x1` are not white.
    fn inked(pixels: &[u8], (x0, x1): (usize, usize), (y0, y1): (usize, usize)) -> usize {
        (y0..y1)
            .flat_map(|y| (x0..x1).map(move |x| 3 * (y * WIDTH + x)))
            .filter(|&i| pixels[i..i + 3] != [255, 255, 255])
            .count()
    }

    #[test]
    fn renders_curve_with_expected_size_colours_and_summary() {
        let (out, summary, lo, hi) = render_synthetic("render");
        assert_eq!((summary.points, summary.val_points), (600, 6));
        assert_eq!((summary.min_loss, summary.max_loss), (lo, hi));
        let (w, h, px) = decode(&out);
        assert_eq!((w, h), (WIDTH as u32, HEIGHT as u32));
        assert!(px[..3] == [255; 3] && px[px.len() - 3..] == [255; 3]);
        let [train, ema, val] = [TRAIN, EMA, VAL].map(|c| count(&px, c));
        assert!(train > 300 && ema > 600, "train {train}, EMA {ema} pixels");
        // The loss falls, so the EMA's pixels sit higher (smaller y) on the left than the right.
        let emac = [EMA.0, EMA.1, EMA.2];
        let mean_y = |x0: usize, x1: usize| {
            let ys = (0..WIDTH * HEIGHT).filter(|i| (x0..x1).contains(&(i % WIDTH)));
            let ys: Vec<usize> = ys
                .filter(|i| px[3 * i..3 * i + 3] == emac)
                .map(|i| i / WIDTH)
                .collect();
            ys.iter().sum::<usize>() as f64 / ys.len().max(1) as f64
        };
        let (left, right) = (mean_y(80, 200), mean_y(600, 770));
        assert!(
            left > 0.0 && left + 150.0 < right,
            "EMA mean y: left {left}, right {right}"
        );
        assert!(val > 6 * 20, "val marker pixels: {val}");
        // Text: the title across the top, the step label under the plot, the loss label at the
        // left edge (rendered from the bundled font; an empty band means no glyphs were drawn).
        let title = inked(&px, (0, WIDTH), (0, 34));
        let step = inked(&px, (300, 500), (HEIGHT - 26, HEIGHT));
        let loss = inked(&px, (0, 26), (100, 380));
        assert!(
            title > 300 && step > 20 && loss > 20,
            "text pixels: title {title}, step {step}, loss {loss}"
        );
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
    fn tick_labels_have_the_decimals_their_spacing_needs() {
        assert_eq!(tick_label(2.0, 12.0), "2");
        assert_eq!(tick_label(0.2, 1.0), "0.2");
        assert_eq!(tick_label(-0.0, 3.0), "0.0");
        assert_eq!(tick_label(2.5e7, 3e7), "2.50e7");
        assert_eq!(tick_label(150.0, 600.0), "150");
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

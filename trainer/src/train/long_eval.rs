//! `vet-train eval --long`: perplexity by position over long documents, each read window by
//! window with the state carried (the final state of a window is the next one's initial
//! state), so position `p`'s prediction has seen the whole document before it. Positions are
//! grouped into buckets 0–512, 512–2k, 2k–8k, 8k–32k, 32k–128k, … (each 4× the last); the
//! table goes to `long_eval.json` and the terminal, the curve to `long_eval.png`.
//!
//! A model that uses what it read long ago has a lower perplexity in the far buckets than in
//! the near ones; one that forgets has the same or worse.
//!
//! `--score-after CUE` (repeatable) scores, besides every position, the targets that follow a
//! cue to the end of its line (e.g. `allergic to` in a file whose header named the allergy):
//! what only a model that carried the header can predict. Those buckets go beside the others
//! in `long_eval.json` (`cued`), the terminal and `long_eval_cued.png`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use reference::model::Batch;
use reference::{InferenceEngine, State};
use serde::Serialize;

use super::plot::{register_font, tick_label, EMA, GRID, INK, PAPER, SANS};
use crate::data::manifest::Manifest;
use crate::data::shard::Shard;

/// One position bucket: targets at positions `from..to` of their document (position = tokens
/// of the document read before the predicted one, minus one).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Bucket {
    pub from: u64,
    pub to: u64,
    pub tokens: u64,
    pub loss: f64,
    pub perplexity: f64,
}

/// `long_eval.json`.
#[derive(Clone, Debug, Serialize)]
pub struct LongEvalReport {
    pub model: String,
    pub documents: usize,
    pub tokens: u64,
    pub seq_len: usize,
    /// False with `--reset-windows`: every window started from zeros (the ablation).
    pub state_carried: bool,
    pub buckets: Vec<Bucket>,
    /// `--score-after` cues (empty: none).
    pub cues: Vec<String>,
    /// The same buckets over the cued targets only (empty without cues).
    pub cued: Vec<Bucket>,
}

/// Bucket edges up to `max_len`: 0, 512, 2048, 8192, … (×4).
pub fn bucket_edges(max_len: u64) -> Vec<u64> {
    let mut edges = vec![0, 512];
    while *edges.last().expect("two edges") < max_len {
        let next = edges.last().expect("two edges") * 4;
        edges.push(next);
    }
    edges
}

/// The documents of split `split` of a shard manifest with at least `min_tokens` tokens, at
/// most `max_docs` of them, in corpus order.
pub fn manifest_documents(
    manifest: &Path,
    split: &str,
    min_tokens: usize,
    max_docs: usize,
) -> Result<Vec<Vec<u32>>> {
    let (m, dir) = Manifest::load(manifest)?;
    let mut docs = Vec::new();
    for entry in &m.split(split)?.shards {
        let shard = Shard::open(&dir.join(&entry.file))?;
        let n = shard.header.n_docs as usize;
        for d in 0..n {
            let start = shard.doc_start(d) as usize;
            let end = if d + 1 < n {
                shard.doc_start(d + 1) as usize
            } else {
                shard.len()
            };
            if end - start >= min_tokens.max(2) && docs.len() < max_docs {
                let mut doc = vec![0; end - start];
                shard.read_tokens(start, &mut doc);
                docs.push(doc);
            }
        }
    }
    if docs.is_empty() {
        bail!(
            "split {split:?} of {} has no document of at least {min_tokens} tokens to evaluate",
            manifest.display()
        );
    }
    Ok(docs)
}

/// Per-position cross-entropy of `doc` (`len - 1` values), read in windows of `seq_len` with
/// the state carried from each window to the next.
pub fn document_losses(
    engine: &mut dyn InferenceEngine,
    doc: &[u32],
    seq_len: usize,
) -> Result<Vec<f64>> {
    document_losses_with(engine, doc, seq_len, true)
}

/// [`document_losses`]; with `carry` false every window starts from zeros instead (what a
/// model predicts without what it read in the earlier windows).
pub fn document_losses_with(
    engine: &mut dyn InferenceEngine,
    doc: &[u32],
    seq_len: usize,
    carry: bool,
) -> Result<Vec<f64>> {
    let vocab = engine.config().vocab_size;
    let mut state = State::zeros(engine.config(), 1);
    let mut out = Vec::with_capacity(doc.len().saturating_sub(1));
    let mut i = 0;
    while i + 1 < doc.len() {
        let n = seq_len.min(doc.len() - 1 - i);
        let mut resets = vec![false; n];
        resets[0] = i == 0 || !carry;
        let input = Batch {
            batch: 1,
            seq_len: n,
            tokens: &doc[i..i + n],
            resets: Some(&resets),
        };
        let (logits, next) = engine.forward(&input, Some(&state))?;
        for t in 0..n {
            let row = &logits.data[t * vocab..(t + 1) * vocab];
            out.push(nll(row, doc[i + t + 1] as usize));
        }
        if carry {
            state = next;
        }
        i += n;
    }
    Ok(out)
}

/// `-log softmax(row)[target]`, in f64.
fn nll(row: &[f32], target: usize) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    max + sum.ln() - row[target] as f64
}

/// Evaluates `docs` and groups the losses into buckets.
pub fn long_eval(
    engine: &mut dyn InferenceEngine,
    docs: &[Vec<u32>],
    seq_len: usize,
    model: &str,
) -> Result<LongEvalReport> {
    long_eval_with(engine, docs, seq_len, model, true)
}

/// [`long_eval`]; with `carry` false every window starts from zeros (`--reset-windows`).
pub fn long_eval_with(
    engine: &mut dyn InferenceEngine,
    docs: &[Vec<u32>],
    seq_len: usize,
    model: &str,
    carry: bool,
) -> Result<LongEvalReport> {
    long_eval_cued(engine, docs, seq_len, model, carry, None)
}

/// Targets selected for the cued buckets: per document, one flag per target (`len - 1`), and
/// the cues that chose them.
pub struct Cued<'a> {
    pub cues: &'a [String],
    pub masks: &'a [Vec<bool>],
}

/// [`long_eval_with`], plus the buckets of the targets `cued` selects.
pub fn long_eval_cued(
    engine: &mut dyn InferenceEngine,
    docs: &[Vec<u32>],
    seq_len: usize,
    model: &str,
    carry: bool,
    cued: Option<&Cued>,
) -> Result<LongEvalReport> {
    if seq_len == 0 {
        bail!("--seq-len must be positive");
    }
    if let Some(c) = cued {
        let lens = docs.iter().map(|d| d.len().saturating_sub(1));
        if c.masks.len() != docs.len() || lens.zip(c.masks).any(|(n, m)| m.len() != n) {
            bail!("long_eval: the cue masks do not match the documents");
        }
    }
    let longest = docs.iter().map(|d| d.len() as u64).max().unwrap_or(0);
    let edges = bucket_edges(longest);
    let mut sums = vec![(0.0f64, 0u64); edges.len() - 1];
    let mut cued_sums = sums.clone();
    for (d, doc) in docs.iter().enumerate() {
        let mask = cued.map(|c| &c.masks[d]);
        for (p, l) in document_losses_with(engine, doc, seq_len, carry)?
            .into_iter()
            .enumerate()
        {
            let b = edges.partition_point(|&e| e <= p as u64) - 1;
            sums[b].0 += l;
            sums[b].1 += 1;
            if mask.is_some_and(|m| m[p]) {
                cued_sums[b].0 += l;
                cued_sums[b].1 += 1;
            }
        }
    }
    Ok(LongEvalReport {
        model: model.to_string(),
        documents: docs.len(),
        tokens: sums.iter().map(|s| s.1).sum(),
        seq_len,
        state_carried: carry,
        buckets: buckets(&edges, &sums),
        cues: cued.map(|c| c.cues.to_vec()).unwrap_or_default(),
        cued: if cued.is_some() {
            buckets(&edges, &cued_sums)
        } else {
            Vec::new()
        },
    })
}

/// The non-empty buckets of `(loss sum, targets)` per bucket between `edges`.
fn buckets(edges: &[u64], sums: &[(f64, u64)]) -> Vec<Bucket> {
    edges
        .windows(2)
        .zip(sums)
        .filter(|(_, s)| s.1 > 0)
        .map(|(w, &(sum, n))| Bucket {
            from: w[0],
            to: w[1],
            tokens: n,
            loss: sum / n as f64,
            perplexity: (sum / n as f64).exp(),
        })
        .collect()
}

/// Per target of `doc` (`len - 1` flags): whether the predicted token overlaps the text after
/// an occurrence of one of `cues`, up to the end of that line. The text is the tokens' bytes
/// (byte-level BPE, as every Vet-Mamba and Mamba tokenizer is: a token's characters map back
/// to bytes; special tokens are their own text).
pub fn cue_mask(tok: &tokenizers::Tokenizer, doc: &[u32], cues: &[String]) -> Vec<bool> {
    let chars = crate::tokenizer::byte_chars();
    let byte_of: std::collections::HashMap<char, u8> =
        (0..=255u8).map(|b| (chars[b as usize], b)).collect();
    let mut text = Vec::new();
    let mut starts = Vec::with_capacity(doc.len() + 1);
    for &id in doc {
        starts.push(text.len());
        for c in tok.id_to_token(id).unwrap_or_default().chars() {
            match byte_of.get(&c) {
                Some(&b) => text.push(b),
                None => text.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
            }
        }
    }
    starts.push(text.len());
    // Cued bytes: from a cue's end to the next newline.
    let mut cued = vec![false; text.len()];
    for cue in cues.iter().map(|c| c.as_bytes()).filter(|c| !c.is_empty()) {
        for i in 0..text.len().saturating_sub(cue.len() - 1) {
            if text[i..].starts_with(cue) {
                let e = i + cue.len();
                let n = text[e..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(text.len(), |k| e + k);
                cued[e..n].iter_mut().for_each(|c| *c = true);
            }
        }
    }
    (1..doc.len())
        .map(|t| cued[starts[t]..starts[t + 1]].contains(&true))
        .collect()
}

/// The table as text, one bucket a line (then the cued targets' buckets, if any).
pub fn table(r: &LongEvalReport) -> String {
    let mut s = format!(
        "{} documents, {} targets, windows of {} tokens, {}\n",
        r.documents,
        r.tokens,
        r.seq_len,
        if r.state_carried {
            "state carried"
        } else {
            "state reset every window"
        },
    );
    s += &bucket_rows(&r.buckets);
    if !r.cues.is_empty() {
        s += &format!(
            "targets after the cues {:?} to the end of their line:\n",
            r.cues
        );
        s += &bucket_rows(&r.cued);
    }
    s
}

fn bucket_rows(buckets: &[Bucket]) -> String {
    let mut s = format!(
        "{:>16} {:>10} {:>8} {:>11}\n",
        "positions", "targets", "loss", "perplexity"
    );
    for b in buckets {
        let span = format!("{}-{}", short(b.from), short(b.to));
        s += &format!(
            "{span:>16} {:>10} {:>8.4} {:>11.3}\n",
            b.tokens, b.loss, b.perplexity
        );
    }
    s
}

fn short(v: u64) -> String {
    if v >= 1024 && v.is_multiple_of(1024) {
        format!("{}k", v / 1024)
    } else {
        v.to_string()
    }
}

/// Writes `long_eval.json` (a list: one report per model) and `long_eval.png` (one curve per
/// model, labelled with its directory's name) into `out_dir`, and with cues
/// `long_eval_cued.png` (the cued targets' curves).
pub fn write_report(reports: &[LongEvalReport], out_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let json = out_dir.join("long_eval.json");
    reference::fs::atomic_write(&json, serde_json::to_string_pretty(reports)?.as_bytes())
        .with_context(|| format!("writing {}", json.display()))?;
    let curves: Vec<(String, Vec<Bucket>)> = reports
        .iter()
        .map(|r| (label(&r.model), r.buckets.clone()))
        .collect();
    let title = match reports.first().is_none_or(|r| r.state_carried) {
        true => "Vet-Mamba: perplexity by position (state carried)",
        false => "Vet-Mamba: perplexity by position (state reset every window)",
    };
    curve_png(&curves, &out_dir.join("long_eval.png"), title)?;
    if reports.iter().any(|r| !r.cued.is_empty()) {
        let cued: Vec<(String, Vec<Bucket>)> = reports
            .iter()
            .map(|r| (label(&r.model), r.cued.clone()))
            .collect();
        let title = "Vet-Mamba: perplexity of the targets after the cues, by position";
        curve_png(&cued, &out_dir.join("long_eval_cued.png"), title)?;
    }
    Ok(())
}

/// A short label for the model at `path`: the run directory of a training checkpoint
/// (`RUN/checkpoints/step-N` gives `RUN step-N`), else the last two components.
fn label(path: &str) -> String {
    let parts: Vec<&str> = path.trim_end_matches('/').rsplit('/').take(3).collect();
    match parts.as_slice() {
        [step, "checkpoints", run] => format!("{run} {step}"),
        _ => parts
            .iter()
            .take(2)
            .rev()
            .copied()
            .collect::<Vec<_>>()
            .join("/"),
    }
}

/// Draws one perplexity-by-position curve per `(label, buckets)` (x: the bucket's upper edge,
/// log scale) into `out_png`.
pub fn curve_png(curves: &[(String, Vec<Bucket>)], out_png: &Path, title: &str) -> Result<()> {
    const W: u32 = 800;
    const H: u32 = 480;
    // Eight distinct colours: three seeds of two or three runs on one plot.
    const COLORS: [RGBColor; 8] = [
        EMA,
        RGBColor(235, 120, 20),
        RGBColor(40, 150, 60),
        RGBColor(170, 40, 120),
        RGBColor(120, 190, 230),
        RGBColor(240, 190, 60),
        RGBColor(110, 110, 110),
        RGBColor(200, 40, 40),
    ];
    let pts = || curves.iter().flat_map(|c| c.1.iter());
    let (y0, y1) = pts().fold((f64::INFINITY, 0f64), |(lo, hi), b| {
        (lo.min(b.perplexity), hi.max(b.perplexity))
    });
    let x1 = pts().map(|b| b.to).max().unwrap_or(512) as f64;
    if !(y0.is_finite() && y1.is_finite()) {
        bail!("{}: no finite perplexity to plot", out_png.display());
    }
    register_font()?;
    let mut pixels = vec![255u8; (3 * W * H) as usize];
    let pad = 0.05 * (y1 - y0).max(0.1);
    let draw = |pixels: &mut [u8]| -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::with_buffer(pixels, (W, H)).into_drawing_area();
        root.fill(&PAPER)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (SANS, 20).into_font().color(&INK))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((256f64..x1 * 1.2).log_scale(), y0 - pad..y1 + pad)?;
        chart
            .configure_mesh()
            .x_desc("position in the document (bucket's upper edge, log scale)")
            .y_desc("perplexity")
            .x_label_formatter(&|v| short(*v as u64))
            .y_label_formatter(&|v| tick_label(*v, y1 - y0 + 2.0 * pad))
            .label_style((SANS, 12).into_font().color(&INK))
            .axis_desc_style((SANS, 13).into_font().color(&INK))
            .bold_line_style(GRID)
            .light_line_style(TRANSPARENT)
            .draw()?;
        for ((label, buckets), color) in curves.iter().zip(COLORS.iter().cycle()) {
            let line: Vec<(f64, f64)> = buckets
                .iter()
                .map(|b| (b.to as f64, b.perplexity))
                .collect();
            let pen = color.stroke_width(2);
            chart
                .draw_series(LineSeries::new(line.clone(), pen).point_size(4))?
                .label(label.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], pen));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(PAPER)
            .border_style(INK)
            .label_font((SANS, 12).into_font().color(&INK))
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw(&mut pixels).map_err(|e| anyhow::anyhow!("drawing {}: {e}", out_png.display()))?;
    let mut png = Vec::new();
    let mut enc = png::Encoder::new(&mut png, W, H);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header()?;
    w.write_image_data(&pixels)?;
    w.finish()?;
    reference::fs::atomic_write(out_png, &png)
        .with_context(|| format!("writing {}", out_png.display()))
}

/// What `vet-train eval --long` was asked (its options, after `--long` and `--model`).
#[derive(Clone, Debug, clap::Args)]
pub struct LongEvalOptions {
    /// Token shards' manifest (vet-data prepare) holding the documents.
    #[arg(long)]
    pub data: std::path::PathBuf,
    /// Split of the manifest to read.
    #[arg(long, default_value = "val")]
    pub split: String,
    /// Tokens per window.
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Skip documents shorter than this many tokens.
    #[arg(long, default_value_t = 4096)]
    pub min_tokens: usize,
    /// Evaluate at most this many documents.
    #[arg(long, default_value_t = 16)]
    pub max_docs: usize,
    /// cpu, cuda[:N], reference or reference-f64.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Where long_eval.json and long_eval.png go.
    #[arg(long)]
    pub out_dir: std::path::PathBuf,
    /// Start every window from zeros (the ablation: what the carried state is worth).
    #[arg(long)]
    pub reset_windows: bool,
    /// Also score only the targets after this text, to the end of its line (repeatable), e.g.
    /// "allergic to": facts only a model that carried the file's header can predict.
    #[arg(long = "score-after", value_name = "CUE")]
    pub score_after: Vec<String>,
    /// The data's tokenizer.json, to find the cues (default: the first model's).
    #[arg(long)]
    pub tokenizer: Option<std::path::PathBuf>,
}

/// Evaluates every checkpoint in `models` on the same documents, prints each table and writes
/// the reports and the curves into `o.out_dir`.
pub fn run(models: &[std::path::PathBuf], o: &LongEvalOptions) -> Result<Vec<LongEvalReport>> {
    if models.is_empty() {
        bail!("eval --long needs at least one --model");
    }
    let docs = manifest_documents(&o.data, &o.split, o.min_tokens, o.max_docs)?;
    let mut masks = Vec::new();
    let mut reports = Vec::new();
    for m in models {
        let ck = crate::checkpoint::load(m)?;
        if !o.score_after.is_empty() && masks.is_empty() {
            let path = o
                .tokenizer
                .clone()
                .unwrap_or_else(|| m.join("tokenizer.json"));
            let tok = crate::tokenizer::load(&path, ck.config.vocab_size).context(
                "--score-after reads the text through the data's tokenizer (--tokenizer)",
            )?;
            masks = docs
                .iter()
                .map(|d| cue_mask(&tok, d, &o.score_after))
                .collect();
            let n: usize = masks.iter().map(|m| m.iter().filter(|&&x| x).count()).sum();
            if n == 0 {
                bail!(
                    "no target follows the cues {:?} in the evaluated documents",
                    o.score_after
                );
            }
        }
        let cued = Cued {
            cues: &o.score_after,
            masks: &masks,
        };
        let cued = (!o.score_after.is_empty()).then_some(&cued);
        let mut engine = crate::device::engine(&o.device, &ck.config, ck.params)?;
        let name = m.display().to_string();
        let carry = !o.reset_windows;
        let r = long_eval_cued(engine.as_mut(), &docs, o.seq_len, &name, carry, cued)
            .with_context(|| format!("evaluating {name}"))?;
        println!("{name}\n{}", table(&r));
        reports.push(r);
    }
    write_report(&reports, &o.out_dir)?;
    println!(
        "wrote {} and {}",
        o.out_dir.join("long_eval.json").display(),
        o.out_dir.join("long_eval.png").display()
    );
    Ok(reports)
}

//! Batch mode: answer every `question` of a JSON Lines file into another JSON Lines file.
//!
//! Each output line is the input line's object (all its fields) plus the answer field
//! (default `answer`), `prompt_tokens`, `new_tokens` and `stop`. Questions are answered
//! independently (a fresh state each), question `i` with its own random stream drawn from
//! `(seed, i)`, so the output does not depend on where a run was interrupted. Up to
//! [`BatchOptions::batch`] questions (default [`GROUP`]) are decoded together by continuous
//! batching, one batched step for all of them ([`super::group`]); answers are written in the
//! input's order as soon as every earlier one is written.
//!
//! Resumable by appending: every answer is appended and flushed as one whole line. When the
//! output already exists, its complete lines must answer the first questions of the input in
//! order (checked question by question); they are kept and the run continues after them. A
//! partial last line (a crash mid-write) is dropped first.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use reference::rng::fnv1a64;
use serde_json::{Map, Value};

use super::{Answer, Session};

/// Questions decoded together by default (one pass over the weights per step for all of
/// them).
pub const GROUP: usize = 8;

/// One input record: its 1-based line number and its fields.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub line: usize,
    pub fields: Map<String, Value>,
}

impl Record {
    pub fn question(&self) -> &str {
        self.fields
            .get("question")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }
}

/// Reads and checks every line of `path` before any work starts: each non-blank line must be
/// a JSON object with a non-empty string `question` and no `answer_field`. Errors name
/// `file:line`.
pub fn read_questions(path: &Path, answer_field: &str) -> Result<Vec<Record>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), i + 1);
        let value: Value = serde_json::from_str(line)
            .with_context(|| format!("{at}: not valid JSON ({line:.60})"))?;
        let Value::Object(fields) = value else {
            bail!("{at}: expected a JSON object with a \"question\" field");
        };
        match fields.get("question") {
            Some(Value::String(q)) if !q.trim().is_empty() => {}
            Some(Value::String(_)) => bail!("{at}: the question is empty"),
            Some(other) => bail!("{at}: \"question\" must be a string, found {other}"),
            None => bail!("{at}: missing \"question\""),
        }
        if fields.contains_key(answer_field) {
            bail!(
                "{at}: already has an {answer_field:?} field; pass --answer-field with another name to keep it"
            );
        }
        out.push(Record {
            line: i + 1,
            fields,
        });
    }
    if out.is_empty() {
        bail!("{}: no questions", path.display());
    }
    Ok(out)
}

/// Batch settings.
#[derive(Clone, Debug)]
pub struct BatchOptions {
    pub input: PathBuf,
    pub output: PathBuf,
    /// Name of the field the answer goes in.
    pub answer_field: String,
    /// Base seed; question `i` samples from `(seed, i)`.
    pub seed: u64,
    /// Show a progress bar on stderr (hidden anyway when stderr is not a terminal).
    pub progress: bool,
    /// Questions in flight at once (rows of the batched decode step).
    pub batch: usize,
}

/// What a batch run did.
#[derive(Clone, Debug, Default)]
pub struct BatchSummary {
    /// Answers already in the output when the run started.
    pub resumed: usize,
    /// Answers written by this run.
    pub answered: usize,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

impl BatchSummary {
    pub fn line(&self, output: &Path) -> String {
        let rate = |n: usize, d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
        format!(
            "{} answers written to {} ({} were already there) | prompt: {} tokens, {:.1} tok/s prefill | answers: {} tokens, {:.1} tok/s decode",
            self.answered,
            output.display(),
            self.resumed,
            self.prompt_tokens,
            rate(self.prompt_tokens, self.prefill_time),
            self.new_tokens,
            rate(self.new_tokens, self.decode_time)
        )
    }
}

/// Checks the complete lines already in `output` against `records` and drops a partial last
/// line; returns how many questions are already answered.
fn resume_point(output: &Path, input: &Path, records: &[Record]) -> Result<usize> {
    let bytes = match std::fs::read(output) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("reading {}", output.display())),
    };
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if complete < bytes.len() {
        let f = OpenOptions::new()
            .write(true)
            .open(output)
            .with_context(|| format!("opening {}", output.display()))?;
        f.set_len(complete as u64)
            .with_context(|| format!("dropping the partial last line of {}", output.display()))?;
    }
    let text = std::str::from_utf8(&bytes[..complete])
        .with_context(|| format!("{}: not UTF-8 text", output.display()))?;
    let mut done = 0;
    for (i, line) in text.lines().enumerate() {
        let at = format!("{}:{}", output.display(), i + 1);
        let v: Value = serde_json::from_str(line).with_context(|| {
            format!("{at}: not valid JSON; this is not an answers file this run can resume")
        })?;
        let Some(rec) = records.get(done) else {
            bail!(
                "{at}: {} already has more answers than {} has questions; it belongs to another input",
                output.display(),
                input.display()
            );
        };
        if v.get("question").and_then(Value::as_str) != Some(rec.question()) {
            bail!(
                "{at} does not answer the question at {}:{}: {} belongs to another input; move it away or pick another --output",
                input.display(),
                rec.line,
                output.display()
            );
        }
        done += 1;
    }
    Ok(done)
}

/// Appends the line of `rec` answered by `a` to `w` and flushes it.
fn write_answer(w: &mut impl Write, o: &BatchOptions, rec: &Record, a: &Answer) -> Result<()> {
    let mut fields = rec.fields.clone();
    fields.insert(o.answer_field.clone(), a.text.trim().into());
    fields.insert("prompt_tokens".into(), a.prompt_tokens.into());
    fields.insert("new_tokens".into(), a.tokens.len().into());
    fields.insert("stop".into(), a.stop.name().into());
    let mut line = serde_json::to_string(&Value::Object(fields))?;
    line.push('\n');
    w.write_all(line.as_bytes())
        .and_then(|_| w.flush())
        .with_context(|| {
            format!(
                "writing {} (question at line {})",
                o.output.display(),
                rec.line
            )
        })
}

/// Answers every question of `o.input` not yet in `o.output`.
pub fn run(session: &mut Session, o: &BatchOptions) -> Result<BatchSummary> {
    let records = read_questions(&o.input, &o.answer_field)?;
    let done = resume_point(&o.output, &o.input, &records)?;
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&o.output)
        .with_context(|| format!("opening {} for appending", o.output.display()))?;
    let mut w = BufWriter::new(file);
    let mut s = BatchSummary {
        resumed: done,
        ..BatchSummary::default()
    };
    let bar = if o.progress {
        ProgressBar::new(records.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} questions [{elapsed_precise} < {eta_precise}] {msg}",
        )
        .context("progress bar template")?,
    );
    bar.set_position(done as u64);
    let todo: Vec<(usize, &Record)> = records.iter().enumerate().skip(done).collect();
    let questions: Vec<&str> = todo.iter().map(|(_, r)| r.question()).collect();
    let seeds: Vec<u64> = todo
        .iter()
        .map(|(i, _)| fnv1a64(&format!("{}:{i}", o.seed)))
        .collect();
    // Answers that finished before an earlier one, waiting for their turn to be written.
    let mut ready: Vec<Option<Answer>> = todo.iter().map(|_| None).collect();
    let mut written = 0;
    super::group::answer_all(session, &questions, &seeds, o.batch, |i, a| {
        ready[i] = Some(a);
        while let Some(a) = ready.get_mut(written).and_then(Option::take) {
            write_answer(&mut w, o, todo[written].1, &a)?;
            s.answered += 1;
            s.prompt_tokens += a.prompt_tokens;
            s.new_tokens += a.tokens.len();
            s.prefill_time += a.prefill_time;
            s.decode_time += a.decode_time;
            bar.inc(1);
            written += 1;
        }
        bar.set_message(format!(
            "{:.1} tok/s decode",
            s.new_tokens as f64 / s.decode_time.as_secs_f64().max(1e-9)
        ));
        Ok(())
    })
    .with_context(|| format!("answering the questions of {}", o.input.display()))?;
    bar.finish_and_clear();
    let file: File = w
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("writing {}", o.output.display()))?;
    file.sync_all()
        .with_context(|| format!("syncing {}", o.output.display()))?;
    Ok(s)
}

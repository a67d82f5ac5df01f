//! Processing one work unit: read its documents, tokenize them, send each to train or val,
//! write the shards, then the done-marker.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{anyhow, bail, Result};
use indicatif::ProgressBar;
use tokenizers::Tokenizer;

use super::fastbpe::FastBpe;
use super::marker::{self, SkipNote, UnitMarker, MAX_EXAMPLES};
use super::reader::{self, Chunks, Field, LineRead, Lines, MAX_LINE_BYTES};
use super::sources::{Compression, Source, Unit};
use super::writer::{ShardMeta, SplitWriter};

/// What every unit shares.
pub struct Ctx<'a> {
    pub tokenizer: &'a Tokenizer,
    pub eot: u32,
    pub meta: ShardMeta,
    pub out: &'a Path,
    pub field: &'a str,
    pub val_fraction: f64,
    pub seed: u64,
    pub shard_tokens: usize,
    pub strict: bool,
    /// Use the fast byte-level BPE path when the tokenizer allows it.
    pub fast: bool,
    pub pb: Option<ProgressBar>,
    /// Set when another unit failed: stop early (the unit is redone on the next run).
    pub stop: &'a AtomicBool,
}

/// Error of a unit that stopped because another one failed.
#[derive(Debug, thiserror::Error)]
#[error("stopped because another unit failed")]
pub struct Stopped;

/// SplitMix64's finaliser: a stable 64-bit mix.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Whether a document whose text has CRC-32 `crc` and `len` bytes goes to val: a hash of the
/// seed and the text below `val_fraction`. Identical documents land in the same split.
pub fn is_val(seed: u64, val_fraction: f64, crc: u32, len: u64) -> bool {
    let h = mix(mix(seed) ^ mix(((crc as u64) << 32) ^ len));
    ((h >> 11) as f64 / (1u64 << 53) as f64) < val_fraction
}

/// Whether a document (by its CRC-32) is also encoded through the full `tokenizers`
/// pipeline to check the fast path: about one in 1024.
fn checked(crc: u32) -> bool {
    crc & 1023 == 0
}

struct State<'c, 'a> {
    ctx: &'c Ctx<'a>,
    unit: &'c Unit,
    source: &'c Source,
    tok: Tokenizer,
    fast: Option<FastBpe>,
    ids: Vec<u32>,
    train: SplitWriter,
    val: SplitWriter,
    skipped: u64,
    notes: Vec<SkipNote>,
}

/// Processes `unit` of `source` and writes its shards and done-marker.
pub fn run_unit(
    ctx: &Ctx,
    unit: &Unit,
    source: &Source,
    fingerprint: String,
) -> Result<UnitMarker> {
    let writer = |split| SplitWriter::new(ctx.out, split, unit.index, ctx.shard_tokens, ctx.meta);
    let mut st = State {
        ctx,
        unit,
        source,
        tok: ctx.tokenizer.clone(),
        fast: ctx.fast.then(|| FastBpe::new(ctx.tokenizer)).flatten(),
        ids: Vec::new(),
        train: writer("train"),
        val: writer("val"),
        skipped: 0,
        notes: Vec::new(),
    };
    let lines = match source.kind {
        super::sources::Kind::Jsonl => st.jsonl()?,
        super::sources::Kind::Txt => st.txt()?,
    };
    let (train, train_docs) = st.train.finish()?;
    let (val, val_docs) = st.val.finish()?;
    let m = UnitMarker {
        unit: unit.index,
        fingerprint,
        source: source.path.display().to_string(),
        start: unit.start,
        end: unit.end,
        source_bytes: unit.bytes(),
        lines,
        train,
        val,
        train_docs,
        val_docs,
        skipped: st.skipped,
        skipped_examples: st.notes,
    };
    marker::save(ctx.out, &m)?;
    Ok(m)
}

impl State<'_, '_> {
    /// Records a bad record (line inside the unit, 1-based), or fails with it under --strict.
    fn bad(&mut self, line: Option<u64>, what: String) -> Result<()> {
        if self.ctx.strict {
            let path = self.source.path.display();
            let Some(line) = line else {
                bail!("{path}: {what}")
            };
            // Lines that start before the unit: the first, plus one per `\n` before byte
            // start - 1 (a `\n` there starts this unit's first line).
            let base = if self.unit.start > 0 {
                1 + reader::count_lines_before(&self.source.path, self.unit.start - 1)?
            } else {
                0
            };
            bail!("{path}:{}: {what}", base + line);
        }
        self.skipped += 1;
        if self.notes.len() < MAX_EXAMPLES {
            self.notes.push(SkipNote { line, what });
        }
        Ok(())
    }

    fn stream_error(&self, after_line: u64, e: std::io::Error) -> String {
        let what = match self.source.compression {
            Compression::None => "read error",
            Compression::Gzip => "corrupt or truncated gzip stream",
            Compression::Zstd => "corrupt or truncated zstd stream",
        };
        format!("{what} after line {after_line}: {e}")
    }

    fn writer(&mut self, to_val: bool) -> &mut SplitWriter {
        if to_val {
            &mut self.val
        } else {
            &mut self.train
        }
    }

    /// Tokenizes `piece` and appends it to the current document of `to_val`'s split; with
    /// `check`, also through the full pipeline, failing on any difference.
    fn push_text(&mut self, to_val: bool, piece: &str, line: u64, check: bool) -> Result<()> {
        let path = self.source.path.display();
        let full = |tok: &Tokenizer| {
            tok.encode_fast(piece, false)
                .map_err(|e| anyhow!("{path}:{line}: tokenizing: {e}"))
        };
        let mut ids = std::mem::take(&mut self.ids);
        ids.clear();
        match &mut self.fast {
            Some(fast) => {
                fast.encode(piece, &mut ids)
                    .map_err(|e| anyhow!("{path}:{line}: tokenizing: {e}"))?;
                if check && full(&self.tok)?.get_ids() != ids.as_slice() {
                    bail!(
                        "{path}:{line}: the fast tokenizer path disagrees with the tokenizers \
                         crate on this document; rerun with --slow-tokenizer (and report it)"
                    );
                }
            }
            None => ids.extend_from_slice(full(&self.tok)?.get_ids()),
        }
        let result = self.writer(to_val).push(&ids);
        self.ids = ids;
        result
    }

    /// Emits one whole document.
    fn emit(&mut self, text: &str, line: u64) -> Result<()> {
        if self.ctx.stop.load(Ordering::Relaxed) {
            return Err(Stopped.into());
        }
        let crc = crc32fast::hash(text.as_bytes());
        let to_val = is_val(self.ctx.seed, self.ctx.val_fraction, crc, text.len() as u64);
        self.writer(to_val).begin_doc();
        for piece in reader::pieces(text) {
            self.push_text(to_val, piece, line, checked(crc))?;
        }
        let eot = self.ctx.eot;
        self.writer(to_val).push(&[eot])
    }

    /// Reads the unit's `.jsonl` lines; returns how many start in it.
    fn jsonl(&mut self) -> Result<u64> {
        let (unit, source) = (self.unit, self.source);
        let open_at = unit.start.saturating_sub(1);
        let r = match reader::open(source, open_at, unit.bytes(), self.ctx.pb.clone()) {
            Ok(r) => r,
            Err(e) => return self.bad(None, format!("cannot open: {e}")).map(|()| 0),
        };
        let mut lines = if unit.start > 0 {
            match Lines::after_boundary(r, unit.bytes()) {
                Ok(l) => l,
                Err(e) => return self.bad(None, format!("read error: {e}")).map(|()| 0),
            }
        } else if source.compression == Compression::None {
            Lines::new(r, unit.end)
        } else {
            Lines::new(r, u64::MAX)
        };
        let mut buf = Vec::new();
        loop {
            let read = match lines.next_line(&mut buf) {
                Ok(Some(read)) => read,
                Ok(None) => break,
                Err(e) => {
                    let what = self.stream_error(lines.line, e);
                    self.bad(None, what)?;
                    break;
                }
            };
            let n = lines.line;
            if read == LineRead::TooLong {
                self.bad(
                    Some(n),
                    format!("line longer than {} MiB", MAX_LINE_BYTES >> 20),
                )?;
                continue;
            }
            let text = match std::str::from_utf8(&buf) {
                Ok(t) => t,
                Err(e) => {
                    let what = format!("invalid UTF-8 at byte {} of the line", e.valid_up_to());
                    self.bad(Some(n), what)?;
                    continue;
                }
            };
            // A byte-order mark may open the file.
            let text = if n == 1 && unit.start == 0 {
                text.strip_prefix('\u{feff}').unwrap_or(text)
            } else {
                text
            };
            if text.trim().is_empty() {
                continue;
            }
            let field = self.ctx.field;
            match reader::extract_field(text, field) {
                Ok(Field::Text(t)) => self.emit(&t, n)?,
                Ok(Field::Missing) => self.bad(Some(n), format!("no field {field:?}"))?,
                Ok(Field::NotString(k)) => {
                    self.bad(Some(n), format!("field {field:?} is {k}, not a string"))?
                }
                Err(what) => self.bad(Some(n), what)?,
            }
        }
        Ok(lines.line)
    }
}

fn count_newlines(b: &[u8]) -> u64 {
    b.iter().filter(|&&c| c == b'\n').count() as u64
}

impl State<'_, '_> {
    /// Reads a `.txt` file as one document (in pieces when long); returns its line count.
    fn txt(&mut self) -> Result<u64> {
        let (unit, source) = (self.unit, self.source);
        let mut chunks = match reader::open(source, 0, unit.bytes(), self.ctx.pb.clone()) {
            Ok(r) => Chunks::new(r),
            Err(e) => return self.bad(None, format!("cannot open: {e}")).map(|()| 0),
        };
        let (mut first, mut piece) = (Vec::new(), Vec::new());
        let read = chunks
            .next_piece(&mut first)
            .and_then(|_| chunks.next_piece(&mut piece));
        let more = match read {
            Ok(more) => more,
            Err(e) => {
                let what = self.stream_error(chunks.lines, e);
                self.bad(None, what)?;
                return Ok(chunks.lines);
            }
        };
        if !more {
            match std::str::from_utf8(&first) {
                Ok(text) => self.emit(text, 1)?,
                Err(e) => {
                    let line = 1 + count_newlines(&first[..e.valid_up_to()]);
                    self.bad(Some(line), "invalid UTF-8".into())?;
                }
            }
            return Ok(chunks.lines);
        }
        // A long document: hash and check all of it first, so that its split is known before
        // its tokens are written and a bad byte late in the file skips it whole.
        let Some((crc, len)) = self.prepass()? else {
            return Ok(0);
        };
        let to_val = is_val(self.ctx.seed, self.ctx.val_fraction, crc, len);
        self.writer(to_val).begin_doc();
        let mut line = 1 + count_newlines(&first);
        self.push_piece(to_val, &first, 1, checked(crc))?;
        loop {
            if self.ctx.stop.load(Ordering::Relaxed) {
                return Err(Stopped.into());
            }
            self.push_piece(to_val, &piece, line, checked(crc))?;
            line += count_newlines(&piece);
            let more = chunks.next_piece(&mut piece).map_err(|e| {
                anyhow!("{}: {}", source.path.display(), self.stream_error(line, e))
            })?;
            if !more {
                break;
            }
        }
        let eot = self.ctx.eot;
        self.writer(to_val).push(&[eot])?;
        Ok(chunks.lines)
    }

    fn push_piece(&mut self, to_val: bool, piece: &[u8], line: u64, check: bool) -> Result<()> {
        let text = std::str::from_utf8(piece).map_err(|_| {
            anyhow!(
                "{}:{line}: the file changed while it was being read",
                self.source.path.display()
            )
        })?;
        self.push_text(to_val, text, line, check)
    }

    /// First pass over a long `.txt`: CRC-32 and length of its text, or `None` (recorded as
    /// bad input) when it is not valid UTF-8 or cannot be read.
    fn prepass(&mut self) -> Result<Option<(u32, u64)>> {
        let mut chunks = match reader::open(self.source, 0, 0, None) {
            Ok(r) => Chunks::new(r),
            Err(e) => return self.bad(None, format!("cannot open: {e}")).map(|()| None),
        };
        let mut hasher = crc32fast::Hasher::new();
        let (mut len, mut piece) = (0u64, Vec::new());
        loop {
            let before = chunks.lines;
            match chunks.next_piece(&mut piece) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    let what = self.stream_error(before, e);
                    return self.bad(None, what).map(|()| None);
                }
            }
            if let Err(e) = std::str::from_utf8(&piece) {
                let line = before + 1 + count_newlines(&piece[..e.valid_up_to()]);
                return self.bad(Some(line), "invalid UTF-8".into()).map(|()| None);
            }
            hasher.update(&piece);
            len += piece.len() as u64;
        }
        Ok(Some((hasher.finalize(), len)))
    }
}

//! `vet-data tokenizer`: trains a byte-level BPE tokenizer (GPT-2 style) on `.txt` / `.jsonl`
//! corpora with the Hugging Face `tokenizers` crate and saves a `tokenizer.json` that any
//! `tokenizers` (Rust or Python) loads.
//!
//! **Vocabulary layout.** The special tokens [`SPECIAL_TOKENS`] take ids 0..4 in that order, then
//! any `--special` extras, then the 256 byte tokens (the whole ByteLevel alphabet, so every byte
//! sequence encodes, whatever the training text held), then merges until `--vocab-size`.
//!
//! **Inputs.** A `.txt` file gives one text per line (its line ending kept); a `.jsonl` file gives,
//! for each record, every `--field` the record has, each as its own text (a record with none of
//! them is an error naming the file and line). So the corpus and QA pairs train one tokenizer:
//! `--input corpus.jsonl qa.jsonl --field text --field question --field answer`. `.gz` / `.zst`
//! variants are decompressed on the fly; folders are walked, in sorted order (the walk and the
//! decompression are [`crate::data::inputs`], shared with `vet-data prepare`). Texts stream
//! through the trainer: only the word counts are held in memory, never the corpus. Literal
//! special tokens inside a text are cut out before counting, as encoding would cut them.
//!
//! **Determinism.** Training twice on the same inputs writes byte-identical files, whatever the
//! thread count (`RAYON_NUM_THREADS`, `TOKENIZERS_PARALLELISM`) or hash seeds: the trainer sums
//! word and pair counts as integers, orders merges by (count, token ids) and serialises the
//! vocabulary by id. `trainer/tests/tokenizer.rs` checks it in-process and across processes.

use std::fs::File;
use std::io::{BufRead, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, NormalizerWrapper, OffsetReferential, OffsetType, PreTokenizer, Tokenizer, Trainer,
};

use crate::data::inputs::{self, InputFile, Kind};
use crate::tokenizer::SPECIAL_TOKENS;

/// Number of byte tokens every byte-level vocabulary holds.
pub const BYTE_TOKENS: usize = 256;

/// Text read again after training to report the compression ratio (the first 16 MiB).
pub const SAMPLE_BYTES: u64 = 16 << 20;

/// Arguments of `vet-data tokenizer`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Corpus files or folders: .txt (one text per line) or .jsonl, optionally .gz / .zst / .zstd.
    /// Folders are walked in sorted order.
    #[arg(long, required = true, num_args = 1.., value_name = "PATH")]
    pub input: Vec<PathBuf>,
    /// Size of the vocabulary, special and byte tokens included.
    #[arg(long, value_name = "N")]
    pub vocab_size: usize,
    /// Where to write tokenizer.json (atomically).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Field of .jsonl records to train on; repeat it to train on several (each is one text).
    #[arg(long = "field", default_value = "text", value_name = "NAME")]
    pub fields: Vec<String>,
    /// Fewest occurrences of a pair for it to become a merge.
    #[arg(long, default_value_t = 2)]
    pub min_frequency: u64,
    /// Extra special token, given the ids right after the built-in ones; repeatable.
    #[arg(long = "special", value_name = "TOKEN")]
    pub special: Vec<String>,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

/// What to train: the library form of [`Args`].
#[derive(Clone, Debug)]
pub struct Options {
    /// Files or folders to read.
    pub inputs: Vec<PathBuf>,
    /// Vocabulary size, special and byte tokens included.
    pub vocab_size: usize,
    /// Fields of `.jsonl` records to train on.
    pub fields: Vec<String>,
    /// Fewest occurrences of a pair for it to become a merge.
    pub min_frequency: u64,
    /// Special tokens after [`SPECIAL_TOKENS`].
    pub extra_special: Vec<String>,
    /// Draw progress bars on stderr.
    pub progress: bool,
}

impl Options {
    /// Defaults of the command line: field `text`, min frequency 2, no extras, no progress.
    pub fn new(inputs: Vec<PathBuf>, vocab_size: usize) -> Self {
        Options {
            inputs,
            vocab_size,
            fields: vec!["text".to_string()],
            min_frequency: 2,
            extra_special: Vec::new(),
            progress: false,
        }
    }

    /// Every special token in id order: [`SPECIAL_TOKENS`] then the extras.
    pub fn special_tokens(&self) -> Vec<String> {
        let builtin = SPECIAL_TOKENS.iter().map(|s| s.to_string());
        builtin.chain(self.extra_special.iter().cloned()).collect()
    }

    fn validate(&self) -> Result<()> {
        let specials = self.special_tokens();
        for (i, s) in specials.iter().enumerate() {
            if s.is_empty() {
                bail!("special tokens must not be empty");
            }
            if specials[..i].contains(s) {
                bail!("special token {s:?} is given twice");
            }
        }
        let floor = BYTE_TOKENS + specials.len();
        if self.vocab_size <= floor {
            bail!(
                "vocab size {} leaves no room for merges: it must exceed {BYTE_TOKENS} byte tokens + {} special tokens = {floor}",
                self.vocab_size,
                specials.len()
            );
        }
        if self.vocab_size > u32::MAX as usize {
            bail!("vocab size {} does not fit u32 token ids", self.vocab_size);
        }
        if self.fields.is_empty() || self.fields.iter().any(|f| f.is_empty()) {
            bail!("--field needs at least one non-empty field name");
        }
        Ok(())
    }
}

/// What the trainer read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CorpusStats {
    /// Input files after walking folders.
    pub files: usize,
    /// Texts fed to the trainer (lines of .txt, fields of .jsonl records; empty ones skipped).
    pub texts: u64,
    /// UTF-8 bytes of those texts.
    pub bytes: u64,
}

/// Trains the tokenizer `opts` describes. Errors name the file (and line) at fault.
pub fn train(opts: &Options) -> Result<Tokenizer> {
    Ok(train_with_stats(opts)?.0)
}

/// [`train`], also returning what was read.
pub fn train_with_stats(opts: &Options) -> Result<(Tokenizer, CorpusStats)> {
    opts.validate()?;
    let files = inputs::discover(&opts.inputs, &mut |w| eprintln!("warning: {w}"))?;
    let specials: Vec<AddedToken> = opts
        .special_tokens()
        .into_iter()
        .map(|s| AddedToken::from(s, true))
        .collect();
    let byte_level = ByteLevel::default().add_prefix_space(false);

    // An empty tokenizer that knows the special tokens, to cut them out of texts as encoding will.
    let mut shell = Tokenizer::new(BPE::default());
    shell.add_special_tokens(&specials);
    let mut trainer = BpeTrainer::builder()
        .vocab_size(opts.vocab_size)
        .min_frequency(opts.min_frequency)
        .special_tokens(specials.clone())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .show_progress(false)
        .build();

    let bar = read_bar(&files, opts.progress)?;
    let failure = Mutex::new(None);
    let counters = Counters::default();
    let texts = Texts::new(
        &files,
        &opts.fields,
        &failure,
        &counters,
        bar.clone(),
        u64::MAX,
    );
    trainer
        .feed(texts, |text| words(&shell, &byte_level, text))
        .map_err(|e| anyhow!("pre-tokenizing the corpus: {e}"))?;
    bar.finish_and_clear();
    check(failure)?;
    let stats = CorpusStats {
        files: files.len(),
        texts: counters.texts.load(Ordering::Relaxed),
        bytes: counters.bytes.load(Ordering::Relaxed),
    };
    if stats.bytes == 0 {
        bail!("no text to train on in {}", list(&files));
    }

    let spinner = spinner("computing merges", opts.progress);
    let mut bpe = BPE::default();
    trainer
        .train(&mut bpe)
        .map_err(|e| anyhow!("training the BPE: {e}"))?;
    spinner.finish_and_clear();

    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(byte_level));
    tok.with_decoder(Some(byte_level));
    tok.with_post_processor(Some(byte_level.trim_offsets(false)));
    tok.add_special_tokens(&specials);
    for (id, s) in specials.iter().enumerate() {
        if tok.token_to_id(&s.content) != Some(id as u32) {
            bail!(
                "trained tokenizer: special token {:?} is not id {id}",
                s.content
            );
        }
    }
    Ok((tok, stats))
}

/// The ByteLevel words of `text`, special tokens cut out: what the trainer counts.
fn words(shell: &Tokenizer, byte_level: &ByteLevel, text: &str) -> tokenizers::Result<Vec<String>> {
    let mut pre = shell
        .get_added_vocabulary()
        .extract_and_normalize(None::<&NormalizerWrapper>, text);
    byte_level.pre_tokenize(&mut pre)?;
    Ok(pre
        .get_splits(OffsetReferential::Original, OffsetType::Byte)
        .into_iter()
        .filter(|(_, _, tokens)| tokens.is_none())
        .map(|(s, _, _)| s.to_owned())
        .collect())
}

/// Bytes and tokens of some text under a tokenizer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ratio {
    /// UTF-8 bytes of the text.
    pub bytes: u64,
    /// Tokens it encodes to (no special tokens added).
    pub tokens: u64,
}

impl Ratio {
    /// Adds `text` encoded with `tok`.
    pub fn add(&mut self, tok: &Tokenizer, text: &str) -> Result<()> {
        let enc = tok
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        self.bytes += text.len() as u64;
        self.tokens += enc.get_ids().len() as u64;
        Ok(())
    }

    /// Bytes per token (higher is more compact; 1.0 is no better than bytes).
    pub fn bytes_per_token(&self) -> f64 {
        self.bytes as f64 / self.tokens.max(1) as f64
    }
}

/// Compression of `tok` on the first `max_bytes` of the texts `opts` names.
pub fn sample_ratio(tok: &Tokenizer, opts: &Options, max_bytes: u64) -> Result<Ratio> {
    // Warnings were given when training.
    let files = inputs::discover(&opts.inputs, &mut |_| {})?;
    let failure = Mutex::new(None);
    let counters = Counters::default();
    let hidden = ProgressBar::hidden();
    let mut ratio = Ratio::default();
    for text in Texts::new(&files, &opts.fields, &failure, &counters, hidden, max_bytes) {
        ratio.add(tok, &text)?;
    }
    check(failure)?;
    Ok(ratio)
}

/// The error a [`Texts`] stream stopped on, if any.
fn check(failure: Mutex<Option<anyhow::Error>>) -> Result<()> {
    match failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Runs `vet-data tokenizer`: trains, saves `--out` atomically and prints a summary.
pub fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let opts = Options {
        inputs: args.input,
        vocab_size: args.vocab_size,
        fields: args.fields,
        min_frequency: args.min_frequency,
        extra_special: args.special,
        progress: !args.quiet,
    };
    let (tok, stats) = train_with_stats(&opts)?;
    let json = tok
        .to_string(true)
        .map_err(|e| anyhow!("serialising the tokenizer: {e}"))?;
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    reference::fs::atomic_write(&args.out, json.as_bytes())
        .with_context(|| format!("writing {}", args.out.display()))?;
    let trained = started.elapsed();

    let ratio = sample_ratio(&tok, &opts, SAMPLE_BYTES)?;
    let n_special = opts.special_tokens().len();
    let vocab = tok.get_vocab_size(true);
    let merges = vocab.saturating_sub(n_special + BYTE_TOKENS);
    let summary = format!(
        "tokenizer: {vocab} tokens = {n_special} special + {BYTE_TOKENS} bytes + {merges} merges (asked {})\n\
         trained on {} texts, {:.2} MB in {} files\n\
         compression on the training text (first {:.2} MB): {:.3} bytes/token, {:.3} tokens/byte\n\
         wrote {} in {:.1} s\n",
        opts.vocab_size,
        stats.texts,
        stats.bytes as f64 / 1e6,
        stats.files,
        ratio.bytes as f64 / 1e6,
        ratio.bytes_per_token(),
        1.0 / ratio.bytes_per_token(),
        args.out.display(),
        trained.as_secs_f64()
    );
    // A closed stdout (`| head`) is not a failure: the tokenizer is already saved.
    let _ = std::io::stdout().write_all(summary.as_bytes());
    Ok(())
}

/// The corpus files `inputs` name: [`inputs::discover`] (files as given, folders walked in
/// sorted order; other kinds of file in folders skipped with a warning).
pub fn input_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    Ok(
        inputs::discover(inputs, &mut |w| eprintln!("warning: {w}"))?
            .into_iter()
            .map(|f| f.path)
            .collect(),
    )
}

fn list(files: &[InputFile]) -> String {
    let names: Vec<String> = files.iter().map(|f| f.path.display().to_string()).collect();
    names.join(", ")
}

/// A reader that moves a progress bar by the (compressed) bytes it reads.
struct Counting<R> {
    inner: R,
    bar: ProgressBar,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

fn open(file: &InputFile, bar: ProgressBar) -> Result<Box<dyn BufRead + Send>> {
    let path = &file.path;
    let raw = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    inputs::decode(Counting { inner: raw, bar }, file.compression)
        .with_context(|| format!("opening the compressed stream {}", path.display()))
}

/// A bar over the input files' bytes on disk, hidden unless `show`.
fn read_bar(files: &[InputFile], show: bool) -> Result<ProgressBar> {
    if !show {
        return Ok(ProgressBar::hidden());
    }
    let mut total = 0;
    for f in files {
        total += std::fs::metadata(&f.path)
            .with_context(|| format!("reading {}", f.path.display()))?
            .len();
    }
    let style = ProgressStyle::with_template(
        "reading corpus [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
    )
    .map_err(|e| anyhow!("progress bar template: {e}"))?;
    Ok(ProgressBar::new(total).with_style(style))
}

fn spinner(msg: &'static str, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner().with_message(msg);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

#[derive(Default)]
struct Counters {
    texts: AtomicU64,
    bytes: AtomicU64,
}

/// The texts of the input files, in order, as one stream. On a bad file or line it stores the
/// error in `failure` and ends; the caller checks `failure` afterwards.
struct Texts<'a> {
    files: std::slice::Iter<'a, InputFile>,
    fields: &'a [String],
    failure: &'a Mutex<Option<anyhow::Error>>,
    counters: &'a Counters,
    bar: ProgressBar,
    /// Stop once this many bytes of text were yielded.
    limit: u64,
    current: Option<OpenFile>,
    /// Texts of the current .jsonl record not yet yielded, in reverse order.
    pending: Vec<String>,
    done: bool,
}

struct OpenFile {
    path: PathBuf,
    kind: Kind,
    reader: Box<dyn BufRead + Send>,
    line_no: u64,
}

impl<'a> Texts<'a> {
    fn new(
        files: &'a [InputFile],
        fields: &'a [String],
        failure: &'a Mutex<Option<anyhow::Error>>,
        counters: &'a Counters,
        bar: ProgressBar,
        limit: u64,
    ) -> Self {
        Texts {
            files: files.iter(),
            fields,
            failure,
            counters,
            bar,
            limit,
            current: None,
            pending: Vec::new(),
            done: false,
        }
    }

    fn fail(&mut self, e: anyhow::Error) -> Option<String> {
        self.done = true;
        let mut slot = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(e);
        None
    }

    /// The next non-empty text, `Ok(None)` at the end of the inputs.
    fn next_text(&mut self) -> Result<Option<String>> {
        let mut line = String::new();
        loop {
            if let Some(t) = self.pending.pop() {
                return Ok(Some(t));
            }
            let Some(file) = self.current.as_mut() else {
                let Some(input) = self.files.next() else {
                    return Ok(None);
                };
                let reader = open(input, self.bar.clone())?;
                self.current = Some(OpenFile {
                    path: input.path.clone(),
                    kind: input.kind,
                    reader,
                    line_no: 0,
                });
                continue;
            };
            line.clear();
            file.line_no += 1;
            let n = file
                .reader
                .read_line(&mut line)
                .with_context(|| format!("{}:{}: reading", file.path.display(), file.line_no))?;
            if n == 0 {
                self.current = None;
                continue;
            }
            match file.kind {
                Kind::Txt => {
                    if !line.trim().is_empty() {
                        return Ok(Some(std::mem::take(&mut line)));
                    }
                }
                Kind::Jsonl => {
                    if line.trim().is_empty() {
                        continue;
                    }
                    let mut texts = record_texts(&line, self.fields)
                        .map_err(|e| anyhow!("{}:{}: {e}", file.path.display(), file.line_no))?;
                    texts.reverse();
                    self.pending = texts;
                }
            }
        }
    }
}

/// The non-empty `fields` of one JSON Lines record, in `fields` order.
fn record_texts(line: &str, fields: &[String]) -> Result<Vec<String>> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| anyhow!("not valid JSON: {e}"))?;
    let obj = value
        .as_object()
        .ok_or_else(|| anyhow!("a JSON Lines record must be an object"))?;
    let mut texts = Vec::new();
    let mut found = false;
    for field in fields {
        match obj.get(field) {
            None => {}
            Some(serde_json::Value::String(s)) => {
                found = true;
                if !s.is_empty() {
                    texts.push(s.clone());
                }
            }
            Some(_) => bail!("field {field:?} is not a string"),
        }
    }
    if !found {
        bail!("record has none of the fields {fields:?} (choose them with --field)");
    }
    Ok(texts)
}

impl Iterator for Texts<'_> {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        if self.done || self.counters.bytes.load(Ordering::Relaxed) >= self.limit {
            return None;
        }
        match self.next_text() {
            Ok(Some(text)) => {
                self.counters.texts.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .bytes
                    .fetch_add(text.len() as u64, Ordering::Relaxed);
                Some(text)
            }
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => self.fail(e),
        }
    }
}

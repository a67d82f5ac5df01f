//! `vet-chat`: ask a Vet-Mamba checkpoint questions — interactively, once, or a file at a time.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;

use anyhow::{bail, Context, Result};
use clap::Parser;
use reference::MambaConfig;
use trainer::chat::{batch, repl, ChatConfig, Session};
use trainer::data::qa::QaTemplate;
use trainer::device::{self, EngineOptions, WeightDtype};
use trainer::generate::{generate, Sampling};
use trainer::tokenizer;

#[derive(Parser)]
#[command(
    name = "vet-chat",
    version,
    about = "Ask a Vet-Mamba (Mamba-1) checkpoint veterinary questions",
    long_about = "Ask a Vet-Mamba (Mamba-1) checkpoint veterinary questions.\n\n\
        With no --question, --prompt, --input or --tokens it is an interactive chat: one question \
        per line, the answer streams as it is written, and the conversation continues from the \
        model's state (earlier turns are not re-read). /reset starts over, /help lists the \
        commands, /quit or Ctrl-D leaves; Ctrl-C stops the answer being written. After each answer one timing line goes to stderr.\n\n\
        Questions are wrapped in the fine-tuning QA template \
        (\"<|question|> {question}\\n<|answer|> \"); answers end at <|endoftext|>, a --stop \
        string or --max-new-tokens.\n\n\
        Sampling applies, in this order: repetition penalty, temperature, top-k, top-p. \
        --greedy (or --temperature 0) takes the most likely token instead and is deterministic.",
    allow_negative_numbers = true
)]
struct Cli {
    /// Checkpoint directory: config.json + the weights (model.safetensors, a sharded
    /// model.safetensors.index.json, or mamba_ssm's pytorch_model.bin) + tokenizer.json.
    #[arg(long)]
    model: PathBuf,
    /// A tokenizer.json to use instead of the checkpoint's own (mamba_ssm checkpoints ship
    /// none: theirs is GPT-NeoX's).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// cpu (the fastest CPU engine available), reference (the f32 spec), cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Weight storage: f32, bf16, int8 or int4 on --device cpu; on cuda, int8 (in_proj,
    /// x_proj and out_proj as int8 rows, read by the decode step: half the bytes of bf16).
    /// Default: the checkpoint's own (int8 / int4 from `vet-train quantize`), else f32.
    #[arg(long)]
    dtype: Option<WeightDtype>,
    /// GEMM precision on --device cuda: bf16, fp16 or f32 (the scan state, the residual
    /// stream, A_log and D are f32 in every case).
    #[arg(long, default_value = "bf16", value_parser = ["bf16", "fp16", "f32"])]
    precision: String,
    /// CPU worker threads (0 = every core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[command(flatten)]
    mode: Mode,
    /// Batch mode: where the answers go (JSON Lines; appended to, so an interrupted run
    /// resumes where it stopped).
    #[arg(long, requires = "input")]
    output: Option<PathBuf>,
    /// Batch mode: the field each answer is written to.
    #[arg(long, default_value = "answer", requires = "input")]
    answer_field: String,
    /// Batch mode: questions decoded together (continuous batching: a finished answer's row
    /// takes the next question). On --device cuda the tokens are drawn on the GPU.
    #[arg(long, default_value_t = batch::GROUP as u64, requires = "input", value_parser = clap::value_parser!(u64).range(1..=4096))]
    batch: u64,
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// What to answer (at most one; none = interactive).
#[derive(clap::Args)]
#[group(multiple = false)]
struct Mode {
    /// Answer one question (wrapped in the QA template) and exit.
    #[arg(long)]
    question: Option<String>,
    /// Continue raw text (no template) and exit; prints only the continuation.
    #[arg(long)]
    prompt: Option<String>,
    /// Batch mode: a JSON Lines file of objects with a "question" field (needs --output).
    #[arg(long, requires = "output")]
    input: Option<PathBuf>,
    /// Generate from comma-separated token ids and print the new ids on one line: exactly
    /// --max-new-tokens of them, no stop token, no tokenizer needed (for cross-checks with
    /// other implementations, usually with --greedy).
    #[arg(long, value_delimiter = ',', num_args = 1)]
    tokens: Option<Vec<String>>,
}

#[derive(clap::Args)]
struct SamplingArgs {
    /// Always take the most likely token (deterministic). Repetition penalty is off unless
    /// given; --top-k 1 is greedy with the default penalty.
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p"])]
    greedy: bool,
    /// Softmax temperature (0 = greedy).
    #[arg(long, default_value_t = 0.7)]
    temperature: f64,
    /// Draw only from the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Draw only from the most likely tokens whose probabilities sum to P (1 = off).
    #[arg(long, default_value_t = 0.9)]
    top_p: f64,
    /// Penalty on tokens already in the question or the answer (1 = off)
    /// [default: 1.1, or 1.0 with --greedy].
    #[arg(long)]
    repetition_penalty: Option<f32>,
    /// Random seed [default: drawn from the clock and printed, so a run can be repeated].
    #[arg(long)]
    seed: Option<u64>,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Cut the answer before this string and stop (repeatable).
    #[arg(long = "stop", value_name = "STRING")]
    stops: Vec<String>,
}

impl SamplingArgs {
    fn sampling(&self, seed: u64) -> Sampling {
        let greedy = self.greedy;
        Sampling {
            temperature: if greedy { 0.0 } else { self.temperature },
            top_k: if greedy { 0 } else { self.top_k },
            top_p: if greedy { 1.0 } else { self.top_p },
            max_new_tokens: self.max_new_tokens,
            seed,
            stop_token: None,
            repetition_penalty: self
                .repetition_penalty
                .unwrap_or(if greedy { 1.0 } else { 1.1 }),
        }
    }
}

fn clock_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    reference::rng::fnv1a64(&format!("{t}:{}", std::process::id()))
}

/// Token ids from `--tokens`, each checked against the vocabulary.
fn parse_tokens(raw: &[String], vocab: usize) -> Result<Vec<u32>> {
    let ids = raw
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| {
            let id: u32 = s
                .parse()
                .with_context(|| format!("--tokens: {s:?} is not a token id"))?;
            if id as usize >= vocab {
                bail!("--tokens: id {id} is outside the model's vocabulary of {vocab}");
            }
            Ok(id)
        })
        .collect::<Result<Vec<u32>>>()?;
    if ids.is_empty() {
        bail!("--tokens: no token ids given");
    }
    Ok(ids)
}

/// Names the first missing file of the checkpoint in `dir` before anything slow starts, and
/// finds its tokenizer (`--tokenizer`, else `dir/tokenizer.json`) when `tokenizer` is set.
fn check_checkpoint(
    dir: &Path,
    tokenizer: bool,
    explicit: Option<&Path>,
) -> Result<Option<PathBuf>> {
    trainer::checkpoint::check_dir(dir)?;
    if !tokenizer {
        return Ok(None);
    }
    trainer::checkpoint::tokenizer_file(dir, explicit).map(Some)
}

/// `--threads`, capped at 4× the cores with a warning: far more threads than cores only
/// adds switching (10,000 made 5 tokens take 34 s).
fn capped_threads(threads: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let cap = 4 * cores;
    if threads > cap {
        eprintln!("warning: --threads {threads} is far above the {cores} cores here; using {cap}");
        return cap;
    }
    threads
}

/// Refuses flag combinations that would be silently ignored or would do nothing.
fn check_flags(cli: &Cli) -> Result<()> {
    if let Some(out) = &cli.output {
        if cli.mode.input.is_none() {
            bail!(
                "--output {} is for batch mode (--input FILE); --question, --prompt and --tokens print to stdout",
                out.display()
            );
        }
    }
    if let (Some(input), Some(output)) = (&cli.mode.input, &cli.output) {
        let same = match (input.canonicalize(), output.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => input == output,
        };
        if same {
            bail!(
                "--input and --output are the same file ({}): the answers are appended to --output, so give another file",
                output.display()
            );
        }
    }
    Ok(())
}

fn load_engine(cli: &Cli) -> Result<(Box<dyn reference::InferenceEngine>, MambaConfig)> {
    let precision = match cli.precision.as_str() {
        "fp16" => gpu::Precision::Fp16,
        "f32" => gpu::Precision::F32,
        _ => gpu::Precision::Bf16,
    };
    if precision != gpu::Precision::Bf16 && !cli.device.starts_with("cuda") {
        bail!(
            "--precision {} applies to --device cuda; on the CPU --dtype sets the weights' precision",
            cli.precision
        );
    }
    let opts = EngineOptions {
        threads: capped_threads(cli.threads),
        dtype: cli
            .dtype
            .unwrap_or_else(|| device::checkpoint_dtype(&cli.model, &cli.device)),
        precision,
    };
    device::load_for_inference(&cli.model, &cli.device, &opts)
        .with_context(|| format!("loading {} on --device {}", cli.model.display(), cli.device))
}

fn run_tokens(cli: &Cli, raw: &[String], seed: u64) -> Result<()> {
    check_checkpoint(&cli.model, false, None)?;
    let (mut engine, cfg) = load_engine(cli)?;
    let ids = parse_tokens(raw, cfg.vocab_size)?;
    let s = cli.sampling.sampling(seed);
    let new = generate(engine.as_mut(), &ids, &s, |_| {})?;
    let line: Vec<String> = new.iter().map(u32::to_string).collect();
    println!("{}", line.join(","));
    Ok(())
}

fn open_session(cli: &Cli, seed: u64) -> Result<Session> {
    let dir = &cli.model;
    let tok_path = check_checkpoint(dir, true, cli.tokenizer.as_deref())?
        .context("a chat needs a tokenizer")?;
    // The config and tokenizer first: they are quick to check, the weights are not.
    let cfg = MambaConfig::load(&dir.join("config.json"))
        .with_context(|| format!("loading checkpoint {}", dir.display()))?;
    let tok = tokenizer::load(&tok_path, cfg.vocab_size)
        .with_context(|| format!("loading tokenizer {}", tok_path.display()))?;
    let (engine, _) = load_engine(cli)?;
    let chat = ChatConfig {
        sampling: cli.sampling.sampling(seed),
        stop_strings: cli.sampling.stops.clone(),
        template: QaTemplate::default(),
    };
    let session = Session::new(engine, tok, chat)?;
    if !session.has_eot() {
        eprintln!(
            "warning: the tokenizer has no {}: answers end only at --max-new-tokens or --stop",
            tokenizer::EOT
        );
    }
    Ok(session)
}

fn one_shot(session: &mut Session, text: &str, templated: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let a = if templated {
        session.ask(text, &mut out)?
    } else {
        session.complete(text, &mut out)?
    };
    writeln!(out)?;
    out.flush()?;
    eprintln!("{}", a.timing_line());
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    check_flags(&cli)?;
    let seed = cli.sampling.seed.unwrap_or_else(clock_seed);
    let sampling = cli.sampling.sampling(seed);
    sampling.check()?;
    if let Some(raw) = &cli.mode.tokens {
        if !cli.sampling.stops.is_empty() {
            bail!("--stop needs text; --tokens mode works on ids only");
        }
        return run_tokens(&cli, raw, seed);
    }
    if let Some(q) = &cli.mode.question {
        if q.trim().is_empty() {
            bail!("--question: the question is empty");
        }
    }
    if cli.mode.prompt.as_deref() == Some("") {
        bail!("--prompt: the prompt is empty");
    }
    let mut session = open_session(&cli, seed)?;
    if !sampling.is_greedy() && cli.sampling.seed.is_none() {
        eprintln!("sampling with seed {seed} (pass --seed {seed} to repeat)");
    }
    if let Some(q) = &cli.mode.question {
        return one_shot(&mut session, q, true);
    }
    if let Some(p) = &cli.mode.prompt {
        return one_shot(&mut session, p, false);
    }
    if let (Some(input), Some(output)) = (&cli.mode.input, &cli.output) {
        let o = batch::BatchOptions {
            input: input.clone(),
            output: output.clone(),
            answer_field: cli.answer_field.clone(),
            seed,
            progress: true,
            batch: cli.batch as usize,
        };
        let s = batch::run(&mut session, &o)?;
        eprintln!("{}", s.line(output));
        return Ok(());
    }
    interactive(&mut session, &cli.model)
}

fn interactive(session: &mut Session, model: &Path) -> Result<()> {
    let flags = session.interrupt();
    ctrlc::set_handler(move || {
        if flags.busy.load(Ordering::SeqCst) {
            flags.stop.store(true, Ordering::SeqCst);
        } else {
            // No printing here: the main thread may hold stderr's lock.
            std::process::exit(130);
        }
    })
    .context("installing the Ctrl-C handler")?;
    let stdin = std::io::stdin();
    let terminal = stdin.is_terminal();
    eprintln!(
        "vet-chat: {} on {}. Type a question; /help for commands, /quit to leave.",
        model.display(),
        session.engine_name()
    );
    repl::run(
        session,
        &mut stdin.lock(),
        // Unlocked handles: the Ctrl-C handler's exit flushes stdout, which a lock held for
        // the whole session would deadlock.
        &mut std::io::stdout(),
        &mut std::io::stderr(),
        terminal.then_some("> "),
    )
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

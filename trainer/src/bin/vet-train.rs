//! `vet-train`: Vet-Mamba's command-line tool.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use trainer::train::deepspeed::{apply_deepspeed_world, DsConfig};
use trainer::train::run::{train, RunOptions};
use trainer::train::run_config::{RunConfig, Stage};
use trainer::{checkpoint, debug_state, device, generate, tokenizer};

#[derive(Parser)]
#[command(
    name = "vet-train",
    version,
    about = "Train, run and debug Vet-Mamba (Mamba-1) language models",
    long_about = "Train, run and debug Vet-Mamba (Mamba-1) language models.\n\n\
        `vet-train --config run.toml [--device reference|cpu|cuda[:N]] [--resume]` runs the job a TOML \
        run config describes (bundled ones are in trainer/configs/).",
    args_conflicts_with_subcommands = true,
    allow_negative_numbers = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

/// Running a training job from a config.
#[derive(clap::Args)]
struct RunArgs {
    /// TOML run config (see trainer/configs/).
    #[arg(long)]
    config: Option<PathBuf>,
    /// cpu (the fast CPU tier), cuda[:N] (the GPU tier), reference (the f32 spec, scalar and
    /// bit-exact) or reference-f64.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// CPU worker threads for --device cpu (0 = every core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Continue from the newest checkpoint in the run's output directory.
    #[arg(long)]
    resume: bool,
    /// A DeepSpeed ds_config.json; its values override the TOML ("auto" keeps the TOML's).
    #[arg(long)]
    deepspeed: Option<PathBuf>,
    /// Override train.steps.
    #[arg(long)]
    steps: Option<u64>,
    /// Override out_dir.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Override optim.lr.
    #[arg(long)]
    lr: Option<f64>,
    /// Override model.init_from: start from this checkpoint's weights (Hugging Face,
    /// sharded, or mamba_ssm's pytorch_model.bin) with a fresh optimizer.
    #[arg(long)]
    init_from: Option<PathBuf>,
    /// Start afresh in an out_dir that holds another run's checkpoints, deleting them (and its
    /// metrics.jsonl); without it such a run is refused.
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the ranks of a job on this node (one per GPU with --device cuda), torchrun style:
    /// `vet-train launch --nproc-per-node 8 -- --config run.toml --device cuda`.
    Launch(trainer::launch::launcher::LaunchArgs),
    /// Check the TCP collectives inside launched ranks (for tests).
    #[command(hide = true)]
    CommSelftest(trainer::launch::selftest::SelftestArgs),
    /// Draw a run's loss curve (metrics.jsonl) as a PNG.
    Plot {
        /// Run directory (holding metrics.jsonl) or a metrics.jsonl file.
        run: PathBuf,
        /// Output PNG [default: RUN/loss_curve.png].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Dump logits, loss and every gradient for given tokens, to compare with other implementations.
    DebugState {
        /// Checkpoint directory (config.json + model.safetensors, a sharded
        /// model.safetensors.index.json, or mamba_ssm's pytorch_model.bin).
        #[arg(long)]
        model: PathBuf,
        /// safetensors file holding `input_ids` (i64, [batch, seq_len]).
        #[arg(long)]
        tokens: PathBuf,
        /// Where to write logits, loss and grad.<name> (safetensors).
        #[arg(long)]
        out: PathBuf,
        /// reference (f32), reference-f64, cpu or cuda[:N].
        #[arg(long, default_value = "reference")]
        device: String,
    },
    /// Continue a prompt with a checkpoint (greedy unless --temperature is set).
    #[command(allow_negative_numbers = true)]
    Generate(GenerateArgs),
    /// Long-context evaluation (`--long`): perplexity by position bucket (0-512, 512-2k, ...) over
    /// long documents read in windows, the state carried: long_eval.json and long_eval.png.
    Eval {
        /// Required: the long-context evaluation is the one this verb runs (a config's
        /// `stage = "eval"` runs the others).
        #[arg(long, required = true)]
        long: bool,
        /// Checkpoint directory; repeat to compare several models on one plot.
        #[arg(long, required = true)]
        model: Vec<PathBuf>,
        #[command(flatten)]
        opts: trainer::train::long_eval::LongEvalOptions,
    },
    /// Write a checkpoint's weights in another precision for inference: `bf16` (a Hugging
    /// Face checkpoint, half the size), `int8` (per-row scales, a quarter of the size) or
    /// `int4` (a scale per group of 32, about a sixth); int8 / int4 load memory-mapped with
    /// `vet-chat --dtype int8|int4`, not by transformers.
    Quantize {
        /// Checkpoint directory (config.json + the weights in any layout [+ tokenizer.json]).
        #[arg(long)]
        model: PathBuf,
        /// New checkpoint directory (written atomically; tokenizer.json is copied). It must be
        /// new or empty, or hold a checkpoint that --force replaces.
        #[arg(long)]
        out: PathBuf,
        /// Replace the checkpoint already in --out (other files are never deleted).
        #[arg(long)]
        force: bool,
        /// bf16, int8 or int4.
        #[arg(long, default_value = "int8")]
        dtype: String,
    },
    /// Write a checkpoint (model.safetensors, sharded, or mamba_ssm's pytorch_model.bin) in
    /// another layout: `mamba_ssm` (config.json + pytorch_model.bin, which mamba_ssm's
    /// MambaLMHeadModel.from_pretrained loads) or `hf` (config.json + model.safetensors, split
    /// into shards above --max-shard-size). tokenizer.json is copied when there is one.
    Convert {
        /// Checkpoint directory to read.
        #[arg(long)]
        model: PathBuf,
        /// mamba_ssm or hf.
        #[arg(long)]
        to: trainer::convert::Target,
        /// New checkpoint directory (written atomically).
        #[arg(long)]
        out: PathBuf,
        /// f32, bf16 or f16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// --to hf: the largest shard, as transformers' max_shard_size ("5GB", "500MB", "2GiB"
        /// or bytes).
        #[arg(long, default_value = "5GB")]
        max_shard_size: String,
        /// A tokenizer.json to copy into --out instead of the checkpoint's own.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Replace the checkpoint already in --out (other files are never deleted).
        #[arg(long)]
        force: bool,
    },
    /// Write a checkpoint as a GGUF file in llama.cpp's `mamba` architecture (weights and
    /// tokenizer), for llama.cpp, ollama and LM Studio.
    Export {
        /// Checkpoint directory (config.json + model.safetensors + tokenizer.json).
        #[arg(long)]
        model: PathBuf,
        /// Output format (gguf is the only one).
        #[arg(long, default_value = "gguf")]
        format: String,
        /// The .gguf file to write (atomically; an existing file is replaced).
        #[arg(long)]
        out: PathBuf,
        /// Type of the large matrices: f32, f16 or q8_0 (norms, conv, A, D and biases stay f32).
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
}

/// `vet-train convert`.
fn convert(
    model: &std::path::Path,
    out: &std::path::Path,
    mut o: trainer::convert::ConvertOptions,
    dtype: &str,
    max_shard_size: &str,
) -> Result<()> {
    o.dtype = match dtype {
        "f32" => reference::io::SaveDtype::F32,
        "bf16" => reference::io::SaveDtype::Bf16,
        "f16" => reference::io::SaveDtype::F16,
        _ => anyhow::bail!("--dtype {dtype}: expected f32, bf16 or f16"),
    };
    o.max_shard_bytes = reference::io::parse_size(max_shard_size)
        .map_err(|e| anyhow::anyhow!("--max-shard-size: {e}"))?;
    let files = trainer::convert::convert(model, out, &o)
        .with_context(|| format!("converting {} to {}", model.display(), out.display()))?;
    println!("{}: {}", out.display(), files.join(", "));
    Ok(())
}

/// `vet-train export`.
fn export(model: &std::path::Path, format: &str, out: &std::path::Path, dtype: &str) -> Result<()> {
    if format != "gguf" {
        anyhow::bail!("--format {format:?}: only gguf is supported");
    }
    let dt: trainer::export::ExportDtype = dtype.parse().map_err(anyhow::Error::msg)?;
    let s = trainer::export::export_gguf(model, out, dt)?;
    println!(
        "{}: GGUF (llama.cpp mamba), {dtype}, {} tensors, {} tokens, {:.1} MB",
        out.display(),
        s.tensors,
        s.vocab,
        s.bytes as f64 / 1e6
    );
    Ok(())
}

/// `vet-train quantize`.
fn quantize(
    model: &std::path::Path,
    out: &std::path::Path,
    dtype: &str,
    force: bool,
) -> Result<()> {
    let dt: trainer::device::WeightDtype = dtype.parse().map_err(anyhow::Error::msg)?;
    checkpoint::check_new_checkpoint_dir(out, model, force)?;
    let ck = checkpoint::load(model)?;
    let tok = model.join("tokenizer.json");
    checkpoint::save_dir_atomically(out, |tmp| {
        match dt {
            trainer::device::WeightDtype::Bf16 => {
                ck.config.save(&tmp.join("config.json"))?;
                let f = tmp.join("model.safetensors");
                reference::io::save_params(
                    &f,
                    &ck.config,
                    &ck.params,
                    reference::io::SaveDtype::Bf16,
                )?;
            }
            trainer::device::WeightDtype::Int8 | trainer::device::WeightDtype::Int4 => {
                let w = simd::model::Weights::from_params(&ck.config, &ck.params, dt);
                simd::load::save_quantized(tmp, &ck.config, &w)?;
            }
            trainer::device::WeightDtype::F32 => {
                anyhow::bail!("--dtype f32: the checkpoint is f32 already; use bf16, int8 or int4")
            }
        }
        if tok.exists() {
            std::fs::copy(&tok, tmp.join("tokenizer.json"))
                .with_context(|| format!("copying {}", tok.display()))?;
        }
        Ok(())
    })?;
    // The weights files (one, shards, or a pytorch_model.bin).
    let bytes = |d: &std::path::Path| -> u64 {
        std::fs::read_dir(d)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.ends_with(".safetensors") || n.ends_with(".bin")
            })
            .filter_map(|e| e.metadata().ok().map(|m| m.len()))
            .sum()
    };
    println!(
        "{}: {} weights, {:.1} MB (was {:.1} MB)",
        out.display(),
        dt.name(),
        bytes(out) as f64 / 1e6,
        bytes(model) as f64 / 1e6
    );
    Ok(())
}

/// `vet-train debug-state`.
fn debug_state_cmd(
    model: &std::path::Path,
    tokens: &std::path::Path,
    out: &std::path::Path,
    device: &str,
) -> Result<()> {
    let ck = checkpoint::load(model)?;
    let mut engine = device::engine(device, &ck.config, ck.params)?;
    let s = debug_state::run(engine.as_mut(), tokens, out)?;
    println!(
        "debug-state: {} on [{}, {}] tokens: loss {:.6}; wrote {} tensors to {}",
        engine.name(),
        s.batch,
        s.seq_len,
        s.loss,
        s.tensors,
        out.display()
    );
    Ok(())
}

fn run_job(a: RunArgs) -> Result<()> {
    let Some(path) = a.config else {
        // No config: the bundled quickstart (prepare, pretrain, fine-tune, evaluate, answer).
        // It takes --device, --threads and --out-dir; the flags that change a training job
        // have no single job to apply to there, so they are refused rather than ignored.
        let refused = [
            ("--steps", a.steps.is_some()),
            ("--lr", a.lr.is_some()),
            ("--resume", a.resume),
            ("--deepspeed", a.deepspeed.is_some()),
            ("--init-from", a.init_from.is_some()),
        ];
        let given: Vec<&str> = refused.iter().filter(|f| f.1).map(|f| f.0).collect();
        if !given.is_empty() {
            anyhow::bail!(
                "{} {} a training job's --config; without --config vet-train runs the bundled \
                 quickstart, which takes only --device, --threads and --out-dir \
                 (its own run configs are written under OUT/pretrain and OUT/finetune)",
                given.join(", "),
                if given.len() == 1 { "needs" } else { "need" }
            );
        }
        let mut o = trainer::quickstart::QuickstartOptions::full(
            a.out_dir.unwrap_or_else(|| "runs/quickstart".into()),
        );
        o.device = a.device;
        o.threads = a.threads;
        trainer::quickstart::run(&o)?;
        return Ok(());
    };
    let mut cfg = RunConfig::load(&path)?;
    // A rank of a job that a launcher started (vet-train launch, torchrun, srun, mpirun).
    let rank = trainer::dist::join::launched_rank()?;
    let world = rank.as_ref().map_or(1, |r| r.world);
    let mut zero = None;
    if let Some(ds) = &a.deepspeed {
        let ds = DsConfig::load(ds)?;
        for field in apply_deepspeed_world(&mut cfg, &ds, world)? {
            eprintln!("warning: DeepSpeed field `{field}` is not supported and has no effect");
        }
        zero = ds.zero.clone();
    }
    if let Some(s) = a.steps {
        cfg.train.steps = Some(s);
        cfg.train.epochs = None;
    }
    if let Some(o) = a.out_dir {
        cfg.out_dir = o;
    }
    if let Some(lr) = a.lr {
        cfg.optim.lr = lr;
    }
    if let Some(dir) = a.init_from {
        cfg.model.from = None;
        cfg.model.init_from = Some(dir);
    }
    cfg.validate()?;
    let opts = RunOptions {
        device: a.device,
        resume: a.resume,
        threads: a.threads,
        overwrite: a.overwrite,
        ..RunOptions::default()
    };
    if cfg.stage == Stage::Eval {
        if rank.is_some() {
            anyhow::bail!(
                "{}: an evaluation runs in one process; run it without a launcher",
                path.display()
            );
        }
        let r = trainer::train::evaluate::evaluate(&cfg, &opts)?;
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let s = match &rank {
        Some(env) => trainer::dist::join::train_as_rank(cfg, &opts, env, zero.unwrap_or_default())?,
        None => train(cfg, &opts)?,
    };
    println!(
        "{} steps{}, final loss {:.4}{}, {:.0} tokens/s; checkpoint {}",
        s.steps,
        if s.interrupted { " (interrupted)" } else { "" },
        s.losses.last().copied().unwrap_or(f64::NAN),
        s.val_loss
            .map(|v| format!(", validation loss {v:.4}"))
            .unwrap_or_default(),
        s.tokens_per_s,
        s.checkpoint.display()
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    // `error: …` on one line, the same with or without RUST_BACKTRACE; 130 / 143 after a
    // run that Ctrl-C / SIGTERM stopped.
    let cli = Cli::parse();
    if let Some(Cmd::Launch(a)) = &cli.cmd {
        // The exit code is the failing rank's.
        return trainer::launch::launcher::launch(a);
    }
    trainer::cli::finish(run_cli(cli))
}

/// `vet-train generate`'s arguments.
#[derive(clap::Args)]
struct GenerateArgs {
    /// Checkpoint directory (config.json + the weights in any layout + tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// A tokenizer.json to use instead of the checkpoint's own (mamba_ssm checkpoints
    /// ship none).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// The text to continue.
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 200)]
    max_new_tokens: usize,
    /// 0 = greedy (deterministic).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Penalty on tokens already seen (1.0 = off; 1.2–1.5 curbs loops in small models).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// cpu, cuda[:N], reference or reference-f64.
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// `vet-train generate`: continues a prompt, printing as it goes.
fn generate_cmd(a: GenerateArgs) -> Result<()> {
    let GenerateArgs {
        model,
        tokenizer: tok_file,
        prompt,
        max_new_tokens,
        temperature,
        seed,
        repetition_penalty,
        device,
    } = a;
    checkpoint::check_dir(&model)?;
    let tok_path = checkpoint::tokenizer_file(&model, tok_file.as_deref())?;
    let ck = checkpoint::load(&model)?;
    let tok = tokenizer::load(&tok_path, ck.config.vocab_size)?;
    let ids = tokenizer::encode_text(&tok, &prompt)?;
    let stop = tok.token_to_id(tokenizer::EOT);
    let mut engine = device::engine(&device, &ck.config, ck.params)?;
    let s = generate::Sampling {
        temperature,
        top_k: 0,
        top_p: 1.0,
        max_new_tokens,
        seed,
        stop_token: stop,
        repetition_penalty,
    };
    print!("{prompt}");
    let mut out = std::io::stdout();
    let mut pending: Vec<u32> = Vec::new();
    let started = std::time::Instant::now();
    let sampleable = tok.get_vocab_size(true);
    let new = generate::generate_within(engine.as_mut(), &ids, &s, sampleable, |t| {
        // Byte-level tokens may split a UTF-8 character: print once it decodes whole.
        pending.push(t);
        if let Ok(text) = tokenizer::decode(&tok, &pending) {
            if !text.contains('\u{FFFD}') {
                print!("{text}");
                let _ = out.flush();
                pending.clear();
            }
        }
    })
    .context("generating")?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "\n[{} prompt + {} new tokens in {secs:.2} s, {:.1} tokens/s, {}]",
        ids.len(),
        new.len(),
        new.len() as f64 / secs,
        engine.name()
    );
    Ok(())
}

fn run_cli(cli: Cli) -> Result<()> {
    let Some(cmd) = cli.cmd else {
        return run_job(cli.run);
    };
    match cmd {
        Cmd::Launch(_) => unreachable!("handled in main"),
        Cmd::CommSelftest(a) => trainer::launch::selftest::run(&a)?,
        Cmd::Eval {
            long: _,
            model,
            opts,
        } => {
            trainer::train::long_eval::run(&model, &opts)?;
        }
        Cmd::Quantize {
            model,
            out,
            dtype,
            force,
        } => quantize(&model, &out, &dtype, force)?,
        Cmd::Convert {
            model,
            to,
            out,
            dtype,
            max_shard_size,
            tokenizer,
            force,
        } => {
            let o = trainer::convert::ConvertOptions {
                to,
                dtype: reference::io::SaveDtype::F32,
                max_shard_bytes: reference::io::DEFAULT_MAX_SHARD_BYTES,
                tokenizer,
                force,
            };
            convert(&model, &out, o, &dtype, &max_shard_size)?
        }
        Cmd::Export {
            model,
            format,
            out,
            dtype,
        } => export(&model, &format, &out, &dtype)?,
        Cmd::Plot { run, out } => {
            let metrics = if run.is_dir() {
                run.join("metrics.jsonl")
            } else {
                run.clone()
            };
            let dir = metrics.parent().map(PathBuf::from).unwrap_or_default();
            let out = out.unwrap_or_else(|| dir.join("loss_curve.png"));
            let s = trainer::train::plot::loss_curve_png(&metrics, &out, "Vet-Mamba: loss")?;
            println!(
                "{} training and {} validation points -> {}",
                s.points,
                s.val_points,
                out.display()
            );
        }
        Cmd::DebugState {
            model,
            tokens,
            out,
            device,
        } => debug_state_cmd(&model, &tokens, &out, &device)?,
        Cmd::Generate(a) => generate_cmd(a)?,
    }
    Ok(())
}

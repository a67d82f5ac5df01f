//! The training loop shared by every engine: pretraining on token shards and QA fine-tuning.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use reference::model::Batch;
use reference::{AdamWConfig, MambaConfig, TrainingEngine};
use serde_json::json;

use super::carry::Carry;
use super::deepspeed::Precision;
use super::eval::{eval_loss, eval_loss_carried};
use super::resume;
use super::run_config::{RunConfig, Stage};
use super::schedule::Schedule;
use super::setup::{
    check_resume, new_loss_scaler, open_metrics, open_source, open_source_ranked, open_val_streams,
    schedule, start_shard_check, starting_model, tokenizer_path,
};
use super::source::{Source, TrainBatch};
use super::state::{self, TrainerState};
use crate::data::loader::Position;
use crate::data::manifest::sha256_file;
use crate::data::verify::ShardCheck;
use crate::lock::DirLock;
use crate::{checkpoint, device, tokenizer};

/// Installs the Ctrl-C / SIGTERM handler once per process: the loop finishes its step,
/// checkpoints and stops; the binary then exits 130 / 143 ([`crate::cli::finish`]).
pub fn install_signal_handler() {
    crate::cli::install_stop_handlers();
}

/// A stop was asked for (Ctrl-C, SIGTERM or SIGHUP).
fn stop_requested() -> bool {
    crate::cli::stop_signal().is_some()
}

/// How a run is launched (what the command line adds to the config).
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub device: String,
    pub resume: bool,
    /// Stop after this many consecutive non-finite steps.
    pub max_consecutive_skips: u32,
    /// Print one line every this many steps.
    pub log_every: u64,
    /// CPU worker threads for `--device cpu` (0 = every core).
    pub threads: usize,
    /// A fresh run removes the checkpoints of an earlier run in `out_dir` instead of refusing.
    pub overwrite: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            device: "cpu".into(),
            resume: false,
            max_consecutive_skips: 5,
            log_every: 10,
            threads: 0,
            overwrite: false,
        }
    }
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct RunSummary {
    pub steps: u64,
    pub losses: Vec<f64>,
    pub val_loss: Option<f64>,
    pub tokens: u64,
    pub tokens_per_s: f64,
    pub skipped_steps: u64,
    pub checkpoint: PathBuf,
    pub interrupted: bool,
}

/// Everything a run holds.
struct Run {
    cfg: RunConfig,
    mcfg: MambaConfig,
    engine: Box<dyn TrainingEngine>,
    tokenizer_path: PathBuf,
    source: Source,
    state: TrainerState,
    total_steps: u64,
    schedule: Schedule,
    hp: AdamWConfig,
    /// The last skipped step was an fp16 loss-scale overflow.
    overflow_skip: bool,
    /// The token shards' payload checksums, checked in the background.
    shard_check: Option<ShardCheck>,
    /// `out_dir` is this process's while the run lives (rank 0's alone in a distributed run).
    _lock: Option<DirLock>,
    /// The data-parallel rank, communicator and ZeRO driver of a distributed run.
    dist: Option<crate::dist::run::Dist>,
    /// The step of the checkpoint this process resumed from.
    resumed_from: Option<(u64, PathBuf)>,
    /// The carried states of stateful training (`[train] carry_state`).
    carry: Option<Carry>,
}

/// Refuses what `train` cannot run: the eval stage, and reduced precision on a CPU engine.
fn check_trainable(cfg: &RunConfig, opts: &RunOptions) -> Result<()> {
    if cfg.stage == Stage::Eval {
        bail!("stage eval does not train: run it with train::evaluate::evaluate (vet-train does)");
    }
    if cfg.optim.precision != Precision::F32 && !opts.device.starts_with("cuda") {
        bail!(
            "precision {:?} needs --device cuda; the CPU engines train in f32",
            cfg.optim.precision
        );
    }
    Ok(())
}

/// The engine's precision and threads from `[optim] precision` and `--threads`.
fn engine_options(cfg: &RunConfig, opts: &RunOptions) -> device::EngineOptions {
    device::EngineOptions {
        precision: match cfg.optim.precision {
            Precision::F32 => gpu::Precision::F32,
            Precision::Bf16 => gpu::Precision::Bf16,
            Precision::Fp16 => gpu::Precision::Fp16,
        },
        threads: opts.threads,
        ..Default::default()
    }
}

/// AdamW's hyperparameters from `[optim]` (a clip of 0 turns clipping off).
fn adamw_hp(cfg: &RunConfig) -> AdamWConfig {
    let o = &cfg.optim;
    AdamWConfig {
        beta1: o.betas[0],
        beta2: o.betas[1],
        eps: o.eps,
        weight_decay: o.weight_decay,
        max_grad_norm: (o.grad_clip > 0.0).then_some(o.grad_clip),
    }
}

impl Run {
    fn open(cfg: RunConfig, opts: &RunOptions, mut dist: Option<DistInit>) -> Result<Run> {
        check_trainable(&cfg, opts)?;
        std::fs::create_dir_all(&cfg.out_dir)
            .with_context(|| format!("creating output directory {}", cfg.out_dir.display()))?;
        let (lock, rank, world) = crate::dist::run::claim_out_dir(&cfg.out_dir, opts, &mut dist)?;
        let tokenizer_path = tokenizer_path(&cfg)?;
        let tok_sha = sha256_file(&tokenizer_path)?;
        let probe = tokenizer::load(&tokenizer_path, usize::MAX)?;
        let latest = if opts.resume {
            state::list(&cfg.out_dir)?.pop()
        } else {
            None
        };
        if opts.resume && latest.is_none() {
            eprintln!("{}", resume::nothing_to_resume(&cfg.out_dir));
        }
        let tok_vocab = probe.get_vocab_size(true);
        let (mcfg, params) = match &latest {
            Some((_, dir)) => {
                let ck = checkpoint::load(dir)?;
                check_resume(&cfg, dir, &ck.config, tok_vocab)?;
                (ck.config, ck.params)
            }
            None => starting_model(&cfg, tok_vocab)?,
        };
        let tok = tokenizer::load(&tokenizer_path, mcfg.vocab_size)?;
        let eopts = engine_options(&cfg, opts);
        let mut engine = device::engine_with(&opts.device, &mcfg, params, &eopts)?;
        let mut source =
            open_source_ranked(&cfg, true, &tok, &tok_sha, mcfg.vocab_size, (rank, world))?;
        if cfg.eval.is_some() {
            // Fail now, not after hours of training, when the evaluation data is unusable.
            open_source(&cfg, false, &tok, &tok_sha, mcfg.vocab_size)
                .context("checking the evaluation data ([eval] is set): give a usable validation split or QA eval file, or remove [eval]")?;
        }
        let total_steps = match (cfg.train.steps, cfg.train.epochs) {
            (Some(s), _) => s,
            (None, Some(e)) => e * source.steps_per_epoch(),
            _ => 0,
        };
        let mut state = TrainerState {
            step: 0,
            tokens_seen: 0,
            data_position: Position { epoch: 0, step: 0 },
            loss_scaler: new_loss_scaler(&cfg),
            skipped_steps: 0,
            adam_step: 0,
            config_toml: cfg.to_toml()?,
        };
        let resume_dir = latest.as_ref().map(|(_, d)| d.as_path());
        let dist = dist
            .map(|(c, z)| crate::dist::run::Dist::attach(engine.as_mut(), c, z, resume_dir))
            .transpose()?;
        if let Some((_, dir)) = &latest {
            let st = match &dist {
                Some(_) => crate::dist::run::load_trainer_state(dir)?,
                None => {
                    let (opt, st) = state::load(dir, &mcfg)?;
                    engine.set_optimizer_state(&opt)?;
                    st
                }
            };
            source.seek(st.data_position)?;
            state = TrainerState {
                config_toml: cfg.to_toml()?,
                loss_scaler: st.loss_scaler.clone().or_else(|| new_loss_scaler(&cfg)),
                ..st
            };
            eprintln!("resuming from {} (step {})", dir.display(), state.step);
        }
        if rank == 0 {
            std::fs::write(cfg.out_dir.join("run.toml"), cfg.to_toml()?)
                .with_context(|| format!("writing {}", cfg.out_dir.join("run.toml").display()))?;
        }
        let hp = adamw_hp(&cfg);
        let shard_check = start_shard_check(&cfg)?;
        let resume_dir = latest.as_ref().map(|l| l.1.as_path());
        let carry_dist = dist.as_ref().map(|_| (rank, world));
        let carry = super::carry::open(&cfg, &mcfg, resume_dir, carry_dist)?;
        let resumed_from = latest.map(|(_, dir)| (state.step, dir));
        Ok(Run {
            schedule: schedule(&cfg, total_steps),
            cfg,
            mcfg,
            engine,
            tokenizer_path,
            source,
            state,
            total_steps,
            hp,
            overflow_skip: false,
            shard_check,
            _lock: lock,
            dist,
            resumed_from,
            carry,
        })
    }

    /// Fails, naming the shard, once the background checksum pass has found a corrupt one;
    /// with `wait`, first waits for the pass to end.
    fn check_shards(&mut self, wait: bool) -> Result<()> {
        match self.shard_check.as_mut() {
            Some(c) if wait => c.wait(),
            Some(c) => c.poll(),
            None => Ok(()),
        }
    }

    /// One optimizer step over `grad_accum` micro-batches. Returns (mean loss, stats) or
    /// `None` loss when it was skipped.
    fn step(&mut self) -> Result<(Option<f64>, f64, usize)> {
        // fp16: the loss scale multiplies grad_scale; the CUDA engine (or, distributed, the
        // ZeRO driver) divides it out and skips the step when the scaled gradient overflowed.
        let loss_scale = self.state.loss_scaler.as_ref().map_or(1.0, |s| s.scale);
        if let Some(d) = self.dist.as_mut() {
            let lr = self.schedule.lr(self.state.step);
            let accum = self.cfg.train.grad_accum;
            let (engine, carry) = (self.engine.as_mut(), self.carry.as_mut());
            let out = d.step(
                engine,
                &mut self.source,
                carry,
                accum,
                (&self.hp, lr, loss_scale),
            )?;
            self.scaler_update(out.0.is_some());
            return Ok(out);
        }
        self.engine.zero_grad()?;
        let accum = self.cfg.train.grad_accum;
        let mut loss_sum = 0.0;
        let mut tokens = 0;
        let mut finite = true;
        for _ in 0..accum {
            if let Some(c) = self.carry.as_mut() {
                let scale = loss_scale / accum as f64;
                let o = c.micro_batch(self.engine.as_mut(), &mut self.source, scale)?;
                (finite, loss_sum, tokens) = (
                    finite && o.loss.is_finite(),
                    loss_sum + o.loss,
                    tokens + o.tokens,
                );
                continue;
            }
            let b: TrainBatch = self.source.next_batch()?;
            let input = Batch {
                batch: b.batch,
                seq_len: b.seq_len,
                tokens: &b.inputs,
                resets: Some(&b.resets),
            };
            let lo = self.engine.loss_and_backward(
                &input,
                &b.targets,
                b.mask.as_deref(),
                None,
                loss_scale / accum as f64,
            )?;
            finite &= lo.loss.is_finite();
            loss_sum += lo.loss;
            tokens += b.inputs.len();
        }
        let lr = self.schedule.lr(self.state.step);
        let stats = if finite {
            Some(self.engine.optimizer_step(&self.hp, lr)?)
        } else {
            None
        };
        let ok = stats.is_some_and(|s| !s.skipped);
        self.scaler_update(ok);
        Ok((
            ok.then_some(loss_sum / accum as f64),
            stats.map_or(f64::NAN, |s| s.grad_norm),
            tokens,
        ))
    }

    /// The loss scaler's answer to a step that was taken (`ok`) or skipped.
    fn scaler_update(&mut self, ok: bool) {
        self.overflow_skip = false;
        if let Some(scaler) = self.state.loss_scaler.as_mut() {
            // A loss-scale overflow that the scaler can still answer is not a failure.
            self.overflow_skip = !ok && scaler.scale > scaler.cfg.min_scale;
            scaler.update(!ok);
        }
    }

    fn checkpoint(&mut self) -> Result<PathBuf> {
        let keep = self.cfg.checkpoint.as_ref().map_or(3, |c| c.keep_last);
        if let Some(d) = self.dist.as_mut() {
            let dir = state::step_dir(&self.cfg.out_dir, self.state.step);
            let tok = Some(self.tokenizer_path.as_path());
            return d.save(
                &dir,
                &self.mcfg,
                self.engine.as_mut(),
                tok,
                &self.state,
                keep,
                self.carry.as_ref().map(|c| (c, self.cfg.train.batch)),
            );
        }
        let batch = self.cfg.train.batch;
        state::save_with(
            &self.cfg.out_dir,
            &self.mcfg,
            self.engine.as_ref(),
            Some(&self.tokenizer_path),
            &self.state,
            keep,
            |tmp| match &self.carry {
                Some(c) => c.save(tmp, &self.mcfg, batch),
                None => Ok(()),
            },
        )
    }
}

impl Run {
    /// A stop was asked for here or, in a distributed run, on any rank.
    fn stop_everywhere(&mut self) -> Result<bool> {
        match self.dist.as_mut() {
            Some(d) => d.any_rank(stop_requested()),
            None => Ok(stop_requested()),
        }
    }
}

/// The metrics file and progress bar: rank 0's (or the only process's); other ranks get a
/// sink and a hidden bar.
fn outputs(run: &Run, rank0: bool, path: &Path) -> Result<(Box<dyn Write>, ProgressBar)> {
    if !rank0 {
        return Ok((Box::new(std::io::sink()), ProgressBar::hidden()));
    }
    let metrics = open_metrics(path, run.resumed_from.as_ref())?;
    Ok((Box::new(metrics), progress(run.total_steps, run.state.step)))
}

/// The loss curve next to the metrics; a failure costs a warning.
fn plot_loss(cfg: &RunConfig, metrics_path: &Path) {
    let png = cfg.out_dir.join("loss_curve.png");
    let title = format!("Vet-Mamba {:?}: loss", cfg.stage);
    if let Err(e) = super::plot::loss_curve_png(metrics_path, &png, &title) {
        eprintln!("warning: no loss curve: {e:#}");
    }
}

/// Where a stopped run can go on from: the newest complete checkpoint, or that there is none.
fn last_checkpoint_note(out_dir: &Path) -> String {
    match state::list(out_dir).ok().and_then(|mut l| l.pop()) {
        Some((step, dir)) => format!(
            "The last good checkpoint is {} (step {step})",
            dir.display()
        ),
        None => format!("No checkpoint was written in {}", out_dir.display()),
    }
}

/// A line for the log: above the progress bar on a terminal, plain stderr otherwise (a hidden
/// bar's `println` drops the line, and these must reach a job's log file).
fn note(pb: &ProgressBar, msg: String) {
    if pb.is_hidden() {
        eprintln!("{msg}");
    } else {
        pb.println(msg);
    }
}

fn progress(total: u64, start: u64) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_position(start);
    pb.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{wide_bar}] {pos}/{len} {msg} ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}

/// A distributed run's communicator and ZeRO settings.
pub(crate) type DistInit = (Box<dyn reference::comm::Comm>, crate::dist::ZeroConfig);

/// Runs the training job `cfg` describes.
pub fn train(cfg: RunConfig, opts: &RunOptions) -> Result<RunSummary> {
    train_with(cfg, opts, None)
}

/// [`train`], data parallel over `dist`'s communicator when given: rank 0 alone writes the
/// logs, plots and model files (see [`crate::dist::train_distributed`]).
pub(crate) fn train_with(
    cfg: RunConfig,
    opts: &RunOptions,
    dist: Option<DistInit>,
) -> Result<RunSummary> {
    install_signal_handler();
    let mut run = Run::open(cfg, opts, dist)?;
    let rank0 = run.dist.as_ref().is_none_or(|d| d.rank() == 0);
    let metrics_path = run.cfg.out_dir.join("metrics.jsonl");
    let (mut metrics, pb) = outputs(&run, rank0, &metrics_path)?;
    let started = Instant::now();
    let (mut losses, mut run_tokens, mut consecutive) = (Vec::new(), 0u64, 0u32);
    let mut val_loss = None;
    let mut interrupted = false;
    while run.state.step < run.total_steps {
        run.check_shards(false)?;
        let (loss, grad_norm, tokens) = run.step()?;
        let lr = run.schedule.lr(run.state.step);
        match loss {
            None => {
                if !run.overflow_skip {
                    consecutive += 1;
                }
                run.state.skipped_steps += 1;
                note(
                    &pb,
                    format!(
                        "step {}: non-finite loss or gradient (norm {grad_norm}); step skipped",
                        run.state.step + 1
                    ),
                );
                writeln!(
                    metrics,
                    "{}",
                    json!({"step": run.state.step + 1, "skipped": true, "grad_norm": grad_norm.to_string()})
                )?;
                if consecutive >= opts.max_consecutive_skips {
                    bail!(
                        "{consecutive} consecutive steps had a non-finite loss or gradient; stopping. {} — lower the learning rate or check the data",
                        last_checkpoint_note(&run.cfg.out_dir)
                    );
                }
                continue;
            }
            Some(l) => {
                consecutive = 0;
                losses.push(l);
                run.state.step += 1;
                run.state.tokens_seen += tokens as u64;
                run_tokens += tokens as u64;
                run.state.data_position = run.source.position();
                let tps = run_tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
                let line = json!({"step": run.state.step, "loss": l, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps, "tokens": run.state.tokens_seen});
                writeln!(metrics, "{line}")?;
                // The first step of this process (a resumed run reports again).
                if run_tokens == tokens as u64 {
                    report_memory(&run, tokens, &mut metrics, &pb)?;
                }
                if let Some(d) = run.dist.as_mut() {
                    d.log_step(run.state.step, run_tokens == tokens as u64, &mut metrics)?;
                }
                pb.set_position(run.state.step);
                pb.set_message(format!("loss {l:.4} lr {lr:.2e} {tps:.0} tok/s"));
                if run.state.step % opts.log_every == 0 && pb.is_hidden() && rank0 {
                    eprintln!("step {:>6}/{}  loss {l:.4}  lr {lr:.2e}  grad_norm {grad_norm:.3}  {tps:.0} tokens/s", run.state.step, run.total_steps);
                }
            }
        }
        let step = run.state.step;
        if let Some(e) = run
            .cfg
            .eval
            .clone()
            .filter(|e| step % e.every == 0 && step < run.total_steps)
        {
            val_loss = Some(eval_now(&mut run, e.batches, &mut metrics, &pb)?);
        }
        if run.stop_everywhere()? {
            interrupted = true;
            note(&pb, format!("interrupted: checkpointing at step {step}"));
            break;
        }
        if run
            .cfg
            .checkpoint
            .as_ref()
            .is_some_and(|c| step % c.every == 0)
            && step < run.total_steps
        {
            run.checkpoint()?;
        }
    }
    pb.finish_and_clear();
    if !interrupted {
        // An interrupted run saves its checkpoint now, without waiting for the pass.
        run.check_shards(true)?;
        if let Some(e) = run.cfg.eval.clone() {
            val_loss = Some(eval_now(&mut run, e.batches, &mut metrics, &pb)?);
        }
    }
    let checkpoint = run.checkpoint()?;
    drop(metrics);
    if rank0 {
        plot_loss(&run.cfg, &metrics_path);
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(RunSummary {
        steps: run.state.step,
        losses,
        val_loss,
        tokens: run_tokens,
        tokens_per_s: run_tokens as f64 / secs.max(1e-9),
        skipped_steps: run.state.skipped_steps,
        checkpoint,
        interrupted,
    })
}

/// Notes the engine's memory use after the first step of this process, on the terminal and
/// in the metrics.
fn report_memory(
    run: &Run,
    tokens: usize,
    metrics: &mut dyn Write,
    pb: &ProgressBar,
) -> Result<()> {
    if let Some(m) = run.engine.memory()? {
        let per_token = m.activation_bytes_per_token.unwrap_or(0.0);
        let gib = |b: f64| b / (1u64 << 30) as f64;
        note(pb, format!(
            "memory on {}: activations {:.1} KiB/token ({:.2} GiB for a batch of {tokens} tokens); device {:.1} of {:.1} GiB in use",
            run.engine.name(),
            per_token / 1024.0,
            gib(per_token * tokens as f64),
            gib(m.device_used as f64),
            gib(m.device_total as f64)
        ));
        let mem = json!({"step": run.state.step, "activation_bytes_per_token": per_token, "device_used_bytes": m.device_used, "device_total_bytes": m.device_total});
        writeln!(metrics, "{mem}")?;
    }
    Ok(())
}

fn eval_now(
    run: &mut Run,
    batches: usize,
    metrics: &mut dyn Write,
    pb: &ProgressBar,
) -> Result<f64> {
    if let Some(d) = run.dist.as_mut() {
        d.sync(run.engine.as_mut())?;
    }
    let sha = sha256_file(&run.tokenizer_path)?;
    // A carrying run is validated as it trains: each row's windows in order, the state
    // carried (a split of too few documents stays on windows from zeros, and says so).
    let (loss, windows) = match open_val_streams(&run.cfg, &sha, run.mcfg.vocab_size)? {
        Some(mut src) => (
            eval_loss_carried(run.engine.as_mut(), &mut src, batches)?,
            ", state carried",
        ),
        None => {
            let tok = tokenizer::load(&run.tokenizer_path, run.mcfg.vocab_size)?;
            let mut src = open_source(&run.cfg, false, &tok, &sha, run.mcfg.vocab_size)?;
            let loss = eval_loss(run.engine.as_mut(), &mut src, batches)?;
            let windows = if run.cfg.train.carry_state.is_off() {
                ""
            } else {
                ", windows from a zero state: the validation split has fewer documents than a \
                 batch has rows"
            };
            (loss, windows)
        }
    };
    note(
        pb,
        format!(
            "step {}: validation loss {loss:.4} (perplexity {:.2}{windows})",
            run.state.step,
            loss.exp()
        ),
    );
    writeln!(
        metrics,
        "{}",
        json!({"step": run.state.step, "val_loss": loss, "val_ppl": loss.exp()})
    )?;
    Ok(loss)
}

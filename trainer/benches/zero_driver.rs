//! The ZeRO driver's own host-side work per step, outside the engine: world size 1 on the
//! in-process communicator (or `--comm tcp`, a one-process CPU run's), the simd engine on
//! tiny batches (so its forward and backward are cheap) behind a wrapper that times every
//! engine call and, by default, steps the way the GPU engine does (no streamed or
//! layer-by-layer backward: the gradients come out whole through `gradients()`, the weights
//! go back whole through `set_parameters`). Per case: seconds per step, the engine's share
//! (forward + backward, gradients out, parameters in), and the driver's: its collectives,
//! AdamW, and the rest (the flat copies and the gradient norm), with ns per parameter, and the
//! seconds `ZeroDriver::new` took. With `--native` the hooks' collectives (stage 3: every
//! gather and reduce-scatter) run inside the engine's call, so the engine's column holds them
//! and the driver's rest can come out negative.
//!
//! ```text
//! cargo bench -p trainer --bench zero_driver                       # 1024 x 24, 1+off,2+off,3
//! cargo bench -p trainer --bench zero_driver -- --cases 3 --native # the simd engine's own paths
//! cargo bench -p trainer --bench zero_driver -- --comm tcp         # no in-process copies
//! ```

use std::cell::Cell;
use std::time::Instant;

use clap::Parser;
use reference::comm::{Comm, InProcess};
use reference::engine::{GradHook, LossOutput, NamedTensors, OptimizerState, ParamHook};
use reference::model::Batch;
use reference::optim::StepStats;
use reference::state::State;
use reference::{AdamWConfig, InferenceEngine, MambaConfig, Result, Tensor, TrainingEngine};
use simd::{SimdEngine, SimdOptions};
use trainer::dist::config::OffloadDevice;
use trainer::dist::{ZeroConfig, ZeroDriver};
use trainer::launch::{connect, Launcher, RankEnv, Transport};
use trainer::train::source::TrainBatch;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 1024)]
    d_model: usize,
    #[arg(long, default_value_t = 24)]
    layers: usize,
    #[arg(long, default_value_t = 50280)]
    vocab: usize,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value_t = 8)]
    seq: usize,
    /// Timed steps per case (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Cases as STAGE or STAGE+off (offload_optimizer cpu), comma-separated.
    #[arg(long, default_value = "1+off,2+off,3", value_delimiter = ',')]
    cases: Vec<String>,
    /// Threads of the driver and of the engine (0: every core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// The communicator: `in-process` (the tests' threads) or `tcp` (what a one-process
    /// CPU run gets).
    #[arg(long, default_value = "in-process")]
    comm: String,
    /// Let the simd engine stream its gradients (stages 0–2) and step layer by layer
    /// (stage 3), as on the CPU, instead of the GPU engine's whole-model path.
    #[arg(long)]
    native: bool,
    /// Added by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Seconds an engine spent, by kind of call.
#[derive(Default)]
struct Spent {
    /// Forward and backward, zeroing the gradients.
    compute: Cell<f64>,
    /// `gradients()`, `parameters()`.
    out: Cell<f64>,
    /// `set_parameters`, `set_optimizer_state`.
    into: Cell<f64>,
}

/// The simd engine with every call timed into `spent`; `native` lets it stream and step layer
/// by layer.
struct Timed {
    inner: SimdEngine,
    native: bool,
    spent: Spent,
}

impl Timed {
    fn time<R>(cell: &Cell<f64>, f: impl FnOnce() -> R) -> R {
        let t = Instant::now();
        let r = f();
        cell.set(cell.get() + t.elapsed().as_secs_f64());
        r
    }
}

impl InferenceEngine for Timed {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn config(&self) -> &MambaConfig {
        self.inner.config()
    }
    fn forward(
        &mut self,
        input: &Batch,
        state: Option<&State<f32>>,
    ) -> Result<(Tensor<f32>, State<f32>)> {
        self.inner.forward(input, state)
    }
    fn step(
        &mut self,
        tokens: &[u32],
        resets: Option<&[bool]>,
        state: &mut State<f32>,
    ) -> Result<Tensor<f32>> {
        self.inner.step(tokens, resets, state)
    }
    fn parameters(&self) -> Result<NamedTensors> {
        Self::time(&self.spent.out, || self.inner.parameters())
    }
}

impl TrainingEngine for Timed {
    fn loss_and_backward(
        &mut self,
        input: &Batch,
        targets: &[u32],
        mask: Option<&[bool]>,
        state: Option<&State<f32>>,
        grad_scale: f64,
    ) -> Result<LossOutput> {
        let e = &mut self.inner;
        Self::time(&self.spent.compute, || {
            e.loss_and_backward(input, targets, mask, state, grad_scale)
        })
    }
    fn loss_and_backward_streamed(
        &mut self,
        input: &Batch,
        targets: &[u32],
        mask: Option<&[bool]>,
        state: Option<&State<f32>>,
        grad_scale: f64,
        hook: &mut dyn GradHook,
    ) -> Result<Option<LossOutput>> {
        if !self.native {
            return Ok(None);
        }
        let e = &mut self.inner;
        Self::time(&self.spent.compute, || {
            e.loss_and_backward_streamed(input, targets, mask, state, grad_scale, hook)
        })
    }
    fn loss_and_backward_layered(
        &mut self,
        input: &Batch,
        targets: &[u32],
        mask: Option<&[bool]>,
        state: Option<&State<f32>>,
        grad_scale: f64,
        hook: &mut dyn ParamHook,
    ) -> Result<Option<LossOutput>> {
        if !self.native {
            return Ok(None);
        }
        let e = &mut self.inner;
        Self::time(&self.spent.compute, || {
            e.loss_and_backward_layered(input, targets, mask, state, grad_scale, hook)
        })
    }
    fn zero_grad(&mut self) -> Result<()> {
        let e = &mut self.inner;
        Self::time(&self.spent.compute, || e.zero_grad())
    }
    fn gradients(&self) -> Result<NamedTensors> {
        Self::time(&self.spent.out, || self.inner.gradients())
    }
    fn optimizer_step(&mut self, hp: &AdamWConfig, lr: f64) -> Result<StepStats> {
        self.inner.optimizer_step(hp, lr)
    }
    fn set_parameters(&mut self, named: &[(String, Tensor<f32>)]) -> Result<()> {
        let e = &mut self.inner;
        Self::time(&self.spent.into, || e.set_parameters(named))
    }
    fn optimizer_state(&self) -> Result<OptimizerState> {
        self.inner.optimizer_state()
    }
    fn set_optimizer_state(&mut self, state: &OptimizerState) -> Result<()> {
        let e = &mut self.inner;
        Self::time(&self.spent.into, || e.set_optimizer_state(state))
    }
    fn all_reduce_gradients(&mut self, comm: &mut dyn Comm) -> Result<bool> {
        self.inner.all_reduce_gradients(comm)
    }
}

/// A communicator of one rank: `in-process` or `tcp`.
fn one_rank(kind: &str) -> anyhow::Result<Box<dyn Comm>> {
    Ok(match kind {
        "in-process" => Box::new(InProcess::group(1).pop().expect("one rank")),
        "tcp" => {
            let env = RankEnv {
                rank: 0,
                world: 1,
                local_rank: 0,
                master_addr: "127.0.0.1".into(),
                master_port: 0,
                launcher: Launcher::Single,
            };
            connect(&env, Transport::Tcp)?
        }
        _ => anyhow::bail!("--comm {kind:?}: in-process or tcp"),
    })
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// The median of `v` (not empty).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One step's seconds: the whole step, the engine's three kinds, and the driver's
/// collectives and AdamW.
#[derive(Clone, Copy, Default)]
struct Row {
    step: f64,
    compute: f64,
    out: f64,
    into: f64,
    comm: f64,
    adamw: f64,
}

/// The config of case `STAGE` or `STAGE+off`.
fn zero_config(case: &str, threads: usize) -> anyhow::Result<ZeroConfig> {
    let (stage, off) = match case.split_once('+') {
        Some((s, "off")) => (s.parse::<u8>(), true),
        _ => (case.parse::<u8>(), false),
    };
    let Ok(stage) = stage else {
        anyhow::bail!("case {case:?} is not STAGE or STAGE+off");
    };
    Ok(ZeroConfig {
        stage,
        offload_optimizer: if off {
            OffloadDevice::Cpu
        } else {
            OffloadDevice::None
        },
        threads,
        ..ZeroConfig::default()
    })
}

/// One table row: the medians of `rows`, and the seconds the driver took to be made.
fn print_row(case: &str, rows: &[Row], made: f64, n_params: usize) {
    let m = |f: fn(&Row) -> f64| median(rows.iter().map(f).collect());
    let driver = m(|r| r.step - (r.compute + r.out + r.into));
    let rest = m(|r| r.step - (r.compute + r.out + r.into) - r.comm - r.adamw);
    println!(
        "| {case} | {:.3} | {:.3} | {:.3} | {:.3} | {driver:.3} | {:.3} | {:.3} | {rest:.3} | {:.2} | {made:.3} |",
        m(|r| r.step),
        m(|r| r.compute),
        m(|r| r.out),
        m(|r| r.into),
        m(|r| r.comm),
        m(|r| r.adamw),
        driver * 1e9 / n_params as f64,
    );
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let threads = if a.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        a.threads
    };
    let cfg = MambaConfig::new(a.d_model, a.layers, a.vocab);
    let params = reference::init::init_params::<f32>(&cfg, 7);
    let n_params = params.numel();
    let n = a.batch * a.seq;
    let mut rng = reference::rng::Rng::new(11);
    let mut tok = || (rng.next_u64() % a.vocab as u64) as u32;
    let micro = [TrainBatch {
        batch: a.batch,
        seq_len: a.seq,
        inputs: (0..n).map(|_| tok()).collect(),
        targets: (0..n).map(|_| tok()).collect(),
        mask: None,
        resets: vec![false; n],
        group: 0,
    }];
    let hp = AdamWConfig {
        max_grad_norm: Some(1.0),
        ..AdamWConfig::default()
    };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "zero_driver: {}, {threads} threads (load {}); {:.1} M params (d_model {} x {} layers, vocab {}), {} x {} tokens, world size 1 ({}), {} path",
        cpu_name(),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        n_params as f64 / 1e6,
        a.d_model,
        a.layers,
        a.vocab,
        a.batch,
        a.seq,
        a.comm,
        if a.native { "simd engine's own" } else { "GPU engine's (whole-model)" }
    );
    println!("medians of {} steps, seconds per step:", a.steps);
    println!("| case | step | engine: fwd+bwd | grads out | params in | driver | of which comm | adamw | rest | driver ns/param | driver made in |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let opts = SimdOptions {
        threads,
        ..SimdOptions::default()
    };
    for case in &a.cases {
        let zc = zero_config(case, threads)?;
        let mut comm = one_rank(&a.comm)?;
        let mut e = Timed {
            inner: SimdEngine::new(cfg.clone(), params.clone(), &opts)?,
            native: a.native,
            spent: Spent::default(),
        };
        let t = Instant::now();
        let mut d = ZeroDriver::new(&mut e, &mut *comm, zc)?;
        let made = t.elapsed().as_secs_f64() - e.spent.out.get();
        let mut rows = Vec::new();
        for s in 0..=a.steps {
            e.spent = Spent::default();
            let t = Instant::now();
            let out = d.step(&mut e, &mut *comm, &micro, &hp, 1e-4)?;
            let step = t.elapsed().as_secs_f64();
            anyhow::ensure!(out.loss.is_some(), "case {case}: step {s} was skipped");
            if s > 0 {
                rows.push(Row {
                    step,
                    compute: e.spent.compute.get(),
                    out: e.spent.out.get(),
                    into: e.spent.into.get(),
                    comm: out.breakdown.comm,
                    adamw: out.breakdown.step,
                });
            }
        }
        print_row(case, &rows, made, n_params);
    }
    Ok(())
}

//! ZeRO stages 0–2 with `overlap_comm` on the simd engine and the in-process communicator: the
//! engine hands each group's gradient out during its backward
//! (`TrainingEngine::loss_and_backward_streamed`), the driver packs them into buckets of about
//! `reduce_bucket_size` elements and a communication thread sums each full bucket while the
//! backward goes on. The bits are those of the path without overlap, and of the path that
//! reduces after the whole backward (an engine that cannot stream), at every world size; the
//! overlap is checked from an ordered log of the engine's hand-overs and the collectives.

use std::sync::{Arc, Mutex};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use reference::comm::{Comm, CommResult, InProcess};
use reference::engine::{
    GradHook, LossOutput, NamedTensors, OptimizerState, ParamGroup, ParamHook,
};
use reference::model::Batch;
use reference::optim::StepStats;
use reference::{AdamWConfig, InferenceEngine, MambaConfig, State, Tensor, TrainingEngine};
use simd::SimdEngine;
use trainer::dist::config::OffloadDevice;
use trainer::dist::zero::CommRecord;
use trainer::dist::{FlatLayout, ZeroConfig, ZeroDriver};
use trainer::train::source::TrainBatch;

const SEQ: usize = 8;
const ROWS: usize = 2;
const STEPS: usize = 3;

/// Three layers: four groups (three layers and the outer group).
fn cfg() -> MambaConfig {
    MambaConfig::new(11, 3, 38)
}

/// Micro-batch `i` of step `s`: seeded random tokens, targets and document resets.
fn micro(s: usize, i: usize) -> TrainBatch {
    let seed = 4099 * s as u64 + i as u64 + 17;
    conformance::zero::train_batch(&cfg(), (ROWS, SEQ), seed, 6)
}

fn hp() -> AdamWConfig {
    AdamWConfig {
        max_grad_norm: Some(0.5),
        ..AdamWConfig::default()
    }
}

fn lr(s: usize) -> f64 {
    2e-3 * (1.0 + s as f64)
}

/// What happened, in order, on one rank.
#[derive(Clone, Debug, PartialEq)]
enum Event {
    /// The engine handed a group's gradient to the driver (on this thread).
    Handed(ParamGroup, ThreadId),
    /// A collective began (on this thread).
    Collective(&'static str, ThreadId),
}

type Log = Arc<Mutex<Vec<Event>>>;

fn push(log: &Log, e: Event) {
    log.lock().unwrap().push(e);
}

/// The in-process communicator, logging the start of every collective.
struct Logged {
    inner: InProcess,
    log: Log,
}

impl Logged {
    fn note(&self, op: &'static str) {
        push(&self.log, Event::Collective(op, thread::current().id()));
    }
}

impl Comm for Logged {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world(&self) -> usize {
        self.inner.world()
    }
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> CommResult<()> {
        self.note("all_reduce_sum");
        self.inner.all_reduce_sum(data)
    }
    fn all_reduce_sum_f64(&mut self, data: &mut [f64]) -> CommResult<()> {
        self.note("all_reduce_sum_f64");
        self.inner.all_reduce_sum_f64(data)
    }
    fn reduce_scatter_sum(&mut self, input: &[f32], output: &mut [f32]) -> CommResult<()> {
        self.note("reduce_scatter_sum");
        self.inner.reduce_scatter_sum(input, output)
    }
    fn all_gather(&mut self, input: &[f32], output: &mut [f32]) -> CommResult<()> {
        self.note("all_gather");
        self.inner.all_gather(input, output)
    }
    fn broadcast(&mut self, data: &mut [u8], root: usize) -> CommResult<()> {
        self.note("broadcast");
        self.inner.broadcast(data, root)
    }
    fn barrier(&mut self) -> CommResult<()> {
        self.note("barrier");
        self.inner.barrier()
    }
}

/// The simd engine with its streamed backward watched: every hand-over is logged, and with
/// `wait` the backward stops after handing over its first group until a collective has begun
/// (at most [`WAIT`]), so that a driver that reduces while the backward runs is seen doing so
/// however fast the backward is. `stream: false` stands for an engine that cannot stream (the
/// driver reduces after the whole backward, as before).
struct Probe {
    inner: SimdEngine,
    log: Log,
    stream: bool,
    wait: bool,
}

const WAIT: Duration = Duration::from_secs(5);

fn probe(log: Log, stream: bool, wait: bool) -> Probe {
    let inner = conformance::zero::simd_engine(&cfg(), 29);
    Probe {
        inner,
        log,
        stream,
        wait,
    }
}

/// The driver's hook (stages 0–2: a `GradHook`; stage 3: a `ParamHook`), with every
/// hand-over logged.
struct Spy<'a, H: ?Sized> {
    inner: &'a mut H,
    log: &'a Log,
    wait: bool,
}

impl<H: ?Sized> Spy<'_, H> {
    /// Logs the hand-over of `g`, passes it on with `pass`, and the first time (with `wait`)
    /// waits for a collective to begin after it.
    fn hand(
        &mut self,
        g: ParamGroup,
        pass: impl FnOnce(&mut H) -> reference::Result<()>,
    ) -> reference::Result<()> {
        let from = {
            let mut log = self.log.lock().unwrap();
            log.push(Event::Handed(g, thread::current().id()));
            log.len()
        };
        pass(self.inner)?;
        if std::mem::take(&mut self.wait) {
            let t = Instant::now();
            while t.elapsed() < WAIT {
                let began = self.log.lock().unwrap()[from..]
                    .iter()
                    .any(|e| matches!(e, Event::Collective(..)));
                if began {
                    break;
                }
                thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(())
    }
}

impl GradHook for Spy<'_, dyn GradHook + '_> {
    fn gradients(&mut self, g: ParamGroup, grads: &[&Tensor<f32>]) -> reference::Result<()> {
        self.hand(g, |h| h.gradients(g, grads))
    }
}

impl ParamHook for Spy<'_, dyn ParamHook + '_> {
    fn fill(&mut self, g: ParamGroup, tensors: &mut [Tensor<f32>]) -> reference::Result<()> {
        self.inner.fill(g, tensors)
    }
    fn release(&mut self, g: ParamGroup) -> reference::Result<()> {
        self.inner.release(g)
    }
    fn gradients(&mut self, g: ParamGroup, grads: &[&Tensor<f32>]) -> reference::Result<()> {
        self.hand(g, |h| h.gradients(g, grads))
    }
}

impl InferenceEngine for Probe {
    fn name(&self) -> String {
        "probe".into()
    }
    fn config(&self) -> &MambaConfig {
        self.inner.config()
    }
    fn forward(
        &mut self,
        input: &Batch,
        state: Option<&State<f32>>,
    ) -> reference::Result<(Tensor<f32>, State<f32>)> {
        self.inner.forward(input, state)
    }
    fn step(
        &mut self,
        tokens: &[u32],
        resets: Option<&[bool]>,
        state: &mut State<f32>,
    ) -> reference::Result<Tensor<f32>> {
        self.inner.step(tokens, resets, state)
    }
    fn parameters(&self) -> reference::Result<NamedTensors> {
        self.inner.parameters()
    }
}

impl TrainingEngine for Probe {
    fn loss_and_backward(
        &mut self,
        input: &Batch,
        targets: &[u32],
        mask: Option<&[bool]>,
        state: Option<&State<f32>>,
        grad_scale: f64,
    ) -> reference::Result<LossOutput> {
        self.inner
            .loss_and_backward(input, targets, mask, state, grad_scale)
    }
    fn loss_and_backward_streamed(
        &mut self,
        input: &Batch,
        targets: &[u32],
        mask: Option<&[bool]>,
        state: Option<&State<f32>>,
        grad_scale: f64,
        hook: &mut dyn GradHook,
    ) -> reference::Result<Option<LossOutput>> {
        if !self.stream {
            return Ok(None);
        }
        let mut spy = Spy {
            inner: hook,
            log: &self.log,
            wait: self.wait,
        };
        self.inner
            .loss_and_backward_streamed(input, targets, mask, state, grad_scale, &mut spy)
    }
    fn loss_and_backward_layered(
        &mut self,
        input: &Batch,
        targets: &[u32],
        mask: Option<&[bool]>,
        state: Option<&State<f32>>,
        grad_scale: f64,
        hook: &mut dyn ParamHook,
    ) -> reference::Result<Option<LossOutput>> {
        if !self.stream {
            return Ok(None);
        }
        let mut spy = Spy {
            inner: hook,
            log: &self.log,
            wait: self.wait,
        };
        self.inner
            .loss_and_backward_layered(input, targets, mask, state, grad_scale, &mut spy)
    }
    fn set_gradients(&mut self, named: &[(String, Tensor<f32>)]) -> reference::Result<()> {
        self.inner.set_gradients(named)
    }
    fn zero_grad(&mut self) -> reference::Result<()> {
        self.inner.zero_grad()
    }
    fn gradients(&self) -> reference::Result<NamedTensors> {
        self.inner.gradients()
    }
    fn optimizer_step(&mut self, hp: &AdamWConfig, lr: f64) -> reference::Result<StepStats> {
        self.inner.optimizer_step(hp, lr)
    }
    fn set_parameters(&mut self, named: &[(String, Tensor<f32>)]) -> reference::Result<()> {
        self.inner.set_parameters(named)
    }
    fn optimizer_state(&self) -> reference::Result<OptimizerState> {
        self.inner.optimizer_state()
    }
    fn set_optimizer_state(&mut self, state: &OptimizerState) -> reference::Result<()> {
        self.inner.set_optimizer_state(state)
    }
    fn all_reduce_gradients(&mut self, comm: &mut dyn Comm) -> reference::Result<bool> {
        self.inner.all_reduce_gradients(comm)
    }
}

fn zc(stage: u8, overlap: bool, bucket: usize, offload: bool) -> ZeroConfig {
    ZeroConfig {
        stage,
        overlap_comm: overlap,
        reduce_bucket_size: bucket,
        offload_optimizer: if offload {
            OffloadDevice::Cpu
        } else {
            OffloadDevice::None
        },
        threads: 1,
        ..ZeroConfig::default()
    }
}

/// What one rank ends with.
struct RankOut {
    weights: Vec<f32>,
    losses: Vec<f64>,
    streamed: Option<bool>,
    layered: Option<bool>,
    /// The collectives of each step, as the driver logged them.
    comms: Vec<Vec<CommRecord>>,
    /// The seconds of communication, all and overlapped, of each step.
    comm_secs: Vec<(f64, f64)>,
    log: Vec<Event>,
}

/// `STEPS` steps at `world` ranks with `accum` micro-batches each.
fn run(world: usize, accum: usize, zero: ZeroConfig, stream: bool, wait: bool) -> Vec<RankOut> {
    let handles: Vec<_> = InProcess::group(world)
        .into_iter()
        .map(|inner| {
            let zero = zero.clone();
            thread::spawn(move || {
                let log: Log = Arc::default();
                let mut comm = Logged {
                    inner,
                    log: log.clone(),
                };
                let mut e = probe(log.clone(), stream, wait);
                let mut d = ZeroDriver::new(&mut e, &mut comm, zero).unwrap();
                log.lock().unwrap().clear();
                let r = comm.rank();
                let (mut losses, mut comms, mut comm_secs) = (Vec::new(), Vec::new(), Vec::new());
                for s in 0..STEPS {
                    let mine: Vec<TrainBatch> =
                        (r * accum..(r + 1) * accum).map(|i| micro(s, i)).collect();
                    let out = d.step(&mut e, &mut comm, &mine, &hp(), lr(s)).unwrap();
                    losses.push(out.loss.expect("finite"));
                    comms.push(d.take_comms());
                    comm_secs.push((out.breakdown.comm, out.breakdown.comm_overlapped));
                }
                let log = log.lock().unwrap().clone();
                d.sync_engine(&mut e, &mut comm).unwrap();
                let weights = FlatLayout::new(&cfg(), 1)
                    .flatten(&e.parameters().unwrap())
                    .unwrap();
                RankOut {
                    weights,
                    losses,
                    streamed: d.streamed(),
                    layered: d.layered(),
                    comms,
                    comm_secs,
                    log,
                }
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// The bucket collectives of one step (the statistics' f64 all-reduce left out).
fn buckets(step: &[CommRecord]) -> usize {
    step.iter()
        .filter(|c| c.op == "all_reduce" || c.op == "reduce_scatter")
        .count()
}

/// With overlap the final weights (every rank) and losses are the bits of the run without it
/// and of the run that reduces after the whole backward, at world 1, 2 and 3, stages 0 (with
/// the optimizer in the engine and in the driver), 1 and 2, with two micro-batches per rank
/// and clipping. The bucket size cuts the model into several buckets.
#[test]
fn overlap_changes_no_bit() {
    for world in [1, 2, 3] {
        for (stage, offload) in [(0u8, false), (0, true), (1, false), (2, false)] {
            let bucket = 700;
            let before = run(world, 2, zc(stage, false, bucket, offload), false, false);
            let inline = run(world, 2, zc(stage, false, bucket, offload), true, false);
            let overlap = run(world, 2, zc(stage, true, bucket, offload), true, false);
            let what = format!("world {world} stage {stage} offload {offload}");
            assert_eq!(before[0].streamed, Some(false), "{what}");
            for (r, o) in overlap.iter().enumerate() {
                assert_eq!(o.streamed, Some(true), "{what}");
                assert_eq!(inline[r].streamed, Some(true), "{what}");
                assert!(
                    same_bits(&o.weights, &inline[r].weights),
                    "{what} rank {r}: overlap differs from no overlap"
                );
                assert!(
                    same_bits(&o.weights, &before[0].weights),
                    "{what} rank {r}: overlap differs from the after-the-backward path"
                );
                assert_eq!(o.losses, before[0].losses, "{what}: losses");
                assert!(o.comms.iter().all(|c| buckets(c) > 1), "{what}: one bucket");
                for &(all, over) in &o.comm_secs {
                    assert!(
                        (0.0..=all + 1e-9).contains(&over),
                        "{what}: {over} of {all}"
                    );
                }
            }
            for (a, b) in inline.iter().zip(&overlap) {
                assert_eq!(a.comms.len(), b.comms.len());
                for (x, y) in a.comms.iter().zip(&b.comms) {
                    let ops =
                        |v: &[CommRecord]| v.iter().map(|c| (c.op, c.bytes)).collect::<Vec<_>>();
                    assert_eq!(ops(x), ops(y), "{what}: the collectives differ");
                }
            }
        }
    }
}

/// The overlap is real: with every group its own bucket, the first bucket's collective begins
/// on another thread than the engine's, before the engine hands over its last group (the
/// outer group) — a driver that waited for the whole backward could not. The engine pauses
/// after its first hand-over until a collective has begun (at most five seconds), so this
/// does not depend on how fast the backward is; the overlapped seconds are reported.
#[test]
fn buckets_are_reduced_while_the_backward_runs() {
    for stage in [0u8, 1, 2, 3] {
        let outs = run(2, 1, zc(stage, true, 1, false), true, true);
        for (r, o) in outs.iter().enumerate() {
            let what = format!("stage {stage} rank {r}");
            if stage == 3 {
                assert_eq!(o.layered, Some(true), "{what}");
            } else {
                assert_eq!(o.streamed, Some(true), "{what}");
            }
            let log = &o.log;
            let first = log
                .iter()
                .position(|e| matches!(e, Event::Handed(..)))
                .expect("hand-overs");
            let Event::Handed(_, engine) = log[first].clone() else {
                unreachable!()
            };
            let last = log
                .iter()
                .position(|e| matches!(e, Event::Handed(ParamGroup::Outer, _)))
                .expect("the outer group");
            let coll = log[first..]
                .iter()
                .position(|e| matches!(e, Event::Collective(..)))
                .map(|i| i + first)
                .expect("a collective");
            let Event::Collective(op, thread) = log[coll].clone() else {
                unreachable!()
            };
            println!("{what}: first hand-over at {first}, first collective {op} at {coll}, last hand-over at {last}");
            assert!(
                coll < last,
                "{what}: the first bucket's collective began after the last hand-over: {log:?}"
            );
            assert_ne!(
                thread, engine,
                "{what}: the collective ran on the engine's thread"
            );
            let over: f64 = o.comm_secs.iter().map(|c| c.1).sum();
            assert!(over > 0.0, "{what}: no overlapped seconds reported");
        }
    }
}

/// Bucket bookkeeping: with a bucket size of one element every group is its own bucket (one
/// collective per group each step), with a huge one the whole model is one bucket; both, with
/// and without overlap, give the same bits.
#[test]
fn bucket_sizes_cut_by_group_and_change_no_bit() {
    let groups = cfg().n_layer + 1;
    for world in [2, 3] {
        for stage in [0u8, 1, 2] {
            let mut weights: Vec<Vec<f32>> = Vec::new();
            for overlap in [false, true] {
                for (bucket, want) in [(1, groups), (usize::MAX / 2, 1)] {
                    let outs = run(world, 1, zc(stage, overlap, bucket, false), true, false);
                    for o in &outs {
                        for c in &o.comms {
                            assert_eq!(
                                buckets(c),
                                want,
                                "world {world} stage {stage} bucket {bucket}: {c:?}"
                            );
                        }
                        weights.push(o.weights.clone());
                    }
                }
            }
            assert!(
                weights.iter().all(|w| same_bits(w, &weights[0])),
                "world {world} stage {stage}: bucket sizes changed bits"
            );
        }
    }
}

/// An engine error on one rank while the others' communication threads wait in a bucket's
/// collective: every rank's step fails (none hangs), and the others name the failing rank.
#[test]
fn an_engine_error_on_one_rank_stops_the_others_with_overlap() {
    for stage in [0u8, 1, 2, 3] {
        let handles: Vec<_> = InProcess::group(3)
            .into_iter()
            .map(|inner| {
                thread::spawn(move || {
                    let log: Log = Arc::default();
                    let mut comm = Logged {
                        inner,
                        log: log.clone(),
                    };
                    let mut e = probe(log, true, false);
                    let zero = zc(stage, true, 1, false);
                    let mut d = ZeroDriver::new(&mut e, &mut comm, zero).unwrap();
                    let mut b = micro(0, comm.rank());
                    if comm.rank() == 2 {
                        b.targets[3] = 10_000; // out of the vocabulary
                    }
                    let r = d.step(&mut e, &mut comm, &[b], &hp(), 1e-3);
                    r.map(|_| ()).map_err(|e| e.to_string())
                })
            })
            .collect();
        let errs: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for (r, e) in errs.iter().enumerate() {
            let e = e.as_ref().expect_err("every rank must fail");
            if r < 2 {
                assert!(e.contains("rank 2"), "stage {stage} rank {r}: {e}");
            }
        }
    }
}

/// Records each group's gradient as handed over.
struct Keep(Vec<(ParamGroup, Vec<f32>)>);

impl GradHook for Keep {
    fn gradients(&mut self, g: ParamGroup, grads: &[&Tensor<f32>]) -> reference::Result<()> {
        let flat = grads.iter().flat_map(|t| t.data.iter().copied()).collect();
        self.0.push((g, flat));
        Ok(())
    }
}

/// The engine's side: on buffers that already hold a micro-batch's gradient, the streamed call
/// adds the bits the whole-model call adds, keeps its parameters, and hands over each group
/// once, the layers in reverse order and the outer group last, each as its final buffers.
#[test]
fn the_streamed_call_matches_the_whole_model_call_bit_for_bit() {
    let (a, b) = (micro(0, 0), micro(0, 1));
    let batch = |m: &TrainBatch| (m.inputs.clone(), m.resets.clone(), m.targets.clone());
    let run = |streamed: bool| {
        let mut e = probe(Arc::default(), true, false).inner;
        let mut keep = Keep(Vec::new());
        for (k, m) in [&a, &b].into_iter().enumerate() {
            let (tokens, resets, targets) = batch(m);
            let input = Batch {
                batch: ROWS,
                seq_len: SEQ,
                tokens: &tokens,
                resets: Some(&resets),
            };
            if streamed && k == 1 {
                let lo = e
                    .loss_and_backward_streamed(&input, &targets, None, None, 0.5, &mut keep)
                    .unwrap();
                assert!(lo.is_some());
            } else {
                e.loss_and_backward(&input, &targets, None, None, 0.5)
                    .unwrap();
            }
        }
        let layout = FlatLayout::new(&cfg(), 1);
        let grads = layout.flatten(&e.gradients().unwrap()).unwrap();
        let params = layout.flatten(&e.parameters().unwrap()).unwrap();
        (grads, params, keep.0)
    };
    let (want, params, _) = run(false);
    let (got, params2, handed) = run(true);
    assert!(same_bits(&got, &want), "the streamed gradients differ");
    assert!(
        same_bits(&params, &params2),
        "the engine lost its parameters"
    );
    let mut order: Vec<ParamGroup> = (0..cfg().n_layer).rev().map(ParamGroup::Layer).collect();
    order.push(ParamGroup::Outer);
    assert_eq!(handed.iter().map(|h| h.0).collect::<Vec<_>>(), order);
    let layout = FlatLayout::new(&cfg(), 1);
    let specs = reference::param_specs(&cfg());
    for (g, values) in &handed {
        let mut expect = Vec::new();
        for i in g.tensors(&cfg()) {
            assert_eq!(layout.slots[i].name, specs[i].0);
            expect.extend_from_slice(&want[layout.slots[i].flat.clone()]);
        }
        assert!(same_bits(values, &expect), "{g:?}: not its final gradient");
    }
}

/// Stage 3 layer by layer with overlap: each group's reduce-scatter queued on the
/// communication thread, the parameter gathers run there too, in order. The weights and losses
/// are the bits of the in-line run (one and two micro-batches per rank) and, with one, of the
/// whole-model stage 3 (an engine that cannot step layer by layer; with two the layered path
/// sums each micro-batch over the ranks before adding them, another order), at world 2 and 3,
/// with and without prefetch.
#[test]
fn stage_3_overlap_changes_no_bit() {
    for (world, accum) in [(2, 1), (3, 1), (2, 2), (3, 2)] {
        for prefetch in [0, usize::MAX / 2] {
            let z = |overlap| ZeroConfig {
                stage3_prefetch_bucket_size: prefetch,
                ..zc(3, overlap, 700, true)
            };
            let whole = run(world, accum, z(false), false, false);
            let inline = run(world, accum, z(false), true, false);
            let overlap = run(world, accum, z(true), true, false);
            let what = format!("world {world} accum {accum} prefetch {prefetch}");
            assert_eq!(whole[0].layered, Some(false), "{what}");
            for (r, o) in overlap.iter().enumerate() {
                assert_eq!(o.layered, Some(true), "{what}");
                assert!(
                    same_bits(&o.weights, &inline[r].weights),
                    "{what} rank {r}: overlap differs from in line"
                );
                assert!(
                    accum > 1 || same_bits(&o.weights, &whole[0].weights),
                    "{what} rank {r}: overlap differs from the whole-model stage 3"
                );
                assert_eq!(o.losses, inline[r].losses, "{what}: losses");
                assert!(accum > 1 || o.losses == whole[0].losses, "{what}: losses");
                for &(all, over) in &o.comm_secs {
                    assert!(
                        (0.0..=all + 1e-9).contains(&over),
                        "{what}: {over} of {all}"
                    );
                }
            }
            for (a, b) in inline.iter().zip(&overlap) {
                let ops = |v: &[CommRecord]| {
                    let mut o: Vec<_> = v.iter().map(|c| (c.op, c.bytes)).collect();
                    o.sort();
                    o
                };
                for (x, y) in a.comms.iter().zip(&b.comms) {
                    assert_eq!(ops(x), ops(y), "{what}: the collectives differ");
                }
            }
        }
    }
}

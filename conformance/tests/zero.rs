//! ZeRO data parallel on the in-process communicator: the simd engine at world sizes 2, 3
//! and 4, every stage, with and without `offload_optimizer`, against the one-rank run with
//! the same global batch (`trainer::train`'s step: accumulation over every micro-batch, then
//! the engine's own AdamW). Measured errors: `cargo test -p conformance --test zero --
//! --nocapture`.

use std::thread;

use conformance::tol;
use reference::comm::{Comm, InProcess};
use reference::model::Batch;
use reference::{AdamWConfig, InferenceEngine, MambaConfig, TrainingEngine};
use simd::SimdEngine;
use trainer::dist::config::OffloadDevice;
use trainer::dist::{FlatLayout, ZeroConfig, ZeroDriver};
use trainer::train::source::TrainBatch;

const SEQ: usize = 9;
const ROWS: usize = 2;
const STEPS: usize = 3;

fn cfg() -> MambaConfig {
    // d_model 11, 38 tokens: 4411 parameters, divisible by neither 3 nor 4 (checked below).
    MambaConfig::new(11, 2, 38)
}

fn engine() -> SimdEngine {
    conformance::zero::simd_engine(&cfg(), 11)
}

/// Micro-batch `i` of step `s`: random tokens and document resets from a seed.
fn micro(s: usize, i: usize) -> TrainBatch {
    let seed = 1000 * s as u64 + i as u64 + 5;
    conformance::zero::train_batch(&cfg(), (ROWS, SEQ), seed, 7)
}

fn hp(clip: bool) -> AdamWConfig {
    AdamWConfig {
        max_grad_norm: clip.then_some(0.5),
        ..AdamWConfig::default()
    }
}

fn lr(s: usize) -> f64 {
    3e-3 * (1.0 + s as f64) / STEPS as f64
}

/// The flat final weights and per-step losses of the one-rank run over `global` micro-batches
/// per step (the training loop's step with `grad_accum = global`).
fn one_rank(global: usize, clip: bool) -> (Vec<f32>, Vec<f64>) {
    let mut e = engine();
    let mut losses = Vec::new();
    for s in 0..STEPS {
        e.zero_grad().unwrap();
        let mut sum = 0.0;
        for i in 0..global {
            let b = micro(s, i);
            let input = Batch {
                batch: b.batch,
                seq_len: b.seq_len,
                tokens: &b.inputs,
                resets: Some(&b.resets),
            };
            let lo = e
                .loss_and_backward(&input, &b.targets, None, None, 1.0 / global as f64)
                .unwrap();
            sum += lo.loss;
        }
        let st = e.optimizer_step(&hp(clip), lr(s)).unwrap();
        assert!(!st.skipped);
        losses.push(sum / global as f64);
    }
    let layout = FlatLayout::new(&cfg(), 1);
    (layout.flatten(&e.parameters().unwrap()).unwrap(), losses)
}

/// Every rank's flat final weights and rank 0's losses, at `world` ranks with `accum`
/// micro-batches each.
fn distributed(
    world: usize,
    accum: usize,
    zc: ZeroConfig,
    clip: bool,
) -> (Vec<Vec<f32>>, Vec<f64>) {
    let handles: Vec<_> = InProcess::group(world)
        .into_iter()
        .map(|mut comm| {
            let zc = zc.clone();
            thread::spawn(move || {
                let mut e = engine();
                let mut d = ZeroDriver::new(&mut e, &mut comm, zc).unwrap();
                let r = comm.rank();
                let mut losses = Vec::new();
                for s in 0..STEPS {
                    let mine: Vec<TrainBatch> =
                        (r * accum..(r + 1) * accum).map(|i| micro(s, i)).collect();
                    let out = d.step(&mut e, &mut comm, &mine, &hp(clip), lr(s)).unwrap();
                    losses.push(out.loss.expect("finite"));
                }
                d.sync_engine(&mut e, &mut comm).unwrap();
                let layout = FlatLayout::new(&cfg(), 1);
                (layout.flatten(&e.parameters().unwrap()).unwrap(), losses)
            })
        })
        .collect();
    weights_and_rank_0_losses(handles)
}

/// Joins the ranks: every rank's flat weights, and rank 0's losses.
fn weights_and_rank_0_losses<W, L>(
    handles: Vec<thread::JoinHandle<(W, Vec<L>)>>,
) -> (Vec<W>, Vec<L>) {
    let mut all = Vec::new();
    let mut losses = Vec::new();
    for h in handles {
        let (w, l) = h.join().unwrap();
        all.push(w);
        losses.push(l);
    }
    (all, losses.swap_remove(0))
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (g, w) in got.iter().zip(want) {
        assert!(g.is_finite(), "NaN in the weights");
        num += (f64::from(*g) - f64::from(*w)).powi(2);
        den += f64::from(*w).powi(2);
    }
    (num / den).sqrt()
}

fn zc(stage: u8, offload: bool) -> ZeroConfig {
    ZeroConfig {
        stage,
        // Small buckets: several collectives per step, a bucket boundary inside tensors.
        reduce_bucket_size: 1000,
        offload_optimizer: if offload {
            OffloadDevice::Cpu
        } else {
            OffloadDevice::None
        },
        threads: 1,
        ..ZeroConfig::default()
    }
}

#[test]
fn the_parameter_count_does_not_divide_evenly() {
    let n = FlatLayout::new(&cfg(), 1).numel;
    assert!(
        !n.is_multiple_of(3) && !n.is_multiple_of(4),
        "{n} elements: pick another vocab"
    );
}

/// One micro-batch per rank and no clipping. Every stage reduces in rank order and runs the
/// same per-element AdamW, so at one world size every stage, with or without offload, gives
/// the same bits; against the one-rank run (whose engine accumulates micro-batch gradients
/// inside its backward, in another order) within [`tol::ZERO_VS_ONE_RANK`].
/// Ranks that start from different weights all hold rank 0's, bit for bit, once the driver
/// is made (its broadcast), at every stage.
#[test]
fn the_driver_starts_every_rank_from_rank_0s_weights() {
    for stage in 0..=3u8 {
        let handles: Vec<_> = InProcess::group(3)
            .into_iter()
            .map(|mut comm| {
                thread::spawn(move || {
                    let seed = 11 + comm.rank() as u64;
                    let mut e = conformance::zero::simd_engine(&cfg(), seed);
                    ZeroDriver::new(&mut e, &mut comm, zc(stage, false)).unwrap();
                    FlatLayout::new(&cfg(), 1)
                        .flatten(&e.parameters().unwrap())
                        .unwrap()
                })
            })
            .collect();
        let w: Vec<Vec<u32>> = handles
            .into_iter()
            .map(|h| h.join().unwrap().iter().map(|x| x.to_bits()).collect())
            .collect();
        let flat = |e: SimdEngine| {
            let f = FlatLayout::new(&cfg(), 1).flatten(&e.parameters().unwrap());
            f.unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        };
        let other = flat(conformance::zero::simd_engine(&cfg(), 12));
        assert_ne!(other, w[0], "the seeds give different weights");
        assert_eq!(w[0], flat(engine()));
        assert!(w.iter().all(|x| x == &w[0]), "stage {stage}");
    }
}

#[test]
fn every_stage_and_world_matches_one_rank() {
    let mut worst = 0.0f64;
    for world in [2, 3, 4] {
        let (want, want_loss) = one_rank(world, false);
        let (first, _) = distributed(world, 1, zc(0, false), false);
        for stage in 0..=3 {
            for offload in [false, true] {
                let (got, losses) = distributed(world, 1, zc(stage, offload), false);
                for (r, g) in got.iter().enumerate() {
                    let e = rel_err(g, &want);
                    worst = worst.max(e);
                    println!("world {world} stage {stage} offload {offload} rank {r}: rel {e:.3e}");
                    assert!(
                        g == &first[0],
                        "world {world} stage {stage} rank {r} differs from stage 0"
                    );
                    assert!(
                        e <= tol::ZERO_VS_ONE_RANK,
                        "world {world} stage {stage} rank {r}: rel {e:.3e}"
                    );
                }
                let dl = losses.iter().zip(&want_loss).map(|(a, b)| (a - b).abs());
                let dl = dl.fold(0.0f64, f64::max);
                assert!(dl <= 1e-5, "losses differ by {dl}");
            }
        }
    }
    println!("worst {worst:.3e}");
}

/// Clipping with a norm summed in another order, and two micro-batches per rank (another
/// accumulation order): within [`tol::ZERO_VS_ONE_RANK`].
#[test]
fn clipping_and_accumulation_stay_within_the_tolerance() {
    let mut worst = 0.0f64;
    for world in [2, 3, 4] {
        let (want, _) = one_rank(2 * world, true);
        for stage in 0..=3 {
            let (got, _) = distributed(world, 2, zc(stage, false), true);
            for g in &got {
                assert_eq!(g, &got[0], "ranks disagree");
            }
            let e = rel_err(&got[0], &want);
            worst = worst.max(e);
            println!("clip+accum world {world} stage {stage}: rel {e:.3e}");
            assert!(
                e <= tol::ZERO_VS_ONE_RANK,
                "world {world} stage {stage}: {e:.3e}"
            );
        }
    }
    println!("worst {worst:.3e}");
}

#[test]
fn two_runs_with_the_same_world_give_the_same_bits() {
    for stage in [1, 3] {
        let (a, la) = distributed(3, 2, zc(stage, false), true);
        let (b, lb) = distributed(3, 2, zc(stage, false), true);
        assert_eq!(a, b);
        assert_eq!(la, lb);
    }
}

#[test]
fn each_rank_holds_only_its_shard() {
    let world = 3;
    let handles: Vec<_> = InProcess::group(world)
        .into_iter()
        .map(|mut comm| {
            thread::spawn(move || {
                let mut e = engine();
                let d = ZeroDriver::new(&mut e, &mut comm, zc(2, false)).unwrap();
                (d.shard().range.clone(), d.shard().master.len())
            })
        })
        .collect();
    let layout = FlatLayout::new(&cfg(), world);
    for (r, h) in handles.into_iter().enumerate() {
        let (range, len) = h.join().unwrap();
        assert_eq!(range, layout.chunk_range(r));
        assert_eq!(len, layout.chunk);
    }
}

#[test]
fn a_nan_on_one_rank_skips_the_step_on_every_rank() {
    let handles: Vec<_> = InProcess::group(2)
        .into_iter()
        .map(|mut comm| {
            thread::spawn(move || {
                let mut e = engine();
                let mut d = ZeroDriver::new(&mut e, &mut comm, zc(2, false)).unwrap();
                let before = e.parameters().unwrap();
                if comm.rank() == 1 {
                    let mut p = before.clone();
                    p[0].1.data[3] = f32::NAN;
                    e.set_parameters(&p).unwrap();
                }
                let b = micro(0, comm.rank());
                let out = d.step(&mut e, &mut comm, &[b], &hp(true), 1e-3).unwrap();
                let same = before == e.parameters().unwrap() || comm.rank() == 1;
                (out.loss, same, d.shard().step)
            })
        })
        .collect();
    for h in handles {
        let (loss, same, step) = h.join().unwrap();
        assert_eq!(loss, None, "the step must be skipped");
        assert!(same, "rank 0's weights moved on a skipped step");
        assert_eq!(step, 0);
    }
}

/// At stage 3 the failing rank has gathered layers with the others before its loss fails,
/// and the others wait in the backward's next gather: they must fail too, naming it.
#[test]
fn an_engine_error_on_one_rank_stops_the_others() {
    for stage in [1, 3] {
        let handles: Vec<_> = InProcess::group(3)
            .into_iter()
            .map(|mut comm| {
                thread::spawn(move || {
                    let mut e = engine();
                    let mut d = ZeroDriver::new(&mut e, &mut comm, zc(stage, false)).unwrap();
                    let mut b = micro(0, comm.rank());
                    if comm.rank() == 2 {
                        b.targets[0] = 10_000; // out of the vocabulary
                    }
                    let r = d.step(&mut e, &mut comm, &[b], &hp(true), 1e-3);
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

/// The optimizer state of every rank laid end to end (padding dropped).
fn full_state(shards: &[trainer::dist::zero::Shard], numel: usize) -> Vec<Vec<f32>> {
    let mut out = vec![Vec::new(), Vec::new(), Vec::new()];
    for s in shards {
        out[0].extend_from_slice(&s.master);
        out[1].extend_from_slice(&s.m);
        out[2].extend_from_slice(&s.v);
    }
    out.iter_mut().for_each(|v| v.truncate(numel));
    out
}

#[test]
fn a_checkpoint_written_at_world_2_resumes_at_world_3() {
    use trainer::dist::ckpt::{load_shard, move_in, write_shards};
    let dir = std::env::temp_dir().join(format!("vet-zero-ckpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ck = dir.join("step-00000002");
    let handles: Vec<_> = InProcess::group(2)
        .into_iter()
        .map(|mut comm| {
            let ck = ck.clone();
            thread::spawn(move || {
                let mut e = engine();
                let mut d = ZeroDriver::new(&mut e, &mut comm, zc(2, false)).unwrap();
                for s in 0..2 {
                    let b = micro(s, comm.rank());
                    d.step(&mut e, &mut comm, &[b], &hp(true), lr(s)).unwrap();
                }
                let staging = write_shards(&ck, &d, &mut comm).unwrap();
                if comm.rank() == 0 {
                    std::fs::create_dir_all(&ck).unwrap();
                    move_in(&staging, &ck).unwrap();
                }
                comm.barrier().unwrap();
                (d.shard().clone(), e.parameters().unwrap())
            })
        })
        .collect();
    let old: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(ck.join("zero/rank_1_of_2.safetensors").is_file());
    let numel = FlatLayout::new(&cfg(), 1).numel;
    let want = full_state(&old.iter().map(|o| o.0.clone()).collect::<Vec<_>>(), numel);
    let handles: Vec<_> = InProcess::group(3)
        .into_iter()
        .map(|mut comm| {
            let ck = ck.clone();
            thread::spawn(move || {
                let mut e = engine(); // fresh weights: the checkpoint must replace them
                let mut d = ZeroDriver::new(&mut e, &mut comm, zc(1, false)).unwrap();
                let s = load_shard(&ck, &d.layout, 1, comm.rank(), 2).unwrap();
                d.set_shard(s).unwrap();
                d.sync_engine(&mut e, &mut comm).unwrap();
                let params = e.parameters().unwrap();
                let shard = d.shard().clone();
                let b = micro(2, comm.rank());
                let out = d.step(&mut e, &mut comm, &[b], &hp(true), lr(2)).unwrap();
                (shard, params, out.loss)
            })
        })
        .collect();
    let new: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let got = full_state(&new.iter().map(|n| n.0.clone()).collect::<Vec<_>>(), numel);
    assert!(got == want, "re-sharded state differs");
    for n in &new {
        assert!(n.1 == old[0].1, "the weights after resume differ");
        assert!(n.2.is_some_and(f64::is_finite));
        assert_eq!(n.0.step, 2);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Stage 0 without offload on an engine that sums its own gradients (the simd engine, with
/// the host collective) keeps AdamW in the engine: the driver holds no optimizer copy until a
/// checkpoint asks for one, and a resume from that copy (weights, moments and step pushed back
/// into a fresh engine) continues bit for bit.
#[test]
fn stage_0_keeps_the_optimizer_in_the_engine_and_resumes_exactly() {
    let run = |resume_after: Option<usize>| -> Vec<Vec<f32>> {
        let handles: Vec<_> = InProcess::group(2)
            .into_iter()
            .map(|mut comm| {
                thread::spawn(move || {
                    let mut e = engine();
                    let mut d = ZeroDriver::new(&mut e, &mut comm, zc(0, false)).unwrap();
                    assert!(
                        d.in_engine(),
                        "stage 0 on the simd engine sums in the engine"
                    );
                    assert!(d.shard().master.is_empty() && d.shard().m.is_empty());
                    for s in 0..STEPS {
                        if resume_after == Some(s) {
                            d.refresh_shard(&e).unwrap();
                            let shard = d.shard().clone();
                            assert_eq!(shard.step, s as u64);
                            assert!(shard.m.iter().any(|&m| m != 0.0), "no moments copied");
                            e = engine(); // fresh weights and optimizer
                            d = ZeroDriver::new(&mut e, &mut comm, zc(0, false)).unwrap();
                            d.set_shard(shard).unwrap();
                            d.sync_engine(&mut e, &mut comm).unwrap();
                        }
                        let mine = [micro(s, comm.rank())];
                        let out = d.step(&mut e, &mut comm, &mine, &hp(true), lr(s)).unwrap();
                        assert!(out.loss.is_some_and(f64::is_finite));
                    }
                    FlatLayout::new(&cfg(), 1)
                        .flatten(&e.parameters().unwrap())
                        .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    };
    let straight = run(None);
    assert_eq!(straight[0], straight[1], "ranks disagree");
    let resumed = run(Some(2));
    assert!(resumed == straight, "the resumed run differs");
}

/// Every rank's final weights and rank 0's losses at world 2, stage `stage`, with `scale` as the
/// loss scale of every step (fp16's dynamic loss scaling, here on f32 engines).
fn loss_scaled(stage: u8, scale: f64) -> (Vec<Vec<f32>>, Vec<Option<f64>>) {
    let handles: Vec<_> = InProcess::group(2)
        .into_iter()
        .map(|mut comm| {
            thread::spawn(move || {
                let mut e = engine();
                let zc = ZeroConfig {
                    loss_scaled: true,
                    ..zc(stage, false)
                };
                let mut d = ZeroDriver::new(&mut e, &mut comm, zc).unwrap();
                assert!(
                    !d.in_engine(),
                    "a loss-scaled run keeps the optimizer in the driver"
                );
                d.set_loss_scale(scale).unwrap();
                let r = comm.rank();
                let mut losses = Vec::new();
                for s in 0..STEPS {
                    let mine = [micro(s, 2 * r), micro(s, 2 * r + 1)];
                    let out = d.step(&mut e, &mut comm, &mine, &hp(true), lr(s)).unwrap();
                    losses.push(out.loss);
                }
                d.sync_engine(&mut e, &mut comm).unwrap();
                let layout = FlatLayout::new(&cfg(), 1);
                (layout.flatten(&e.parameters().unwrap()).unwrap(), losses)
            })
        })
        .collect();
    weights_and_rank_0_losses(handles)
}

#[test]
fn a_power_of_two_loss_scale_changes_no_bit() {
    for stage in [0u8, 2, 3] {
        let (plain, plain_losses) = loss_scaled(stage, 1.0);
        let (scaled, scaled_losses) = loss_scaled(stage, 4096.0);
        assert!(plain_losses.iter().all(Option::is_some));
        assert_eq!(scaled_losses, plain_losses, "stage {stage}: losses");
        for (r, (a, b)) in scaled.iter().zip(&plain).enumerate() {
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(
                same,
                "stage {stage}, rank {r}: the scaled run's weights differ"
            );
        }
    }
}

#[test]
fn an_overflowing_loss_scale_skips_the_step_on_every_rank() {
    let before = {
        let e = engine();
        FlatLayout::new(&cfg(), 1)
            .flatten(&e.parameters().unwrap())
            .unwrap()
    };
    for stage in [2, 3] {
        let (after, losses) = loss_scaled(stage, 1e300);
        assert!(losses.iter().all(Option::is_none), "{losses:?}");
        for w in &after {
            assert_eq!(
                w, &before,
                "stage {stage}: a skipped step moved the weights"
            );
        }
    }
}

#[test]
fn a_loss_scale_needs_a_driver_made_for_it() {
    let mut comm = InProcess::group(1).pop().unwrap();
    let mut e = engine();
    let mut d = ZeroDriver::new(&mut e, &mut comm, zc(0, false)).unwrap();
    // A stage-0 driver on an engine that sums its own gradients keeps AdamW in the engine.
    assert!(d.in_engine());
    assert!(d.set_loss_scale(1024.0).is_err());
    assert!(d.set_loss_scale(1.0).is_ok());
    assert!(d.set_loss_scale(f64::NAN).is_err());
}

/// A CPU stand-in for an engine that shards its optimizer where its gradients live (the GPU
/// engine over NCCL, `gpu/src/zero.rs`), so that the driver's side of stages 1–2 on the
/// device (`ZeroDriver::on_device`) runs here at world sizes 2 and 3: the simd engine for the
/// model, the shard's moments held by the stand-in, the collectives on host copies.
struct ChunkEngine {
    inner: SimdEngine,
    /// The chunk, the flat layout over the world.
    shard: Option<(std::ops::Range<usize>, FlatLayout)>,
    grad: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    step: u64,
}

impl ChunkEngine {
    fn new() -> ChunkEngine {
        ChunkEngine {
            inner: engine(),
            shard: None,
            grad: Vec::new(),
            m: Vec::new(),
            v: Vec::new(),
            step: 0,
        }
    }

    fn on(&self) -> (std::ops::Range<usize>, FlatLayout) {
        self.shard.clone().expect("sharded")
    }
}

impl InferenceEngine for ChunkEngine {
    fn name(&self) -> String {
        "chunk".into()
    }
    fn config(&self) -> &MambaConfig {
        self.inner.config()
    }
    fn forward(
        &mut self,
        input: &Batch,
        state: Option<&reference::State<f32>>,
    ) -> reference::Result<(reference::Tensor<f32>, reference::State<f32>)> {
        self.inner.forward(input, state)
    }
    fn step(
        &mut self,
        tokens: &[u32],
        resets: Option<&[bool]>,
        state: &mut reference::State<f32>,
    ) -> reference::Result<reference::Tensor<f32>> {
        self.inner.step(tokens, resets, state)
    }
    fn parameters(&self) -> reference::Result<reference::engine::NamedTensors> {
        self.inner.parameters()
    }
}

impl TrainingEngine for ChunkEngine {
    fn loss_and_backward(
        &mut self,
        input: &Batch,
        targets: &[u32],
        mask: Option<&[bool]>,
        state: Option<&reference::State<f32>>,
        grad_scale: f64,
    ) -> reference::Result<reference::engine::LossOutput> {
        self.inner
            .loss_and_backward(input, targets, mask, state, grad_scale)
    }
    fn zero_grad(&mut self) -> reference::Result<()> {
        self.inner.zero_grad()
    }
    fn gradients(&self) -> reference::Result<reference::engine::NamedTensors> {
        self.inner.gradients()
    }
    fn optimizer_step(
        &mut self,
        _: &AdamWConfig,
        _: f64,
    ) -> reference::Result<reference::optim::StepStats> {
        panic!("a sharded engine took a whole-model step")
    }
    fn set_parameters(
        &mut self,
        named: &[(String, reference::Tensor<f32>)],
    ) -> reference::Result<()> {
        self.inner.set_parameters(named)
    }
    fn optimizer_state(&self) -> reference::Result<reference::engine::OptimizerState> {
        panic!("the driver asked a sharded engine for its whole optimizer")
    }
    fn set_optimizer_state(
        &mut self,
        _: &reference::engine::OptimizerState,
    ) -> reference::Result<()> {
        panic!("the driver gave a sharded engine a whole optimizer")
    }
    fn shard_optimizer(
        &mut self,
        comm: &mut dyn Comm,
        chunk: std::ops::Range<usize>,
        padded: usize,
    ) -> reference::Result<bool> {
        let layout = FlatLayout::new(self.config(), comm.world());
        assert_eq!(chunk, layout.chunk_range(comm.rank()));
        assert_eq!(padded, layout.padded());
        (self.m, self.v) = (vec![0.0; chunk.len()], vec![0.0; chunk.len()]);
        self.shard = Some((chunk, layout));
        Ok(true)
    }
    fn reduce_gradient_shard(
        &mut self,
        comm: &mut dyn Comm,
        scatter: bool,
    ) -> reference::Result<f64> {
        let (chunk, layout) = self.on();
        let mut g = layout.flatten(&self.gradients()?).unwrap();
        self.grad = if scatter {
            let mut mine = vec![0.0; chunk.len()];
            comm.reduce_scatter_sum(&g, &mut mine)?;
            mine
        } else {
            comm.all_reduce_sum(&mut g)?;
            g[chunk].to_vec()
        };
        Ok(trainer::dist::sum_of_squares(&self.grad))
    }
    fn optimizer_step_shard(
        &mut self,
        comm: &mut dyn Comm,
        hp: &AdamWConfig,
        lr: f64,
        grad_norm: f64,
    ) -> reference::Result<()> {
        let (chunk, layout) = self.on();
        if let Some(c) = hp.max_grad_norm.map(|max| max / (grad_norm + 1e-6)) {
            if c < 1.0 {
                self.grad.iter_mut().for_each(|g| *g *= c as f32);
            }
        }
        self.step += 1;
        let mut p = layout.flatten(&self.parameters()?).unwrap()[chunk].to_vec();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let runs = layout.decay_runs(comm.rank());
        let (g, m, v) = (&self.grad, &mut self.m, &mut self.v);
        simd::optim::adamw_update_flat(&pool, hp, lr, self.step, &mut p, g, m, v, &runs);
        let mut full = vec![0.0; layout.padded()];
        comm.all_gather(&p, &mut full)?;
        self.set_parameters(&layout.unflatten(&full))
    }
    fn optimizer_shard(&self) -> reference::Result<reference::engine::OptimizerShard> {
        let (chunk, layout) = self.on();
        Ok(reference::engine::OptimizerShard {
            master: layout.flatten(&self.parameters()?).unwrap()[chunk.clone()].to_vec(),
            m: self.m.clone(),
            v: self.v.clone(),
            step: self.step,
            range: chunk,
        })
    }
    fn set_optimizer_shard(
        &mut self,
        s: &reference::engine::OptimizerShard,
    ) -> reference::Result<()> {
        assert_eq!(s.range, self.on().0);
        (self.m, self.v, self.step) = (s.m.clone(), s.v.clone(), s.step);
        Ok(())
    }
}

/// What [`chunked`] returns: every rank's flat final weights, rank 0's losses, and with a
/// resume every rank's shard as written and as loaded (moments, weights, step).
struct Chunked {
    weights: Vec<Vec<f32>>,
    losses: Vec<Option<f64>>,
    saved: Vec<trainer::dist::zero::Shard>,
    loaded: Vec<trainer::dist::zero::Shard>,
}

/// The run at `world` ranks, stage `stage`, with the optimizer in a [`ChunkEngine`]; with
/// `resume = (at, world2)`, every rank's shard is written to a checkpoint after step `at`
/// and the run goes on at `world2` ranks from it, in fresh engines and drivers.
fn chunked(world: usize, stage: u8, resume: Option<(usize, usize)>) -> Chunked {
    use trainer::dist::ckpt::{load_shard, move_in, write_shards};
    let dir = std::env::temp_dir().join(format!(
        "vet-zero-chunk-{}-{world}-{stage}-{resume:?}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let ck = dir.join("step");
    let stop = resume.map_or(STEPS, |r| r.0);
    let flat = |e: &ChunkEngine| {
        FlatLayout::new(&cfg(), 1)
            .flatten(&e.parameters().unwrap())
            .unwrap()
    };
    let handles: Vec<_> = InProcess::group(world)
        .into_iter()
        .map(|mut comm| {
            let ck = ck.clone();
            thread::spawn(move || {
                let mut e = ChunkEngine::new();
                let mut d = ZeroDriver::new(&mut e, &mut comm, zc(stage, false)).unwrap();
                assert!(d.on_device() && d.shard().m.is_empty());
                let mut losses = Vec::new();
                for s in 0..stop {
                    let b = micro(s, comm.rank());
                    let out = d.step(&mut e, &mut comm, &[b], &hp(true), lr(s)).unwrap();
                    losses.push(out.loss);
                }
                d.refresh_shard(&e).unwrap();
                if stop < STEPS {
                    let staging = write_shards(&ck, &d, &mut comm).unwrap();
                    if comm.rank() == 0 {
                        std::fs::create_dir_all(&ck).unwrap();
                        move_in(&staging, &ck).unwrap();
                    }
                    comm.barrier().unwrap();
                }
                ((flat(&e), d.shard().clone()), losses)
            })
        })
        .collect();
    let (first, mut losses) = weights_and_rank_0_losses(handles);
    let saved = first.iter().map(|f| f.1.clone()).collect();
    let mut weights = first.into_iter().map(|f| f.0).collect();
    let mut loaded = Vec::new();
    if let Some((at, w2)) = resume {
        let handles: Vec<_> = InProcess::group(w2)
            .into_iter()
            .map(|mut comm| {
                let ck = ck.clone();
                thread::spawn(move || {
                    let mut e = ChunkEngine::new(); // fresh: the checkpoint must replace it
                    let mut d = ZeroDriver::new(&mut e, &mut comm, zc(stage, false)).unwrap();
                    let s = load_shard(&ck, &d.layout, stage, comm.rank(), at as u64).unwrap();
                    d.set_shard(s.clone()).unwrap();
                    // A checkpoint before the first sync writes the loaded state.
                    d.refresh_shard(&e).unwrap();
                    assert!(d.shard() == &s, "a refresh before the sync lost the shard");
                    d.sync_engine(&mut e, &mut comm).unwrap();
                    // What the engine holds now, as the next checkpoint would see it.
                    d.refresh_shard(&e).unwrap();
                    let held = d.shard().clone();
                    let mut l = Vec::new();
                    for s in at..STEPS {
                        let b = micro(s, comm.rank());
                        l.push(
                            d.step(&mut e, &mut comm, &[b], &hp(true), lr(s))
                                .unwrap()
                                .loss,
                        );
                    }
                    ((flat(&e), held), l)
                })
            })
            .collect();
        let (second, l) = weights_and_rank_0_losses(handles);
        loaded = second.iter().map(|f| f.1.clone()).collect();
        weights = second.into_iter().map(|f| f.0).collect();
        losses.extend(l);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Chunked {
        weights,
        losses,
        saved,
        loaded,
    }
}

/// The driver's side of stages 1–2 with the optimizer sharded in the engine: every rank ends
/// with the bits of the host-side driver at the same world and stage (the same rank-order
/// sums, the same per-element AdamW), and a checkpoint written from the engine's shards
/// resumes in fresh engines at the same world bit for bit.
#[test]
fn an_engine_that_shards_its_optimizer_matches_the_host_driver() {
    for world in [2, 3] {
        for stage in [1u8, 2] {
            let (want, want_l) = distributed(world, 1, zc(stage, false), true);
            let got = chunked(world, stage, None);
            for (r, g) in got.weights.iter().enumerate() {
                assert!(
                    g == &want[0],
                    "world {world} stage {stage} rank {r} differs"
                );
            }
            let want_l: Vec<Option<f64>> = want_l.into_iter().map(Some).collect();
            assert_eq!(
                got.losses, want_l,
                "world {world} stage {stage}: losses differ"
            );
            let resumed = chunked(world, stage, Some((2, world)));
            assert!(
                resumed.weights == got.weights,
                "world {world} stage {stage}: the resumed run differs"
            );
            assert_eq!(resumed.losses, got.losses);
        }
    }
}

/// A checkpoint of engine-held shards at world 2 resumes at world 3: the engines of the new
/// world hold exactly the saved state, re-sharded (weights, both moments, step), and the
/// three ranks go on in step.
#[test]
fn engine_held_shards_resume_at_another_world() {
    let numel = FlatLayout::new(&cfg(), 1).numel;
    let c = chunked(2, 2, Some((2, 3)));
    assert_eq!((c.saved.len(), c.loaded.len()), (2, 3));
    assert!(c.saved[1].v.iter().any(|&v| v != 0.0), "no moments saved");
    let (saved, loaded) = (full_state(&c.saved, numel), full_state(&c.loaded, numel));
    assert!(
        loaded == saved,
        "the re-sharded state differs from the saved one"
    );
    assert!(c.loaded.iter().all(|s| s.step == 2));
    assert!(
        c.weights.iter().all(|x| x == &c.weights[0]),
        "ranks disagree at world 3"
    );
    assert_eq!(c.losses.len(), STEPS);
    assert!(c.losses.iter().all(|x| x.is_some_and(f64::is_finite)));
}

//! ZeRO stage 3 layer by layer on the simd engine and the in-process communicator: the engine
//! holds one parameter group at a time (a layer, or the embedding, final norm and head), each
//! group all-gathered from the ranks' shards around its use and its gradient reduce-scattered
//! as soon as it is final; the results are the bits of the whole-model stage 2 at the same
//! world, within [`tol::ZERO_VS_ONE_RANK`] of one rank. Measured peaks: `cargo test -p
//! conformance --test zero_stage3 -- --nocapture`.

use std::thread;

use conformance::tol;
use reference::comm::{Comm, InProcess};
use reference::engine::ParamGroup;
use reference::init::init_params;
use reference::model::Batch;
use reference::rng::Rng;
use reference::{
    param_specs, AdamWConfig, InferenceEngine, MambaConfig, NormKind, ReferenceEngine,
    TrainingEngine,
};
use simd::engine::LayeredPeak;
use simd::SimdEngine;
use trainer::dist::config::OffloadDevice;
use trainer::dist::{FlatLayout, ZeroConfig, ZeroDriver};
use trainer::train::source::TrainBatch;

const SEQ: usize = 7;
const ROWS: usize = 2;
const STEPS: usize = 3;

/// Eight layers: the whole model is far more than any one group.
fn deep() -> MambaConfig {
    MambaConfig::new(16, 8, 50)
}

/// LayerNorm, biases and an untied head (the outer group is two flat ranges, at both ends),
/// with group sizes that divide by no world size from 2 to 4 (checked in the test).
fn uneven() -> MambaConfig {
    MambaConfig {
        norm: NormKind::Layer,
        use_bias: true,
        tie_embeddings: false,
        ..MambaConfig::new(7, 3, 31)
    }
}

fn engine(cfg: &MambaConfig) -> SimdEngine {
    conformance::zero::simd_engine(cfg, 23)
}

/// Micro-batch `i` of step `s`: seeded random tokens, targets and document resets.
fn micro(cfg: &MambaConfig, s: usize, i: usize) -> TrainBatch {
    let seed = 7919 * s as u64 + i as u64 + 3;
    conformance::zero::train_batch(cfg, (ROWS, SEQ), seed, 5)
}

fn hp() -> AdamWConfig {
    AdamWConfig::default()
}

fn lr(s: usize) -> f64 {
    2e-3 * (1.0 + s as f64)
}

fn zc(stage: u8) -> ZeroConfig {
    ZeroConfig {
        stage,
        reduce_bucket_size: 700,
        offload_optimizer: OffloadDevice::Cpu,
        threads: 1,
        ..ZeroConfig::default()
    }
}

/// Elements of `group`'s tensors.
fn group_numel(cfg: &MambaConfig, group: ParamGroup) -> usize {
    let specs = param_specs(cfg);
    group
        .tensors(cfg)
        .into_iter()
        .map(|i| specs[i].1.iter().product::<usize>())
        .sum()
}

/// What one rank ends with.
struct RankOut {
    /// Flat final weights (gathered after the last step).
    weights: Vec<f32>,
    losses: Vec<f64>,
    /// The engine's layered peak of each step.
    peaks: Vec<Option<LayeredPeak>>,
    layered: Option<bool>,
    /// Whether the engine held its parameters right after the last step (before the gather).
    held_after: bool,
    /// The collectives of every step, by name.
    ops: std::collections::BTreeSet<&'static str>,
    /// Collectives that moved parameters, over every step.
    gathers: usize,
    /// The driver's live peak of each step (engine's groups plus one gathered ahead).
    live: Vec<Option<usize>>,
}

/// `STEPS` steps at `world` ranks, one micro-batch per rank.
fn run(cfg: &MambaConfig, world: usize, zero: ZeroConfig) -> Vec<RankOut> {
    let handles: Vec<_> = InProcess::group(world)
        .into_iter()
        .map(|mut comm| {
            let (cfg, zero) = (cfg.clone(), zero.clone());
            thread::spawn(move || {
                let mut e = engine(&cfg);
                let mut d = ZeroDriver::new(&mut e, &mut comm, zero).unwrap();
                let mut losses = Vec::new();
                let mut peaks = Vec::new();
                let mut ops = std::collections::BTreeSet::new();
                let (mut gathers, mut live) = (0, Vec::new());
                for s in 0..STEPS {
                    let b = [micro(&cfg, s, comm.rank())];
                    let out = d.step(&mut e, &mut comm, &b, &hp(), lr(s)).unwrap();
                    losses.push(out.loss.expect("finite"));
                    peaks.push(e.layered_peak());
                    live.push(d.live_peak());
                    for c in d.take_comms() {
                        gathers += usize::from(
                            c.op.ends_with("gather_group") || c.op == "broadcast_group",
                        );
                        ops.insert(c.op);
                    }
                }
                let held_after = e.holds_parameters();
                d.sync_engine(&mut e, &mut comm).unwrap();
                let weights = FlatLayout::new(&cfg, 1)
                    .flatten(&e.parameters().unwrap())
                    .unwrap();
                RankOut {
                    weights,
                    losses,
                    peaks,
                    layered: d.layered(),
                    held_after,
                    ops,
                    gathers,
                    live,
                }
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// The one-rank run over `global` micro-batches per step (the training loop's accumulation).
fn one_rank(cfg: &MambaConfig, global: usize) -> (Vec<f32>, Vec<f64>) {
    let mut e = engine(cfg);
    let mut losses = Vec::new();
    for s in 0..STEPS {
        e.zero_grad().unwrap();
        let mut sum = 0.0;
        for i in 0..global {
            let b = micro(cfg, s, i);
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
        assert!(!e.optimizer_step(&hp(), lr(s)).unwrap().skipped);
        losses.push(sum / global as f64);
    }
    let w = FlatLayout::new(cfg, 1)
        .flatten(&e.parameters().unwrap())
        .unwrap();
    (w, losses)
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

/// The engine's peak of live parameter elements during a stage-3 step is one group (the
/// largest layer, or the embedding + final norm), far below the whole model; of gradient
/// elements the outer group plus one layer. Stage 2 holds every parameter through the step.
/// The first step's peak counts the whole model the engine was made with.
#[test]
fn stage_3_holds_one_group_at_a_time() {
    let cfg = deep();
    let numel = FlatLayout::new(&cfg, 1).numel;
    let layer = (0..cfg.n_layer)
        .map(|i| group_numel(&cfg, ParamGroup::Layer(i)))
        .max()
        .unwrap();
    let outer = group_numel(&cfg, ParamGroup::Outer);
    let one_group = layer.max(outer);
    println!("model {numel} elements: a layer {layer}, the outer group {outer}");
    for world in [2, 4] {
        let ranks = run(&cfg, world, zc(3));
        for (r, o) in ranks.iter().enumerate() {
            assert_eq!(o.layered, Some(true), "world {world}: not layer by layer");
            assert!(!o.held_after, "rank {r} held its parameters after a step");
            assert_eq!(
                o.peaks[0].map(|p| p.parameters),
                Some(numel),
                "the first step starts from the engine's whole weights"
            );
            for (s, p) in o.peaks.iter().enumerate().skip(1) {
                let p = p.expect("a layered step ran");
                println!(
                    "world {world} rank {r} step {s}: peak {} parameter and {} gradient elements",
                    p.parameters, p.gradients
                );
                assert!(
                    p.parameters <= one_group,
                    "world {world} rank {r} step {s}: {} parameter elements live, one group is {one_group}",
                    p.parameters
                );
                assert!(4 * p.parameters < numel, "not far below the whole model");
                assert!(
                    p.gradients <= outer + layer,
                    "{} gradient elements",
                    p.gradients
                );
            }
        }
    }
    let two = run(&cfg, 2, zc(2));
    assert!(two.iter().all(|o| o.held_after && o.layered.is_none()));
    assert!(two.iter().all(|o| o.live.iter().all(Option::is_none)));
    println!("stage 2: the engine holds all {numel} parameter elements through every step");
}

/// Groups whose flat ranges straddle chunk boundaries at every world size from 2 to 4 (no
/// group size divides by the world): stage 3 gives the bits of stage 2 at the same world
/// (the same rank-order sums), on every rank, within the tolerance of the one-rank run.
#[test]
fn uneven_groups_match_stage_2_and_one_rank() {
    let cfg = uneven();
    let numel = FlatLayout::new(&cfg, 1).numel;
    for g in ParamGroup::all(&cfg) {
        let n = group_numel(&cfg, g);
        assert!(
            !n.is_multiple_of(3) && !n.is_multiple_of(4) && !n.is_multiple_of(2)
                || g == ParamGroup::Outer,
            "{g:?}: {n} elements"
        );
    }
    assert!(!numel.is_multiple_of(2) && !numel.is_multiple_of(3) && !numel.is_multiple_of(4));
    let mut worst = 0.0f64;
    let mut ops = std::collections::BTreeSet::new();
    for world in [2, 3, 4] {
        let (want, want_loss) = one_rank(&cfg, world);
        let two = run(&cfg, world, zc(2));
        let three = run(&cfg, world, zc(3));
        ops.extend(three[0].ops.iter().copied());
        for (r, o) in three.iter().enumerate() {
            assert_eq!(o.layered, Some(true));
            assert!(
                o.weights == two[0].weights,
                "world {world} rank {r}: stage 3 differs from stage 2"
            );
            assert_eq!(o.losses, two[0].losses, "world {world}: losses");
            let e = rel_err(&o.weights, &want);
            worst = worst.max(e);
            assert!(
                e <= tol::ZERO_VS_ONE_RANK,
                "world {world} rank {r}: rel {e:.3e}"
            );
            let dl = o.losses.iter().zip(&want_loss).map(|(a, b)| (a - b).abs());
            assert!(dl.fold(0.0f64, f64::max) <= 1e-5);
        }
    }
    println!("worst against one rank {worst:.3e}; collectives {ops:?}");
    // Both ways of moving a group ran: one padded collective, and each owner's part alone.
    for op in [
        "all_gather_group",
        "broadcast_group",
        "reduce_scatter_group",
        "all_reduce_group",
    ] {
        assert!(ops.contains(op), "{op} never ran: {ops:?}");
    }
}

/// An engine that cannot step layer by layer (the reference engine) gets every parameter
/// gathered for each step, as before: the driver says so, and the bits are stage 2's.
#[test]
fn an_engine_without_layered_steps_gathers_the_whole_model() {
    let cfg = uneven();
    let run_ref = |stage: u8| -> Vec<(Vec<f32>, Option<bool>)> {
        let handles: Vec<_> = InProcess::group(2)
            .into_iter()
            .map(|mut comm| {
                let cfg = cfg.clone();
                thread::spawn(move || {
                    let mut e = ReferenceEngine::new(cfg.clone(), init_params::<f32>(&cfg, 23));
                    let mut d = ZeroDriver::new(&mut e, &mut comm, zc(stage)).unwrap();
                    for s in 0..2 {
                        let b = [micro(&cfg, s, comm.rank())];
                        d.step(&mut e, &mut comm, &b, &hp(), lr(s)).unwrap();
                    }
                    d.sync_engine(&mut e, &mut comm).unwrap();
                    let w = FlatLayout::new(&cfg, 1)
                        .flatten(&e.parameters().unwrap())
                        .unwrap();
                    (w, d.layered())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    };
    let three = run_ref(3);
    let two = run_ref(2);
    for (w, layered) in &three {
        assert_eq!(*layered, Some(false));
        assert!(
            w == &two[0].0,
            "stage 3 on the reference engine differs from stage 2"
        );
    }
}

/// A stage-3 checkpoint written at world 2 (layer by layer) resumes at world 3: the driver's
/// re-sharded state gathers into the weights the world-2 ranks ended with, and the next
/// steps give the bits that stage 2 gives from the same checkpoint at world 3.
#[test]
fn a_stage_3_checkpoint_at_world_2_resumes_at_world_3() {
    use trainer::dist::ckpt::{load_shard, move_in, write_shards};
    let cfg = uneven();
    let dir = std::env::temp_dir().join(format!("vet-zero3-ckpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ck = dir.join("step-00000002");
    let handles: Vec<_> = InProcess::group(2)
        .into_iter()
        .map(|mut comm| {
            let (cfg, ck) = (cfg.clone(), ck.clone());
            thread::spawn(move || {
                let mut e = engine(&cfg);
                let mut d = ZeroDriver::new(&mut e, &mut comm, zc(3)).unwrap();
                for s in 0..2 {
                    let b = [micro(&cfg, s, comm.rank())];
                    d.step(&mut e, &mut comm, &b, &hp(), lr(s)).unwrap();
                }
                assert_eq!(d.layered(), Some(true));
                let staging = write_shards(&ck, &d, &mut comm).unwrap();
                if comm.rank() == 0 {
                    std::fs::create_dir_all(&ck).unwrap();
                    move_in(&staging, &ck).unwrap();
                }
                comm.barrier().unwrap();
                d.sync_engine(&mut e, &mut comm).unwrap();
                e.parameters().unwrap()
            })
        })
        .collect();
    let old: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let resume = |stage: u8| -> Vec<(Vec<f32>, Vec<f64>)> {
        let handles: Vec<_> = InProcess::group(3)
            .into_iter()
            .map(|mut comm| {
                let (cfg, ck, want) = (cfg.clone(), ck.clone(), old[0].clone());
                thread::spawn(move || {
                    let mut e = engine(&cfg); // the checkpoint must replace these weights
                    let mut d = ZeroDriver::new(&mut e, &mut comm, zc(stage)).unwrap();
                    let s = load_shard(&ck, &d.layout, stage, comm.rank(), 2).unwrap();
                    d.set_shard(s).unwrap();
                    d.sync_engine(&mut e, &mut comm).unwrap();
                    assert!(
                        e.parameters().unwrap() == want,
                        "the resumed weights differ"
                    );
                    let mut losses = Vec::new();
                    for s in 2..4 {
                        let b = [micro(&cfg, s, comm.rank())];
                        let out = d.step(&mut e, &mut comm, &b, &hp(), lr(s)).unwrap();
                        losses.push(out.loss.expect("finite"));
                    }
                    d.sync_engine(&mut e, &mut comm).unwrap();
                    let w = FlatLayout::new(&cfg, 1)
                        .flatten(&e.parameters().unwrap())
                        .unwrap();
                    (w, losses)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    };
    let three = resume(3);
    let two = resume(2);
    for (r, got) in three.iter().enumerate() {
        assert!(
            got == &two[0],
            "rank {r}: stage 3 resumed differs from stage 2 resumed"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A one-process hook: fills from whole parameters, records each group's gradient and the
/// order of the calls.
struct LocalHook {
    cfg: MambaConfig,
    params: Vec<reference::Tensor<f32>>,
    grads: Vec<Option<reference::Tensor<f32>>>,
    calls: Vec<String>,
}

impl reference::engine::ParamHook for LocalHook {
    fn fill(
        &mut self,
        g: ParamGroup,
        tensors: &mut [reference::Tensor<f32>],
    ) -> reference::Result<()> {
        for (t, i) in tensors.iter_mut().zip(g.tensors(&self.cfg)) {
            t.data.copy_from_slice(&self.params[i].data);
        }
        self.calls.push(format!("fill {g:?}"));
        Ok(())
    }
    fn release(&mut self, g: ParamGroup) -> reference::Result<()> {
        self.calls.push(format!("release {g:?}"));
        Ok(())
    }
    fn gradients(
        &mut self,
        g: ParamGroup,
        grads: &[&reference::Tensor<f32>],
    ) -> reference::Result<()> {
        for (t, i) in grads.iter().zip(g.tensors(&self.cfg)) {
            assert!(self.grads[i].is_none(), "{g:?} handed over twice");
            self.grads[i] = Some((*t).clone());
        }
        self.calls.push(format!("grads {g:?}"));
        Ok(())
    }
}

/// The simd engine's layered call, from a random initial state, gives the loss, the state
/// gradient and every parameter gradient of `loss_and_backward` bit for bit, asks for the groups
/// in the documented order, and holds no parameters afterwards (inference says so instead of
/// reading emptied weights) until `set_parameters`.
#[test]
fn the_layered_call_matches_the_whole_model_call_bit_for_bit() {
    for cfg in [uneven(), MambaConfig::new(9, 2, 20)] {
        let b = micro(&cfg, 5, 1);
        let input = Batch {
            batch: b.batch,
            seq_len: b.seq_len,
            tokens: &b.inputs,
            resets: Some(&b.resets),
        };
        let mut rng = Rng::new(99);
        let mut st = reference::State::zeros(&cfg, ROWS);
        for x in st.conv.data.iter_mut().chain(st.ssm.data.iter_mut()) {
            *x = rng.uniform(-0.5, 0.5) as f32;
        }
        let mut whole = engine(&cfg);
        whole.zero_grad().unwrap();
        let want = whole
            .loss_and_backward(&input, &b.targets, None, Some(&st), 0.37)
            .unwrap();
        let want_g = whole.gradients().unwrap();
        let mut layered = engine(&cfg);
        let params: Vec<_> = layered
            .parameters()
            .unwrap()
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        let mut hook = LocalHook {
            cfg: cfg.clone(),
            grads: vec![None; params.len()],
            params,
            calls: Vec::new(),
        };
        let got = layered
            .loss_and_backward_layered(&input, &b.targets, None, Some(&st), 0.37, &mut hook)
            .unwrap()
            .expect("the simd engine steps layer by layer");
        assert_eq!(got.loss.to_bits(), want.loss.to_bits());
        assert_eq!(got.n_targets, want.n_targets);
        assert!(got.grad_state == want.grad_state, "state gradients differ");
        for ((name, w), g) in want_g.iter().zip(&hook.grads) {
            let g = g.as_ref().unwrap_or_else(|| panic!("{name}: no gradient"));
            let same = g
                .data
                .iter()
                .zip(&w.data)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{name}: gradients differ");
        }
        let n = cfg.n_layer;
        let mut order = vec!["fill Outer".to_string(), "release Outer".into()];
        for i in 0..n {
            order.push(format!("fill Layer({i})"));
            order.push(format!("release Layer({i})"));
        }
        order.push("fill Outer".into());
        order.push("release Outer".into());
        for i in (0..n).rev() {
            order.push(format!("fill Layer({i})"));
            order.push(format!("release Layer({i})"));
            order.push(format!("grads Layer({i})"));
        }
        order.push("grads Outer".into());
        assert_eq!(hook.calls, order);
        assert!(!layered.holds_parameters());
        assert!(layered.forward(&input, None).is_err());
        assert!(layered.parameters().is_err());
        layered
            .set_parameters(&whole.parameters().unwrap())
            .unwrap();
        assert!(layered.forward(&input, None).is_ok());
    }
}

/// Prefetch: by default (DeepSpeed's limits) the next group of the fill order is gathered with
/// the current one where the live limit allows, so fewer collectives move parameters and at
/// most two groups are live; a live limit of one group, or a prefetch bucket smaller than any
/// group, turns it off (one group live). The bits are the same every way, and stage 2's.
#[test]
fn prefetch_respects_the_live_limit_and_changes_no_bit() {
    let cfg = deep();
    let layer = group_numel(&cfg, ParamGroup::Layer(0));
    let outer = group_numel(&cfg, ParamGroup::Outer);
    let one_group = layer.max(outer);
    for world in [2, 4] {
        let stage2 = run(&cfg, world, zc(2));
        let on = run(&cfg, world, zc(3));
        let limited = run(
            &cfg,
            world,
            ZeroConfig {
                stage3_max_live_parameters: one_group,
                ..zc(3)
            },
        );
        let small_bucket = run(
            &cfg,
            world,
            ZeroConfig {
                stage3_prefetch_bucket_size: outer - 1,
                ..zc(3)
            },
        );
        for (name, ranks) in [
            ("on", &on),
            ("limited", &limited),
            ("small bucket", &small_bucket),
        ] {
            for (r, o) in ranks.iter().enumerate() {
                assert!(
                    o.weights == stage2[0].weights,
                    "{name} world {world} rank {r}: bits differ"
                );
                assert_eq!(o.losses, stage2[0].losses);
                let live = o.live.iter().map(|l| l.expect("layered")).max().unwrap();
                println!(
                    "world {world} {name} rank {r}: live peak {live}, {} parameter collectives",
                    o.gathers
                );
                let bound = if name == "on" {
                    2 * one_group
                } else {
                    one_group
                };
                assert!(live <= bound, "{name}: {live} live, bound {bound}");
                // The engine itself holds one group whatever the driver prefetches.
                for p in o.peaks.iter().skip(1) {
                    assert!(p.expect("layered").parameters <= one_group);
                }
            }
        }
        let live_on = on[0].live.iter().map(|l| l.unwrap()).max().unwrap();
        assert!(live_on > one_group, "no prefetch by default: {live_on}");
        assert!(
            on[0].gathers < limited[0].gathers,
            "prefetch saved no collective"
        );
        assert_eq!(limited[0].gathers, small_bucket[0].gathers);
    }
}

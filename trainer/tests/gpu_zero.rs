//! ZeRO stages 1 and 2 with the optimizer on the device (`TrainingEngine::shard_optimizer`):
//! the GPU engine through NCCL at world size 1 against the plain one-GPU step. At world 1 the
//! chunk is the whole model, so every step must be the plain step bit for bit (the same norm
//! kernel over the same values, the same AdamW launches), and a resume from the driver's
//! checkpoint copy must continue bit for bit. Needs a CUDA device and libnccl (on the device:
//! `bash scripts/gpu-tests.sh run`); without them the test prints a `skipping` line and passes.

use gpu::comm::{unique_id, Nccl};
use reference::engine::ParamGroup;
use reference::init::init_params;
use reference::model::Batch;
use reference::rng::Rng;
use reference::{AdamWConfig, InferenceEngine, MambaConfig, TrainingEngine};
use trainer::dist::{FlatLayout, ZeroConfig, ZeroDriver};
use trainer::train::source::TrainBatch;

const ROWS: usize = 2;
const SEQ: usize = 24;
const STEPS: usize = 4;

fn cfg() -> MambaConfig {
    MambaConfig::new(64, 6, 97)
}

/// Wide enough that each layer spans several 2 MiB pages of the paged buffers, some shared
/// with its neighbours (about 6.6 MB of f32 parameters a layer).
fn wide() -> MambaConfig {
    MambaConfig::new(512, 6, 97)
}

fn engine() -> gpu::GpuEngine {
    engine_for(&cfg())
}

fn engine_for(c: &MambaConfig) -> gpu::GpuEngine {
    let o = gpu::GpuOptions {
        ordinal: 0,
        precision: gpu::Precision::Bf16,
    };
    gpu::GpuEngine::new(c, init_params(c, 5), &o).unwrap()
}

fn micro(s: usize, i: usize) -> TrainBatch {
    micro_for(&cfg(), s, i)
}

fn micro_for(c: &MambaConfig, s: usize, i: usize) -> TrainBatch {
    let mut rng = Rng::new(100 * s as u64 + i as u64 + 9);
    let n = ROWS * SEQ;
    let v = c.vocab_size as u64;
    TrainBatch {
        batch: ROWS,
        seq_len: SEQ,
        inputs: (0..n).map(|_| rng.below(v) as u32).collect(),
        targets: (0..n).map(|_| rng.below(v) as u32).collect(),
        mask: None,
        resets: (0..n).map(|_| rng.below(11) == 0).collect(),
        group: 0,
    }
}

fn hp() -> AdamWConfig {
    AdamWConfig {
        max_grad_norm: Some(0.05), // small enough that every step clips
        weight_decay: 0.1,
        ..AdamWConfig::default()
    }
}

fn lr(s: usize) -> f64 {
    2e-3 * (1 + s) as f64
}

fn flat(e: &dyn TrainingEngine) -> Vec<f32> {
    FlatLayout::new(e.config(), 1)
        .flatten(&e.parameters().unwrap())
        .unwrap()
}

/// The plain run: two micro-batches a step, the engine's own optimizer.
fn plain() -> (Vec<f32>, Vec<f64>) {
    let mut e = engine();
    let mut norms = Vec::new();
    for s in 0..STEPS {
        e.zero_grad().unwrap();
        for i in 0..2 {
            let b = micro(s, i);
            let input = Batch {
                batch: b.batch,
                seq_len: b.seq_len,
                tokens: &b.inputs,
                resets: Some(&b.resets),
            };
            e.loss_and_backward(&input, &b.targets, None, None, 0.5)
                .unwrap();
        }
        let st = e.optimizer_step(&hp(), lr(s)).unwrap();
        assert!(st.clipped && !st.skipped);
        norms.push(st.grad_norm);
    }
    (flat(&e), norms)
}

/// Stage `stage` through the driver on a sharded engine; a resume after step `resume_after`
/// into a fresh engine and driver from the driver's checkpoint copy.
fn sharded(comm: &mut Nccl, stage: u8, resume_after: Option<usize>) -> (Vec<f32>, Vec<f64>) {
    let zc = ZeroConfig {
        stage,
        ..ZeroConfig::default()
    };
    let mut e = engine();
    let mut d = ZeroDriver::new(&mut e, comm, zc.clone()).unwrap();
    assert!(
        d.on_device(),
        "stage {stage}: the optimizer is not on the device"
    );
    assert!(
        d.shard().m.is_empty(),
        "the driver holds a host copy of the moments"
    );
    assert!(
        e.optimizer_step(&hp(), 1e-3).is_err(),
        "a sharded engine took a whole-model step"
    );
    let mut norms = Vec::new();
    for s in 0..STEPS {
        if resume_after == Some(s) {
            d.refresh_shard(&e).unwrap();
            let shard = d.shard().clone();
            assert_eq!(shard.step, s as u64);
            assert_eq!(shard.m.len(), shard.range.len());
            assert!(shard.v.iter().any(|&v| v != 0.0), "no moments copied");
            e = engine();
            d = ZeroDriver::new(&mut e, comm, zc.clone()).unwrap();
            d.set_shard(shard).unwrap();
            d.sync_engine(&mut e, comm).unwrap();
        }
        let mine = [micro(s, 0), micro(s, 1)];
        let out = d.step(&mut e, comm, &mine, &hp(), lr(s)).unwrap();
        assert!(out.loss.is_some_and(f64::is_finite));
        norms.push(out.grad_norm);
    }
    (flat(&e), norms)
}

/// NCCL at world size 1 on GPU 0, or `None` after a `skipping` line naming the test and why
/// (no CUDA device, no libnccl).
fn nccl_or_skip(name: &str) -> Option<Nccl> {
    if let Err(e) = gpu::available() {
        println!("skipping {name}: {e}");
        return None;
    }
    match unique_id() {
        Ok(id) => Some(Nccl::new(0, 1, &id, 0).unwrap()),
        Err(e) => {
            println!("skipping {name}: {e}");
            None
        }
    }
}

#[test]
fn gpu_zero_stages_1_and_2_on_the_device_equal_the_plain_step() {
    let name = "gpu_zero_stages_1_and_2_on_the_device_equal_the_plain_step";
    let Some(mut comm) = nccl_or_skip(name) else {
        return;
    };
    let (want, want_norms) = plain();
    for stage in [1u8, 2] {
        let (got, norms) = sharded(&mut comm, stage, None);
        assert_eq!(norms, want_norms, "stage {stage}: gradient norms differ");
        assert!(
            got == want,
            "stage {stage}: weights differ from the plain run"
        );
        let (resumed, _) = sharded(&mut comm, stage, Some(2));
        assert!(resumed == want, "stage {stage}: the resumed run differs");
    }
}

/// Stage `stage` with the optimizer in host memory (`offload_optimizer`; stage 3 keeps it
/// there anyway), `micro_per_step` micro-batches a step: the weights after the run (gathered
/// into the engine), the gradient norms, and at stage 3 the most parameter and gradient
/// elements the engine held at once.
fn host_side(
    c: &MambaConfig,
    comm: &mut Nccl,
    stage: u8,
    micro_per_step: usize,
) -> (Vec<f32>, Vec<f64>, Option<usize>) {
    let zc = ZeroConfig {
        stage,
        offload_optimizer: trainer::dist::config::OffloadDevice::Cpu,
        ..ZeroConfig::default()
    };
    let mut e = engine_for(c);
    e.set_layered(true);
    let mut d = ZeroDriver::new(&mut e, comm, zc).unwrap();
    assert!(
        !d.on_device() && !d.in_engine(),
        "stage {stage}: not host-side"
    );
    let mut norms = Vec::new();
    for s in 0..STEPS {
        let mine: Vec<TrainBatch> = (0..micro_per_step).map(|i| micro_for(c, s, i)).collect();
        let out = d.step(&mut e, comm, &mine, &hp(), lr(s)).unwrap();
        assert!(out.loss.is_some_and(f64::is_finite));
        norms.push(out.grad_norm);
        if stage == 3 {
            assert_eq!(d.layered(), Some(true), "stage 3 did not go layer by layer");
            let held: usize = e
                .memory_breakdown()
                .iter()
                .filter(|(k, _)| ["parameters f32", "bf16/fp16 shadow", "gradients"].contains(k))
                .map(|(_, b)| b)
                .sum();
            assert_eq!(
                held, 0,
                "the engine kept parameter or gradient memory after a step"
            );
            assert!(
                e.parameters().is_err(),
                "a layered engine read out parameters"
            );
        }
    }
    d.sync_engine(&mut e, comm).unwrap();
    (flat(&e), norms, e.layered_peak())
}

#[test]
fn gpu_zero_stage_3_goes_layer_by_layer_with_the_bits_of_stage_2() {
    let name = "gpu_zero_stage_3_goes_layer_by_layer_with_the_bits_of_stage_2";
    let Some(mut comm) = nccl_or_skip(name) else {
        return;
    };
    for c in [cfg(), wide()] {
        let numel = FlatLayout::new(&c, 1).numel;
        let d = c.d_model;
        // One micro-batch a step: both paths sum each gradient onto zeros, so the same bits.
        let (want, want_norms, _) = host_side(&c, &mut comm, 2, 1);
        let (got, norms, peak) = host_side(&c, &mut comm, 3, 1);
        assert_eq!(
            norms, want_norms,
            "d_model {d}: stage 3's gradient norms differ"
        );
        assert!(
            got == want,
            "d_model {d}: stage 3's weights differ from stage 2's"
        );
        let peak = peak.expect("a layered step ran");
        // At most a layer's parameters and gradient, the next layer's parameters (prefetched)
        // and the outer group's parameters and gradient: never the whole model.
        let group = |g: ParamGroup| -> usize {
            let specs = reference::param_specs(&c);
            g.tensors(&c)
                .iter()
                .map(|&i| specs[i].1.iter().product::<usize>())
                .sum()
        };
        let bound = 3 * group(ParamGroup::Layer(0)) + 2 * group(ParamGroup::Outer);
        assert!(bound < numel, "the test's model is too shallow to tell");
        assert!(
            peak <= bound,
            "d_model {d}: the engine held {peak} elements at once (bound {bound}, model {numel})"
        );
        // Two micro-batches: stage 2 adds the second one's gradient into the engine's
        // buffers (cuBLAS accumulating into them with its own order), stage 3 sums the two
        // handed-over gradients on the host: the gradients differ by roundings. A group's
        // gradient lost or counted twice would move every step's norm by far more than 1e-5.
        // AdamW turns an element whose two terms nearly cancel into an update of about ±lr
        // whichever way the rounding went, so a few weights may differ by up to the sum of
        // the learning rates; all but a few in ten thousand must agree to 1e-5.
        let (want, want_norms, _) = host_side(&c, &mut comm, 2, 2);
        let (got, norms, _) = host_side(&c, &mut comm, 3, 2);
        for (s, (a, b)) in norms.iter().zip(&want_norms).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * b,
                "d_model {d}, two micro-batches, step {s}: gradient norm {a} against {b}"
            );
        }
        let diffs: Vec<f32> = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).collect();
        let worst = diffs.iter().fold(0f32, |m, &x| m.max(x));
        let off = diffs.iter().filter(|&&x| x > 1e-5).count();
        println!(
            "d_model {d}, two micro-batches: {off} of {numel} weights differ by more than 1e-5 \
             from stage 2's, the most by {worst:.3e}"
        );
        let lr_sum: f64 = (0..STEPS).map(lr).sum();
        assert!(
            off * 10_000 <= numel && (worst as f64) <= 2.0 * lr_sum,
            "d_model {d}: stage 3 with two micro-batches: {off} weights off, the most by {worst}"
        );
    }
}

/// Stages 0–2 through the driver, `overlap` on or off, buckets of `bucket` elements: the
/// weights, the gradient norms, and whether the driver summed in the engine's backward and
/// streamed gradients out of it.
fn overlapped(
    comm: &mut Nccl,
    stage: u8,
    offload: bool,
    overlap: bool,
    bucket: usize,
) -> (Vec<f32>, Vec<f64>, Option<bool>, Option<bool>) {
    let zc = ZeroConfig {
        stage,
        offload_optimizer: if offload {
            trainer::dist::config::OffloadDevice::Cpu
        } else {
            trainer::dist::config::OffloadDevice::None
        },
        overlap_comm: overlap,
        reduce_bucket_size: bucket,
        ..ZeroConfig::default()
    };
    let mut e = engine();
    let mut d = ZeroDriver::new(&mut e, comm, zc).unwrap();
    let mut norms = Vec::new();
    for s in 0..STEPS {
        let mine = [micro(s, 0), micro(s, 1)];
        let out = d.step(&mut e, comm, &mine, &hp(), lr(s)).unwrap();
        assert!(out.loss.is_some_and(f64::is_finite));
        norms.push(out.grad_norm);
    }
    d.sync_engine(&mut e, comm).unwrap();
    (flat(&e), norms, d.summed(), d.streamed())
}

/// `overlap_comm` at stages 0–2: with the optimizer on the device, the last micro-batch's
/// backward queues each bucket's sum on NCCL's stream as its layers finish
/// (`loss_and_backward_summed`); with it in host memory, each layer's gradient is copied out
/// and reduced on the driver's communication thread (`loss_and_backward_streamed`). At world
/// size 1 the bits are those of summing after the backward. Buckets of 40,000 elements cut
/// the model (about 32,700 a layer) into several. Also: an engine whose gradients were summed
/// in its backward refuses to add another micro-batch to them.
#[test]
fn gpu_zero_overlap_sums_in_the_backward_with_the_same_bits() {
    let name = "gpu_zero_overlap_sums_in_the_backward_with_the_same_bits";
    let Some(mut comm) = nccl_or_skip(name) else {
        return;
    };
    let bucket = 40_000;
    for (stage, offload) in [(0u8, false), (1, false), (2, false), (2, true)] {
        let what = format!("stage {stage} offload {offload}");
        let (want, want_norms, s0, _) = overlapped(&mut comm, stage, offload, false, bucket);
        assert_eq!(
            s0, None,
            "{what}: summed in the backward without overlap_comm"
        );
        let (got, norms, summed, streamed) = overlapped(&mut comm, stage, offload, true, bucket);
        if offload {
            assert_eq!(streamed, Some(true), "{what}: no gradient streamed out");
        } else {
            assert_eq!(summed, Some(true), "{what}: not summed in the backward");
        }
        assert_eq!(norms, want_norms, "{what}: gradient norms differ");
        assert!(
            got == want,
            "{what}: weights differ from summing after the backward"
        );
    }
    // The engine-level contract.
    let mut e = engine();
    let b = micro(0, 0);
    let input = Batch {
        batch: b.batch,
        seq_len: b.seq_len,
        tokens: &b.inputs,
        resets: Some(&b.resets),
    };
    assert!(e.all_reduce_gradients(&mut comm).unwrap());
    e.zero_grad().unwrap();
    let sum = reference::engine::SumInBackward {
        comm: &mut comm,
        bucket,
        scatter: false,
    };
    let lo = e
        .loss_and_backward_summed(&input, &b.targets, None, 1.0, sum)
        .unwrap();
    assert!(lo.is_some_and(|l| l.loss.is_finite()));
    assert!(
        e.loss_and_backward(&input, &b.targets, None, None, 1.0)
            .is_err(),
        "added a micro-batch to summed gradients"
    );
    e.zero_grad().unwrap();
    assert!(e
        .loss_and_backward(&input, &b.targets, None, None, 1.0)
        .is_ok());
}

//! Every tolerance of the conformance suite, with its reason and how it was measured.
//! Changing a limit means changing its comment.

/// Reference (f64) analytic gradients against f64 central differences with step
/// [`FD_STEP`]: relative L2 error per tensor. Truncation error is O(step²) ≈ 1e-10 and
/// rounding O(1e-16 / step) ≈ 1e-11; measured worst over the gradient table: see the test's
/// output (`cargo test -p conformance --test reference_gradients -- --nocapture`).
pub const GRAD_FD_F64: f64 = 1e-6;

/// Absolute noise floor per element for [`GRAD_FD_F64`]: the loss (~2.4) is computed with
/// ~1e-16 relative rounding, so a central difference carries ~1e-16 · 2.4 · k / (2 · step)
/// ≈ 1e-10 of noise. Measured: the smallest gradients (dt_proj.weight, ~1e-5) disagreed by
/// 4e-11 absolute while every large gradient agreed to 1e-7 relative.
pub const GRAD_FD_F64_FLOOR: f64 = 1e-9;

/// Central-difference step for [`GRAD_FD_F64`].
pub const FD_STEP: f64 = 1e-5;

/// Recurrent step against the full forward, f64: the step is the forward at `seq_len = 1`
/// chained through the state, so the same operations run in the same order; required within
/// 1e-12 relative by the spec, measured 0 (bit-identical).
pub const STEP_VS_FORWARD_F64: f64 = 1e-12;

/// Same for f32: measured 0 (bit-identical) on the random cases of `reference_recurrence`,
/// for the same reason as the f64 case. Kept at 0 so any reordering is noticed.
pub const STEP_VS_FORWARD_F32: f64 = 0.0;

// ---- simd inference ----

/// simd forward / prefill / decode against the reference on the same (possibly rounded)
/// weights, f32 arithmetic: relative L2 error of logits and states. The simd tier sums in
/// another order (8 accumulators, FMA, GEMM blocking) and uses polynomial exp/ln, each a few
/// ulp per op; errors compound through the layers. Measured worst: see
/// `cargo test -p conformance --test simd_inference`: worst seen 6.1e-6 (a 1e-4 change of D
/// alone gives 5e-5).
pub const SIMD_INFER_F32: f64 = 2e-5;

/// int8 weights on VNNI (`vpdpbusd`, activations rounded to int8 with one scale per row)
/// against the reference on the same int8-rounded weights in f32: the activation rounding,
/// ≤ max|x|/254 per value, on top of `SIMD_INFER_F32`. Measured on the random models of
/// `simd_inference` (`-- --nocapture` prints each, forward and steps): worst 3.06e-2.
pub const SIMD_INFER_INT8_VNNI: f64 = 5e-2;

/// int4 weights on VNNI (`vpdpbusd` on the unpacked 4-bit codes, activations rounded to int8
/// with one scale per row, as for int8) against the reference on the same int4-rounded weights
/// in f32: the same activation rounding as `SIMD_INFER_INT8_VNNI`, so the same limit. Measured
/// as for it: worst 3.18e-2 (int8 on VNNI 3.06e-2 in the same run).
pub const SIMD_INFER_INT4_VNNI: f64 = 5e-2;

/// bf16 weights on `avx512_bf16` (`vdpbf16ps`, decode only: activations rounded to bf16)
/// against the reference on the same bf16-rounded weights in f32: the activation rounding,
/// ≤ 2^-9 relative per value, on top of `SIMD_INFER_F32`. Measured as for
/// `SIMD_INFER_INT8_VNNI`: worst 7.2e-3.
pub const SIMD_INFER_BF16_DP: f64 = 2e-2;

/// bf16 weights against f32 weights (same model, simd both): bf16 keeps 8 significant bits,
/// a relative rounding of ≤ 2^-9 per weight, which averages down in the dot products.
/// Measured on the 64 × 2 test model: see `reduced_precision_stays_close_to_f32`.
pub const SIMD_QUANT_BF16: f64 = 1e-2;

/// int8 (per-row symmetric scale) weights against f32 weights: rounding of ≤ max|w|/254 per
/// weight. Measured as for bf16.
pub const SIMD_QUANT_INT8: f64 = 3e-2;

/// The same on VNNI, where the activations are rounded to int8 too (one scale per row):
/// measured 3.69e-2 (the f32-widening kernels 2.2e-2).
pub const SIMD_QUANT_INT8_VNNI: f64 = 5e-2;

/// int4 (one scale per group of 32, Q4_0-style: codes −8..7, the group's largest value
/// exact) weights against f32 weights: rounding of ≤ max|w|/16 per weight (up to /8 for the
/// few values clamped at +7): a step 16× int8's, so about 16× its error. Measured as for bf16
/// (`reduced_precision_stays_close_to_f32`, the 64 × 2 random model, whose uniform random
/// weights are the hardest case for 4 bits): 3.3e-1 (int8 2.2e-2). What this costs a trained
/// model is `INT4_*` below.
pub const SIMD_QUANT_INT4: f64 = 0.45;

/// What bf16 / int8 / int4 weights cost the bundled tiny checkpoint against its f32 weights
/// on the bundled validation text (8 rows of 256 tokens; `simd_quant_accuracy.rs`): relative
/// L2 logit error, `[bf16, int8, int4]`. Measured (2 threads, AVX-512): bf16 1.27e-3,
/// int8 4.68e-3 (9.27e-3 on VNNI, which rounds the activations to int8 too, perplexity
/// −0.01 %), int4 5.98e-2 (6.03e-2 on VNNI, which runs int4 on `vpdpbusd` with int8
/// activations too, perplexity +3.85 %).
/// Other models (same command, `-- --ignored --nocapture`): a random mamba-130m-shaped
/// model (2 rows of 256 validation tokens): logit error bf16 5.67e-3, int8 1.82e-2, int4
/// 2.38e-1; perplexity change +0.00 %, −0.00 %, +0.13 % (a random model's perplexity, 57366,
/// is flat: the logit error is the telling figure there). The same on VNNI, where int8 and
/// int4 both run on `vpdpbusd` with int8 activations: int8 4.86e-2, int4 2.42e-1; perplexity
/// +0.00 %, +0.16 %. The quickstart checkpoint was not measured yet (`VET_QUANT_MODEL=DIR`).
pub const QUANT_LOGIT_TINY: [f64; 3] = [5e-3, 2e-2, 0.15];

/// The perplexity change of the same runs, in percent (either sign), `[bf16, int8, int4]`.
/// Measured (f32 perplexity 4.517): bf16 +0.02 %, int8 −0.03 %, int4 +3.78 %.
pub const QUANT_PPL_TINY: [f64; 3] = [0.5, 0.5, 8.0];

// simd training ---------------------------------------------------------------------------
// The simd tier's backward, cross-entropy and AdamW against the f32 reference
// (`conformance/tests/simd_training.rs`; measured values: run it with `-- --nocapture`).

/// Every parameter gradient of `simd::backward::backward` against the f32 reference, relative
/// L2 per tensor. Both are f32; the simd tier sums in another order (blocked GEMMs, lane-wise
/// scan sums over channels) and uses vector `exp` / `log1p` (a few ulp from libm's), so each
/// gradient carries O(1e-7 · sqrt(terms)) of rounding that the reverse scan over 300
/// positions and the layers chained back can amplify. Measured worst 1.9e-6 (48 proptest
/// shapes; the table's worst is 1.8e-6, LayerNorm d_model 3, untied); a reset that leaks the
/// state gradient backwards already shows 1.2e-4 on a 9-position row.
pub const SIMD_BACKWARD_F32: f64 = 2e-5;

/// The initial conv window and SSM state gradients of the same backward, relative L2; same
/// reasons. Measured worst 5.8e-7 (table: d_model 96, d_state 16, 128 positions), 4.3e-7 over
/// the proptest shapes.
pub const SIMD_BACKWARD_STATE_F32: f64 = 1e-5;

/// Masked mean cross-entropy, relative. The simd tier sums each row's `exp` in eight f32
/// lanes and the rows in f64; the reference sums both sequentially in f32, whose own rounding
/// over a 50280-token vocabulary is the larger part. Measured worst 2.7e-6 (vocab 50280,
/// logits N(0, 3²)); 0 to 7e-8 for vocabularies up to 300.
pub const SIMD_CE_LOSS_F32: f64 = 1e-5;

/// `d_logits` of the cross-entropy, relative L2: every element is `exp(logit − lse) · k`, so
/// the log-sum-exp's difference (above) and the vector `exp` show up in all of them. Measured
/// worst 5.5e-6 (vocab 50280), 2.2e-7 for vocabularies up to 300.
pub const SIMD_CE_GRAD_F32: f64 = 3e-5;

/// One AdamW step (parameters, both moments, the clipped gradients), relative L2 per
/// tensor. The per-element update repeats the reference's operations in order, so only the
/// gradient norm (f64, summed in blocks) can differ, in its last bits, and move the f32 clip
/// coefficient by an ulp (odds ~2⁻²⁹ per step). Measured 0 (bit-identical) on every case;
/// kept at 0 so that any reordering of the update is noticed (`step_size · m / denom` instead
/// of `step_size · (m / denom)` fails it).
pub const SIMD_ADAMW_F32: f64 = 0.0;

// ---- CUDA tier ----

/// Every tolerance of the GPU conformance tests (`gpu_conformance.rs` and the `gpu_*` tests of
/// the per-op files), with its reason. Errors are relative L2 (‖got − want‖ / ‖want‖) per
/// tensor against the f64 reference run on the same f32 inputs; NaN anywhere fails. Measured
/// values: the tables the tests print (`bash scripts/gpu-tests.sh run`); the figures below are
/// the worst seen on the H200 when the limit was set.
pub mod gpu {
    /// f32 forward (logits, final state, decode steps, prefill): only the summation order differs
    /// from the reference (cuBLAS blocking, butterfly reductions over d_state, fused
    /// multiply-adds, exp2 for the decay). Measured worst 3.8e-6 (mamba_like_d64_state16 decode).
    pub const F32_FWD: f64 = 2e-5;
    /// f32 loss (a mean of log-sum-exps). Measured 5.0e-7.
    pub const F32_LOSS: f64 = 2e-6;
    /// f32 gradients: sums over batch × seq_len positions in another order than the reference;
    /// tensors with tiny gradients (dt_proj.weight, x_proj.weight) carry the most noise.
    /// Measured worst 1.4e-6.
    pub const F32_GRAD: f64 = 2e-5;
    /// Parameters and first moments after one AdamW step (lr 1e-3): Adam's first step moves every
    /// element by ±lr whatever the gradient's size. Measured 9.8e-7.
    pub const F32_ADAM: f64 = 2e-5;
    /// bf16 GEMM inputs (8-bit mantissa: relative rounding 2^-9 ≈ 2e-3 per operand) in every
    /// projection and the lm_head, added up over layers. Measured worst forward 1.2e-2 (prefill
    /// logits of mamba_like_d64_state16), gradient 3.4e-2 (its x_proj.weight), loss 2.7e-4.
    /// Training in bf16 / fp16 also rounds in_proj's output and the kept residual to the GEMM
    /// precision (the lean workspace, README "Training: memory"): one more rounding of the
    /// same size per layer. Re-measured with it (H100, 2026-12-05, `gpu_conformance`): worst
    /// forward 2.1e-2 (decode step 2 logits of mamba_like_d64_state16), gradient 3.3e-2, loss
    /// 2.7e-4; fp16: forward 2.1e-3, gradient 2.8e-3, loss 2.8e-6. The limits stand.
    pub const BF16_FWD: f64 = 3e-2;
    pub const BF16_LOSS: f64 = 2e-3;
    pub const BF16_GRAD: f64 = 8e-2;
    /// fp16 GEMM inputs (11-bit mantissa): about 8× finer than bf16. Measured worst forward
    /// 2.1e-3, gradient 3.2e-3, loss 7.4e-6.
    pub const FP16_FWD: f64 = 5e-3;
    pub const FP16_LOSS: f64 = 1e-4;
    pub const FP16_GRAD: f64 = 1e-2;

    /// Single f32 kernels against the f64 reference op (the `gpu_*` tests of the per-op files):
    /// forward ops sum at most d_state or d_conv terms per output in another order, plus the
    /// f32 rounding of the inputs the reference sees exactly; a few ulps. Measured worst 1.1e-7 (scan out, decode_1tok).
    pub const OP_F32_FWD: f64 = 2e-6;
    /// Backward ops sum over positions and channels (dB, dC, dA, dD, conv and norm weights) in
    /// a fixed order that differs from the reference's. Measured worst 4.3e-7 (scan dA,
    /// mamba130m_prefill: 512 positions summed).
    pub const OP_F32_BWD: f64 = 5e-6;
    /// The initial state's gradient after back-propagation through several windows
    /// (`carry_windows.rs`, the CUDA tier's native `loss_and_backward_carry` against one f64
    /// forward over the stream): the gradient crosses every window's scan and conv backward
    /// and the f32 states handed between windows, so it sums the most terms in another order.
    /// Set before the first device run at 2.5× `F32_GRAD`. Measured on one H100 (four cases,
    /// up to five windows): initial-state gradient 3.1e-7, parameter gradients 7.6e-7 (under
    /// `F32_GRAD`), loss 3.6e-8 (under `F32_LOSS`).
    pub const CARRY_STATE_F32: f64 = 5e-5;
    /// `gemv_lp` (the decode step's projections) against an f64 sum over the same bf16 / fp16
    /// operands: only the f32 accumulation order differs (per-lane partial sums of up to k/256
    /// products, then a butterfly), k ≤ 4096; the same for the int8 twins (codes times a row
    /// scale). Measured (H100, 2026-12-07): bf16 worst 7.5e-8, int8 8.8e-8.
    pub const OP_GEMV_LP: f64 = 1e-5;
    /// Decode steps with int8 weights (bf16 activations, `GpuEngine::quantize_int8`) against
    /// the reference on the same dequantised weights in f32: the GEMVs sum `q · x` exactly
    /// as the reference does but for bf16 activations and the f32 order, and the other
    /// projections (dt_proj, the lm_head) run in bf16: the rounding `BF16_FWD` allows.
    /// Measured (H100, 2026-12-07, `gpu_int8`): worst 1.67e-2 (d_model 768 step 3 and
    /// d_model 136 step 4), 4.0e-3 to 1.0e-2 at d_model 100.
    pub const INT8_DECODE_FWD: f64 = BF16_FWD;
    /// What int8 weights cost the bundled tiny checkpoint on the CUDA tier, decoded token by
    /// token (`gpu_int8.rs`), relative logit error against the f32 engine: the bf16 engine's
    /// rounding (`BF16_FWD`: bf16 activations and the other projections) plus int8 weights,
    /// as `SIMD_QUANT_INT8_VNNI` allows the CPU tier's int8 with rounded activations; the
    /// perplexity limit is `QUANT_PPL_TINY[1]` (bf16: `[0]`). Measured (H100, 2026-12-07,
    /// 8 rows of 128 validation tokens): int8 4.07e-3 and −0.03 % (perplexity 4.303 against
    /// 4.304), the bf16 engine 1.73e-3 and +0.01 %.
    pub const INT8_LOGIT_TINY: f64 = 5e-2;
}

// ZeRO data parallel ----------------------------------------------------------------------

/// Final weights of a ZeRO run (simd engine, in-process ranks, any stage, world 2–4, 3 steps)
/// against the one-rank run with the same global batch, relative L2 over every parameter,
/// when the sum order differs: two micro-batches per rank (gradients summed per rank, then
/// over ranks, instead of one running sum) and clipping with a norm summed per shard then over
/// ranks. Without clipping and with one micro-batch per rank the two agree bit for bit
/// Measured worst 6.0e-9 (clipping, two micro-batches per rank, world 2) and 1.9e-9 with one
/// micro-batch per rank and no clipping: the one-rank engine accumulates micro-batch gradients
/// inside its backward (GEMMs onto the buffer), the driver sums whole per-rank gradients, so
/// the two differ in the last bits even there. Every stage at one world size gives the same
/// bits (tested exactly). See `cargo test -p conformance --test zero -- --nocapture`.
pub const ZERO_VS_ONE_RANK: f64 = 5e-8;

// stateful training (carry_state) -------------------------------------------------------------

/// Back-propagation through `k` windows (`loss_and_backward_carry` with each window's
/// final-state gradient passed to the window before it) against one forward over the whole
/// stream, reference f64 (on the model functions: the engines' f32 boundary would round the
/// states between windows): the same operations, but the parameter gradients are summed window
/// by window instead of over the whole row, and the final-state gradient enters the conv's
/// input gradient after the window's own terms, so the bits differ in the last places.
/// Relative L2 per tensor (and relative for the loss); measured worst 6.7e-16
/// (`cargo test -p conformance --test carry_windows -- --nocapture`).
pub const CARRY_WINDOWS_F64: f64 = 1e-12;

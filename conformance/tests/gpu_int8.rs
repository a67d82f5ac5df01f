//! int8 weights on the CUDA tier (`GpuEngine::quantize_int8`: in_proj, x_proj and out_proj as
//! int8 rows with one scale each, read by the decode GEMVs):
//! - decode steps stay within the bf16 limit of the reference run on the same dequantised
//!   weights, at odd widths (a `d_model` that is not a multiple of 8 takes the GEMVs' scalar
//!   path), through a reset;
//! - the GEMVs read the codes: the logits differ from a bf16 engine holding the same
//!   dequantised weights in its shadow (which rounds `q · scale` to bf16 once more);
//! - a row gets the same bits alone and inside a batch of three, with bf16 and with int8
//!   weights, through the reset (one weight read for all rows, each sum in one order whatever
//!   the batch: the one-row and the batch GEMVs share their split);
//! - what int8 costs the bundled tiny checkpoint on the validation text, decoded token by token
//!   at batch 8: the logit error and perplexity change against the f32 engine.
//!
//! Without a CUDA device every test prints a `skipping` line and passes.

use conformance::{diff, random_params, random_tokens, seed_of, tol, validation_tokens};
use reference::rng::Rng;
use reference::{InferenceEngine, MambaConfig, Params, ReferenceEngine, State};

/// The weights the int8 engine runs: every layer's in_proj, x_proj and out_proj quantised by
/// the CPU tier's row quantiser and dequantised (`q · scale`, exact in f32).
fn dequantised(params: &Params<f32>) -> Params<f32> {
    let mut p = params.clone();
    for l in &mut p.layers {
        for t in [
            &mut l.in_proj_weight,
            &mut l.x_proj_weight,
            &mut l.out_proj_weight,
        ] {
            let cols = t.shape[1];
            let mut q = vec![0i8; cols];
            for row in t.data.chunks_mut(cols) {
                let s = simd::kernels::quantize_row(row, &mut q);
                for (v, &c) in row.iter_mut().zip(&q) {
                    *v = c as f32 * s;
                }
            }
        }
    }
    p
}

fn engine(cfg: &MambaConfig, params: &Params<f32>, int8: bool) -> gpu::GpuEngine {
    let opts = gpu::GpuOptions {
        ordinal: 0,
        precision: gpu::Precision::Bf16,
    };
    let mut e = gpu::GpuEngine::new(cfg, params.clone(), &opts).unwrap();
    if int8 {
        e.quantize_int8(simd::kernels::quantize_row).unwrap();
        assert!(e.int8_weights());
    }
    e
}

/// A seeded random state of `batch` rows.
fn random_state(cfg: &MambaConfig, batch: usize, rng: &mut Rng) -> State<f32> {
    let mut st = State::<f32>::zeros(cfg, batch);
    for v in st.conv.data.iter_mut().chain(st.ssm.data.iter_mut()) {
        *v = rng.normal() as f32;
    }
    st
}

/// The logits of each step of `tokens` (`[steps][batch]`) from `st`, row 0 reset at step 2.
fn steps(e: &mut dyn InferenceEngine, tokens: &[Vec<u32>], mut st: State<f32>) -> Vec<Vec<f32>> {
    tokens
        .iter()
        .enumerate()
        .map(|(t, tok)| {
            let mut resets = vec![false; tok.len()];
            resets[0] = t == 2;
            e.step(tok, Some(&resets), &mut st).unwrap().data
        })
        .collect()
}

/// Row 0 of `st` as a state of one row.
fn first_row(cfg: &MambaConfig, st: &State<f32>) -> State<f32> {
    let mut one = State::<f32>::zeros(cfg, 1);
    for l in 0..cfg.n_layer {
        let n = one.conv_layer(l).len();
        one.conv_layer_mut(l)
            .copy_from_slice(&st.conv_layer(l)[..n]);
        let n = one.ssm_layer(l).len();
        one.ssm_layer_mut(l).copy_from_slice(&st.ssm_layer(l)[..n]);
    }
    one
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn gpu_int8_decode_tracks_the_reference_and_reads_the_codes() {
    if let Err(e) = gpu::available() {
        println!("skipping gpu_int8: {e}");
        return;
    }
    // (d_model, layers): the 130M width, an odd dt_rank (136: dt_rank 9, x_proj 41 rows),
    // and d_model 100 (in_proj's rows are not a multiple of 8 values: the scalar path).
    for (dm, layers) in [(768, 2), (136, 3), (100, 2)] {
        let cfg = MambaConfig::new(dm, layers, 1000);
        let params = random_params::<f32>(&cfg, seed_of(&format!("gpu_int8 {dm}")));
        let deq = dequantised(&params);
        let mut rng = Rng::new(seed_of(&format!("gpu_int8 tokens {dm}")));
        let batch = 3;
        let st = random_state(&cfg, batch, &mut rng);
        let toks: Vec<Vec<u32>> = (0..6)
            .map(|_| random_tokens(&mut rng, &cfg, batch))
            .collect();
        let want = steps(
            &mut ReferenceEngine::new(cfg.clone(), deq.clone()),
            &toks,
            st.clone(),
        );
        let mut q8 = engine(&cfg, &params, true);
        let got = steps(&mut q8, &toks, st.clone());
        let mut bf16 = engine(&cfg, &deq, false);
        let shadow = steps(&mut bf16, &toks, st.clone());
        // Row 0 alone (batch 1: the 128-thread GEMVs), in both engines.
        let row0: Vec<Vec<u32>> = toks.iter().map(|t| vec![t[0]]).collect();
        let alone = steps(&mut q8, &row0, first_row(&cfg, &st));
        let alone_bf16 = steps(&mut bf16, &row0, first_row(&cfg, &st));
        let v = cfg.vocab_size;
        for t in 0..toks.len() {
            let rel = diff(&got[t], &want[t]).rel;
            println!("d_model {dm} step {t}: int8 against the reference {rel:.3e}");
            assert!(
                rel <= tol::gpu::INT8_DECODE_FWD,
                "d_model {dm} step {t}: {rel:.3e} > {:.1e}",
                tol::gpu::INT8_DECODE_FWD
            );
            assert_ne!(
                bits(&got[t]),
                bits(&shadow[t]),
                "d_model {dm} step {t}: the int8 engine gave the bf16 shadow's bits (codes not read?)"
            );
            // Row 0 has the same bits alone and in the batch, in both formats.
            let same_bf16 = bits(&alone_bf16[t]) == bits(&shadow[t][..v]);
            let same = bits(&alone[t]) == bits(&got[t][..v]);
            println!(
                "d_model {dm} step {t}: row 0 alone = in the batch: bf16 {same_bf16}, int8 {same}"
            );
            assert!(
                same && same_bf16,
                "d_model {dm} step {t}: row 0 alone differs from row 0 in a batch of {batch} (bf16 same: {same_bf16}, int8 same: {same})"
            );
        }
    }
}

/// `[bf16 shadow, int8]` logit error and perplexity change (%) against the f32 engine on the
/// bundled tiny checkpoint's validation text, decoded token by token at batch 8.
#[test]
fn gpu_int8_costs_the_tiny_checkpoint_little() {
    if let Err(e) = gpu::available() {
        println!("skipping gpu_int8: {e}");
        return;
    }
    let dir = fixtures::tiny_checkpoint();
    let ck = trainer::checkpoint::load(&dir).unwrap();
    let cfg = ck.config.clone();
    let rows = validation_tokens(&dir.join("tokenizer.json"), cfg.vocab_size, 8, 128);
    let run = |precision: gpu::Precision, int8: bool| -> (Vec<f32>, f64) {
        let opts = gpu::GpuOptions {
            ordinal: 0,
            precision,
        };
        let mut e = gpu::GpuEngine::new(&cfg, ck.params.clone(), &opts).unwrap();
        if int8 {
            e.quantize_int8(simd::kernels::quantize_row).unwrap();
        }
        let mut st = State::<f32>::zeros(&cfg, rows.len());
        let (mut logits, mut nll, mut n) = (Vec::new(), 0f64, 0usize);
        for t in 0..rows[0].len() - 1 {
            let tok: Vec<u32> = rows.iter().map(|r| r[t]).collect();
            let l = e.step(&tok, None, &mut st).unwrap().data;
            for (b, row) in l.chunks(cfg.vocab_size).enumerate() {
                let m = row.iter().fold(f32::MIN, |a, &x| a.max(x)) as f64;
                let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
                nll += lse - row[rows[b][t + 1] as usize] as f64;
                n += 1;
            }
            logits.extend(l);
        }
        (logits, nll / n as f64)
    };
    let (want, l32) = run(gpu::Precision::F32, false);
    for (what, int8, lt, pt) in [
        ("bf16", false, tol::gpu::BF16_FWD, tol::QUANT_PPL_TINY[0]),
        (
            "int8",
            true,
            tol::gpu::INT8_LOGIT_TINY,
            tol::QUANT_PPL_TINY[1],
        ),
    ] {
        let (got, l) = run(gpu::Precision::Bf16, int8);
        let rel = diff(&got, &want).rel;
        let dppl = 100.0 * ((l - l32).exp() - 1.0);
        println!(
            "tiny checkpoint, cuda {what}: logit error {rel:.3e}, perplexity {:.3} against {:.3} ({dppl:+.2} %)",
            l.exp(),
            l32.exp()
        );
        assert!(
            rel.is_finite() && rel > 0.0 && rel <= lt,
            "{what}: logit error {rel:.3e} > {lt:.1e}"
        );
        assert!(
            dppl.abs() <= pt,
            "{what}: perplexity change {dppl:+.2} % beyond ±{pt} %"
        );
    }
}

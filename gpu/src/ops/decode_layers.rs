//! Launcher of `gpu/kernels/decode_layers.cu`: every layer of a batch-1 decode step in one
//! persistent kernel (`decode_layers_lp`), its plan (chunks of whole rows through a ring of
//! shared-memory slots, the layer-by-layer GEMVs' splits) and what it takes.

use reference::Result;

use super::decode::nl_split;
use crate::cuda::Dev;
use crate::params::{cuh, info, kernel_params, KernelInfo, KernelParams, Ptr, PtrMut};

kernel_params! {
    /// Every layer of a batch-1 decode step in one persistent kernel (see
    /// `decode_layers_lp_body` in `gpu/kernels/decode_layers.cu`): layer `l`'s f32 parameters at
    /// `params + off + l * layer_stride` and its low-precision weights at the same offsets of
    /// `shadow`. `resid` holds layer 0's input and ends holding the last layer's input, `out`
    /// the last layer's output (as the layer-by-layer step leaves them). `sync`: two zeroed
    /// u32 that the kernel leaves zeroed.
    DecodeLayersLp => ["decode_layers_lp", "decode_layers_lp_q8"] {
        params: Ptr<f32>,
        shadow: Ptr<u16>,
        layer_stride: i64,
        norm_w: i64,
        in_w: i64,
        conv_w: i64,
        /// `-1`: none.
        conv_b: i64,
        x_w: i64,
        dt_w: i64,
        dt_b: i64,
        a_log: i64,
        d: i64,
        out_w: i64,
        n_layer: i64,
        d_model: i64,
        d_inner: i64,
        d_state: i64,
        dt_rank: i64,
        eps: f32,
        lp_mode: i32,
        chunk_in: i32,
        chunk_x: i32,
        chunk_out: i32,
        split_in: i32,
        split_x: i32,
        split_out: i32,
        resid: PtrMut<f32>,
        out: PtrMut<f32>,
        xz: PtrMut<f32>,
        xs: PtrMut<f32>,
        xs_lp: PtrMut<u16>,
        xdbl: PtrMut<f32>,
        gated: PtrMut<f32>,
        gated_lp: PtrMut<u16>,
        conv_state: PtrMut<f32>,
        ssm_state: PtrMut<f32>,
        starts: Ptr<i32>,
        sync: PtrMut<u32>,
        /// May be null: block 0's clock (ns) at [`DL_TRACE`] points of every layer.
        trace: PtrMut<u64>,
        /// Bytes a slot of the ring (a divisor of [`DL_RING`], at most [`DL_MAXSLOT`] slots).
        slot_bytes: i32,
        /// May be null: in_proj, x_proj and out_proj as int8 rows, laid out per layer as
        /// `crate::q8` lays them (each matrix on a multiple of 256 bytes), read instead of
        /// `shadow`; `q8s` their scales, one a row in the same order.
        q8: Ptr<i8>,
        q8s: Ptr<f32>,
    }
}

/// Points `decode_layers_lp` marks per layer in its trace: times (the layer's start, after
/// the barrier that opens phase A, after the norm, after in_proj, after its epilogue, after
/// the barrier to B, after x_proj, after the scan's loads, after the barrier to C, after the
/// scan, after the barrier to D, after out_proj), then the time its waits for weight chunks
/// took in in_proj, x_proj and out_proj, and one unused.
pub const DL_TRACE: usize = 16;

/// `decode_layers_lp`'s block: 8 computing warps and one streaming the weights.
pub const DL_THREADS: u32 = 288;
/// Its ring of weight chunks in shared memory: `DL_RING` bytes in slots of
/// [`DecodeLayersLp::slot_bytes`] (32 KiB unless `VET_DECODE_SLOT` says otherwise), at most
/// `DL_MAXSLOT` of them.
pub const DL_RING: usize = 196608;
pub const DL_MAXSLOT: usize = 12;
pub const DL_SLOT: usize = 32768;
/// The longest activation vector it holds in shared memory (values), the most in_proj
/// outputs one block holds for their epilogue, the widest `d_model` its norm keeps in
/// registers, the widest `dt_rank` (`16 × D_STATE_PAD`).
pub const DL_XVEC: usize = 8192;
pub const DL_YB: usize = 3072;
/// The most (row, part) sums of one chunk.
pub const DL_PB: usize = 1024;
pub const DL_MAX_D_MODEL: usize = 4096;
pub const DL_MAX_RANK_PER_LANE: usize = 16;
/// Its dynamic shared memory: the ring, the mbarriers, the activation vector, the in_proj
/// outputs, the sums.
pub const DL_SMEM: u32 =
    (DL_RING + 2 * DL_MAXSLOT * 8 + 2 * DL_XVEC + 4 * DL_YB + 4 * DL_PB + 64 * 4) as u32;

/// Rows a chunk of a `k`-wide projection of `esize`-byte values holds at `split` warps per
/// output: a whole number of the computing warps' passes (`8 / split` rows each) inside a slot
/// of `slot` bytes, or `None`.
pub fn dl_chunk_rows(k: usize, split: i32, slot: usize, esize: usize) -> Option<i32> {
    let per_pass = 8 / split as usize;
    let passes = slot / (per_pass * k * esize);
    (passes > 0).then_some((per_pass * passes) as i32)
}

impl DecodeLayersLp {
    /// The kernel's parameters for `[n_layer, d_model, d_inner, d_state, dt_rank]` with nothing
    /// placed yet: null buffers, every weight at offset 0 (no conv bias), no trace, slots of
    /// [`DL_SLOT`] bytes; chunks and splits come from [`DecodeLayersLp::chunked`].
    pub fn unplaced(
        [n_layer, d_model, d_inner, d_state, dt_rank]: [i64; 5],
        eps: f32,
        lp_mode: i32,
    ) -> DecodeLayersLp {
        DecodeLayersLp {
            params: Ptr::NULL,
            shadow: Ptr::NULL,
            layer_stride: 0,
            norm_w: 0,
            in_w: 0,
            conv_w: 0,
            conv_b: -1,
            x_w: 0,
            dt_w: 0,
            dt_b: 0,
            a_log: 0,
            d: 0,
            out_w: 0,
            n_layer,
            d_model,
            d_inner,
            d_state,
            dt_rank,
            eps,
            lp_mode,
            chunk_in: 0,
            chunk_x: 0,
            chunk_out: 0,
            split_in: 0,
            split_x: 0,
            split_out: 0,
            resid: PtrMut::NULL,
            out: PtrMut::NULL,
            xz: PtrMut::NULL,
            xs: PtrMut::NULL,
            xs_lp: PtrMut::NULL,
            xdbl: PtrMut::NULL,
            gated: PtrMut::NULL,
            gated_lp: PtrMut::NULL,
            conv_state: PtrMut::NULL,
            ssm_state: PtrMut::NULL,
            starts: Ptr::NULL,
            sync: PtrMut::NULL,
            trace: PtrMut::NULL,
            slot_bytes: DL_SLOT as i32,
            q8: Ptr::NULL,
            q8s: Ptr::NULL,
        }
    }

    /// Sets the chunk sizes and splits from the shapes (the splits of the layer-by-layer
    /// GEMVs, so the sums keep their order); `None` where a projection does not fit a slot.
    pub fn chunked(mut self) -> Option<DecodeLayersLp> {
        let (dm, di) = (self.d_model, self.d_inner);
        let xr = self.dt_rank + 2 * self.d_state;
        self.split_in = nl_split(2 * di);
        self.split_x = nl_split(xr);
        self.split_out = nl_split(dm);
        let slot = self.slot_bytes as usize;
        if slot == 0
            || !DL_RING.is_multiple_of(slot)
            || DL_RING / slot > DL_MAXSLOT
            || !slot.is_multiple_of(16)
        {
            return None;
        }
        let es = if self.q8.0 != 0 { 1 } else { 2 };
        self.chunk_in = dl_chunk_rows(dm as usize, self.split_in, slot, es)?;
        self.chunk_x = dl_chunk_rows(di as usize, self.split_x, slot, es)?;
        self.chunk_out = dl_chunk_rows(di as usize, self.split_out, slot, es)?;
        Some(self)
    }

    /// Whether `decode_layers_lp` takes these shapes over `blocks` blocks on a device with
    /// `sm_count` SMs and states padded to `d_state_pad` (after [`DecodeLayersLp::chunked`]).
    pub fn fits(&self, blocks: usize, sm_count: usize, d_state_pad: usize) -> bool {
        let (dm, di) = (self.d_model as usize, self.d_inner as usize);
        let chunks = |n: usize, c: i32| n.div_ceil(c.max(1) as usize);
        let in_rows_per_block =
            chunks(2 * di, self.chunk_in).div_ceil(blocks.max(1)) * self.chunk_in.max(0) as usize;
        // The bulk copies move multiples of 16 bytes: int8 rows need 16 values.
        let whole = if self.q8.0 != 0 { 16 } else { 8 };
        dm % whole == 0
            && di % whole == 0
            && dm <= DL_MAX_D_MODEL
            && di <= DL_XVEC
            && self.d_state as usize <= d_state_pad
            && (self.dt_rank as usize) <= DL_MAX_RANK_PER_LANE * d_state_pad
            && [self.split_in, self.split_x, self.split_out]
                .iter()
                .all(|s| [1, 2, 4].contains(s))
            && [self.chunk_in, self.chunk_x, self.chunk_out]
                .iter()
                .all(|&c| c > 0)
            && in_rows_per_block <= DL_YB
            && [
                (self.chunk_in, self.split_in),
                (self.chunk_x, self.split_x),
                (self.chunk_out, self.split_out),
            ]
            .iter()
            .all(|&(c, s)| (c * s) as usize <= DL_PB)
            && (1..=sm_count).contains(&blocks)
    }
}

/// Launches `decode_layers_lp` over `blocks` blocks (at most one per SM: they wait for each
/// other, so the launch is cooperative and fails rather than hang when they cannot all run).
///
/// # Safety
/// Every weight offset plus `l * layer_stride` (for `l < n_layer`) lies inside `params` and
/// `shadow` as the layout places it, the low-precision projections 16-byte aligned; the
/// activation buffers hold one row each (`resid`, `out` `d_model`; `xz` `2 d_inner`; `xs`,
/// `xs_lp`, `gated`, `gated_lp` `d_inner`; `xdbl` `dt_rank + 2 d_state`), the states
/// `n_layer` layers of one row, `sync` two u32 that are zero; `q8` (where not null) and `q8s`
/// hold every layer's codes and scales as `crate::q8` lays them out; no other work touches
/// them while it runs.
pub unsafe fn decode_layers(dev: &Dev, blocks: usize, p: &DecodeLayersLp) -> Result<()> {
    if !p.fits(blocks, dev.sm_count, dev.shape.d_state_pad) {
        return Err(dev.err(
            "decode_layers_lp",
            format!(
                "d_model {}, d_inner {}, dt_rank {}, {blocks} blocks: outside what it takes",
                p.d_model, p.d_inner, p.dt_rank
            ),
        ));
    }
    let name = if p.q8.0 != 0 {
        "decode_layers_lp_q8"
    } else {
        "decode_layers_lp"
    };
    // SAFETY: the caller's contract is the kernel's.
    unsafe { dev.launch_build(name, (blocks as u32, 1, 1), DL_THREADS, DL_SMEM, p) }
}

pub(crate) fn kernels() -> Vec<KernelInfo> {
    info::<DecodeLayersLp>().collect()
}

/// The text of `gpu/kernels/decode_layers.cuh`.
pub fn params_cuh() -> String {
    cuh("decode_layers", &[DecodeLayersLp::c_struct])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The persistent kernel's plan for a `d_model`-wide Mamba (d_state 16, expand 2).
    fn plan(d_model: i64) -> Option<DecodeLayersLp> {
        let dims = [2, d_model, 2 * d_model, 16, (d_model + 15) / 16];
        DecodeLayersLp::unplaced(dims, 1e-5, 0).chunked()
    }

    /// The splits are the layer-by-layer GEMVs' (so the sums keep their order), a chunk is a
    /// whole number of passes inside a slot, and the shared memory fits an sm_90 block.
    #[test]
    fn persistent_plan_keeps_the_gemv_splits_and_fits_a_slot() {
        let p = plan(2048).unwrap();
        assert_eq!((p.split_in, p.split_x, p.split_out), (1, 4, 2));
        assert_eq!((p.chunk_in, p.chunk_x, p.chunk_out), (8, 4, 4));
        let p = plan(768).unwrap();
        assert_eq!((p.split_in, p.split_x, p.split_out), (2, 4, 4));
        assert_eq!((p.chunk_in, p.chunk_x, p.chunk_out), (20, 10, 10));
        for dm in [136, 768, 1024, 2048] {
            let p = plan(dm).unwrap();
            for (c, s, k) in [
                (p.chunk_in, p.split_in, p.d_model),
                (p.chunk_x, p.split_x, p.d_inner),
                (p.chunk_out, p.split_out, p.d_inner),
            ] {
                assert_eq!(c % (8 / s), 0, "d_model {dm}: chunk {c} at split {s}");
                assert!((c as i64) * k * 2 <= DL_SLOT as i64, "d_model {dm}");
            }
            assert!(p.fits(132, 132, 16), "d_model {dm}");
        }
        assert!(DL_SMEM as usize <= 227 * 1024);
    }

    /// What it does not take: rows not 16-byte aligned, more blocks than SMs, a block holding
    /// more in_proj outputs than its buffer, a pass of rows longer than a slot, a state wider
    /// than the build's padding, a slot size that does not divide the ring.
    #[test]
    fn persistent_plan_refuses_what_the_kernel_does_not_take() {
        assert!(
            !plan(100).unwrap().fits(132, 132, 16),
            "d_model 100: rows of 200 bytes"
        );
        assert!(!plan(2048).unwrap().fits(133, 132, 16));
        assert!(plan(2048).unwrap().fits(3, 132, 16));
        assert!(
            !plan(2048).unwrap().fits(2, 132, 16),
            "2 blocks: 4096 in_proj rows each"
        );
        // 2.8B: four out_proj rows of 10 KiB (split 2) overflow a 32 KiB slot.
        assert!(plan(2560).is_none());
        assert!(
            !plan(2048).unwrap().fits(132, 132, 8),
            "d_state 16 past the padding"
        );
        let mut p = plan(2048).unwrap();
        p.slot_bytes = 40000;
        assert!(p.chunked().is_none());
    }
}

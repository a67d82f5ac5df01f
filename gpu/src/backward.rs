//! Loss and backward on the device (twin of reference/src/model/backward.rs + loss.rs).

use reference::{NormKind, Result};

use crate::cuda::Arg;
use crate::engine::{col_blocks, scan_smem, GpuEngine, Opnd};
use crate::kernels::SCAN_THREADS;
use crate::work::{scan_blocks, Work};

impl GpuEngine {
    /// `dst[j] += Σ_rows src[r * ld + j]` in a fixed order.
    fn colsum_add(
        &self,
        ws: &Work,
        src: u64,
        ld: usize,
        rows: usize,
        cols: usize,
        dst: u64,
    ) -> Result<()> {
        let gw = ws.grad.as_ref().expect("training workspace");
        let (n_rb, rows_per) = col_blocks(rows);
        self.dev.launch(
            "colsum_partial_f32",
            (cols.div_ceil(256) as u32, n_rb as u32, 1),
            256,
            0,
            &[
                Arg::P(src),
                Arg::L(ld as i64),
                Arg::L(rows as i64),
                Arg::L(cols as i64),
                Arg::L(rows_per as i64),
                Arg::P(gw.colpart.ptr),
            ],
        )?;
        self.dev.colsum_final(gw.colpart.ptr, n_rb, cols, dst)
    }

    /// Norm backward: `d_resid (+)= dx`, and the weight / bias gradients.
    #[allow(clippy::too_many_arguments)]
    fn norm_bwd(
        &self,
        ws: &Work,
        x: u64,
        mean: u64,
        rstd: u64,
        dy: u64,
        w: usize,
        b: Option<usize>,
        accum: bool,
    ) -> Result<()> {
        let gw = ws.grad.as_ref().expect("training workspace");
        let (n, dm) = (ws.n, self.cfg.d_model);
        let is_layer = (self.cfg.norm == NormKind::Layer) as i32;
        self.dev.launch(
            "norm_bwd_dx_f32",
            (n as u32, 1, 1),
            256,
            0,
            &[
                Arg::P(x),
                Arg::P(self.p(w)),
                Arg::P(mean),
                Arg::P(rstd),
                Arg::P(dy),
                Arg::P(gw.d_resid.ptr),
                Arg::L(dm as i64),
                Arg::I(is_layer),
                Arg::I(accum as i32),
            ],
        )?;
        let (n_rb, rows_per) = col_blocks(n);
        self.dev.launch(
            "norm_bwd_dw_partial_f32",
            (dm.div_ceil(256) as u32, n_rb as u32, 1),
            256,
            0,
            &[
                Arg::P(x),
                Arg::P(mean),
                Arg::P(rstd),
                Arg::P(dy),
                Arg::L(n as i64),
                Arg::L(dm as i64),
                Arg::L(rows_per as i64),
                Arg::P(gw.colpart.ptr),
                Arg::P(if b.is_some() { gw.colpart_b.ptr } else { 0 }),
            ],
        )?;
        self.dev.colsum_final(gw.colpart.ptr, n_rb, dm, self.g(w))?;
        if let Some(b) = b {
            self.dev
                .colsum_final(gw.colpart_b.ptr, n_rb, dm, self.g(b))?;
        }
        Ok(())
    }

    /// Cross-entropy on `ws.logits` (overwritten by the gradient); per-row losses in
    /// `row_loss`. `k` = grad_scale / n_targets.
    pub fn loss_dev(&self, ws: &Work, has_mask: bool, k: f32) -> Result<()> {
        let gw = ws.grad.as_ref().expect("training workspace");
        self.dev.launch(
            "cross_entropy_fwd_bwd_f32",
            (ws.n as u32, 1, 1),
            1024,
            0,
            &[
                Arg::P(ws.logits.ptr),
                Arg::P(gw.targets.ptr),
                Arg::P(if has_mask { gw.mask.ptr } else { 0 }),
                Arg::L(self.cfg.vocab_size as i64),
                Arg::F(k),
                Arg::P(gw.row_loss.ptr),
            ],
        )
    }

    /// The backward from the gradient in `ws.logits`. `has_state`: the forward read an
    /// initial state. `emb_csr`: distinct tokens, offsets and positions for the embedding.
    pub fn backward_dev(
        &self,
        ws: &Work,
        has_state: bool,
        emb_csr: (&[u32], &[i32], &[i32]),
    ) -> Result<()> {
        let cfg = &self.cfg;
        let gw = ws.grad.as_ref().expect("training workspace");
        let (n, dm, di, ds, r, v) = (
            ws.n,
            cfg.d_model,
            cfg.d_inner,
            cfg.d_state,
            cfg.dt_rank,
            cfg.vocab_size,
        );
        let (batch, seq_len) = (ws.batch, ws.seq_len);
        let xr = cfg.x_proj_rows();
        let (dc, km1) = (cfg.d_conv, cfg.d_conv - 1);
        let lay = &self.layout;
        let dlogits = Opnd::A(ws.logits.ptr, v, n, v);
        // lm_head
        self.mm(
            ws,
            false,
            false,
            (dm, n, v),
            Opnd::W(lay.head, dm),
            dlogits,
            (gw.d_hn.ptr, dm),
            0.0,
        )?;
        let hf = Opnd::A(ws.hf.ptr, dm, n, dm);
        self.mm(
            ws,
            false,
            true,
            (dm, v, n),
            hf,
            dlogits,
            (self.g(lay.head), dm),
            1.0,
        )?;
        self.norm_bwd(
            ws,
            ws.resid_final.ptr,
            ws.fmean.ptr,
            ws.frstd.ptr,
            gw.d_hn.ptr,
            lay.norm_f_w,
            lay.norm_f_b,
            false,
        )?;
        let nblk = scan_blocks(cfg, self.shape);
        let (n_rb, rows_per) = col_blocks(n);
        for (i, lo) in lay.layers.iter().enumerate().rev() {
            let la = &ws.layers[i];
            let d_out = Opnd::A(gw.d_resid.ptr, dm, n, dm);
            // out_proj
            self.mm(
                ws,
                false,
                false,
                (di, n, dm),
                Opnd::W(lo.out_w, di),
                d_out,
                (gw.d_gated.ptr, di),
                0.0,
            )?;
            let gated = Opnd::A(la.gated.ptr, di, n, di);
            self.mm(
                ws,
                false,
                true,
                (di, dm, n),
                gated,
                d_out,
                (self.g(lo.out_w), di),
                1.0,
            )?;
            if let Some(b) = lo.out_b {
                self.colsum_add(ws, gw.d_resid.ptr, dm, n, dm, self.g(b))?;
            }
            // scan
            self.dev.launch(
                "silu_fwd_f32",
                self.dev.grid1d(n * di),
                256,
                0,
                &[Arg::P(la.u.ptr), Arg::P(ws.xs.ptr), Arg::L((n * di) as i64)],
            )?;
            let init_conv = if has_state {
                ws.state_in_conv.at::<f32>(i * batch * di * km1)
            } else {
                0
            };
            self.dev.launch(
                crate::kernels::scan_bwd_kernel(),
                (nblk as u32, batch as u32, 1),
                SCAN_THREADS as u32,
                scan_smem(self.shape),
                &[
                    &self.scan_in_args(ws, la, lo)[..],
                    &[
                        Arg::P(la.chunks.as_ref().map_or(0, |c| c.ptr)),
                        Arg::P(gw.d_gated.ptr),
                        Arg::P(gw.d_xs.ptr),
                        Arg::P(gw.d_delta.ptr),
                        Arg::P(gw.d_xz.at::<f32>(di)),
                        Arg::L(2 * di as i64),
                        Arg::P(gw.part_bc.ptr),
                        Arg::P(gw.part_a.ptr),
                        Arg::P(gw.part_d.ptr),
                        Arg::P(gw.part_db.ptr),
                        Arg::P(gw.gstate_ssm.at::<f32>(i * batch * di * ds)),
                        Arg::L(batch as i64),
                        Arg::L(seq_len as i64),
                        Arg::L(di as i64),
                        Arg::L(ds as i64),
                    ],
                ]
                .concat(),
            )?;
            self.dev.launch(
                "scan_reduce_bc_f32",
                self.dev.grid1d(n * 2 * ds),
                256,
                0,
                &[
                    Arg::P(gw.part_bc.ptr),
                    Arg::L(nblk as i64),
                    Arg::L(n as i64),
                    Arg::L(ds as i64),
                    Arg::P(gw.d_xdbl.at::<f32>(r)),
                    Arg::L(xr as i64),
                ],
            )?;
            for (part, m, dst, alog) in [
                (gw.part_a.ptr, di * ds, self.g(lo.a_log), self.p(lo.a_log)),
                (gw.part_d.ptr, di, self.g(lo.d), 0),
                (gw.part_db.ptr, di, self.g(lo.dt_b), 0),
            ] {
                self.dev.launch(
                    "scan_reduce_batch_f32",
                    self.dev.grid1d(m),
                    256,
                    0,
                    &[
                        Arg::P(part),
                        Arg::L(batch as i64),
                        Arg::L(m as i64),
                        Arg::P(dst),
                        Arg::P(alog),
                    ],
                )?;
            }
            // dt_proj
            let d_delta = Opnd::A(gw.d_delta.ptr, di, n, di);
            self.mm(
                ws,
                false,
                false,
                (r, n, di),
                Opnd::W(lo.dt_w, r),
                d_delta,
                (gw.d_xdbl.ptr, xr),
                0.0,
            )?;
            let dt_raw = Opnd::A(la.xdbl.ptr, xr, n, r);
            self.mm(
                ws,
                false,
                true,
                (r, di, n),
                dt_raw,
                d_delta,
                (self.g(lo.dt_w), r),
                1.0,
            )?;
            // x_proj
            let d_xdbl = Opnd::A(gw.d_xdbl.ptr, xr, n, xr);
            self.mm(
                ws,
                false,
                false,
                (di, n, xr),
                Opnd::W(lo.x_w, di),
                d_xdbl,
                (gw.d_xs.ptr, di),
                1.0,
            )?;
            let xs = Opnd::A(ws.xs.ptr, di, n, di);
            self.mm(
                ws,
                false,
                true,
                (di, xr, n),
                xs,
                d_xdbl,
                (self.g(lo.x_w), di),
                1.0,
            )?;
            // SiLU and conv
            self.dev.launch(
                "silu_bwd_f32",
                self.dev.grid1d(n * di),
                256,
                0,
                &[
                    Arg::P(la.u.ptr),
                    Arg::P(gw.d_xs.ptr),
                    Arg::L((n * di) as i64),
                ],
            )?;
            let conv_w = self.p(lo.conv_w);
            self.dev.launch(
                "conv1d_bwd_dx_f32",
                self.dev.grid1d(n * di),
                256,
                0,
                &[
                    Arg::P(gw.d_xs.ptr),
                    Arg::P(conv_w),
                    Arg::P(ws.starts.ptr),
                    Arg::P(gw.d_xz.ptr),
                    Arg::L(2 * di as i64),
                    Arg::L(batch as i64),
                    Arg::L(seq_len as i64),
                    Arg::L(di as i64),
                ],
            )?;
            if km1 > 0 {
                self.dev.launch(
                    "conv1d_bwd_init_f32",
                    self.dev.grid1d(batch * di * km1),
                    256,
                    0,
                    &[
                        Arg::P(gw.d_xs.ptr),
                        Arg::P(conv_w),
                        Arg::P(ws.starts.ptr),
                        Arg::P(gw.gstate_conv.at::<f32>(i * batch * di * km1)),
                        Arg::L(batch as i64),
                        Arg::L(seq_len as i64),
                        Arg::L(di as i64),
                    ],
                )?;
            }
            self.dev.launch(
                "conv1d_bwd_dw_partial_f32",
                (di.div_ceil(256) as u32, n_rb as u32, 1),
                256,
                0,
                &[
                    Arg::P(la.xz.ptr),
                    Arg::L(2 * di as i64),
                    Arg::P(gw.d_xs.ptr),
                    Arg::P(ws.starts.ptr),
                    Arg::P(init_conv),
                    Arg::L(batch as i64),
                    Arg::L(seq_len as i64),
                    Arg::L(di as i64),
                    Arg::L(rows_per as i64),
                    Arg::P(gw.colpart.ptr),
                    Arg::P(if lo.conv_b.is_some() {
                        gw.colpart_b.ptr
                    } else {
                        0
                    }),
                ],
            )?;
            self.dev
                .colsum_final(gw.colpart.ptr, n_rb, di * dc, self.g(lo.conv_w))?;
            if let Some(b) = lo.conv_b {
                self.dev
                    .colsum_final(gw.colpart_b.ptr, n_rb, di, self.g(b))?;
            }
            // in_proj (hn recomputed from the saved residual and statistics)
            self.dev.launch(
                "norm_fwd_f32",
                (n as u32, 1, 1),
                256,
                0,
                &[
                    Arg::P(la.resid_in.ptr),
                    Arg::P(0),
                    Arg::P(0),
                    Arg::P(ws.hn.ptr),
                    Arg::P(0),
                    Arg::P(0),
                    Arg::P(self.p(lo.norm_w)),
                    Arg::P(lo.norm_b.map_or(0, |o| self.p(o))),
                    Arg::L(dm as i64),
                    Arg::F(cfg.norm_eps as f32),
                    Arg::I((cfg.norm == NormKind::Layer) as i32),
                    Arg::P(0),
                    Arg::I(0),
                ],
            )?;
            let d_xz = Opnd::A(gw.d_xz.ptr, 2 * di, n, 2 * di);
            self.mm(
                ws,
                false,
                false,
                (dm, n, 2 * di),
                Opnd::W(lo.in_w, dm),
                d_xz,
                (gw.d_hn.ptr, dm),
                0.0,
            )?;
            let hn = Opnd::A(ws.hn.ptr, dm, n, dm);
            self.mm(
                ws,
                false,
                true,
                (dm, 2 * di, n),
                hn,
                d_xz,
                (self.g(lo.in_w), dm),
                1.0,
            )?;
            if let Some(b) = lo.in_b {
                self.colsum_add(ws, gw.d_xz.ptr, 2 * di, n, 2 * di, self.g(b))?;
            }
            self.norm_bwd(
                ws,
                la.resid_in.ptr,
                la.mean.ptr,
                la.rstd.ptr,
                gw.d_hn.ptr,
                lo.norm_w,
                lo.norm_b,
                true,
            )?;
        }
        // embedding
        let (uniq, offs, pos) = emb_csr;
        let d_uniq = self.dev.upload(uniq)?;
        let d_offs = self.dev.upload(offs)?;
        let d_pos = self.dev.upload(pos)?;
        self.dev.launch(
            "embedding_bwd_f32",
            (uniq.len() as u32, dm.div_ceil(256) as u32, 1),
            256,
            0,
            &[
                Arg::P(d_uniq.ptr),
                Arg::P(d_offs.ptr),
                Arg::P(d_pos.ptr),
                Arg::P(gw.d_resid.ptr),
                Arg::P(self.g(lay.emb)),
                Arg::L(dm as i64),
            ],
        )?;
        self.dev.sync()
    }
}

/// Distinct tokens (sorted), offsets into `positions`, and the positions of each token in
/// increasing order.
pub fn token_csr(tokens: &[u32]) -> (Vec<u32>, Vec<i32>, Vec<i32>) {
    let mut idx: Vec<usize> = (0..tokens.len()).collect();
    idx.sort_by_key(|&i| (tokens[i], i));
    let mut uniq = Vec::new();
    let mut offs = Vec::new();
    for (k, &i) in idx.iter().enumerate() {
        if uniq.last() != Some(&tokens[i]) {
            uniq.push(tokens[i]);
            offs.push(k as i32);
        }
    }
    offs.push(idx.len() as i32);
    (uniq, offs, idx.into_iter().map(|i| i as i32).collect())
}

#[cfg(test)]
mod tests {
    use super::token_csr;
    use crate::engine::doc_starts;

    #[test]
    fn token_csr_lists_each_tokens_positions_in_order() {
        let (uniq, offs, pos) = token_csr(&[5, 2, 5, 9, 2, 5]);
        assert_eq!(uniq, vec![2, 5, 9]);
        assert_eq!(offs, vec![0, 2, 5, 6]);
        assert_eq!(pos, vec![1, 4, 0, 2, 5, 3]);
    }

    #[test]
    fn doc_starts_follow_resets_per_row() {
        let r = [false, true, false, true, false, false];
        assert_eq!(doc_starts(Some(&r), 2, 3), vec![-1, 1, 1, 0, 0, 0]);
        assert_eq!(doc_starts(None, 1, 2), vec![-1, -1]);
    }
}

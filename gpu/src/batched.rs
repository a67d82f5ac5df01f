//! Continuous batching on the device: a held state of `batch` rows (slots), each its own
//! sequence. [`GpuEngine::prefill_row_dev`] starts a new sequence in one row (a batch-1
//! prefill from the zero state whose final state is copied into the row), and
//! [`GpuEngine::step_sample_dev`] advances every row by one token and draws each row's next
//! token on the device (`sample_rows_f32`): only `batch` ids cross to the host.

use cudarc::driver::result as drv;
use reference::engine::check_len;
use reference::model::Batch;
use reference::{Error, HeldState, Result, RowSampling};

use crate::cuda::{Buf, Dev};
use crate::decode::StepOn;
use crate::engine::GpuEngine;
use crate::model::ensure_ws;
use crate::ops::decode::{sample_rows, SampleHow, SampleRowsF32, SAMPLE_NOT_FINITE};
use crate::params::{Ptr, PtrMut};
use crate::work::Mode;

/// Copies layer by layer the batch-1 state `src` (`[n_layer, 1, per]` f32) into row `row` of
/// the held state `dst` (`[n_layer, batch, per]`).
fn put_row(
    dev: &Dev,
    src: &Buf,
    dst: &Buf,
    (n_layer, batch, per): (usize, usize, usize),
    row: usize,
) -> Result<()> {
    let bytes = 4 * per;
    if n_layer * bytes > src.bytes || n_layer * batch * bytes > dst.bytes || row >= batch {
        return Err(Error::Shape {
            op: "prefill_held_row",
            msg: format!("row {row} of a held state of {batch} rows does not fit its buffers"),
        });
    }
    for i in 0..n_layer {
        let to = dst.ptr + ((i * batch + row) * bytes) as u64;
        let from = src.ptr + (i * bytes) as u64;
        // SAFETY: both ranges lie inside their live allocations (checked above); the copy is
        // ordered on the stream the engine's kernels use.
        unsafe { drv::memcpy_dtod_async(to, from, bytes, dev.cu_stream()) }
            .map_err(|e| dev.err("prefill_held_row: copying a layer's state into its row", e))?;
    }
    Ok(())
}

/// An error naming the row and the setting unless `how` can be drawn from on `vocab` ids.
fn check_how(how: &RowSampling, row: usize, vocab: usize) -> Result<()> {
    let bad = |msg: String| Error::Shape {
        op: "step_held_sample",
        msg: format!("row {row}: {msg}"),
    };
    if how.sampleable == 0 || how.sampleable as usize > vocab {
        return Err(bad(format!(
            "sampleable {} is not in 1..={vocab}",
            how.sampleable
        )));
    }
    if !(how.temperature.is_finite() && how.temperature >= 0.0) {
        return Err(bad(format!(
            "temperature {} must be finite and >= 0",
            how.temperature
        )));
    }
    if !(how.top_p > 0.0 && how.top_p <= 1.0) {
        return Err(bad(format!("top-p {} must be in (0, 1]", how.top_p)));
    }
    if !(how.repetition_penalty.is_finite() && how.repetition_penalty > 0.0) {
        return Err(bad(format!(
            "repetition penalty {} must be finite and > 0",
            how.repetition_penalty
        )));
    }
    Ok(())
}

impl GpuEngine {
    /// See [`reference::InferenceEngine::prefill_held_row`].
    pub(crate) fn prefill_row_dev(
        &mut self,
        held: HeldState,
        row: usize,
        tokens: &[u32],
        logits: &mut [f32],
    ) -> Result<()> {
        let op = "prefill_held_row";
        let cfg = self.model.cfg.clone();
        check_len(op, "logits", logits.len(), cfg.vocab_size)?;
        if tokens.is_empty() {
            return Err(Error::Shape {
                op,
                msg: "no tokens to prefill".into(),
            });
        }
        if row >= held.batch {
            return Err(Error::Shape {
                op,
                msg: format!("row {row} of a held state of {} rows", held.batch),
            });
        }
        let input = Batch::new(tokens, 1, tokens.len());
        input.check(&cfg, op)?;
        self.decoder.held(&self.model.dev.name, held, op)?;
        self.model.dev.bind()?;
        let key = (1, tokens.len(), Mode::Infer { head_rows: 1 });
        let lowp = self.model.shadow.is_some();
        ensure_ws(
            &mut self.infer_ws,
            &self.model.dev,
            &cfg,
            self.model.shape,
            key,
            lowp,
        )?;
        let ws = self.infer_ws.as_ref().expect("workspace");
        self.model.upload_inputs(ws, &input, None)?;
        self.model.forward_dev(ws, false, tokens.len() - 1)?;
        let h = self.decoder.held(&self.model.dev.name, held, op)?;
        let (n, di) = (cfg.n_layer, cfg.d_inner);
        let dev = &self.model.dev;
        let conv_per = di * (cfg.d_conv - 1);
        put_row(
            dev,
            &ws.state_out_conv,
            &h.conv,
            (n, held.batch, conv_per),
            row,
        )?;
        put_row(
            dev,
            &ws.state_out_ssm,
            &h.ssm,
            (n, held.batch, di * cfg.d_state),
            row,
        )?;
        let mut seen = vec![0u8; cfg.vocab_size];
        for &t in tokens {
            seen[t as usize] = 1;
        }
        h.seen.write(row * cfg.vocab_size, &seen)?;
        ws.logits.read(0, logits)
    }

    /// See [`reference::InferenceEngine::step_held_sample`].
    pub(crate) fn step_sample_dev(
        &mut self,
        held: HeldState,
        tokens: &[u32],
        how: &[RowSampling],
        ids: &mut [u32],
    ) -> Result<()> {
        let op = "step_held_sample";
        let vocab = self.model.cfg.vocab_size;
        check_len(op, "sampling settings", how.len(), tokens.len())?;
        check_len(op, "ids", ids.len(), tokens.len())?;
        for (row, h) in how.iter().enumerate() {
            check_how(h, row, vocab)?;
        }
        let rows: Vec<SampleHow> = how.iter().map(SampleHow::from).collect();
        let bytes = SampleHow::bytes(&rows);
        let h = self.decoder.held_mut(&self.model.dev.name, held, op)?;
        if h.how_last != bytes {
            h.how.write_staged(0, &bytes)?;
            h.how_last = bytes;
        }
        self.decoder
            .step(&self.model, tokens, None, StepOn::Held(held))?;
        let h = self.decoder.held(&self.model.dev.name, held, op)?;
        let p = SampleRowsF32 {
            logits: Ptr::new(self.decoder.logits().ptr),
            vocab: vocab as i64,
            tokens: Ptr::new(self.decoder.tokens().ptr),
            how: Ptr::new(h.how.ptr),
            seen: PtrMut::new(h.seen.ptr),
            ids: PtrMut::new(h.ids.ptr),
        };
        // SAFETY: the decode workspace holds `batch` rows of logits and tokens (the step just
        // ran on it); the held state's `seen`, `how` and `ids` are sized for `batch` rows
        // (`Decoder::hold`), and every `sampleable` was checked against the vocabulary.
        unsafe { sample_rows(&self.model.dev, tokens.len(), &p) }?;
        h.ids.read(0, ids)?;
        if let Some(row) = ids.iter().position(|&t| t == SAMPLE_NOT_FINITE) {
            return Err(Error::Device {
                device: self.model.dev.name.clone(),
                msg: format!(
                    "{op}: the model's logits in row {row} are not finite (NaN or infinite): cannot choose a token"
                ),
            });
        }
        Ok(())
    }
}

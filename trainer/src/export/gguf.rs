//! A small GGUF (version 3) writer: metadata key/values, then tensor infos, then the tensor
//! data, each piece aligned to 32 bytes, little-endian (the layout of llama.cpp's
//! `docs/gguf.md` / `ggml/include/gguf.h`).
//!
//! Written here rather than taken from a crate: the crates that write GGUF either bring a whole
//! tensor framework (candle-core) or build the file in memory and lack llama.cpp's exact Q8_0
//! rounding; this writer streams tensors from the loaded f32 weights, encodes F16 / Q8_0 the
//! way llama.cpp's `gguf` Python package does (so a re-quantisation gives the same bytes), and
//! is small enough to test whole.

use std::borrow::Cow;
use std::io::{self, Write};

/// Tensor data alignment (GGUF's default; `general.alignment` is not written).
pub const ALIGNMENT: u64 = 32;
/// Elements per Q8_0 block (one f16 scale, 32 signed bytes).
pub const Q8_0_BLOCK: usize = 32;

/// ggml tensor types written here (their `ggml_type` numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q8_0 = 8,
}

impl GgmlType {
    /// Bytes taken by `n` elements (`n` a multiple of 32 for Q8_0).
    pub fn bytes(self, n: usize) -> usize {
        match self {
            GgmlType::F32 => 4 * n,
            GgmlType::F16 => 2 * n,
            GgmlType::Q8_0 => n / Q8_0_BLOCK * (2 + Q8_0_BLOCK),
        }
    }
}

/// A metadata value (only the GGUF value types Mamba export needs).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    I32Array(Vec<i32>),
}

/// GGUF value type numbers (`gguf_type`).
const T_UINT32: u32 = 4;
const T_INT32: u32 = 5;
const T_FLOAT32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;

/// One tensor: its name, its shape in row-major order (outermost first, as numpy and
/// safetensors give it; GGUF stores it reversed), its stored type and its f32 values.
pub struct TensorEntry<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: GgmlType,
    pub values: Cow<'a, [f32]>,
}

/// A whole file, ready to stream out with [`GgufFile::write_to`].
#[derive(Default)]
pub struct GgufFile<'a> {
    pub kv: Vec<(String, Value)>,
    pub tensors: Vec<TensorEntry<'a>>,
}

impl<'a> GgufFile<'a> {
    pub fn set(&mut self, key: &str, v: Value) {
        self.kv.push((key.to_string(), v));
    }

    /// Writes the file. Every tensor's element count must match its shape and, for Q8_0, its
    /// rows must be a multiple of 32 (the caller checks; here it is an `InvalidInput` error).
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        let mut pos = 0u64;
        let mut out = Counting { w, pos: &mut pos };
        out.write_all(b"GGUF")?;
        out.write_all(&3u32.to_le_bytes())?;
        out.write_all(&(self.tensors.len() as u64).to_le_bytes())?;
        out.write_all(&(self.kv.len() as u64).to_le_bytes())?;
        for (k, v) in &self.kv {
            write_str(&mut out, k)?;
            write_value(&mut out, v)?;
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            check_tensor(t)?;
            write_str(&mut out, &t.name)?;
            out.write_all(&(t.shape.len() as u32).to_le_bytes())?;
            for &d in t.shape.iter().rev() {
                out.write_all(&(d as u64).to_le_bytes())?;
            }
            out.write_all(&(t.dtype as u32).to_le_bytes())?;
            out.write_all(&offset.to_le_bytes())?;
            offset += padded(t.dtype.bytes(t.values.len()) as u64);
        }
        let here = *out.pos;
        pad_to(&mut out, here)?;
        for t in &self.tensors {
            let n = encode(&mut out, t)?;
            pad_to(&mut out, n as u64)?;
        }
        out.w.flush()
    }
}

/// `n` rounded up to [`ALIGNMENT`].
pub fn padded(n: u64) -> u64 {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

fn check_tensor(t: &TensorEntry) -> io::Result<()> {
    let n: usize = t.shape.iter().product();
    let bad = |msg: String| Err(io::Error::new(io::ErrorKind::InvalidInput, msg));
    if n != t.values.len() {
        return bad(format!(
            "gguf tensor {}: shape {:?} holds {n} values, got {}",
            t.name,
            t.shape,
            t.values.len()
        ));
    }
    let row = t.shape.last().copied().unwrap_or(1);
    if t.dtype == GgmlType::Q8_0 && !row.is_multiple_of(Q8_0_BLOCK) {
        return bad(format!(
            "gguf tensor {}: rows of {row} are not a multiple of {Q8_0_BLOCK} (Q8_0)",
            t.name
        ));
    }
    Ok(())
}

/// Writes `t`'s data in its type; returns the bytes written.
fn encode(w: &mut impl Write, t: &TensorEntry) -> io::Result<usize> {
    let v = &t.values;
    let mut buf = Vec::with_capacity(t.dtype.bytes(v.len().min(1 << 16)));
    let mut total = 0;
    // Chunks of whole Q8_0 blocks keep memory flat for big tensors.
    for chunk in v.chunks(1 << 16) {
        buf.clear();
        match t.dtype {
            GgmlType::F32 => chunk
                .iter()
                .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
            GgmlType::F16 => chunk
                .iter()
                .for_each(|&x| buf.extend_from_slice(&half::f16::from_f32(x).to_le_bytes())),
            GgmlType::Q8_0 => chunk
                .chunks(Q8_0_BLOCK)
                .for_each(|b| buf.extend_from_slice(&q8_0_block(b))),
        }
        w.write_all(&buf)?;
        total += buf.len();
    }
    Ok(total)
}

/// One Q8_0 block as llama.cpp's `gguf.quants` makes it: `d = max|x| / 127` (f32),
/// `q = round(x * (1 / d))` with halves away from zero, `d` stored as f16 before the 32 bytes.
pub fn q8_0_block(x: &[f32]) -> [u8; 2 + Q8_0_BLOCK] {
    debug_assert_eq!(x.len(), Q8_0_BLOCK);
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    let mut out = [0u8; 2 + Q8_0_BLOCK];
    out[..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
    for (o, &v) in out[2..].iter_mut().zip(x) {
        *o = ((v * id).round() as i8) as u8;
    }
    out
}

fn write_str(w: &mut impl Write, s: &str) -> io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn write_value(w: &mut impl Write, v: &Value) -> io::Result<()> {
    match v {
        Value::U32(x) => {
            w.write_all(&T_UINT32.to_le_bytes())?;
            w.write_all(&x.to_le_bytes())
        }
        Value::F32(x) => {
            w.write_all(&T_FLOAT32.to_le_bytes())?;
            w.write_all(&x.to_le_bytes())
        }
        Value::Bool(x) => {
            w.write_all(&T_BOOL.to_le_bytes())?;
            w.write_all(&[*x as u8])
        }
        Value::Str(s) => {
            w.write_all(&T_STRING.to_le_bytes())?;
            write_str(w, s)
        }
        Value::StrArray(a) => {
            w.write_all(&T_ARRAY.to_le_bytes())?;
            w.write_all(&T_STRING.to_le_bytes())?;
            w.write_all(&(a.len() as u64).to_le_bytes())?;
            a.iter().try_for_each(|s| write_str(w, s))
        }
        Value::I32Array(a) => {
            w.write_all(&T_ARRAY.to_le_bytes())?;
            w.write_all(&T_INT32.to_le_bytes())?;
            w.write_all(&(a.len() as u64).to_le_bytes())?;
            a.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
        }
    }
}

/// Zero bytes up to the next multiple of [`ALIGNMENT`] after `n` bytes.
fn pad_to(w: &mut impl Write, n: u64) -> io::Result<()> {
    let pad = (padded(n) - n) as usize;
    w.write_all(&[0u8; ALIGNMENT as usize][..pad])
}

/// A writer that counts the bytes through it.
struct Counting<'w, W: Write> {
    w: &'w mut W,
    pos: &'w mut u64,
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.w.write(buf)?;
        *self.pos += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(name: &str, shape: &[usize], dtype: GgmlType, v: Vec<f32>) -> TensorEntry<'static> {
        TensorEntry {
            name: name.into(),
            shape: shape.to_vec(),
            dtype,
            values: Cow::Owned(v),
        }
    }

    #[test]
    fn q8_0_block_scales_by_the_largest_magnitude_and_rounds_halves_away() {
        let mut x: Vec<f32> = (0..32).map(|i| (i as f32 - 13.3) * 0.37).collect();
        x[5] = -12.7; // the largest magnitude: -127 exactly
        let b = q8_0_block(&x);
        let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        assert!((d - 0.1).abs() < 1e-4, "scale {d}");
        assert_eq!(b[2 + 5] as i8, -127);
        // 0.05 / 0.1 = 0.5 rounds away from zero to 1 (round-half-even would give 0).
        let mut y = [0f32; 32];
        y[0] = 12.7;
        y[1] = 0.05;
        y[2] = -0.05;
        let b = q8_0_block(&y);
        assert_eq!((b[2] as i8, b[3] as i8, b[4] as i8), (127, 1, -1));
        assert_eq!(q8_0_block(&[0.0; 32]), [0u8; 34]);
    }

    #[test]
    fn layout_is_header_kv_infos_then_aligned_data() {
        let mut f = GgufFile::default();
        f.set("general.architecture", Value::Str("mamba".into()));
        f.tensors.push(tensor(
            "a",
            &[2, 3],
            GgmlType::F32,
            vec![1., 2., 3., 4., 5., 6.],
        ));
        f.tensors
            .push(tensor("b", &[1, 32], GgmlType::Q8_0, vec![0.5; 32]));
        let mut bytes = Vec::new();
        f.write_to(&mut bytes).unwrap();
        assert_eq!(&bytes[..4], b"GGUF");
        assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 3);
        assert_eq!(u64::from_le_bytes(bytes[8..16].try_into().unwrap()), 2);
        assert_eq!(u64::from_le_bytes(bytes[16..24].try_into().unwrap()), 1);
        // kv: key (8 + 20) + type 4 + string (8 + 5) = 45 bytes from 24.
        let infos = 24 + 45;
        // "a": name 8+1, n_dims 4, dims reversed [3, 2], type 4, offset 8.
        let dims = infos + 9 + 4;
        assert_eq!(
            u64::from_le_bytes(bytes[dims..dims + 8].try_into().unwrap()),
            3
        );
        assert_eq!(
            u64::from_le_bytes(bytes[dims + 8..dims + 16].try_into().unwrap()),
            2
        );
        let b_offset = dims + 16 + 4 + 8 + 9 + 4 + 16 + 4;
        let off = u64::from_le_bytes(bytes[b_offset..b_offset + 8].try_into().unwrap());
        assert_eq!(off, 32, "a's 24 bytes padded to 32");
        let data = padded((b_offset + 8) as u64) as usize;
        assert_eq!(
            f32::from_le_bytes(bytes[data + 20..data + 24].try_into().unwrap()),
            6.
        );
        assert_eq!(bytes.len(), data + 32 + 64, "b's 34 bytes padded to 64");
    }

    #[test]
    fn a_shape_that_does_not_hold_the_values_is_an_error_naming_the_tensor() {
        let mut f = GgufFile::default();
        f.tensors
            .push(tensor("blk.0.x", &[2, 2], GgmlType::F32, vec![1.; 3]));
        let e = f.write_to(&mut Vec::new()).unwrap_err().to_string();
        assert!(e.contains("blk.0.x") && e.contains("[2, 2]"), "{e}");
        let mut f = GgufFile::default();
        f.tensors
            .push(tensor("q", &[1, 16], GgmlType::Q8_0, vec![1.; 16]));
        let e = f.write_to(&mut Vec::new()).unwrap_err().to_string();
        assert!(e.contains("q") && e.contains("multiple of 32"), "{e}");
    }
}

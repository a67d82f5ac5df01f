//! The kernels' build: sources, compile-time shapes, NVRTC, and the PTX caches (per process
//! and on disk, see [`kernel_cache_dir`]).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use reference::Error;

/// Every kernel source, in the order they are concatenated into one NVRTC program: each
/// op's parameter structs (`<op>.cuh`, generated from `gpu/src/ops/<op>.rs`) before its kernels.
const SOURCES: [&str; 19] = [
    include_str!("../kernels/common.cuh"),
    include_str!("../kernels/elementwise.cuh"),
    include_str!("../kernels/elementwise.cu"),
    include_str!("../kernels/embedding.cuh"),
    include_str!("../kernels/embedding.cu"),
    include_str!("../kernels/norm.cuh"),
    include_str!("../kernels/norm.cu"),
    include_str!("../kernels/conv1d.cuh"),
    include_str!("../kernels/conv1d.cu"),
    include_str!("../kernels/selective_scan.cuh"),
    include_str!("../kernels/selective_scan.cu"),
    include_str!("../kernels/decode.cuh"),
    include_str!("../kernels/decode.cu"),
    include_str!("../kernels/decode_layers.cuh"),
    include_str!("../kernels/decode_layers.cu"),
    include_str!("../kernels/loss.cuh"),
    include_str!("../kernels/loss.cu"),
    include_str!("../kernels/adamw.cuh"),
    include_str!("../kernels/adamw.cu"),
];

/// Positions per stored scan state (the scan backward recomputes inside a chunk, in
/// windows of [`scan_window`] positions in registers): the default of [`KernelShape::chunk`];
/// `VET_SCAN_CHUNK` (16, 32 or 64) overrides it.
pub const SCAN_CHUNK: usize = 32;

/// The scan backward build this process uses: `selective_scan_bwd_f32` (no register cap)
/// unless `VET_SCAN_BWD=2b` picks the build capped for two blocks per SM (with 128-thread
/// blocks both get 255 registers and measure the same on the H200). A bad value is refused
/// when an engine opens ([`scan_chunk_for`]); this falls back to the default.
pub fn scan_bwd_kernel() -> &'static str {
    let v = std::env::var("VET_SCAN_BWD").ok();
    parse_scan_bwd(v.as_deref()).unwrap_or("selective_scan_bwd_f32")
}

/// `VET_SCAN_BWD`: unset or empty for the default build, `2b` for the capped one.
pub fn parse_scan_bwd(value: Option<&str>) -> Result<&'static str, Error> {
    match value {
        None | Some("") => Ok("selective_scan_bwd_f32"),
        Some("2b") => Ok("selective_scan_bwd_2b_f32"),
        Some(v) => Err(env_error("VET_SCAN_BWD", v, "unset or 2b")),
    }
}

/// `VET_SCAN_CHUNK`: unset or empty for [`SCAN_CHUNK`], else 16, 32 or 64.
pub fn parse_scan_chunk(value: Option<&str>) -> Result<usize, Error> {
    match value {
        None | Some("") => Ok(SCAN_CHUNK),
        Some(v) => match v.trim().parse() {
            Ok(c @ (16 | 32 | 64)) => Ok(c),
            _ => Err(env_error("VET_SCAN_CHUNK", v, "16, 32 or 64")),
        },
    }
}

fn env_error(var: &str, value: &str, accepted: &str) -> Error {
    Error::Device {
        device: "cuda".into(),
        msg: format!("environment variable {var}={value:?} is not valid: expected {accepted}"),
    }
}

/// Scan chunk for a d_state padded to `d_state_pad`: `VET_SCAN_CHUNK` (default
/// [`SCAN_CHUNK`]), at least 16, and 32 at d_state 32 (the backward's shared memory grows with
/// chunk × d_state²). Errors on a bad `VET_SCAN_CHUNK` or `VET_SCAN_BWD`: every engine and
/// op device opens through here.
pub fn scan_chunk_for(d_state_pad: usize) -> Result<usize, Error> {
    parse_scan_bwd(std::env::var("VET_SCAN_BWD").ok().as_deref())?;
    let chunk = parse_scan_chunk(std::env::var("VET_SCAN_CHUNK").ok().as_deref())?;
    Ok(if d_state_pad >= 32 { 32 } else { chunk.max(16) })
}

/// Threads per scan block: one thread per channel (all d_state states in registers).
pub const SCAN_THREADS: usize = 128;

/// Blocks of the scan kernels along d_inner (one channel per thread in the backward,
/// [`SCAN_THREADS`] channels per block forward and backward).
pub fn scan_blocks(d_inner: usize) -> usize {
    d_inner.div_ceil(SCAN_THREADS)
}

/// Threads per scan forward block (same grid as the backward, [`SCAN_THREADS`] channels per
/// block): two threads per channel, each with half of the d_state states in registers.
pub const SCAN_FWD_THREADS: usize = 2 * SCAN_THREADS;

/// Compile-time shape constants of one kernel build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelShape {
    /// Power of two ≥ d_state, at most 32.
    pub d_state_pad: usize,
    pub d_conv: usize,
    /// Positions per stored scan state, a multiple of `scan_window`.
    pub chunk: usize,
}

/// Compiled PTX keyed by (compute capability major, minor, shape).
pub(crate) type PtxCache = Mutex<HashMap<(i32, i32, KernelShape), String>>;

/// PTX per (architecture, shape), shared by every engine of the process.
pub(crate) fn ptx_cache() -> &'static PtxCache {
    static CACHE: OnceLock<PtxCache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}
/// Positions the scan backward keeps in registers at a time (a window of a chunk): SUB ×
/// d_state_pad states per thread (at most 64 up to d_state 16, 128 at 32).
pub fn scan_window(shape: KernelShape) -> usize {
    (64 / shape.d_state_pad).clamp(4, 8).min(shape.chunk)
}

/// Dynamic shared memory of the scan backward (see selective_scan.cu): the chunk's B/C rows
/// and reset flags, the window-start states of every thread, the warp sums of dB/dC, and
/// every thread's dt of the chunk.
pub fn scan_bwd_smem(shape: KernelShape) -> usize {
    let (ng, chunk) = (shape.d_state_pad, shape.chunk);
    let windows = chunk / scan_window(shape);
    4 * (chunk * 2 * ng
        + chunk
        + windows * ng * SCAN_THREADS
        + chunk * (SCAN_THREADS / 32) * 2 * ng
        + chunk * SCAN_THREADS)
}

/// NVRTC options and architecture of one kernel build.
fn compile_options(cc: (i32, i32), shape: KernelShape) -> (String, Vec<String>) {
    let arch = format!("sm_{}{}", cc.0, cc.1);
    let options = vec![
        format!("-DD_STATE_PAD={}", shape.d_state_pad),
        format!("-DD_CONV={}", shape.d_conv),
        format!("-DCHUNK={}", shape.chunk),
        format!("-DSUB={}", scan_window(shape)),
        "-std=c++17".into(),
    ];
    (arch, options)
}

pub(crate) fn compile(cc: (i32, i32), shape: KernelShape) -> std::result::Result<String, String> {
    let (arch, options) = compile_options(cc, shape);
    let arch: &'static str = Box::leak(arch.into_boxed_str());
    let src: String = SOURCES.concat();
    let opts = CompileOptions {
        arch: Some(arch),
        options,
        ..Default::default()
    };
    let ptx = std::panic::catch_unwind(|| compile_ptx_with_opts(&src, opts))
        .map_err(|_| "NVRTC panicked (library missing a symbol?)".to_string())?
        .map_err(|e| format!("NVRTC compile for {arch}: {e:?}"))?;
    Ok(ptx.to_src())
}

/// The on-disk PTX cache: `$VET_KERNEL_CACHE`, else `$XDG_CACHE_HOME/vet-mamba/kernels`, else
/// `~/.cache/vet-mamba/kernels`; `VET_KERNEL_CACHE=off` turns it off.
pub fn kernel_cache_dir() -> Option<std::path::PathBuf> {
    use std::path::PathBuf;
    match std::env::var_os("VET_KERNEL_CACHE") {
        Some(v) if v == "off" || v == "0" || v.is_empty() => None,
        Some(v) => Some(PathBuf::from(v)),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|c| c.join("vet-mamba").join("kernels")),
    }
}

/// The first line of a cached file: the build it holds, checked on every read.
pub fn cache_header(cc: (i32, i32), shape: KernelShape) -> (String, String) {
    let (arch, options) = compile_options(cc, shape);
    let mut nvrtc = (0i32, 0i32);
    // SAFETY: two out-pointers to live integers; the library was probed before.
    let _ = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut nvrtc.0, &mut nvrtc.1) };
    let src = SOURCES.concat();
    let opts = options.join(" ");
    let nv = format!("{}.{}", nvrtc.0, nvrtc.1);
    // The cache key: sources, options, architecture and NVRTC version.
    let key = reference::rng::fnv1a64(&format!("{src}\0{opts}\0{arch}\0{nv}"));
    let name = format!("{key:016x}-{arch}.ptx");
    let header = format!("// vet-mamba kernels {key:016x} {arch} nvrtc {nv} {opts}\n");
    (name, header)
}

/// PTX for (architecture, shape): from the on-disk cache when a valid entry exists, else
/// compiled by NVRTC and stored there (written to a temporary file, then renamed, so a
/// crash never leaves a partial entry). A cache that cannot be read or written is skipped
/// with a warning, never an error. Returns the PTX and whether it came from the disk.
/// `dir`: the cache folder ([`kernel_cache_dir`] for the engine), `None` for no cache.
pub fn compile_cached(
    dir: Option<&std::path::Path>,
    cc: (i32, i32),
    shape: KernelShape,
) -> std::result::Result<(String, bool), String> {
    let Some(dir) = dir else {
        return Ok((compile(cc, shape)?, false));
    };
    let (name, header) = cache_header(cc, shape);
    let path = dir.join(&name);
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Some(ptx) = text.strip_prefix(&header) {
            if ptx.contains(".entry") {
                return Ok((ptx.to_string(), true));
            }
        }
        eprintln!(
            "warning: ignoring the damaged kernel cache entry {}",
            path.display()
        );
    }
    let ptx = compile(cc, shape)?;
    let stored = std::fs::create_dir_all(dir).and_then(|_| {
        reference::fs::atomic_write_with(&path, |f| {
            use std::io::Write;
            f.write_all(header.as_bytes())?;
            f.write_all(ptx.as_bytes())
        })
    });
    if let Err(e) = stored {
        eprintln!(
            "warning: cannot store compiled kernels in {} ({e}); set VET_KERNEL_CACHE to another folder or to off",
            dir.display()
        );
    }
    Ok((ptx, false))
}

/// Drops a cache entry whose PTX the driver refused.
pub(crate) fn forget_cached(cc: (i32, i32), shape: KernelShape) {
    if let Some(dir) = kernel_cache_dir() {
        let _ = std::fs::remove_file(dir.join(cache_header(cc, shape).0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_chunk_accepts_16_32_64_and_names_the_variable_otherwise() {
        assert_eq!(parse_scan_chunk(None).unwrap(), SCAN_CHUNK);
        assert_eq!(parse_scan_chunk(Some("")).unwrap(), SCAN_CHUNK);
        for c in [16, 32, 64] {
            assert_eq!(parse_scan_chunk(Some(&c.to_string())).unwrap(), c);
        }
        for bad in ["8", "48", "128", "thirty-two", "-32"] {
            let e = parse_scan_chunk(Some(bad)).unwrap_err().to_string();
            assert!(e.contains("VET_SCAN_CHUNK"), "{e}");
            assert!(e.contains(bad) && e.contains("16, 32 or 64"), "{e}");
        }
    }

    #[test]
    fn scan_bwd_accepts_unset_or_2b_and_names_the_variable_otherwise() {
        assert_eq!(parse_scan_bwd(None).unwrap(), "selective_scan_bwd_f32");
        assert_eq!(parse_scan_bwd(Some("")).unwrap(), "selective_scan_bwd_f32");
        assert_eq!(
            parse_scan_bwd(Some("2b")).unwrap(),
            "selective_scan_bwd_2b_f32"
        );
        for bad in ["2B", "1b", "two"] {
            let e = parse_scan_bwd(Some(bad)).unwrap_err().to_string();
            assert!(e.contains("VET_SCAN_BWD") && e.contains(bad), "{e}");
            assert!(e.contains("unset or 2b"), "{e}");
        }
    }
}

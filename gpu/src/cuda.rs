//! The CUDA context of one device: stream, NVRTC module (compiled once per kernel
//! configuration, cached per process and on disk, see [`kernel_cache_dir`]), cuBLAS handle,
//! raw device buffers and launches.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::{result as cublas, sys as cublas_sys};
use cudarc::driver::{result as drv, sys as drv_sys, CudaContext, CudaStream};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};

use reference::{Error, Result};

/// Every kernel source, in the order they are concatenated into one NVRTC program.
const SOURCES: [&str; 9] = [
    include_str!("../kernels/common.cuh"),
    include_str!("../kernels/elementwise.cu"),
    include_str!("../kernels/embedding.cu"),
    include_str!("../kernels/norm.cu"),
    include_str!("../kernels/conv1d.cu"),
    include_str!("../kernels/selective_scan.cu"),
    include_str!("../kernels/decode.cu"),
    include_str!("../kernels/loss.cu"),
    include_str!("../kernels/adamw.cu"),
];

/// Kernels the engine calls (looked up once at start).
const KERNELS: &[&str] = &[
    "cast_lowp_f32",
    "bias_add_f32",
    "silu_fwd_f32",
    "silu_bwd_f32",
    "colsum_partial_f32",
    "colsum_final_f32",
    "embedding_fwd_f32",
    "embedding_bwd_f32",
    "norm_fwd_f32",
    "norm_bwd_dx_f32",
    "norm_bwd_dw_partial_f32",
    "conv1d_fwd_f32",
    "conv1d_last_f32",
    "conv1d_bwd_dx_f32",
    "conv1d_bwd_init_f32",
    "conv1d_bwd_dw_partial_f32",
    "selective_scan_fwd_f32",
    "selective_scan_bwd_f32",
    "selective_scan_bwd_2b_f32",
    "scan_reduce_bc_f32",
    "scan_reduce_batch_f32",
    "conv_update_f32",
    "ssm_update_f32",
    "cross_entropy_fwd_bwd_f32",
    "sumsq_partial_f64",
    "sumsq_final_f64",
    "adamw_f32",
];

/// Positions per stored scan state (the scan backward recomputes inside a chunk, in
/// windows of [`scan_window`] positions in registers): the default of [`KernelShape::chunk`];
/// `VET_SCAN_CHUNK` (16, 32 or 64) overrides it.
pub const SCAN_CHUNK: usize = 32;

/// The scan backward build this process uses: `selective_scan_bwd_f32` (no register cap)
/// unless `VET_SCAN_BWD=2b` picks the build capped for two blocks per SM (with 128-thread
/// blocks both get 255 registers and measure the same on the H200).
pub fn scan_bwd_kernel() -> &'static str {
    match std::env::var("VET_SCAN_BWD").as_deref() {
        Ok("2b") => "selective_scan_bwd_2b_f32",
        _ => "selective_scan_bwd_f32",
    }
}

/// The scan chunk this process uses.
pub fn scan_chunk() -> usize {
    match std::env::var("VET_SCAN_CHUNK")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(c @ (16 | 32 | 64)) => c,
        _ => SCAN_CHUNK,
    }
}
/// Scan chunk for a d_state padded to `d_state_pad`: [`scan_chunk`], at least 16, and 32 at
/// d_state 32 (the backward's shared memory grows with chunk × d_state²).
pub fn scan_chunk_for(d_state_pad: usize) -> usize {
    if d_state_pad >= 32 {
        32
    } else {
        scan_chunk().max(16)
    }
}

/// Threads per scan block: one thread per channel (all d_state states in registers).
pub const SCAN_THREADS: usize = 128;

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
type PtxCache = Mutex<HashMap<(i32, i32, KernelShape), String>>;

/// PTX per (architecture, shape), shared by every engine of the process.
fn ptx_cache() -> &'static PtxCache {
    static CACHE: OnceLock<PtxCache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// A kernel argument: pointers, `long`, `int`, `float` (each in one 8-byte slot).
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    P(u64),
    L(i64),
    I(i32),
    F(f32),
}

/// GEMM operand type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dt {
    F32,
    Bf16,
    F16,
}

/// One device: context, stream, module, cuBLAS.
pub struct Dev {
    pub name: String,
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    module: drv_sys::CUmodule,
    funcs: HashMap<&'static str, drv_sys::CUfunction>,
    cublas: cublas_sys::cublasHandle_t,
    pub sm_count: usize,
}

/// Maps any CUDA-side error to `Error::Device`.
pub fn dev_err(device: &str, what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Device {
        device: device.to_string(),
        msg: format!("{what}: {e:?}"),
    }
}

/// Checks that the driver, NVRTC and cuBLAS libraries can be loaded, without panicking.
pub fn probe_libraries() -> std::result::Result<(), String> {
    // SAFETY: these only try to dlopen the libraries by name.
    let (cu, rtc, blas) = unsafe {
        (
            drv_sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
            cublas_sys::is_culib_present(),
        )
    };
    let missing: Vec<&str> = [(cu, "libcuda"), (rtc, "libnvrtc"), (blas, "libcublas")]
        .iter()
        .filter(|(ok, _)| !ok)
        .map(|(_, n)| *n)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "no CUDA device: cannot load {} (install the NVIDIA driver and CUDA 13 runtime libraries)",
            missing.join(", ")
        ))
    }
}

// SAFETY: the module, function and cuBLAS handles are plain driver handles, valid on any
// thread on which the context is current; every entry point of the engine binds the context
// first, and the engine's methods that launch work take `&mut self`, so one thread at a time
// uses the cuBLAS handle and the stream.
unsafe impl Send for Dev {}
// SAFETY: see `Send`; shared references only read the handles.
unsafe impl Sync for Dev {}

impl Dev {
    /// Opens device `ordinal` and builds the kernels for `shape`.
    pub fn open(ordinal: usize, shape: KernelShape) -> Result<Dev> {
        let name = format!("cuda:{ordinal}");
        probe_libraries().map_err(|msg| Error::Device {
            device: name.clone(),
            msg,
        })?;
        let ctx = std::panic::catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|_| Error::Device {
                device: name.clone(),
                msg: "the CUDA driver library panicked while starting (missing symbol?)".into(),
            })?
            .map_err(|e| dev_err(&name, "creating the CUDA context", e))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| dev_err(&name, "creating a stream", e))?;
        let cc = ctx
            .compute_capability()
            .map_err(|e| dev_err(&name, "reading the compute capability", e))?;
        let sm_count =
            ctx.attribute(drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .map_err(|e| dev_err(&name, "reading the SM count", e))? as usize;
        let ptx_for = |fresh: bool| -> Result<(String, bool)> {
            let mut cache = ptx_cache().lock().unwrap_or_else(|p| p.into_inner());
            if !fresh {
                if let Some(p) = cache.get(&(cc.0, cc.1, shape)) {
                    return Ok((p.clone(), false));
                }
            }
            let (p, from_disk) = if fresh {
                (compile(cc, shape), false)
            } else {
                match compile_cached(kernel_cache_dir().as_deref(), cc, shape) {
                    Ok(x) => (Ok(x.0), x.1),
                    Err(e) => (Err(e), false),
                }
            };
            let p = p.map_err(|msg| Error::Device {
                device: name.clone(),
                msg,
            })?;
            cache.insert((cc.0, cc.1, shape), p.clone());
            Ok((p, from_disk))
        };
        let load = |ptx: String| -> Result<drv_sys::CUmodule> {
            let cptx = CString::new(ptx).map_err(|e| dev_err(&name, "PTX", e))?;
            // SAFETY: the context is current on this thread (CudaContext::new binds it); the
            // image is a NUL-terminated PTX string that outlives the call.
            unsafe { drv::module::load_data(cptx.as_ptr() as *const c_void) }
                .map_err(|e| dev_err(&name, "loading the kernel module", e))
        };
        let (ptx, from_disk) = ptx_for(false)?;
        let module = match load(ptx) {
            Ok(m) => m,
            // A cached entry the driver refuses (another toolkit wrote it, the disk damaged
            // it): compile afresh.
            Err(_) if from_disk => {
                eprintln!("warning: the cached kernels did not load; compiling them again");
                forget_cached(cc, shape);
                load(ptx_for(true)?.0)?
            }
            Err(e) => return Err(e),
        };
        let mut funcs = HashMap::new();
        for &k in KERNELS {
            let cname = CString::new(k).map_err(|e| dev_err(&name, "kernel name", e))?;
            // SAFETY: the module was just loaded and stays loaded while `Dev` lives.
            let f = unsafe { drv::module::get_function(module, cname) }
                .map_err(|e| dev_err(&name, &format!("kernel {k}"), e))?;
            funcs.insert(k, f);
        }
        let smem = scan_bwd_smem(shape) as i32;
        for k in ["selective_scan_bwd_f32", "selective_scan_bwd_2b_f32"] {
            // SAFETY: a valid function handle; the value is within the H200 limit (227 KiB).
            unsafe {
                drv::function::set_function_attribute(
                    funcs[k],
                    drv_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem,
                )
            }
            .map_err(|e| dev_err(&name, "scan backward shared memory", e))?;
        }
        let handle = cublas::create_handle().map_err(|e| dev_err(&name, "cuBLAS handle", e))?;
        // SAFETY: handle and stream are valid and belong to this context.
        unsafe { cublas::set_stream(handle, stream.cu_stream() as _) }
            .map_err(|e| dev_err(&name, "cuBLAS stream", e))?;
        Ok(Dev {
            name,
            ctx,
            stream,
            module,
            funcs,
            cublas: handle,
            sm_count,
        })
    }

    pub fn err(&self, what: &str, e: impl std::fmt::Debug) -> Error {
        dev_err(&self.name, what, e)
    }

    /// Makes this context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| self.err("binding the context", e))
    }

    pub fn cu_stream(&self) -> drv_sys::CUstream {
        self.stream.cu_stream()
    }

    pub fn sync(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| self.err("synchronising the stream", e))
    }

    /// Launches kernel `name`.
    pub fn launch(
        &self,
        name: &'static str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &[Arg],
    ) -> Result<()> {
        let f = *self
            .funcs
            .get(name)
            .ok_or_else(|| self.err("launch", format!("no kernel {name}")))?;
        let mut slots: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                Arg::P(p) => p,
                Arg::L(v) => v as u64,
                Arg::I(v) => v as u32 as u64,
                Arg::F(v) => v.to_bits() as u64,
            })
            .collect();
        let mut ptrs: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect();
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        // SAFETY: every slot is 8 bytes, little-endian, so a 4-byte parameter reads its low
        // half; the caller passes the kernel's parameters in order with live device pointers.
        unsafe { drv::launch_kernel(f, grid, (block, 1, 1), smem, self.cu_stream(), &mut ptrs) }
            .map_err(|e| self.err(&format!("launching {name}"), e))
    }

    /// `dst[j] = Σ_r part[r, j]` over `n_rb` row-block partials of `cols` columns, in row order.
    pub fn colsum_final(&self, part: u64, n_rb: usize, cols: usize, dst: u64) -> Result<()> {
        self.launch(
            "colsum_final_f32",
            (cols.div_ceil(256) as u32, 1, 1),
            256,
            0,
            &[
                Arg::P(part),
                Arg::L(n_rb as i64),
                Arg::L(cols as i64),
                Arg::P(dst),
            ],
        )
    }

    /// Grid size for a grid-stride kernel over `n` items with 256 threads.
    pub fn grid1d(&self, n: usize) -> (u32, u32, u32) {
        let blocks = n.div_ceil(256).clamp(1, self.sm_count * 32);
        (blocks as u32, 1, 1)
    }

    /// Column-major GEMM `C = alpha · op(A) · op(B) + beta · C` with f32 C and f32 compute.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        ta: bool,
        tb: bool,
        m: usize,
        n: usize,
        k: usize,
        a: (u64, usize),
        b: (u64, usize),
        c: (u64, usize),
        beta: f32,
        dt: Dt,
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let op = |t: bool| {
            if t {
                cublas_sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                cublas_sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let ty = match dt {
            Dt::F32 => cublas_sys::cudaDataType_t::CUDA_R_32F,
            Dt::Bf16 => cublas_sys::cudaDataType_t::CUDA_R_16BF,
            Dt::F16 => cublas_sys::cudaDataType_t::CUDA_R_16F,
        };
        let alpha = 1.0f32;
        // SAFETY: the caller passes live device pointers whose extents match (m, n, k, ld).
        unsafe {
            cublas::gemm_ex(
                self.cublas,
                op(ta),
                op(tb),
                m as i32,
                n as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                a.0 as *const c_void,
                ty,
                a.1 as i32,
                b.0 as *const c_void,
                ty,
                b.1 as i32,
                &beta as *const f32 as *const c_void,
                c.0 as *mut c_void,
                cublas_sys::cudaDataType_t::CUDA_R_32F,
                c.1 as i32,
                cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| self.err(&format!("GEMM m={m} n={n} k={k} {dt:?}"), e))
    }

    /// Allocates `bytes` (at least 1) of device memory.
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<Buf> {
        // SAFETY: the context is current; the allocation is freed in `Buf::drop`.
        let ptr = unsafe { drv::malloc_sync(bytes.max(1)) }.map_err(|e| {
            let (free, total) = drv::mem_get_info().unwrap_or((0, 0));
            self.err(
                &format!(
                    "allocating {:.2} GiB ({:.2} GiB free of {:.2} GiB)",
                    bytes as f64 / 1073741824.0,
                    free as f64 / 1073741824.0,
                    total as f64 / 1073741824.0
                ),
                e,
            )
        })?;
        Ok(Buf {
            ptr,
            bytes,
            dev: self.clone(),
        })
    }

    pub fn zeros(self: &Arc<Self>, bytes: usize) -> Result<Buf> {
        let b = self.alloc(bytes)?;
        b.zero()?;
        Ok(b)
    }

    /// Uploads `src` to a new buffer.
    pub fn upload<T: Copy>(self: &Arc<Self>, src: &[T]) -> Result<Buf> {
        let b = self.alloc(std::mem::size_of_val(src))?;
        b.write(0, src)?;
        Ok(b)
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: created in `open`, destroyed once here; no buffer outlives `Dev` (each
        // holds an `Arc<Dev>`).
        unsafe {
            let _ = cublas::destroy_handle(self.cublas);
            let _ = drv::module::unload(self.module);
        }
    }
}

/// Positions the scan backward keeps in registers at a time (a window of a chunk): SUB ×
/// d_state_pad states per thread (at most 64 up to d_state 16, 128 at 32).
pub fn scan_window(shape: KernelShape) -> usize {
    (64 / shape.d_state_pad).clamp(4, 8).min(shape.chunk)
}

/// Dynamic shared memory of the scan backward (see selective_scan.cu): the chunk's B/C rows
/// and reset flags, the window-start states of every thread, the warp sums of dB/dC.
pub fn scan_bwd_smem(shape: KernelShape) -> usize {
    let (ng, chunk) = (shape.d_state_pad, shape.chunk);
    let windows = chunk / scan_window(shape);
    4 * (chunk * 2 * ng
        + chunk
        + windows * ng * SCAN_THREADS
        + chunk * (SCAN_THREADS / 32) * 2 * ng)
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

fn compile(cc: (i32, i32), shape: KernelShape) -> std::result::Result<String, String> {
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
    let tmp = dir.join(format!("{name}.{}.tmp", std::process::id()));
    let stored = std::fs::create_dir_all(dir)
        .and_then(|_| std::fs::write(&tmp, format!("{header}{ptx}")))
        .and_then(|_| std::fs::rename(&tmp, &path));
    if let Err(e) = stored {
        let _ = std::fs::remove_file(&tmp);
        eprintln!(
            "warning: cannot store compiled kernels in {} ({e}); set VET_KERNEL_CACHE to another folder or to off",
            dir.display()
        );
    }
    Ok((ptx, false))
}

/// Drops a cache entry whose PTX the driver refused.
fn forget_cached(cc: (i32, i32), shape: KernelShape) {
    if let Some(dir) = kernel_cache_dir() {
        let _ = std::fs::remove_file(dir.join(cache_header(cc, shape).0));
    }
}

/// A raw device allocation, freed on drop.
pub struct Buf {
    pub ptr: u64,
    pub bytes: usize,
    dev: Arc<Dev>,
}

impl Buf {
    /// Device pointer `off` elements of `T` in.
    pub fn at<T>(&self, off: usize) -> u64 {
        debug_assert!(
            (off + 1) * std::mem::size_of::<T>() <= self.bytes.max(std::mem::size_of::<T>())
        );
        self.ptr + (off * std::mem::size_of::<T>()) as u64
    }

    pub fn zero(&self) -> Result<()> {
        // SAFETY: the range lies inside this allocation.
        unsafe { drv::memset_d8_async(self.ptr, 0, self.bytes, self.dev.cu_stream()) }
            .map_err(|e| self.dev.err("memset", e))
    }

    /// Copies `src` to element offset `off` (synchronous w.r.t. the host buffer).
    pub fn write<T: Copy>(&self, off: usize, src: &[T]) -> Result<()> {
        let bytes = std::mem::size_of_val(src);
        let start = off * std::mem::size_of::<T>();
        if start + bytes > self.bytes {
            return Err(self.dev.err(
                "upload",
                format!("{bytes} bytes at {start} past {}", self.bytes),
            ));
        }
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: bounds checked above; the copy is synchronous, so `src` may be dropped after.
        unsafe { drv::memcpy_htod_async(self.ptr + start as u64, src, self.dev.cu_stream()) }
            .map_err(|e| self.dev.err("upload", e))?;
        self.dev.sync()
    }

    /// Copies `dst.len()` elements from element offset `off`.
    pub fn read<T: Copy>(&self, off: usize, dst: &mut [T]) -> Result<()> {
        let bytes = std::mem::size_of_val(dst);
        let start = off * std::mem::size_of::<T>();
        if start + bytes > self.bytes {
            return Err(self.dev.err(
                "download",
                format!("{bytes} bytes at {start} past {}", self.bytes),
            ));
        }
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: bounds checked above; synchronised before returning.
        unsafe { drv::memcpy_dtoh_async(dst, self.ptr + start as u64, self.dev.cu_stream()) }
            .map_err(|e| self.dev.err("download", e))?;
        self.dev.sync()
    }

    /// Device-to-device copy of `bytes` from `src`.
    pub fn copy_from(&self, dst_off_bytes: usize, src: u64, bytes: usize) -> Result<()> {
        if dst_off_bytes + bytes > self.bytes {
            return Err(self.dev.err("device copy", "out of bounds"));
        }
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: bounds checked for the destination; the caller vouches for the source.
        unsafe {
            drv::memcpy_dtod_async(
                self.ptr + dst_off_bytes as u64,
                src,
                bytes,
                self.dev.cu_stream(),
            )
        }
        .map_err(|e| self.dev.err("device copy", e))
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        let _ = self.dev.ctx.bind_to_thread();
        // SAFETY: allocated by `malloc_sync`, freed once.
        unsafe {
            let _ = drv::free_sync(self.ptr);
        }
    }
}

//! The CUDA context of one device: stream, the kernel module (built by [`crate::kernels`]),
//! cuBLAS handle, raw device buffers and launches.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::Arc;

use cudarc::cublas::{result as cublas, sys as cublas_sys};
use cudarc::driver::{result as drv, sys as drv_sys, CudaContext, CudaStream};

use reference::{Error, Result};

use crate::kernels::{
    compile, compile_cached, forget_cached, kernel_cache_dir, ptx_cache, scan_bwd_smem,
    KernelShape, KERNELS,
};

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

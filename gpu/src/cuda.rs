//! The CUDA context of one device: stream, the kernel module (built by [`crate::kernels`],
//! every kernel's parameters checked at load), cuBLAS handle, raw device buffers and typed
//! launches ([`Dev::launch`]; the per-kernel launchers are in `ops/<op>.rs`).

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::Arc;

use cudarc::cublas::{result as cublas, sys as cublas_sys};
use cudarc::driver::{result as drv, sys as drv_sys, CudaContext, CudaStream};

use reference::{Error, Result};

use crate::kernels::{
    compile, compile_cached, forget_cached, kernel_cache_dir, ptx_cache, scan_bwd_smem, KernelShape,
};
use crate::params::{KernelInfo, KernelParams};

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
    /// The compile-time shape the kernels were built for.
    pub shape: KernelShape,
    /// Per-launch device times (`VET_PROFILE=1`, see [`crate::profile`]).
    pub(crate) prof: Option<crate::profile::Profiler>,
    /// Whether the device can launch programmatic dependents (sm_90 on) and `VET_PDL=0` does
    /// not turn them off (H100, batch-1 decode: 1.4B 381 → 405 tok/s, 130M 1,334 → 1,407).
    pdl_capable: bool,
    /// Whether launches of [`PDL_KERNELS`] use programmatic dependent launch now
    /// ([`Dev::with_pdl`]).
    pdl_on: std::sync::atomic::AtomicBool,
    /// Whether the persistent decode kernel (`decode_layers_lp`, sm_90 on: bulk copies into
    /// shared memory) can run here: its shared memory was granted at open.
    pub persistent_decode: bool,
    /// Dynamic shared memory granted to `cross_entropy_fwd_bwd_f32` (0 if none): a row of
    /// logits that fits is staged there ([`crate::ops::loss::cross_entropy_fwd_bwd`]).
    pub ce_stage_bytes: usize,
}

/// The kernels whose blocks wait for each other: launched cooperatively (the launch fails
/// instead of hanging when the grid cannot be resident at once).
pub const COOP_KERNELS: [&str; 2] = ["decode_layers_lp", "decode_layers_lp_q8"];

/// The kernels that may be launched as programmatic dependents: each calls `pdl_wait()`
/// before it touches memory that an earlier kernel writes or reads (`gpu/kernels/common.cuh`).
pub const PDL_KERNELS: [&str; 17] = [
    "embedding_fwd_f32",
    "norm_fwd_f32",
    "bias_add_f32",
    "conv_update_f32",
    "ssm_update_f32",
    "sample_rows_f32",
    "gemv_lp",
    "gemv_lp_nl4",
    "gemv_lp_nl8",
    "gemv_lp_conv",
    "decode_layers_lp",
    "ssm_update_dt_f32",
    // The int8 twins (the same bodies).
    "gemv_lp_q8",
    "gemv_lp_nl4_q8",
    "gemv_lp_nl8_q8",
    "gemv_lp_conv_q8",
    "decode_layers_lp_q8",
];

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
    /// Opens device `ordinal`, builds the kernels for `shape` and looks up `kernels` (every
    /// kernel a launch may name: `ops::all_kernels()`), checking their parameters.
    pub fn open(ordinal: usize, shape: KernelShape, kernels: &[KernelInfo]) -> Result<Dev> {
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
        let module = load_module(&name, cc, shape)?;
        let funcs = load_functions(&name, module, kernels)?;
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
        // The persistent decode kernels (bf16 / fp16 and int8) run where their shared memory
        // is granted and one block of each fits an SM (registers included).
        let dl_smem = crate::ops::decode_layers::DL_SMEM;
        let persistent_decode = cc.0 >= 9
            && COOP_KERNELS.iter().all(|k| {
                let dl = funcs[*k];
                // SAFETY: a valid function handle; the value is within the sm_90 limit (227 KiB).
                unsafe {
                    drv::function::set_function_attribute(
                        dl,
                        drv_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        dl_smem as i32,
                    )
                }
                .is_ok()
                // SAFETY: a valid function handle of this context.
                && unsafe {
                    drv::occupancy::max_active_block_per_multiprocessor(
                        dl,
                        crate::ops::decode_layers::DL_THREADS as i32,
                        dl_smem as usize,
                    )
                }
                .is_ok_and(|n| n >= 1)
            });
        // The cross-entropy kernel may stage a row of logits in shared memory: as much as a
        // block may opt in to, less the kernel's static reduction scratch and a margin.
        let optin = ctx
            .attribute(
                drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .unwrap_or(0)
            .max(0) as usize;
        let ce_want = optin.saturating_sub(1024);
        let ce_stage_bytes = if ce_want > 0
            // SAFETY: a valid function handle; the value is within the device's opt-in limit.
            && unsafe {
                drv::function::set_function_attribute(
                    funcs["cross_entropy_fwd_bwd_f32"],
                    drv_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    ce_want as i32,
                )
            }
            .is_ok()
        {
            ce_want
        } else {
            0
        };
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
            shape,
            prof: crate::profile::profile_enabled().then(crate::profile::Profiler::new),
            pdl_capable: cc.0 >= 9 && std::env::var("VET_PDL").map_or(true, |v| v != "0"),
            pdl_on: std::sync::atomic::AtomicBool::new(false),
            persistent_decode,
            ce_stage_bytes,
        })
    }

    /// Runs `f` with programmatic dependent launch on for [`PDL_KERNELS`] (where the device
    /// has it): each such kernel may start while the one before it finishes, and waits for it
    /// inside (`pdl_wait`). The decode step uses it.
    pub fn with_pdl<T>(&self, f: impl FnOnce() -> T) -> T {
        use std::sync::atomic::Ordering;
        let was = self.pdl_on.swap(self.pdl_capable, Ordering::Relaxed);
        let r = f();
        self.pdl_on.store(was, Ordering::Relaxed);
        r
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

    /// Launches the first kernel that takes `P` (see [`Dev::launch_build`]).
    ///
    /// # Safety
    /// Every pointer in `p` is null where the kernel allows it, or else points to live device
    /// memory of this context with the extent the kernel reads or writes for the shape in `p`
    /// and this launch's grid (each launcher in `ops/<op>.rs` writes its contract down), and
    /// no buffer the kernel writes is read or written by other work while it runs.
    pub unsafe fn launch<P: KernelParams>(
        &self,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        p: &P,
    ) -> Result<()> {
        let name = P::KERNELS
            .first()
            .ok_or_else(|| self.err("launch", "a parameter struct of no kernel"))?;
        // SAFETY: the caller's contract.
        unsafe { self.launch_build(name, grid, block, smem, p) }
    }

    /// Launches kernel `name`, one of the kernels that take `P`, with `p` as its one
    /// parameter (the load checked that the kernel takes one parameter of `P`'s size).
    ///
    /// # Safety
    /// As [`Dev::launch`].
    pub unsafe fn launch_build<P: KernelParams>(
        &self,
        name: &'static str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        p: &P,
    ) -> Result<()> {
        if !P::KERNELS.contains(&name) {
            return Err(self.err("launch", format!("{name} does not take these parameters")));
        }
        let f = *self
            .funcs
            .get(name)
            .ok_or_else(|| self.err("launch", format!("no kernel {name}")))?;
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let mut copy = *p;
        let mut args = [&mut copy as *mut P as *mut c_void];
        let pdl =
            self.pdl_on.load(std::sync::atomic::Ordering::Relaxed) && PDL_KERNELS.contains(&name);
        let coop = COOP_KERNELS.contains(&name);
        self.timed(
            || name.to_string(),
            || {
                if pdl || coop {
                    // SAFETY: as below; the kernel waits for the one before where `pdl`
                    // (`PDL_KERNELS`).
                    return unsafe { self.launch_ex(f, (grid, block, smem), &mut args, pdl, coop) }
                        .map_err(|e| self.err(&format!("launching {name}"), e));
                }
                // SAFETY: the kernel takes one parameter, a struct of `P`'s size and layout
                // (checked at load; its C twin is generated from `P`); the caller vouches for
                // the pointers.
                unsafe {
                    drv::launch_kernel(f, grid, (block, 1, 1), smem, self.cu_stream(), &mut args)
                }
                .map_err(|e| self.err(&format!("launching {name}"), e))
            },
        )
    }

    /// `cuLaunchKernelEx` with programmatic stream serialisation allowed (`pdl`) and / or as
    /// a cooperative launch (`coop`).
    ///
    /// # Safety
    /// As `drv::launch_kernel`; where `pdl`, `f` calls `pdl_wait()` before it touches memory
    /// that the kernels before it write or read.
    unsafe fn launch_ex(
        &self,
        f: drv_sys::CUfunction,
        (grid, block, smem): ((u32, u32, u32), u32, u32),
        args: &mut [*mut c_void; 1],
        pdl: bool,
        coop: bool,
    ) -> std::result::Result<(), drv::DriverError> {
        // SAFETY: a zeroed attribute is a valid value of the plain C union, then set.
        let mut attrs: [drv_sys::CUlaunchAttribute; 2] = unsafe { std::mem::zeroed() };
        let mut n = 0;
        if pdl {
            attrs[n].id =
                drv_sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attrs[n].value.programmaticStreamSerializationAllowed = 1;
            n += 1;
        }
        if coop {
            attrs[n].id = drv_sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
            attrs[n].value.cooperative = 1;
            n += 1;
        }
        let cfg = drv_sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: smem,
            hStream: self.cu_stream(),
            attrs: attrs.as_mut_ptr(),
            numAttrs: n as u32,
        };
        // SAFETY: the config, attributes and arguments outlive the call; the caller's contract.
        unsafe { drv_sys::cuLaunchKernelEx(&cfg, f, args.as_mut_ptr(), std::ptr::null_mut()) }
            .result()
    }

    /// Grid size for a grid-stride kernel over `n` items with 256 threads.
    pub fn grid1d(&self, n: usize) -> (u32, u32, u32) {
        let blocks = n.div_ceil(256).clamp(1, self.sm_count * 32);
        (blocks as u32, 1, 1)
    }

    /// Column-major GEMM `C = alpha · op(A) · op(B) + beta · C` with f32 C and f32 compute.
    ///
    /// # Safety
    /// `a`, `b`, `c` are (device pointer, leading dimension) of live device memory of this
    /// context holding `op(A)` `m × k`, `op(B)` `k × n` (elements of `dt`) and `C` `m × n` (f32)
    /// at those leading dimensions; `c` overlaps neither `a` nor `b`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm(
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
        let label = || {
            let t = |x: bool| if x { 'T' } else { 'N' };
            format!("gemm {m}x{n}x{k} {}{}", t(ta), t(tb))
        };
        // SAFETY: the caller's contract: live device pointers whose extents match (m, n, k, ld).
        self.timed(label, || unsafe {
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
            .map_err(|e| self.err(&format!("GEMM m={m} n={n} k={k} {dt:?}"), e))
        })
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
            paged: None,
        })
    }

    /// Reserves `bytes` (at least 1) of device addresses with no memory behind them: a paged
    /// [`Buf`], whose ranges get memory by [`Buf::map`]. Every access outside a mapped range
    /// is an error of the kernel that makes it.
    pub fn paged(self: &Arc<Self>, bytes: usize) -> Result<Buf> {
        let ordinal = self.ctx.ordinal() as i32;
        // SAFETY: plain C structs; every field the driver reads is set below.
        let mut prop: drv_sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
        prop.type_ = drv_sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
        prop.location.type_ = drv_sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
        prop.location.id = ordinal;
        // SAFETY: as above.
        let mut access: drv_sys::CUmemAccessDesc = unsafe { std::mem::zeroed() };
        access.location = prop.location;
        access.flags = drv_sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
        let mut page = 0usize;
        // SAFETY: `prop` is a valid allocation description; the context is current.
        unsafe {
            drv_sys::cuMemGetAllocationGranularity(
                &mut page,
                &prop,
                drv_sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_RECOMMENDED,
            )
        }
        .result()
        .map_err(|e| self.err("asking the page size of paged memory", e))?;
        let page = page.max(1);
        let n_pages = bytes.max(1).div_ceil(page);
        let mut ptr: drv_sys::CUdeviceptr = 0;
        // SAFETY: reserves addresses only; released in `Buf::drop`.
        unsafe { drv_sys::cuMemAddressReserve(&mut ptr, n_pages * page, page, 0, 0) }
            .result()
            .map_err(|e| {
                self.err(
                    &format!(
                        "reserving {:.2} GiB of addresses",
                        bytes as f64 / 1073741824.0
                    ),
                    e,
                )
            })?;
        let state = PagedState {
            pages: vec![None; n_pages],
            ..PagedState::default()
        };
        Ok(Buf {
            ptr,
            bytes,
            dev: self.clone(),
            paged: Some(Box::new(Paged {
                page,
                prop,
                access,
                state: std::sync::Mutex::new(state),
            })),
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

/// The kernel module for (`cc`, `shape`): PTX from the process's cache, the disk cache or
/// NVRTC, loaded into the current context (compiled afresh if a cached entry is refused).
fn load_module(name: &str, cc: (i32, i32), shape: KernelShape) -> Result<drv_sys::CUmodule> {
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
            device: name.to_string(),
            msg,
        })?;
        cache.insert((cc.0, cc.1, shape), p.clone());
        Ok((p, from_disk))
    };
    let load = |ptx: String| -> Result<drv_sys::CUmodule> {
        let cptx = CString::new(ptx).map_err(|e| dev_err(name, "PTX", e))?;
        // SAFETY: the context is current on this thread (CudaContext::new binds it); the
        // image is a NUL-terminated PTX string that outlives the call.
        unsafe { drv::module::load_data(cptx.as_ptr() as *const c_void) }
            .map_err(|e| dev_err(name, "loading the kernel module", e))
    };
    let (ptx, from_disk) = ptx_for(false)?;
    match load(ptx) {
        Ok(m) => Ok(m),
        // A cached entry the driver refuses (another toolkit wrote it, the disk damaged
        // it): compile afresh.
        Err(_) if from_disk => {
            eprintln!("warning: the cached kernels did not load; compiling them again");
            forget_cached(cc, shape);
            load(ptx_for(true)?.0)
        }
        Err(e) => Err(e),
    }
}

/// Looks up every kernel of `kernels` in `module` and checks its parameters.
fn load_functions(
    name: &str,
    module: drv_sys::CUmodule,
    kernels: &[KernelInfo],
) -> Result<HashMap<&'static str, drv_sys::CUfunction>> {
    let mut funcs = HashMap::new();
    for k in kernels {
        let cname = CString::new(k.name).map_err(|e| dev_err(name, "kernel name", e))?;
        // SAFETY: the module was just loaded and stays loaded while `Dev` lives.
        let f = unsafe { drv::module::get_function(module, cname) }
            .map_err(|e| dev_err(name, &format!("kernel {}", k.name), e))?;
        check_params(f, k).map_err(|msg| Error::Device {
            device: name.to_string(),
            msg,
        })?;
        funcs.insert(k.name, f);
    }
    Ok(funcs)
}

/// Checks that kernel `k` takes exactly one parameter of its struct's size (where the driver
/// can tell: `cuFuncGetParamInfo`, CUDA 12.4 and later).
fn check_params(f: drv_sys::CUfunction, k: &KernelInfo) -> std::result::Result<(), String> {
    let info = |i: usize| {
        let (mut off, mut size) = (0usize, 0usize);
        // SAFETY: a valid function handle and two out-pointers to live integers.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe {
            drv_sys::cuFuncGetParamInfo(f, i, &mut off, &mut size)
        }));
        match r {
            Ok(drv_sys::CUresult::CUDA_SUCCESS) => ParamInfo::Size(size),
            Ok(drv_sys::CUresult::CUDA_ERROR_INVALID_VALUE) => ParamInfo::Absent,
            _ => ParamInfo::Unknown,
        }
    };
    params_mismatch(k, info(0), info(1)).map_or(Ok(()), Err)
}

/// What the driver says of one parameter of a kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ParamInfo {
    /// It exists and has this many bytes.
    Size(usize),
    /// There is no such parameter.
    Absent,
    /// The driver cannot tell (too old).
    Unknown,
}

/// The load error for kernel `k` whose first two parameters are `first` and `second`, if they
/// are not one parameter of `k`'s struct size.
fn params_mismatch(k: &KernelInfo, first: ParamInfo, second: ParamInfo) -> Option<String> {
    use ParamInfo::*;
    let takes = match (first, second) {
        (Unknown, _) | (_, Unknown) => return None,
        (Size(s), Absent) if s == k.params_bytes => return None,
        (Size(s), Absent) => format!("one parameter of {s} bytes"),
        (Size(s), Size(_)) => format!("several parameters (the first of {s} bytes)"),
        (Absent, _) => "no parameter".to_string(),
    };
    Some(format!(
        "kernel {}: takes {takes}, but its launcher passes one parameter struct of {} bytes \
         (the kernel and gpu/src/ops disagree; regenerate gpu/kernels/*.cuh and rebuild)",
        k.name, k.params_bytes
    ))
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

/// A raw device allocation, freed on drop: plain (`cuMemAlloc`), or paged ([`Dev::paged`]:
/// an address range whose pages are backed only while some range on them is mapped).
pub struct Buf {
    pub ptr: u64,
    pub bytes: usize,
    dev: Arc<Dev>,
    paged: Option<Box<Paged>>,
}

/// The pages of a paged [`Buf`] (CUDA virtual memory management): the address range is
/// reserved once, and each page of `page` bytes is backed by physical memory while at least
/// one mapped range covers it ([`Buf::map`] / [`Buf::unmap`] count the ranges on each page),
/// so two neighbouring ranges that share a boundary page keep it, and its contents, while
/// either is mapped. Freed pages go to a pool and are reused; the pool never holds more than
/// the most pages mapped at once.
struct Paged {
    page: usize,
    prop: drv_sys::CUmemAllocationProp,
    access: drv_sys::CUmemAccessDesc,
    state: std::sync::Mutex<PagedState>,
}

// SAFETY: `prop`'s only pointer (`win32HandleMetaData`) is null and never read through here;
// the state is behind a mutex.
unsafe impl Send for Paged {}
// SAFETY: as above.
unsafe impl Sync for Paged {}

#[derive(Default)]
struct PagedState {
    /// The physical page behind each page of the range, and how many mapped ranges cover it.
    pages: Vec<Option<(drv_sys::CUmemGenericAllocationHandle, u32)>>,
    free: Vec<drv_sys::CUmemGenericAllocationHandle>,
    mapped: usize,
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

    /// Zeroes bytes `r` (queued on the stream).
    pub fn zero_bytes(&self, r: std::ops::Range<usize>) -> Result<()> {
        if r.start > r.end || r.end > self.bytes {
            return Err(self
                .dev
                .err("memset", format!("bytes {r:?} past {}", self.bytes)));
        }
        // SAFETY: the range lies inside this allocation.
        unsafe { drv::memset_d8_async(self.ptr + r.start as u64, 0, r.len(), self.dev.cu_stream()) }
            .map_err(|e| self.dev.err("memset", e))
    }

    /// Copies `src` to element offset `off` (synchronous w.r.t. the host buffer).
    pub fn write<T: Copy>(&self, off: usize, src: &[T]) -> Result<()> {
        self.write_staged(off, src)?;
        self.dev.sync()
    }

    /// Queues the copy of `src` to element offset `off` on the stream, after the work queued
    /// before it, without waiting for it to land. `src` is pageable memory, which the driver
    /// copies into its staging buffer before returning, so `src` may change or go right
    /// after; the work queued after the copy sees the new values.
    pub fn write_staged<T: Copy>(&self, off: usize, src: &[T]) -> Result<()> {
        self.write_on(&self.dev.stream, off, src)
    }

    /// [`Buf::write_staged`] on `stream` (of this device's context) instead of the device's
    /// own: the copy runs beside the kernels queued there, and work on another stream that
    /// reads the destination must wait for an event recorded on `stream` after it.
    pub fn write_on<T: Copy>(&self, stream: &CudaStream, off: usize, src: &[T]) -> Result<()> {
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
        // SAFETY: bounds checked above; from pageable memory the driver stages `src` before
        // returning, so it may be dropped after.
        unsafe { drv::memcpy_htod_async(self.ptr + start as u64, src, stream.cu_stream()) }
            .map_err(|e| self.dev.err("upload", e))
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

    /// Device-to-device copy of the first `bytes` of `src` to byte offset `dst_off_bytes`.
    pub fn copy_from(&self, dst_off_bytes: usize, src: &Buf, bytes: usize) -> Result<()> {
        if dst_off_bytes + bytes > self.bytes || bytes > src.bytes {
            return Err(self.dev.err("device copy", "out of bounds"));
        }
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: both ranges checked against their live allocations above.
        unsafe {
            drv::memcpy_dtod_async(
                self.ptr + dst_off_bytes as u64,
                src.ptr,
                bytes,
                self.dev.cu_stream(),
            )
        }
        .map_err(|e| self.dev.err("device copy", e))
    }
}

impl Buf {
    /// Whether this is a paged buffer ([`Dev::paged`]).
    pub fn is_paged(&self) -> bool {
        self.paged.is_some()
    }

    /// Bytes with memory behind them: all of a plain buffer, the mapped pages of a paged one.
    pub fn resident_bytes(&self) -> usize {
        match &self.paged {
            None => self.bytes,
            Some(p) => p.state.lock().unwrap_or_else(|e| e.into_inner()).mapped * p.page,
        }
    }

    /// The pages of a paged buffer that bytes `r` lie on.
    fn page_span(
        &self,
        p: &Paged,
        r: &std::ops::Range<usize>,
        op: &str,
    ) -> Result<std::ops::Range<usize>> {
        if r.start > r.end || r.end > self.bytes {
            return Err(self.dev.err(
                op,
                format!("bytes {r:?} outside a paged buffer of {}", self.bytes),
            ));
        }
        if r.is_empty() {
            return Ok(0..0);
        }
        Ok(r.start / p.page..r.end.div_ceil(p.page))
    }

    /// Gives bytes `r` of a paged buffer memory: each page they lie on is mapped (from the
    /// pool, or newly created) unless a mapped range already covers it, and counts one more
    /// range. The contents of newly mapped pages are undefined. A plain buffer: nothing to do.
    pub fn map(&self, r: std::ops::Range<usize>) -> Result<()> {
        let Some(p) = &self.paged else {
            return Ok(());
        };
        let span = self.page_span(p, &r, "mapping")?;
        let mut st = p.state.lock().unwrap_or_else(|e| e.into_inner());
        for i in span {
            if let Some((_, refs)) = &mut st.pages[i] {
                *refs += 1;
                continue;
            }
            let h = match st.free.pop() {
                Some(h) => h,
                None => {
                    let mut h = 0;
                    // SAFETY: `prop` describes device memory of this context's device.
                    unsafe { drv_sys::cuMemCreate(&mut h, p.page, &p.prop, 0) }
                        .result()
                        .map_err(|e| {
                            let (free, total) = drv::mem_get_info().unwrap_or((0, 0));
                            self.dev.err(
                                &format!(
                                    "allocating a page of {} MiB ({:.2} GiB free of {:.2} GiB)",
                                    p.page >> 20,
                                    free as f64 / 1073741824.0,
                                    total as f64 / 1073741824.0
                                ),
                                e,
                            )
                        })?;
                    h
                }
            };
            let at = self.ptr + (i * p.page) as u64;
            // SAFETY: page `i` lies inside the reserved range and is unmapped (no entry);
            // `h` is a whole page of physical memory that nothing else maps.
            if let Err(e) = unsafe { drv_sys::cuMemMap(at, p.page, 0, h, 0) }.result() {
                st.free.push(h);
                return Err(self.dev.err("mapping a page", e));
            }
            // SAFETY: `at` was mapped just above.
            if let Err(e) = unsafe { drv_sys::cuMemSetAccess(at, p.page, &p.access, 1) }.result() {
                // SAFETY: mapped above, used by nothing yet.
                let _ = unsafe { drv_sys::cuMemUnmap(at, p.page) };
                st.free.push(h);
                return Err(self.dev.err("making a page accessible", e));
            }
            st.pages[i] = Some((h, 1));
            st.mapped += 1;
        }
        Ok(())
    }

    /// Takes back one [`Buf::map`] of bytes `r`: a page no mapped range covers any more is
    /// unmapped and goes to the pool. The caller first waits for every kernel that uses it
    /// ([`Dev::sync`]). A plain buffer: nothing to do.
    pub fn unmap(&self, r: std::ops::Range<usize>) -> Result<()> {
        let Some(p) = &self.paged else {
            return Ok(());
        };
        let span = self.page_span(p, &r, "unmapping")?;
        let mut st = p.state.lock().unwrap_or_else(|e| e.into_inner());
        for i in span {
            let Some((h, refs)) = &mut st.pages[i] else {
                return Err(self.dev.err("unmapping", format!("page {i} is not mapped")));
            };
            *refs -= 1;
            if *refs > 0 {
                continue;
            }
            let h = *h;
            // SAFETY: page `i` was mapped by `map` and no range covers it any more.
            unsafe { drv_sys::cuMemUnmap(self.ptr + (i * p.page) as u64, p.page) }
                .result()
                .map_err(|e| self.dev.err("unmapping a page", e))?;
            st.pages[i] = None;
            st.free.push(h);
            st.mapped -= 1;
        }
        Ok(())
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        let _ = self.dev.ctx.bind_to_thread();
        match &self.paged {
            // SAFETY: allocated by `malloc_sync`, freed once.
            None => unsafe {
                let _ = drv::free_sync(self.ptr);
            },
            Some(p) => {
                let _ = self.dev.sync();
                let st = p.state.lock().unwrap_or_else(|e| e.into_inner());
                // SAFETY: every mapped page is unmapped and every page released once, then
                // the reserved range is freed; no kernel runs (synchronised above).
                unsafe {
                    for (i, e) in st.pages.iter().enumerate() {
                        if let Some((h, _)) = e {
                            let _ = drv_sys::cuMemUnmap(self.ptr + (i * p.page) as u64, p.page);
                            let _ = drv_sys::cuMemRelease(*h);
                        }
                    }
                    for h in &st.free {
                        let _ = drv_sys::cuMemRelease(*h);
                    }
                    let _ = drv_sys::cuMemAddressFree(self.ptr, st.pages.len() * p.page);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{params_mismatch, ParamInfo};
    use crate::params::{info, kernel_params, KernelInfo, Ptr, PtrMut};

    kernel_params! {
        /// A kernel's parameters as the launcher has them.
        AdamwF32 => ["adamw_f32"] {
            p: PtrMut<f32>,
            g: Ptr<f32>,
            n: i64,
            clip: i32,
            clip_c: f32,
        }
    }

    fn adamw() -> KernelInfo {
        info::<AdamwF32>().next().unwrap()
    }

    #[test]
    fn a_kernel_taking_its_struct_passes_the_load_check() {
        let k = adamw();
        let size = std::mem::size_of::<AdamwF32>();
        assert_eq!(
            params_mismatch(&k, ParamInfo::Size(size), ParamInfo::Absent),
            None
        );
        // A driver that cannot tell checks nothing.
        assert_eq!(
            params_mismatch(&k, ParamInfo::Unknown, ParamInfo::Unknown),
            None
        );
    }

    #[test]
    fn a_wrong_parameter_list_fails_the_load_naming_the_kernel() {
        let k = adamw();
        let size = std::mem::size_of::<AdamwF32>();
        for (first, second) in [
            // One field too many or too few in the kernel's struct.
            (ParamInfo::Size(size + 4), ParamInfo::Absent),
            (ParamInfo::Size(size - 8), ParamInfo::Absent),
            // The old positional signature.
            (ParamInfo::Size(8), ParamInfo::Size(8)),
            (ParamInfo::Absent, ParamInfo::Absent),
        ] {
            let msg = params_mismatch(&k, first, second).expect("a mismatch");
            assert!(msg.starts_with("kernel adamw_f32: takes "), "{msg}");
            assert!(msg.contains(&format!("{size} bytes")), "{msg}");
        }
    }
}

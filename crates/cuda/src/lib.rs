//! The CUDA backend: `cudarc` with dynamic loading (builds with no CUDA
//! toolkit), kernels from `kernels/cuda/*.cu` compiled at run time by NVRTC
//! straight to a cubin for the device (`sm_XX`), cached per device.
//!
//! - f32, f16 and bf16 (bf16 needs sm_80 or newer); accumulation in f32.
//! - Grouped matmul picks its kernel from the rows per expert, known on the
//!   host ([`launch::choose_gemm`]): up to 2 (a dense f32 GEMM such as the
//!   router's: 512) a rows kernel (CUDA cores) that streams each weight row
//!   once per 8 rows; above that, f16/bf16 with K % 8 == 0 run WMMA
//!   tensor-core tiles of 32 rows (up to 32 rows per expert) or 128 rows, and
//!   f32 or other K run 64x64 tiles. `MOE_CUDA_GEMM` forces one.
//! - Every kernel is launched on one stream with grid sizes from upper
//!   bounds; expert counts and offsets stay on the device, so a layer
//!   forward never synchronises with the host. Correction biases and the
//!   router's offsets are uploaded once and kept on the device, so a warm
//!   forward makes no host-to-device copy. Capturing it in a CUDA graph needs
//!   one more step, not taken yet: the stream is the context's default
//!   (legacy) stream, which CUDA does not capture; an owned stream
//!   (`CudaContext::new_stream`) would be, and needs a GPU to test.
//! - Compute capability 7.5 or newer (NVRTC 13); bf16 needs 8.0.
//! - Without a driver, NVRTC or the CUDA headers, [`CudaBackend::new`] returns
//!   `BackendUnavailable` saying which is missing; nothing panics (the probe
//!   checks the libraries before cudarc touches them, and initialisation runs
//!   under `catch_unwind` as a second guard).
//! - Ids `>= E` given to `permute` are dropped (slot `u32::MAX`) rather than
//!   reported: checking them would need a read-back.

mod compile;
pub mod launch;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use moe_hal_core::{
    check, Activation, Backend, Capabilities, CombineShape, DType, DeviceBuffer, GemmShape, HostSlice, HostVec,
    MoeError, PermuteShape, Permuted, Result, RouterShape, RouterSpec,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

const NAME: &str = "cuda";

fn dev_err(e: impl std::fmt::Debug) -> MoeError {
    MoeError::Device {
        backend: NAME.into(),
        message: format!("{e:?}"),
    }
}

enum Data {
    F32(CudaSlice<f32>),
    /// bf16 or f16 bits.
    B16(CudaSlice<u16>),
    U32(CudaSlice<u32>),
}

/// A device buffer. Holds at least one element so that empty buffers are valid allocations.
pub struct CudaBuffer {
    data: Data,
    dtype: DType,
    len: usize,
    /// The ordinal of the device it lives on: another device cannot read it (its memory pool
    /// grants no peer access), and a kernel that tried would leave that device's context
    /// unusable for the rest of the process, so every call checks it ([`CudaBackend::mine`]).
    device: usize,
}

impl DeviceBuffer for CudaBuffer {
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn len(&self) -> usize {
        self.len
    }
}

impl CudaBuffer {
    fn f32(&self) -> &CudaSlice<f32> {
        match &self.data {
            Data::F32(s) => s,
            _ => unreachable!("dtype checked before"),
        }
    }
    fn f32_mut(&mut self) -> &mut CudaSlice<f32> {
        match &mut self.data {
            Data::F32(s) => s,
            _ => unreachable!("dtype checked before"),
        }
    }
    fn u32(&self) -> &CudaSlice<u32> {
        match &self.data {
            Data::U32(s) => s,
            _ => unreachable!("dtype checked before"),
        }
    }
    fn u32_mut(&mut self) -> &mut CudaSlice<u32> {
        match &mut self.data {
            Data::U32(s) => s,
            _ => unreachable!("dtype checked before"),
        }
    }
}

/// A tensor-core grouped_matmul kernel in f16 and bf16 (sm_80 and newer) and the dynamic shared memory it
/// takes: 4 pipeline stages where the device lets a block opt in to that much, else 2 (under 48 KiB).
struct TcKernels {
    f16: CudaFunction,
    bf16: Option<CudaFunction>,
    smem: u32,
}

/// The grouped_matmul kernels of one dtype that [`launch::choose_gemm`] picks from; tensor-core entries are
/// the kernel and its shared memory (`None` for f32, which choose_gemm never sends to them).
struct GemmKernels<'a> {
    rows: &'a CudaFunction,
    tc: Option<(&'a CudaFunction, u32)>,
    tc32: Option<(&'a CudaFunction, u32)>,
    tiles: &'a CudaFunction,
}

struct Kernels {
    route: CudaFunction,
    topk: CudaFunction,
    chunk_counts: CudaFunction,
    scan: CudaFunction,
    scatter: CudaFunction,
    gather_b32: CudaFunction,
    gather_b16: CudaFunction,
    gmm_f32: CudaFunction,
    gmm_f16: CudaFunction,
    gmm_bf16: Option<CudaFunction>,
    gmm_rows_f32: CudaFunction,
    gmm_rows_f16: CudaFunction,
    gmm_rows_bf16: CudaFunction,
    /// Tensor-core kernels with 128- and 32-row tiles.
    gmm_tc: TcKernels,
    gmm_tc32: TcKernels,
    cast_f16: CudaFunction,
    cast_bf16: CudaFunction,
    combine_f32: CudaFunction,
    combine_f16: CudaFunction,
    combine_bf16: CudaFunction,
}

/// Correction biases kept on the device ([`CudaBackend::device_bias`]): more than any public
/// model's MoE layers (DeepSeek-V3 58, Kimi-K2 60).
const BIAS_CACHE: usize = 128;
/// Router offsets kept per token count before the cache starts over.
const ROUTER_OFFSETS_CACHE: usize = 64;

/// A host bias and its device copy.
type BiasEntry = (Vec<f32>, Arc<CudaSlice<f32>>);

struct Device {
    /// Correction biases already on the device (a layer routes with the same one every call), so that
    /// a warm forward makes no host-to-device copy and can be captured in a CUDA graph.
    biases: Mutex<Vec<BiasEntry>>,
    /// `[0, T]` offsets of the router GEMM, per token count.
    router_offsets: Mutex<HashMap<usize, Arc<CudaSlice<u32>>>>,
    stream: Arc<CudaStream>,
    kernels: Kernels,
    gemm_policy: launch::GemmPolicy,
    /// The device's ordinal, which its buffers carry.
    ordinal: usize,
    name: String,
    arch: (i32, i32),
    total_mem: usize,
    /// What [`Backend::capabilities`] returns, built once: every kernel call checks against it.
    caps: Capabilities,
}

/// The CUDA backend on one device. Cheap to clone.
#[derive(Clone)]
pub struct CudaBackend {
    dev: Arc<Device>,
}

/// Devices initialised so far (kernels compiled once per device).
fn cache() -> &'static Mutex<HashMap<usize, Arc<Device>>> {
    static CACHE: OnceLock<Mutex<HashMap<usize, Arc<Device>>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Why CUDA cannot run here, checked without letting cudarc panic.
pub fn probe_libraries() -> std::result::Result<std::path::PathBuf, String> {
    // SAFETY: only tries to dlopen the driver library by its usual names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("the NVIDIA driver library (libcuda.so) was not found: no NVIDIA driver on this machine".into());
    }
    // SAFETY: as above, for libnvrtc.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(
            "NVRTC (libnvrtc.so.13) was not found: put the folder holding it (for PyPI wheels \
                    site-packages/nvidia/cu13/lib) on LD_LIBRARY_PATH before starting the process"
                .into(),
        );
    }
    compile::find_include_dir().ok_or_else(|| {
        "the CUDA headers (cuda_bf16.h, cuda_fp16.h, mma.h) were not found: set MOE_CUDA_INCLUDE or CUDA_HOME, \
         or install nvidia-cuda-runtime and nvidia-cuda-crt next to NVRTC"
            .to_string()
    })
}

/// The oldest driver (CUDA 13.0, as `cuDriverGetVersion` counts) that runs what NVRTC 13 compiles and
/// has every entry point the backend calls (cudarc's `cuda-13000` bindings).
const MIN_DRIVER: i32 = 13000;

/// Why a driver of `version` cannot run the backend, if it cannot.
fn driver_too_old(version: i32) -> Option<String> {
    (version < MIN_DRIVER).then(|| {
        format!(
            "the NVIDIA driver supports CUDA {}.{}; the kernels NVRTC 13 compiles need a driver for CUDA {}.{} or newer",
            version / 1000,
            version % 1000 / 10,
            MIN_DRIVER / 1000,
            MIN_DRIVER % 1000 / 10
        )
    })
}

fn init_device(ordinal: usize) -> Result<Device> {
    let include = probe_libraries().map_err(|why| MoeError::unavailable(NAME, why))?;
    let mut version = 0;
    // SAFETY: the probe found libcuda; cuDriverGetVersion (in every driver) writes one int and needs no
    // context. An older driver would load the cubins with an error and panic at a missing newer entry
    // point (cudarc looks symbols up at first call), so it is reported here instead.
    let got = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) };
    if got != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
        return Err(MoeError::unavailable(
            NAME,
            format!("cuDriverGetVersion failed: {got:?}"),
        ));
    }
    if let Some(why) = driver_too_old(version) {
        return Err(MoeError::unavailable(NAME, why));
    }
    let ctx = CudaContext::new(ordinal)
        .map_err(|e| MoeError::unavailable(NAME, format!("no CUDA device {ordinal}: {e:?}")))?;
    let (major, minor) = ctx.compute_capability().map_err(dev_err)?;
    if (major, minor) < (7, 5) {
        return Err(MoeError::unavailable(
            NAME,
            format!("compute capability {major}.{minor}; NVRTC 13 and the WMMA kernels need 7.5 or newer"),
        ));
    }
    let gemm_policy = launch::GemmPolicy::parse(std::env::var("MOE_CUDA_GEMM").ok().as_deref())
        .map_err(|why| MoeError::unavailable(NAME, why))?;
    let arch = format!("sm_{major}{minor}");
    let mut modules: HashMap<&str, Arc<CudaModule>> = HashMap::new();
    for (name, src) in compile::SOURCES {
        let cubin = compile::compile_cubin(name, src, &arch, &include)?;
        modules.insert(name, ctx.load_module(Ptx::from_binary(cubin)).map_err(dev_err)?);
    }
    let f = |module: &str, func: &str| -> Result<CudaFunction> { modules[module].load_function(func).map_err(dev_err) };
    // Four pipeline stages need an opt-in above 48 KiB of shared memory; where the device refuses, two.
    let tc = |tile: u32, four: [&str; 2], two: [&str; 2]| -> Result<TcKernels> {
        use cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as MAX_SMEM;
        let smem = launch::tc_smem(4, tile);
        let bf16 = major >= 8;
        // Loading errors are errors; only a refused opt-in selects the 2-stage kernels.
        let f16_4 = f("grouped_matmul.cu", four[0])?;
        let bf16_4 = if bf16 {
            Some(f("grouped_matmul.cu", four[1])?)
        } else {
            None
        };
        let opted_in = f16_4.set_attribute(MAX_SMEM, smem as i32).is_ok()
            && bf16_4
                .as_ref()
                .is_none_or(|b| b.set_attribute(MAX_SMEM, smem as i32).is_ok());
        if opted_in {
            return Ok(TcKernels {
                f16: f16_4,
                bf16: bf16_4,
                smem,
            });
        }
        Ok(TcKernels {
            f16: f("grouped_matmul.cu", two[0])?,
            bf16: if bf16 {
                Some(f("grouped_matmul.cu", two[1])?)
            } else {
                None
            },
            smem: launch::tc_smem(2, tile),
        })
    };
    let gmm_tc = tc(
        128,
        ["grouped_matmul_tc_f16", "grouped_matmul_tc_bf16"],
        ["grouped_matmul_tc2_f16", "grouped_matmul_tc2_bf16"],
    )?;
    let gmm_tc32 = tc(
        32,
        ["grouped_matmul_tc32_f16", "grouped_matmul_tc32_bf16"],
        ["grouped_matmul_tc2_32_f16", "grouped_matmul_tc2_32_bf16"],
    )?;
    let kernels = Kernels {
        route: f("route.cu", "route")?,
        topk: f("topk.cu", "topk")?,
        chunk_counts: f("permute.cu", "permute_chunk_counts")?,
        scan: f("permute.cu", "permute_scan")?,
        scatter: f("permute.cu", "permute_scatter")?,
        gather_b32: f("permute.cu", "permute_gather_b32")?,
        gather_b16: f("permute.cu", "permute_gather_b16")?,
        gmm_f32: f("grouped_matmul.cu", "grouped_matmul_f32")?,
        gmm_f16: f("grouped_matmul.cu", "grouped_matmul_f16")?,
        gmm_bf16: if major >= 8 {
            Some(f("grouped_matmul.cu", "grouped_matmul_bf16")?)
        } else {
            None
        },
        gmm_rows_f32: f("grouped_matmul.cu", "grouped_matmul_rows_f32")?,
        gmm_rows_f16: f("grouped_matmul.cu", "grouped_matmul_rows_f16")?,
        gmm_rows_bf16: f("grouped_matmul.cu", "grouped_matmul_rows_bf16")?,
        gmm_tc,
        gmm_tc32,
        cast_f16: f("grouped_matmul.cu", "cast_f16_f32")?,
        cast_bf16: f("grouped_matmul.cu", "cast_bf16_f32")?,
        combine_f32: f("combine.cu", "combine_f32")?,
        combine_f16: f("combine.cu", "combine_f16")?,
        combine_bf16: f("combine.cu", "combine_bf16")?,
    };
    let total_mem = ctx.total_mem().unwrap_or(0);
    let floats: &[DType] = if kernels.gmm_bf16.is_some() {
        &[DType::F32, DType::BF16, DType::F16]
    } else {
        &[DType::F32, DType::F16]
    };
    let caps = Capabilities::with_floats(floats, total_mem as u64, launch::MAX_EXPERTS, launch::MAX_TOP_K);
    Ok(Device {
        biases: Mutex::new(Vec::new()),
        router_offsets: Mutex::new(HashMap::new()),
        stream: ctx.default_stream(),
        name: ctx.name().unwrap_or_else(|_| "NVIDIA GPU".into()),
        total_mem,
        caps,
        arch: (major, minor),
        kernels,
        gemm_policy,
        ordinal,
    })
}

impl CudaBackend {
    /// The first device.
    pub fn new() -> Result<Self> {
        Self::on_device(0)
    }

    /// Device `ordinal`: checks the libraries, creates the context, compiles the kernels (once per device).
    pub fn on_device(ordinal: usize) -> Result<Self> {
        let mut cache = cache().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(dev) = cache.get(&ordinal) {
            return Ok(CudaBackend { dev: dev.clone() });
        }
        let dev = std::panic::catch_unwind(|| init_device(ordinal)).unwrap_or_else(|p| {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
            Err(MoeError::unavailable(
                NAME,
                format!("CUDA initialisation failed: {}", msg.unwrap_or_default()),
            ))
        })?;
        let dev = Arc::new(dev);
        cache.insert(ordinal, dev.clone());
        Ok(CudaBackend { dev })
    }

    fn stream(&self) -> &Arc<CudaStream> {
        &self.dev.stream
    }

    fn caps(&self) -> &Capabilities {
        &self.dev.caps
    }
}

fn cfg(grid: (u32, u32), block: u32, smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0, grid.1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: smem,
    }
}

/// `v` as a grid's x dimension (at most 2^31 - 1 blocks) or a kernel's 32-bit loop bound, whose
/// `+= blockDim.x` would wrap near 2^32: an `Unsupported` error past that instead of a raw launch
/// error or a loop that never ends.
fn grid_u32(what: &str, v: usize) -> Result<u32> {
    if v > i32::MAX as usize {
        return Err(MoeError::unsupported(
            NAME,
            format!("{what} = {v}"),
            "at most 2^31 - 1 (a CUDA grid's x dimension and the kernels' 32-bit counters)",
        ));
    }
    Ok(v as u32)
}

impl Backend for CudaBackend {
    type Buffer = CudaBuffer;

    fn name(&self) -> &'static str {
        NAME
    }

    fn device_name(&self) -> String {
        let (a, b) = self.dev.arch;
        let k = &self.dev.kernels;
        let stages = |smem: u32, rows: u32| if smem == launch::tc_smem(4, rows) { 4 } else { 2 };
        format!(
            "{} (sm_{a}{b}, {} MiB); tensor-core tiles with a {}-stage pipeline (128 rows) and {}-stage (32 rows); \
             device clock: CUDA events",
            self.dev.name,
            self.dev.total_mem >> 20,
            stages(k.gmm_tc.smem, 128),
            stages(k.gmm_tc32.smem, 32),
        )
    }

    fn capabilities(&self) -> Capabilities {
        self.dev.caps.clone()
    }

    fn alloc(&self, dtype: DType, len: usize) -> Result<CudaBuffer> {
        // cudarc multiplies len by the element size unchecked: a product past usize would wrap to
        // a small allocation whose buffer still claims `len`. Nothing larger than the device's
        // memory can be allocated anyway.
        let max = self.dev.total_mem;
        if len.checked_mul(dtype.size()).is_none_or(|b| max > 0 && b > max) {
            return Err(MoeError::unsupported(
                NAME,
                format!("a buffer of {len} {dtype} elements"),
                format!("this device has {max} bytes of memory"),
            ));
        }
        let n = len.max(1);
        let s = self.stream();
        let data = match dtype {
            DType::F32 => Data::F32(s.alloc_zeros::<f32>(n).map_err(dev_err)?),
            DType::BF16 | DType::F16 => Data::B16(s.alloc_zeros::<u16>(n).map_err(dev_err)?),
            DType::U32 => Data::U32(s.alloc_zeros::<u32>(n).map_err(dev_err)?),
        };
        Ok(CudaBuffer {
            data,
            dtype,
            len,
            device: self.dev.ordinal,
        })
    }

    fn upload(&self, data: HostSlice<'_>) -> Result<CudaBuffer> {
        let mut b = self.alloc(data.dtype(), data.len())?;
        self.write(&mut b, data)?;
        Ok(b)
    }

    fn write(&self, buf: &mut CudaBuffer, data: HostSlice<'_>) -> Result<()> {
        self.mine(&[("write destination", buf)])?;
        check::buffer("write destination", buf, data.dtype(), data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        let s = self.stream();
        match (&mut buf.data, data) {
            (Data::F32(d), HostSlice::F32(v)) => s.memcpy_htod(v, &mut d.slice_mut(..v.len())),
            (Data::B16(d), HostSlice::BF16(v)) => {
                let bits: Vec<u16> = v.iter().map(|x| x.to_bits()).collect();
                s.memcpy_htod(&bits, &mut d.slice_mut(..bits.len()))
            }
            (Data::B16(d), HostSlice::F16(v)) => {
                let bits: Vec<u16> = v.iter().map(|x| x.to_bits()).collect();
                s.memcpy_htod(&bits, &mut d.slice_mut(..bits.len()))
            }
            (Data::U32(d), HostSlice::U32(v)) => s.memcpy_htod(v, &mut d.slice_mut(..v.len())),
            _ => unreachable!("dtype checked above"),
        }
        .map_err(dev_err)
    }

    fn download(&self, buf: &CudaBuffer) -> Result<HostVec> {
        self.mine(&[("download source", buf)])?;
        let s = self.stream();
        let n = buf.len;
        Ok(match (&buf.data, buf.dtype) {
            (Data::F32(d), _) => HostVec::F32(s.clone_dtoh(&d.slice(..n)).map_err(dev_err)?),
            (Data::U32(d), _) => HostVec::U32(s.clone_dtoh(&d.slice(..n)).map_err(dev_err)?),
            (Data::B16(d), DType::BF16) => HostVec::BF16(
                s.clone_dtoh(&d.slice(..n))
                    .map_err(dev_err)?
                    .into_iter()
                    .map(half::bf16::from_bits)
                    .collect(),
            ),
            (Data::B16(d), _) => HostVec::F16(
                s.clone_dtoh(&d.slice(..n))
                    .map_err(dev_err)?
                    .into_iter()
                    .map(half::f16::from_bits)
                    .collect(),
            ),
        })
    }

    fn synchronize(&self) -> Result<()> {
        self.stream().synchronize().map_err(dev_err)
    }

    /// CUDA events with timing enabled, recorded on the backend's one stream before and after `f`.
    fn device_time_ms(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<Option<f64>> {
        // CU_EVENT_DEFAULT: timing on (cudarc's default, CU_EVENT_DISABLE_TIMING, cannot be timed).
        let timed = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.stream().record_event(timed).map_err(dev_err)?;
        f()?;
        let end = self.stream().record_event(timed).map_err(dev_err)?;
        // Waits for both events, then reads the time between them.
        let ms = start.elapsed_ms(&end).map_err(dev_err)?;
        Ok(Some(ms as f64))
    }

    fn router_logits(
        &self,
        hidden: &CudaBuffer,
        weight: &CudaBuffer,
        logits: &mut CudaBuffer,
        s: RouterShape,
    ) -> Result<()> {
        self.mine(&[("hidden", hidden), ("router weight", weight), ("logits", logits)])?;
        check::router_logits(NAME, self.caps(), hidden, weight, logits, s)?;
        if s.tokens == 0 {
            return Ok(());
        }
        let n = s.tokens * s.hidden;
        // The router runs in f32: widen half-precision activations first.
        let widened;
        let x: &CudaSlice<f32> = match &hidden.data {
            Data::F32(d) => d,
            Data::B16(d) => {
                // SAFETY: unset memory is never read: the cast below writes all n floats first (zeroing
                // would be one more pass over T * H floats a call).
                let mut out = unsafe { self.stream().alloc::<f32>(n) }.map_err(dev_err)?;
                let f = if hidden.dtype == DType::BF16 {
                    &self.dev.kernels.cast_bf16
                } else {
                    &self.dev.kernels.cast_f16
                };
                let mut b = self.stream().launch_builder(f);
                b.arg(d).arg(&mut out).arg(&n);
                // SAFETY: `d` holds n elements (checked), `out` n floats; the kernel reads/writes below n.
                unsafe { b.launch(cfg((launch::elementwise_blocks(n, 256), 1), 256, 0)) }.map_err(dev_err)?;
                widened = out;
                &widened
            }
            Data::U32(_) => unreachable!("dtype checked before"),
        };
        let offsets = self.router_offsets(s.tokens)?;
        let shape = s.as_gemm();
        self.gemm_f32(x, &offsets, weight.f32(), logits.f32_mut(), shape)
    }

    fn route(
        &self,
        logits: &CudaBuffer,
        spec: &RouterSpec,
        tokens: usize,
        ids: &mut CudaBuffer,
        weights: &mut CudaBuffer,
    ) -> Result<()> {
        self.mine(&[("logits", logits), ("ids", ids), ("weights", weights)])?;
        check::route(NAME, self.caps(), logits, spec, tokens, ids, weights)?;
        let a = launch::route_args(spec, tokens)?;
        if tokens == 0 {
            return Ok(());
        }
        grid_u32("tokens", tokens)?;
        let bias = self.device_bias(spec.correction_bias.as_deref().unwrap_or(&[0.0]))?;
        let mut b = self.stream().launch_builder(&self.dev.kernels.route);
        b.arg(logits.f32())
            .arg(&*bias)
            .arg(ids.u32_mut())
            .arg(weights.f32_mut());
        b.arg(&a.tokens)
            .arg(&a.experts)
            .arg(&a.top_k)
            .arg(&a.n_group)
            .arg(&a.topk_group)
            .arg(&a.group_score);
        b.arg(&a.scoring)
            .arg(&a.has_bias)
            .arg(&a.renorm)
            .arg(&a.eps)
            .arg(&a.scale);
        // SAFETY: buffers checked to hold T*E logits and T*k ids/weights; bias holds E floats when has_bias;
        // shared memory sized for (3E + 2 n_group) floats as the kernel indexes it.
        unsafe { b.launch(cfg((a.tokens, 1), launch::ROUTE_THREADS, a.shared_mem_bytes)) }.map_err(dev_err)?;
        Ok(())
    }

    fn topk(
        &self,
        values: &CudaBuffer,
        rows: usize,
        cols: usize,
        k: usize,
        ids: &mut CudaBuffer,
        out: &mut CudaBuffer,
    ) -> Result<()> {
        self.mine(&[("values", values), ("ids", ids), ("out", out)])?;
        check::topk(NAME, self.caps(), values, rows, cols, k, ids, out)?;
        // One byte of dynamic shared memory per column, beside 256 bytes of static scratch.
        if cols.saturating_add(256) > launch::MAX_DYNAMIC_SMEM {
            let most = launch::MAX_DYNAMIC_SMEM - 256;
            return Err(MoeError::unsupported(
                NAME,
                format!("topk over {cols} columns"),
                format!("at most {most} columns"),
            ));
        }
        if rows == 0 {
            return Ok(());
        }
        let (r, c, kk) = (grid_u32("rows", rows)?, cols as u32, k as u32);
        let mut b = self.stream().launch_builder(&self.dev.kernels.topk);
        b.arg(values.f32())
            .arg(ids.u32_mut())
            .arg(out.f32_mut())
            .arg(&r)
            .arg(&c)
            .arg(&kk);
        // SAFETY: rows*cols values and rows*k outputs checked; cols bytes of shared memory.
        unsafe { b.launch(cfg((r, 1), launch::ROUTE_THREADS, c)) }.map_err(dev_err)?;
        Ok(())
    }

    fn permute(
        &self,
        hidden: &CudaBuffer,
        ids: &CudaBuffer,
        s: PermuteShape,
        out: &mut Permuted<CudaBuffer>,
    ) -> Result<()> {
        self.mine(&[("hidden", hidden), ("ids", ids)])?;
        self.mine(&out.named())?;
        check::permute(NAME, self.caps(), hidden, ids, s, out)?;
        let n = s.tokens * s.top_k;
        let (n32, e32) = (n as u32, grid_u32("experts", s.experts)?);
        let chunks = launch::permute_chunks(n);
        let scratch_len = chunks.max(1) * s.experts;
        let st = self.stream();
        // SAFETY: unset memory is never read: with chunks > 0, permute_chunk_counts writes all chunks * E
        // counts and permute_scan all chunks * E bases before any read; with none, the scan reads neither.
        let mut chunk_counts = unsafe { st.alloc::<u32>(scratch_len) }.map_err(dev_err)?;
        // SAFETY: as above.
        let mut chunk_base = unsafe { st.alloc::<u32>(scratch_len) }.map_err(dev_err)?;
        let k = &self.dev.kernels;
        let c32 = chunks as u32;
        if chunks > 0 {
            let mut b = st.launch_builder(&k.chunk_counts);
            b.arg(ids.u32()).arg(&n32).arg(&e32).arg(&mut chunk_counts);
            // SAFETY: n ids checked; chunk_counts holds chunks*E.
            unsafe { b.launch(cfg((c32, 1), 256, 0)) }.map_err(dev_err)?;
        }
        // The scan runs even for T = 0 so that counts and offsets are zeroed.
        let mut b = st.launch_builder(&k.scan);
        b.arg(&chunk_counts)
            .arg(&c32)
            .arg(&e32)
            .arg(out.counts.u32_mut())
            .arg(out.offsets.u32_mut())
            .arg(&mut chunk_base);
        // SAFETY: counts holds E, offsets E + 1, chunk arrays chunks*E (checked/allocated above).
        unsafe { b.launch(cfg((1, 1), 1024, 0)) }.map_err(dev_err)?;
        if chunks == 0 {
            return Ok(());
        }
        let mut b = st.launch_builder(&k.scatter);
        b.arg(ids.u32())
            .arg(&n32)
            .arg(&e32)
            .arg(&chunk_base)
            .arg(out.slot_of.u32_mut())
            .arg(out.source_of.u32_mut());
        // SAFETY: slot_of and source_of hold n (checked); slots written are < offsets[E] <= n.
        unsafe { b.launch(cfg((c32, 1), 256, 0)) }.map_err(dev_err)?;
        let (h32, k32) = (launch::to_u32("hidden", s.hidden)?, s.top_k as u32);
        let blocks = launch::elementwise_blocks(n * s.hidden, 256);
        let (source_of, offsets) = (out.source_of.u32(), out.offsets.u32());
        macro_rules! gather {
            ($f:expr, $x:expr, $r:expr) => {{
                let mut b = st.launch_builder($f);
                b.arg($x)
                    .arg(source_of)
                    .arg(offsets)
                    .arg(&e32)
                    .arg(&n32)
                    .arg(&h32)
                    .arg(&k32)
                    .arg($r);
                // SAFETY: rows holds n*H (checked); reads hidden rows < T (source_of < n).
                unsafe { b.launch(cfg((blocks, 1), 256, 0)) }.map_err(dev_err)?;
            }};
        }
        match (&hidden.data, &mut out.rows.data) {
            (Data::F32(x), Data::F32(r)) => gather!(&k.gather_b32, x, r),
            (Data::B16(x), Data::B16(r)) => gather!(&k.gather_b16, x, r),
            _ => unreachable!("dtypes checked before"),
        }
        Ok(())
    }

    fn grouped_matmul(
        &self,
        input: &CudaBuffer,
        offsets: &CudaBuffer,
        weight: &CudaBuffer,
        output: &mut CudaBuffer,
        s: GemmShape,
    ) -> Result<()> {
        self.mine(&[
            ("input", input),
            ("offsets", offsets),
            ("weight", weight),
            ("output", output),
        ])?;
        check::grouped_matmul(NAME, self.caps(), input, offsets, weight, output, s)?;
        match (&input.data, &weight.data, &mut output.data) {
            (Data::F32(x), Data::F32(w), Data::F32(y)) => self.gemm_f32(x, offsets.u32(), w, y, s),
            (Data::B16(x), Data::B16(w), Data::B16(y)) => {
                let k = &self.dev.kernels;
                let bf16 = input.dtype == DType::BF16;
                let no_bf16 =
                    || MoeError::unsupported(NAME, "bf16 grouped_matmul", "bf16 tensor cores need sm_80 or newer");
                let kernels = if bf16 {
                    GemmKernels {
                        rows: &k.gmm_rows_bf16,
                        tc: Some((k.gmm_tc.bf16.as_ref().ok_or_else(no_bf16)?, k.gmm_tc.smem)),
                        tc32: Some((k.gmm_tc32.bf16.as_ref().ok_or_else(no_bf16)?, k.gmm_tc32.smem)),
                        tiles: k.gmm_bf16.as_ref().ok_or_else(no_bf16)?,
                    }
                } else {
                    GemmKernels {
                        rows: &k.gmm_rows_f16,
                        tc: Some((&k.gmm_tc.f16, k.gmm_tc.smem)),
                        tc32: Some((&k.gmm_tc32.f16, k.gmm_tc32.smem)),
                        tiles: &k.gmm_f16,
                    }
                };
                self.gemm_launch(kernels, true, x, offsets.u32(), w, y, s)
            }
            _ => unreachable!("dtypes checked before"),
        }
    }

    fn combine(
        &self,
        expert_out: &CudaBuffer,
        ids: &CudaBuffer,
        weights: &CudaBuffer,
        slot_of: &CudaBuffer,
        output: &mut CudaBuffer,
        s: CombineShape,
    ) -> Result<()> {
        self.mine(&[
            ("expert_out", expert_out),
            ("ids", ids),
            ("weights", weights),
            ("slot_of", slot_of),
            ("output", output),
        ])?;
        check::combine(NAME, self.caps(), expert_out, ids, weights, slot_of, output, s)?;
        if s.tokens == 0 || s.hidden == 0 {
            return Ok(());
        }
        // k ints of shared memory per block.
        if s.top_k > launch::MAX_DYNAMIC_SMEM / 4 {
            return Err(MoeError::unsupported(
                NAME,
                format!("combine with top_k = {}", s.top_k),
                format!("top_k at most {}", launch::MAX_DYNAMIC_SMEM / 4),
            ));
        }
        let (t, h, k) = (
            grid_u32("tokens", s.tokens)?,
            grid_u32("hidden", s.hidden)?,
            s.top_k as u32,
        );
        let acc = s.accumulate as u32;
        // Slots past u32 are never written (slot_of is u32), so a longer buffer counts as u32::MAX rows.
        let n_rows = (expert_out.len / s.hidden).min(u32::MAX as usize) as u32;
        let kern = &self.dev.kernels;
        let st = self.stream();
        let smem = k * 4;
        macro_rules! go {
            ($f:expr, $y:expr, $o:expr) => {{
                let mut b = st.launch_builder($f);
                b.arg($y)
                    .arg(ids.u32())
                    .arg(weights.f32())
                    .arg(slot_of.u32())
                    .arg($o);
                b.arg(&t).arg(&h).arg(&k).arg(&acc).arg(&n_rows);
                // SAFETY: all lengths checked; slots >= n_rows are skipped by the kernel; k ints of shared memory.
                unsafe { b.launch(cfg((t, 1), 128, smem)) }.map_err(dev_err)?;
            }};
        }
        match (&expert_out.data, &mut output.data, output.dtype) {
            (Data::F32(y), Data::F32(o), _) => go!(&kern.combine_f32, y, o),
            (Data::B16(y), Data::B16(o), DType::BF16) => go!(&kern.combine_bf16, y, o),
            (Data::B16(y), Data::B16(o), _) => go!(&kern.combine_f16, y, o),
            _ => unreachable!("dtypes checked before"),
        }
        Ok(())
    }
}

impl CudaBackend {
    /// Refuses buffers made on another device (by a backend of another ordinal).
    fn mine(&self, bufs: &[(&str, &CudaBuffer)]) -> Result<()> {
        match bufs.iter().find(|(_, b)| b.device != self.dev.ordinal) {
            Some((what, b)) => Err(MoeError::unsupported(
                NAME,
                format!("{what} from CUDA device {} on device {}", b.device, self.dev.ordinal),
                "a buffer belongs to the device of the backend that made it; upload it to this one",
            )),
            None => Ok(()),
        }
    }

    /// The bias on the device, uploaded on first use (the most recent [`BIAS_CACHE`] are kept: a
    /// DeepSeek-V3 forward routes its 58 MoE layers with 58 biases).
    fn device_bias(&self, bias: &[f32]) -> Result<Arc<CudaSlice<f32>>> {
        let mut cache = self.dev.biases.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, d)) = cache.iter().find(|(h, _)| h.as_slice() == bias) {
            return Ok(d.clone());
        }
        let d = Arc::new(self.stream().clone_htod(bias).map_err(dev_err)?);
        if cache.len() == BIAS_CACHE {
            cache.remove(0);
        }
        cache.push((bias.to_vec(), d.clone()));
        Ok(d)
    }

    fn router_offsets(&self, tokens: usize) -> Result<Arc<CudaSlice<u32>>> {
        let mut cache = self.dev.router_offsets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = cache.get(&tokens) {
            return Ok(d.clone());
        }
        let d = Arc::new(
            self.stream()
                .clone_htod(&[0u32, launch::to_u32("tokens", tokens)?])
                .map_err(dev_err)?,
        );
        // Token counts of a serving loop vary: keep a bounded few.
        if cache.len() >= ROUTER_OFFSETS_CACHE {
            cache.clear();
        }
        cache.insert(tokens, d.clone());
        Ok(d)
    }

    fn gemm_f32(
        &self,
        x: &CudaSlice<f32>,
        offsets: &CudaSlice<u32>,
        w: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        s: GemmShape,
    ) -> Result<()> {
        let k = &self.dev.kernels;
        let kernels = GemmKernels {
            rows: &k.gmm_rows_f32,
            tc: None,
            tc32: None,
            tiles: &k.gmm_f32,
        };
        self.gemm_launch(kernels, false, x, offsets, w, y, s)
    }

    /// Launches the grouped_matmul kernel [`launch::choose_gemm`] picks among `kernels`.
    #[allow(clippy::too_many_arguments)]
    fn gemm_launch<T>(
        &self,
        kernels: GemmKernels<'_>,
        half: bool,
        x: &CudaSlice<T>,
        offsets: &CudaSlice<u32>,
        w: &CudaSlice<T>,
        y: &mut CudaSlice<T>,
        s: GemmShape,
    ) -> Result<()> {
        if s.rows == 0 {
            return Ok(());
        }
        launch::check_gemm_extents(s.rows, s.in_features, s.out_features)?;
        let (rows, kf, n, e) = (
            launch::to_u32("rows", s.rows)?,
            launch::to_u32("in_features", s.in_features)?,
            launch::to_u32("out_features", s.out_features)?,
            launch::to_u32("experts", s.experts)?,
        );
        let swiglu = (s.activation == Activation::SwiGlu) as u32;
        let kernel = launch::choose_gemm(self.dev.gemm_policy, s.rows, s.experts, s.in_features, half);
        let (f, config, cols_per_warp) = match kernel {
            launch::GemmKernel::Rows => {
                let (grid, cpw) = launch::rows_grid(s.experts, s.out_features, s.rows)?;
                let config = LaunchConfig {
                    grid_dim: grid,
                    block_dim: ((launch::ROWS_WARPS * 32) as u32, 1, 1),
                    shared_mem_bytes: 0,
                };
                (kernels.rows, config, Some(cpw))
            }
            launch::GemmKernel::TensorCore | launch::GemmKernel::TensorCore32 => {
                let (tile, tc) = if kernel == launch::GemmKernel::TensorCore {
                    (128, kernels.tc)
                } else {
                    (32, kernels.tc32)
                };
                let (f, smem) =
                    tc.ok_or_else(|| MoeError::unsupported(NAME, "f32 grouped_matmul on tensor cores", "f16 or bf16"))?;
                let grid = launch::tc_grid(s.rows, s.out_features, s.experts, swiglu == 1, tile)?;
                (f, cfg(grid, launch::tc_threads(tile), smem), None)
            }
            launch::GemmKernel::Tiles => {
                let grid = launch::gemm_grid(s.rows, s.out_features, s.experts)?;
                (kernels.tiles, cfg(grid, if half { 128 } else { 256 }, 0), None)
            }
        };
        let mut b = self.stream().launch_builder(f);
        b.arg(x)
            .arg(offsets)
            .arg(w)
            .arg(y)
            .arg(&rows)
            .arg(&kf)
            .arg(&n)
            .arg(&e)
            .arg(&swiglu);
        if let Some(cpw) = &cols_per_warp {
            b.arg(cpw);
        }
        // SAFETY: input rows*K, weight E*(N or 2N)*K, output rows*N and offsets E+1 were checked; every kernel
        // clamps offsets to rows and never touches rows outside offsets[0] .. offsets[E]. 16-byte accesses:
        // every buffer is a whole allocation (256-byte aligned), the tensor-core kernels run only with K % 8 == 0
        // (choose_gemm) and the rows kernel checks K * size % 16 itself. The dynamic shared memory passed is the
        // one the loaded variant's stage count needs (TcKernels). Extents below 2^31 keep the 32-bit loop
        // counters from wrapping (check_gemm_extents).
        unsafe { b.launch(config) }.map_err(dev_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Grid x and the kernels' 32-bit loop bounds stop at 2^31 - 1, with an error naming the size.
    #[test]
    fn grid_bounds_are_errors() {
        assert_eq!(grid_u32("rows", i32::MAX as usize).unwrap(), i32::MAX as u32);
        let e = grid_u32("rows", i32::MAX as usize + 1).unwrap_err();
        assert!(
            matches!(e, MoeError::Unsupported { .. }) && e.to_string().contains("rows = 2147483648"),
            "{e}"
        );
        assert!(grid_u32("hidden", usize::MAX).is_err());
    }

    /// A driver older than CUDA 13.0 is "unavailable" with its version, not a load error or a panic later.
    #[test]
    fn old_drivers_are_refused_by_version() {
        assert_eq!(driver_too_old(13000), None);
        assert_eq!(driver_too_old(13020), None);
        let why = driver_too_old(12080).unwrap();
        assert!(why.contains("CUDA 12.8") && why.contains("13.0 or newer"), "{why}");
        assert!(driver_too_old(0).is_some());
    }

    #[test]
    fn unavailable_without_a_gpu_is_an_error_not_a_panic() {
        match CudaBackend::new() {
            Ok(b) => eprintln!("CUDA present: {}", b.device_name()),
            Err(e) => {
                let msg = e.to_string();
                assert!(matches!(e, MoeError::BackendUnavailable { .. }), "{msg}");
                assert!(msg.contains("cuda"), "{msg}");
                eprintln!("SKIPPED device tests: {msg}");
            }
        }
    }

    #[test]
    fn every_kernel_source_is_embedded() {
        let names: Vec<&str> = compile::SOURCES.iter().map(|s| s.0).collect();
        assert_eq!(
            names,
            ["route.cu", "topk.cu", "permute.cu", "grouped_matmul.cu", "combine.cu"]
        );
        for (name, src) in compile::SOURCES {
            assert!(src.contains("extern \"C\" __global__"), "{name} has no kernels");
        }
    }

    /// Where NVRTC and the headers are present (scripts/test.sh sets them up), the kernels compile.
    #[test]
    fn kernels_compile_with_nvrtc_when_present() {
        // SAFETY: only tries to dlopen libnvrtc.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            eprintln!("SKIPPED: libnvrtc not on LD_LIBRARY_PATH");
            return;
        }
        let Some(include) = compile::find_include_dir() else {
            eprintln!("SKIPPED: CUDA headers not found");
            return;
        };
        for arch in ["sm_75", "sm_80", "sm_90"] {
            for (name, src) in compile::SOURCES {
                let cubin = compile::compile_cubin(name, src, arch, &include).unwrap();
                assert!(cubin.len() > 100, "{name} {arch}");
            }
        }
    }
}

//! Device, pipelines and dispatch plumbing shared by every kernel.

use moe_hal_core::{DType, MoeError, Result};
use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};

pub(crate) const NAME: &str = "wgpu";

/// Invocations per workgroup of the one-dimensional kernels (route, topk, permute, combine).
pub(crate) const WG: u64 = 64;
/// Output tile edge of the two GEMM kernels.
pub(crate) const TILE: u64 = 32;

const ROUTE: &str = concat!(
    include_str!("../../../kernels/wgsl/select.wgsl"),
    include_str!("../../../kernels/wgsl/route.wgsl")
);
const TOPK: &str = concat!(
    include_str!("../../../kernels/wgsl/select.wgsl"),
    include_str!("../../../kernels/wgsl/topk.wgsl")
);
const PERMUTE: &str = include_str!("../../../kernels/wgsl/permute.wgsl");
const GROUPED_MATMUL: &str = concat!(
    include_str!("../../../kernels/wgsl/dtype.wgsl"),
    include_str!("../../../kernels/wgsl/grouped_matmul.wgsl")
);
const COMBINE: &str = concat!(
    include_str!("../../../kernels/wgsl/dtype.wgsl"),
    include_str!("../../../kernels/wgsl/combine.wgsl")
);
const ROUTER_LOGITS: &str = concat!(
    include_str!("../../../kernels/wgsl/dtype.wgsl"),
    include_str!("../../../kernels/wgsl/router_logits.wgsl")
);

pub(crate) fn device_error(message: impl ToString) -> MoeError {
    MoeError::Device {
        backend: NAME.into(),
        message: message.to_string(),
    }
}

/// One WGSL file: its bind group layout (binding 0 is the uniform parameters,
/// then storage buffers) and one pipeline per entry point and storage dtype
/// (the `DTYPE` override: 0 f32, 1 bf16, 2 f16).
pub(crate) struct Kernel {
    layout: wgpu::BindGroupLayout,
    entries: usize,
    pipelines: Vec<wgpu::ComputePipeline>,
}

/// The float dtypes of kernels that take an override, in pipeline order.
pub(crate) const FLOAT_VARIANTS: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

/// Pipeline variant of a kernel with dtype variants.
pub(crate) fn variant(dtype: DType) -> usize {
    FLOAT_VARIANTS.iter().position(|&d| d == dtype).unwrap_or(0)
}

pub(crate) struct Kernels {
    pub route: Kernel,
    pub topk: Kernel,
    /// Entry points `count`, `scan_chunks`, `scan`, `assign`, `gather`.
    pub permute: Kernel,
    pub grouped_matmul: Kernel,
    pub combine: Kernel,
    pub router_logits: Kernel,
}

/// Everything a backend clone shares.
pub(crate) struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub kernels: Kernels,
    /// Errors the device reported outside an error scope (device loss, ...),
    /// recorded instead of panicking and returned by the next call.
    uncaptured: Arc<Mutex<Vec<String>>>,
    /// Set by the device-lost callback: every later call fails at once with a Device error
    /// (wgpu panics on some operations on a lost device).
    lost: Arc<AtomicBool>,
    /// A 4-byte storage buffer bound where a kernel's optional input is absent.
    pub dummy: wgpu::Buffer,
    /// Largest range bound at once, in bytes (a multiple of 4).
    pub max_binding: u64,
    /// The device was created with [`TIMESTAMPS`]: [`Gpu::time`] reads the device clock.
    pub timestamps: bool,
    /// Most loop iterations one shader invocation may run, where the driver has such a limit
    /// ([`Gpu::check_loops`]).
    pub loop_budget: Option<u64>,
    /// This device's number in the process, which its buffers carry ([`Gpu::new`] counts them).
    pub id: u64,
}

/// Devices opened so far: each [`Gpu`] takes the next number.
static DEVICES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Mesa's llvmpipe (lavapipe's device) stops every loop of a shader invocation once the
/// invocation has run this many iterations in all (`LP_MAX_TGSI_LOOP_ITERATIONS` in gallivm), and
/// the kernel goes on with wrong values, silently.
const LLVMPIPE_LOOP_BUDGET: u64 = 65_535;

/// What timing with the device clock needs: timestamp query sets, written between submissions.
pub(crate) const TIMESTAMPS: wgpu::Features =
    wgpu::Features::TIMESTAMP_QUERY.union(wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS);

/// A storage binding: a whole buffer, or `(offset, size)` bytes of it.
pub(crate) type Binding<'a> = (&'a wgpu::Buffer, Option<(u64, u64)>);

/// A dispatch: entry point index, dtype variant (0 for f32-only kernels) and workgroup counts.
pub(crate) struct Step {
    pub entry: usize,
    pub variant: usize,
    pub groups: [u32; 3],
}

impl Gpu {
    /// `max_binding` lowers the adapter's per-binding limit (tests of weight splitting);
    /// `timestamps` asks for [`TIMESTAMPS`], which the device gets where the adapter offers them.
    pub fn new(max_binding: Option<u64>, timestamps: bool) -> Result<Gpu> {
        let backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY);
        // wgpu drops the names it does not know: a typo would read as "no adapter".
        if backends.is_empty() {
            return Err(MoeError::unavailable(
                NAME,
                format!(
                    "WGPU_BACKEND={:?} names no graphics API that wgpu knows; expected vulkan, metal or dx12 (comma separated; this build has no gl)",
                    std::env::var("WGPU_BACKEND").unwrap_or_default()
                ),
            ));
        }
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle().with_env();
        desc.backends = backends;
        let instance = wgpu::Instance::new(desc);
        let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            force_fallback_adapter: false,
            compatible_surface: None,
            ..Default::default()
        }))
        .map_err(|e| {
            MoeError::unavailable(
                NAME,
                format!(
                    "no WebGPU adapter found among the backends {backends:?} ({e}); \
                     WGPU_BACKEND selects the API (vulkan, metal, dx12); on Linux without a GPU, \
                     software Vulkan comes with the mesa-vulkan-drivers and libvulkan1 packages"
                ),
            )
        })?;
        let info = adapter.get_info();
        let limits = adapter.limits();
        let timestamps = timestamps && adapter.features().contains(TIMESTAMPS);
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("moe-hal"),
            required_features: if timestamps {
                TIMESTAMPS
            } else {
                wgpu::Features::empty()
            },
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| MoeError::unavailable(NAME, format!("adapter {} refused a device: {e}", info.name)))?;
        let uncaptured = Arc::new(Mutex::new(Vec::new()));
        let sink = uncaptured.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            if let Ok(mut v) = sink.lock() {
                v.push(e.to_string());
            }
        }));
        // A lost device (driver reset, GPU removed) surfaces as an error on the next scoped call.
        let lost = Arc::new(AtomicBool::new(false));
        let (log, flag) = (uncaptured.clone(), lost.clone());
        device.set_device_lost_callback(move |reason, message| {
            flag.store(true, Ordering::SeqCst);
            if let Ok(mut v) = log.lock() {
                v.push(format!("device lost ({reason:?}): {message}"));
            }
        });
        let kernels = scoped(&device, &uncaptured, "creating the WGSL pipelines", || Kernels {
            route: Kernel::new(
                &device,
                "route",
                ROUTE,
                &[false, false, true, true, true],
                &["main"],
                false,
            ),
            topk: Kernel::new(&device, "topk", TOPK, &[false, true, true], &["main"], false),
            permute: Kernel::new(
                &device,
                "permute",
                PERMUTE,
                &[false, false, true, true, true, true, true, true],
                &["count", "scan_chunks", "scan", "assign", "gather"],
                true,
            ),
            grouped_matmul: Kernel::new(
                &device,
                "grouped_matmul",
                GROUPED_MATMUL,
                &[false, false, false, true],
                &["main"],
                true,
            ),
            combine: Kernel::new(
                &device,
                "combine",
                COMBINE,
                &[false, false, false, false, true],
                &["main"],
                true,
            ),
            router_logits: Kernel::new(
                &device,
                "router_logits",
                ROUTER_LOGITS,
                &[false, false, true],
                &["main"],
                true,
            ),
        })?;
        let dummy = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("moe-hal dummy"),
            size: 4,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        // Shaders index with u32, so never more than 4 GiB per binding.
        let adapter_binding = limits.max_storage_buffer_binding_size.min(u32::MAX as u64);
        let max_binding = max_binding.unwrap_or(u64::MAX).min(adapter_binding) / 4 * 4;
        let loop_budget = info.name.contains("llvmpipe").then_some(LLVMPIPE_LOOP_BUDGET);
        Ok(Gpu {
            device,
            queue,
            info,
            limits,
            kernels,
            uncaptured,
            lost,
            dummy,
            max_binding,
            timestamps,
            loop_budget,
            id: DEVICES.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// Maps `staging` (MAP_READ, with its copy already submitted), waits and copies it out.
    pub fn map_read(&self, what: &str, staging: &wgpu::Buffer) -> Result<Vec<u8>> {
        let (tx, rx) = mpsc::channel();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()
            .map_err(|_| device_error(format!("mapping the {what} buffer never completed")))?
            .map_err(|e| device_error(format!("mapping the {what} buffer failed: {e}")))?;
        let bytes = {
            let view = staging
                .slice(..)
                .get_mapped_range()
                .map_err(|e| device_error(format!("reading the mapped {what} buffer: {e}")))?;
            view.to_vec()
        };
        staging.unmap();
        Ok(bytes)
    }

    /// Runs `f` between two timestamps, each written by its own submission (the queue runs
    /// submissions in order, and a timestamp is taken once the work before it has finished), waits,
    /// and returns the ticks between them in milliseconds. `None` without [`TIMESTAMPS`], or when the
    /// device gives no usable period or timestamps that go backwards.
    pub fn time(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<Option<f64>> {
        if !self.timestamps {
            f()?;
            self.wait()?;
            return Ok(None);
        }
        let bytes = 2 * wgpu::QUERY_SIZE as u64;
        let (set, resolved, staging) = self.scoped("creating timestamp queries", || {
            let set = self.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("moe-hal timer"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            });
            let buffer = |usage| {
                self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("moe-hal timer"),
                    size: bytes,
                    usage,
                    mapped_at_creation: false,
                })
            };
            let resolved = buffer(wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC);
            let staging = buffer(wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST);
            (set, resolved, staging)
        })?;
        let encoder = || {
            self.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("timer") })
        };
        self.scoped("writing the start timestamp", || {
            let mut e = encoder();
            e.write_timestamp(&set, 0);
            self.queue.submit([e.finish()]);
        })?;
        f()?;
        self.scoped("writing the end timestamp", || {
            let mut e = encoder();
            e.write_timestamp(&set, 1);
            e.resolve_query_set(&set, 0..2, &resolved, 0);
            e.copy_buffer_to_buffer(&resolved, 0, &staging, 0, bytes);
            self.queue.submit([e.finish()]);
        })?;
        let data = self.map_read("timestamp", &staging)?;
        let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&data);
        let period_ns = self.queue.get_timestamp_period() as f64;
        Ok(match ticks.as_slice() {
            [start, end] if end >= start && period_ns > 0.0 => Some((end - start) as f64 * period_ns * 1e-6),
            _ => None,
        })
    }

    /// Largest buffer this backend creates. Kernels bind buffers whole, so
    /// they refuse buffers above [`Gpu::max_binding`], except grouped-matmul
    /// weights, which are bound a group of experts at a time.
    pub fn max_buffer_bytes(&self) -> u64 {
        self.limits.max_buffer_size.min(isize::MAX as u64)
    }

    /// Runs `f` inside validation, out-of-memory and internal error scopes;
    /// any error becomes `MoeError::Device` naming `what`.
    pub fn scoped<T>(&self, what: &str, f: impl FnOnce() -> T) -> Result<T> {
        self.alive(what)?;
        scoped(&self.device, &self.uncaptured, what, f)
    }

    /// A Device error once the device is lost.
    fn alive(&self, what: &str) -> Result<()> {
        if self.lost.load(Ordering::SeqCst) {
            let why = self.uncaptured.lock().map(|v| v.join("; ")).unwrap_or_default();
            return Err(device_error(format!("{what}: the device is lost ({why})")));
        }
        Ok(())
    }

    /// Workgroup counts covering `items` invocations in groups of `per_group`,
    /// spilling from x into y past the per-dimension limit.
    pub fn grid(&self, what: &str, items: u64, per_group: u64) -> Result<[u32; 3]> {
        let groups = items.div_ceil(per_group);
        let max = self.limits.max_compute_workgroups_per_dimension as u64;
        let x = groups.min(max);
        let y = if x == 0 { 0 } else { groups.div_ceil(x) };
        if y > max || items > u32::MAX as u64 - 1024 {
            return Err(MoeError::unsupported(
                NAME,
                format!("{what} with {items} invocations"),
                format!("at most {max} x {max} workgroups of {per_group} and u32 indices"),
            ));
        }
        Ok([x as u32, y as u32, 1])
    }

    /// Refuses a dispatch of `what` whose invocations run up to `iterations` loop iterations each,
    /// where that is past the driver's [`Gpu::loop_budget`]: it would compute wrong values
    /// without any error.
    pub fn check_loops(&self, what: impl std::fmt::Display, iterations: u64) -> Result<()> {
        match self.loop_budget {
            Some(budget) if iterations > budget => Err(MoeError::unsupported(
                NAME,
                format!("{what} on {}", self.info.name),
                format!(
                    "one shader invocation would loop about {iterations} times, and Mesa's llvmpipe stops an \
                     invocation's loops after {budget} iterations (the results would be wrong); this shape needs \
                     a hardware adapter"
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Records `steps` of `kernel` in one compute pass over one bind group
    /// (`params` as the uniform at binding 0, `buffers` from binding 1) and
    /// submits it.
    pub fn run(
        &self,
        what: &str,
        kernel: &Kernel,
        steps: &[Step],
        params: &[u32],
        buffers: &[&wgpu::Buffer],
    ) -> Result<()> {
        let bound: Vec<Binding<'_>> = buffers.iter().map(|&b| (b, None)).collect();
        self.run_bound(what, kernel, steps, params, &bound)
    }

    /// [`Gpu::run`] with buffer ranges.
    pub fn run_bound(
        &self,
        what: &str,
        kernel: &Kernel,
        steps: &[Step],
        params: &[u32],
        buffers: &[Binding<'_>],
    ) -> Result<()> {
        if steps.iter().all(|s| s.groups.contains(&0)) {
            return Ok(());
        }
        for (b, range) in buffers {
            let size = range.map_or(b.size(), |r| r.1);
            if size > self.max_binding {
                return Err(MoeError::unsupported(
                    NAME,
                    format!("{what} on a buffer of {size} bytes"),
                    format!("this adapter binds at most {} bytes at once", self.max_binding),
                ));
            }
        }
        self.scoped(what, || {
            let mut words = [0u32; 16];
            words[..params.len()].copy_from_slice(params);
            // create_buffer + write_buffer rather than create_buffer_init, which panics on a lost device.
            let uniform = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(what),
                size: std::mem::size_of_val(&words) as u64,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            self.queue.write_buffer(&uniform, 0, bytemuck::cast_slice(&words));
            let mut entries = vec![wgpu::BindGroupEntry {
                binding: 0,
                resource: uniform.as_entire_binding(),
            }];
            entries.extend(buffers.iter().enumerate().map(|(i, (b, range))| wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource: match range {
                    None => b.as_entire_binding(),
                    Some((offset, size)) => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: b,
                        offset: *offset,
                        size: std::num::NonZeroU64::new(*size),
                    }),
                },
            }));
            let group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(what),
                layout: &kernel.layout,
                entries: &entries,
            });
            let mut encoder = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(what) });
            {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some(what),
                    timestamp_writes: None,
                });
                pass.set_bind_group(0, &group, &[]);
                for s in steps.iter().filter(|s| !s.groups.contains(&0)) {
                    pass.set_pipeline(&kernel.pipelines[s.variant * kernel.entries + s.entry]);
                    pass.dispatch_workgroups(s.groups[0], s.groups[1], s.groups[2]);
                }
            }
            self.queue.submit([encoder.finish()]);
        })
    }

    /// Waits for all submitted work.
    pub fn wait(&self) -> Result<()> {
        self.alive("waiting for the device")?;
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| device_error(format!("waiting for the device: {e}")))?;
        self.take_uncaptured()
    }

    fn take_uncaptured(&self) -> Result<()> {
        take_uncaptured(&self.uncaptured)
    }
}

fn take_uncaptured(errors: &Mutex<Vec<String>>) -> Result<()> {
    let mut v = errors.lock().map_err(|_| device_error("error log poisoned"))?;
    if v.is_empty() {
        return Ok(());
    }
    let msg = v.join("; ");
    v.clear();
    Err(device_error(msg))
}

fn scoped<T>(device: &wgpu::Device, uncaptured: &Mutex<Vec<String>>, what: &str, f: impl FnOnce() -> T) -> Result<T> {
    let internal = device.push_error_scope(wgpu::ErrorFilter::Internal);
    let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let out = f();
    let errors = [
        pollster::block_on(validation.pop()),
        pollster::block_on(oom.pop()),
        pollster::block_on(internal.pop()),
    ];
    if let Some(e) = errors.into_iter().flatten().next() {
        return Err(device_error(format!("{what}: {e}")));
    }
    take_uncaptured(uncaptured)?;
    Ok(out)
}

impl Kernel {
    /// `read_write[i]` says whether storage binding `i + 1` is written;
    /// `dtypes` makes one set of pipelines per float dtype (none: f32 only, no override).
    fn new(
        device: &wgpu::Device,
        name: &str,
        source: &str,
        read_write: &[bool],
        entries: &[&str],
        dtypes: bool,
    ) -> Kernel {
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(name),
            source: wgpu::ShaderSource::Wgsl(Cow::Borrowed(source)),
        });
        let mut layout_entries = vec![wgpu::BindGroupLayoutEntry {
            binding: 0,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        }];
        layout_entries.extend(
            read_write
                .iter()
                .enumerate()
                .map(|(i, &rw)| wgpu::BindGroupLayoutEntry {
                    binding: i as u32 + 1,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Storage { read_only: !rw },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                }),
        );
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(name),
            entries: &layout_entries,
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(name),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let variants: &[f64] = if dtypes { &[0.0, 1.0, 2.0] } else { &[] };
        let mut pipelines = Vec::new();
        for v in 0..variants.len().max(1) {
            let constants = variants.get(v).map(|&d| [("DTYPE", d)]);
            for entry in entries {
                pipelines.push(device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(name),
                    layout: Some(&pipeline_layout),
                    module: &module,
                    entry_point: Some(entry),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants: constants.as_ref().map_or(&[], |c| c.as_slice()),
                        ..Default::default()
                    },
                    cache: None,
                }));
            }
        }
        Kernel {
            layout,
            entries: entries.len(),
            pipelines,
        }
    }
}

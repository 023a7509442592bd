//! `moe-bench bench`: every kernel and the whole layer at published model
//! shapes, timed on each backend, with the backend's own ceilings (GEMM peak
//! and memory bandwidth) for a roofline fraction.

use crate::report::{self, Ceilings, Clock, Record};
use indicatif::{ProgressBar, ProgressStyle};
use moe_hal::conformance::Rng;
use moe_hal::{
    bf16, f16, registry, Activation, Backend, DType, GemmShape, HostSlice, HostVec, LayerShapes, LayerWeights,
    MoeLayer, PermuteShape, Permuted, RouterSpec, SharedWeights,
};
use std::path::PathBuf;
use std::time::Instant;

/// The kernels timed one by one, in the order of a forward pass.
pub const KERNELS: [&str; 5] = ["route", "permute", "gemm_gate_up", "gemm_down", "combine"];

/// How the router of a preset scores and selects.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Router {
    /// Softmax top-k, renormalised (Mixtral, Qwen3).
    Softmax,
    /// DeepSeek-V3 / Kimi-K2: sigmoid, correction bias, groups, eps renorm, routed scaling.
    Sigmoid { scale: f32 },
}

/// One model's MoE layer shape, as published in its `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct Preset {
    pub name: &'static str,
    pub hidden: usize,
    pub inter: usize,
    pub experts: usize,
    pub topk: usize,
    /// Expert groups (`n_group`; 1 means no groups) and how many are kept (`topk_group`).
    pub groups: usize,
    pub keep_groups: usize,
    /// Shared-expert intermediate size (`moe_intermediate_size * n_shared_experts`).
    pub shared_inter: Option<usize>,
    router: Router,
}

pub const PRESETS: [Preset; 5] = [
    Preset {
        name: "deepseek-v3",
        hidden: 7168,
        inter: 2048,
        experts: 256,
        topk: 8,
        groups: 8,
        keep_groups: 4,
        shared_inter: Some(2048),
        router: Router::Sigmoid { scale: 2.5 },
    },
    Preset {
        name: "kimi-k2",
        hidden: 7168,
        inter: 2048,
        experts: 384,
        topk: 8,
        groups: 1,
        keep_groups: 1,
        shared_inter: Some(2048),
        router: Router::Sigmoid { scale: 2.827 },
    },
    Preset {
        name: "qwen3-30b-a3b",
        hidden: 2048,
        inter: 768,
        experts: 128,
        topk: 8,
        groups: 1,
        keep_groups: 1,
        shared_inter: None,
        router: Router::Softmax,
    },
    Preset {
        name: "qwen3-235b-a22b",
        hidden: 4096,
        inter: 1536,
        experts: 128,
        topk: 8,
        groups: 1,
        keep_groups: 1,
        shared_inter: None,
        router: Router::Softmax,
    },
    Preset {
        name: "mixtral-8x7b",
        hidden: 4096,
        inter: 14336,
        experts: 8,
        topk: 2,
        groups: 1,
        keep_groups: 1,
        shared_inter: None,
        router: Router::Softmax,
    },
];

/// The command line of `moe-bench bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Model shape: deepseek-v3, kimi-k2, qwen3-30b-a3b, qwen3-235b-a22b, mixtral-8x7b.
    /// Without it, --hidden --inter --experts --topk describe a custom layer.
    #[arg(long)]
    pub preset: Option<String>,
    /// Hidden size H (overrides the preset's).
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Expert intermediate size I (overrides the preset's).
    #[arg(long)]
    pub inter: Option<usize>,
    /// Routed experts E (overrides the preset's).
    #[arg(long)]
    pub experts: Option<usize>,
    /// Experts per token k (overrides the preset's).
    #[arg(long)]
    pub topk: Option<usize>,
    /// Expert groups (DeepSeek-style group-limited routing; 1 = none). Half of them are kept.
    #[arg(long)]
    pub groups: Option<usize>,
    /// Token counts, comma separated.
    #[arg(long, default_value = "1,2,4,8,16,32,64,128,256,512,1024,2048,4096")]
    pub tokens: String,
    /// Compute dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// A backend name or `all` (every available backend).
    #[arg(long, default_value = "all")]
    pub backend: String,
    /// Timed runs per measurement (median, min, max over them).
    #[arg(long, default_value_t = 10)]
    pub repeat: usize,
    /// Untimed runs before the timed ones.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Distinct random token batches the whole-layer runs cycle through. With 1 every run routes
    /// to the same experts, whose weights may stay in a large last-level cache; with more (e.g. 16)
    /// successive runs read other experts, as decoding a real model does.
    #[arg(long, default_value_t = 1)]
    pub inputs: usize,
    /// Writes the records as a JSON array.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Writes the records as CSV (same columns as the JSON).
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Writes a log-log plot of time per token count (.svg or .png).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Seed of the random weights and inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// A resolved layer shape and router.
#[derive(Clone, Debug)]
pub struct Shape {
    /// The preset's name, or `custom-h..-i..-e..-k..-ROUTER` (`softmax`, `sigmoid` or
    /// `sigmoid-gNofM`) when any field was given by hand.
    pub label: String,
    pub hidden: usize,
    pub inter: usize,
    pub experts: usize,
    pub topk: usize,
    pub shared_inter: Option<usize>,
    pub spec: RouterSpec,
}

fn resolve(a: &BenchArgs) -> Result<Shape, String> {
    let custom =
        a.hidden.is_some() || a.inter.is_some() || a.experts.is_some() || a.topk.is_some() || a.groups.is_some();
    let base = match &a.preset {
        Some(name) => Some(PRESETS.iter().find(|p| p.name == name).cloned().ok_or_else(|| {
            format!(
                "unknown preset {name:?}; expected one of {} (or a custom shape: --hidden --inter --experts --topk)",
                PRESETS.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
            )
        })?),
        None => None,
    };
    let need = |v: Option<usize>, from: Option<usize>, flag: &str| -> Result<usize, String> {
        match v.or(from) {
            Some(0) => Err(format!("--{flag} must be at least 1")),
            Some(v) => Ok(v),
            None => Err(format!(
                "missing --{flag}: give --preset NAME or a whole custom shape (--hidden --inter --experts --topk)"
            )),
        }
    };
    let hidden = need(a.hidden, base.as_ref().map(|p| p.hidden), "hidden")?;
    let inter = need(a.inter, base.as_ref().map(|p| p.inter), "inter")?;
    let experts = need(a.experts, base.as_ref().map(|p| p.experts), "experts")?;
    let topk = need(a.topk, base.as_ref().map(|p| p.topk), "topk")?;
    let groups = need(a.groups, Some(base.as_ref().map_or(1, |p| p.groups)), "groups")?;
    let keep = match &base {
        Some(p) if p.groups == groups => p.keep_groups,
        _ => groups.div_ceil(2),
    };
    // A value as the user gave it, or as the preset's.
    let named = |flag: &str, given: Option<usize>, v: usize| match (given, &base) {
        (None, Some(p)) => format!("{}'s {flag} {v}", p.name),
        _ => format!("--{flag} {v}"),
    };
    if topk > experts {
        return Err(format!(
            "{} is larger than {}",
            named("topk", a.topk, topk),
            named("experts", a.experts, experts)
        ));
    }
    if experts % groups != 0 {
        return Err(format!(
            "{} does not divide {}",
            named("groups", a.groups, groups),
            named("experts", a.experts, experts)
        ));
    }
    let mut rng = Rng::new(a.seed ^ 0xB1A5);
    let router = match &base {
        Some(p) => p.router,
        None if groups > 1 => Router::Sigmoid { scale: 1.0 },
        None => Router::Softmax,
    };
    if let (Router::Softmax, Some(p)) = (router, &base) {
        if groups > 1 {
            return Err(format!(
                "--groups {groups}: {} routes by a softmax over all experts, without groups; \
                 group-limited routing comes with the sigmoid presets (deepseek-v3, kimi-k2) or a custom shape without --preset",
                p.name
            ));
        }
    }
    let spec = match router {
        Router::Softmax => RouterSpec::softmax_topk(experts, topk, true),
        Router::Sigmoid { scale } => RouterSpec::deepseek_v3(
            experts,
            topk,
            groups,
            keep,
            Some(rng.vec(experts, -0.05, 0.05)),
            true,
            scale,
        ),
    };
    spec.validate()
        .map_err(|e| format!("invalid router for this shape: {e}"))?;
    let label = match (&base, custom) {
        (Some(p), false) => p.name.to_string(),
        _ => {
            // The router too, so that `compare` never pairs layers routed differently.
            let routing = match router {
                Router::Softmax => "softmax".to_string(),
                Router::Sigmoid { .. } if groups > 1 => format!("sigmoid-g{groups}of{keep}"),
                Router::Sigmoid { .. } => "sigmoid".to_string(),
            };
            format!("custom-h{hidden}-i{inter}-e{experts}-k{topk}-{routing}")
        }
    };
    Ok(Shape {
        label,
        hidden,
        inter,
        experts,
        topk,
        shared_inter: base
            .as_ref()
            .and_then(|p| p.shared_inter)
            .map(|s| if a.inter.is_some() { inter } else { s }),
        spec,
    })
}

/// Parses `1,2,4`: every entry a positive integer, at least one.
pub fn parse_tokens(s: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let p = part.trim();
        let n: usize = p
            .parse()
            .map_err(|_| format!("--tokens: {p:?} is not a token count; expected positive integers like 1,16,256"))?;
        if n == 0 {
            return Err("--tokens: a token count must be at least 1".into());
        }
        out.push(n);
    }
    if out.is_empty() {
        return Err("--tokens is empty; expected positive integers like 1,16,256".into());
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Bytes the run needs at most, and its parts, for the memory check.
#[derive(Clone, Copy, Debug)]
pub struct MemoryEstimate {
    /// Routed + shared expert weights and the router, once.
    pub weights: u128,
    /// Per routed expert (gate_up + down).
    pub per_expert: u128,
    /// Activations of the largest token count (kernel buffers and the layer's scratch).
    pub activations: u128,
    /// Peak: host weights plus their copy on the backend, plus activations.
    pub total: u128,
}

fn estimate(shape: &Shape, dtype: DType, max_tokens: usize, inputs: usize) -> Result<MemoryEstimate, String> {
    let (h, i, e, k) = (
        shape.hidden as u128,
        shape.inter as u128,
        shape.experts as u128,
        shape.topk as u128,
    );
    let t = max_tokens as u128;
    let ds = dtype.size() as u128;
    let per_expert = 3 * i * h * ds;
    let shared = shape.shared_inter.map_or(0, |s| 3 * s as u128 * h * ds);
    let weights = e * per_expert + shared + e * h * 4;
    // x, out, shared act/out; logits; ids, weights, slot maps; permuted rows, act, expert out.
    let acts = t * h * ds * 3
        + t * i.max(shape.shared_inter.unwrap_or(0) as u128) * ds
        + t * e * 4
        + t * k * 16
        + t * k * (2 * h + i) * ds;
    // The kernel buffers and the layer's scratch may both be alive.
    let activations = 2 * acts + (inputs as u128).saturating_sub(1) * t * h * ds;
    // The ceiling measurements hold up to STREAM_BYTES (plus its host copy) before the sweep.
    let total = (2 * weights + activations).max(2 * STREAM_BYTES as u128);
    // Every buffer must also be addressable.
    let largest = (e * per_expert).max(t * k * h * ds);
    if total > u64::MAX as u128 || largest > isize::MAX as u128 {
        return Err(format!(
            "shape overflows: H {} I {} E {} k {} with {} tokens needs more than 2^63 bytes",
            shape.hidden, shape.inter, shape.experts, shape.topk, max_tokens
        ));
    }
    Ok(MemoryEstimate {
        weights,
        per_expert,
        activations,
        total,
    })
}

/// `MemAvailable` of `/proc/meminfo`, in bytes (`None` where there is no such file).
fn mem_available() -> Option<u128> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn gb(bytes: u128) -> String {
    format!("{:.1} GB", bytes as f64 / 1e9)
}

/// Refuses a run that would not fit in memory, with a suggestion.
/// `bf16_total` is what the same run needs in bf16 ([`estimate`]), for the suggestion.
fn check_memory(
    shape: &Shape,
    dtype: DType,
    max_tokens: usize,
    est: &MemoryEstimate,
    bf16_total: u128,
) -> Result<(), String> {
    let Some(avail) = std::env::var("MOE_BENCH_MEM_AVAILABLE")
        .ok()
        .and_then(|v| v.parse::<u128>().ok())
        .or_else(mem_available)
    else {
        return Ok(());
    };
    // Leave 10% and at least 1 GiB to the rest of the machine.
    let usable = avail.saturating_sub((avail / 10).max(1 << 30));
    if est.total <= usable {
        return Ok(());
    }
    let mut hints = Vec::new();
    if dtype == DType::F32 && bf16_total <= usable {
        hints.push("--dtype bf16".to_string());
    }
    let fixed = est.total - 2 * shape.experts as u128 * est.per_expert;
    if usable > fixed && est.per_expert > 0 {
        let fit = ((usable - fixed) / (2 * est.per_expert)) as usize;
        // A multiple of 8 and of the group count.
        let g = shape.spec.grouping.map_or(1, |g| g.n_group);
        let step = (1..=8).map(|m| g * m).find(|s| s % 8 == 0).unwrap_or(g);
        let fit = fit / step * step;
        if fit >= shape.topk.max(g) && fit > 0 {
            hints.push(format!("--experts {fit}"));
        }
    }
    if max_tokens > 256 {
        hints.push("fewer --tokens".into());
    }
    Err(format!(
        "{} in {dtype} needs about {} of memory ({} of weights, held twice while uploading, plus {} of activations for {max_tokens} tokens) but {} is available; try {}",
        shape.label,
        gb(est.total),
        gb(est.weights),
        gb(est.activations),
        gb(avail),
        if hints.is_empty() { "a smaller --hidden or --inter".into() } else { hints.join(" or ") }
    ))
}

/// Checks that `path` can be written (its folder exists and accepts a file) before any work.
pub(crate) fn check_writable(path: &std::path::Path, flag: &str) -> Result<(), String> {
    let name = path
        .file_name()
        .ok_or_else(|| format!("--{flag} {}: not a file path", path.display()))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if path.is_dir() {
        return Err(format!("--{flag} {}: is a folder", path.display()));
    }
    let probe = dir.join(format!(".{}.probe-{}", name.to_string_lossy(), std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| format!("--{flag} {}: cannot write there: {e}", path.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Random values in `[lo, hi)` stored in `dtype`, generated on every core (deterministic per seed).
fn random_host(seed: u64, n: usize, lo: f32, hi: f32, dtype: DType) -> HostVec {
    fn fill<T: Copy + Send + Sync>(seed: u64, n: usize, lo: f32, hi: f32, zero: T, conv: fn(f32) -> T) -> Vec<T> {
        const CHUNK: usize = 1 << 18;
        let mut v = vec![zero; n];
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunks: Vec<(usize, &mut [T])> = v.chunks_mut(CHUNK).enumerate().collect();
        let per = chunks.len().div_ceil(threads).max(1);
        let mut groups: Vec<Vec<(usize, &mut [T])>> = Vec::new();
        let mut it = chunks.into_iter().peekable();
        while it.peek().is_some() {
            groups.push(it.by_ref().take(per).collect());
        }
        std::thread::scope(|s| {
            for g in groups {
                s.spawn(move || {
                    for (ci, c) in g {
                        let mut rng = Rng::new(seed.wrapping_mul(0x1000_0001).wrapping_add(ci as u64));
                        for x in c.iter_mut() {
                            *x = conv(rng.uniform(lo, hi));
                        }
                    }
                });
            }
        });
        v
    }
    match dtype {
        DType::BF16 => HostVec::BF16(fill(seed, n, lo, hi, bf16::ZERO, bf16::from_f32)),
        DType::F16 => HostVec::F16(fill(seed, n, lo, hi, f16::ZERO, f16::from_f32)),
        _ => HostVec::F32(fill(seed, n, lo, hi, 0.0, |x| x)),
    }
}

/// Random layer weights for `shape`, stored directly in `dtype`.
fn host_weights(shape: &Shape, dtype: DType, seed: u64) -> LayerWeights {
    let (h, i, e) = (shape.hidden, shape.inter, shape.experts);
    let (sh, si) = (1.0 / (h as f32).sqrt(), 1.0 / (i as f32).sqrt());
    let router_weight = match random_host(seed, e * h, -2.0 * sh, 2.0 * sh, DType::F32) {
        HostVec::F32(v) => v,
        _ => unreachable!("asked for f32"),
    };
    LayerWeights {
        router: shape.spec.clone(),
        hidden_size: h,
        intermediate_size: i,
        router_weight,
        gate_up: random_host(seed.wrapping_add(1), e * 2 * i * h, -sh, sh, dtype),
        down: random_host(seed.wrapping_add(2), e * h * i, -si, si, dtype),
        shared: shape.shared_inter.map(|s| {
            let ss = 1.0 / (s as f32).sqrt();
            SharedWeights {
                intermediate_size: s,
                gate_up: random_host(seed.wrapping_add(3), 2 * s * h, -sh, sh, dtype),
                down: random_host(seed.wrapping_add(4), h * s, -ss, ss, dtype),
                gate: None,
            }
        }),
    }
}

/// Median, min and max in milliseconds, and the clock they were read from.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub clock: Clock,
}

/// Times `f`: `warmup` untimed runs, then `repeat` timed ones, each with the backend's device clock
/// ([`Backend::device_time_ms`]: CUDA events, WebGPU timestamp queries) when every timed run got one,
/// else with the wall clock around the call and the wait for its work.
fn time<B: Backend>(
    b: &B,
    warmup: usize,
    repeat: usize,
    mut f: impl FnMut() -> moe_hal::Result<()>,
) -> Result<Timing, String> {
    let err = |e: moe_hal::MoeError| e.to_string();
    for _ in 0..warmup {
        f().map_err(err)?;
    }
    b.synchronize().map_err(err)?;
    let mut wall = Vec::with_capacity(repeat);
    let mut device = Vec::with_capacity(repeat);
    for _ in 0..repeat.max(1) {
        let start = Instant::now();
        // Returns once the work of `f` is done, with or without a device time.
        device.push(b.device_time_ms(&mut f).map_err(err)?);
        wall.push(start.elapsed().as_secs_f64() * 1e3);
    }
    // One clock for all repeats of a measurement.
    let (clock, mut ms) = match device.into_iter().collect::<Option<Vec<f64>>>() {
        Some(d) => (Clock::Device, d),
        None => (Clock::Wall, wall),
    };
    ms.sort_by(f64::total_cmp);
    let n = ms.len();
    let median_ms = if n % 2 == 1 {
        ms[n / 2]
    } else {
        (ms[n / 2 - 1] + ms[n / 2]) / 2.0
    };
    Ok(Timing {
        median_ms,
        min_ms: ms[0],
        max_ms: ms[n - 1],
        clock,
    })
}

/// Best time of a ceiling measurement: one warm-up, then runs until 7 of them or about a second,
/// fewer when one run already takes over half a second (slow backends). The best of several runs
/// is what the machine can do when nothing else disturbs it (on a shared host, 3 runs left the
/// peak 30% apart between invocations). Timed like the kernels ([`time`]), so a roofline fraction
/// compares times of one clock.
fn best_ms<B: Backend>(b: &B, mut f: impl FnMut() -> moe_hal::Result<()>) -> Result<(f64, Clock), String> {
    let first = time(b, 1, 1, &mut f)?;
    if first.min_ms > 500.0 {
        return Ok((first.min_ms, first.clock));
    }
    let runs = ((1000.0 / first.min_ms.max(1e-3)) as usize).clamp(2, 6);
    let rest = time(b, 0, runs, f)?;
    // Mixed clocks (a device clock that failed once) fall back to the wall-clock figure.
    Ok(match (first.clock, rest.clock) {
        (x, y) if x == y => (rest.min_ms.min(first.min_ms), x),
        (Clock::Wall, _) => (first.min_ms, Clock::Wall),
        _ => (rest.min_ms, Clock::Wall),
    })
}

/// The GEMM peak and memory bandwidth of `b`, measured with its own kernels in `dtype`.
fn ceilings<B: Backend>(b: &B, dtype: DType, seed: u64) -> Result<Ceilings, String> {
    let err = |e: moe_hal::MoeError| e.to_string();
    // Peak: one dense expert, rows 1024, K = N = 2048.
    let (rows, kd, nd) = (1024usize, 2048usize, 2048usize);
    let x = b
        .upload(random_host(seed, rows * kd, -1.0, 1.0, dtype).as_slice())
        .map_err(err)?;
    let shape = GemmShape {
        rows,
        in_features: kd,
        out_features: nd,
        experts: 1,
        activation: Activation::None,
    };
    let offsets = b.upload(HostSlice::U32(&[0, rows as u32])).map_err(err)?;
    let mut y = b.alloc(dtype, rows * nd).map_err(err)?;
    let wh = random_host(seed.wrapping_add(1), nd * kd, -0.02, 0.02, dtype);
    // The faster of the weights as uploaded and as the layer uploads them (packed where the
    // backend packs them), so that neither kernel family sets a lower ceiling than the other.
    let (t, clock) = best_of_uploads(b, &wh, shape, |w| {
        best_ms(b, || b.grouped_matmul(&x, &offsets, w, &mut y, shape))
    })?;
    let mut clocks = vec![clock];
    let gemm_gflops = 2.0 * (rows * kd * nd) as f64 / (t * 1e-3) / 1e9;
    drop((x, wh, y));
    // Bandwidth, two ways; the larger is the ceiling. Both touch 512 MiB (less where the backend's
    // largest buffer is smaller), more than the last-level caches of current CPUs (up to a few
    // hundred MiB) and GPUs, so that repeats measure memory, not cache.
    let stream = (STREAM_BYTES as u64).min(b.capabilities().max_buffer_bytes) as usize;
    // 1. Streaming 512 MiB of weights through a GEMM of one row per expert, experts of 64 MiB (a
    //    size every backend binds at once).
    let kd = 8192usize;
    let experts = (stream / EXPERT_BYTES).max(1);
    let nd = (stream.min(EXPERT_BYTES) / (kd * dtype.size())).max(1);
    let x = b
        .upload(random_host(seed.wrapping_add(2), experts * kd, -1.0, 1.0, dtype).as_slice())
        .map_err(err)?;
    let shape = GemmShape {
        rows: experts,
        in_features: kd,
        out_features: nd,
        experts,
        activation: Activation::None,
    };
    let offsets: Vec<u32> = (0..=experts as u32).collect();
    let offsets = b.upload(HostSlice::U32(&offsets)).map_err(err)?;
    let mut y = b.alloc(dtype, experts * nd).map_err(err)?;
    let wh = random_host(seed.wrapping_add(3), experts * nd * kd, -0.02, 0.02, dtype);
    let (t, clock) = best_of_uploads(b, &wh, shape, |w| {
        best_ms(b, || b.grouped_matmul(&x, &offsets, w, &mut y, shape))
    })?;
    clocks.push(clock);
    let gemv_gbps = (experts * (nd * kd + kd + nd) * dtype.size()) as f64 / (t * 1e-3) / 1e9;
    drop((x, wh, y));
    // 2. A permute copying 256 MiB of rows (read and written); 64 MiB where a backend cannot
    //    bind that much at once (wgpu), which may then partly sit in a large cache.
    let (copy_gbps, clock) = match permute_gbps(b, dtype, seed.wrapping_add(4), stream / 2) {
        Ok(r) => r,
        Err(_) if stream / 2 > EXPERT_BYTES => permute_gbps(b, dtype, seed.wrapping_add(4), EXPERT_BYTES)?,
        Err(e) => return Err(e),
    };
    clocks.push(clock);
    Ok(Ceilings {
        gemm_gflops,
        gemv_gbps,
        copy_gbps,
        bandwidth_gbps: gemv_gbps.max(copy_gbps),
        clock: if clocks.iter().all(|&c| c == Clock::Device) {
            Clock::Device
        } else {
            Clock::Wall
        },
    })
}

/// What [`Sweep::run_on`] measured on one backend.
struct Run {
    /// The ceilings every fraction is judged against.
    ceilings: Ceilings,
    /// The two measurements they come from, before and after the runs: far apart, they say the
    /// host was disturbed during the run.
    measured: [Ceilings; 2],
    /// Which record raised the GEMM peak, if one did ([`peak_at_least_achieved`]).
    raised: Option<String>,
    records: Vec<Record>,
}

/// `c` with its GEMM peak raised to the best rate (FLOPs over the median time) of any record, where
/// one beat the measured peak, and which record that was. A kernel cannot do more FLOPs per second
/// than the machine can: a peak below one was measured while the host was disturbed, and would let
/// every fraction judged against it read too high (bf16 at 256 tokens on the shared dev VM: peak 207
/// GFLOP/s in two runs, gate/up 215-217 in the same runs, against a peak of 281 in another). The
/// bandwidth is not raised this way: a kernel's bytes may come from a cache.
fn peak_at_least_achieved(c: Ceilings, records: &[Record]) -> (Ceilings, Option<String>) {
    let best = records
        .iter()
        .filter(|r| r.gflops.is_finite())
        .max_by(|a, b| a.gflops.total_cmp(&b.gflops));
    match best {
        Some(r) if r.gflops > c.gemm_gflops => (
            Ceilings {
                gemm_gflops: r.gflops,
                ..c
            },
            Some(format!(
                "raised from the measured {:.1} to {} at {} tokens",
                c.gemm_gflops, r.kernel, r.tokens
            )),
        ),
        _ => (c, None),
    }
}

/// Notes for the layer records of a run over several batches that streamed faster than the
/// bandwidth ceiling: their weights outgrow any cache, so the ceiling was measured in a slower
/// spell of the host, and the run's bandwidth-bound fractions read high.
fn above_bandwidth(name: &str, c: &Ceilings, records: &[Record]) -> Vec<String> {
    records
        .iter()
        .filter(|r| r.kernel == "layer" && r.gbps > c.bandwidth_gbps)
        .map(|r| {
            format!(
                "note: {name} layer at {} tokens streamed {:.1} GB/s, above the {:.1} GB/s ceiling: the host's memory \
                 bandwidth changed during the run, so its fractions are not comparable",
                r.tokens, r.gbps, c.bandwidth_gbps
            )
        })
        .collect()
}

/// The roofline bound of `r`'s work (FLOPs over the GEMM peak or bytes over the bandwidth,
/// whichever takes longer) over its median time.
fn roofline_fraction(c: &Ceilings, r: &Record) -> f64 {
    let s = r.median_ms * 1e-3;
    let (flops, bytes) = (r.gflops * 1e9 * s, r.gbps * 1e9 * s);
    (flops / (c.gemm_gflops * 1e9)).max(bytes / (c.bandwidth_gbps * 1e9)) / s
}

/// The best time of `run` on weights `wh` uploaded with [`Backend::upload`] and with
/// [`Backend::upload_weights`] (one copy on the backend at a time). Where the backend does not pack
/// `wh`'s dtype ([`moe_hal::Capabilities::packed_weights`]) both store the same, so it runs once.
fn best_of_uploads<B: Backend>(
    b: &B,
    wh: &HostVec,
    shape: GemmShape,
    mut run: impl FnMut(&B::Buffer) -> Result<(f64, Clock), String>,
) -> Result<(f64, Clock), String> {
    if !b.capabilities().packed_weights.contains(&wh.dtype()) {
        let w = b.upload_weights(wh.as_slice(), shape).map_err(|e| e.to_string())?;
        return run(&w);
    }
    let w = b.upload(wh.as_slice()).map_err(|e| e.to_string())?;
    let plain = run(&w)?;
    drop(w);
    let w = b.upload_weights(wh.as_slice(), shape).map_err(|e| e.to_string())?;
    let packed = run(&w)?;
    Ok(if packed.0 < plain.0 { packed } else { plain })
}

/// Bytes each bandwidth ceiling touches.
const STREAM_BYTES: usize = 512 << 20;
/// Weight bytes per expert of the streaming ceiling.
const EXPERT_BYTES: usize = 64 << 20;

/// GB/s of a permute copying `bytes` of rows to one expert (read once, written once).
fn permute_gbps<B: Backend>(b: &B, dtype: DType, seed: u64, bytes: usize) -> Result<(f64, Clock), String> {
    let err = |e: moe_hal::MoeError| e.to_string();
    let tokens = 8192usize;
    let hidden = (bytes / (tokens * dtype.size())).max(1);
    let x = b
        .upload(random_host(seed, tokens * hidden, -1.0, 1.0, dtype).as_slice())
        .map_err(err)?;
    let ids = b.upload(HostSlice::U32(&vec![0u32; tokens])).map_err(err)?;
    let pshape = PermuteShape {
        tokens,
        hidden,
        top_k: 1,
        experts: 1,
    };
    let mut perm = Permuted::alloc(b, pshape, dtype).map_err(err)?;
    let (t, clock) = best_ms(b, || b.permute(&x, &ids, pshape, &mut perm))?;
    Ok((
        (2 * tokens * hidden * dtype.size() + tokens * 12) as f64 / (t * 1e-3) / 1e9,
        clock,
    ))
}

/// FLOPs and bytes touched by one measurement.
#[derive(Clone, Copy, Debug, Default)]
struct Work {
    flops: f64,
    bytes: f64,
}

struct Sweep<'a> {
    shape: &'a Shape,
    dtype: DType,
    tokens: &'a [usize],
    warmup: usize,
    repeat: usize,
    inputs: usize,
    seed: u64,
    progress: &'a ProgressBar,
}

impl Sweep<'_> {
    /// A record of `w` done in `t`; its roofline fraction is set by [`Sweep::run_on`] once the
    /// ceilings are final.
    fn record(&self, backend: &str, tokens: usize, kernel: &str, t: Timing, w: Work) -> Record {
        let s = t.median_ms * 1e-3;
        Record {
            backend: backend.to_string(),
            preset: self.shape.label.clone(),
            dtype: self.dtype.to_string(),
            tokens,
            kernel: kernel.to_string(),
            median_ms: t.median_ms,
            min_ms: t.min_ms,
            max_ms: t.max_ms,
            gflops: w.flops / s / 1e9,
            gbps: w.bytes / s / 1e9,
            roofline_fraction: f64::NAN,
            clock: t.clock.name().to_string(),
        }
    }

    /// The five kernels at every token count, on buffers prepared here.
    /// `(gate_up, down)` are the layer's expert weights as it uploaded them ([`MoeLayer::expert_weights`]).
    fn kernels<B: Backend>(
        &self,
        b: &B,
        lw: &LayerWeights,
        (gate_up, down): (&B::Buffer, &B::Buffer),
    ) -> Result<Vec<Record>, String> {
        let err = |e: moe_hal::MoeError| e.to_string();
        let (h, i, e, k) = (self.shape.hidden, self.shape.inter, self.shape.experts, self.shape.topk);
        let dt = self.dtype;
        let ds = dt.size() as f64;
        let tmax = *self.tokens.iter().max().expect("at least one token count");
        let router_w = b.upload(HostSlice::F32(&lw.router_weight)).map_err(err)?;
        let x = b
            .upload(random_host(self.seed.wrapping_add(10), tmax * h, -1.0, 1.0, dt).as_slice())
            .map_err(err)?;
        let mut logits = b.alloc(DType::F32, tmax * e).map_err(err)?;
        let mut ids = b.alloc(DType::U32, tmax * k).map_err(err)?;
        let mut rw = b.alloc(DType::F32, tmax * k).map_err(err)?;
        let pmax = PermuteShape {
            tokens: tmax,
            hidden: h,
            top_k: k,
            experts: e,
        };
        let mut perm = Permuted::alloc(b, pmax, dt).map_err(err)?;
        let mut act = b.alloc(dt, tmax * k * i).map_err(err)?;
        let mut eout = b.alloc(dt, tmax * k * h).map_err(err)?;
        let mut out = b.alloc(dt, tmax * h).map_err(err)?;
        let mut records = Vec::new();
        for &t in self.tokens {
            let rows = t * k;
            let LayerShapes {
                router: rshape,
                permute: pshape,
                gate_up: gu,
                down: dn,
                combine: cs,
            } = LayerShapes::new(t, h, i, e, k).map_err(err)?;
            // One pass to fill every buffer and learn which experts receive tokens.
            b.router_logits(&x, &router_w, &mut logits, rshape).map_err(err)?;
            b.route(&logits, &self.shape.spec, t, &mut ids, &mut rw).map_err(err)?;
            b.permute(&x, &ids, pshape, &mut perm).map_err(err)?;
            let counts = b.download(&perm.counts).map_err(err)?.into_u32().unwrap_or_default();
            let active = counts.iter().take(e).filter(|&&c| c > 0).count() as f64;
            let (tf, hf, i_f, ef, kf, rf) = (t as f64, h as f64, i as f64, e as f64, k as f64, rows as f64);
            let idx = rf * 4.0 * 2.0;
            let works = [
                Work {
                    flops: 2.0 * tf * hf * ef,
                    bytes: ef * hf * 4.0 + tf * hf * ds + tf * ef * 4.0 + tf * kf * 8.0,
                },
                Work {
                    flops: 0.0,
                    bytes: tf * hf * ds + rf * hf * ds + idx + tf * kf * 4.0 + (ef + 1.0) * 8.0,
                },
                Work {
                    flops: 2.0 * rf * hf * 2.0 * i_f,
                    bytes: active * 2.0 * i_f * hf * ds + rf * hf * ds + rf * i_f * ds,
                },
                Work {
                    flops: 2.0 * rf * i_f * hf,
                    bytes: active * hf * i_f * ds + rf * i_f * ds + rf * hf * ds,
                },
                Work {
                    flops: 2.0 * rf * hf,
                    bytes: rf * hf * ds + tf * hf * ds + tf * kf * 12.0,
                },
            ];
            for (kernel, w) in KERNELS.iter().zip(works) {
                let (wu, rp) = (self.warmup, self.repeat);
                let timing = match *kernel {
                    "route" => time(b, wu, rp, || {
                        b.router_logits(&x, &router_w, &mut logits, rshape)?;
                        b.route(&logits, &self.shape.spec, t, &mut ids, &mut rw)
                    })?,
                    "permute" => time(b, wu, rp, || b.permute(&x, &ids, pshape, &mut perm))?,
                    "gemm_gate_up" => time(b, wu, rp, || {
                        b.grouped_matmul(&perm.rows, &perm.offsets, gate_up, &mut act, gu)
                    })?,
                    "gemm_down" => time(b, wu, rp, || b.grouped_matmul(&act, &perm.offsets, down, &mut eout, dn))?,
                    _ => time(b, wu, rp, || b.combine(&eout, &ids, &rw, &perm.slot_of, &mut out, cs))?,
                };
                records.push(self.record(b.name(), t, kernel, timing, w));
                self.progress.inc(1);
            }
        }
        Ok(records)
    }

    /// The whole layer (`MoeLayer::forward_into`) at every token count.
    fn layer<B: Backend + Clone>(&self, mut layer: MoeLayer<B>, kernels: &[Record]) -> Result<Vec<Record>, String> {
        let err = |e: moe_hal::MoeError| e.to_string();
        let name = layer.backend().name();
        let h = self.shape.hidden as f64;
        let ds = self.dtype.size() as f64;
        let tmax = *self.tokens.iter().max().expect("at least one token count");
        // A handle on the same device, to synchronise while the layer is borrowed.
        let sync = layer.backend().clone();
        // Batch 0 is the kernels' input; the others route to other experts.
        let xs = (0..self.inputs as u64)
            .map(|j| {
                let seed = if j == 0 {
                    self.seed.wrapping_add(10)
                } else {
                    self.seed.wrapping_add(1000 + j)
                };
                let xh = random_host(seed, tmax * self.shape.hidden, -1.0, 1.0, self.dtype);
                layer.backend().upload(xh.as_slice())
            })
            .collect::<moe_hal::Result<Vec<_>>>()
            .map_err(err)?;
        let mut out = layer
            .backend()
            .alloc(self.dtype, tmax * self.shape.hidden)
            .map_err(err)?;
        let mut records = Vec::new();
        let expert_bytes = 3.0 * h * self.shape.inter as f64 * ds;
        for &t in self.tokens {
            // FLOPs: what the kernels computed, plus the shared expert's dense MLP.
            let mut w = Work::default();
            for r in kernels.iter().filter(|r| r.tokens == t) {
                w.flops += r.gflops * 1e9 * r.median_ms * 1e-3;
            }
            // Bytes, as issue 8 defines the bound: the weights of the experts actually chosen,
            // averaged over the timed runs' batches (these forwards are also the runs' first
            // warm-up), and the shared expert's. Activations and the router's weight are left out,
            // so that a layer that moves fewer of them gains against the bound.
            let mut chosen = Vec::with_capacity(xs.len());
            for xb in &xs {
                layer.forward_into(xb, t, &mut out).map_err(err)?;
                let (ids, _) = layer.last_routing().map_err(err)?;
                let mut seen = vec![false; self.shape.experts];
                for &e in &ids {
                    if let Some(s) = seen.get_mut(e as usize) {
                        *s = true;
                    }
                }
                chosen.push(seen.iter().filter(|&&s| s).count());
            }
            // Run r (counted from 1, warm-up first) reads batch r mod the batches; `time` times
            // at least one run.
            let n = self.repeat.max(1);
            let timed = (self.warmup + 1..=self.warmup + n).map(|r| chosen[r % xs.len()]);
            w.bytes = timed.sum::<usize>() as f64 / n as f64 * expert_bytes;
            if let Some(si) = self.shape.shared_inter {
                let (tf, sf) = (t as f64, si as f64);
                w.flops += 2.0 * tf * h * 3.0 * sf + 2.0 * tf * h;
                w.bytes += 3.0 * sf * h * ds;
            }
            let mut run = 0;
            let timing = time(&sync, self.warmup, self.repeat, || {
                run += 1;
                layer.forward_into(&xs[run % xs.len()], t, &mut out)
            })?;
            records.push(self.record(name, t, "layer", timing, w));
            self.progress.inc(1);
        }
        Ok(records)
    }

    /// The ceilings and every record, each judged against the final ceilings.
    fn run_on<B: Backend + Clone>(&self, b: B, lw: &LayerWeights) -> Result<Run, String> {
        let caps = b.capabilities();
        let largest = (lw.gate_up.len() * self.dtype.size()) as u64;
        if largest > caps.max_buffer_bytes {
            return Err(format!(
                "{}: the gate_up weights take {} but the backend's largest buffer is {}; try fewer --experts",
                b.name(),
                gb(largest as u128),
                gb(caps.max_buffer_bytes as u128)
            ));
        }
        b.check_router(&self.shape.spec).map_err(|e| e.to_string())?;
        self.progress.set_message(format!("{}: ceilings", b.name()));
        let first = ceilings(&b, self.dtype, self.seed.wrapping_add(100))?;
        self.progress.inc(1);
        self.progress.set_message(format!("{}: kernels", b.name()));
        // The kernels run on the layer's own expert weights: one upload of them, not two (at
        // qwen3-30b-a3b in f32, 2.4 GB less to fault in, where that took a second per GB).
        let layer = MoeLayer::new(b.clone(), lw).map_err(|e| e.to_string())?;
        let mut records = self.kernels(&b, lw, layer.expert_weights())?;
        self.progress.set_message(format!("{}: layer", b.name()));
        let after = b.clone();
        let layer_records = self.layer(layer, &records)?;
        records.extend(layer_records);
        // Measured again after the runs, each ceiling the better of the two: on a shared machine a
        // disturbed measurement would lower a ceiling and flatter every fraction judged against it.
        self.progress.set_message(format!("{}: ceilings again", after.name()));
        let second = ceilings(&after, self.dtype, self.seed.wrapping_add(100))?;
        self.progress.inc(1);
        let (c, raised) = peak_at_least_achieved(first.best(&second), &records);
        for r in &mut records {
            r.roofline_fraction = roofline_fraction(&c, r);
        }
        Ok(Run {
            ceilings: c,
            measured: [first, second],
            raised,
            records,
        })
    }
}

/// Picks the backends to run: one by name, or every available one.
fn backends(name: &str) -> Result<Vec<&'static str>, String> {
    if name == "all" {
        let names: Vec<&'static str> = registry::probe_all()
            .into_iter()
            .filter(|s| s.available())
            .map(|s| s.name)
            .collect();
        if names.is_empty() {
            return Err("no backend is available here (see `moe-bench info`)".into());
        }
        return Ok(names);
    }
    let s = registry::probe(name).ok_or_else(|| {
        format!(
            "unknown backend {name:?}; expected one of {} or all",
            registry::BACKENDS.join(", ")
        )
    })?;
    match s.device {
        Ok(_) => Ok(vec![s.name]),
        Err(why) => Err(format!("backend {name} is unavailable: {why}")),
    }
}

pub fn bench(a: &BenchArgs) -> Result<(), String> {
    let dtype = match DType::parse(&a.dtype) {
        Some(d) if d.is_float() => d,
        _ => return Err(format!("unknown dtype {:?}; expected f32, bf16 or f16", a.dtype)),
    };
    let tokens = parse_tokens(&a.tokens)?;
    if a.repeat == 0 {
        return Err("--repeat must be at least 1".into());
    }
    if a.inputs == 0 || a.inputs > 1024 {
        return Err(format!("--inputs {}: expected 1 to 1024 token batches", a.inputs));
    }
    let shape = resolve(a)?;
    if let Some(p) = &a.plot {
        report::check_plot_path(p)?;
    }
    for (flag, p) in [("json", &a.json), ("csv", &a.csv), ("plot", &a.plot)] {
        if let Some(p) = p {
            check_writable(p, flag)?;
        }
    }
    let names = backends(&a.backend)?;
    let max_tokens = *tokens.last().expect("parse_tokens returns at least one");
    let est = estimate(&shape, dtype, max_tokens, a.inputs)?;
    let bf16_total = estimate(&shape, DType::BF16, max_tokens, a.inputs)?.total;
    check_memory(&shape, dtype, max_tokens, &est, bf16_total)?;

    let steps = names.len() as u64 * (2 + tokens.len() as u64 * (KERNELS.len() as u64 + 1));
    let progress = ProgressBar::new(steps);
    progress.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    progress.set_message("generating weights");
    let started = Instant::now();
    let lw = host_weights(&shape, dtype, a.seed);
    let sweep = Sweep {
        shape: &shape,
        dtype,
        tokens: &tokens,
        warmup: a.warmup,
        repeat: a.repeat,
        inputs: a.inputs,
        seed: a.seed,
        progress: &progress,
    };
    let mut all = Vec::new();
    let mut runs = Vec::new();
    let every = a.backend == "all";
    for name in names {
        let run = match name {
            "cpu" => moe_hal::cpu::CpuBackend::new()
                .map_err(|e| e.to_string())
                .and_then(|b| sweep.run_on(b, &lw)),
            "wgpu" => moe_hal::wgpu::WgpuBackend::new()
                .map_err(|e| e.to_string())
                .and_then(|b| sweep.run_on(b, &lw)),
            "cuda" => moe_hal::cuda::CudaBackend::new()
                .map_err(|e| e.to_string())
                .and_then(|b| sweep.run_on(b, &lw)),
            "cann" => moe_hal::cann::CannBackend::new()
                .map_err(|e| e.to_string())
                .and_then(|b| sweep.run_on(b, &lw)),
            other => Err(format!("backend {other} cannot be benchmarked by this build")),
        };
        match run {
            Ok(mut run) => {
                all.append(&mut run.records);
                runs.push((name, run));
            }
            // With `all`, a backend that cannot run this shape is skipped, not fatal.
            Err(e) if every => progress.suspend(|| eprintln!("moe-bench: skipping {name}: {e}")),
            Err(e) => return Err(e),
        }
    }
    progress.finish_and_clear();
    if all.is_empty() {
        return Err("no backend could run this benchmark (see the lines above)".into());
    }
    drop(lw);

    println!(
        "{}: H {} I {} E {} k {}{}, {dtype}, {} repeats after {} warm-up{}, {:.1} s",
        shape.label,
        shape.hidden,
        shape.inter,
        shape.experts,
        shape.topk,
        shape.shared_inter.map(|s| format!(", shared {s}")).unwrap_or_default(),
        a.repeat,
        a.warmup,
        if a.inputs > 1 {
            format!(", layer over {} token batches", a.inputs)
        } else {
            String::new()
        },
        started.elapsed().as_secs_f64()
    );
    for (name, run) in &runs {
        let (c, [before, after]) = (&run.ceilings, &run.measured);
        let peak = match &run.raised {
            Some(why) => format!("GEMM peak {:.1} GFLOP/s ({why})", c.gemm_gflops),
            None => format!("GEMM peak {:.1} GFLOP/s (1024x2048x2048 {dtype})", c.gemm_gflops),
        };
        println!(
            "{name}: ceilings (best of before and after the runs): {peak}, memory bandwidth {:.1} GB/s (stream GEMV {:.1}, copy {:.1}); {} clock; before / after: {:.1} / {:.1} GFLOP/s, {:.1} / {:.1} GB/s",
            c.bandwidth_gbps,
            c.gemv_gbps,
            c.copy_gbps,
            c.clock.name(),
            before.gemm_gflops,
            after.gemm_gflops,
            before.bandwidth_gbps,
            after.bandwidth_gbps
        );
    }
    print!("{}", report::table(&all));
    if a.inputs > 1 {
        for (name, run) in &runs {
            for note in above_bandwidth(name, &run.ceilings, &run.records) {
                println!("{note}");
            }
        }
    }
    if let Some(p) = &a.json {
        report::write_json(p, &all)?;
    }
    if let Some(p) = &a.csv {
        report::write_csv(p, &all)?;
    }
    if let Some(p) = &a.plot {
        report::write_plot(p, &all)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CPU record of `kernel` at `tokens` with these rates over a median of `median_ms`.
    fn record(kernel: &str, tokens: usize, median_ms: f64, gflops: f64, gbps: f64) -> Record {
        Record {
            backend: "cpu".into(),
            preset: "p".into(),
            dtype: "f32".into(),
            tokens,
            kernel: kernel.into(),
            median_ms,
            min_ms: median_ms * 0.9,
            max_ms: median_ms * 1.1,
            gflops,
            gbps,
            roofline_fraction: f64::NAN,
            clock: "wall".into(),
        }
    }

    #[test]
    fn ceilings_keep_the_better_measurement_and_fractions_follow() {
        let (a, b) = (
            Ceilings {
                gemm_gflops: 100.0,
                gemv_gbps: 20.0,
                copy_gbps: 10.0,
                bandwidth_gbps: 20.0,
                clock: Clock::Wall,
            },
            Ceilings {
                gemm_gflops: 80.0,
                gemv_gbps: 15.0,
                copy_gbps: 25.0,
                bandwidth_gbps: 25.0,
                clock: Clock::Wall,
            },
        );
        let c = a.best(&b);
        assert_eq!(
            (c.gemm_gflops, c.gemv_gbps, c.copy_gbps, c.bandwidth_gbps),
            (100.0, 20.0, 25.0, 25.0)
        );
        // 2 GFLOP and 10 GB in 1 s: 20 ms at the peak, 400 ms at 25 GB/s.
        let r = record("layer", 1, 1000.0, 2.0, 10.0);
        let f = roofline_fraction(&c, &r);
        assert!((f - 0.4).abs() < 1e-12, "{f}");
        assert!((roofline_fraction(&a, &r) - 0.5).abs() < 1e-12);
    }

    /// Only layer records that streamed past the bandwidth ceiling get a note.
    #[test]
    fn layers_above_the_bandwidth_ceiling_get_a_note() {
        let c = Ceilings {
            gemm_gflops: 100.0,
            gemv_gbps: 50.0,
            copy_gbps: 40.0,
            bandwidth_gbps: 50.0,
            clock: Clock::Wall,
        };
        let mut fast = record("layer", 1, 1.0, 1.0, 55.0);
        let slow = record("layer", 16, 1.0, 1.0, 45.0);
        let kernel = record("gemm_down", 1, 1.0, 1.0, 80.0);
        let notes = above_bandwidth("cpu", &c, &[fast.clone(), slow, kernel]);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].contains("layer at 1 tokens streamed 55.0 GB/s, above the 50.0"),
            "{notes:?}"
        );
        fast.gbps = 50.0;
        assert!(above_bandwidth("cpu", &c, &[fast]).is_empty());
    }

    /// A record faster than the measured peak raises it, so that no compute-bound record reads
    /// above 100%; slower records, NaN rates and the bandwidth leave the ceilings as measured.
    #[test]
    fn peak_is_at_least_what_a_kernel_achieved() {
        let c = Ceilings {
            gemm_gflops: 200.0,
            gemv_gbps: 25.0,
            copy_gbps: 20.0,
            bandwidth_gbps: 25.0,
            clock: Clock::Wall,
        };
        let rec = |kernel: &str, tokens: usize, gflops: f64, gbps: f64| record(kernel, tokens, 60.0, gflops, gbps);
        let slower = [rec("gemm_down", 256, 150.0, 12.0), rec("route", 256, f64::NAN, 90.0)];
        let (same, why) = peak_at_least_achieved(c, &slower);
        assert_eq!((same.gemm_gflops, same.bandwidth_gbps, why), (200.0, 25.0, None));

        let faster = [
            rec("gemm_down", 256, 150.0, 12.0),
            rec("gemm_gate_up", 256, 216.6, 13.7),
        ];
        let (raised, why) = peak_at_least_achieved(c, &faster);
        assert_eq!((raised.gemm_gflops, raised.bandwidth_gbps), (216.6, 25.0));
        assert_eq!(
            why.as_deref(),
            Some("raised from the measured 200.0 to gemm_gate_up at 256 tokens")
        );
        // Against the measured peak it read 108%; against the raised one, exactly its bound.
        assert!(roofline_fraction(&c, &faster[1]) > 1.08);
        assert!((roofline_fraction(&raised, &faster[1]) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn tokens_parse() {
        assert_eq!(parse_tokens("4,1,2,2").unwrap(), vec![1, 2, 4]);
        assert!(parse_tokens("").is_err());
        assert!(parse_tokens("0").is_err());
        assert!(parse_tokens("1,,2").is_err());
        assert!(parse_tokens("-1").is_err());
    }

    #[test]
    fn deepseek_f32_needs_about_90_gb() {
        let a = BenchArgs {
            preset: Some("deepseek-v3".into()),
            hidden: None,
            inter: None,
            experts: None,
            topk: None,
            groups: None,
            tokens: "1".into(),
            dtype: "f32".into(),
            backend: "cpu".into(),
            repeat: 1,
            warmup: 0,
            inputs: 1,
            json: None,
            csv: None,
            plot: None,
            seed: 0,
        };
        let s = resolve(&a).unwrap();
        let est = estimate(&s, DType::F32, 1, 1).unwrap();
        // 256 * 3 * 2048 * 7168 * 4 bytes of routed weights = 45.1 GB.
        assert!(est.weights > 45_000_000_000 && est.weights < 46_000_000_000, "{est:?}");
        assert!(est.total > 2 * est.weights);
    }
}

//! `moe-bench`: backend info, verification against the float64 reference,
//! real checkpoint layers, benchmarks (`bench`, `compare`).
//!
//! Every error is one line on stderr and a non-zero exit; nothing panics on
//! user input.

use clap::{Parser, Subcommand};
use moe_hal::conformance::{self, Report};
use moe_hal::registry::{self, BackendStatus};
use moe_hal::{Kernel, MoeError};
use std::collections::BTreeMap;
use std::path::PathBuf;

mod bench;
mod report;
mod run;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "moe-bench",
    version,
    about = "Mixture-of-Experts kernels on every backend: info, verify, run, bench, compare"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Which backends are compiled in, whether each runs here (and if not, why), devices and capabilities.
    Info {
        /// One backend: cpu, wgpu, cuda, cann (default: all).
        #[arg(long)]
        backend: Option<String>,
    },
    /// Every available backend against the float64 reference on a battery of seeded cases.
    Verify {
        /// A backend name or `all` (every available backend).
        #[arg(long, default_value = "all")]
        backend: String,
        /// Fewer token counts (a few seconds).
        #[arg(long)]
        quick: bool,
        /// Print every case, not only the summary.
        #[arg(long)]
        verbose: bool,
    },
    /// Runs one MoE layer of a Hugging Face checkpoint on an input and writes the output.
    Run {
        /// Model folder: config.json plus model.safetensors or model.safetensors.index.json and shards.
        #[arg(long)]
        model: PathBuf,
        /// Layer index (must be a MoE layer of that model).
        #[arg(long)]
        layer: usize,
        /// safetensors file holding `hidden_states` [T, H] (or [1, T, H]).
        #[arg(long)]
        input: PathBuf,
        /// safetensors file to write: `hidden_states` f32 [T, H], `router.topk_ids` i64 [T, k], `router.topk_weights` f32 [T, k].
        #[arg(long)]
        output: PathBuf,
        /// cpu, wgpu, cuda or cann.
        #[arg(long, default_value = "cpu")]
        backend: String,
        /// Compute dtype: f32, bf16 or f16.
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// Times every kernel and the whole layer at a model's shapes over token counts, with roofline fractions.
    Bench(Box<bench::BenchArgs>),
    /// Two `bench --json` files side by side (matched on preset, dtype, tokens, kernel; backend by backend where both files hold several), with B/A of the medians.
    Compare {
        /// Baseline records (A).
        a: PathBuf,
        /// Records to compare against A (B).
        b: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info { backend } => info(backend.as_deref()),
        Command::Verify {
            backend,
            quick,
            verbose,
        } => verify(&backend, quick, verbose),
        Command::Run {
            model,
            layer,
            input,
            output,
            backend,
            dtype,
        } => run::run(&model, layer, &input, &output, &backend, &dtype).map(|()| ExitCode::SUCCESS),
        Command::Bench(args) => bench::bench(&args).map(|()| ExitCode::SUCCESS),
        Command::Compare { a, b } => report::compare(&a, &b).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("moe-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn known(name: &str) -> Result<BackendStatus, String> {
    registry::probe(name).ok_or_else(|| {
        format!(
            "unknown backend {name:?}; expected one of {}",
            registry::BACKENDS.join(", ")
        )
    })
}

fn info(backend: Option<&str>) -> Result<ExitCode, String> {
    let statuses = match backend {
        Some(name) => vec![known(name)?],
        None => registry::probe_all(),
    };
    for s in &statuses {
        if s.name == "cann" && backend.is_some() {
            // The slot's own report: probe result (libraries, symbols) and the operator map.
            println!("{}", moe_hal::cann::info_text());
            continue;
        }
        println!("{}", s.name);
        println!(
            "  compiled in : {}",
            if s.compiled {
                "yes".to_string()
            } else {
                format!("no (feature `{}`)", s.feature)
            }
        );
        match &s.device {
            Ok(d) => println!("  available   : yes\n  device      : {d}"),
            Err(why) => println!("  available   : no: {why}"),
        }
        if let Some(c) = &s.capabilities {
            for k in Kernel::ALL {
                let d = c
                    .kernel(k)
                    .map(|k| k.dtypes.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "));
                println!("  {:<14}: {}", k.name(), d.unwrap_or_else(|| "not supported".into()));
            }
            let binding = if c.max_binding_bytes < c.max_buffer_bytes {
                format!(" ({} at once per kernel)", binary_size(c.max_binding_bytes))
            } else {
                String::new()
            };
            println!(
                "  limits      : max buffer {}{binding}, max experts {}, max top-k {}",
                binary_size(c.max_buffer_bytes),
                c.max_experts,
                c.max_top_k
            );
            let packed: Vec<String> = c.packed_weights.iter().map(|d| d.to_string()).collect();
            println!(
                "  packed      : {}",
                if packed.is_empty() {
                    "no weights (upload_weights stores them as upload does)".to_string()
                } else {
                    format!("{} weights (upload_weights packs them once at load)", packed.join(", "))
                }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `bytes` in whole MiB, as device limits are given; from 1 PiB on (no device has that much: it
/// means "no limit of its own", the CPU's `isize::MAX`), in PiB or EiB to one decimal instead of
/// thirteen digits of MiB.
fn binary_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 60 => format!("{:.1} EiB", b as f64 / (1u64 << 60) as f64),
        b if b >= 1 << 50 => format!("{:.1} PiB", b as f64 / (1u64 << 50) as f64),
        b => format!("{} MiB", b >> 20),
    }
}

/// Runs `f` on the named backend (generic at this edge only).
fn with_backend<T>(name: &str, f: impl FnOnce(&dyn Fn() -> Report) -> T, quick: bool) -> Result<T, MoeError> {
    match name {
        "cpu" => {
            let b = moe_hal::cpu::CpuBackend::new()?;
            Ok(f(&|| conformance::run_all(&b, quick)))
        }
        "wgpu" => {
            let b = moe_hal::wgpu::WgpuBackend::new()?;
            Ok(f(&|| conformance::run_all(&b, quick)))
        }
        "cuda" => {
            let b = moe_hal::cuda::CudaBackend::new()?;
            Ok(f(&|| conformance::run_all(&b, quick)))
        }
        "cann" => {
            let b = moe_hal::cann::CannBackend::new()?;
            Ok(f(&|| conformance::run_all(&b, quick)))
        }
        other => {
            let why = registry::probe(other)
                .and_then(|s| s.device.err())
                .unwrap_or_else(|| "unknown backend".into());
            Err(MoeError::unavailable(other, why))
        }
    }
}

fn verify(backend: &str, quick: bool, verbose: bool) -> Result<ExitCode, String> {
    let names: Vec<String> = if backend == "all" {
        registry::probe_all()
            .into_iter()
            .filter_map(|s| match s.device {
                Ok(_) => Some(s.name.to_string()),
                Err(why) => {
                    eprintln!("skipping {}: {why}", s.name);
                    None
                }
            })
            .collect()
    } else {
        known(backend).map_err(|e| format!("{e} or all"))?;
        vec![backend.to_string()]
    };
    if names.is_empty() {
        return Err("no backend is available to verify".into());
    }
    let mut ok = true;
    for (i, name) in names.iter().enumerate() {
        let report = with_backend(name, |run| run(), quick).map_err(|e| e.to_string())?;
        // The header once a backend has run, so that a backend that cannot start prints only
        // why.
        if i == 0 {
            println!(
                "{:<6} {:<15} {:>6} {:>6}  {:>12}  {:>10}",
                "backend", "kernel", "cases", "failed", "worst error", "tolerance"
            );
        }
        let mut by_kernel: BTreeMap<&str, (usize, usize, f64, f64)> = BTreeMap::new();
        for r in &report.results {
            let e = by_kernel.entry(r.kernel).or_default();
            e.0 += 1;
            e.1 += r.failure.is_some() as usize;
            if r.error.is_finite() && r.tolerance > 0.0 && r.error / r.tolerance >= e.2 / e.3.max(f64::MIN_POSITIVE) {
                e.2 = r.error;
                e.3 = r.tolerance;
            }
        }
        for (k, (n, failed, err, tol)) in by_kernel {
            let (err, tol) = if tol > 0.0 {
                (format!("{err:.2e}"), format!("{tol:.1e}"))
            } else {
                ("exact".into(), "exact".into())
            };
            println!("{name:<7} {k:<15} {n:>6} {failed:>6}  {err:>12}  {tol:>10}");
        }
        for f in report.failures() {
            println!(
                "  FAIL {} {} {}: {}",
                f.kernel,
                f.dtype,
                f.case,
                f.failure.as_deref().unwrap_or("")
            );
        }
        if verbose {
            print!("{report}");
        }
        ok &= report.passed();
    }
    if ok {
        println!("all cases match the float64 reference");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("moe-bench: verification failed (see FAIL lines above)");
        Ok(ExitCode::FAILURE)
    }
}

#[cfg(test)]
mod tests {
    use super::binary_size;

    /// Device limits stay in MiB; a limit of 1 PiB or more reads in PiB or EiB.
    #[test]
    fn binary_size_keeps_mib_and_shortens_the_unbounded() {
        assert_eq!(binary_size(2047 << 20), "2047 MiB");
        assert_eq!(binary_size(143_771 << 20), "143771 MiB");
        assert_eq!(binary_size((1 << 50) - 1), "1073741823 MiB");
        assert_eq!(binary_size(3 << 49), "1.5 PiB");
        assert_eq!(binary_size(isize::MAX as u64), "8.0 EiB");
        assert_eq!(binary_size(u64::MAX), "16.0 EiB");
    }
}

//! Every golden fixture (a MoE block run by transformers, see
//! scripts/golden/README.md) through `MoeLayer` on every backend present:
//! the same expert set per token, the same routing weights, and the output
//! within the dtype's tolerance of transformers' f32 output.
//!
//! In f32 every token must match. In bf16/f16 the hidden states themselves
//! are rounded before the router sees them (as in a half-precision model), so
//! a token whose choice is a near tie may legitimately pick another expert;
//! there at least 90% of tokens must pick the same set, and the weights and
//! outputs of those tokens are compared at the dtype's tolerance.

use moe_hal::checkpoint::{load_layer, read_tensors_f32};
use moe_hal::ndarray::Array2;
use moe_hal::reference::rel_l2;
use moe_hal::{tolerance, Backend, DType, Kernel, MoeError, MoeLayer};
use std::path::{Path, PathBuf};

fn fixtures() -> Vec<PathBuf> {
    // MOE_GOLDEN_DIR lets prebuilt test binaries run from another checkout (scripts/gpu-check.sh).
    let root = std::env::var_os("MOE_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden"));
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("fixtures folder")
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 8, "expected the 8 golden fixtures in {}", root.display());
    dirs
}

fn layer_of(dir: &Path) -> usize {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
    meta["layer"].as_u64().unwrap() as usize
}

/// Runs one fixture in `dtype`; returns the output's relative L2 error.
fn check<B: Backend + Clone>(b: &B, dir: &Path, dtype: DType) -> Result<f64, String> {
    let name = dir.file_name().unwrap().to_string_lossy().to_string();
    let w = load_layer(dir, layer_of(dir), dtype).map_err(|e| format!("{name}: {e}"))?;
    let io = read_tensors_f32(&dir.join("io.safetensors")).map_err(|e| e.to_string())?;
    let (xs, x) = &io["hidden_states"];
    let (t, h) = (xs[0], xs[1]);
    let k = w.router.top_k;
    let mut layer = MoeLayer::new(b.clone(), &w).map_err(|e| e.to_string())?;
    let out = layer
        .forward_host(Array2::from_shape_vec((t, h), x.clone()).unwrap().view())
        .map_err(|e| e.to_string())?;
    let (ids, wts) = layer.last_routing().map_err(|e| e.to_string())?;
    let (_, want_ids) = &io["router.topk_ids"];
    let (_, want_w) = &io["router.topk_weights"];
    // transformers orders ids by weight (DeepSeek: unsorted): compare as sets, weights matched by id.
    let (_, want_out) = &io["output"];
    let (mut got_w, mut ref_w, mut got_o, mut ref_o, mut differ) = (vec![], vec![], vec![], vec![], vec![]);
    for tok in 0..t {
        let mut mine: Vec<(u32, f32)> = (0..k).map(|j| (ids[[tok, j]], wts[[tok, j]])).collect();
        let mut theirs: Vec<(u32, f32)> = (0..k)
            .map(|j| (want_ids[tok * k + j] as u32, want_w[tok * k + j]))
            .collect();
        mine.sort_by_key(|p| p.0);
        theirs.sort_by_key(|p| p.0);
        if mine.iter().map(|p| p.0).ne(theirs.iter().map(|p| p.0)) {
            differ.push(format!(
                "token {tok}: experts {:?}, transformers chose {:?}",
                mine.iter().map(|p| p.0).collect::<Vec<_>>(),
                theirs.iter().map(|p| p.0).collect::<Vec<_>>()
            ));
            continue;
        }
        got_w.extend(mine.iter().map(|p| p.1 as f64));
        ref_w.extend(theirs.iter().map(|p| p.1 as f64));
        got_o.extend(out.row(tok).iter().map(|&v| v as f64));
        ref_o.extend(want_out[tok * h..(tok + 1) * h].iter().map(|&v| v as f64));
    }
    let allowed = if dtype == DType::F32 { 0 } else { t / 10 };
    if differ.len() > allowed {
        return Err(format!(
            "{name} {dtype}: {} of {t} tokens chose other experts: {}",
            differ.len(),
            differ.join("; ")
        ));
    }
    let tol = tolerance(dtype);
    let werr = rel_l2(&got_w, &ref_w);
    if werr > tol {
        return Err(format!(
            "{name} {dtype}: routing weights relative L2 {werr:.2e} > {tol:.1e}"
        ));
    }
    let err = rel_l2(&got_o, &ref_o);
    if err > tol {
        return Err(format!(
            "{name} {dtype}: output relative L2 {err:.2e} > tolerance {tol:.1e}"
        ));
    }
    Ok(err)
}

fn run_all<B: Backend + Clone>(name: &str, make: impl FnOnce() -> Result<B, MoeError>) {
    let b = match make() {
        Ok(b) => b,
        Err(e) => return moe_hal::conformance::absent_backend(name, e),
    };
    let mut failures = Vec::new();
    for dir in fixtures() {
        for dtype in DType::FLOATS {
            if !b.capabilities().supports(Kernel::GroupedMatmul, dtype) {
                continue;
            }
            match check(&b, &dir, dtype) {
                Ok(err) => eprintln!(
                    "{name} {:<28} {dtype:<5} output rel L2 {err:.2e}",
                    dir.file_name().unwrap().to_string_lossy()
                ),
                Err(e) => failures.push(e),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "golden failures on {name}:\n{}",
        failures.join("\n")
    );
}

#[cfg(feature = "cpu")]
#[test]
fn golden_cpu() {
    run_all("cpu", moe_hal::cpu::CpuBackend::new);
}

#[cfg(feature = "wgpu")]
#[test]
fn golden_wgpu() {
    run_all("wgpu", moe_hal::wgpu::WgpuBackend::new);
}

#[cfg(feature = "cuda")]
#[test]
fn golden_cuda() {
    run_all("cuda", moe_hal::cuda::CudaBackend::new);
}

#[cfg(feature = "cann")]
#[test]
fn golden_cann() {
    run_all("cann", moe_hal::cann::CannBackend::new);
}

//! The conformance suite, run against every backend compiled in.
//!
//! A backend that cannot run here is reported as SKIPPED with the reason;
//! `MOE_REQUIRE_BACKENDS=cpu,wgpu,...` turns that into a failure.

use moe_hal::conformance::{self, Report};
use moe_hal::registry;
use moe_hal::{Backend, MoeError};

/// Runs `suite` on the backend, or reports why it cannot.
fn run<B: Backend + Clone>(name: &str, make: impl FnOnce() -> Result<B, MoeError>, suite: impl FnOnce(&B) -> Report) {
    let backend = match make() {
        Ok(b) => b,
        Err(e) => return conformance::absent_backend(name, e),
    };
    let report = suite(&backend);
    assert!(report.passed(), "{report}");
    eprintln!("backend {name}: {} cases passed", report.results.len());
}

macro_rules! conformance {
    ($backend:ident, $make:expr, quick = $quick:expr) => {
        mod $backend {
            use super::*;

            #[test]
            fn route_and_topk() {
                run(stringify!($backend), $make, |b| {
                    conformance::route_suite(b, $quick)
                });
            }
            #[test]
            fn permute() {
                run(stringify!($backend), $make, |b| {
                    conformance::permute_suite(b, $quick)
                });
            }
            #[test]
            fn grouped_matmul() {
                run(stringify!($backend), $make, |b| {
                    conformance::gemm_suite(b, $quick)
                });
            }
            #[test]
            fn permute_matmul() {
                run(stringify!($backend), $make, |b| {
                    conformance::permute_matmul_suite(b, $quick)
                });
            }
            #[test]
            fn combine() {
                run(stringify!($backend), $make, |b| {
                    conformance::combine_suite(b, $quick)
                });
            }
            #[test]
            fn layer() {
                run(stringify!($backend), $make, |b| {
                    conformance::layer_suite(b, $quick)
                });
            }
            #[test]
            fn bad_input() {
                run(stringify!($backend), $make, conformance::bad_input_suite);
            }
        }
    };
}

#[cfg(feature = "cpu")]
conformance!(cpu, moe_hal::cpu::CpuBackend::new, quick = false);

// The whole suite: its shapes are small enough for software Vulkan (lavapipe runs it in about
// two seconds).
#[cfg(feature = "wgpu")]
conformance!(wgpu, moe_hal::wgpu::WgpuBackend::new, quick = false);

#[cfg(feature = "cuda")]
conformance!(cuda, moe_hal::cuda::CudaBackend::new, quick = false);

#[cfg(feature = "cann")]
conformance!(cann, moe_hal::cann::CannBackend::new, quick = true);

/// Prints which backends run here and fails when a required one does not.
#[test]
fn backends_present() {
    let required = registry::required_backends();
    let mut missing = Vec::new();
    for s in registry::probe_all() {
        match &s.device {
            Ok(d) => eprintln!("backend {:<5} available: {d}", s.name),
            Err(why) => {
                eprintln!("backend {:<5} SKIPPED: {why}", s.name);
                if required.iter().any(|r| r == s.name) {
                    missing.push(format!("{}: {why}", s.name));
                }
            }
        }
    }
    for r in &required {
        assert!(
            registry::BACKENDS.contains(&r.as_str()),
            "MOE_REQUIRE_BACKENDS names unknown backend {r:?}"
        );
    }
    assert!(missing.is_empty(), "required backends unavailable: {missing:?}");
}

/// The DeepSeek cases must exercise the bias and the group mask, or they prove nothing.
#[test]
fn deepseek_cases_are_meaningful() {
    let cases = conformance::route_cases(false);
    let c = cases
        .iter()
        .find(|c| c.name.starts_with("deepseek E=64 g8/4 k=8 bias T=257"))
        .expect("case exists");
    let (by_bias, by_groups) = conformance::bias_and_groups_matter(c);
    assert!(by_bias > 10, "the bias changes the choice of only {by_bias} tokens");
    assert!(
        by_groups > 10,
        "the group mask changes the choice of only {by_groups} tokens"
    );
}

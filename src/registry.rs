//! Which backends are compiled in, and whether each can run on this machine.

use crate::{Backend, Capabilities, MoeError};

/// What probing one backend found.
#[derive(Clone, Debug)]
pub struct BackendStatus {
    pub name: &'static str,
    /// Cargo feature that compiles it in.
    pub feature: &'static str,
    pub compiled: bool,
    /// The device, when available; else why not (the reason alone, without the backend's name).
    pub device: Result<String, String>,
    pub capabilities: Option<Capabilities>,
}

impl BackendStatus {
    pub fn available(&self) -> bool {
        self.device.is_ok()
    }
}

fn status_of<B: Backend>(name: &'static str, feature: &'static str, b: Result<B, MoeError>) -> BackendStatus {
    match b {
        Ok(b) => BackendStatus {
            name,
            feature,
            compiled: true,
            device: Ok(b.device_name()),
            capabilities: Some(b.capabilities()),
        },
        Err(e) => BackendStatus {
            name,
            feature,
            compiled: true,
            // The reason alone: callers say which backend is unavailable.
            device: Err(match e {
                MoeError::BackendUnavailable { reason, .. } => reason,
                e => e.to_string(),
            }),
            capabilities: None,
        },
    }
}

#[allow(dead_code)]
fn not_compiled(name: &'static str, feature: &'static str) -> BackendStatus {
    BackendStatus {
        name,
        feature,
        compiled: false,
        device: Err(format!("not compiled in (build with `--features {feature}`)")),
        capabilities: None,
    }
}

/// Names of every backend moe-hal knows, compiled in or not.
pub const BACKENDS: [&str; 4] = ["cpu", "wgpu", "cuda", "cann"];

/// Probes one backend by name; `None` for an unknown name.
pub fn probe(name: &str) -> Option<BackendStatus> {
    Some(match name {
        #[cfg(feature = "cpu")]
        "cpu" => status_of("cpu", "cpu", crate::cpu::CpuBackend::new()),
        #[cfg(not(feature = "cpu"))]
        "cpu" => not_compiled("cpu", "cpu"),
        #[cfg(feature = "wgpu")]
        "wgpu" => status_of("wgpu", "wgpu", crate::wgpu::WgpuBackend::new()),
        #[cfg(not(feature = "wgpu"))]
        "wgpu" => not_compiled("wgpu", "wgpu"),
        #[cfg(feature = "cuda")]
        "cuda" => status_of("cuda", "cuda", crate::cuda::CudaBackend::new()),
        #[cfg(not(feature = "cuda"))]
        "cuda" => not_compiled("cuda", "cuda"),
        #[cfg(feature = "cann")]
        "cann" => status_of("cann", "cann", crate::cann::CannBackend::new()),
        #[cfg(not(feature = "cann"))]
        "cann" => not_compiled("cann", "cann"),
        _ => return None,
    })
}

/// Probes every backend.
pub fn probe_all() -> Vec<BackendStatus> {
    BACKENDS.iter().filter_map(|n| probe(n)).collect()
}

pub use moe_hal_core::conformance::required_backends;

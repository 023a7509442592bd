//! NVRTC compilation of kernels/cuda/*.cu straight to a cubin for the
//! device's architecture (no PTX, so no PTX-version mismatch with the driver).

use cudarc::nvrtc::{result, sys};
use moe_hal_core::{MoeError, Result};
use std::ffi::CString;
use std::path::{Path, PathBuf};

/// The kernel sources, embedded at build time. `select.cuh` (shared by route and topk) is
/// prepended, so that NVRTC needs no include path of ours.
pub const SOURCES: [(&str, &str); 5] = [
    (
        "route.cu",
        concat!(
            include_str!("../../../kernels/cuda/select.cuh"),
            include_str!("../../../kernels/cuda/route.cu")
        ),
    ),
    (
        "topk.cu",
        concat!(
            include_str!("../../../kernels/cuda/select.cuh"),
            include_str!("../../../kernels/cuda/topk.cu")
        ),
    ),
    ("permute.cu", include_str!("../../../kernels/cuda/permute.cu")),
    (
        "grouped_matmul.cu",
        include_str!("../../../kernels/cuda/grouped_matmul.cu"),
    ),
    ("combine.cu", include_str!("../../../kernels/cuda/combine.cu")),
];

fn has_headers(dir: &Path) -> bool {
    dir.join("cuda_bf16.h").exists() && dir.join("cuda_fp16.h").exists() && dir.join("mma.h").exists()
}

/// Where the CUDA headers are: `MOE_CUDA_INCLUDE`, `CUDA_HOME`/`CUDA_PATH`,
/// next to a `libnvrtc` on `LD_LIBRARY_PATH` (PyPI wheels: `nvidia/cu13/{lib,include}`),
/// then `/usr/local/cuda/include`. NVRTC has no built-in copy of them.
pub fn find_include_dir() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("MOE_CUDA_INCLUDE") {
        candidates.push(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) = std::env::var_os(var) {
            candidates.push(PathBuf::from(p).join("include"));
        }
    }
    if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
        for dir in std::env::split_paths(&paths) {
            candidates.push(dir.join("../include"));
        }
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    candidates.into_iter().find(|d| has_headers(d))
}

/// Compiles one source for `sm_XX`; the error carries NVRTC's log.
pub fn compile_cubin(name: &str, src: &str, arch: &str, include: &Path) -> Result<Vec<u8>> {
    let err = |m: String| MoeError::Device {
        backend: "cuda".into(),
        message: format!("NVRTC, {name} for {arch}: {m}"),
    };
    let csrc = CString::new(src).map_err(|e| err(e.to_string()))?;
    let cname = CString::new(name).map_err(|e| err(e.to_string()))?;
    let prog = result::create_program(&csrc, Some(&cname)).map_err(|e| err(format!("{e:?}")))?;
    let opts = [
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        format!("--include-path={}", include.display()),
        "-default-device".to_string(),
    ];
    // SAFETY: `prog` was just created and is destroyed exactly once below.
    let compiled = unsafe { result::compile_program(prog, &opts) };
    let out = match compiled {
        Err(e) => {
            // SAFETY: as above; the log is read before the program is destroyed.
            let log = unsafe { result::get_program_log(prog) }
                .map(|l| {
                    l.iter()
                        .map(|&c| c as u8 as char)
                        .take_while(|&c| c != '\0')
                        .collect::<String>()
                })
                .unwrap_or_default();
            Err(err(format!("{e:?}: {log}")))
        }
        Ok(()) => {
            let mut size = 0usize;
            // SAFETY: `prog` compiled successfully; size then buffer, per the NVRTC API.
            let r = unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) };
            if r != sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
                Err(err(format!("no cubin ({r:?})")))
            } else {
                let mut cubin = vec![0u8; size];
                // SAFETY: `cubin` holds the `size` bytes NVRTC asked for.
                let r = unsafe { sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut _) };
                if r == sys::nvrtcResult::NVRTC_SUCCESS {
                    Ok(cubin)
                } else {
                    Err(err(format!("nvrtcGetCUBIN failed ({r:?})")))
                }
            }
        }
    };
    // SAFETY: created above, not destroyed before.
    let _ = unsafe { result::destroy_program(prog) };
    out
}

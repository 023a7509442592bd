//! The probe against a fake CANN install: small shared libraries, built with
//! the system C compiler, that export some of the expected symbol names (and
//! do nothing; the probe never calls them). Skipped, with the reason, when no
//! C compiler is found.

use moe_hal_cann::ops::{ASCENDCL_SYMBOLS, NNOPBASE_SYMBOLS};
use moe_hal_cann::{CannBackend, CannBuffer, GatingRelease, Probe, SlotKernel};
use moe_hal_core::{
    Activation, Backend, CombineShape, DType, GemmShape, HostSlice, Kernel, MoeError, PermuteShape, Permuted,
    RouterShape, RouterSpec,
};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A fresh folder under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let p = std::env::temp_dir().join(format!("moe-hal-cann-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Builds `dir/name` exporting `symbols`; `None` when there is no C compiler.
fn fake_library(dir: &Path, name: &str, symbols: &[&str]) -> Option<()> {
    let src = dir.join(format!("{name}.c"));
    let mut c = String::from("/* fake CANN library for moe-hal tests: exports names only */\n");
    for s in symbols {
        c.push_str(&format!("int {s}(void) {{ return 0; }}\n"));
    }
    std::fs::write(&src, c).unwrap();
    let out = match Command::new("cc")
        .arg("-shared")
        .arg("-fPIC")
        .arg("-o")
        .arg(dir.join(name))
        .arg(&src)
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("running cc: {e}"),
    };
    assert!(
        out.status.success(),
        "cc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(())
}

macro_rules! skip_without_cc {
    ($e:expr) => {
        if $e.is_none() {
            eprintln!("SKIPPED: no C compiler (cc) found");
            return;
        }
    };
}

fn buf(dtype: DType, len: usize) -> CannBuffer {
    CannBuffer::descriptor(dtype, len)
}

fn deepseek() -> RouterSpec {
    RouterSpec::deepseek_v3(256, 8, 8, 4, Some(vec![0.0; 256]), true, 2.5)
}

/// The operator symbols of the fake: the preferred gating pair, the V4
/// grouped-matmul pair (the fallback), and V5's first phase only.
const OP_SYMBOLS: &[&str] = &[
    "aclnnMoeGatingTopKGetWorkspaceSize",
    "aclnnMoeGatingTopK",
    "aclnnGroupedMatmulV4GetWorkspaceSize",
    "aclnnGroupedMatmulV4",
    "aclnnGroupedMatmulV5GetWorkspaceSize",
];

/// Calls every kernel with well-formed arguments and returns the errors.
fn call_everything(b: &CannBackend) -> Vec<(Kernel, MoeError)> {
    let mut errs = Vec::new();
    let (t, h, e, k) = (4, 16, 256, 8);
    let logits = buf(DType::F32, t * e);
    let (mut ids, mut w) = (buf(DType::U32, t * k), buf(DType::F32, t * k));
    errs.push((
        Kernel::Route,
        b.route(&logits, &deepseek(), t, &mut ids, &mut w).unwrap_err(),
    ));
    errs.push((Kernel::TopK, b.topk(&logits, t, e, k, &mut ids, &mut w).unwrap_err()));
    let hidden = buf(DType::BF16, t * h);
    let s = PermuteShape {
        tokens: t,
        hidden: h,
        top_k: k,
        experts: e,
    };
    let mut p = Permuted {
        counts: buf(DType::U32, e),
        offsets: buf(DType::U32, e + 1),
        slot_of: buf(DType::U32, t * k),
        source_of: buf(DType::U32, t * k),
        rows: buf(DType::BF16, t * k * h),
    };
    errs.push((Kernel::Permute, b.permute(&hidden, &ids, s, &mut p).unwrap_err()));
    let gs = GemmShape {
        rows: t * k,
        in_features: h,
        out_features: 8,
        experts: e,
        activation: Activation::None,
    };
    let (x, wt, mut y) = (
        buf(DType::BF16, t * k * h),
        buf(DType::BF16, e * 8 * h),
        buf(DType::BF16, t * k * 8),
    );
    let off = buf(DType::U32, e + 1);
    errs.push((
        Kernel::GroupedMatmul,
        b.grouped_matmul(&x, &off, &wt, &mut y, gs).unwrap_err(),
    ));
    let cs = CombineShape {
        tokens: t,
        hidden: 8,
        top_k: k,
        accumulate: true,
    };
    let mut o = buf(DType::BF16, t * 8);
    errs.push((Kernel::Combine, b.combine(&y, &ids, &w, &ids, &mut o, cs).unwrap_err()));
    let rs = RouterShape {
        tokens: t,
        hidden: h,
        experts: e,
    };
    let (rw, mut lg) = (buf(DType::F32, e * h), buf(DType::F32, t * e));
    errs.push((
        Kernel::RouterLogits,
        b.router_logits(&hidden, &rw, &mut lg, rs).unwrap_err(),
    ));
    errs
}

#[test]
fn incomplete_install_is_unavailable_and_says_what_is_missing() {
    let dir = TempDir::new("partial");
    // The runtime exports only aclInit; no libnnopbase.so at all.
    skip_without_cc!(fake_library(&dir.0, "libascendcl.so", &["aclInit"]));
    fake_library(&dir.0, "libopapi.so", OP_SYMBOLS).unwrap();

    let probe = Probe::run_in(std::slice::from_ref(&dir.0));
    assert!(probe.library("libascendcl.so").unwrap().loaded());
    assert!(probe.library("libopapi.so").unwrap().loaded());
    assert!(probe.library("libnnopbase.so").unwrap().path.is_none());
    assert!(probe.library("libopapi_transformer.so").unwrap().path.is_none());
    assert_eq!(probe.missing_libraries(), vec!["libnnopbase.so".to_string()]);
    let missing = probe.missing_runtime_symbols();
    assert!(
        missing.contains(&"aclrtMalloc") && !missing.contains(&"aclInit"),
        "{missing:?}"
    );
    assert!(!probe.runtime_ready());

    // The operators resolve all the same, from libopapi.so.
    assert_eq!(probe.resolved(SlotKernel::Route), Some("aclnnMoeGatingTopK"));
    assert_eq!(probe.resolved(SlotKernel::GroupedMatmul), Some("aclnnGroupedMatmulV4"));
    assert_eq!(probe.resolved(SlotKernel::Permute), None);

    let err = CannBackend::new_in(std::slice::from_ref(&dir.0)).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, MoeError::BackendUnavailable { .. }), "{err:?}");
    for needle in [
        "CANN",
        "libnnopbase.so",
        "aclrtMalloc",
        "ASCEND_HOME_PATH",
        &dir.0.display().to_string(),
    ] {
        assert!(msg.contains(needle), "{msg:?} should name {needle:?}");
    }

    // Calls on the probe-only backend fail cleanly: unavailable, or
    // unsupported where the operator itself is missing.
    let b = CannBackend::from_probe(probe);
    for (kernel, e) in call_everything(&b) {
        match (kernel, &e) {
            (_, MoeError::BackendUnavailable { backend, reason }) => {
                assert_eq!(backend, "cann");
                assert!(reason.contains("libnnopbase.so"), "{kernel}: {reason}");
            }
            other => panic!("{kernel}: expected BackendUnavailable, got {other:?}"),
        }
    }
    assert!(matches!(
        b.alloc(DType::F32, 4),
        Err(MoeError::BackendUnavailable { .. })
    ));
    assert!(matches!(
        b.upload(HostSlice::F32(&[1.0])),
        Err(MoeError::BackendUnavailable { .. })
    ));
    assert!(matches!(b.synchronize(), Err(MoeError::BackendUnavailable { .. })));
}

#[test]
fn complete_runtime_names_the_operator_it_would_call() {
    let root = TempDir::new("full");
    let lib64 = root.0.join("lib64");
    std::fs::create_dir_all(&lib64).unwrap();
    skip_without_cc!(fake_library(&lib64, "libascendcl.so", ASCENDCL_SYMBOLS));
    fake_library(&lib64, "libnnopbase.so", NNOPBASE_SYMBOLS).unwrap();
    fake_library(&lib64, "libopapi.so", OP_SYMBOLS).unwrap();
    std::fs::write(
        root.0.join("ascend_toolkit_install.info"),
        "package_name=Ascend-cann-toolkit\nversion=8.1.RC1\n",
    )
    .unwrap();

    let probe = Probe::run_in(std::slice::from_ref(&lib64));
    assert!(probe.runtime_ready(), "{}", probe.render());
    assert_eq!(probe.toolkit_version.as_deref(), Some("8.1.RC1"));

    // Found and missing, per operator.
    let gmm = probe.op(SlotKernel::GroupedMatmul).unwrap();
    assert_eq!(gmm.candidates[0].op, "aclnnGroupedMatmulV5");
    assert!(!gmm.candidates[0].resolved());
    assert_eq!(gmm.candidates[0].missing(), vec!["aclnnGroupedMatmulV5"]);
    assert_eq!(gmm.candidates[0].get_workspace_size.library, Some("libopapi.so"));
    assert_eq!(gmm.resolved(), Some("aclnnGroupedMatmulV4"));
    let permute = probe.op(SlotKernel::Permute).unwrap();
    assert_eq!(permute.resolved(), None);
    let missing: Vec<&str> = permute.candidates.iter().flat_map(|c| c.missing()).collect();
    assert_eq!(
        missing,
        vec![
            "aclnnMoeInitRoutingV3GetWorkspaceSize",
            "aclnnMoeInitRoutingV3",
            "aclnnMoeInitRoutingV2GetWorkspaceSize",
            "aclnnMoeInitRoutingV2"
        ]
    );
    assert_eq!(probe.resolved(SlotKernel::Route), Some("aclnnMoeGatingTopK"));
    assert_eq!(probe.resolved(SlotKernel::Combine), None);

    let b = CannBackend::new_in(std::slice::from_ref(&lib64)).unwrap();
    assert_eq!(b.gating_release(), GatingRelease::Early);
    assert!(b.device_name().contains("8.1.RC1"));

    // The capability query drops kernels whose operators are all missing.
    let caps = b.capabilities();
    let kernels: Vec<Kernel> = caps.kernels.iter().map(|k| k.kernel).collect();
    assert_eq!(kernels, vec![Kernel::Route, Kernel::GroupedMatmul]);

    // The description shows the probe and the map with found/missing marks.
    let text = b.describe();
    for needle in [
        "aclnnGroupedMatmulV4 [found in libopapi.so]",
        "aclnnGroupedMatmulV5 [missing: aclnnGroupedMatmulV5]",
        "aclnnMoeInitRoutingV3 [missing",
        "version: 8.1.RC1",
        "libnnopbase.so",
    ] {
        assert!(text.contains(needle), "{needle:?} not in:\n{text}");
    }

    // Calls: NotImplemented naming the operator, or Unsupported naming the
    // missing operators. Never a panic.
    for (kernel, e) in call_everything(&b) {
        match (kernel, &e) {
            (Kernel::Route, MoeError::NotImplemented { backend, op }) => {
                assert_eq!(backend, "cann");
                assert!(op.contains("aclnnMoeGatingTopK") && op.contains("kGroup=4"), "{op}");
            }
            (Kernel::GroupedMatmul, MoeError::NotImplemented { op, .. }) => {
                assert!(
                    op.contains("aclnnGroupedMatmulV4") && op.contains("groupListType=0"),
                    "{op}"
                );
            }
            (Kernel::Permute, MoeError::Unsupported { reason, .. }) => {
                assert!(reason.contains("aclnnMoeInitRoutingV3"), "{reason}");
            }
            (Kernel::TopK | Kernel::Combine | Kernel::RouterLogits, MoeError::Unsupported { backend, .. }) => {
                assert_eq!(backend, "cann");
            }
            other => panic!("{kernel}: unexpected {other:?}"),
        }
    }
    // SwiGLU needs aclnnSwiGlu, which the fake lacks.
    let gs = GemmShape {
        rows: 4,
        in_features: 8,
        out_features: 4,
        experts: 2,
        activation: Activation::SwiGlu,
    };
    let err = b
        .grouped_matmul(
            &buf(DType::F16, 32),
            &buf(DType::U32, 3),
            &buf(DType::F16, 128),
            &mut buf(DType::F16, 16),
            gs,
        )
        .unwrap_err();
    assert!(
        matches!(&err, MoeError::Unsupported { reason, .. } if reason.contains("aclnnSwiGlu")),
        "{err:?}"
    );

    // Routers the 8.1 operator cannot run are refused before dispatch.
    let mixtral = RouterSpec::softmax_topk(8, 2, true);
    let err = b.check_route_spec(&mixtral).unwrap_err().to_string();
    assert!(
        err.contains("E = 256") && err.contains("aclnnMoeGatingTopKSoftmaxV2: not found"),
        "{err}"
    );
    let (l, mut i, mut w) = (buf(DType::F32, 8), buf(DType::U32, 2), buf(DType::F32, 2));
    assert!(matches!(
        b.route(&l, &mixtral, 1, &mut i, &mut w),
        Err(MoeError::Unsupported { .. })
    ));
    // On 8.5 the same operator takes softmax.
    let b85 = b.clone().with_gating_release(GatingRelease::Current);
    assert_eq!(b85.check_route_spec(&mixtral).unwrap().operator(), "aclnnMoeGatingTopK");

    // Bad input still gets the shared typed errors first.
    let short = buf(DType::F32, 10);
    assert!(matches!(
        b.route(&short, &deepseek(), 4, &mut i, &mut w),
        Err(MoeError::Shape { .. })
    ));
    let bad = RouterSpec::deepseek_v3(8, 2, 3, 1, None, true, 1.0);
    assert!(matches!(
        b.route(&buf(DType::F32, 32), &bad, 4, &mut i, &mut w),
        Err(MoeError::InvalidSpec { .. })
    ));

    // Memory moves name the runtime call they would make.
    match b.alloc(DType::BF16, 64) {
        Err(MoeError::NotImplemented { op, .. }) => assert!(op.contains("aclrtMalloc"), "{op}"),
        other => panic!("alloc: {other:?}"),
    }
    match b.download(&buf(DType::F32, 4)) {
        Err(MoeError::NotImplemented { op, .. }) => assert!(op.contains("aclrtMemcpy"), "{op}"),
        other => panic!("download: {other:?}"),
    }
    assert!(matches!(
        b.write(&mut buf(DType::F32, 1), HostSlice::F32(&[1.0, 2.0])),
        Err(MoeError::Shape { .. })
    ));
}

#[test]
fn transformer_library_is_preferred_for_operators() {
    let dir = TempDir::new("split");
    skip_without_cc!(fake_library(&dir.0, "libascendcl.so", ASCENDCL_SYMBOLS));
    fake_library(&dir.0, "libnnopbase.so", NNOPBASE_SYMBOLS).unwrap();
    fake_library(
        &dir.0,
        "libopapi_transformer.so",
        &["aclnnMoeGatingTopKGetWorkspaceSize", "aclnnMoeGatingTopK"],
    )
    .unwrap();
    fake_library(
        &dir.0,
        "libopapi.so",
        &["aclnnMoeGatingTopKGetWorkspaceSize", "aclnnMoeGatingTopK", "aclnnTopk"],
    )
    .unwrap();
    let probe = Probe::run_in(std::slice::from_ref(&dir.0));
    let route = probe.op(SlotKernel::Route).unwrap();
    assert_eq!(route.candidates[0].run.library, Some("libopapi_transformer.so"));
    // A half pair (no GetWorkspaceSize) does not resolve.
    let topk = probe.op(SlotKernel::TopK).unwrap();
    assert_eq!(topk.candidates[0].run.library, Some("libopapi.so"));
    assert_eq!(topk.resolved(), None);
    // No version file: the narrowest gating limits are assumed.
    assert_eq!(CannBackend::from_probe(probe).gating_release(), GatingRelease::Early);
}

#[test]
fn a_file_that_is_not_a_library_is_reported_not_fatal() {
    let dir = TempDir::new("junk");
    std::fs::write(dir.0.join("libascendcl.so"), b"not an ELF file").unwrap();
    let probe = Probe::run_in(std::slice::from_ref(&dir.0));
    let l = probe.library("libascendcl.so").unwrap();
    assert!(l.path.is_some() && l.load_error.is_some(), "{l:?}");
    let err = CannBackend::new_in(std::slice::from_ref(&dir.0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("failed to load"), "{err}");
}

#[test]
fn nothing_installed_is_unavailable_everywhere() {
    let dir = TempDir::new("empty");
    let err = CannBackend::new_in(std::slice::from_ref(&dir.0)).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("backend cann is unavailable") && msg.contains("CANN"),
        "{msg}"
    );
    let b = CannBackend::from_probe(Probe::run_in(std::slice::from_ref(&dir.0)));
    for (kernel, e) in call_everything(&b) {
        assert!(matches!(e, MoeError::BackendUnavailable { .. }), "{kernel}: {e:?}");
    }
    // The capability query still tells what the slot offers.
    assert_eq!(b.capabilities(), CannBackend::documented_capabilities());
}

#[test]
fn search_path_order_from_environment_values() {
    use moe_hal_cann::probe::{search_dirs, DEFAULT_TOOLKIT};
    let d = search_dirs(Some("/a".into()), Some("/b".into()));
    let paths: Vec<(String, &str)> = d.iter().map(|s| (s.path.display().to_string(), s.source)).collect();
    assert_eq!(
        paths,
        vec![
            ("/a/lib64".to_string(), "ASCEND_HOME_PATH"),
            ("/b/lib64".to_string(), "ASCEND_TOOLKIT_HOME"),
            (format!("{DEFAULT_TOOLKIT}/lib64"), "default prefix"),
        ]
    );
    // Unset or empty values are skipped; duplicates collapse.
    let d = search_dirs(Some("".into()), Some(DEFAULT_TOOLKIT.into()));
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].source, "ASCEND_TOOLKIT_HOME");
}

//! The Ascend (CANN) slot of moe-hal.
//!
//! This backend compiles on every machine and needs no Ascend software to
//! build: CANN's libraries are opened at run time ([`probe`]). It knows, per
//! kernel, exactly which `aclnn` operator it would call and with which
//! attributes ([`ops`]), but it does not execute anything yet:
//!
//! - without a usable CANN runtime, every call returns
//!   [`MoeError::BackendUnavailable`] naming CANN and what is missing;
//! - with the runtime present, every call returns [`MoeError::NotImplemented`]
//!   naming the operator (and attributes) it would call;
//! - a kernel whose operators the installed CANN lacks, or a router the
//!   operators cannot express, is [`MoeError::Unsupported`], and the
//!   capability query says so before any dispatch: [`Backend::capabilities`]
//!   for kernels, [`Backend::check_router`] for routers (the gating
//!   operators' limits by CANN release, which `MoeLayer::new` and
//!   `moe-bench bench` ask before anything runs).
//!
//! Bad arguments get the same typed errors as on every backend: each kernel
//! runs the shared checks of [`moe_hal_core::check`] first. Nothing panics.
//! `docs/cann.md` is the guide for whoever fills the slot in.

#![deny(unsafe_code)]

pub mod ops;
pub mod probe;

pub use ops::{
    check_route_spec, grouped_matmul_attrs, plan_route, route_attrs, route_attrs_for, softmax_v2_attrs, GatingRelease,
    GroupedMatmulAttrs, MoeGatingTopKAttrs, MoeGatingTopKSoftmaxV2Attrs, OpEntry, RouteCall, SlotKernel, OP_MAP,
};
pub use probe::Probe;

use moe_hal_core::{
    check, Backend, Capabilities, CombineShape, DType, DeviceBuffer, GemmShape, HostSlice, HostVec, MoeError,
    PermuteShape, Permuted, Result, RouterShape, RouterSpec,
};
use std::fmt::{self, Write as _};

/// Name of the backend, as `Backend::name` returns it.
pub const NAME: &str = ops::BACKEND;

/// Largest buffer reported by the capability query. A placeholder: the
/// implementation should report what `aclrtGetMemInfo` says.
pub const MAX_BUFFER_BYTES: u64 = 1 << 34;

/// A buffer of the slot. It describes the buffer (dtype, length) and holds
/// no device memory yet; the implementation adds the `aclrtMalloc` pointer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CannBuffer {
    dtype: DType,
    len: usize,
}

impl CannBuffer {
    /// A buffer description without memory: what `alloc` will return once it
    /// is written, and what tests use to exercise the argument checks.
    pub fn descriptor(dtype: DType, len: usize) -> CannBuffer {
        CannBuffer { dtype, len }
    }
}

impl DeviceBuffer for CannBuffer {
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn len(&self) -> usize {
        self.len
    }
}

/// The Ascend backend slot. Cheap to clone (the probe result is shared).
#[derive(Clone, Debug)]
pub struct CannBackend {
    probe: Probe,
    release: GatingRelease,
}

impl CannBackend {
    /// Probes the install that `ASCEND_HOME_PATH` / `ASCEND_TOOLKIT_HOME`
    /// select (else the default prefix) and returns the backend when the
    /// CANN runtime is usable; `BackendUnavailable` naming what is missing
    /// and where the probe looked otherwise.
    pub fn new() -> Result<CannBackend> {
        CannBackend::from_probe(Probe::run()).ready()
    }

    /// Like [`CannBackend::new`], probing exactly `dirs` (folders of `.so` files).
    pub fn new_in(dirs: &[std::path::PathBuf]) -> Result<CannBackend> {
        CannBackend::from_probe(Probe::run_in(dirs)).ready()
    }

    /// A backend value whatever the probe found: its capability query and
    /// its description work, and its calls fail with clean errors. For
    /// `moe-bench info`, tests, and the implementer's first steps.
    pub fn probe_only() -> CannBackend {
        CannBackend::from_probe(Probe::run())
    }

    /// A backend over an existing probe result.
    pub fn from_probe(probe: Probe) -> CannBackend {
        let release = match probe.toolkit_version.as_deref().and_then(GatingRelease::from_version) {
            Some(r) => r,
            // Without libraries nothing runs: describe what the docs allow.
            None if !probe.any_library_found() => GatingRelease::Current,
            // Libraries of an unknown release: assume the narrowest limits.
            None => GatingRelease::Early,
        };
        CannBackend { probe, release }
    }

    /// Overrides the gating-operator limits (when the version file is missing
    /// or wrong, or to see what another release would accept).
    pub fn with_gating_release(mut self, release: GatingRelease) -> CannBackend {
        self.release = release;
        self
    }

    fn ready(self) -> Result<CannBackend> {
        match self.probe.unavailable_reason() {
            None => Ok(self),
            Some(reason) => Err(MoeError::unavailable(NAME, reason)),
        }
    }

    pub fn probe(&self) -> &Probe {
        &self.probe
    }

    pub fn gating_release(&self) -> GatingRelease {
        self.release
    }

    /// Whether the runtime is usable (kernels then fail with `NotImplemented`).
    pub fn runtime_ready(&self) -> bool {
        self.probe.runtime_ready()
    }

    /// Whether `op` can be called here. Without any CANN library every
    /// operator counts as present, so that the capability query shows what
    /// the slot offers on a full install.
    fn op_present(&self, op: &str) -> bool {
        !self.probe.any_library_found() || self.probe.op_available(op)
    }

    /// The operator `kernel` would call here, or `Unsupported` naming the
    /// operators the installed CANN lacks.
    fn operator_for(&self, kernel: SlotKernel) -> Result<&'static str> {
        let entry = ops::entry(kernel);
        entry.candidates().find(|op| self.op_present(op)).ok_or_else(|| {
            let missing: Vec<String> = self
                .probe
                .op(kernel)
                .map(|o| {
                    o.candidates
                        .iter()
                        .flat_map(|c| c.missing())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            MoeError::unsupported(
                NAME,
                kernel,
                format!(
                    "the installed CANN has none of its operators (missing symbols: {})",
                    missing.join(", ")
                ),
            )
        })
    }

    /// How `spec` would be routed here: `Ok` with the call, or `Unsupported`
    /// naming the reason (operator limits of this release, or missing operators).
    pub fn check_route_spec(&self, spec: &RouterSpec) -> Result<RouteCall> {
        plan_route(spec, self.release, &|op| self.op_present(op))
    }

    /// The capabilities the CANN operators document, whatever is installed.
    pub fn documented_capabilities() -> Capabilities {
        // Logits are f32 by contract and the gating operators take f32;
        // aclnnMoeGatingTopK and aclnnMoeComputeExpertTokens take E <= 2048;
        // aclnnMoeGatingTopKSoftmax[V2] document k <= 1024 (the grouped
        // operator's k is bounded by the kept groups, checked per spec).
        Capabilities::with_floats(
            &DType::FLOATS,
            MAX_BUFFER_BYTES,
            ops::MAX_GATING_EXPERTS,
            ops::MAX_SOFTMAX_TOPK_K,
        )
    }

    /// The error a call gets once its arguments passed: `BackendUnavailable`
    /// without a usable runtime, else `NotImplemented` naming `what`.
    fn not_yet(&self, what: String) -> MoeError {
        match self.probe.unavailable_reason() {
            Some(reason) => MoeError::unavailable(NAME, reason),
            None => MoeError::NotImplemented {
                backend: NAME.to_string(),
                op: what,
            },
        }
    }

    fn kernel_call(&self, kernel: SlotKernel, detail: &str) -> MoeError {
        if let Some(reason) = self.probe.unavailable_reason() {
            return MoeError::unavailable(NAME, reason);
        }
        match self.operator_for(kernel) {
            Ok(op) => self.not_yet(format!("{kernel} (would call {op}{detail})")),
            Err(e) => e,
        }
    }

    /// The probe result and the operator map, for `moe-bench info --backend cann`.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "backend {NAME}: Ascend NPU through CANN aclnn operators (slot: execution not written yet)"
        );
        let status = match self.probe.unavailable_reason() {
            Some(reason) => format!("unavailable: {reason}"),
            None => "CANN runtime found; every kernel returns NotImplemented naming its operator".to_string(),
        };
        let _ = writeln!(s, "status: {status}");
        s.push_str(&self.probe.render());
        let _ = writeln!(s, "gating limits: {}", self.release.describe());
        let _ = writeln!(s, "operator map (preferred > fallbacks; + helpers):");
        let libs = self.probe.any_library_found();
        let mark = |c: &probe::OpSymbols| -> String {
            if !libs {
                c.op.to_string()
            } else if c.resolved() {
                format!("{} [found in {}]", c.op, c.run.library.unwrap_or("?"))
            } else {
                format!("{} [missing: {}]", c.op, c.missing().join(", "))
            }
        };
        for (entry, status) in OP_MAP.iter().zip(&self.probe.ops) {
            let chain: Vec<String> = status.candidates.iter().map(mark).collect();
            let _ = writeln!(s, "  {:<15} {}", entry.kernel.name(), chain.join(" > "));
            if !status.helpers.is_empty() {
                let helpers: Vec<String> = status.helpers.iter().map(mark).collect();
                let _ = writeln!(s, "  {:<15} + {}", "", helpers.join(", "));
            }
            let _ = writeln!(s, "  {:<15} library: {}", "", entry.library);
            let _ = writeln!(s, "  {:<15} attrs: {}", "", squash(entry.attrs));
            let _ = writeln!(s, "  {:<15} notes: {}", "", squash(entry.notes));
        }
        let caps = self.capabilities();
        let names: Vec<String> = caps
            .kernels
            .iter()
            .map(|k| {
                let d: Vec<String> = k.dtypes.iter().map(|d| d.to_string()).collect();
                format!("{} ({})", k.kernel, d.join("/"))
            })
            .collect();
        let _ = writeln!(
            s,
            "capabilities: {}; max_experts {}, max_top_k {}",
            names.join(", "),
            caps.max_experts,
            caps.max_top_k
        );
        s
    }
}

/// Collapses the runs of spaces that line continuations leave in the map's text.
fn squash(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl fmt::Display for CannBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Runs the probe and renders it with the operator map: the text of
/// `moe-bench info --backend cann`.
pub fn info_text() -> String {
    CannBackend::probe_only().describe()
}

impl Backend for CannBackend {
    type Buffer = CannBuffer;

    fn name(&self) -> &'static str {
        NAME
    }

    fn device_name(&self) -> String {
        match (&self.probe.toolkit_version, self.probe.runtime_ready()) {
            (_, false) => "Ascend NPU via CANN (unavailable)".to_string(),
            (Some(v), true) => format!("Ascend NPU via CANN {v} (execution not implemented)"),
            (None, true) => "Ascend NPU via CANN (execution not implemented)".to_string(),
        }
    }

    /// The installed gating operators' limits for `spec`, release by release (an early CANN
    /// takes only the DeepSeek-V3 router), as well as the documented numbers: known up front,
    /// whether or not the runtime is usable.
    fn check_router(&self, spec: &RouterSpec) -> Result<()> {
        self.capabilities().check_route(NAME, spec)?;
        self.check_route_spec(spec).map(|_| ())
    }

    /// What the installed operators offer; kernels whose operators are all
    /// missing are left out. Without any CANN library: what the docs offer.
    fn capabilities(&self) -> Capabilities {
        let mut caps = CannBackend::documented_capabilities();
        caps.kernels
            .retain(|k| self.operator_for(SlotKernel::of(k.kernel)).is_ok());
        caps
    }

    fn alloc(&self, dtype: DType, len: usize) -> Result<CannBuffer> {
        check_bytes(dtype, len)?;
        Err(self.not_yet(format!(
            "alloc of {len} x {dtype} (would call aclrtMalloc + aclrtMemset)"
        )))
    }

    fn upload(&self, data: HostSlice<'_>) -> Result<CannBuffer> {
        check_bytes(data.dtype(), data.len())?;
        Err(self.not_yet(format!(
            "upload of {} x {} (would call aclrtMalloc + aclrtMemcpy host to device)",
            data.len(),
            data.dtype()
        )))
    }

    fn write(&self, buf: &mut CannBuffer, data: HostSlice<'_>) -> Result<()> {
        check::buffer("write target", buf, data.dtype(), data.len())?;
        Err(self.not_yet("write (would call aclrtMemcpy host to device)".to_string()))
    }

    fn download(&self, _buf: &CannBuffer) -> Result<HostVec> {
        Err(self.not_yet("download (would call aclrtSynchronizeStream + aclrtMemcpy device to host)".to_string()))
    }

    fn synchronize(&self) -> Result<()> {
        Err(self.not_yet("synchronize (would call aclrtSynchronizeStream)".to_string()))
    }

    fn router_logits(
        &self,
        hidden: &CannBuffer,
        weight: &CannBuffer,
        logits: &mut CannBuffer,
        shape: RouterShape,
    ) -> Result<()> {
        check::router_logits(NAME, &Self::documented_capabilities(), hidden, weight, logits, shape)?;
        let cast = if hidden.dtype() == DType::F32 {
            ""
        } else {
            ", after aclnnCast of hidden to f32"
        };
        Err(self.kernel_call(SlotKernel::RouterLogits, &format!(" with cubeMathType=0{cast}")))
    }

    fn route(
        &self,
        logits: &CannBuffer,
        spec: &RouterSpec,
        tokens: usize,
        ids: &mut CannBuffer,
        weights: &mut CannBuffer,
    ) -> Result<()> {
        check::route(
            NAME,
            &Self::documented_capabilities(),
            logits,
            spec,
            tokens,
            ids,
            weights,
        )?;
        // Without a usable runtime every kernel says so first, whatever its arguments' limits.
        if let Some(reason) = self.probe.unavailable_reason() {
            return Err(MoeError::unavailable(NAME, reason));
        }
        let call = self.check_route_spec(spec)?;
        Err(self.not_yet(format!("route (would call {call})")))
    }

    fn topk(
        &self,
        values: &CannBuffer,
        rows: usize,
        cols: usize,
        k: usize,
        ids: &mut CannBuffer,
        out: &mut CannBuffer,
    ) -> Result<()> {
        check::topk(NAME, &Self::documented_capabilities(), values, rows, cols, k, ids, out)?;
        Err(self.kernel_call(
            SlotKernel::TopK,
            &format!(" with k={k}, dim=-1, largest=true, sorted=true"),
        ))
    }

    fn permute(
        &self,
        hidden: &CannBuffer,
        ids: &CannBuffer,
        shape: PermuteShape,
        out: &mut Permuted<CannBuffer>,
    ) -> Result<()> {
        check::permute(NAME, &Self::documented_capabilities(), hidden, ids, shape, out)?;
        let detail = format!(
            " with activeNum={}, expertNum={}, dropPadMode=0, expertTokensNumType=1, rowIdxType=1",
            shape.tokens * shape.top_k,
            shape.experts
        );
        Err(self.kernel_call(SlotKernel::Permute, &detail))
    }

    fn grouped_matmul(
        &self,
        input: &CannBuffer,
        offsets: &CannBuffer,
        weight: &CannBuffer,
        output: &mut CannBuffer,
        shape: GemmShape,
    ) -> Result<()> {
        check::grouped_matmul(
            NAME,
            &Self::documented_capabilities(),
            input,
            offsets,
            weight,
            output,
            shape,
        )?;
        let attrs = grouped_matmul_attrs(shape.activation);
        if attrs.then_swiglu && self.probe.runtime_ready() {
            self.operator_for(SlotKernel::SwiGlu)?;
        }
        Err(self.kernel_call(SlotKernel::GroupedMatmul, &format!(" with {attrs}")))
    }

    fn combine(
        &self,
        expert_out: &CannBuffer,
        ids: &CannBuffer,
        weights: &CannBuffer,
        slot_of: &CannBuffer,
        output: &mut CannBuffer,
        shape: CombineShape,
    ) -> Result<()> {
        check::combine(
            NAME,
            &Self::documented_capabilities(),
            expert_out,
            ids,
            weights,
            slot_of,
            output,
            shape,
        )?;
        let acc = if shape.accumulate {
            ", then aclnnInplaceAdd into the output"
        } else {
            ""
        };
        Err(self.kernel_call(SlotKernel::Combine, &format!(" with paddedMode=false{acc}")))
    }
}

/// Refuses sizes whose byte count overflows, as every backend's alloc does.
fn check_bytes(dtype: DType, len: usize) -> Result<()> {
    moe_hal_core::backend::checked_mul(len, dtype.size(), "buffer bytes").map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_hal_core::Kernel;

    #[test]
    fn every_slot_kernel_has_one_map_entry() {
        for k in SlotKernel::ALL {
            assert_eq!(OP_MAP.iter().filter(|e| e.kernel == k).count(), 1, "{k}");
        }
        assert_eq!(OP_MAP.len(), SlotKernel::ALL.len());
        for k in Kernel::ALL {
            assert_eq!(SlotKernel::of(k).trait_kernel(), Some(k));
        }
    }

    #[test]
    fn describe_without_libraries_names_every_operator() {
        let b = CannBackend::from_probe(Probe::empty());
        let text = b.describe();
        for e in OP_MAP {
            for op in e.candidates() {
                assert!(text.contains(op), "{op} missing from:\n{text}");
            }
        }
        assert!(text.contains("unavailable"));
        assert!(text.contains("ASCEND_HOME_PATH"));
    }

    /// The routers an early CANN's gating operator refuses are refused by the capability query,
    /// before any buffer, and a later release's query takes them; `route` without a runtime says
    /// it is unavailable whatever the router.
    #[test]
    fn router_limits_by_release_are_in_the_capability_query() {
        use moe_hal_core::RouterSpec;
        let ds_v3 = RouterSpec::deepseek_v3(256, 8, 8, 4, Some(vec![0.0; 256]), true, 2.5);
        let kimi = RouterSpec::deepseek_v3(384, 8, 1, 1, Some(vec![0.0; 384]), true, 2.827);
        let sigmoid_groups = RouterSpec::deepseek_v3(128, 8, 8, 4, Some(vec![0.0; 128]), true, 1.0);
        // Softmax routers go to the softmax gating operator, which has no release limit.
        let mixtral = RouterSpec::softmax_topk(8, 2, true);
        let early = CannBackend::from_probe(Probe::empty()).with_gating_release(GatingRelease::Early);
        for spec in [&ds_v3, &mixtral] {
            early.check_router(spec).unwrap();
        }
        for spec in [&kimi, &sigmoid_groups] {
            let e = early.check_router(spec).unwrap_err();
            assert!(matches!(e, MoeError::Unsupported { .. }), "{e}");
            assert!(e.to_string().contains("early releases"), "{e}");
        }
        let current = CannBackend::from_probe(Probe::empty());
        for spec in [&ds_v3, &mixtral, &kimi, &sigmoid_groups] {
            current.check_router(spec).unwrap();
        }
        let big = RouterSpec::softmax_topk(4096, 8, true);
        assert!(current.check_router(&big).is_err());
        // No runtime: route is unavailable before any limit of the spec is looked at.
        let sigmoid_no_renorm = RouterSpec::deepseek_v3(128, 8, 1, 1, None, false, 1.0);
        let (logits, mut ids, mut w) = (
            CannBuffer::descriptor(DType::F32, 128),
            CannBuffer::descriptor(DType::U32, 8),
            CannBuffer::descriptor(DType::F32, 8),
        );
        let e = early
            .route(&logits, &sigmoid_no_renorm, 1, &mut ids, &mut w)
            .unwrap_err();
        assert!(matches!(e, MoeError::BackendUnavailable { .. }), "{e}");
    }

    #[test]
    fn documented_capabilities_without_libraries() {
        let b = CannBackend::from_probe(Probe::empty());
        assert_eq!(b.capabilities(), CannBackend::documented_capabilities());
        assert_eq!(b.gating_release(), GatingRelease::Current);
    }
}

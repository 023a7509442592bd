//! WebGPU backend (placeholder until the WGSL kernels land: it never constructs).

use moe_hal_core::*;

/// The WebGPU backend.
#[derive(Clone)]
pub struct WgpuBackend(());

/// Buffers of the WebGPU backend.
pub struct WgpuBuffer(DType, usize);

impl DeviceBuffer for WgpuBuffer {
    fn dtype(&self) -> DType {
        self.0
    }
    fn len(&self) -> usize {
        self.1
    }
}

fn missing<T>() -> Result<T> {
    Err(MoeError::unavailable("wgpu", "the WebGPU backend is not written yet"))
}

impl WgpuBackend {
    /// Not written yet: always unavailable.
    pub fn new() -> Result<Self> {
        missing()
    }
}

impl Backend for WgpuBackend {
    type Buffer = WgpuBuffer;
    fn name(&self) -> &'static str {
        "wgpu"
    }
    fn device_name(&self) -> String {
        String::new()
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            kernels: vec![],
            max_buffer_bytes: 0,
            max_experts: 0,
            max_top_k: 0,
        }
    }
    fn alloc(&self, _: DType, _: usize) -> Result<WgpuBuffer> {
        missing()
    }
    fn upload(&self, _: HostSlice<'_>) -> Result<WgpuBuffer> {
        missing()
    }
    fn write(&self, _: &mut WgpuBuffer, _: HostSlice<'_>) -> Result<()> {
        missing()
    }
    fn download(&self, _: &WgpuBuffer) -> Result<HostVec> {
        missing()
    }
    fn synchronize(&self) -> Result<()> {
        missing()
    }
    fn router_logits(&self, _: &WgpuBuffer, _: &WgpuBuffer, _: &mut WgpuBuffer, _: RouterShape) -> Result<()> {
        missing()
    }
    fn route(&self, _: &WgpuBuffer, _: &RouterSpec, _: usize, _: &mut WgpuBuffer, _: &mut WgpuBuffer) -> Result<()> {
        missing()
    }
    fn topk(&self, _: &WgpuBuffer, _: usize, _: usize, _: usize, _: &mut WgpuBuffer, _: &mut WgpuBuffer) -> Result<()> {
        missing()
    }
    fn permute(&self, _: &WgpuBuffer, _: &WgpuBuffer, _: PermuteShape, _: &mut Permuted<WgpuBuffer>) -> Result<()> {
        missing()
    }
    fn grouped_matmul(
        &self,
        _: &WgpuBuffer,
        _: &WgpuBuffer,
        _: &WgpuBuffer,
        _: &mut WgpuBuffer,
        _: GemmShape,
    ) -> Result<()> {
        missing()
    }
    fn combine(
        &self,
        _: &WgpuBuffer,
        _: &WgpuBuffer,
        _: &WgpuBuffer,
        _: &WgpuBuffer,
        _: &mut WgpuBuffer,
        _: CombineShape,
    ) -> Result<()> {
        missing()
    }
}

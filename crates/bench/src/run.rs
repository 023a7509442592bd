//! `moe-bench run`: one checkpoint layer on one input.

use moe_hal::checkpoint::{self, read_tensor_f32};
use moe_hal::ndarray::{Array2, ArrayView2};
use moe_hal::{registry, Backend, DType, LayerWeights, MoeLayer};
use safetensors::tensor::{Dtype, TensorView};
use std::path::Path;

/// Layer output on the host.
struct Output {
    hidden: Array2<f32>,
    ids: Array2<u32>,
    weights: Array2<f32>,
}

fn run_on<B: Backend>(backend: B, w: &LayerWeights, x: ArrayView2<'_, f32>) -> Result<Output, String> {
    let mut layer = MoeLayer::new(backend, w).map_err(|e| e.to_string())?;
    let hidden = layer.forward_host(x).map_err(|e| e.to_string())?;
    let (ids, weights) = layer.last_routing().map_err(|e| e.to_string())?;
    Ok(Output { hidden, ids, weights })
}

fn dispatch(backend: &str, w: &LayerWeights, x: ArrayView2<'_, f32>) -> Result<Output, String> {
    match backend {
        "cpu" => run_on(moe_hal::cpu::CpuBackend::new().map_err(|e| e.to_string())?, w, x),
        "wgpu" => run_on(moe_hal::wgpu::WgpuBackend::new().map_err(|e| e.to_string())?, w, x),
        "cuda" => run_on(moe_hal::cuda::CudaBackend::new().map_err(|e| e.to_string())?, w, x),
        "cann" => run_on(moe_hal::cann::CannBackend::new().map_err(|e| e.to_string())?, w, x),
        other => match registry::probe(other) {
            Some(s) => Err(format!(
                "backend {other} is unavailable: {}",
                s.device.err().unwrap_or_default()
            )),
            None => Err(format!(
                "unknown backend {other:?}; expected one of {}",
                registry::BACKENDS.join(", ")
            )),
        },
    }
}

fn read_input(path: &Path, hidden: usize) -> Result<Array2<f32>, String> {
    let (shape, data) = read_tensor_f32(path, "hidden_states").map_err(|e| e.to_string())?;
    let (t, h) = match shape.as_slice() {
        [t, h] | [1, t, h] => (*t, *h),
        other => {
            return Err(format!(
                "hidden_states has shape {other:?}; expected [T, H] or [1, T, H]"
            ))
        }
    };
    if h != hidden {
        return Err(format!(
            "hidden_states has hidden size {h}; the model's hidden_size is {hidden}"
        ));
    }
    Array2::from_shape_vec((t, h), data).map_err(|e| format!("hidden_states: {e}"))
}

fn le_bytes<T: Copy>(v: &[T], f: impl Fn(T) -> Vec<u8>) -> Vec<u8> {
    v.iter().flat_map(|&x| f(x)).collect()
}

/// Writes `out` to a temporary file beside `path`, then renames it into place.
fn write_output(path: &Path, out: &Output) -> Result<(), String> {
    let (t, h) = out.hidden.dim();
    let k = out.ids.ncols();
    let hidden = le_bytes(out.hidden.as_slice().expect("standard layout"), |x: f32| {
        x.to_le_bytes().to_vec()
    });
    let ids = le_bytes(out.ids.as_slice().expect("standard layout"), |x: u32| {
        (x as i64).to_le_bytes().to_vec()
    });
    let weights = le_bytes(out.weights.as_slice().expect("standard layout"), |x: f32| {
        x.to_le_bytes().to_vec()
    });
    fn view(dtype: Dtype, shape: Vec<usize>, data: &[u8]) -> Result<TensorView<'_>, String> {
        TensorView::new(dtype, shape, data).map_err(|e| e.to_string())
    }
    let tensors = vec![
        ("hidden_states", view(Dtype::F32, vec![t, h], &hidden)?),
        ("router.topk_ids", view(Dtype::I64, vec![t, k], &ids)?),
        ("router.topk_weights", view(Dtype::F32, vec![t, k], &weights)?),
    ];
    let bytes = safetensors::serialize(tensors, None).map_err(|e| e.to_string())?;
    // Named as the user gave it: the temporary file beside it is ours.
    crate::report::write_atomic(path, &bytes)
}

pub fn run(model: &Path, layer: usize, input: &Path, output: &Path, backend: &str, dtype: &str) -> Result<(), String> {
    let dtype = match DType::parse(dtype) {
        Some(d) if d.is_float() => d,
        _ => return Err(format!("unknown dtype {dtype:?}; expected f32, bf16 or f16")),
    };
    if registry::probe(backend).is_none() {
        return Err(format!(
            "unknown backend {backend:?}; expected one of {}",
            registry::BACKENDS.join(", ")
        ));
    }
    // Before loading a layer that may take minutes.
    crate::bench::check_writable(output, "output")?;
    let w = checkpoint::load_layer(model, layer, dtype).map_err(|e| e.to_string())?;
    let x = read_input(input, w.hidden_size)?;
    let out = dispatch(backend, &w, x.view())?;
    write_output(output, &out)
}

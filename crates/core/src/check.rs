//! Argument checks shared by every backend, so that bad input gets the same
//! error everywhere. Each backend calls these first, then its own limits.

use crate::backend::{
    checked_mul, Capabilities, CombineShape, DeviceBuffer, GemmShape, Kernel, PermuteShape, Permuted, RouterShape,
};
use crate::dtype::DType;
use crate::error::{MoeError, Result};
use crate::spec::RouterSpec;

/// `buf` has dtype `dtype` and at least `len` elements.
pub fn buffer<B: DeviceBuffer + ?Sized>(what: &str, buf: &B, dtype: DType, len: usize) -> Result<()> {
    if buf.dtype() != dtype {
        return Err(MoeError::DType {
            what: what.to_string(),
            got: buf.dtype(),
            expected: dtype.to_string(),
        });
    }
    if buf.len() < len {
        return Err(MoeError::shape(
            format!("{what} length"),
            buf.len(),
            format!("at least {len} elements"),
        ));
    }
    Ok(())
}

fn float_dtype<B: DeviceBuffer + ?Sized>(what: &str, buf: &B) -> Result<DType> {
    if !buf.dtype().is_float() {
        return Err(MoeError::DType {
            what: what.to_string(),
            got: buf.dtype(),
            expected: "f32, bf16 or f16".to_string(),
        });
    }
    Ok(buf.dtype())
}

fn nonzero(what: &str, v: usize) -> Result<()> {
    if v == 0 {
        return Err(MoeError::shape(what, 0, "at least 1"));
    }
    Ok(())
}

pub fn router_logits<B: DeviceBuffer + ?Sized>(
    backend: &str,
    caps: &Capabilities,
    hidden: &B,
    weight: &B,
    logits: &B,
    s: RouterShape,
) -> Result<()> {
    nonzero("hidden size", s.hidden)?;
    nonzero("experts", s.experts)?;
    let dt = float_dtype("hidden", hidden)?;
    caps.check(backend, Kernel::RouterLogits, dt)?;
    buffer(
        "hidden",
        hidden,
        dt,
        checked_mul(s.tokens, s.hidden, "tokens * hidden")?,
    )?;
    buffer(
        "router weight",
        weight,
        DType::F32,
        checked_mul(s.experts, s.hidden, "experts * hidden")?,
    )?;
    buffer(
        "logits",
        logits,
        DType::F32,
        checked_mul(s.tokens, s.experts, "tokens * experts")?,
    )
}

pub fn route<B: DeviceBuffer + ?Sized>(
    backend: &str,
    caps: &Capabilities,
    logits: &B,
    spec: &RouterSpec,
    tokens: usize,
    ids: &B,
    weights: &B,
) -> Result<()> {
    spec.validate()?;
    caps.check(backend, Kernel::Route, DType::F32)?;
    caps.check_route(backend, spec)?;
    let e = spec.num_experts;
    let k = spec.top_k;
    buffer(
        "logits",
        logits,
        DType::F32,
        checked_mul(tokens, e, "tokens * experts")?,
    )?;
    let tk = checked_mul(tokens, k, "tokens * top_k")?;
    buffer("ids", ids, DType::U32, tk)?;
    buffer("weights", weights, DType::F32, tk)
}

#[allow(clippy::too_many_arguments)]
pub fn topk<B: DeviceBuffer + ?Sized>(
    backend: &str,
    caps: &Capabilities,
    values: &B,
    rows: usize,
    cols: usize,
    k: usize,
    ids: &B,
    out: &B,
) -> Result<()> {
    caps.check(backend, Kernel::TopK, DType::F32)?;
    // ids are u32 column indices.
    if cols as u64 > 1 << 32 {
        return Err(MoeError::shape("cols", cols, "at most 2^32 (ids are u32)"));
    }
    if k == 0 || k > cols {
        return Err(MoeError::shape("k", k, format!("1 ..= cols ({cols})")));
    }
    if k > caps.max_top_k {
        return Err(MoeError::unsupported(
            backend,
            format!("topk with k = {k}"),
            format!("k at most {}", caps.max_top_k),
        ));
    }
    buffer("values", values, DType::F32, checked_mul(rows, cols, "rows * cols")?)?;
    let rk = checked_mul(rows, k, "rows * k")?;
    buffer("ids", ids, DType::U32, rk)?;
    buffer("out", out, DType::F32, rk)
}

/// `experts + 1`, the length of a grouped matmul's offsets, checked for overflow.
fn offsets_len(experts: usize) -> Result<usize> {
    experts
        .checked_add(1)
        .ok_or_else(|| MoeError::shape("experts", experts, "experts + 1 offsets that fit in usize"))
}

pub fn permute<B: DeviceBuffer>(
    backend: &str,
    caps: &Capabilities,
    hidden: &B,
    ids: &B,
    s: PermuteShape,
    out: &Permuted<B>,
) -> Result<()> {
    permute_without_rows(backend, caps, hidden, ids, s, out)?;
    let tk = s.tokens * s.top_k;
    buffer(
        "permuted rows",
        &out.rows,
        hidden.dtype(),
        checked_mul(tk, s.hidden, "tokens * top_k * hidden")?,
    )
}

/// [`permute`]'s checks but the permuted rows' (for a `permute_matmul` that writes none).
pub fn permute_without_rows<B: DeviceBuffer>(
    backend: &str,
    caps: &Capabilities,
    hidden: &B,
    ids: &B,
    s: PermuteShape,
    out: &Permuted<B>,
) -> Result<()> {
    nonzero("experts", s.experts)?;
    nonzero("top_k", s.top_k)?;
    let dt = float_dtype("hidden", hidden)?;
    caps.check(backend, Kernel::Permute, dt)?;
    let tk = checked_mul(s.tokens, s.top_k, "tokens * top_k")?;
    if tk > u32::MAX as usize {
        return Err(MoeError::shape(
            "tokens * top_k",
            tk,
            "at most 2^32 - 1 (slots are u32)",
        ));
    }
    buffer(
        "hidden",
        hidden,
        dt,
        checked_mul(s.tokens, s.hidden, "tokens * hidden")?,
    )?;
    buffer("ids", ids, DType::U32, tk)?;
    buffer("counts", &out.counts, DType::U32, s.experts)?;
    buffer("offsets", &out.offsets, DType::U32, offsets_len(s.experts)?)?;
    buffer("slot_of", &out.slot_of, DType::U32, tk)?;
    buffer("source_of", &out.source_of, DType::U32, tk)
}

/// The gate/up GEMM of [`crate::Backend::permute_matmul`] reads the permute's rows: its rows,
/// inputs and experts are the permute's `tokens * top_k`, `hidden` and `experts`.
pub fn permute_matmul(p: PermuteShape, g: GemmShape) -> Result<()> {
    let tk = checked_mul(p.tokens, p.top_k, "tokens * top_k")?;
    for (what, got, want) in [
        ("gate/up rows", g.rows, tk),
        ("gate/up in_features", g.in_features, p.hidden),
        ("gate/up experts", g.experts, p.experts),
    ] {
        if got != want {
            return Err(MoeError::shape(
                what,
                got,
                format!("{want}, the permute's (tokens * top_k, hidden, experts)"),
            ));
        }
    }
    Ok(())
}

pub fn grouped_matmul<B: DeviceBuffer + ?Sized>(
    backend: &str,
    caps: &Capabilities,
    input: &B,
    offsets: &B,
    weight: &B,
    output: &B,
    s: GemmShape,
) -> Result<()> {
    let dt = float_dtype("input", input)?;
    grouped_matmul_gathered(backend, caps, dt, offsets, weight, output, s)?;
    buffer(
        "input",
        input,
        dt,
        checked_mul(s.rows, s.in_features, "rows * in_features")?,
    )
}

/// [`grouped_matmul`]'s checks but the input's length, for inputs of dtype `dt` read by index (a
/// `permute_matmul` that gathers the hidden rows).
pub fn grouped_matmul_gathered<B: DeviceBuffer + ?Sized>(
    backend: &str,
    caps: &Capabilities,
    dt: DType,
    offsets: &B,
    weight: &B,
    output: &B,
    s: GemmShape,
) -> Result<()> {
    nonzero_gemm(s)?;
    caps.check(backend, Kernel::GroupedMatmul, dt)?;
    buffer("offsets", offsets, DType::U32, offsets_len(s.experts)?)?;
    buffer("weight", weight, dt, weight_len(s)?)?;
    buffer(
        "output",
        output,
        dt,
        checked_mul(s.rows, s.out_features, "rows * out_features")?,
    )
}

/// A grouped matmul's sizes that must not be 0.
fn nonzero_gemm(s: GemmShape) -> Result<()> {
    nonzero("experts", s.experts)?;
    nonzero("in_features", s.in_features)?;
    nonzero("out_features", s.out_features)
}

/// Elements of the expert weights of grouped matmuls of shape `s`: `experts * weight rows *
/// in_features`, checked for overflow.
fn weight_len(s: GemmShape) -> Result<usize> {
    let weight_rows = checked_mul(s.out_features, 2, "2 * out_features")?;
    let per_expert = checked_mul(
        if s.activation == crate::backend::Activation::SwiGlu {
            weight_rows
        } else {
            s.out_features
        },
        s.in_features,
        "weight rows * in_features",
    )?;
    checked_mul(s.experts, per_expert, "experts * weight size")
}

/// Expert weights for [`crate::Backend::upload_weights`]: a float dtype, and exactly
/// `experts * weight_rows * in_features` elements.
pub fn weights(data: &crate::HostSlice<'_>, s: GemmShape) -> Result<()> {
    nonzero_gemm(s)?;
    if !data.dtype().is_float() {
        return Err(MoeError::DType {
            what: "expert weights".to_string(),
            got: data.dtype(),
            expected: "a float dtype".to_string(),
        });
    }
    let want = weight_len(s)?;
    if data.len() != want {
        return Err(MoeError::shape(
            "expert weights length",
            data.len(),
            format!("experts * weight rows * in_features = {want}"),
        ));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn combine<B: DeviceBuffer + ?Sized>(
    backend: &str,
    caps: &Capabilities,
    expert_out: &B,
    ids: &B,
    weights: &B,
    slot_of: &B,
    output: &B,
    s: CombineShape,
) -> Result<()> {
    nonzero("top_k", s.top_k)?;
    let dt = float_dtype("expert_out", expert_out)?;
    caps.check(backend, Kernel::Combine, dt)?;
    let tk = checked_mul(s.tokens, s.top_k, "tokens * top_k")?;
    buffer(
        "expert_out",
        expert_out,
        dt,
        checked_mul(tk, s.hidden, "tokens * top_k * hidden")?,
    )?;
    buffer("ids", ids, DType::U32, tk)?;
    buffer("weights", weights, DType::F32, tk)?;
    buffer("slot_of", slot_of, DType::U32, tk)?;
    buffer(
        "output",
        output,
        dt,
        checked_mul(s.tokens, s.hidden, "tokens * hidden")?,
    )
}

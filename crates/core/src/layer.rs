//! A whole MoE layer (routed plus shared experts) built from the trait's kernels.

use crate::backend::{
    checked_mul, checked_product, Activation, Backend, CombineShape, GemmShape, LayerShapes, PermuteShape, Permuted,
    RouterShape,
};
use crate::dtype::{DType, HostSlice, HostVec};
use crate::error::{MoeError, Result};
use crate::reference::{self, LayerRef};
use crate::spec::RouterSpec;
use ndarray::{Array2, ArrayView2};

/// A shared expert's weights (DeepSeek's plain shared MLP or Qwen2-MoE's gated one).
#[derive(Clone, Debug, PartialEq)]
pub struct SharedWeights {
    pub intermediate_size: usize,
    /// `[2 * Is, H]`, gate rows then up rows.
    pub gate_up: HostVec,
    /// `[H, Is]`.
    pub down: HostVec,
    /// Qwen2-MoE's `shared_expert_gate` `[H]` (f32): output scaled by `sigmoid(x · gate)`.
    pub gate: Option<Vec<f32>>,
}

/// One layer's weights on the host, in checkpoint layout.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerWeights {
    pub router: RouterSpec,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    /// `[E, H]`, f32 (the router always runs in f32).
    pub router_weight: Vec<f32>,
    /// `[E, 2I, H]`, gate rows first, then up rows (transformers' `gate_up_proj`).
    pub gate_up: HostVec,
    /// `[E, H, I]`.
    pub down: HostVec,
    pub shared: Option<SharedWeights>,
}

fn expect_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(MoeError::shape(format!("{what} length"), got, want));
    }
    Ok(())
}

impl LayerWeights {
    /// The compute dtype: that of the expert weights.
    pub fn dtype(&self) -> DType {
        self.gate_up.dtype()
    }

    pub fn validate(&self) -> Result<()> {
        self.router.validate()?;
        let (e, h, i) = (self.router.num_experts, self.hidden_size, self.intermediate_size);
        if h == 0 || i == 0 {
            return Err(MoeError::shape(
                "hidden/intermediate size",
                format!("{h}/{i}"),
                "both > 0",
            ));
        }
        let dt = self.dtype();
        if !dt.is_float() {
            return Err(MoeError::DType {
                what: "expert weights".into(),
                got: dt,
                expected: "f32, bf16 or f16".into(),
            });
        }
        expect_len(
            "router weight [E, H]",
            self.router_weight.len(),
            checked_product("E * H", &[e, h])?,
        )?;
        expect_len(
            "gate_up [E, 2I, H]",
            self.gate_up.len(),
            checked_product("E * 2I * H", &[e, 2, i, h])?,
        )?;
        expect_len(
            "down [E, H, I]",
            self.down.len(),
            checked_product("E * H * I", &[e, h, i])?,
        )?;
        if self.down.dtype() != dt {
            return Err(MoeError::DType {
                what: "down weights".into(),
                got: self.down.dtype(),
                expected: dt.to_string(),
            });
        }
        if let Some(s) = &self.shared {
            let si = s.intermediate_size;
            if si == 0 {
                return Err(MoeError::shape("shared intermediate size", 0, "> 0"));
            }
            expect_len(
                "shared gate_up [2Is, H]",
                s.gate_up.len(),
                checked_product("2Is * H", &[2, si, h])?,
            )?;
            expect_len(
                "shared down [H, Is]",
                s.down.len(),
                checked_product("H * Is", &[h, si])?,
            )?;
            for (what, w) in [("shared gate_up", &s.gate_up), ("shared down", &s.down)] {
                if w.dtype() != dt {
                    return Err(MoeError::DType {
                        what: what.into(),
                        got: w.dtype(),
                        expected: dt.to_string(),
                    });
                }
            }
            if let Some(g) = &s.gate {
                expect_len("shared expert gate [H]", g.len(), h)?;
            }
        }
        Ok(())
    }

    /// The same weights stored in `dtype` (router weight and gate stay f32).
    pub fn to_dtype(&self, dtype: DType) -> Result<LayerWeights> {
        let conv = |v: &HostVec| -> Result<HostVec> {
            let f = v.to_f32().ok_or_else(|| MoeError::DType {
                what: "weights".into(),
                got: v.dtype(),
                expected: "a float dtype".into(),
            })?;
            HostVec::from_f32(&f, dtype).ok_or_else(|| MoeError::DType {
                what: "target".into(),
                got: dtype,
                expected: "f32, bf16 or f16".into(),
            })
        };
        Ok(LayerWeights {
            gate_up: conv(&self.gate_up)?,
            down: conv(&self.down)?,
            shared: match &self.shared {
                None => None,
                Some(s) => Some(SharedWeights {
                    gate_up: conv(&s.gate_up)?,
                    down: conv(&s.down)?,
                    ..s.clone()
                }),
            },
            ..self.clone()
        })
    }

    /// Router logits `[T, E]` of `x[T, H]` in float64.
    /// An error where the weights do not validate or `x` holds fewer than `T * H` values.
    pub fn reference_logits(&self, x: &[f64], tokens: usize) -> Result<Vec<f64>> {
        self.validate()?;
        let (e, h) = (self.router.num_experts, self.hidden_size);
        let need = checked_product("tokens * hidden", &[tokens, h])?;
        if x.len() < need {
            return Err(MoeError::shape(
                "reference input x",
                x.len(),
                format!("at least {need} (T * H)"),
            ));
        }
        Ok((0..tokens)
            .flat_map(|t| {
                let row = &x[t * h..(t + 1) * h];
                (0..e).map(move |ex| {
                    row.iter()
                        .zip(&self.router_weight[ex * h..(ex + 1) * h])
                        .map(|(a, &b)| a * b as f64)
                        .sum::<f64>()
                })
            })
            .collect())
    }

    /// The float64 reference forward of `x[T, H]` (values as stored); errors as
    /// [`LayerWeights::reference_logits`].
    pub fn reference_forward(&self, x: &[f64], tokens: usize) -> Result<LayerRef> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let logits = self.reference_logits(x, tokens)?;
        let gu = self.gate_up.to_f64();
        let dn = self.down.to_f64();
        let (ids, weights) = reference::route(&logits, tokens, &self.router);
        let k = self.router.top_k;
        let shared = self.shared.as_ref().map(|s| (s, s.gate_up.to_f64(), s.down.to_f64()));
        let mut output = vec![0.0; tokens * h];
        for t in 0..tokens {
            let row = &x[t * h..(t + 1) * h];
            let mut js: Vec<usize> = (0..k).collect();
            js.sort_by_key(|&j| (ids[t * k + j], j));
            let out = &mut output[t * h..(t + 1) * h];
            for j in js {
                let ex = ids[t * k + j] as usize;
                let y = reference::mlp(
                    row,
                    &gu[ex * 2 * i * h..(ex + 1) * 2 * i * h],
                    &dn[ex * h * i..(ex + 1) * h * i],
                    i,
                );
                for (o, y) in out.iter_mut().zip(y) {
                    *o += weights[t * k + j] * y;
                }
            }
            if let Some((s, sgu, sdn)) = &shared {
                let y = reference::mlp(row, sgu, sdn, s.intermediate_size);
                let g = match &s.gate {
                    Some(g) => {
                        let z: f64 = row.iter().zip(g).map(|(a, &b)| a * b as f64).sum();
                        1.0 / (1.0 + (-z).exp())
                    }
                    None => 1.0,
                };
                for (o, y) in out.iter_mut().zip(y) {
                    *o += g * y;
                }
            }
        }
        Ok(LayerRef {
            output,
            ids,
            weights,
            logits,
        })
    }
}

struct SharedDev<B: Backend> {
    inter: usize,
    gate_up: B::Buffer,
    down: B::Buffer,
    gate: Option<B::Buffer>,
}

/// What a layer's work buffers are sized for, besides the token count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Dims {
    experts: usize,
    top_k: usize,
    hidden: usize,
    inter: usize,
    dtype: DType,
    shared_inter: Option<usize>,
    /// The shared expert's gate overwrites the shared weights that an ungated one reads as 1.
    shared_gated: bool,
    /// `permute_matmul` writes the permuted rows ([`Backend::permute_matmul_copies_rows`]).
    copies_rows: bool,
}

/// Work buffers, grown to the largest token count seen.
struct Scratch<B: Backend> {
    dims: Dims,
    capacity: usize,
    logits: B::Buffer,
    ids: B::Buffer,
    weights: B::Buffer,
    perm: Permuted<B::Buffer>,
    act: B::Buffer,
    expert_out: B::Buffer,
    shared: Option<SharedScratch<B>>,
}

/// The work buffers of [`MoeLayer::forward_with`]: the router's logits, the routing, the permuted
/// rows and the experts' activations of one forward.
///
/// A layer keeps its own for [`MoeLayer::forward`]; with `forward_with` the caller holds them
/// instead, so that:
/// - layers of one model share one set (a model's MoE layers have the same shapes) rather than
///   each keeping buffers for the largest batch it ever ran (at 4096 tokens of a DeepSeek-V3
///   layer in bf16, over a GiB a layer);
/// - several threads run one layer at once (`forward_with` takes `&self`), one scratch each,
///   with no lock around the layer.
///
/// Empty until first used, then grown to the largest token count seen, for the last layer's
/// shapes (another shape reallocates, so give layers of different shapes their own). Its buffers
/// belong to the backend of the layers that used it: a layer on another device (a GPU backend's
/// other instance) refuses them until [`LayerScratch::clear`], which frees them.
pub struct LayerScratch<B: Backend> {
    bufs: Option<Scratch<B>>,
    last_tokens: usize,
}

impl<B: Backend> Default for LayerScratch<B> {
    fn default() -> Self {
        LayerScratch {
            bufs: None,
            last_tokens: 0,
        }
    }
}

impl<B: Backend> LayerScratch<B> {
    /// No buffers yet: the first forward allocates them.
    pub fn new() -> Self {
        Self::default()
    }

    /// The token count the buffers hold (0 before the first forward and after [`Self::clear`]).
    pub fn capacity(&self) -> usize {
        self.bufs.as_ref().map_or(0, |s| s.capacity)
    }

    /// Frees the buffers (after a long prefill, say); the next forward allocates them again.
    pub fn clear(&mut self) {
        self.bufs = None;
        self.last_tokens = 0;
    }

    /// Expert ids `[T, k]` and weights `[T, k]` of the last forward that used this scratch
    /// (`backend` is that forward's layer's, which owns the buffers).
    pub fn last_routing(&self, backend: &B) -> Result<(Array2<u32>, Array2<f32>)> {
        let Some(s) = &self.bufs else {
            return Ok((Array2::zeros((0, 0)), Array2::zeros((0, 0))));
        };
        let (t, k) = (self.last_tokens, s.dims.top_k);
        let n = t * k;
        let ids = backend.download_prefix(&s.ids, n)?.into_u32().expect("ids are u32");
        let w = backend
            .download_prefix(&s.weights, n)?
            .to_f32()
            .expect("weights are f32");
        Ok((
            Array2::from_shape_vec((t, k), ids).map_err(|e| MoeError::shape("ids", n, e.to_string()))?,
            Array2::from_shape_vec((t, k), w).map_err(|e| MoeError::shape("weights", n, e.to_string()))?,
        ))
    }

    /// Buffers for `tokens` tokens of a layer of `dims`.
    fn ensure(&mut self, b: &B, dims: Dims, tokens: usize) -> Result<&mut Scratch<B>> {
        let cap = match &self.bufs {
            Some(s) if s.dims == dims && s.capacity >= tokens => return Ok(self.bufs.as_mut().expect("just matched")),
            Some(s) if s.dims == dims => tokens,
            _ => tokens.max(1),
        };
        // The old buffers go first, so that growing does not hold both.
        self.bufs = None;
        let Dims {
            experts: e,
            top_k: k,
            hidden: h,
            inter,
            dtype,
            shared_inter,
            copies_rows,
            ..
        } = dims;
        let perm_shape = PermuteShape {
            tokens: cap,
            hidden: h,
            top_k: k,
            experts: e,
        };
        let tk = checked_mul(cap, k, "tokens * top_k")?;
        let shared = match shared_inter {
            None => None,
            Some(si) => {
                let iota: Vec<u32> = (0..cap as u32).collect();
                Some(SharedScratch {
                    offsets: b.alloc(DType::U32, 2)?,
                    act: b.alloc(dtype, checked_mul(cap, si, "tokens * shared intermediate")?)?,
                    out: b.alloc(dtype, checked_mul(cap, h, "tokens * hidden")?)?,
                    zeros: b.alloc(DType::U32, cap)?,
                    iota: b.upload(HostSlice::U32(&iota))?,
                    weights: b.upload(HostSlice::F32(&vec![1.0; cap]))?,
                    gate_logits: b.alloc(DType::F32, cap)?,
                })
            }
        };
        let bufs = self.bufs.insert(Scratch {
            dims,
            capacity: cap,
            logits: b.alloc(DType::F32, checked_mul(cap, e, "tokens * experts")?)?,
            ids: b.alloc(DType::U32, tk)?,
            weights: b.alloc(DType::F32, tk)?,
            perm: if copies_rows {
                Permuted::alloc(b, perm_shape, dtype)?
            } else {
                Permuted::alloc_without_rows(b, perm_shape, dtype)?
            },
            act: b.alloc(dtype, checked_mul(tk, inter, "tokens * top_k * intermediate")?)?,
            expert_out: b.alloc(dtype, checked_mul(tk, h, "tokens * top_k * hidden")?)?,
            shared,
        });
        Ok(bufs)
    }
}

struct SharedScratch<B: Backend> {
    offsets: B::Buffer,
    act: B::Buffer,
    out: B::Buffer,
    zeros: B::Buffer,
    iota: B::Buffer,
    weights: B::Buffer,
    gate_logits: B::Buffer,
}

/// One MoE layer's weights on a backend.
///
/// `forward` runs, on the backend's kernels and nothing else (an engine calling them itself gets
/// the same bits):
/// 1. `router_logits` (f32, on the router weight as `upload_weights` stored it for
///    [`RouterShape::as_gemm`]), `route`;
/// 2. `permute_mlp` (permute, gate/up with SwiGLU, down: `permute_matmul` then `grouped_matmul`),
///    `combine` into the output;
/// 3. with a shared expert, on every token as one expert (offsets `[0, T]`): `grouped_matmul`
///    gate/up with SwiGLU and down, then `combine` with `top_k` 1, `accumulate`, ids all 0 and
///    slots `0..T`, weighted 1 or, for Qwen2-MoE's gated one, by the gate's `router_logits` (one
///    output) routed with [`RouterSpec::shared_expert_gate`] (its sigmoid, on the same `route`
///    as the experts').
///
/// Nothing is read back to the host between kernels.
pub struct MoeLayer<B: Backend> {
    backend: B,
    spec: RouterSpec,
    dtype: DType,
    hidden: usize,
    inter: usize,
    router_weight: B::Buffer,
    gate_up: B::Buffer,
    down: B::Buffer,
    shared: Option<SharedDev<B>>,
    scratch: LayerScratch<B>,
    /// Bytes of the largest activation buffer per token, and the tokens a kernel's binding takes.
    token_bytes: u64,
    max_tokens: usize,
    copies_rows: bool,
}

impl<B: Backend> MoeLayer<B> {
    /// Validates `weights`, checks the backend's capabilities, uploads.
    pub fn new(backend: B, weights: &LayerWeights) -> Result<Self> {
        weights.validate()?;
        let dtype = weights.dtype();
        let caps = backend.capabilities();
        for k in [
            crate::Kernel::Permute,
            crate::Kernel::GroupedMatmul,
            crate::Kernel::Combine,
            crate::Kernel::RouterLogits,
        ] {
            caps.check(backend.name(), k, dtype)?;
        }
        backend.check_router(&weights.router)?;
        // Expert weights and the router's go up for the shapes of the forward pass (any token
        // count), packed where the backend packs them.
        let (h, r) = (weights.hidden_size, &weights.router);
        let ls = LayerShapes::new(0, h, weights.intermediate_size, r.num_experts, r.top_k)?;
        let router_weight = backend.upload_weights(HostSlice::F32(&weights.router_weight), ls.router.as_gemm())?;
        let gate_up = backend.upload_weights(weights.gate_up.as_slice(), ls.gate_up)?;
        let down = backend.upload_weights(weights.down.as_slice(), ls.down)?;
        let shared = match &weights.shared {
            None => None,
            Some(s) => {
                let (up, dn) = shared_shapes(0, h, s.intermediate_size);
                Some(SharedDev {
                    inter: s.intermediate_size,
                    gate_up: backend.upload_weights(s.gate_up.as_slice(), up)?,
                    down: backend.upload_weights(s.down.as_slice(), dn)?,
                    gate: s.gate.as_ref().map(|g| backend.upload(HostSlice::F32(g))).transpose()?,
                })
            }
        };
        // Each activation buffer of a forward is bound whole by some kernel: the largest per token
        // sets the tokens one call takes.
        let size = dtype.size();
        let (e, k, i) = (r.num_experts, r.top_k, weights.intermediate_size);
        let per_token = [
            k * h * size,
            k * i * size,
            h * size,
            e * 4,
            k * 4,
            weights.shared.as_ref().map_or(0, |s| s.intermediate_size * size),
        ]
        .into_iter()
        .max()
        .unwrap_or(1)
        .max(1) as u64;
        let max_tokens = usize::try_from(caps.max_binding_bytes / per_token).unwrap_or(usize::MAX);
        Ok(MoeLayer {
            copies_rows: backend.permute_matmul_copies_rows(dtype, &gate_up),
            token_bytes: per_token,
            max_tokens,
            spec: weights.router.clone(),
            dtype,
            hidden: weights.hidden_size,
            inter: weights.intermediate_size,
            router_weight,
            gate_up,
            down,
            shared,
            scratch: LayerScratch::new(),
            backend,
        })
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }
    /// The routed experts' gate/up (`[E, 2I, H]`) and down (`[E, H, I]`) weights as uploaded
    /// (packed where the backend packs them), so that a caller can time the kernels on the layer's
    /// own buffers instead of a second copy.
    pub fn expert_weights(&self) -> (&B::Buffer, &B::Buffer) {
        (&self.gate_up, &self.down)
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn hidden_size(&self) -> usize {
        self.hidden
    }
    pub fn router(&self) -> &RouterSpec {
        &self.spec
    }

    /// The most tokens one forward takes: each activation buffer (`[T, k, H]` permuted rows and
    /// expert outputs, `[T, k, I]` activations, `[T, E]` logits, ...) within the backend's
    /// [`Capabilities::max_binding_bytes`](crate::Capabilities::max_binding_bytes). Unbounded in
    /// practice on the CPU; on a GPU API with a per-binding limit, split larger batches.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    fn dims(&self) -> Dims {
        Dims {
            experts: self.spec.num_experts,
            top_k: self.spec.top_k,
            hidden: self.hidden,
            inter: self.inter,
            dtype: self.dtype,
            shared_inter: self.shared.as_ref().map(|s| s.inter),
            shared_gated: self.shared.as_ref().is_some_and(|s| s.gate.is_some()),
            copies_rows: self.copies_rows,
        }
    }

    /// Runs the layer on `x[T, H]` (layer dtype) into `out[T, H]` (layer dtype), with the layer's
    /// own work buffers (kept at the largest token count seen: [`MoeLayer::release_scratch`]).
    pub fn forward_into(&mut self, x: &B::Buffer, tokens: usize, out: &mut B::Buffer) -> Result<()> {
        let mut scratch = std::mem::take(&mut self.scratch);
        let done = self.forward_with(&mut scratch, x, tokens, out);
        self.scratch = scratch;
        done
    }

    /// [`MoeLayer::forward_into`] with work buffers the caller holds: one [`LayerScratch`] can
    /// serve every layer of a model, and threads can share one layer (`&self`), a scratch each.
    pub fn forward_with(
        &self,
        scratch: &mut LayerScratch<B>,
        x: &B::Buffer,
        tokens: usize,
        out: &mut B::Buffer,
    ) -> Result<()> {
        let (h, i) = (self.hidden, self.inter);
        let len = self.check_call(x, tokens)?;
        crate::check::buffer("layer output", out, self.dtype, len)?;
        let b = &self.backend;
        let s = scratch.ensure(b, self.dims(), tokens)?;
        let (spec, router_weight, gate_up, down, shared) =
            (&self.spec, &self.router_weight, &self.gate_up, &self.down, &self.shared);
        let done = b.run(|| kernels(b, spec, router_weight, gate_up, down, shared, s, x, tokens, (h, i), out));
        scratch.last_tokens = if done.is_ok() { tokens } else { 0 };
        done
    }

    /// The input holds `tokens` rows, and one call takes them ([`MoeLayer::max_tokens`]): checked
    /// before anything is allocated. Returns the elements of `[T, H]`.
    fn check_call(&self, x: &B::Buffer, tokens: usize) -> Result<usize> {
        let len = checked_mul(tokens, self.hidden, "tokens * hidden")?;
        crate::check::buffer("layer input", x, self.dtype, len)?;
        if tokens > self.max_tokens {
            return Err(MoeError::unsupported(
                self.backend.name(),
                format!("a layer forward of {tokens} tokens"),
                format!(
                    "at most {} tokens a call for this layer: its largest buffer takes {} bytes a token \
                     and a kernel binds at most {} bytes of a buffer; split the batch",
                    self.max_tokens,
                    self.token_bytes,
                    self.backend.capabilities().max_binding_bytes
                ),
            ));
        }
        Ok(len)
    }

    /// Frees the layer's own work buffers (those of [`MoeLayer::forward`]); the next forward
    /// allocates them again.
    pub fn release_scratch(&mut self) {
        self.scratch.clear();
    }

    /// Runs the layer on `x[T, H]`, returning a new `[T, H]` buffer.
    pub fn forward(&mut self, x: &B::Buffer, tokens: usize) -> Result<B::Buffer> {
        // The input first: a wrong token count must not allocate (and fill) an output for it.
        let len = self.check_call(x, tokens)?;
        let mut out = self.backend.alloc(self.dtype, len)?;
        self.forward_into(x, tokens, &mut out)?;
        Ok(out)
    }

    /// Host convenience: f32 in, f32 out (converted to and from the layer dtype).
    pub fn forward_host(&mut self, x: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
        let (t, h) = x.dim();
        if h != self.hidden {
            return Err(MoeError::shape("hidden_states columns", h, self.hidden));
        }
        let flat: Vec<f32> = x.iter().copied().collect();
        let host = HostVec::from_f32(&flat, self.dtype).expect("layer dtype is a float");
        let xb = self.backend.upload(host.as_slice())?;
        let out = self.forward(&xb, t)?;
        let v = self.backend.download(&out)?.to_f32().expect("layer dtype is a float");
        Array2::from_shape_vec((t, h), v[..t * h].to_vec()).map_err(|e| MoeError::shape("output", t * h, e.to_string()))
    }

    /// Expert ids `[T, k]` and weights `[T, k]` of the last [`MoeLayer::forward`] (those of
    /// `forward_with` are in its [`LayerScratch`]).
    pub fn last_routing(&self) -> Result<(Array2<u32>, Array2<f32>)> {
        if self.scratch.capacity() == 0 {
            let k = self.spec.top_k;
            return Ok((Array2::zeros((0, k)), Array2::zeros((0, k))));
        }
        self.scratch.last_routing(&self.backend)
    }
}

/// The shared expert's gate/up and down matmuls for `tokens` tokens (one expert, every row).
fn shared_shapes(tokens: usize, h: usize, inter: usize) -> (GemmShape, GemmShape) {
    let up = GemmShape {
        rows: tokens,
        in_features: h,
        out_features: inter,
        experts: 1,
        activation: Activation::SwiGlu,
    };
    let dn = GemmShape {
        rows: tokens,
        in_features: inter,
        out_features: h,
        experts: 1,
        activation: Activation::None,
    };
    (up, dn)
}

/// The kernels of one layer forward, in order (the body of [`MoeLayer::forward_into`], run inside
/// [`Backend::run`]).
#[allow(clippy::too_many_arguments)]
fn kernels<B: Backend>(
    b: &B,
    spec: &RouterSpec,
    router_weight: &B::Buffer,
    gate_up: &B::Buffer,
    down: &B::Buffer,
    shared: &Option<SharedDev<B>>,
    s: &mut Scratch<B>,
    x: &B::Buffer,
    tokens: usize,
    (h, i): (usize, usize),
    out: &mut B::Buffer,
) -> Result<()> {
    let (e, k) = (spec.num_experts, spec.top_k);
    let ls = LayerShapes::new(tokens, h, i, e, k)?;
    b.router_logits(x, router_weight, &mut s.logits, ls.router)?;
    b.route(&s.logits, spec, tokens, &mut s.ids, &mut s.weights)?;
    b.permute_mlp(
        x,
        &s.ids,
        ls.permute,
        &mut s.perm,
        (gate_up, down),
        &mut s.act,
        &mut s.expert_out,
        (ls.gate_up, ls.down),
    )?;
    b.combine(&s.expert_out, &s.ids, &s.weights, &s.perm.slot_of, out, ls.combine)?;
    if let (Some(sh), Some(ss)) = (shared, s.shared.as_mut()) {
        b.write(&mut ss.offsets, HostSlice::U32(&[0, tokens as u32]))?;
        let (up, dn) = shared_shapes(tokens, h, sh.inter);
        b.grouped_matmul(x, &ss.offsets, &sh.gate_up, &mut ss.act, up)?;
        b.grouped_matmul(&ss.act, &ss.offsets, &sh.down, &mut ss.out, dn)?;
        if let Some(g) = &sh.gate {
            b.router_logits(
                x,
                g,
                &mut ss.gate_logits,
                RouterShape {
                    tokens,
                    hidden: h,
                    experts: 1,
                },
            )?;
            b.route(
                &ss.gate_logits,
                &RouterSpec::shared_expert_gate(),
                tokens,
                &mut ss.zeros,
                &mut ss.weights,
            )?;
        }
        b.combine(
            &ss.out,
            &ss.zeros,
            &ss.weights,
            &ss.iota,
            out,
            CombineShape {
                tokens,
                hidden: h,
                top_k: 1,
                accumulate: true,
            },
        )?;
    }
    Ok(())
}

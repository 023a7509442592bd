//! Host-side launch configuration: grid sizes from upper bounds (never from
//! device data, so nothing is read back between kernels) and the mapping of a
//! router spec onto the route kernel's arguments. Pure functions, tested
//! without a GPU.

use moe_hal_core::{GroupScore, MoeError, Renorm, Result, RouterSpec, Scoring};

/// Threads per block of the route and topk kernels (a multiple of 32).
pub const ROUTE_THREADS: u32 = 256;
/// Flat indices per permute chunk (`CHUNK` in permute.cu).
pub const PERMUTE_CHUNK: usize = 1024;
/// Output tile of grouped_matmul.cu (`BM`, `BN`).
pub const GEMM_TILE: usize = 64;
/// Dynamic shared memory a block may use without opting in.
pub const MAX_DYNAMIC_SMEM: usize = 48 * 1024;
/// Largest E the route kernel takes (shared memory: (3E + 2 n_group) floats).
pub const MAX_EXPERTS: usize = 2048;
/// Largest k (route and topk select k rounds; any k <= E works, this is the advertised bound).
pub const MAX_TOP_K: usize = MAX_EXPERTS;

/// Scalar arguments of `route` after the four buffers, in kernel order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RouteArgs {
    pub tokens: u32,
    pub experts: u32,
    pub top_k: u32,
    pub n_group: u32,
    pub topk_group: u32,
    /// 0 max, 1 top-2 sum.
    pub group_score: u32,
    /// 0 softmax, 1 sigmoid.
    pub scoring: u32,
    pub has_bias: u32,
    /// 0 none, 1 sum, 2 sum + eps.
    pub renorm: u32,
    pub eps: f32,
    pub scale: f32,
    pub shared_mem_bytes: u32,
}

fn to_u32(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| MoeError::shape(what, v, "at most 2^32 - 1"))
}

/// Maps a (validated) spec onto `route`'s arguments.
pub fn route_args(spec: &RouterSpec, tokens: usize) -> Result<RouteArgs> {
    let (n_group, topk_group, group_score) = match spec.grouping {
        Some(g) => (g.n_group, g.topk_group, (g.score == GroupScore::Top2Sum) as u32),
        None => (1, 1, 0),
    };
    let smem = (3 * spec.num_experts + 2 * n_group) * 4;
    if spec.num_experts > MAX_EXPERTS || smem > MAX_DYNAMIC_SMEM {
        return Err(MoeError::unsupported(
            "cuda",
            format!("route with {} experts", spec.num_experts),
            format!("at most {MAX_EXPERTS} experts (the scores live in shared memory)"),
        ));
    }
    let (renorm, eps) = match spec.renorm {
        Renorm::None => (0, 0.0),
        Renorm::Sum => (1, 0.0),
        Renorm::SumEps(e) => (2, e),
    };
    Ok(RouteArgs {
        tokens: to_u32("tokens", tokens)?,
        experts: spec.num_experts as u32,
        top_k: spec.top_k as u32,
        n_group: n_group as u32,
        topk_group: topk_group as u32,
        group_score,
        scoring: (spec.scoring == Scoring::Sigmoid) as u32,
        has_bias: spec.correction_bias.is_some() as u32,
        renorm,
        eps,
        scale: spec.routed_scaling_factor,
        shared_mem_bytes: smem as u32,
    })
}

/// Grid of grouped_matmul: x = row tiles (an upper bound: every expert may
/// add one partial tile), y = column tiles.
pub fn gemm_grid(rows: usize, out_features: usize, experts: usize) -> Result<(u32, u32)> {
    let x = rows.div_ceil(GEMM_TILE) + experts;
    let y = out_features.div_ceil(GEMM_TILE);
    if x > i32::MAX as usize {
        return Err(MoeError::shape("grouped_matmul row tiles", x, "at most 2^31 - 1"));
    }
    if y > 65535 {
        return Err(MoeError::shape(
            "grouped_matmul column tiles",
            y,
            "at most 65535 (out_features <= 4194240)",
        ));
    }
    Ok((x as u32, y as u32))
}

/// Chunks of the permute counting sort.
pub fn permute_chunks(n: usize) -> usize {
    n.div_ceil(PERMUTE_CHUNK)
}

/// Blocks for a grid-stride elementwise kernel of `n` items.
pub fn elementwise_blocks(n: usize, threads: u32) -> u32 {
    (n.div_ceil(threads as usize).clamp(1, 65535 * 8)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deepseek_spec_maps_onto_route_arguments() {
        let spec = RouterSpec::deepseek_v3(256, 8, 8, 4, Some(vec![0.0; 256]), true, 2.5);
        let a = route_args(&spec, 4096).unwrap();
        assert_eq!(
            a,
            RouteArgs {
                tokens: 4096,
                experts: 256,
                top_k: 8,
                n_group: 8,
                topk_group: 4,
                group_score: 1,
                scoring: 1,
                has_bias: 1,
                renorm: 2,
                eps: 1e-20,
                scale: 2.5,
                shared_mem_bytes: (3 * 256 + 16) * 4,
            }
        );
        let m = route_args(&RouterSpec::softmax_topk(8, 2, true), 1).unwrap();
        assert_eq!((m.n_group, m.scoring, m.renorm, m.has_bias, m.scale), (1, 0, 1, 0, 1.0));
        let q = route_args(&RouterSpec::softmax_topk(128, 8, false), 1).unwrap();
        assert_eq!(q.renorm, 0);
    }

    #[test]
    fn large_expert_counts_are_refused_not_launched() {
        let e = route_args(&RouterSpec::softmax_topk(4096, 8, true), 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("at most 2048 experts"), "{e}");
        assert!(route_args(&RouterSpec::softmax_topk(1024, 32, true), 1).is_ok());
    }

    #[test]
    fn grids_come_from_upper_bounds() {
        // Decode: 8 rows over 256 experts: one tile per row at most, plus one per expert.
        assert_eq!(gemm_grid(8, 2048, 256).unwrap(), (257, 32));
        assert_eq!(gemm_grid(0, 10, 4).unwrap(), (4, 1));
        assert_eq!(gemm_grid(32768, 7168, 256).unwrap(), (512 + 256, 112));
        assert!(gemm_grid(10, 65536 * 64, 1).is_err());
        assert_eq!(permute_chunks(0), 0);
        assert_eq!(permute_chunks(1025), 2);
        assert_eq!(elementwise_blocks(0, 256), 1);
    }
}

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

/// `v` as a kernel's u32 argument, or an error naming it.
pub(crate) fn to_u32(what: &str, v: usize) -> Result<u32> {
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

/// Grid of grouped_matmul's 64x64 tiles: x = row tiles (an upper bound: every expert may
/// add one partial tile), y = column tiles.
pub fn gemm_grid(rows: usize, out_features: usize, experts: usize) -> Result<(u32, u32)> {
    tile_grid(rows, GEMM_TILE, experts, out_features, GEMM_TILE)
}

/// A tiled grid: x = `rows` in `tile_rows`-row tiles plus one partial tile per expert (an upper bound),
/// y = `out_features` in `tile_cols`-column tiles; refused past the launch limits.
fn tile_grid(
    rows: usize,
    tile_rows: usize,
    experts: usize,
    out_features: usize,
    tile_cols: usize,
) -> Result<(u32, u32)> {
    let x = rows.div_ceil(tile_rows) + experts;
    let y = out_features.div_ceil(tile_cols);
    if x > i32::MAX as usize {
        return Err(MoeError::shape("grouped_matmul row tiles", x, "at most 2^31 - 1"));
    }
    if y > 65535 {
        return Err(MoeError::shape(
            "grouped_matmul column tiles",
            y,
            format!("at most 65535 (out_features <= {})", 65535 * tile_cols),
        ));
    }
    Ok((x as u32, y as u32))
}

/// Which grouped_matmul kernel family runs a call (grouped_matmul.cu's header says what each does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmKernel {
    /// `grouped_matmul_rows_*`: a warp per output column, weights streamed once per 8 rows.
    Rows,
    /// `grouped_matmul_tc_*`: pipelined tensor-core tiles of 128 rows (f16/bf16, K a multiple of 8).
    TensorCore,
    /// `grouped_matmul_tc32_*`: the same with 32-row tiles, for experts with few rows each.
    TensorCore32,
    /// `grouped_matmul_{f32,f16,bf16}`: 64x64 tiles, any K.
    Tiles,
}

/// Which kernels the backend may pick from: `MOE_CUDA_GEMM` = `auto` (default); `rows`, `tc128`, `tc32` or
/// `tiles` force one kernel where it applies, `tc` the tensor cores with the tile height chosen as in `auto`
/// (for benchmarks and for tests that cover every kernel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmPolicy {
    Auto,
    /// Tensor cores wherever they apply.
    TensorCore,
    Force(GemmKernel),
}

impl GemmPolicy {
    /// Parses `MOE_CUDA_GEMM`'s value; unset or empty is `Auto`.
    pub fn parse(v: Option<&str>) -> std::result::Result<Self, String> {
        match v.map(str::trim) {
            None | Some("") | Some("auto") => Ok(GemmPolicy::Auto),
            Some("rows") => Ok(GemmPolicy::Force(GemmKernel::Rows)),
            Some("tc") => Ok(GemmPolicy::TensorCore),
            Some("tc128") => Ok(GemmPolicy::Force(GemmKernel::TensorCore)),
            Some("tc32") => Ok(GemmPolicy::Force(GemmKernel::TensorCore32)),
            Some("tiles") => Ok(GemmPolicy::Force(GemmKernel::Tiles)),
            Some(o) => Err(format!(
                "MOE_CUDA_GEMM={o:?}: expected auto, rows, tc, tc128, tc32 or tiles"
            )),
        }
    }
}

/// `Auto` streams weights with the rows kernel while the rows per expert (on average: known on the host)
/// stay at or below these; above them tiles reuse each weight tile across more rows. Measured on an H200 at
/// DeepSeek-V3's shapes (benches/RESULTS.md), gate/up + down, ms: at 2 rows per expert (T 64) rows 7.43,
/// 32-row tensor-core tiles 7.47; at 4 (T 128) 12.98 against 8.79. A dense f32 GEMM (E = 1: the router's,
/// N 256, K 7168): the rows kernel took 0.45 ms against 0.92 for the SIMT tiles at T 512, 1.23 against 0.95
/// at 1024. Grouped f32 GEMMs (E > 1) were not measured: they take the half-precision bound (decode streams
/// weights either way; above it the SIMT tiles re-read each weight row less often).
pub const ROWS_MAX_AVG_HALF: usize = 2;
pub const ROWS_MAX_AVG_DENSE_F32: usize = 512;
/// Up to this many rows per expert on average, tensor-core tiles are 32 rows high (a 128-row tile of an
/// expert with 16 rows multiplies 112 rows of zeros). Measured as above: at 32 rows per expert (T 1024)
/// 32-row tiles 13.4 ms against 15.6 for 128-row ones; at 128 (T 4096) 28.7 against 24.6.
pub const TC32_MAX_AVG: usize = 32;

/// Rows per expert up to which `Auto` picks the rows kernel.
fn rows_kernel_bound(half: bool, experts: usize) -> usize {
    if !half && experts == 1 {
        ROWS_MAX_AVG_DENSE_F32
    } else {
        ROWS_MAX_AVG_HALF
    }
}

/// Largest rows, K and N a grouped_matmul launch takes: the kernels count rows and k in 32-bit unsigned
/// integers and step them by up to 2^16 (grid z times 8 rows), so values near 2^32 would wrap.
pub const GEMM_MAX_EXTENT: usize = (1 << 31) - 1;

/// Refuses extents the kernels' 32-bit loop counters cannot step through.
pub fn check_gemm_extents(rows: usize, in_features: usize, out_features: usize) -> Result<()> {
    for (what, v) in [
        ("rows", rows),
        ("in_features", in_features),
        ("out_features", out_features),
    ] {
        if v > GEMM_MAX_EXTENT {
            return Err(MoeError::shape(what, v, "at most 2^31 - 1 on CUDA"));
        }
    }
    Ok(())
}

/// The kernel for `rows` rows over `experts` experts with `in_features` K, in half precision or f32.
/// The tensor-core kernel needs K % 8 == 0 (16-byte row starts) and a half-precision dtype.
pub fn choose_gemm(policy: GemmPolicy, rows: usize, experts: usize, in_features: usize, half: bool) -> GemmKernel {
    let tc_ok = half && in_features.is_multiple_of(8);
    let e = experts.max(1);
    let tc = if rows <= TC32_MAX_AVG * e {
        GemmKernel::TensorCore32
    } else {
        GemmKernel::TensorCore
    };
    let want = match policy {
        GemmPolicy::Force(k) => k,
        GemmPolicy::TensorCore => tc,
        GemmPolicy::Auto if rows <= rows_kernel_bound(half, e) * e => GemmKernel::Rows,
        GemmPolicy::Auto => tc,
    };
    match want {
        GemmKernel::TensorCore | GemmKernel::TensorCore32 if !tc_ok => GemmKernel::Tiles,
        k => k,
    }
}

/// Warps per block of the rows kernel (`ROWS_WARPS`).
pub const ROWS_WARPS: usize = 8;
/// Blocks the rows kernel's grid aims at: most blocks of a decode step find their expert empty and
/// exit, so more columns per warp keep that overhead small.
const ROWS_TARGET_BLOCKS: usize = 16384;

/// Rows the rows kernel applies each weight row to per pass (`ROWS_PER_PASS`).
pub const ROWS_PER_PASS: usize = 8;

/// Grid of the rows kernel (x = experts, y = column blocks, z = row splits) and output columns per warp.
/// z splits each expert's passes over `rows.div_ceil(experts)` rows (its average, an upper bound for a dense
/// GEMM such as the router's, E = 1) across blocks, so that a GEMM with few experts still fills the device.
pub fn rows_grid(experts: usize, out_features: usize, rows: usize) -> Result<((u32, u32, u32), u32)> {
    let e = experts.max(1);
    let cols_per_warp = (e * out_features.max(1).div_ceil(ROWS_WARPS))
        .div_ceil(ROWS_TARGET_BLOCKS)
        .clamp(1, 8);
    let y = out_features.div_ceil(ROWS_WARPS * cols_per_warp).max(1);
    let z = rows.div_ceil(e).div_ceil(ROWS_PER_PASS).clamp(1, 65535);
    if e > i32::MAX as usize || y > 65535 {
        return Err(MoeError::shape(
            "grouped_matmul grid",
            e.max(y),
            "at most 2^31 - 1 experts and 65535 column blocks",
        ));
    }
    Ok(((e as u32, y as u32, z as u32), cols_per_warp as u32))
}

/// Width (in weight rows) of the tensor-core kernels' tiles (`TC_BW`).
pub const TC_TILE: usize = 128;

/// Dynamic shared memory of a tensor-core kernel with `stages` stages and `tile_rows`-row tiles: per stage
/// an A tile of `tile_rows` x 40 halves and a B tile of 128 x 40.
pub const fn tc_smem(stages: u32, tile_rows: u32) -> u32 {
    stages * (tile_rows + TC_TILE as u32) * 40 * 2
}

/// Threads of the tensor-core kernel with `tile_rows`-row tiles.
pub const fn tc_threads(tile_rows: usize) -> u32 {
    if tile_rows == 128 {
        256
    } else {
        128
    }
}

/// Grid of the tensor-core kernel with `tile_rows`-row tiles: x = row tiles (an upper bound), y = column
/// tiles. With SwiGLU a tile covers 64 output columns (their gate and up rows), without it 128.
pub fn tc_grid(rows: usize, out_features: usize, experts: usize, swiglu: bool, tile_rows: usize) -> Result<(u32, u32)> {
    tile_grid(
        rows,
        tile_rows,
        experts,
        out_features,
        if swiglu { TC_TILE / 2 } else { TC_TILE },
    )
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
    fn gemm_kernel_choice() {
        use GemmKernel::*;
        let auto = GemmPolicy::Auto;
        // DeepSeek-V3: decode and up to 2 rows per expert stream weights; more use tensor cores, in 32-row
        // tiles up to 32 rows per expert.
        assert_eq!(choose_gemm(auto, 8, 256, 7168, true), Rows);
        assert_eq!(choose_gemm(auto, 512, 256, 7168, true), Rows);
        assert_eq!(choose_gemm(auto, 513, 256, 7168, true), TensorCore32);
        assert_eq!(choose_gemm(auto, 8192, 256, 7168, true), TensorCore32);
        assert_eq!(choose_gemm(auto, 8193, 256, 7168, true), TensorCore);
        assert_eq!(choose_gemm(GemmPolicy::TensorCore, 8, 256, 7168, true), TensorCore32);
        assert_eq!(
            choose_gemm(GemmPolicy::Force(TensorCore32), 1 << 20, 1, 64, true),
            TensorCore32
        );
        // No tensor cores for f32 or K % 8 != 0.
        assert_eq!(choose_gemm(auto, 2 * 256, 256, 7168, false), Rows);
        assert_eq!(choose_gemm(auto, 2 * 256 + 1, 256, 7168, false), Tiles);
        assert_eq!(choose_gemm(auto, 32768, 256, 37, true), Tiles);
        assert_eq!(choose_gemm(GemmPolicy::Force(TensorCore), 1, 1, 37, true), Tiles);
        assert_eq!(choose_gemm(GemmPolicy::Force(Rows), 1 << 20, 1, 64, true), Rows);
        // The router: one expert, T rows.
        assert_eq!(choose_gemm(auto, 512, 1, 7168, false), Rows);
        assert_eq!(choose_gemm(auto, 513, 1, 7168, false), Tiles);
        assert_eq!(choose_gemm(GemmPolicy::TensorCore, 513, 1, 7168, false), Tiles);
        assert_eq!(GemmPolicy::parse(None).unwrap(), auto);
        assert_eq!(GemmPolicy::parse(Some("tc")).unwrap(), GemmPolicy::TensorCore);
        assert_eq!(GemmPolicy::parse(Some("tc128")).unwrap(), GemmPolicy::Force(TensorCore));
        assert!(GemmPolicy::parse(Some("fast"))
            .unwrap_err()
            .contains("expected auto, rows, tc, tc128, tc32 or tiles"));
    }

    #[test]
    fn extents_past_2_pow_31_are_refused() {
        assert!(check_gemm_extents(1 << 20, 7168, 4096).is_ok());
        assert!(check_gemm_extents(GEMM_MAX_EXTENT, GEMM_MAX_EXTENT, GEMM_MAX_EXTENT).is_ok());
        let e = check_gemm_extents(1 << 31, 8, 8).unwrap_err().to_string();
        assert!(e.contains("rows") && e.contains("2^31 - 1"), "{e}");
        assert!(check_gemm_extents(8, 1 << 31, 8)
            .unwrap_err()
            .to_string()
            .contains("in_features"));
        assert!(check_gemm_extents(8, 8, 1 << 31)
            .unwrap_err()
            .to_string()
            .contains("out_features"));
    }

    #[test]
    fn rows_and_tc_grids() {
        // Router (E = 1, N = 256): a column per warp, 32 column blocks, the rows split 8 per block.
        assert_eq!(rows_grid(1, 256, 1).unwrap(), ((1, 32, 1), 1));
        assert_eq!(rows_grid(1, 256, 512).unwrap(), ((1, 32, 64), 1));
        // DeepSeek gate/up (N = 2048) and down (N = 7168) over 256 experts: at most ~16K blocks per split.
        assert_eq!(rows_grid(256, 2048, 8).unwrap(), ((256, 64, 1), 4));
        assert_eq!(rows_grid(256, 7168, 1024).unwrap(), ((256, 112, 1), 8));
        assert_eq!(rows_grid(256, 7168, 2049).unwrap(), ((256, 112, 2), 8));
        assert_eq!(rows_grid(3, 1, 0).unwrap(), ((3, 1, 1), 1));
        assert_eq!(rows_grid(0, 0, 0).unwrap(), ((1, 1, 1), 1));
        assert_eq!(rows_grid(1, 8, usize::MAX / 2).unwrap().0 .2, 65535);
        assert_eq!(tc_grid(32768, 2048, 256, true, 128).unwrap(), (256 + 256, 32));
        assert_eq!(tc_grid(32768, 7168, 256, false, 128).unwrap(), (512, 56));
        assert_eq!(tc_grid(4096, 7168, 256, false, 32).unwrap(), (128 + 256, 56));
        assert_eq!(tc_grid(1, 70, 3, true, 32).unwrap(), (4, 2));
        assert_eq!(
            (tc_smem(4, 128), tc_smem(2, 128), tc_smem(4, 32)),
            (81920, 40960, 51200)
        );
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

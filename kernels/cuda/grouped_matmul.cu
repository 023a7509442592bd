// grouped_matmul: one GEMM per expert over ragged row groups.
//
// y[r, n] = sum_k x[r, k] * W[e, n, k] for the rows r of expert e
// (offsets[e] <= r < offsets[e + 1]); W is [E, N, K] as checkpoints store
// Linear weights, or [E, 2N, K] (gate rows, then up rows) with the fused
// SwiGLU epilogue y = silu(gate) * up. Accumulation is f32; the result is
// rounded once when stored. Rows outside offsets[0] .. offsets[E] are not
// touched.
//
// Kernel families, chosen on the host from the rows per expert (crates/cuda/src/launch.rs, choose_gemm; no
// read-back):
// - grouped_matmul_rows_*: few rows per expert (decode, the router). One warp
//   per output column, lanes across K (16-byte loads when K * sizeof(T) is a
//   multiple of 16, else one element at a time); each weight row is streamed
//   once per pass of up to ROWS_PER_PASS rows of x. Memory-bound by design.
//   Each output: a per-lane f32 FMA chain in ascending k, then a fixed
//   butterfly over the 32 lanes.
// - grouped_matmul_tc*_{f16,bf16}: more rows per expert, K a multiple of 8.
//   Tensor cores (WMMA 16x16x16, f32 accumulators), tiles of 128 or 32 rows
//   by 128 weight rows, 16-byte cp.async copies into a 4-stage shared-memory
//   pipeline (2 stages where the device refuses the opt-in). Grid x:
//   ceil(rows / tile rows) + E row tiles (an upper bound: each block finds
//   its expert by walking the device-side offsets).
// - grouped_matmul_{f32,f16,bf16}: any K. 64x64 tiles, f32 on SIMT (256
//   threads, 4x4 outputs per thread), f16/bf16 on WMMA (4 warps).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#define BM 64
#define BN 64
#define BK 16

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

// This block's expert and row range [r0, r1); false when the block has no work.
__device__ bool find_tile(const unsigned int* __restrict__ offsets, unsigned int experts, unsigned int rows,
                          unsigned int tile, unsigned int* e_out, unsigned int* r0, unsigned int* r1,
                          unsigned int bm = BM) {
    unsigned int cum = 0;
    for (unsigned int e = 0; e < experts; ++e) {
        const unsigned int a = min(offsets[e], rows), b = min(offsets[e + 1], rows);
        const unsigned int n_tiles = b > a ? (b - a + bm - 1) / bm : 0;
        if (tile < cum + n_tiles) {
            *e_out = e;
            *r0 = a + (tile - cum) * bm;
            *r1 = min(*r0 + bm, b);
            return true;
        }
        cum += n_tiles;
    }
    return false;
}

extern "C" __global__ void __launch_bounds__(256)
    grouped_matmul_f32(const float* __restrict__ x, const unsigned int* __restrict__ offsets,
                       const float* __restrict__ w, float* __restrict__ y, unsigned int rows, unsigned int K,
                       unsigned int N, unsigned int experts, unsigned int swiglu) {
    unsigned int e, r0, r1;
    if (!find_tile(offsets, experts, rows, blockIdx.x, &e, &r0, &r1)) return;
    const unsigned int col0 = blockIdx.y * BN;
    const size_t wrows = swiglu ? 2 * (size_t)N : (size_t)N;
    const float* we = w + (size_t)e * wrows * K;
    __shared__ float As[BK][BM];
    __shared__ float Bg[BK][BN];
    __shared__ float Bu[BK][BN];
    const unsigned int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
    float g[4][4] = {}, u[4][4] = {};
    for (unsigned int k0 = 0; k0 < K; k0 += BK) {
        for (unsigned int i = tid; i < BM * BK; i += 256) {
            const unsigned int r = i / BK, kk = i % BK, row = r0 + r, k = k0 + kk;
            As[kk][r] = (row < r1 && k < K) ? x[(size_t)row * K + k] : 0.0f;
        }
        for (unsigned int i = tid; i < BN * BK; i += 256) {
            const unsigned int n = i / BK, kk = i % BK, col = col0 + n, k = k0 + kk;
            const bool ok = col < N && k < K;
            Bg[kk][n] = ok ? we[(size_t)col * K + k] : 0.0f;
            if (swiglu) Bu[kk][n] = ok ? we[((size_t)N + col) * K + k] : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (unsigned int kk = 0; kk < BK; ++kk) {
            float a[4], bg[4], bu[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                a[i] = As[kk][ty * 4 + i];
                bg[i] = Bg[kk][tx * 4 + i];
                bu[i] = swiglu ? Bu[kk][tx * 4 + i] : 0.0f;
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    g[i][j] = fmaf(a[i], bg[j], g[i][j]);
                    u[i][j] = fmaf(a[i], bu[j], u[i][j]);
                }
        }
        __syncthreads();
    }
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) {
            const unsigned int row = r0 + ty * 4 + i, col = col0 + tx * 4 + j;
            if (row < r1 && col < N) y[(size_t)row * N + col] = swiglu ? silu(g[i][j]) * u[i][j] : g[i][j];
        }
}

__device__ __forceinline__ void store_f(__half* p, float v) { *p = __float2half(v); }
__device__ __forceinline__ void store_f(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

template <typename T>
__device__ void grouped_matmul_wmma(const T* __restrict__ x, const unsigned int* __restrict__ offsets,
                                    const T* __restrict__ w, T* __restrict__ y, unsigned int rows, unsigned int K,
                                    unsigned int N, unsigned int experts, unsigned int swiglu) {
    using namespace nvcuda;
    unsigned int e, r0, r1;
    if (!find_tile(offsets, experts, rows, blockIdx.x, &e, &r0, &r1)) return;
    const unsigned int col0 = blockIdx.y * BN;
    const size_t wrows = swiglu ? 2 * (size_t)N : (size_t)N;
    const T* we = w + (size_t)e * wrows * K;
    __shared__ __align__(32) T As[BM * BK];  // [BM][BK], row-major
    __shared__ __align__(32) T Bg[BN * BK];  // [BN][BK]: a col-major [BK][BN] matrix_b
    __shared__ __align__(32) T Bu[BN * BK];
    __shared__ __align__(32) float Cg[BM * BN];
    __shared__ __align__(32) float Cu[BM * BN];
    const unsigned int tid = threadIdx.x, warp = tid / 32, wm = warp / 2, wn = warp % 2;
    T zero;
    store_f(&zero, 0.0f);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> cg[2][2], cu[2][2];
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) {
            wmma::fill_fragment(cg[i][j], 0.0f);
            wmma::fill_fragment(cu[i][j], 0.0f);
        }
    for (unsigned int k0 = 0; k0 < K; k0 += BK) {
        for (unsigned int i = tid; i < BM * BK; i += 128) {
            const unsigned int r = i / BK, kk = i % BK, row = r0 + r, k = k0 + kk;
            As[i] = (row < r1 && k < K) ? x[(size_t)row * K + k] : zero;
        }
        for (unsigned int i = tid; i < BN * BK; i += 128) {
            const unsigned int n = i / BK, kk = i % BK, col = col0 + n, k = k0 + kk;
            const bool ok = col < N && k < K;
            Bg[i] = ok ? we[(size_t)col * K + k] : zero;
            if (swiglu) Bu[i] = ok ? we[((size_t)N + col) * K + k] : zero;
        }
        __syncthreads();
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], As + (wm * 32 + i * 16) * BK, BK);
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], Bg + (wn * 32 + j * 16) * BK, BK);
        for (int i = 0; i < 2; ++i)
            for (int j = 0; j < 2; ++j) wmma::mma_sync(cg[i][j], a[i], b[j], cg[i][j]);
        if (swiglu) {
            for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], Bu + (wn * 32 + j * 16) * BK, BK);
            for (int i = 0; i < 2; ++i)
                for (int j = 0; j < 2; ++j) wmma::mma_sync(cu[i][j], a[i], b[j], cu[i][j]);
        }
        __syncthreads();
    }
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) {
            const unsigned int at = (wm * 32 + i * 16) * BN + wn * 32 + j * 16;
            wmma::store_matrix_sync(Cg + at, cg[i][j], BN, wmma::mem_row_major);
            if (swiglu) wmma::store_matrix_sync(Cu + at, cu[i][j], BN, wmma::mem_row_major);
        }
    __syncthreads();
    for (unsigned int i = tid; i < BM * BN; i += 128) {
        const unsigned int row = r0 + i / BN, col = col0 + i % BN;
        if (row < r1 && col < N) store_f(&y[(size_t)row * N + col], swiglu ? silu(Cg[i]) * Cu[i] : Cg[i]);
    }
}

extern "C" __global__ void __launch_bounds__(128)
    grouped_matmul_f16(const __half* x, const unsigned int* offsets, const __half* w, __half* y, unsigned int rows,
                       unsigned int K, unsigned int N, unsigned int experts, unsigned int swiglu) {
    grouped_matmul_wmma(x, offsets, w, y, rows, K, N, experts, swiglu);
}

// bf16 WMMA fragments exist from sm_80 on; the host does not load this kernel on older devices.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
extern "C" __global__ void __launch_bounds__(128)
    grouped_matmul_bf16(const __nv_bfloat16* x, const unsigned int* offsets, const __nv_bfloat16* w,
                        __nv_bfloat16* y, unsigned int rows, unsigned int K, unsigned int N, unsigned int experts,
                        unsigned int swiglu) {
    grouped_matmul_wmma(x, offsets, w, y, rows, K, N, experts, swiglu);
}
#endif

// ---------------------------------------------------------------------------
// Few rows per expert: grouped_matmul_rows_*.

#define ROWS_PER_PASS 8
#define ROWS_WARPS 8

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void store_f(float* p, float v) { *p = v; }

// 16 bytes at p (16-byte aligned), widened to f32.
__device__ __forceinline__ void load16(const float* p, float* f) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(p));
    f[0] = v.x;
    f[1] = v.y;
    f[2] = v.z;
    f[3] = v.w;
}
__device__ __forceinline__ void load16(const __half* p, float* f) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 t = __half22float2(h[i]);
        f[2 * i] = t.x;
        f[2 * i + 1] = t.y;
    }
}
__device__ __forceinline__ void load16(const __nv_bfloat16* p, float* f) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 t = __bfloat1622float2(h[i]);
        f[2 * i] = t.x;
        f[2 * i + 1] = t.y;
    }
}

// Block (e, column block, row split): 8 warps, each `cols_per_warp` output columns. vec: K * sizeof(T) is a multiple of 16,
// so every row starts 16-byte aligned (buffers are 256-byte aligned).
template <typename T>
__device__ void grouped_matmul_rows_impl(const T* __restrict__ x, const unsigned int* __restrict__ offsets,
                                         const T* __restrict__ w, T* __restrict__ y, unsigned int rows,
                                         unsigned int K, unsigned int N, unsigned int experts, unsigned int swiglu,
                                         unsigned int cols_per_warp) {
    constexpr unsigned int V = 16 / sizeof(T);
    const unsigned int e = blockIdx.x;
    if (e >= experts) return;
    const unsigned int a = min(offsets[e], rows), b = min(offsets[e + 1], rows);
    if (b <= a) return;
    const unsigned int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const size_t wrows = swiglu ? 2 * (size_t)N : (size_t)N;
    const T* we = w + (size_t)e * wrows * K;
    const bool vec = (K % V) == 0;
    const unsigned int col_base = blockIdx.y * ROWS_WARPS * cols_per_warp;
    for (unsigned int c = 0; c < cols_per_warp; ++c) {
        const unsigned int n = col_base + c * ROWS_WARPS + warp;
        if (n >= N) break;
        const T* wg = we + (size_t)n * K;
        const T* wu = we + ((size_t)N + n) * K;  // read only when swiglu
        // Row chunks of this expert: blockIdx.z, then every gridDim.z-th (z > 1 splits a dense GEMM's rows).
        for (unsigned int r0 = a + blockIdx.z * ROWS_PER_PASS; r0 < b; r0 += gridDim.z * ROWS_PER_PASS) {
            const unsigned int nr = min((unsigned int)ROWS_PER_PASS, b - r0);
            const T* xr = x + (size_t)r0 * K;
            float g[ROWS_PER_PASS], u[ROWS_PER_PASS];
#pragma unroll
            for (int r = 0; r < ROWS_PER_PASS; ++r) g[r] = u[r] = 0.0f;
            if (vec) {
                for (unsigned int k = lane * V; k < K; k += 32 * V) {
                    float wv[V], uv[V];
                    load16(wg + k, wv);
                    if (swiglu) load16(wu + k, uv);
#pragma unroll
                    for (int r = 0; r < ROWS_PER_PASS; ++r) {
                        if (r < nr) {
                            float xv[V];
                            load16(xr + (size_t)r * K + k, xv);
#pragma unroll
                            for (int j = 0; j < V; ++j) g[r] = fmaf(xv[j], wv[j], g[r]);
                            if (swiglu) {
#pragma unroll
                                for (int j = 0; j < V; ++j) u[r] = fmaf(xv[j], uv[j], u[r]);
                            }
                        }
                    }
                }
            } else {
                for (unsigned int k = lane; k < K; k += 32) {
                    const float wv = to_f(wg[k]), uv = swiglu ? to_f(wu[k]) : 0.0f;
#pragma unroll
                    for (int r = 0; r < ROWS_PER_PASS; ++r) {
                        if (r < nr) {
                            const float xv = to_f(xr[(size_t)r * K + k]);
                            g[r] = fmaf(xv, wv, g[r]);
                            u[r] = fmaf(xv, uv, u[r]);
                        }
                    }
                }
            }
#pragma unroll
            for (int r = 0; r < ROWS_PER_PASS; ++r) {
#pragma unroll
                for (int off = 16; off > 0; off >>= 1) {
                    g[r] += __shfl_xor_sync(0xffffffffu, g[r], off);
                    u[r] += __shfl_xor_sync(0xffffffffu, u[r], off);
                }
            }
#pragma unroll
            for (int r = 0; r < ROWS_PER_PASS; ++r)
                if (lane == r && r < nr) store_f(&y[(size_t)(r0 + r) * N + n], swiglu ? silu(g[r]) * u[r] : g[r]);
        }
    }
}

extern "C" __global__ void __launch_bounds__(256)
    grouped_matmul_rows_f32(const float* x, const unsigned int* offsets, const float* w, float* y,
                            unsigned int rows, unsigned int K, unsigned int N, unsigned int experts,
                            unsigned int swiglu, unsigned int cols_per_warp) {
    grouped_matmul_rows_impl(x, offsets, w, y, rows, K, N, experts, swiglu, cols_per_warp);
}

extern "C" __global__ void __launch_bounds__(256)
    grouped_matmul_rows_f16(const __half* x, const unsigned int* offsets, const __half* w, __half* y,
                            unsigned int rows, unsigned int K, unsigned int N, unsigned int experts,
                            unsigned int swiglu, unsigned int cols_per_warp) {
    grouped_matmul_rows_impl(x, offsets, w, y, rows, K, N, experts, swiglu, cols_per_warp);
}

extern "C" __global__ void __launch_bounds__(256)
    grouped_matmul_rows_bf16(const __nv_bfloat16* x, const unsigned int* offsets, const __nv_bfloat16* w,
                             __nv_bfloat16* y, unsigned int rows, unsigned int K, unsigned int N,
                             unsigned int experts, unsigned int swiglu, unsigned int cols_per_warp) {
    grouped_matmul_rows_impl(x, offsets, w, y, rows, K, N, experts, swiglu, cols_per_warp);
}

// ---------------------------------------------------------------------------
// Many rows per expert, K % 8 == 0: grouped_matmul_tc_*.
//
// A block computes BM rows (128, or 32 when experts get few rows each) against 128 weight rows: with SwiGLU
// the gate rows n0..n0+63 and the up rows N+n0..N+n0+63 (64 output columns), without it the rows n0..n0+127
// (128 output columns). Warps: BM/32 along M (32 rows, 2 fragments each) x WN along the weight rows (128/WN
// rows, FB = 8/WN fragments each; with SwiGLU half of them gate and half the matching up rows). BM 128: 8
// warps, 4 x 2, FB 4; BM 32: 4 warps, 1 x 4, FB 2. Shared memory (dynamic) holds S stages of A [BM][TC_LD]
// and B [128][TC_LD] (TC_LD = 40: 32 k-values plus 8 of padding against bank conflicts; S - 1 copies in
// flight while one stage is multiplied), reused after the loop as per-warp 16x16 float scratch for the
// epilogue. S = 4 where the device lets a block opt in to that much shared memory, else S = 2.

#define TC_BW 128
#define TC_BK 32
#define TC_LD 40

__device__ __forceinline__ void cp16(void* smem, const void* gmem, bool pred) {
#if __CUDA_ARCH__ >= 800
    const unsigned int s = (unsigned int)__cvta_generic_to_shared(smem);
    const int n = pred ? 16 : 0;  // 0: fills the 16 bytes with zeros, reads nothing
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
#else
    *reinterpret_cast<uint4*>(smem) = pred ? *reinterpret_cast<const uint4*>(gmem) : make_uint4(0, 0, 0, 0);
#endif
}
__device__ __forceinline__ void cp_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

template <typename T, int S, int TBM>
__device__ void grouped_matmul_tc_impl(const T* __restrict__ x, const unsigned int* __restrict__ offsets,
                                       const T* __restrict__ w, T* __restrict__ y, unsigned int rows,
                                       unsigned int K, unsigned int N, unsigned int experts, unsigned int swiglu,
                                       unsigned char* smem) {
    using namespace nvcuda;
    constexpr int WM = TBM / 32, NT = TBM == 128 ? 256 : 128, WN = NT / 32 / WM, FB = 8 / WN;
    unsigned int e, r0, r1;
    if (!find_tile(offsets, experts, rows, blockIdx.x, &e, &r0, &r1, TBM)) return;
    const unsigned int out_cols = swiglu ? TC_BW / 2 : TC_BW;
    const unsigned int col0 = blockIdx.y * out_cols;
    const size_t wrows = swiglu ? 2 * (size_t)N : (size_t)N;
    const T* we = w + (size_t)e * wrows * K;
    T* As = reinterpret_cast<T*>(smem);  // [stage][TBM][TC_LD]
    T* Bs = As + S * TBM * TC_LD;         // [stage][TC_BW][TC_LD]
    const unsigned int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const unsigned int wm = warp / WN, wn = warp % WN;

    // Copies of one stage: TBM * 4 chunks of A and 128 * 4 of B, 16 bytes each; chunk i is row i / 4,
    // k-offset (i % 4) * 8. Past the expert's rows, N or K: zeros (cp16 with pred false reads nothing).
    const unsigned int kt_count = (K + TC_BK - 1) / TC_BK;
    auto load_stage = [&](unsigned int stage, unsigned int k0) {
#pragma unroll
        for (unsigned int i = tid; i < TBM * 4; i += NT) {
            const unsigned int r = i >> 2, c = (i & 3) * 8, k = k0 + c;
            const bool ok = r0 + r < r1 && k < K;
            cp16(As + (stage * TBM + r) * TC_LD + c, x + (ok ? (size_t)(r0 + r) * K + k : 0), ok);
        }
#pragma unroll
        for (unsigned int i = tid; i < TC_BW * 4; i += NT) {
            const unsigned int r = i >> 2, c = (i & 3) * 8, k = k0 + c;
            const unsigned int col = col0 + (swiglu ? (r & 63) : r);
            const size_t wr = swiglu && r >= 64 ? (size_t)N + col : col;
            const bool ok = col < N && k < K;
            cp16(Bs + (stage * TC_BW + r) * TC_LD + c, we + (ok ? wr * K + k : 0), ok);
        }
    };

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][FB];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < FB; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    // B rows of this warp's fragments: with SwiGLU, gate rows wn * FB/2 * 16 + j * 16 for j < FB/2, then the
    // up rows 64 rows further; without, wn * FB * 16 + j * 16.
    unsigned int brow[FB];
#pragma unroll
    for (int j = 0; j < FB; ++j)
        brow[j] = swiglu ? (j < FB / 2 ? 0 : 64) + wn * (FB / 2) * 16 + (j % (FB / 2)) * 16 : wn * FB * 16 + j * 16;

    // Prologue: stages 0 .. S-2 in flight (one commit group each, empty past K).
#pragma unroll
    for (int st = 0; st < S - 1; ++st) {
        if (st < (int)kt_count) load_stage(st, st * TC_BK);
        cp_commit();
    }
    for (unsigned int kt = 0; kt < kt_count; ++kt) {
        // Groups committed so far: S - 1 + kt; all but the newest S - 2 done means group kt (this stage) is.
        cp_wait<S - 2>();
        __syncthreads();
        // The slot refilled now was multiplied in iteration kt - 1, which every warp has finished (barrier above).
        if (kt + S - 1 < kt_count) load_stage((kt + S - 1) % S, (kt + S - 1) * TC_BK);
        cp_commit();
        const T* as = As + (kt % S) * TBM * TC_LD;
        const T* bs = Bs + (kt % S) * TC_BW * TC_LD;
#pragma unroll
        for (int kk = 0; kk < TC_BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[FB];
#pragma unroll
            for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], as + (wm * 32 + i * 16) * TC_LD + kk, TC_LD);
#pragma unroll
            for (int j = 0; j < FB; ++j) wmma::load_matrix_sync(fb[j], bs + brow[j] * TC_LD + kk, TC_LD);
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < FB; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
    }
    // No copy is left in flight (the last groups are empty), and every warp is done with the stages before
    // the epilogue reuses their memory.
    cp_wait<0>();
    __syncthreads();

    // Epilogue: with SwiGLU, silu(gate) * up element by element (gate and up fragments of the same shape share
    // their element layout); then each 16x16 result through this warp's scratch to global memory. Fully
    // unrolled, so that every fragment index is a constant and the accumulators stay in registers.
    float* scratch = reinterpret_cast<float*>(smem) + warp * 256;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < FB; ++j) {
            if (swiglu && j >= FB / 2) continue;
            if (swiglu) {
#pragma unroll
                for (int t = 0; t < acc[i][j].num_elements; ++t)
                    acc[i][j].x[t] = silu(acc[i][j].x[t]) * acc[i][(j + FB / 2) % FB].x[t];
            }
            wmma::store_matrix_sync(scratch, acc[i][j], 16, wmma::mem_row_major);
            __syncwarp();
            const unsigned int rr = lane >> 1, cc = (lane & 1) * 8;
            const unsigned int row = r0 + wm * 32 + i * 16 + rr;
            const unsigned int col = col0 + (swiglu ? wn * (FB / 2) * 16 : wn * FB * 16) + j * 16 + cc;
            if (row < r1) {
                T* dst = y + (size_t)row * N + col;
#pragma unroll
                for (int t = 0; t < 8; ++t)
                    if (col + t < N) store_f(dst + t, scratch[rr * 16 + cc + t]);
            }
            __syncwarp();
        }
    }
}

#define TC_KERNEL(name, T, S, TBM)                                                                                \
    extern "C" __global__ void __launch_bounds__(TBM == 128 ? 256 : 128)                                           \
        name(const T* x, const unsigned int* offsets, const T* w, T* y, unsigned int rows, unsigned int K,        \
             unsigned int N, unsigned int experts, unsigned int swiglu) {                                         \
        extern __shared__ __align__(128) unsigned char tc_smem[];                                                 \
        grouped_matmul_tc_impl<T, S, TBM>(x, offsets, w, y, rows, K, N, experts, swiglu, tc_smem);                 \
    }

// tc: 128-row tiles; tc32: 32-row tiles; "2": two stages where the device refuses the opt-in.
TC_KERNEL(grouped_matmul_tc_f16, __half, 4, 128)
TC_KERNEL(grouped_matmul_tc32_f16, __half, 4, 32)
TC_KERNEL(grouped_matmul_tc2_f16, __half, 2, 128)
TC_KERNEL(grouped_matmul_tc2_32_f16, __half, 2, 32)
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
TC_KERNEL(grouped_matmul_tc_bf16, __nv_bfloat16, 4, 128)
TC_KERNEL(grouped_matmul_tc32_bf16, __nv_bfloat16, 4, 32)
TC_KERNEL(grouped_matmul_tc2_bf16, __nv_bfloat16, 2, 128)
TC_KERNEL(grouped_matmul_tc2_32_bf16, __nv_bfloat16, 2, 32)
#endif

// Widening for the f32 router GEMM when activations are stored in half precision.
extern "C" __global__ void cast_f16_f32(const __half* __restrict__ in, float* __restrict__ out, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = __half2float(in[i]);
}

extern "C" __global__ void cast_bf16_f32(const __nv_bfloat16* __restrict__ in, float* __restrict__ out, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = __bfloat162float(in[i]);
}

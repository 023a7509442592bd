// grouped_matmul: one GEMM per expert over ragged row groups.
//
// y[r, n] = sum_k x[r, k] * W[e, n, k] for the rows r of expert e
// (offsets[e] <= r < offsets[e + 1]); W is [E, N, K] as checkpoints store
// Linear weights, or [E, 2N, K] (gate rows, then up rows) with the fused
// SwiGLU epilogue y = silu(gate) * up. Accumulation is f32; the result is
// rounded once when stored. Rows outside offsets[0] .. offsets[E] are not
// touched.
//
// Grid: x = row tiles, an upper bound (ceil(rows / BM) + E) computed on the
// host; each block finds its expert by walking the device-side offsets, so no
// read-back is needed. y = column tiles.
//
// f32: SIMT tiles, 256 threads, 4x4 outputs per thread.
// f16/bf16: tensor cores through WMMA (16x16x16, f32 accumulators), 4 warps
// per 64x64 tile.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#define BM 64
#define BN 64
#define BK 16

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

// This block's expert and row range [r0, r1); false when the block has no work.
__device__ bool find_tile(const unsigned int* __restrict__ offsets, unsigned int experts, unsigned int rows,
                          unsigned int tile, unsigned int* e_out, unsigned int* r0, unsigned int* r1) {
    unsigned int cum = 0;
    for (unsigned int e = 0; e < experts; ++e) {
        const unsigned int a = min(offsets[e], rows), b = min(offsets[e + 1], rows);
        const unsigned int n_tiles = b > a ? (b - a + BM - 1) / BM : 0;
        if (tile < cum + n_tiles) {
            *e_out = e;
            *r0 = a + (tile - cum) * BM;
            *r1 = min(*r0 + BM, b);
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

// Widening for the f32 router GEMM when activations are stored in half precision.
extern "C" __global__ void cast_f16_f32(const __half* __restrict__ in, float* __restrict__ out, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = __half2float(in[i]);
}

extern "C" __global__ void cast_bf16_f32(const __nv_bfloat16* __restrict__ in, float* __restrict__ out, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = __bfloat162float(in[i]);
}

// combine: out[t] (+)= sum_j w[t, j] * expert_out[slot_of[t*k + j]], summed in
// f32 in ascending expert id (then ascending j), without fused multiply-add
// (explicit __fmul_rn/__fadd_rn), so each element is the same sequence of
// roundings as on the CPU backend. One block per token; dynamic shared
// memory: top_k unsigned ints (the order).

#include <cuda_bf16.h>
#include <cuda_fp16.h>

__device__ __forceinline__ float load_f(const float* p) { return *p; }
__device__ __forceinline__ float load_f(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_f(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store_f(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_f(__half* p, float v) { *p = __float2half(v); }
__device__ __forceinline__ void store_f(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

template <typename T>
__device__ void combine_impl(const T* __restrict__ expert_out, const unsigned int* __restrict__ ids,
                             const float* __restrict__ weights, const unsigned int* __restrict__ slot_of,
                             T* __restrict__ out, unsigned int tokens, unsigned int hidden, unsigned int top_k,
                             unsigned int accumulate, unsigned int n_rows) {
    extern __shared__ unsigned int order[];
    const unsigned int t = blockIdx.x;
    if (t >= tokens) return;
    const size_t base = (size_t)t * top_k;
    if (threadIdx.x == 0) {
        // Insertion sort of j by (expert id, j): k is small.
        for (unsigned int j = 0; j < top_k; ++j) {
            unsigned int i = j;
            while (i > 0 && ids[base + order[i - 1]] > ids[base + j]) {
                order[i] = order[i - 1];
                --i;
            }
            order[i] = j;
        }
    }
    __syncthreads();
    for (unsigned int c = threadIdx.x; c < hidden; c += blockDim.x) {
        float acc = 0.0f;
        for (unsigned int r = 0; r < top_k; ++r) {
            const unsigned int j = order[r];
            const unsigned int slot = slot_of[base + j];
            if (slot < n_rows)
                acc = __fadd_rn(acc, __fmul_rn(weights[base + j], load_f(&expert_out[(size_t)slot * hidden + c])));
        }
        T* o = &out[(size_t)t * hidden + c];
        store_f(o, accumulate ? __fadd_rn(load_f(o), acc) : acc);
    }
}

extern "C" __global__ void combine_f32(const float* y, const unsigned int* ids, const float* w, const unsigned int* s,
                                       float* out, unsigned int tokens, unsigned int hidden, unsigned int top_k,
                                       unsigned int accumulate, unsigned int n_rows) {
    combine_impl(y, ids, w, s, out, tokens, hidden, top_k, accumulate, n_rows);
}

extern "C" __global__ void combine_f16(const __half* y, const unsigned int* ids, const float* w,
                                       const unsigned int* s, __half* out, unsigned int tokens, unsigned int hidden,
                                       unsigned int top_k, unsigned int accumulate, unsigned int n_rows) {
    combine_impl(y, ids, w, s, out, tokens, hidden, top_k, accumulate, n_rows);
}

extern "C" __global__ void combine_bf16(const __nv_bfloat16* y, const unsigned int* ids, const float* w,
                                        const unsigned int* s, __nv_bfloat16* out, unsigned int tokens,
                                        unsigned int hidden, unsigned int top_k, unsigned int accumulate,
                                        unsigned int n_rows) {
    combine_impl(y, ids, w, s, out, tokens, hidden, top_k, accumulate, n_rows);
}

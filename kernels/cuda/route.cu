// route: fused router scoring, correction bias, group selection, top-k,
// renormalisation and scaling. One block per token; the contract is that of
// moe_hal_core::spec (NaN logits count as -inf, ties go to the lower id).
//
// Dynamic shared memory: (3 * E + 2 * n_group) floats.
// No limit on E, group size or k beyond shared memory (the host allows E up to 2048).

#define MOE_INF __int_as_float(0x7f800000)

#ifndef MOE_SELECT_CUH
#include "select.cuh"
#endif

// Block-wide float reduction, fixed tree. op 0: max, 1: sum.
__device__ float block_reduce(float x, int op, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int off = 16; off > 0; off >>= 1) {
        float o = __shfl_down_sync(0xffffffffu, x, off);
        x = op == 0 ? fmaxf(x, o) : x + o;
    }
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    if (warp == 0) {
        const int nwarps = (blockDim.x + 31) >> 5;
        x = lane < nwarps ? scratch[lane] : (op == 0 ? -MOE_INF : 0.0f);
        for (int off = 16; off > 0; off >>= 1) {
            float o = __shfl_down_sync(0xffffffffu, x, off);
            x = op == 0 ? fmaxf(x, o) : x + o;
        }
        if (lane == 0) scratch[0] = x;
    }
    __syncthreads();
    float r = scratch[0];
    __syncthreads();
    return r;
}

// scoring: 0 softmax, 1 sigmoid. group_score: 0 max, 1 top-2 sum.
// renorm: 0 none, 1 sum, 2 sum + eps (a zero divisor leaves the weights at 0).
extern "C" __global__ void route(const float* __restrict__ logits, const float* __restrict__ bias,
                                 unsigned int* __restrict__ ids, float* __restrict__ weights,
                                 unsigned int tokens, unsigned int experts, unsigned int top_k,
                                 unsigned int n_group, unsigned int topk_group, unsigned int group_score,
                                 unsigned int scoring, unsigned int has_bias, unsigned int renorm, float eps,
                                 float scale) {
    extern __shared__ float smem[];
    float* s = smem;                    // scores [E]
    float* c = s + experts;             // selection scores [E]
    float* allowed = c + experts;       // 1: may still be chosen [E]
    float* gs = allowed + experts;      // group scores [n_group]
    float* kept = gs + n_group;         // 1: group kept [n_group]
    __shared__ float fscratch[32];
    __shared__ Cand cscratch[32];

    const unsigned int t = blockIdx.x;
    if (t >= tokens) return;
    const float* row = logits + (size_t)t * experts;

    // 1-2: scores with the non-finite rules.
    float local_max = -MOE_INF;
    for (unsigned int e = threadIdx.x; e < experts; e += blockDim.x) {
        float l = row[e];
        if (isnan(l)) l = -MOE_INF;
        s[e] = l;
        local_max = fmaxf(local_max, l);
    }
    __syncthreads();
    if (scoring == 1) {
        for (unsigned int e = threadIdx.x; e < experts; e += blockDim.x) s[e] = 1.0f / (1.0f + expf(-s[e]));
    } else {
        const float m = block_reduce(local_max, 0, fscratch);
        if (m == MOE_INF) {
            float n = 0.0f;
            for (unsigned int e = threadIdx.x; e < experts; e += blockDim.x) n += s[e] == MOE_INF ? 1.0f : 0.0f;
            n = block_reduce(n, 1, fscratch);
            for (unsigned int e = threadIdx.x; e < experts; e += blockDim.x) s[e] = s[e] == MOE_INF ? 1.0f / n : 0.0f;
        } else if (m == -MOE_INF) {
            for (unsigned int e = threadIdx.x; e < experts; e += blockDim.x) s[e] = 0.0f;
        } else {
            float sum = 0.0f;
            for (unsigned int e = threadIdx.x; e < experts; e += blockDim.x) {
                s[e] = expf(s[e] - m);
                sum += s[e];
            }
            sum = block_reduce(sum, 1, fscratch);
            for (unsigned int e = threadIdx.x; e < experts; e += blockDim.x) s[e] = s[e] / sum;
        }
    }
    __syncthreads();
    // 3: selection scores, after the contract's flush of scores below f32's normal range to 0
    // (the same choices whether or not subnormals survive).
    for (unsigned int e = threadIdx.x; e < experts; e += blockDim.x) {
        if (s[e] < 1.17549435e-38f) s[e] = 0.0f;
        c[e] = s[e] + (has_bias ? bias[e] : 0.0f);
        allowed[e] = 1.0f;
    }
    __syncthreads();
    // 4: groups.
    if (n_group > 1) {
        const unsigned int size = experts / n_group;
        for (unsigned int g = threadIdx.x; g < n_group; g += blockDim.x) {
            float m1 = -MOE_INF, m2 = -MOE_INF;
            for (unsigned int i = 0; i < size; ++i) {
                float v = c[g * size + i];
                if (v > m1) {
                    m2 = m1;
                    m1 = v;
                } else if (v > m2) {
                    m2 = v;
                }
            }
            gs[g] = group_score == 1 ? m1 + m2 : m1;
            kept[g] = 0.0f;
        }
        __syncthreads();
        // Kept groups by (score desc, group id asc).
        for (unsigned int r = 0; r < topk_group; ++r) {
            Cand best = {0.0f, -1};
            for (unsigned int g = threadIdx.x; g < n_group; g += blockDim.x) {
                Cand o = {gs[g], (int)g};
                if (kept[g] == 0.0f && better(o, best)) best = o;
            }
            best = block_best(best, cscratch);
            if (threadIdx.x == 0 && best.id >= 0) kept[best.id] = 1.0f;
            __syncthreads();
        }
        for (unsigned int e = threadIdx.x; e < experts; e += blockDim.x) allowed[e] = kept[e / size];
        __syncthreads();
    }
    // 5: top-k by (c desc, id asc) among the allowed experts.
    for (unsigned int r = 0; r < top_k; ++r) {
        Cand best = {0.0f, -1};
        for (unsigned int e = threadIdx.x; e < experts; e += blockDim.x) {
            if (allowed[e] != 0.0f) {
                Cand o = {c[e], (int)e};
                if (better(o, best)) best = o;
            }
        }
        best = block_best(best, cscratch);
        if (threadIdx.x == 0) {
            ids[(size_t)t * top_k + r] = (unsigned int)best.id;
            allowed[best.id] = 0.0f;
        }
        __syncthreads();
    }
    // 6: unbiased weights, renormalised in selection order, then scaled.
    if (threadIdx.x == 0) {
        float* w = weights + (size_t)t * top_k;
        const unsigned int* id = ids + (size_t)t * top_k;
        float sum = 0.0f;
        for (unsigned int r = 0; r < top_k; ++r) {
            w[r] = s[id[r]];
            sum += w[r];
        }
        float div = 1.0f;
        if (renorm == 1 && sum > 0.0f) div = sum;
        if (renorm == 2 && sum + eps > 0.0f) div = sum + eps;
        for (unsigned int r = 0; r < top_k; ++r) w[r] = w[r] / div * scale;
    }
}

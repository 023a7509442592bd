// topk: the k largest values of each row, descending; ties go to the lower
// index; NaN ranks below every number (and NaNs among themselves by index).
// One block per row. Dynamic shared memory: cols bytes (taken flags).

#ifndef MOE_SELECT_CUH
#include "select.cuh"
#endif

extern "C" __global__ void topk(const float* __restrict__ values, unsigned int* __restrict__ ids,
                                float* __restrict__ out, unsigned int rows, unsigned int cols, unsigned int k) {
    extern __shared__ unsigned char taken[];
    __shared__ Cand scratch[32];
    const unsigned int r = blockIdx.x;
    if (r >= rows) return;
    const float* v = values + (size_t)r * cols;
    for (unsigned int i = threadIdx.x; i < cols; i += blockDim.x) taken[i] = 0;
    __syncthreads();
    for (unsigned int j = 0; j < k; ++j) {
        Cand best = {0.0f, -1};
        for (unsigned int i = threadIdx.x; i < cols; i += blockDim.x) {
            Cand o = {v[i], (int)i};
            if (taken[i] == 0 && better(o, best)) best = o;
        }
        best = block_best(best, scratch);
        if (threadIdx.x == 0) {
            ids[(size_t)r * k + j] = (unsigned int)best.id;
            out[(size_t)r * k + j] = v[best.id];
            taken[best.id] = 1;
        }
        __syncthreads();
    }
}

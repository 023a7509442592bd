// topk: the k largest values of each row, descending; ties go to the lower
// index; NaN ranks below every number (and NaNs among themselves by index).
// One block per row. Dynamic shared memory: cols bytes (taken flags).

struct Cand {
    float v;
    int id;  // -1: no candidate
};

__device__ __forceinline__ bool better(Cand a, Cand b) {
    if (b.id < 0) return a.id >= 0;
    if (a.id < 0) return false;
    const bool an = isnan(a.v), bn = isnan(b.v);
    if (an != bn) return bn;
    if (an) return a.id < b.id;
    return a.v > b.v || (a.v == b.v && a.id < b.id);
}

__device__ Cand block_best(Cand c, Cand* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int off = 16; off > 0; off >>= 1) {
        Cand o;
        o.v = __shfl_down_sync(0xffffffffu, c.v, off);
        o.id = __shfl_down_sync(0xffffffffu, c.id, off);
        if (better(o, c)) c = o;
    }
    if (lane == 0) scratch[warp] = c;
    __syncthreads();
    if (warp == 0) {
        const int nwarps = (blockDim.x + 31) >> 5;
        c = lane < nwarps ? scratch[lane] : Cand{0.0f, -1};
        for (int off = 16; off > 0; off >>= 1) {
            Cand o;
            o.v = __shfl_down_sync(0xffffffffu, c.v, off);
            o.id = __shfl_down_sync(0xffffffffu, c.id, off);
            if (better(o, c)) c = o;
        }
        if (lane == 0) scratch[0] = c;
    }
    __syncthreads();
    Cand r = scratch[0];
    __syncthreads();
    return r;
}

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

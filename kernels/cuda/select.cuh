// Shared by route.cu and topk.cu: a candidate (value, id) and the block-wide
// best of them. Order: larger value first, NaN below every number (route maps
// NaN logits to -inf before, so it never sees one), ties to the lower id, a
// missing candidate (id -1) last. The reduction tree is fixed: deterministic.
// The CUDA backend prepends this file to both sources (compile.rs); compiled on
// their own (scripts/check_cuda_kernels.py) they include it.

#ifndef MOE_SELECT_CUH
#define MOE_SELECT_CUH

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

// Block-wide best candidate; every thread gets it.
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

#endif  // MOE_SELECT_CUH

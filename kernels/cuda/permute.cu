// permute: stable, atomic-free counting sort of the T*k (token, slot) pairs by
// expert, then a gather of the hidden rows. Deterministic by construction.
//
// The flat indices are cut into chunks of CHUNK; per chunk and expert we count
// (permute_chunk_counts), prefix-sum over chunks then experts
// (permute_scan), and each expert's thread walks its chunk in order to place
// the rows (permute_scatter): token order within each expert is kept. Grid
// sizes come from T*k and E, known on the host: no read-back between kernels.
// Ids >= E are dropped (their slot_of is 0xFFFFFFFF) since checking them
// would need a read-back.

#define CHUNK 1024

extern "C" __global__ void permute_chunk_counts(const unsigned int* __restrict__ ids, unsigned int n,
                                                unsigned int experts, unsigned int* __restrict__ chunk_counts) {
    __shared__ unsigned int s_ids[CHUNK];
    const unsigned int base = blockIdx.x * CHUNK;
    const unsigned int len = min(CHUNK, n - base);
    for (unsigned int i = threadIdx.x; i < len; i += blockDim.x) s_ids[i] = ids[base + i];
    __syncthreads();
    for (unsigned int e = threadIdx.x; e < experts; e += blockDim.x) {
        unsigned int count = 0;
        for (unsigned int i = 0; i < len; ++i) count += s_ids[i] == e;
        chunk_counts[(size_t)blockIdx.x * experts + e] = count;
    }
}

// One block. chunk_base[c, e] = offsets[e] + rows of expert e in chunks before c.
extern "C" __global__ void permute_scan(const unsigned int* __restrict__ chunk_counts, unsigned int n_chunks,
                                        unsigned int experts, unsigned int* __restrict__ counts,
                                        unsigned int* __restrict__ offsets, unsigned int* __restrict__ chunk_base) {
    for (unsigned int e = threadIdx.x; e < experts; e += blockDim.x) {
        unsigned int run = 0;
        for (unsigned int c = 0; c < n_chunks; ++c) {
            chunk_base[(size_t)c * experts + e] = run;
            run += chunk_counts[(size_t)c * experts + e];
        }
        counts[e] = run;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned int run = 0;
        for (unsigned int e = 0; e < experts; ++e) {
            offsets[e] = run;
            run += counts[e];
        }
        offsets[experts] = run;
    }
    __syncthreads();
    for (unsigned int e = threadIdx.x; e < experts; e += blockDim.x) {
        const unsigned int off = offsets[e];
        for (unsigned int c = 0; c < n_chunks; ++c) chunk_base[(size_t)c * experts + e] += off;
    }
}

extern "C" __global__ void permute_scatter(const unsigned int* __restrict__ ids, unsigned int n, unsigned int experts,
                                           const unsigned int* __restrict__ chunk_base,
                                           unsigned int* __restrict__ slot_of, unsigned int* __restrict__ source_of) {
    __shared__ unsigned int s_ids[CHUNK];
    const unsigned int base = blockIdx.x * CHUNK;
    const unsigned int len = min(CHUNK, n - base);
    for (unsigned int i = threadIdx.x; i < len; i += blockDim.x) {
        s_ids[i] = ids[base + i];
        if (s_ids[i] >= experts) slot_of[base + i] = 0xFFFFFFFFu;
    }
    __syncthreads();
    for (unsigned int e = threadIdx.x; e < experts; e += blockDim.x) {
        unsigned int slot = chunk_base[(size_t)blockIdx.x * experts + e];
        for (unsigned int i = 0; i < len; ++i) {
            if (s_ids[i] == e) {
                slot_of[base + i] = slot;
                source_of[slot] = base + i;
                ++slot;
            }
        }
    }
}

// rows[slot, :] = hidden[source_of[slot] / top_k, :] for slots < placed (= offsets[E]).
template <typename T>
__device__ void gather(const T* __restrict__ hidden, const unsigned int* __restrict__ source_of,
                       const unsigned int* __restrict__ offsets, unsigned int experts, unsigned int n,
                       unsigned int hidden_size, unsigned int top_k, T* __restrict__ rows) {
    const unsigned int placed = min(offsets[experts], n);
    const size_t total = (size_t)placed * hidden_size;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t slot = i / hidden_size, col = i % hidden_size;
        const unsigned int f = source_of[slot];
        rows[i] = hidden[(size_t)(f / top_k) * hidden_size + col];
    }
}

extern "C" __global__ void permute_gather_b32(const unsigned int* hidden, const unsigned int* source_of,
                                              const unsigned int* offsets, unsigned int experts, unsigned int n,
                                              unsigned int hidden_size, unsigned int top_k, unsigned int* rows) {
    gather(hidden, source_of, offsets, experts, n, hidden_size, top_k, rows);
}

extern "C" __global__ void permute_gather_b16(const unsigned short* hidden, const unsigned int* source_of,
                                              const unsigned int* offsets, unsigned int experts, unsigned int n,
                                              unsigned int hidden_size, unsigned int top_k, unsigned short* rows) {
    gather(hidden, source_of, offsets, experts, n, hidden_size, top_k, rows);
}

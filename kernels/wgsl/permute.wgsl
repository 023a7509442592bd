// Stable dispatch by counting sort, entirely on the device (no read-back).
// The flat indices f = t * k + j are cut into C chunks of S (`chunk`), so
// that no invocation walks more than S ids (C * E invocations share the
// work; Mesa's llvmpipe also stops any invocation's loops after 65535
// iterations):
//
// 1. `count`:       one invocation per (chunk c, expert e) counts ids == e
//                   in chunk c                       -> chunk_counts [C, E]
// 2. `scan_chunks`: one invocation per expert: its chunk counts become
//                   exclusive offsets within the expert, its total the
//                   expert's count                   -> chunk_counts, counts [E]
// 3. `scan`:        one invocation, exclusive prefix sum over experts
//                                                    -> offsets [E + 1]
// 4. `assign`:      one invocation per (chunk c, expert e) walks chunk c in
//                   ascending f from the expert's offset plus the chunk's, so
//                   each expert's slots keep token order (stable,
//                   deterministic)                   -> slot_of, source_of
//                   Invocations (c, E) mark ids >= E with slot 0xffffffff
//                   (they are not counted, and combine skips them).
// 5. `gather`:      one invocation per u32 word of the permuted rows
//                                                    -> rows [T*k, H]
//
// Elements are moved as bits, so rows are exact copies. With a 16-bit dtype
// (bf16, f16: two elements per word) each invocation fills both halves of
// its word, so no two invocations write the same word; the half past the
// last row is kept as it was.

struct Params {
    // tokens * top_k
    n: u32,
    experts: u32,
    hidden: u32,
    top_k: u32,
    // Flat indices per chunk (S), and chunks (C = ceil(n / S)).
    chunk: u32,
    chunks: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> hidden: array<u32>;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> counts: array<u32>;
@group(0) @binding(4) var<storage, read_write> offsets: array<u32>;
@group(0) @binding(5) var<storage, read_write> slot_of: array<u32>;
@group(0) @binding(6) var<storage, read_write> source_of: array<u32>;
@group(0) @binding(7) var<storage, read_write> rows: array<u32>;
@group(0) @binding(8) var<storage, read_write> chunk_counts: array<u32>;

// 0: f32 (one element per word); 1, 2: bf16, f16 (two elements per word).
override DTYPE: u32 = 0u;

fn linear(wg: vec3<u32>, nwg: vec3<u32>, li: u32) -> u32 {
    return (wg.x + wg.y * nwg.x) * 64u + li;
}

// The flat indices of chunk c: [start, end).
fn chunk_start(c: u32) -> u32 {
    return c * p.chunk;
}

fn chunk_end(c: u32) -> u32 {
    return min(c * p.chunk + p.chunk, p.n);
}

@compute @workgroup_size(64)
fn count(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) li: u32) {
    let i = linear(wg, nwg, li);
    if (i >= p.chunks * p.experts) {
        return;
    }
    let c = i / p.experts;
    let e = i - c * p.experts;
    var n = 0u;
    for (var f = chunk_start(c); f < chunk_end(c); f++) {
        if (ids[f] == e) {
            n++;
        }
    }
    chunk_counts[i] = n;
}

@compute @workgroup_size(64)
fn scan_chunks(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32) {
    let e = linear(wg, nwg, li);
    if (e >= p.experts) {
        return;
    }
    var acc = 0u;
    for (var c = 0u; c < p.chunks; c++) {
        let v = chunk_counts[c * p.experts + e];
        chunk_counts[c * p.experts + e] = acc;
        acc += v;
    }
    counts[e] = acc;
}

@compute @workgroup_size(1)
fn scan() {
    var acc = 0u;
    offsets[0] = 0u;
    for (var e = 0u; e < p.experts; e++) {
        acc += counts[e];
        offsets[e + 1u] = acc;
    }
}

@compute @workgroup_size(64)
fn assign(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) li: u32) {
    let i = linear(wg, nwg, li);
    let per = p.experts + 1u;
    if (i >= p.chunks * per) {
        return;
    }
    let c = i / per;
    let e = i - c * per;
    if (e == p.experts) {
        for (var f = chunk_start(c); f < chunk_end(c); f++) {
            if (ids[f] >= p.experts) {
                slot_of[f] = 0xffffffffu;
            }
        }
        return;
    }
    var cursor = offsets[e] + chunk_counts[c * p.experts + e];
    for (var f = chunk_start(c); f < chunk_end(c); f++) {
        if (ids[f] == e) {
            slot_of[f] = cursor;
            source_of[cursor] = f;
            cursor++;
        }
    }
}

// Bits of the hidden element feeding permuted element i (16 or 32 bits).
fn source_bits(i: u32) -> u32 {
    let s = i / p.hidden;
    let c = i - s * p.hidden;
    let j = (source_of[s] / p.top_k) * p.hidden + c;
    if (DTYPE == 0u) {
        return hidden[j];
    }
    return (hidden[j >> 1u] >> ((j & 1u) * 16u)) & 0xffffu;
}

@compute @workgroup_size(64)
fn gather(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) li: u32) {
    let w = linear(wg, nwg, li);
    let limit = offsets[p.experts] * p.hidden;
    if (DTYPE == 0u) {
        if (w < limit) {
            rows[w] = source_bits(w);
        }
        return;
    }
    let i = 2u * w;
    if (i >= limit) {
        return;
    }
    var hi = rows[w] >> 16u;
    if (i + 1u < limit) {
        hi = source_bits(i + 1u);
    }
    rows[w] = source_bits(i) | (hi << 16u);
}

// Weighted un-permute: output[t, c] (+)= sum_j weights[t*k + j] * expert_out[slot_of[t*k + j], c].
//
// One invocation per output word (one f32 element, or two bf16/f16 elements
// so that no two invocations write the same word). Terms are summed in f32 in ascending
// expert id, then ascending j (a selection over the k pairs (id, j), so any k
// works), then the previous output is added when accumulating. A slot
// outside expert_out (an id that permute could not place) contributes 0.
// The result is rounded once to the storage dtype.

struct Params {
    tokens: u32,
    hidden: u32,
    top_k: u32,
    accumulate: u32,
    // Rows of expert_out.
    y_rows: u32,
    p0: u32,
    p1: u32,
    p2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> y: array<u32>;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read> weights: array<f32>;
@group(0) @binding(4) var<storage, read> slot_of: array<u32>;
@group(0) @binding(5) var<storage, read_write> out: array<u32>;

// DTYPE, half_to_f32, f32_to_half and half_bits come from dtype.wgsl (prepended).

fn ld_y(i: u32) -> f32 {
    if (DTYPE == 0u) {
        return bitcast<f32>(y[i]);
    }
    return half_to_f32(half_bits(y[i >> 1u], i));
}

// The combined value of output element i = t * H + c, before the previous output.
fn combined(i: u32) -> f32 {
    let t = i / p.hidden;
    let c = i - t * p.hidden;
    let k = p.top_k;
    let f0 = t * k;
    var acc = 0.0;
    var has_prev = false;
    var prev_id = 0u;
    var prev_j = 0u;
    for (var r = 0u; r < k; r++) {
        var best = 0xffffffffu;
        var best_id = 0u;
        for (var j = 0u; j < k; j++) {
            let id = ids[f0 + j];
            if (has_prev && !(id > prev_id || (id == prev_id && j > prev_j))) {
                continue;
            }
            if (best == 0xffffffffu || id < best_id) {
                best = j;
                best_id = id;
            }
        }
        let slot = slot_of[f0 + best];
        if (slot < p.y_rows) {
            acc += weights[f0 + best] * ld_y(slot * p.hidden + c);
        }
        has_prev = true;
        prev_id = best_id;
        prev_j = best;
    }
    return acc;
}

// Bits of output element i after combining (16 or 32 bits); `old` holds its current bits.
fn result_bits(i: u32, old: u32) -> u32 {
    var v = combined(i);
    if (DTYPE == 0u) {
        if (p.accumulate != 0u) {
            v = bitcast<f32>(old) + v;
        }
        return bitcast<u32>(v);
    }
    if (p.accumulate != 0u) {
        v = half_to_f32(old) + v;
    }
    return f32_to_half(v);
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let w = (wg.x + wg.y * nwg.x) * 64u + li;
    let n = p.tokens * p.hidden;
    if (DTYPE == 0u) {
        if (w < n) {
            out[w] = result_bits(w, out[w]);
        }
        return;
    }
    let i = 2u * w;
    if (i >= n) {
        return;
    }
    let old = out[w];
    let lo = result_bits(i, old & 0xffffu);
    var hi = old >> 16u;
    if (i + 1u < n) {
        hi = result_bits(i + 1u, hi);
    }
    out[w] = lo | (hi << 16u);
}

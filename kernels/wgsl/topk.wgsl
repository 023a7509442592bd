// Top-k of each row of values [rows, cols] (f32): ids [rows, k] (u32) and
// out [rows, k] (f32 copies, bit for bit), descending, ties to the lower
// index, NaN ranked below every number (NaNs among themselves by index).
//
// One invocation per row; iterative selection (each pick is the best element
// ranked after the previous pick), so any cols and k work. Floats are
// compared through an integer key built from their bits: exact, and immune
// to fast-math assumptions about NaN.

struct Params {
    rows: u32,
    cols: u32,
    k: u32,
    p0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> values: array<u32>;
@group(0) @binding(2) var<storage, read_write> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<u32>;

// key_bits and better: select.wgsl.

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let r = (wg.x + wg.y * nwg.x) * 64u + li;
    if (r >= p.rows) {
        return;
    }
    let row = r * p.cols;
    var prev = 0xffffffffu;
    var prev_key = 0u;
    for (var j = 0u; j < p.k; j++) {
        var best = 0xffffffffu;
        var best_key = 0u;
        for (var i = 0u; i < p.cols; i++) {
            let ki = key_bits(values[row + i]);
            if (prev != 0xffffffffu && !better(prev_key, prev, ki, i)) {
                continue;
            }
            if (best == 0xffffffffu || better(ki, i, best_key, best)) {
                best = i;
                best_key = ki;
            }
        }
        if (best == 0xffffffffu) {
            best = 0u;
        }
        ids[r * p.k + j] = best;
        out[r * p.k + j] = values[row + best];
        prev = best;
        prev_key = best_key;
    }
}

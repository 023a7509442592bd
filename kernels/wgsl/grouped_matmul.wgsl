// Grouped matmul over ragged row groups: for expert e, rows
// offsets[e] .. offsets[e+1] of input [rows, K] times W_e^T, W [E, N, K]
// (or [E, 2N, K] with fused SwiGLU: out = silu(gate) * up, gate rows first),
// into output [rows, N]. Rows beyond offsets[E] are never written.
//
// Tiled: a 16x16 workgroup computes a 32x32 output tile (2x2 outputs per
// invocation, gate and up for SwiGLU), staging 32x16 tiles of the input and
// the weights in workgroup memory. The dispatch is sized from the upper bound
// (ceil(rows / 32) + E row tiles, since each expert adds at most one partial
// tile); each workgroup finds its expert and row range by walking offsets on
// the device, so no read-back is needed between kernels. Surplus workgroups
// exit at once. Accumulation is f32, in ascending k.
//
// Storage is f32, bf16 or f16 (input, weight and output share it). A 16-bit
// output word holds two elements that different workgroups may own (odd N,
// or a row shared by two experts' tiles), so 16-bit stores replace their half
// with an atomic compare-exchange loop.
//
// Weights larger than one binding are bound a group of experts at a time
// (one dispatch per group, experts e0 .. e1).
//
// Offsets are clamped to [0, rows] (a malformed offsets buffer cannot make a
// write leave the output buffer).

struct Params {
    rows: u32,
    k: u32,
    n: u32,
    // Experts e0 .. e1 of this dispatch; `weight` is bound from expert e0 on.
    e0: u32,
    swiglu: u32,
    e1: u32,
    p1: u32,
    p2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> input: array<u32>;
@group(0) @binding(2) var<storage, read> offsets: array<u32>;
@group(0) @binding(3) var<storage, read> weight: array<u32>;
@group(0) @binding(4) var<storage, read_write> output: array<atomic<u32>>;

// DTYPE, half_to_f32, f32_to_half and half_bits come from dtype.wgsl (prepended).

fn ld_input(i: u32) -> f32 {
    if (DTYPE == 0u) {
        return bitcast<f32>(input[i]);
    }
    return half_to_f32(half_bits(input[i >> 1u], i));
}

fn ld_weight(i: u32) -> f32 {
    if (DTYPE == 0u) {
        return bitcast<f32>(weight[i]);
    }
    return half_to_f32(half_bits(weight[i >> 1u], i));
}

fn st_output(i: u32, v: f32) {
    if (DTYPE == 0u) {
        atomicStore(&output[i], bitcast<u32>(v));
        return;
    }
    let shift = (i & 1u) * 16u;
    let mask = 0xffffu << shift;
    let bits = f32_to_half(v) << shift;
    var old = atomicLoad(&output[i >> 1u]);
    loop {
        let r = atomicCompareExchangeWeak(&output[i >> 1u], old, (old & ~mask) | bits);
        if (r.exchanged) {
            break;
        }
        old = r.old_value;
    }
}

const TM: u32 = 32u;
const TN: u32 = 32u;
const TK: u32 = 16u;

var<workgroup> xs: array<array<f32, 16>, 32>;
var<workgroup> gs: array<array<f32, 16>, 32>;
var<workgroup> us: array<array<f32, 16>, 32>;
// Expert (0xffffffff: none), first row, end row of this workgroup's tile.
var<workgroup> wg_e: u32;
var<workgroup> wg_m0: u32;
var<workgroup> wg_m1: u32;

fn clamped(e: u32) -> u32 {
    return min(offsets[e], p.rows);
}

@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    if (li == 0u) {
        let tile = wg.y + wg.z * nwg.y;
        var acc = 0u;
        wg_e = 0xffffffffu;
        for (var e = p.e0; e < p.e1; e++) {
            let lo = clamped(e);
            let hi = max(clamped(e + 1u), lo);
            let tiles = (hi - lo + TM - 1u) / TM;
            if (tile < acc + tiles) {
                wg_e = e;
                wg_m0 = lo + (tile - acc) * TM;
                wg_m1 = min(wg_m0 + TM, hi);
                break;
            }
            acc += tiles;
        }
    }
    let e = workgroupUniformLoad(&wg_e);
    if (e == 0xffffffffu) {
        return;
    }
    let m0 = workgroupUniformLoad(&wg_m0);
    let m1 = workgroupUniformLoad(&wg_m1);
    let n0 = wg.x * TN;
    let kk_n = p.k;
    let n = p.n;
    let swiglu = p.swiglu != 0u;
    var wrows = n;
    if (swiglu) {
        wrows = 2u * n;
    }
    let wbase = (e - p.e0) * wrows * kk_n;
    let tx = lid.x;
    let ty = lid.y;
    var g00 = 0.0;
    var g01 = 0.0;
    var g10 = 0.0;
    var g11 = 0.0;
    var u00 = 0.0;
    var u01 = 0.0;
    var u10 = 0.0;
    var u11 = 0.0;
    for (var k0 = 0u; k0 < kk_n; k0 += TK) {
        for (var l = 0u; l < 2u; l++) {
            let idx = li + l * 256u;
            let r = idx / TK;
            let c = idx % TK;
            let kk = k0 + c;
            let row = m0 + r;
            var xv = 0.0;
            if (row < m1 && kk < kk_n) {
                xv = ld_input(row * kk_n + kk);
            }
            xs[r][c] = xv;
            let col = n0 + r;
            var gv = 0.0;
            var uv = 0.0;
            if (col < n && kk < kk_n) {
                gv = ld_weight(wbase + col * kk_n + kk);
                if (swiglu) {
                    uv = ld_weight(wbase + (n + col) * kk_n + kk);
                }
            }
            gs[r][c] = gv;
            us[r][c] = uv;
        }
        workgroupBarrier();
        for (var c = 0u; c < TK; c++) {
            let x0 = xs[ty][c];
            let x1 = xs[ty + 16u][c];
            let w0 = gs[tx][c];
            let w1 = gs[tx + 16u][c];
            g00 += x0 * w0;
            g01 += x0 * w1;
            g10 += x1 * w0;
            g11 += x1 * w1;
            if (swiglu) {
                let v0 = us[tx][c];
                let v1 = us[tx + 16u][c];
                u00 += x0 * v0;
                u01 += x0 * v1;
                u10 += x1 * v0;
                u11 += x1 * v1;
            }
        }
        workgroupBarrier();
    }
    store(m0 + ty, m1, n0 + tx, g00, u00, swiglu);
    store(m0 + ty, m1, n0 + tx + 16u, g01, u01, swiglu);
    store(m0 + ty + 16u, m1, n0 + tx, g10, u10, swiglu);
    store(m0 + ty + 16u, m1, n0 + tx + 16u, g11, u11, swiglu);
}

fn store(row: u32, m1: u32, col: u32, g: f32, u: f32, swiglu: bool) {
    if (row >= m1 || col >= p.n) {
        return;
    }
    var v = g;
    if (swiglu) {
        v = g / (1.0 + exp(-g)) * u;
    }
    st_output(row * p.n + col, v);
}

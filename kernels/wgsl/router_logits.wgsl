// Router GEMM: logits [T, E] (f32) = hidden [T, H] (f32, bf16 or f16) . weight [E, H]^T (f32),
// accumulated in f32 whatever the hidden dtype.
//
// The tiling of grouped_matmul.wgsl with a single group: a 16x16 workgroup
// computes a 32x32 tile of logits (2x2 per invocation) from 32x16 tiles of
// hidden and weight staged in workgroup memory; f32 accumulation in
// ascending h. Row tiles run along y (and z when y is full).

struct Params {
    tokens: u32,
    hidden: u32,
    experts: u32,
    p0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> logits: array<f32>;

// DTYPE, half_to_f32, f32_to_half and half_bits come from dtype.wgsl (prepended).

fn ld_x(i: u32) -> f32 {
    if (DTYPE == 0u) {
        return bitcast<f32>(x[i]);
    }
    return half_to_f32(half_bits(x[i >> 1u], i));
}

const TM: u32 = 32u;
const TN: u32 = 32u;
const TK: u32 = 16u;

var<workgroup> xs: array<array<f32, 16>, 32>;
var<workgroup> ws: array<array<f32, 16>, 32>;

@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let m0 = (wg.y + wg.z * nwg.y) * TM;
    let n0 = wg.x * TN;
    let h = p.hidden;
    let tx = lid.x;
    let ty = lid.y;
    var a00 = 0.0;
    var a01 = 0.0;
    var a10 = 0.0;
    var a11 = 0.0;
    for (var k0 = 0u; k0 < h; k0 += TK) {
        for (var l = 0u; l < 2u; l++) {
            let idx = li + l * 256u;
            let r = idx / TK;
            let c = idx % TK;
            let kk = k0 + c;
            var xv = 0.0;
            if (m0 + r < p.tokens && kk < h) {
                xv = ld_x((m0 + r) * h + kk);
            }
            xs[r][c] = xv;
            var wv = 0.0;
            if (n0 + r < p.experts && kk < h) {
                wv = w[(n0 + r) * h + kk];
            }
            ws[r][c] = wv;
        }
        workgroupBarrier();
        for (var c = 0u; c < TK; c++) {
            let x0 = xs[ty][c];
            let x1 = xs[ty + 16u][c];
            let w0 = ws[tx][c];
            let w1 = ws[tx + 16u][c];
            a00 += x0 * w0;
            a01 += x0 * w1;
            a10 += x1 * w0;
            a11 += x1 * w1;
        }
        workgroupBarrier();
    }
    store(m0 + ty, n0 + tx, a00);
    store(m0 + ty, n0 + tx + 16u, a01);
    store(m0 + ty + 16u, n0 + tx, a10);
    store(m0 + ty + 16u, n0 + tx + 16u, a11);
}

fn store(row: u32, col: u32, v: f32) {
    if (row < p.tokens && col < p.experts) {
        logits[row * p.experts + col] = v;
    }
}

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

// Storage dtype of the float buffers, set per pipeline: 0 f32, 1 bf16, 2 f16.
// 16-bit values are stored two per u32 word (element i in bits 16 * (i % 2)),
// unpacked to f32 on load and rounded once (to nearest even) on store.
override DTYPE: u32 = 0u;

fn half_to_f32(h: u32) -> f32 {
    if (DTYPE == 1u) {
        return bitcast<f32>(h << 16u);
    }
    return unpack2x16float(h).x;
}

// f32 -> bf16 / f16 bits, round to nearest even (as the `half` crate does).
fn f32_to_half(v: f32) -> u32 {
    let x = bitcast<u32>(v);
    let a = x & 0x7fffffffu;
    if (DTYPE == 1u) {
        if (a > 0x7f800000u) {
            return (x >> 16u) | 0x40u;
        }
        return (x + 0x7fffu + ((x >> 16u) & 1u)) >> 16u;
    }
    let sign = (x >> 16u) & 0x8000u;
    if (a > 0x7f800000u) {
        return sign | 0x7e00u;
    }
    if (a >= 0x477ff000u) {
        return sign | 0x7c00u;
    }
    if (a >= 0x38800000u) {
        return sign | ((a + 0x0fffu + ((a >> 13u) & 1u) - 0x38000000u) >> 13u);
    }
    if (a < 0x33000000u) {
        return sign;
    }
    // f16 subnormal: m * 2^(e - 126) units of 2^-24.
    let e = a >> 23u;
    let m = (a & 0x7fffffu) | 0x800000u;
    let shift = 126u - e;
    let tie = 1u << (shift - 1u);
    let rem = m & ((1u << shift) - 1u);
    var q = m >> shift;
    if (rem > tie || (rem == tie && (q & 1u) == 1u)) {
        q += 1u;
    }
    return sign | q;
}

// The 16 bits of element i of a packed buffer word.
fn half_bits(word: u32, i: u32) -> u32 {
    return (word >> ((i & 1u) * 16u)) & 0xffffu;
}

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

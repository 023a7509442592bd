// Shared by the kernels with dtype variants (grouped_matmul, router_logits,
// combine): prepended to each of them when the pipelines are built (WGSL has
// no include), so the conversions live in one place.
//
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

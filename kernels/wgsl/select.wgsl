// Selection order shared by route.wgsl and topk.wgsl (prepended to both when
// their pipelines are built): floats compared through integer keys of their
// bits, ties to the lower index.

// Order key of the float with bits `b0`: NaN lowest (0), -0 == +0.
fn key_bits(b0: u32) -> u32 {
    var b = b0;
    if ((b & 0x7fffffffu) > 0x7f800000u) {
        return 0u;
    }
    if (b == 0x80000000u) {
        b = 0u;
    }
    if ((b & 0x80000000u) != 0u) {
        return ~b;
    }
    return b | 0x80000000u;
}

// a ranks before b: larger key first, ties to the lower index.
fn better(ka: u32, a: u32, kb: u32, b: u32) -> bool {
    return ka > kb || (ka == kb && a < b);
}


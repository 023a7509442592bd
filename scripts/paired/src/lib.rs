//! Shared pieces of the paired programs: random data, and the median of paired ratios.

use half::bf16;
use moe_hal_core::HostVec;

/// `n` values uniform in `[-s, s]` from a xorshift stream.
pub fn random(seed: &mut u64, n: usize, s: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            ((*seed % 20001) as f32 / 10000.0 - 1.0) * s
        })
        .collect()
}

/// `v` as bf16 or f32.
pub fn host(v: Vec<f32>, bf: bool) -> HostVec {
    if bf {
        HostVec::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect())
    } else {
        HostVec::F32(v)
    }
}

/// The two series' medians and the median and quartiles of their paired ratios (`b / a`).
pub fn summary(a: &[f64], b: &[f64]) -> String {
    let mut r: Vec<f64> = a.iter().zip(b).map(|(x, y)| y / x).collect();
    let (mut a, mut b) = (a.to_vec(), b.to_vec());
    for v in [&mut r, &mut a, &mut b] {
        v.sort_by(f64::total_cmp);
    }
    let q = |v: &[f64], f: f64| v[((v.len() - 1) as f64 * f).round() as usize];
    format!(
        "base {:.3} ms, current {:.3} ms, paired current/base {:.3} (quartiles {:.3}-{:.3}, {} pairs)",
        q(&a, 0.5),
        q(&b, 0.5),
        q(&r, 0.5),
        q(&r, 0.25),
        q(&r, 0.75),
        r.len()
    )
}

//! Shared pieces of the paired programs: random data, and the alternated timing with the median of
//! the paired ratios.

use half::bf16;
use moe_hal_core::HostVec;
use std::time::Instant;

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

/// Rows per expert of `tokens` tokens, each routed to `k` distinct experts drawn by `rnd`: the
/// grouped matmuls' heights in a layer at that many tokens.
pub fn routed(tokens: usize, experts: usize, k: usize, mut rnd: impl FnMut() -> u64) -> Vec<usize> {
    let mut c = vec![0; experts];
    let mut chosen = Vec::with_capacity(k);
    for _ in 0..tokens {
        chosen.clear();
        while chosen.len() < k.min(experts) {
            let e = (rnd() % experts as u64) as usize;
            if !chosen.contains(&e) {
                chosen.push(e);
            }
        }
        chosen.iter().for_each(|&e| c[e] += 1);
    }
    c
}

/// `v` as bf16 or f32.
pub fn host(v: Vec<f32>, bf: bool) -> HostVec {
    if bf {
        HostVec::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect())
    } else {
        HostVec::F32(v)
    }
}

/// Runs `base(i)` and `current(i)` for `i` in `0..warmup + pairs`, which one goes first
/// alternating from pair to pair, and summarises the timed pairs after the first `warmup`.
pub fn paired(warmup: usize, pairs: usize, mut base: impl FnMut(usize), mut current: impl FnMut(usize)) -> String {
    let (mut ta, mut tb) = (vec![], vec![]);
    for i in 0..warmup + pairs {
        for first_base in [i % 2 == 0, i % 2 == 1] {
            let t0 = Instant::now();
            if first_base {
                base(i)
            } else {
                current(i)
            }
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            if i >= warmup {
                if first_base { &mut ta } else { &mut tb }.push(ms);
            }
        }
    }
    summary(&ta, &tb)
}

/// The two series' medians and the median and quartiles of their paired ratios (`b / a`).
fn summary(a: &[f64], b: &[f64]) -> String {
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

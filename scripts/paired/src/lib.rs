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

/// The number in environment variable `name`, if it is set (the harness's knobs: `E`, `N`,
/// `PAIRED_BLOCK`, `PAIRED_GAP_US`, `PAIRED_PACKED_F32`); panics, naming it, where it is not a
/// number.
pub fn env_num(name: &str) -> Option<u64> {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}: a number")))
}

/// Runs `base(i)` and `current(i)` for `i` in `0..warmup + pairs`, which one goes first
/// alternating from pair to pair, and summarises the timed pairs after the first `warmup`.
///
/// Each backend has its own pool, whose threads spin for a while after a call before they sleep
/// (tens of microseconds of `sched_yield`); right after the other backend's call they share the
/// cores with it. On the 2-vCPU AMD EPYC VM that made a one-token bf16 layer take 1.7 ms instead
/// of the 1.2 ms it takes alone. Two settings keep the pools apart:
/// - `PAIRED_BLOCK=n`: each side of a pair runs `n` calls in a row (calls `i * n ..`), and its
///   time is the mean of all but the first, which absorbs the switch: back-to-back calls on one
///   pool, as a benchmark loop makes them.
/// - `PAIRED_GAP_US=us`: waits that long (untimed) before each call, so that the other pool
///   sleeps and each call pays for waking its own, as a layer called between other work does.
pub fn paired(warmup: usize, pairs: usize, mut base: impl FnMut(usize), mut current: impl FnMut(usize)) -> String {
    let gap = env_num("PAIRED_GAP_US").map(std::time::Duration::from_micros);
    let block = env_num("PAIRED_BLOCK").unwrap_or(1).max(1) as usize;
    let (mut ta, mut tb) = (vec![], vec![]);
    for i in 0..warmup + pairs {
        for first_base in [i % 2 == 0, i % 2 == 1] {
            let mut timed = 0.0;
            for j in 0..block {
                if let Some(g) = gap {
                    std::thread::sleep(g);
                }
                let t0 = Instant::now();
                if first_base {
                    base(i * block + j)
                } else {
                    current(i * block + j)
                }
                if j > 0 || block == 1 {
                    timed += t0.elapsed().as_secs_f64() * 1e3;
                }
            }
            if i >= warmup {
                let ms = timed / (block - 1).max(1) as f64;
                if first_base { &mut ta } else { &mut tb }.push(ms);
            }
        }
    }
    summary(&ta, &tb)
}

/// The two series' medians and the median and quartiles of their paired ratios (`b / a`), then
/// the same ratios split at the median time of a pair (the sum of its two, so that a slow base
/// alone does not pick the pair): the host's bandwidth moves between two modes (on the AMD EPYC
/// VM about 45 and 80 GB/s), and a change can matter in one mode only.
fn summary(a: &[f64], b: &[f64]) -> String {
    let r: Vec<f64> = a.iter().zip(b).map(|(x, y)| y / x).collect();
    let (mut sa, mut sb) = (a.to_vec(), b.to_vec());
    sa.sort_by(f64::total_cmp);
    sb.sort_by(f64::total_cmp);
    let q = |v: &[f64], f: f64| v[((v.len() - 1) as f64 * f).round() as usize];
    let pair: Vec<f64> = a.iter().zip(b).map(|(x, y)| (x + y) / 2.0).collect();
    let ratios = |keep: &dyn Fn(f64) -> bool| {
        let mut v: Vec<f64> = pair
            .iter()
            .zip(&r)
            .filter(|(x, _)| keep(**x))
            .map(|(_, r)| *r)
            .collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let mut sp = pair.clone();
    sp.sort_by(f64::total_cmp);
    let mid = q(&sp, 0.5);
    let (all, fast, slow) = (ratios(&|_| true), ratios(&|x| x <= mid), ratios(&|x| x > mid));
    let part = |v: &[f64]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            format!("{:.3} ({:.3}-{:.3}, {})", q(v, 0.5), q(v, 0.25), q(v, 0.75), v.len())
        }
    };
    format!(
        "base {:.3} ms, current {:.3} ms, paired current/base {:.3} (quartiles {:.3}-{:.3}, {} pairs); \
         pairs of at most {:.3} ms a call: {}, above: {}",
        q(&sa, 0.5),
        q(&sb, 0.5),
        q(&all, 0.5),
        q(&all, 0.25),
        q(&all, 0.75),
        all.len(),
        mid,
        part(&fast),
        part(&slow)
    )
}

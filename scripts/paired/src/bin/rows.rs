//! One grouped matmul of qwen3-30b-a3b's experts (weights packed by `upload_weights`) on the
//! current CPU backend only, at several row counts per expert alternated call by call in one
//! process, so that the heights compare in the same bandwidth mode. Per height: the median time,
//! the weight stream (GB/s of the experts that have rows) and GFLOP/s, and the median of the time
//! ratios against the first height.
//!
//! `rows DTYPE gateup|down H1,H2,...`, each height `N` (N rows for every expert), `dN` (N experts
//! of one row, evenly spaced) or `tN` (N tokens each routed to 8 distinct experts at random, as
//! the layer at N tokens). `E` sets the experts (default 128; 2 keeps the weights in L3), `N` the
//! timed rounds (default 40). E.g. `rows bf16 gateup t256,16,1`.

use half::bf16;
use moe_hal_core::{Activation, Backend, DType, GemmShape, HostSlice};
use moe_hal_paired::{env_num, routed};

/// Rows per expert of one height.
fn counts(spec: &str, experts: usize) -> Vec<usize> {
    if let Some(t) = spec.strip_prefix('t') {
        let mut st = 0x9e37_79b9_7f4a_7c15u64;
        routed(t.parse().expect("tN"), experts, 8, || {
            st ^= st << 13;
            st ^= st >> 7;
            st ^= st << 17;
            st
        })
    } else if let Some(d) = spec.strip_prefix('d') {
        let d: usize = d.parse().expect("dN");
        let d = d.min(experts);
        let mut c = vec![0; experts];
        (0..d).for_each(|j| c[j * experts / d] = 1);
        c
    } else {
        vec![spec.parse().expect("rows per expert"); experts]
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: rows f32|bf16 gateup|down H1,H2,... (N, dN or tN each)");
        std::process::exit(2);
    }
    let dtype = match args[1].as_str() {
        "bf16" => DType::BF16,
        "f32" => DType::F32,
        other => panic!("dtype {other}: expected f32 or bf16"),
    };
    let (k, n, act) = if args[2] == "down" {
        (768, 2048, Activation::None)
    } else {
        (2048, 768, Activation::SwiGlu)
    };
    let experts = env_num("E").unwrap_or(128) as usize;
    let rounds = env_num("N").unwrap_or(40).max(1) as usize;
    let specs: Vec<&str> = args[3].split(',').collect();
    let offs: Vec<Vec<u32>> = specs
        .iter()
        .map(|s| {
            let mut o = vec![0u32];
            for c in counts(s, experts) {
                o.push(o.last().unwrap() + c as u32);
            }
            o
        })
        .collect();
    let rows_max = offs.iter().map(|o| *o.last().unwrap() as usize).max().unwrap();
    let b = moe_hal_cpu::CpuBackend::new().expect("backend");
    let shape = GemmShape {
        rows: rows_max,
        in_features: k,
        out_features: n,
        experts,
        activation: act,
    };
    let wf: Vec<f32> = (0..experts * shape.weight_rows() * k)
        .map(|i| ((i * 7 % 13) as f32 - 6.0) * 1e-3)
        .collect();
    let xf: Vec<f32> = (0..rows_max * k).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1).collect();
    let (w, x) = if dtype == DType::BF16 {
        let to = |v: &[f32]| v.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>();
        (
            b.upload_weights(HostSlice::BF16(&to(&wf)), shape),
            b.upload(HostSlice::BF16(&to(&xf))),
        )
    } else {
        (
            b.upload_weights(HostSlice::F32(&wf), shape),
            b.upload(HostSlice::F32(&xf)),
        )
    };
    drop(wf);
    let (w, x) = (w.expect("weights"), x.expect("input"));
    let mut y = b.alloc(dtype, rows_max * n).expect("output");
    let o: Vec<_> = offs
        .iter()
        .map(|o| b.upload(HostSlice::U32(o)).expect("offsets"))
        .collect();
    let mut ms = vec![vec![]; specs.len()];
    for round in 0..rounds + 2 {
        for (i, o) in o.iter().enumerate() {
            let s = GemmShape {
                rows: *offs[i].last().unwrap() as usize,
                ..shape
            };
            let t0 = std::time::Instant::now();
            b.grouped_matmul(&x, o, &w, &mut y, s).expect("grouped matmul");
            if round >= 2 {
                ms[i].push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    let expert_bytes = (shape.weight_rows() * k * dtype.size()) as f64;
    for (i, spec) in specs.iter().enumerate() {
        let used = offs[i].windows(2).filter(|p| p[1] > p[0]).count() as f64;
        let rows = *offs[i].last().unwrap() as f64;
        let ratios: Vec<f64> = ms[i].iter().zip(&ms[0]).map(|(a, b)| a / b).collect();
        let m = median(&ms[i]);
        println!(
            "{spec:>6}: {m:8.3} ms {:6.1} GB/s {:6.1} GFLOP/s, time against {}: {:.3}",
            used * expert_bytes / m / 1e6,
            2.0 * rows * (k * shape.weight_rows()) as f64 / m / 1e6,
            specs[0],
            median(&ratios)
        );
    }
}

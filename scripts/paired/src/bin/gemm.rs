//! One grouped matmul of qwen3-30b-a3b's experts (weights packed by each backend's
//! `upload_weights`) on the base and the current CPU backend, alternated call by call, each on its
//! own copy of the weights: 128 experts of ROWS rows each from DRAM, `r` for 6 to 26 rows at
//! random, `dN` for N random experts of one row (a decoded token reads 8), or `tN` for the heights
//! of N tokens each routed to 8 random experts (a new routing every call, as the layer's).
//!
//! `gemm DTYPE ROWS gateup|down`, e.g. `gemm bf16 16 down` or `gemm bf16 t256 gateup`. `E` sets the
//! experts (default 128; `E=1` keeps both copies of the weights in a 48 MiB L3).

use half::bf16;
use moe_hal_core::{Activation, Backend, DType, GemmShape, HostSlice};
use moe_hal_paired::{env_num, paired, routed};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: gemm f32|bf16 ROWS|r|dN|tN gateup|down");
        std::process::exit(2);
    }
    let dtype = if args[1] == "bf16" { DType::BF16 } else { DType::F32 };
    let down = args[3] == "down";
    let (k, n, act) = if down {
        (768, 2048, Activation::None)
    } else {
        (2048, 768, Activation::SwiGlu)
    };
    let e = env_num("E").unwrap_or(128) as usize;
    let mut st = 12345u64;
    let mut rnd = move || {
        st ^= st << 13;
        st ^= st >> 7;
        st ^= st << 17;
        st
    };
    let calls = 60;
    let mut offs: Vec<Vec<u32>> = vec![];
    for _ in 0..calls {
        let counts: Vec<usize> = if args[2] == "r" {
            (0..e).map(|_| 6 + (rnd() % 21) as usize).collect()
        } else if let Some(t) = args[2].strip_prefix('t') {
            routed(t.parse().expect("tN"), e, 8, &mut rnd)
        } else if let Some(d) = args[2].strip_prefix('d') {
            let d: usize = d.parse().expect("dN");
            let mut c = vec![0; e];
            let mut m = 0;
            while m < d.min(e) {
                let i = (rnd() % e as u64) as usize;
                if c[i] == 0 {
                    c[i] = 1;
                    m += 1;
                }
            }
            c
        } else {
            vec![args[2].parse().expect("ROWS"); e]
        };
        let mut off = vec![0u32];
        for c in &counts {
            off.push(off.last().unwrap() + *c as u32);
        }
        offs.push(off);
    }
    let rows_max = offs.iter().map(|o| *o.last().unwrap() as usize).max().unwrap();
    let a = moe_hal_cpu_base::CpuBackend::new().expect("base backend");
    let b = moe_hal_cpu::CpuBackend::new().expect("current backend");
    let shape = GemmShape {
        rows: rows_max,
        in_features: k,
        out_features: n,
        experts: e,
        activation: act,
    };
    let wf: Vec<f32> = (0..e * shape.weight_rows() * k)
        .map(|i| ((i * 7 % 13) as f32 - 6.0) * 1e-3)
        .collect();
    let wb: Vec<bf16> = wf.iter().map(|&x| bf16::from_f32(x)).collect();
    let xf: Vec<f32> = (0..rows_max * k).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1).collect();
    let xb: Vec<bf16> = xf.iter().map(|&x| bf16::from_f32(x)).collect();
    let (w, x) = match dtype {
        DType::BF16 => (HostSlice::BF16(&wb), HostSlice::BF16(&xb)),
        _ => (HostSlice::F32(&wf), HostSlice::F32(&xf)),
    };
    let (wa, wbb) = (a.upload_weights(w, shape).unwrap(), b.upload_weights(w, shape).unwrap());
    let (xa, xbb) = (a.upload(x).unwrap(), b.upload(x).unwrap());
    let (mut ya, mut yb) = (
        a.alloc(dtype, rows_max * n).unwrap(),
        b.alloc(dtype, rows_max * n).unwrap(),
    );
    let oa: Vec<_> = offs.iter().map(|o| a.upload(HostSlice::U32(o)).unwrap()).collect();
    let ob: Vec<_> = offs.iter().map(|o| b.upload(HostSlice::U32(o)).unwrap()).collect();
    let shape_of = |i: usize| GemmShape {
        // With PAIRED_BLOCK, indices go past the calls drawn.
        rows: *offs[i % calls].last().unwrap() as usize,
        ..shape
    };
    let summary = paired(
        2,
        calls - 2,
        |i| {
            a.grouped_matmul(&xa, &oa[i % calls], &wa, &mut ya, shape_of(i))
                .unwrap()
        },
        |i| {
            b.grouped_matmul(&xbb, &ob[i % calls], &wbb, &mut yb, shape_of(i))
                .unwrap()
        },
    );
    println!("{} {} rows {}: {}", args[1], args[3], args[2], summary);
}

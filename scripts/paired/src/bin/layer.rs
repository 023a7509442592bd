//! The whole qwen3-30b-a3b layer (random weights) on the base and the current CPU backend,
//! alternated call by call (which one goes first alternates too), each with its own weights, over
//! 16 token batches so that each call reads other experts.
//!
//! `layer DTYPE TOKENS CALLS`, e.g. `layer bf16 256 40`; `PAIRED_PACKED_F32=0|1` sets the current
//! side's f32 packing.

use moe_hal_core::{Backend, DType, LayerWeights, MoeLayer, RouterSpec};
use moe_hal_paired::{host, paired, random};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 4 {
        eprintln!("usage: layer f32|bf16 TOKENS CALLS");
        std::process::exit(2);
    }
    let bf = a[1] == "bf16";
    let (t, calls): (usize, usize) = (a[2].parse().expect("TOKENS"), a[3].parse().expect("CALLS"));
    let (h, i, e, k) = (2048, 768, 128, 8);
    let dt = if bf { DType::BF16 } else { DType::F32 };
    let mut s = 7u64;
    let lw = LayerWeights {
        router: RouterSpec::softmax_topk(e, k, true),
        hidden_size: h,
        intermediate_size: i,
        router_weight: random(&mut s, e * h, 2.0 / (h as f32).sqrt()),
        gate_up: host(random(&mut s, e * 2 * i * h, 1.0 / (h as f32).sqrt()), bf),
        down: host(random(&mut s, e * h * i, 1.0 / (i as f32).sqrt()), bf),
        shared: None,
    };
    let xs: Vec<_> = (0..16).map(|_| host(random(&mut s, t * h, 1.0), bf)).collect();
    let ba = moe_hal_cpu_base::CpuBackend::new().expect("base backend");
    let mut bb = moe_hal_cpu::CpuBackend::new().expect("current backend");
    // PAIRED_PACKED_F32=0|1 sets the current side's f32 packing (the base keeps its default), so
    // that one commit's two f32 kernels can be paired: `paired.sh HEAD layer f32 256 40`.
    if let Some(v) = moe_hal_paired::env_num("PAIRED_PACKED_F32") {
        bb = bb.with_packed_f32(v != 0).expect("with_packed_f32");
    }
    let mut la = MoeLayer::new(ba.clone(), &lw).expect("base layer");
    let mut lb = MoeLayer::new(bb.clone(), &lw).expect("current layer");
    drop(lw);
    let xa: Vec<_> = xs.iter().map(|x| ba.upload(x.as_slice()).unwrap()).collect();
    let xb: Vec<_> = xs.iter().map(|x| bb.upload(x.as_slice()).unwrap()).collect();
    let (mut oa, mut ob) = (ba.alloc(dt, t * h).unwrap(), bb.alloc(dt, t * h).unwrap());
    // The first four pairs warm up.
    let summary = paired(
        4,
        calls,
        |r| la.forward_into(&xa[r % 16], t, &mut oa).unwrap(),
        |r| lb.forward_into(&xb[r % 16], t, &mut ob).unwrap(),
    );
    let (va, vb) = (
        ba.download(&oa).unwrap().to_f32().unwrap(),
        bb.download(&ob).unwrap().to_f32().unwrap(),
    );
    let diff = va
        .iter()
        .zip(&vb)
        .map(|(x, y)| ((x - y).abs() / x.abs().max(1e-3)) as f64)
        .fold(0.0, f64::max);
    println!(
        "{} T={t}: {}; largest relative difference of the last outputs {diff:.1e}",
        a[1], summary
    );
}

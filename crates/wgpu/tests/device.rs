//! Behaviour specific to the WebGPU backend (the shared contract is checked
//! by the workspace conformance suite). Skipped when no adapter is present,
//! unless `MOE_REQUIRE_BACKENDS` names `wgpu`.

use moe_hal_core::{
    Activation, Backend, CombineShape, DType, DeviceBuffer, GemmShape, HostSlice, HostVec, Kernel, MoeError,
    PermuteShape, Permuted,
};
use moe_hal_wgpu::{WgpuBackend, WgpuBuffer};
use std::time::Instant;

fn backend() -> Option<WgpuBackend> {
    match WgpuBackend::new() {
        Ok(b) => Some(b),
        Err(e) => {
            moe_hal_core::conformance::absent_backend("wgpu", e);
            None
        }
    }
}

#[test]
fn unavailable_error_names_the_switch() {
    if let Err(e) = WgpuBackend::new() {
        assert!(matches!(e, MoeError::BackendUnavailable { .. }), "{e}");
        assert!(e.to_string().contains("WGPU_BACKEND"), "{e}");
    }
}

#[test]
fn capabilities_are_honest() {
    let Some(b) = backend() else { return };
    let caps = b.capabilities();
    for k in Kernel::ALL {
        let want = match k {
            Kernel::Route | Kernel::TopK => vec![DType::F32],
            _ => vec![DType::F32, DType::BF16, DType::F16],
        };
        assert_eq!(caps.kernel(k).unwrap().dtypes, want, "{k}");
    }
    // Mixed dtypes are refused with a typed error.
    let x = b.upload(HostSlice::BF16(&[half::bf16::ONE; 12])).unwrap();
    let off = b.upload(HostSlice::U32(&[0, 2])).unwrap();
    let w = b.alloc(DType::F16, 12).unwrap();
    let mut y = b.alloc(DType::BF16, 4).unwrap();
    let s = GemmShape {
        rows: 2,
        in_features: 6,
        out_features: 2,
        experts: 1,
        activation: Activation::None,
    };
    let err = b.grouped_matmul(&x, &off, &w, &mut y, s).unwrap_err();
    assert!(matches!(err, MoeError::DType { .. }), "{err}");
}

/// 16-bit writers own whole words: the element after the last one written
/// (same u32 word) keeps its value.
#[test]
fn half_precision_writes_leave_neighbours_alone() {
    let Some(b) = backend() else { return };
    let sentinel = half::bf16::from_f32(7.0);
    // permute: 1 token, H = 3, k = 1 -> 3 elements; rows buffer of 4.
    let s = PermuteShape {
        tokens: 1,
        hidden: 3,
        top_k: 1,
        experts: 2,
    };
    let x: Vec<half::bf16> = [1.0, 2.0, 3.0].iter().map(|&v| half::bf16::from_f32(v)).collect();
    let xb = b.upload(HostSlice::BF16(&x)).unwrap();
    let ids = b.upload(HostSlice::U32(&[1])).unwrap();
    let mut out = Permuted::alloc(&b, s, DType::BF16).unwrap();
    out.rows = b.upload(HostSlice::BF16(&[sentinel; 4])).unwrap();
    b.permute(&xb, &ids, s, &mut out).unwrap();
    let mut want = x.clone();
    want.push(sentinel);
    assert_eq!(b.download(&out.rows).unwrap(), HostVec::BF16(want));
    // combine into 3 of 4 f16 elements, accumulating.
    let h = |v: f32| half::f16::from_f32(v);
    let y = b.upload(HostSlice::F16(&[h(1.0), h(2.0), h(3.0)])).unwrap();
    let w = b.upload(HostSlice::F32(&[0.5])).unwrap();
    let slot = b.upload(HostSlice::U32(&[0])).unwrap();
    let mut o = b.upload(HostSlice::F16(&[h(1.0), h(1.0), h(1.0), h(9.0)])).unwrap();
    let cs = CombineShape {
        tokens: 1,
        hidden: 3,
        top_k: 1,
        accumulate: true,
    };
    b.combine(&y, &ids, &w, &slot, &mut o, cs).unwrap();
    assert_eq!(
        b.download(&o).unwrap(),
        HostVec::F16(vec![h(1.5), h(2.0), h(2.5), h(9.0)])
    );
}

#[test]
fn buffers_round_trip_every_dtype_and_odd_lengths() {
    let Some(b) = backend() else { return };
    let e = b.alloc(DType::F32, 0).unwrap();
    assert_eq!(e.len(), 0);
    assert_eq!(b.download(&e).unwrap(), HostVec::F32(vec![]));
    let h: Vec<half::f16> = (0..5).map(|i| half::f16::from_f32(i as f32)).collect();
    let mut buf = b.upload(HostSlice::F16(&h)).unwrap();
    assert_eq!(buf.dtype(), DType::F16);
    assert_eq!(b.download(&buf).unwrap(), HostVec::F16(h.clone()));
    // An odd prefix of a 2-byte dtype keeps the element after it.
    let new: Vec<half::f16> = (0..3).map(|i| half::f16::from_f32(10.0 + i as f32)).collect();
    b.write(&mut buf, HostSlice::F16(&new)).unwrap();
    let mut want = new.clone();
    want.extend_from_slice(&h[3..]);
    assert_eq!(b.download(&buf).unwrap(), HostVec::F16(want));
    let z = b.alloc(DType::BF16, 3).unwrap();
    assert_eq!(b.download(&z).unwrap(), HostVec::BF16(vec![half::bf16::ZERO; 3]));
    let mut u = b.alloc(DType::U32, 4).unwrap();
    assert!(b.write(&mut u, HostSlice::U32(&[1; 5])).is_err());
    assert!(b.write(&mut u, HostSlice::F32(&[1.0])).is_err());
}

#[test]
fn oversized_buffers_are_refused() {
    let Some(b) = backend() else { return };
    let max = b.capabilities().max_buffer_bytes as usize;
    let err = b.alloc(DType::F32, max / 4 + 1).unwrap_err();
    assert!(matches!(err, MoeError::Unsupported { .. }), "{err}");
    let err = b.alloc(DType::F32, usize::MAX).unwrap_err();
    assert!(matches!(err, MoeError::Unsupported { .. }), "{err}");
}

#[test]
fn permute_of_no_tokens_zeroes_counts_and_offsets() {
    let Some(b) = backend() else { return };
    let s = PermuteShape {
        tokens: 0,
        hidden: 4,
        top_k: 2,
        experts: 3,
    };
    let mut out = Permuted::alloc(&b, s, DType::F32).unwrap();
    b.write(&mut out.counts, HostSlice::U32(&[9, 9, 9])).unwrap();
    b.write(&mut out.offsets, HostSlice::U32(&[9, 9, 9, 9])).unwrap();
    let x = b.alloc(DType::F32, 0).unwrap();
    let ids = b.alloc(DType::U32, 0).unwrap();
    b.permute(&x, &ids, s, &mut out).unwrap();
    assert_eq!(b.download(&out.counts).unwrap(), HostVec::U32(vec![0; 3]));
    assert_eq!(b.download(&out.offsets).unwrap(), HostVec::U32(vec![0; 4]));
}

#[test]
fn out_of_range_ids_are_harmless() {
    let Some(b) = backend() else { return };
    let s = PermuteShape {
        tokens: 2,
        hidden: 2,
        top_k: 2,
        experts: 3,
    };
    let x = b.upload(HostSlice::F32(&[1.0, 2.0, 3.0, 4.0])).unwrap();
    let ids = b.upload(HostSlice::U32(&[0, 7, 2, 0])).unwrap();
    let mut out = Permuted::alloc(&b, s, DType::F32).unwrap();
    b.permute(&x, &ids, s, &mut out).unwrap();
    assert_eq!(b.download(&out.counts).unwrap(), HostVec::U32(vec![2, 0, 1]));
    assert_eq!(b.download(&out.offsets).unwrap(), HostVec::U32(vec![0, 2, 2, 3]));
    let slots = b.download(&out.slot_of).unwrap().into_u32().unwrap();
    assert_eq!(slots, vec![0, u32::MAX, 2, 1]);
    // combine skips the unplaced slot instead of reading out of bounds.
    let w = b.upload(HostSlice::F32(&[1.0; 4])).unwrap();
    let y = b
        .upload(HostSlice::F32(&[1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 0.0, 0.0]))
        .unwrap();
    let mut o = b.alloc(DType::F32, 4).unwrap();
    let cs = CombineShape {
        tokens: 2,
        hidden: 2,
        top_k: 2,
        accumulate: false,
    };
    b.combine(&y, &ids, &w, &out.slot_of, &mut o, cs).unwrap();
    assert_eq!(b.download(&o).unwrap(), HostVec::F32(vec![1.0, 1.0, 5.0, 5.0]));
}

/// A stable counting sort of `ids` (ids >= `e` unplaced), as the contract defines the permute:
/// counts, offsets, slot_of, source_of.
fn counting_sort(ids: &[u32], e: usize) -> (Vec<u32>, Vec<u32>, Vec<u32>, Vec<u32>) {
    let mut counts = vec![0u32; e];
    for &i in ids.iter().filter(|&&i| (i as usize) < e) {
        counts[i as usize] += 1;
    }
    let mut offsets = vec![0u32; e + 1];
    for x in 0..e {
        offsets[x + 1] = offsets[x] + counts[x];
    }
    let mut cursor = offsets.clone();
    let (mut slot_of, mut source_of) = (vec![u32::MAX; ids.len()], vec![0u32; ids.len()]);
    for (f, &i) in ids.iter().enumerate() {
        if (i as usize) < e {
            let c = &mut cursor[i as usize];
            slot_of[f] = *c;
            source_of[*c as usize] = f as u32;
            *c += 1;
        }
    }
    (counts, offsets, slot_of, source_of)
}

/// Permutes of 65536 rows and more (8192 tokens of top-8, a prefill): the flat ids are counted
/// and assigned in chunks, across chunk boundaries and ids past E too, in f32 and in bf16 with an
/// odd width. llvmpipe once stopped the single pass over all ids at 65535 iterations, silently.
#[test]
fn long_permutes_are_a_stable_counting_sort() {
    let Some(b) = backend() else { return };
    for (tokens, experts, hidden, dtype) in [(8192, 64, 2, DType::F32), (9001, 7, 3, DType::BF16)] {
        let top_k = 8;
        let n = tokens * top_k;
        let mut st = 0x9e37_79b9_7f4a_7c15u64;
        let ids: Vec<u32> = (0..n)
            .map(|_| {
                st ^= st << 13;
                st ^= st >> 7;
                st ^= st << 17;
                // A few ids past E, which stay unplaced.
                (st % (experts as u64 + 1)) as u32 + st.is_multiple_of(97) as u32 * 1000
            })
            .collect();
        let x: Vec<f32> = (0..tokens * hidden).map(|i| (i % 251) as f32).collect();
        let s = PermuteShape {
            tokens,
            hidden,
            top_k,
            experts,
        };
        let xb = b.upload(HostVec::from_f32(&x, dtype).unwrap().as_slice()).unwrap();
        let ib = b.upload(HostSlice::U32(&ids)).unwrap();
        let mut out = Permuted::alloc(&b, s, dtype).unwrap();
        b.permute(&xb, &ib, s, &mut out).unwrap();
        let u = |buf: &WgpuBuffer| b.download(buf).unwrap().into_u32().unwrap();
        let (counts, offsets, slot_of, source_of) = counting_sort(&ids, experts);
        let placed = offsets[experts] as usize;
        assert_eq!(u(&out.counts), counts, "{tokens} tokens, {experts} experts");
        assert_eq!(u(&out.offsets), offsets);
        assert_eq!(u(&out.slot_of), slot_of);
        assert_eq!(u(&out.source_of)[..placed], source_of[..placed]);
        let rows = b.download(&out.rows).unwrap().to_f32().unwrap();
        for (r, &f) in source_of[..placed].iter().enumerate() {
            let t = f as usize / top_k;
            assert_eq!(
                rows[r * hidden..(r + 1) * hidden],
                x[t * hidden..(t + 1) * hidden],
                "row {r}"
            );
        }
    }
}

/// On llvmpipe, which stops an invocation's loops after 65535 iterations, shapes past that are
/// refused with a reason instead of computed wrong; other adapters run them (not timed here).
#[test]
fn llvmpipe_loop_budget_refuses_instead_of_computing_wrong() {
    let Some(b) = backend() else { return };
    if !b.device_name().contains("llvmpipe") {
        eprintln!("SKIPPED: not llvmpipe ({})", b.device_name());
        return;
    }
    let refused = |r: Result<(), MoeError>, what: &str| match r {
        Err(MoeError::Unsupported { reason, .. }) => assert!(reason.contains("65535"), "{what}: {reason}"),
        other => panic!("{what}: expected a refusal, got {other:?}"),
    };
    // route of 65536 experts, k 1.
    let e = 1 << 16;
    let logits = b.upload(HostSlice::F32(&vec![0.0; e])).unwrap();
    let (mut ids, mut w) = (b.alloc(DType::U32, 1).unwrap(), b.alloc(DType::F32, 1).unwrap());
    let spec = moe_hal_core::RouterSpec::softmax_topk(e, 1, false);
    refused(b.route(&logits, &spec, 1, &mut ids, &mut w), "route");
    // topk of 16 in 8192 columns.
    let v = b.upload(HostSlice::F32(&vec![0.0; 8192])).unwrap();
    let (mut ids, mut out) = (b.alloc(DType::U32, 16).unwrap(), b.alloc(DType::F32, 16).unwrap());
    refused(b.topk(&v, 1, 8192, 16, &mut ids, &mut out), "topk");
    // combine of 256 slots per token.
    let k = 256;
    let y = b.upload(HostSlice::F32(&vec![1.0; k])).unwrap();
    let ids = b.upload(HostSlice::U32(&(0..k as u32).collect::<Vec<_>>())).unwrap();
    let w = b.upload(HostSlice::F32(&vec![1.0; k])).unwrap();
    let mut o = b.alloc(DType::F32, 1).unwrap();
    let cs = CombineShape {
        tokens: 1,
        hidden: 1,
        top_k: k,
        accumulate: false,
    };
    refused(b.combine(&y, &ids, &w, &ids, &mut o, cs), "combine");
    // permute to 65536 experts (the scan over experts).
    let s = PermuteShape {
        tokens: 1,
        hidden: 1,
        top_k: 1,
        experts: e,
    };
    let x = b.upload(HostSlice::F32(&[1.0])).unwrap();
    let ids = b.upload(HostSlice::U32(&[40_000])).unwrap();
    let mut out = Permuted::alloc(&b, s, DType::F32).unwrap();
    refused(b.permute(&x, &ids, s, &mut out), "permute");
}

/// Route's scratch (E + 2 groups words per token) takes more than the logits: tokens past what
/// one binding of it holds run in further dispatches, so logits that bind are never refused.
#[test]
fn route_runs_in_dispatches_when_its_scratch_would_not_bind() {
    if backend().is_none() {
        return;
    }
    let b = WgpuBackend::with_binding_limit(4096).unwrap();
    let spec = moe_hal_core::RouterSpec::deepseek_v3(8, 2, 2, 1, Some(vec![0.01; 8]), true, 2.5);
    let tokens = 120;
    let logits: Vec<f32> = (0..tokens * 8).map(|i| ((i * 37 % 101) as f32 - 50.0) / 9.0).collect();
    let lb = b.upload(HostSlice::F32(&logits)).unwrap();
    let (mut ids, mut w) = (
        b.alloc(DType::U32, tokens * 2).unwrap(),
        b.alloc(DType::F32, tokens * 2).unwrap(),
    );
    b.route(&lb, &spec, tokens, &mut ids, &mut w).unwrap();
    let l64: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
    let (want_ids, want_w) = moe_hal_core::reference::route(&l64, tokens, &spec);
    assert_eq!(b.download(&ids).unwrap().into_u32().unwrap(), want_ids);
    let got: Vec<f64> = b
        .download(&w)
        .unwrap()
        .to_f32()
        .unwrap()
        .iter()
        .map(|&x| x as f64)
        .collect();
    assert!(moe_hal_core::reference::rel_l2(&got, &want_w) < 1e-5);
}

/// A buffer of another `WgpuBackend` (another device) is refused by every call: its wgpu id
/// names another buffer on this device (a write landed there), or none (wgpu panicked).
#[test]
fn buffers_of_another_backend_are_refused() {
    let Some(a) = backend() else { return };
    let b = WgpuBackend::new().unwrap();
    let mine = a.upload(HostSlice::F32(&[1.0; 4])).unwrap();
    let mut theirs = b.upload(HostSlice::F32(&[5.0; 4])).unwrap();
    let foreign = |r: Result<(), MoeError>, what: &str| match r {
        Err(MoeError::Unsupported { what: w, .. }) => assert!(w.contains("another WgpuBackend"), "{what}: {w}"),
        other => panic!("{what}: expected a refusal, got {other:?}"),
    };
    foreign(a.write(&mut theirs, HostSlice::F32(&[9.0; 4])), "write");
    foreign(a.download(&theirs).map(|_| ()), "download");
    assert_eq!(a.download(&mine).unwrap(), HostVec::F32(vec![1.0; 4]));
    let s = GemmShape {
        rows: 2,
        in_features: 2,
        out_features: 2,
        experts: 1,
        activation: Activation::None,
    };
    let offsets = a.upload(HostSlice::U32(&[0, 2])).unwrap();
    let mut out = a.alloc(DType::F32, 4).unwrap();
    foreign(
        a.grouped_matmul(&theirs, &offsets, &mine, &mut out, s),
        "grouped_matmul",
    );
    // A clone is the same device.
    let c = a.clone();
    c.grouped_matmul(&mine, &offsets, &mine, &mut out, s).unwrap();
    assert_eq!(c.download(&out).unwrap(), HostVec::F32(vec![2.0; 4]));
}

#[test]
fn clones_share_the_device() {
    let Some(b) = backend() else { return };
    let c = b.clone();
    let buf = b.upload(HostSlice::F32(&[1.0, 2.0])).unwrap();
    assert_eq!(c.download(&buf).unwrap(), HostVec::F32(vec![1.0, 2.0]));
    c.synchronize().unwrap();
    assert!(!b.device_name().is_empty());
}

/// The full conformance suite from this crate alone (the workspace suite runs it too): T = 0 and
/// T = 257 as well. About 2 s on lavapipe.
#[test]
fn full_conformance() {
    let Some(b) = backend() else { return };
    let report = moe_hal_core::conformance::run_all(&b, false);
    assert!(report.passed(), "{report}");
    eprintln!("{} cases passed", report.results.len());
}

/// Weights above the per-binding limit are bound a group of experts at a
/// time; other buffers above it are refused.
#[test]
fn big_weights_are_bound_per_group_of_experts() {
    if backend().is_none() {
        return;
    }
    // SwiGLU, 2N x K = 32 x 16: 2048 bytes per expert in f32, 1024 in bf16; 5 experts.
    let b = WgpuBackend::with_binding_limit(4096).unwrap();
    // The capability query says what the kernels take at once.
    let caps = b.capabilities();
    assert_eq!(caps.max_binding_bytes, 4096);
    assert!(caps.max_buffer_bytes > 4096);
    let s = GemmShape {
        rows: 20,
        in_features: 16,
        out_features: 16,
        experts: 5,
        activation: Activation::SwiGlu,
    };
    let offsets = [0u32, 3, 3, 10, 14, 20];
    let mut seed = 1u32;
    let mut rand = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    };
    let x = rand(s.rows * s.in_features);
    let w = rand(s.experts * s.weight_rows() * s.in_features);
    for dtype in [DType::F32, DType::BF16] {
        let (xh, wh) = (
            HostVec::from_f32(&x, dtype).unwrap(),
            HostVec::from_f32(&w, dtype).unwrap(),
        );
        let xb = b.upload(xh.as_slice()).unwrap();
        let wb = b.upload(wh.as_slice()).unwrap();
        assert!(wb.raw().size() > 4096);
        let ob = b.upload(HostSlice::U32(&offsets)).unwrap();
        let mut yb = b.alloc(dtype, s.rows * s.out_features).unwrap();
        b.grouped_matmul(&xb, &ob, &wb, &mut yb, s).unwrap();
        let got = b.download(&yb).unwrap().to_f64();
        let want = moe_hal_core::reference::grouped_matmul(&xh.to_f64(), &offsets, &wh.to_f64(), s);
        let err = moe_hal_core::reference::rel_l2(&got, &want);
        assert!(err <= moe_hal_core::tolerance(dtype), "{dtype}: relative L2 {err:.2e}");
        // A weight buffer longer than the binding limit whose used part fits: the first two
        // experts of the same weights, bound at once (it was refused as too big to bind whole).
        let two = GemmShape {
            rows: 3,
            experts: 2,
            ..s
        };
        let mut y2 = b.alloc(dtype, two.rows * two.out_features).unwrap();
        let o2 = b.upload(HostSlice::U32(&offsets[..3])).unwrap();
        b.grouped_matmul(&xb, &o2, &wb, &mut y2, two).unwrap();
        let got = b.download(&y2).unwrap().to_f64();
        let w2 = &wh.to_f64()[..2 * s.weight_rows() * s.in_features];
        let want = moe_hal_core::reference::grouped_matmul(&xh.to_f64()[..3 * s.in_features], &offsets[..3], w2, two);
        let err = moe_hal_core::reference::rel_l2(&got, &want);
        assert!(
            err <= moe_hal_core::tolerance(dtype),
            "{dtype}, two experts: relative L2 {err:.2e}"
        );
    }
    let big = b.alloc(DType::F32, 2000).unwrap();
    let ids = b.alloc(DType::U32, 2).unwrap();
    let wts = b.alloc(DType::F32, 2).unwrap();
    let mut out = b.alloc(DType::F32, 1000).unwrap();
    let cs = CombineShape {
        tokens: 1,
        hidden: 1000,
        top_k: 2,
        accumulate: false,
    };
    let err = b.combine(&big, &ids, &wts, &ids, &mut out, cs).unwrap_err();
    assert!(matches!(err, MoeError::Unsupported { .. }), "{err}");
}

/// After the device is lost, calls fail with an error; nothing panics.
#[test]
fn device_loss_is_an_error() {
    if backend().is_none() {
        return;
    }
    // A device of its own (the shared one is used by the other tests).
    let b = WgpuBackend::with_binding_limit(u64::MAX).unwrap();
    let logits = b.upload(HostSlice::F32(&[0.5, 1.0, -1.0, 2.0])).unwrap();
    b.destroy_device_for_tests();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let spec = moe_hal_core::RouterSpec::softmax_topk(4, 2, true);
        let routed = (|| -> Result<(), MoeError> {
            let mut ids = b.alloc(DType::U32, 2)?;
            let mut w = b.alloc(DType::F32, 2)?;
            b.route(&logits, &spec, 1, &mut ids, &mut w)?;
            b.download(&ids).map(|_| ())
        })();
        let timed = b.device_time_ms(&mut || Ok(()));
        (routed, b.download(&logits).map(|_| ()), timed)
    }));
    let (routed, downloaded, timed) = outcome.expect("a lost device must not panic");
    assert!(routed.is_err(), "routing on a lost device reported success");
    assert!(downloaded.is_err(), "download from a lost device reported success");
    match timed {
        Err(MoeError::Device { .. }) => {}
        other => panic!("timing on a lost device: expected a Device error, got {other:?}"),
    }
}

/// A grouped matmul of 2 experts over 64 rows, 256 -> 256 (f32), and its expected output.
struct Gemm {
    x: WgpuBuffer,
    offsets: WgpuBuffer,
    w: WgpuBuffer,
    y: WgpuBuffer,
    shape: GemmShape,
    want: Vec<f32>,
}

fn gemm(b: &WgpuBackend) -> Gemm {
    let (rows, k, n) = (64usize, 256usize, 256usize);
    let xv: Vec<f32> = (0..rows * k).map(|i| ((i * 7) % 13) as f32 / 13.0 - 0.5).collect();
    let wv: Vec<f32> = (0..2 * n * k).map(|i| ((i * 5) % 11) as f32 / 11.0 - 0.5).collect();
    let split = 24;
    let mut want = vec![0f32; rows * n];
    for r in 0..rows {
        let e = usize::from(r >= split);
        for c in 0..n {
            let row = &wv[(e * n + c) * k..(e * n + c + 1) * k];
            want[r * n + c] = xv[r * k..(r + 1) * k].iter().zip(row).map(|(a, b)| a * b).sum();
        }
    }
    Gemm {
        x: b.upload(HostSlice::F32(&xv)).unwrap(),
        offsets: b.upload(HostSlice::U32(&[0, split as u32, rows as u32])).unwrap(),
        w: b.upload(HostSlice::F32(&wv)).unwrap(),
        y: b.alloc(DType::F32, rows * n).unwrap(),
        shape: GemmShape {
            rows,
            in_features: k,
            out_features: n,
            experts: 2,
            activation: Activation::None,
        },
        want,
    }
}

fn assert_close(got: &[f32], want: &[f32]) {
    let err = got.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
    assert!(err < 1e-3, "max abs error {err}");
}

/// With timestamp queries, the device time of a grouped matmul is positive, finite and no longer
/// than the wall-clock time around the whole call; without them, `None`, and the work is still done.
#[test]
fn device_clock_times_a_grouped_matmul() {
    let Some(b) = backend() else { return };
    let mut g = gemm(&b);
    // Warm-up: the first dispatch may compile or allocate.
    b.grouped_matmul(&g.x, &g.offsets, &g.w, &mut g.y, g.shape).unwrap();
    b.synchronize().unwrap();
    let mut best: Option<(f64, f64)> = None;
    for _ in 0..3 {
        let start = Instant::now();
        let device = b
            .device_time_ms(&mut || b.grouped_matmul(&g.x, &g.offsets, &g.w, &mut g.y, g.shape))
            .unwrap();
        let wall = start.elapsed().as_secs_f64() * 1e3;
        if !b.has_device_clock() {
            assert_eq!(device, None);
            assert_close(&b.download(&g.y).unwrap().to_f32().unwrap(), &g.want);
            eprintln!(
                "SKIPPED: {} offers no TIMESTAMP_QUERY + TIMESTAMP_QUERY_INSIDE_ENCODERS, so device_time_ms \
                 returns None (checked) and callers use the wall clock",
                b.device_name()
            );
            return;
        }
        let ms = device.expect("an adapter with timestamp queries gives a device time");
        assert!(ms.is_finite() && ms > 0.0, "device time {ms} ms");
        // Slack: the two clocks are read separately (and may tick at different rates by a hair).
        assert!(
            ms <= wall * 1.02 + 0.05,
            "device time {ms} ms is longer than the wall time {wall} ms"
        );
        best = Some(best.map_or((ms, wall), |(d, w)| (d.min(ms), w.min(wall))));
    }
    assert_close(&b.download(&g.y).unwrap().to_f32().unwrap(), &g.want);
    let (d, w) = best.unwrap();
    eprintln!(
        "{}: grouped matmul {d:.3} ms on the device clock, {w:.3} ms on the wall clock",
        b.device_name()
    );
}

/// Without timestamp queries (asked not to request them), `device_time_ms` runs the work, waits
/// for it and returns `None`; an error of the timed call comes back as it is.
#[test]
fn device_time_without_timestamps_and_errors() {
    if backend().is_none() {
        return;
    }
    let b = WgpuBackend::without_device_clock_for_tests().unwrap();
    assert!(!b.has_device_clock());
    // `moe-bench info` shows the device name: it says which clock the bench will use.
    assert!(b.device_name().contains("no device clock"), "{}", b.device_name());
    let with = backend().unwrap();
    assert_eq!(
        with.device_name().contains("device clock: timestamp queries"),
        with.has_device_clock(),
        "{}",
        with.device_name()
    );
    let mut g = gemm(&b);
    let device = b
        .device_time_ms(&mut || b.grouped_matmul(&g.x, &g.offsets, &g.w, &mut g.y, g.shape))
        .unwrap();
    assert_eq!(device, None);
    assert_close(&b.download(&g.y).unwrap().to_f32().unwrap(), &g.want);
    // The error of `f` is returned, with or without a device clock, and the device stays usable.
    for b in [b, backend().unwrap()] {
        let mut g = gemm(&b);
        let bad = GemmShape { rows: 65, ..g.shape };
        let err = b
            .device_time_ms(&mut || b.grouped_matmul(&g.x, &g.offsets, &g.w, &mut g.y, bad))
            .unwrap_err();
        assert!(matches!(err, MoeError::Shape { .. }), "{err}");
        b.device_time_ms(&mut || b.grouped_matmul(&g.x, &g.offsets, &g.w, &mut g.y, g.shape))
            .unwrap();
        assert_close(&b.download(&g.y).unwrap().to_f32().unwrap(), &g.want);
    }
}

/// A layer forward past what one binding holds is refused up front, naming the tokens a call
/// takes (it used to fail inside permute, after the work buffers grew and route ran); exactly that
/// many tokens run and match the float64 reference.
#[test]
fn layer_forward_past_the_binding_is_refused_with_its_token_limit() {
    if backend().is_none() {
        return;
    }
    use moe_hal_core::conformance::{layer_input, random_layer};
    use moe_hal_core::{LayerScratch, MoeLayer, RouterSpec};
    // k * H * 4 = 2 * 16 * 4 = 128 bytes a token is the largest buffer: 4096 / 128 = 32 tokens.
    let b = WgpuBackend::with_binding_limit(4096).unwrap();
    let w = random_layer(3, RouterSpec::softmax_topk(8, 2, true), 16, 12, Some((20, true)));
    let layer = MoeLayer::new(b.clone(), &w).unwrap();
    assert_eq!(layer.max_tokens(), 32);
    let mut scratch = LayerScratch::new();
    let x = layer_input(5, &w, 33, DType::F32).unwrap();
    let xb = b.upload(HostSlice::F32(&x)).unwrap();
    let mut out = b.alloc(DType::F32, 33 * 16).unwrap();
    let err = layer.forward_with(&mut scratch, &xb, 33, &mut out).unwrap_err();
    assert!(
        matches!(err, MoeError::Unsupported { .. }) && err.to_string().contains("at most 32 tokens"),
        "{err}"
    );
    assert_eq!(scratch.capacity(), 0, "nothing was allocated for the refused call");
    layer.forward_with(&mut scratch, &xb, 32, &mut out).unwrap();
    let x64: Vec<f64> = x[..32 * 16].iter().map(|&v| v as f64).collect();
    let want = w.reference_forward(&x64, 32).unwrap();
    let got: Vec<f64> = b.download(&out).unwrap().to_f32().unwrap()[..32 * 16]
        .iter()
        .map(|&v| v as f64)
        .collect();
    let err = moe_hal_core::reference::rel_l2(&got, &want.output);
    assert!(err < 1e-5, "relative L2 error {err}");
}

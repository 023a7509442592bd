//! `moe-bench` end to end: `run` on a golden fixture, every bad-input path
//! (one-line error, non-zero exit, no panic, no output file left behind),
//! `info` and `verify`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_moe-bench"))
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/golden")
        .join(name)
}

fn run(model: &Path, layer: &str, input: &Path, output: &Path, extra: &[&str]) -> Output {
    bin()
        .args(["run", "--model"])
        .arg(model)
        .args(["--layer", layer, "--input"])
        .arg(input)
        .arg("--output")
        .arg(output)
        .args(extra)
        .output()
        .unwrap()
}

fn read_f32(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    let v = match t.dtype() {
        safetensors::Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        safetensors::Dtype::I64 => t
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32)
            .collect(),
        d => panic!("unexpected dtype {d:?}"),
    };
    (t.shape().to_vec(), v)
}

/// Asserts a clean failure: non-zero exit, a one-line message containing `needle`, no panic, no output.
fn assert_fails(out: &Output, output_path: &Path, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert_eq!(err.trim().lines().count(), 1, "expected a one-line message, got: {err}");
    assert!(err.contains(needle), "{err:?} should mention {needle:?}");
    assert!(!output_path.exists(), "an output file was left behind after a failure");
    let dir = output_path.parent().unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind: {leftovers:?}");
}

#[test]
fn run_matches_transformers_on_a_fixture() {
    let dir = fixture("deepseek_v3_groups_norm");
    let tmp = tempfile::tempdir().unwrap();
    let out_path = tmp.path().join("out.safetensors");
    let out = run(
        &dir,
        "1",
        &dir.join("io.safetensors"),
        &out_path,
        &["--backend", "cpu", "--dtype", "f32"],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (shape, got) = read_f32(&out_path, "hidden_states");
    let (wshape, want) = read_f32(&dir.join("io.safetensors"), "output");
    assert_eq!(shape, wshape);
    let num: f64 = got.iter().zip(&want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    assert!((num / den).sqrt() <= 1e-5, "relative L2 {}", (num / den).sqrt());
    let (ishape, ids) = read_f32(&out_path, "router.topk_ids");
    let (_, want_ids) = read_f32(&dir.join("io.safetensors"), "router.topk_ids");
    let k = ishape[1];
    for (a, b) in ids.chunks(k).zip(want_ids.chunks(k)) {
        let (mut a, mut b) = (a.to_vec(), b.to_vec());
        a.sort_by(f32::total_cmp);
        b.sort_by(f32::total_cmp);
        assert_eq!(a, b);
    }
    assert_eq!(read_f32(&out_path, "router.topk_weights").0, ishape);
}

#[test]
fn run_accepts_a_sharded_checkpoint_bf16_and_a_batch_dimension() {
    let dir = fixture("qwen3_moe_norm");
    let tmp = tempfile::tempdir().unwrap();
    // Re-save the input as [1, T, H].
    let (shape, x) = read_f32(&dir.join("io.safetensors"), "hidden_states");
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1, shape[0], shape[1]], &bytes).unwrap();
    // Beside it, a tensor of a dtype the run has no use for (it once refused the whole file).
    let mask = vec![1u8; shape[0]];
    let mask = safetensors::tensor::TensorView::new(safetensors::Dtype::BOOL, vec![1, shape[0]], &mask).unwrap();
    let input = tmp.path().join("in.safetensors");
    std::fs::write(
        &input,
        safetensors::serialize(vec![("hidden_states", view), ("attention_mask", mask)], None).unwrap(),
    )
    .unwrap();
    let out_path = tmp.path().join("out.safetensors");
    let out = run(&dir, "1", &input, &out_path, &["--dtype", "bf16"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(read_f32(&out_path, "hidden_states").0, shape);
}

/// A copy of a fixture whose files a test may break.
fn broken_copy(name: &str) -> (tempfile::TempDir, PathBuf) {
    let src = fixture(name);
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join(name);
    std::fs::create_dir(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    (tmp, dst)
}

#[test]
fn bad_inputs_fail_cleanly() {
    let name = "deepseek_v3_groups_norm";
    let good = fixture(name);
    let io = good.join("io.safetensors");
    let (tmp, dir) = broken_copy(name);
    let out = tmp.path().join("out.safetensors");

    // Dense layer and out-of-range layer.
    assert_fails(&run(&good, "0", &io, &out, &[]), &out, "dense");
    assert_fails(&run(&good, "7", &io, &out, &[]), &out, "out of range");
    // Missing folder / config.
    assert_fails(&run(&tmp.path().join("nope"), "1", &io, &out, &[]), &out, "config.json");
    // Wrong hidden size: an input of another width.
    let h = read_f32(&io, "hidden_states").0[1];
    let bytes: Vec<u8> = vec![0u8; 4 * 2 * (h + 3)];
    let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, h + 3], &bytes).unwrap();
    let wide = tmp.path().join("wide.safetensors");
    std::fs::write(&wide, safetensors::serialize(vec![("hidden_states", v)], None).unwrap()).unwrap();
    assert_fails(&run(&good, "1", &wide, &out, &[]), &out, "hidden size");
    // Input without hidden_states.
    let bytes = 1.0f32.to_le_bytes();
    let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &bytes).unwrap();
    let no_hidden = tmp.path().join("no_hidden.safetensors");
    std::fs::write(&no_hidden, safetensors::serialize(vec![("x", v)], None).unwrap()).unwrap();
    assert_fails(&run(&good, "1", &no_hidden, &out, &[]), &out, "hidden_states");
    // Backend not available here, unknown backend, unknown dtype.
    assert_fails(&run(&good, "1", &io, &out, &["--backend", "cann"]), &out, "cann");
    assert_fails(&run(&good, "1", &io, &out, &["--backend", "cuda"]), &out, "cuda");
    assert_fails(
        &run(&good, "1", &io, &out, &["--backend", "tpu"]),
        &out,
        "unknown backend",
    );
    assert_fails(&run(&good, "1", &io, &out, &["--dtype", "f64"]), &out, "unknown dtype");
    // Unwritable output paths, refused before the model is read (this one has none), and named
    // as given.
    let bad_out = tmp.path().join("no/such/dir/out.safetensors");
    let o = run(&tmp.path().join("nope"), "1", &io, &bad_out, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--output") && err.contains("cannot write there"),
        "{err}"
    );
    assert!(
        err.contains("no/such/dir/out.safetensors") && !err.contains(".tmp-"),
        "{err}"
    );
    let o = run(&tmp.path().join("nope"), "1", &io, tmp.path(), &[]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("is a folder"));

    // Missing tensor: rewrite model.safetensors without one expert's up_proj.
    let model = dir.join("model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let dropped = "model.layers.1.mlp.experts.3.up_proj.weight";
    let kept: Vec<_> = st.tensors().into_iter().filter(|(n, _)| n != dropped).collect();
    std::fs::write(&model, safetensors::serialize(kept, None).unwrap()).unwrap();
    assert_fails(&run(&dir, "1", &io, &out, &[]), &out, dropped);
    // Truncated file.
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    assert_fails(&run(&dir, "1", &io, &out, &[]), &out, "truncated");
    // Wrong tensor shape: the config says a larger hidden size.
    std::fs::write(&model, &bytes).unwrap();
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v["hidden_size"] = serde_json::json!(v["hidden_size"].as_u64().unwrap() + 1);
    std::fs::write(dir.join("config.json"), v.to_string()).unwrap();
    assert_fails(&run(&dir, "1", &io, &out, &[]), &out, "model.layers.1.mlp.gate.weight");
    // An expert size no memory holds: the first expert's shape is refused before the layer is
    // sized by it (that allocation once aborted the process).
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v["moe_intermediate_size"] = serde_json::json!(1_000_000_000_000u64);
    std::fs::write(dir.join("config.json"), v.to_string()).unwrap();
    assert_fails(
        &run(&dir, "1", &io, &out, &[]),
        &out,
        "model.layers.1.mlp.experts.0.gate_proj.weight",
    );
    // An index whose weight_map is empty (read only where model.safetensors is absent, as
    // transformers does).
    std::fs::write(dir.join("config.json"), &cfg).unwrap();
    std::fs::remove_file(&model).unwrap();
    std::fs::write(dir.join("model.safetensors.index.json"), r#"{"weight_map":{}}"#).unwrap();
    assert_fails(&run(&dir, "1", &io, &out, &[]), &out, "empty");
    // A shard outside the model folder.
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        r#"{"weight_map":{"model.layers.1.mlp.gate.weight":"/etc/hostname"}}"#,
    )
    .unwrap();
    assert_fails(&run(&dir, "1", &io, &out, &[]), &out, "inside the model folder");
}

#[test]
fn info_and_verify() {
    let o = bin().args(["info"]).output().unwrap();
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && s.contains("cpu") && s.contains("available   : yes"),
        "{s}"
    );
    let o = bin().args(["info", "--backend", "cann"]).output().unwrap();
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && s.contains("aclnnMoeGatingTopK"), "{s}");
    let o = bin().args(["verify", "--backend", "cpu", "--quick"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let o = bin().args(["verify", "--backend", "cuda"]).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("cuda"));
    // An unavailable backend is said to be so once, by the caller, with the backend's reason.
    let o = bin().args(["info", "--backend", "cuda"]).output().unwrap();
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("available   : no") && !s.contains("is unavailable"), "{s}");
    // A mistyped WGPU_BACKEND is named as such, not "no adapter".
    let o = bin()
        .args(["info", "--backend", "wgpu"])
        .env("WGPU_BACKEND", "vulcan")
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("WGPU_BACKEND=\"vulcan\" names no graphics API"), "{s}");
    let o = bin().args(["verify", "--backend", "tpu"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("cann or all"), "{err}");
    // The CANN slot starts where its libraries are (then its calls fail cleanly) and says why
    // not elsewhere; either way verify names it, never "unknown backend".
    let o = bin().args(["verify", "--backend", "cann", "--quick"]).output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let all = format!("{out}{err}");
    assert!(
        !o.status.success() && all.contains("cann") && !all.contains("unknown"),
        "{all}"
    );
    if err.contains("unavailable") {
        assert!(
            out.is_empty(),
            "nothing but the reason when the backend cannot start: {out}"
        );
    }
}

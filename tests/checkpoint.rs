//! Model folders as transformers writes them, and as they go wrong: which file wins, shard names
//! in the index, inputs read without loading whole files, and config.json values of the wrong type.

use moe_hal::checkpoint::{load_layer, read_tensor_f32};
use moe_hal::{DType, MoeConfig};
use safetensors::tensor::TensorView;
use safetensors::Dtype as St;
use std::path::Path;

/// A small Qwen3-MoE layer 0's tensors (H 8, I 4, E 4), in f32: (name, shape, values).
fn qwen3_tensors() -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let p = "model.layers.0.mlp.";
    let mut v = vec![(format!("{p}gate.weight"), vec![4, 8])];
    for e in 0..4 {
        v.push((format!("{p}experts.{e}.gate_proj.weight"), vec![4, 8]));
        v.push((format!("{p}experts.{e}.up_proj.weight"), vec![4, 8]));
        v.push((format!("{p}experts.{e}.down_proj.weight"), vec![8, 4]));
    }
    v.into_iter()
        .map(|(n, s)| {
            let len = s.iter().product::<usize>();
            (n, s, (0..len).map(|i| (i % 13) as f32 / 20.0 - 0.3).collect())
        })
        .collect()
}

const QWEN3: &str = r#"{"model_type":"qwen3_moe","hidden_size":8,"num_hidden_layers":2,"num_experts_per_tok":2,
    "num_experts":4,"moe_intermediate_size":4,"norm_topk_prob":true}"#;

fn write_st(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| (n.clone(), TensorView::new(St::F32, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// A model folder with config.json, `model.safetensors` where `single`, and an index naming
/// `shard` for every tensor where `shard` is given (the gate's entry named `gate_shard`).
fn folder(single: bool, index: Option<(&str, &str)>) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("config.json"), QWEN3).unwrap();
    if single {
        write_st(&d.path().join("model.safetensors"), &qwen3_tensors());
    }
    if let Some((shard, gate_shard)) = index {
        let mut map = serde_json::Map::new();
        for (n, _, _) in qwen3_tensors() {
            let file = if n.ends_with("gate.weight") { gate_shard } else { shard };
            map.insert(n, serde_json::json!(file));
        }
        let text = serde_json::json!({ "weight_map": map }).to_string();
        std::fs::write(d.path().join("model.safetensors.index.json"), text).unwrap();
    }
    d
}

fn load_err(dir: &Path) -> String {
    load_layer(dir, 0, DType::F32)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
}

/// transformers looks for `model.safetensors` first: saving a sharded model unsharded leaves the
/// old index beside the new file (its shards gone), and the folder still loads.
#[test]
fn the_single_file_wins_over_a_stale_index() {
    let d = folder(
        true,
        Some(("model-00001-of-00002.safetensors", "model-00001-of-00002.safetensors")),
    );
    let w = load_layer(d.path(), 0, DType::F32).unwrap();
    assert_eq!(w.router_weight, qwen3_tensors()[0].2);
}

#[test]
fn a_sharded_folder_loads_through_its_index() {
    let d = folder(false, Some(("shard-1.safetensors", "shard-1.safetensors")));
    write_st(&d.path().join("shard-1.safetensors"), &qwen3_tensors());
    let w = load_layer(d.path(), 0, DType::F32).unwrap();
    assert_eq!(w.router_weight, qwen3_tensors()[0].2);
}

/// An empty shard name has no components, so "every component is a plain name" held and the
/// folder itself was mapped ("cannot map ...: No such device").
#[test]
fn shard_names_must_name_files_in_the_folder() {
    for bad in ["", ".", "..", "../x.safetensors", "/etc/passwd", "a/../b.safetensors"] {
        let d = folder(false, Some(("shard-1.safetensors", bad)));
        write_st(&d.path().join("shard-1.safetensors"), &qwen3_tensors());
        let msg = load_err(d.path());
        assert!(
            msg.contains("expected the name of a file inside the model folder"),
            "{bad:?}: {msg}"
        );
    }
    // A name that is a folder inside it.
    let d = folder(false, Some(("shard-1.safetensors", "sub")));
    write_st(&d.path().join("shard-1.safetensors"), &qwen3_tensors());
    std::fs::create_dir(d.path().join("sub")).unwrap();
    let msg = load_err(d.path());
    assert!(msg.contains("is not a file; expected a safetensors file"), "{msg}");
    // An empty file.
    let d = folder(false, Some(("shard-1.safetensors", "empty.safetensors")));
    write_st(&d.path().join("shard-1.safetensors"), &qwen3_tensors());
    std::fs::write(d.path().join("empty.safetensors"), b"").unwrap();
    let msg = load_err(d.path());
    assert!(msg.contains("is empty; expected a safetensors file"), "{msg}");
}

fn peak_rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let l = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    l.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// `moe-bench run --input` reads one tensor of a file that may hold many (an activation dump):
/// the file is mapped, so only that tensor's pages are read. It was read whole (1 GiB of RAM for
/// a 64-byte tensor beside a 1 GiB one; the file here is sparse and takes no disk).
#[test]
fn one_tensor_is_read_without_the_rest_of_its_file() {
    if !Path::new("/proc/self/status").exists() {
        eprintln!("SKIPPED: no /proc/self/status to read the peak resident memory from");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("in.safetensors");
    let other: u64 = 1 << 30;
    let header = format!(
        r#"{{"hidden_states":{{"dtype":"F32","shape":[2,8],"data_offsets":[0,64]}},"other":{{"dtype":"U8","shape":[{other}],"data_offsets":[64,{}]}}}}"#,
        64 + other
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend((0..16).flat_map(|i| (i as f32).to_le_bytes()));
    std::fs::write(&path, &bytes).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(bytes.len() as u64 + other)
        .unwrap();
    let before = peak_rss_kib();
    let (shape, v) = read_tensor_f32(&path, "hidden_states").unwrap();
    let grew = peak_rss_kib() - before;
    assert_eq!((shape, v), (vec![2, 8], (0..16).map(|i| i as f32).collect::<Vec<_>>()));
    assert!(
        grew < 64 * 1024,
        "peak resident memory grew by {} MiB to read 64 bytes",
        grew / 1024
    );
}

const DEEPSEEK: &str = r#""model_type":"deepseek_v3","hidden_size":8,"num_hidden_layers":4,"moe_intermediate_size":4"#;

/// Every other key of the wrong type is refused; `scoring_func` was read as "sigmoid".
#[test]
fn scoring_func_of_another_type_is_refused() {
    for v in [r#"["softmax"]"#, "7", "true", r#""softmax""#] {
        let text = format!(
            r#"{{{DEEPSEEK},"num_experts_per_tok":2,"n_routed_experts":8,"n_group":2,"topk_group":1,"scoring_func":{v}}}"#
        );
        let msg = MoeConfig::from_json_str(&text)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("expected \"sigmoid\" for DeepSeek-V3"), "{v}: {msg}");
    }
    let text = format!(
        r#"{{{DEEPSEEK},"num_experts_per_tok":2,"n_routed_experts":8,"n_group":2,"topk_group":1,"scoring_func":"sigmoid"}}"#
    );
    MoeConfig::from_json_str(&text).unwrap();
}

/// The note on transformers' group defaults comes where the defaults are what fails, not on
/// every router error of a config without group keys.
#[test]
fn group_defaults_are_named_only_where_they_fail() {
    // top_k 20 of 16 experts: wrong with or without groups.
    let text = format!(r#"{{{DEEPSEEK},"num_experts_per_tok":20,"n_routed_experts":16}}"#);
    let msg = MoeConfig::from_json_str(&text).unwrap_err().to_string();
    assert!(msg.contains("top_k = 20") && !msg.contains("n_group"), "{msg}");
    // 12 experts do not split into the default 8 groups.
    let text = format!(r#"{{{DEEPSEEK},"num_experts_per_tok":2,"n_routed_experts":12}}"#);
    let msg = MoeConfig::from_json_str(&text).unwrap_err().to_string();
    assert!(msg.contains("defaults, 8 and 4"), "{msg}");
}

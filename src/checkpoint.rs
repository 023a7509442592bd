//! Reading one MoE layer out of a Hugging Face model folder.
//!
//! `config.json` plus `model.safetensors` or, where that file is absent (transformers' order), a
//! sharded `model.safetensors.index.json` with its shards. Files are memory-mapped
//! and only the requested layer's tensors are read; every other tensor is
//! ignored. Stored f32/bf16/f16 are converted to the compute dtype.

use crate::{checked_product, DType, HostVec, LayerWeights, ModelFamily, MoeConfig, MoeError, Result, SharedWeights};
use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

fn ck(msg: impl Into<String>) -> MoeError {
    MoeError::Checkpoint(msg.into())
}

/// A model folder: its MoE config and where each tensor lives.
pub struct Checkpoint {
    dir: PathBuf,
    pub config: MoeConfig,
    /// Tensor name to file name (relative to `dir`).
    weight_map: HashMap<String, String>,
    maps: BTreeMap<String, Mmap>,
}

impl Checkpoint {
    /// Reads `config.json` and finds `model.safetensors`, else reads the index.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let cfg_path = dir.join("config.json");
        let text =
            std::fs::read_to_string(&cfg_path).map_err(|e| ck(format!("cannot read {}: {e}", cfg_path.display())))?;
        let config = MoeConfig::from_json_str(&text)?;
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let mut weight_map = HashMap::new();
        // transformers' order: the single file first, the index only where it is absent (saving
        // a sharded model unsharded leaves the old index beside the new file).
        if !single.exists() && index.exists() {
            let text =
                std::fs::read_to_string(&index).map_err(|e| ck(format!("cannot read {}: {e}", index.display())))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ck(format!("{} is not valid JSON: {e}", index.display())))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ck(format!("{} has no \"weight_map\" object", index.display())))?;
            if map.is_empty() {
                return Err(ck(format!("{} has an empty \"weight_map\"", index.display())));
            }
            for (name, file) in map {
                let file = file
                    .as_str()
                    .ok_or_else(|| ck(format!("{}: weight_map[{name:?}] is not a file name", index.display())))?;
                // Shards live in the model folder: no absolute path or way out of it.
                let path = Path::new(file);
                let inside = path.file_name().is_some()
                    && path.components().all(|c| matches!(c, std::path::Component::Normal(_)));
                if !inside {
                    return Err(ck(format!(
                        "{}: weight_map[{name:?}] = {file:?}; expected the name of a file inside the model folder",
                        index.display()
                    )));
                }
                weight_map.insert(name.clone(), file.to_string());
            }
        } else if !single.exists() {
            return Err(ck(format!(
                "no model.safetensors or model.safetensors.index.json in {}",
                dir.display()
            )));
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            config,
            weight_map,
            maps: BTreeMap::new(),
        })
    }

    fn file_of(&self, name: &str) -> Result<String> {
        if self.weight_map.is_empty() {
            return Ok("model.safetensors".into());
        }
        self.weight_map
            .get(name)
            .cloned()
            .ok_or_else(|| ck(format!("missing tensor {name} (not in model.safetensors.index.json)")))
    }

    fn mapped(&mut self, file: &str) -> Result<&Mmap> {
        if !self.maps.contains_key(file) {
            let path = self.dir.join(file);
            let m = map_file(&path)?;
            parse(&m, &path)?;
            self.maps.insert(file.to_string(), m);
        }
        Ok(&self.maps[file])
    }

    /// Reads tensor `name` as f32, checking its shape.
    pub fn tensor_f32(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let file = self.file_of(name)?;
        let path = self.dir.join(&file);
        let m = self.mapped(&file)?;
        let st = SafeTensors::deserialize(m).map_err(|e| ck(format!("{}: {e}", path.display())))?;
        let t = st
            .tensor(name)
            .map_err(|_| ck(format!("missing tensor {name} in {}", path.display())))?;
        if t.shape() != shape {
            return Err(MoeError::shape(
                format!("tensor {name}"),
                format!("{:?}", t.shape()),
                format!("{shape:?}"),
            ));
        }
        widen(t.dtype(), t.data()).ok_or_else(|| {
            ck(format!(
                "tensor {name} is stored as {:?}; expected F32, BF16 or F16 (dequantize FP8 checkpoints first)",
                t.dtype()
            ))
        })
    }

    /// One MoE layer's weights in `dtype` (router and shared gate stay f32).
    pub fn load_layer(&mut self, layer: usize, dtype: DType) -> Result<LayerWeights> {
        if !dtype.is_float() {
            return Err(MoeError::DType {
                what: "compute dtype".into(),
                got: dtype,
                expected: "f32, bf16 or f16".into(),
            });
        }
        self.config.check_moe_layer(layer)?;
        let c = self.config.clone();
        let (e, h, i) = (c.router.num_experts, c.hidden_size, c.intermediate_size);
        let p = format!("model.layers.{layer}.");
        let (router_name, expert) = match c.family {
            ModelFamily::Mixtral => (
                format!("{p}block_sparse_moe.gate.weight"),
                [
                    format!("{p}block_sparse_moe.experts.{{e}}.w1.weight"),
                    format!("{p}block_sparse_moe.experts.{{e}}.w3.weight"),
                    format!("{p}block_sparse_moe.experts.{{e}}.w2.weight"),
                ],
            ),
            _ => (
                format!("{p}mlp.gate.weight"),
                [
                    format!("{p}mlp.experts.{{e}}.gate_proj.weight"),
                    format!("{p}mlp.experts.{{e}}.up_proj.weight"),
                    format!("{p}mlp.experts.{{e}}.down_proj.weight"),
                ],
            ),
        };
        let router_weight = self.tensor_f32(&router_name, &[e, h])?;
        let mut spec = c.router.clone();
        if c.has_correction_bias {
            spec.correction_bias = Some(self.tensor_f32(&format!("{p}mlp.gate.e_score_correction_bias"), &[e])?);
        }
        // Each expert's tensors go straight into the compute dtype, so that the layer is never
        // held in f32 as well; the room for all of them is taken once the first expert's shapes
        // have been checked, since a config's sizes alone may be absurd.
        let (mut gate_up, mut down) = (empty(dtype), empty(dtype));
        for ex in 0..e {
            let name = |k: usize| expert[k].replace("{e}", &ex.to_string());
            let (g, u, d) = (
                self.tensor_f32(&name(0), &[i, h])?,
                self.tensor_f32(&name(1), &[i, h])?,
                self.tensor_f32(&name(2), &[h, i])?,
            );
            if ex == 0 {
                reserve(&mut gate_up, checked_product("E * 2I * H", &[e, 2, i, h])?)?;
                reserve(&mut down, checked_product("E * H * I", &[e, h, i])?)?;
            }
            extend(&mut gate_up, &g);
            extend(&mut gate_up, &u);
            extend(&mut down, &d);
        }
        let shared = match c.shared {
            None => None,
            Some(s) => {
                let base = match c.family {
                    ModelFamily::Qwen2Moe => format!("{p}mlp.shared_expert."),
                    _ => format!("{p}mlp.shared_experts."),
                };
                let si = s.intermediate_size;
                let mut gu = self.tensor_f32(&format!("{base}gate_proj.weight"), &[si, h])?;
                gu.extend(self.tensor_f32(&format!("{base}up_proj.weight"), &[si, h])?);
                let dn = self.tensor_f32(&format!("{base}down_proj.weight"), &[h, si])?;
                let gate = if s.gated {
                    Some(self.tensor_f32(&format!("{p}mlp.shared_expert_gate.weight"), &[1, h])?)
                } else {
                    None
                };
                Some(SharedWeights {
                    intermediate_size: si,
                    gate_up: to_dtype(&gu, dtype),
                    down: to_dtype(&dn, dtype),
                    gate,
                })
            }
        };
        let w = LayerWeights {
            router: spec,
            hidden_size: h,
            intermediate_size: i,
            router_weight,
            gate_up,
            down,
            shared,
        };
        w.validate()?;
        Ok(w)
    }
}

/// Little-endian f32/bf16/f16 bytes widened to f32; `None` for other dtypes.
fn widen(dtype: StDtype, d: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        StDtype::F32 => d
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        StDtype::BF16 => d
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        StDtype::F16 => d
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

fn to_dtype(v: &[f32], dtype: DType) -> HostVec {
    HostVec::from_f32(v, dtype).expect("float dtype checked by the caller")
}

/// An empty buffer of float `dtype`.
fn empty(dtype: DType) -> HostVec {
    to_dtype(&[], dtype)
}

/// `v` appended to `dst`, rounded as [`HostVec::from_f32`] rounds.
fn extend(dst: &mut HostVec, v: &[f32]) {
    match dst {
        HostVec::F32(d) => d.extend_from_slice(v),
        HostVec::BF16(d) => d.extend(v.iter().map(|&x| half::bf16::from_f32(x))),
        HostVec::F16(d) => d.extend(v.iter().map(|&x| half::f16::from_f32(x))),
        HostVec::U32(_) => unreachable!("float dtype checked by the caller"),
    }
}

/// Room for `n` more values in `dst`, or an error where the memory cannot be had.
fn reserve(dst: &mut HostVec, n: usize) -> Result<()> {
    let r = match dst {
        HostVec::F32(d) => d.try_reserve_exact(n),
        HostVec::BF16(d) => d.try_reserve_exact(n),
        HostVec::F16(d) => d.try_reserve_exact(n),
        HostVec::U32(d) => d.try_reserve_exact(n),
    };
    r.map_err(|e| ck(format!("cannot hold the layer's {n} expert weights in memory: {e}")))
}

/// Convenience: open `dir` and load layer `layer` in `dtype`.
pub fn load_layer(dir: &Path, layer: usize, dtype: DType) -> Result<LayerWeights> {
    Checkpoint::open(dir)?.load_layer(layer, dtype)
}

/// A tensor file mapped into memory: only the pages of the tensors read are loaded.
fn map_file(path: &Path) -> Result<Mmap> {
    let f = File::open(path).map_err(|e| ck(format!("cannot open {}: {e}", path.display())))?;
    let meta = f
        .metadata()
        .map_err(|e| ck(format!("cannot read {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(ck(format!(
            "{} is not a file; expected a safetensors file",
            path.display()
        )));
    }
    if meta.len() == 0 {
        return Err(ck(format!("{} is empty; expected a safetensors file", path.display())));
    }
    // SAFETY: the map is read-only and its owner keeps it no longer than it needs the bytes; as
    // with every memory-mapped checkpoint reader, the file must not be truncated while mapped.
    unsafe { Mmap::map(&f) }.map_err(|e| ck(format!("cannot map {}: {e}", path.display())))
}

/// The tensors of a file's bytes, or an error naming the file.
fn parse<'a>(bytes: &'a [u8], path: &Path) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| {
        ck(format!(
            "{} is not a valid safetensors file (truncated?): {e}",
            path.display()
        ))
    })
}

/// Tensor `name` of a tensor file as (shape, values widened to f32), from F32, BF16 or F16; the
/// file's other tensors are not read.
pub fn read_tensor_f32(path: &Path, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let bytes = map_file(path)?;
    let st = parse(&bytes, path)?;
    let t = st
        .tensor(name)
        .map_err(|_| ck(format!("{} has no tensor named {name}", path.display())))?;
    let v = widen(t.dtype(), t.data()).ok_or_else(|| {
        ck(format!(
            "{}: tensor {name} is stored as {:?}; expected F32, BF16 or F16",
            path.display(),
            t.dtype()
        ))
    })?;
    Ok((t.shape().to_vec(), v))
}

/// Tensors by name, each as (shape, values widened to f32).
pub type TensorsF32 = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Reads a tensor file into name -> (shape, f32 values); used for inputs and fixtures.
pub fn read_tensors_f32(path: &Path) -> Result<TensorsF32> {
    let bytes = map_file(path)?;
    let st = parse(&bytes, path)?;
    let mut out = BTreeMap::new();
    for (name, t) in st.tensors() {
        let d = t.data();
        let v: Vec<f32> = match t.dtype() {
            StDtype::I64 => d
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32)
                .collect(),
            StDtype::I32 => d
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as f32)
                .collect(),
            dt => widen(dt, d).ok_or_else(|| {
                ck(format!(
                    "{}: tensor {name} has unsupported dtype {dt:?}",
                    path.display()
                ))
            })?,
        };
        out.insert(name, (t.shape().to_vec(), v));
    }
    Ok(out)
}

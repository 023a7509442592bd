//! Reading the MoE part of a Hugging Face `config.json`.
//!
//! A key that `config.json` leaves out takes the default of transformers' config class for the
//! family (`DeepseekV3Config`, `Qwen2MoeConfig`, ...), as loading the model there would: DeepSeek-V3
//! `n_group` 8, `topk_group` 4, `routed_scaling_factor` 2.5, `n_shared_experts` 1,
//! `first_k_dense_replace` 3, `norm_topk_prob` true; Qwen2-MoE `shared_expert_intermediate_size`
//! 5632. Sizes that define the experts (`hidden_size`, expert counts, intermediate sizes) have no
//! default here: their absence is an error.

use crate::error::{MoeError, Result};
use crate::spec::{Renorm, RouterSpec};
use serde_json::Value;

/// Model families whose routing moe-hal reproduces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFamily {
    /// DeepSeek-V3 and Kimi-K2 (`model_type` `deepseek_v3` / `kimi_k2`).
    DeepseekV3,
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
}

/// Shared expert of a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedExpertConfig {
    /// Intermediate size of the shared MLP.
    pub intermediate_size: usize,
    /// Qwen2-MoE multiplies the shared output by `sigmoid(x · w_sg)`.
    pub gated: bool,
}

/// The MoE shape of a model, from its `config.json`.
///
/// The router spec's correction bias is left empty here: its values live in
/// the checkpoint, not the config.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    pub family: ModelFamily,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub router: RouterSpec,
    /// DeepSeek-V3 routers carry `e_score_correction_bias`.
    pub has_correction_bias: bool,
    pub shared: Option<SharedExpertConfig>,
    first_k_dense_replace: usize,
    moe_layer_freq: usize,
    decoder_sparse_step: usize,
    mlp_only_layers: Vec<usize>,
}

fn get_usize(cfg: &Value, key: &str) -> Result<Option<usize>> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|x| Some(x as usize))
            .ok_or_else(|| MoeError::Config(format!("{key} = {v}; expected a non-negative integer"))),
    }
}

/// `key`, or `default` where it is absent; 0 is an error (these are counts and strides).
fn positive(cfg: &Value, key: &str, default: usize) -> Result<usize> {
    match get_usize(cfg, key)?.unwrap_or(default) {
        0 => Err(MoeError::Config(format!("{key} = 0; expected at least 1"))),
        v => Ok(v),
    }
}

fn need_usize(cfg: &Value, keys: &[&str]) -> Result<usize> {
    for k in keys {
        if let Some(v) = get_usize(cfg, k)? {
            return Ok(v);
        }
    }
    Err(MoeError::Config(format!("missing {}", keys.join(" or "))))
}

fn get_bool(cfg: &Value, key: &str, default: bool) -> Result<bool> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(MoeError::Config(format!("{key} = {v}; expected true or false"))),
    }
}

fn get_f32(cfg: &Value, key: &str, default: f32) -> Result<f32> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_f64()
            .map(|x| x as f32)
            .ok_or_else(|| MoeError::Config(format!("{key} = {v}; expected a number"))),
    }
}

impl ModelFamily {
    /// Recognises the family from `model_type`, else from `architectures`.
    pub fn detect(cfg: &Value) -> Result<ModelFamily> {
        let by_type = |t: &str| match t {
            "deepseek_v3" | "kimi_k2" => Some(ModelFamily::DeepseekV3),
            "mixtral" => Some(ModelFamily::Mixtral),
            "qwen2_moe" => Some(ModelFamily::Qwen2Moe),
            "qwen3_moe" => Some(ModelFamily::Qwen3Moe),
            _ => None,
        };
        let by_arch = |a: &str| match a {
            "DeepseekV3ForCausalLM" | "KimiK2ForCausalLM" => Some(ModelFamily::DeepseekV3),
            "MixtralForCausalLM" => Some(ModelFamily::Mixtral),
            "Qwen2MoeForCausalLM" => Some(ModelFamily::Qwen2Moe),
            "Qwen3MoeForCausalLM" => Some(ModelFamily::Qwen3Moe),
            _ => None,
        };
        let model_type = cfg.get("model_type").and_then(Value::as_str);
        if let Some(f) = model_type.and_then(by_type) {
            return Ok(f);
        }
        let archs: Vec<&str> = cfg
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if let Some(f) = archs.iter().find_map(|a| by_arch(a)) {
            return Ok(f);
        }
        Err(MoeError::Config(format!(
            "unsupported model: model_type {:?}, architectures {:?}; expected deepseek_v3, kimi_k2, mixtral, qwen2_moe or qwen3_moe",
            model_type.unwrap_or("(none)"),
            archs
        )))
    }
}

impl MoeConfig {
    /// Parses the text of a `config.json`.
    pub fn from_json_str(text: &str) -> Result<MoeConfig> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| MoeError::Config(format!("config.json is not valid JSON: {e}")))?;
        Self::from_json(&v)
    }

    /// Reads the MoE fields of a parsed `config.json` and validates the router.
    pub fn from_json(cfg: &Value) -> Result<MoeConfig> {
        let family = ModelFamily::detect(cfg)?;
        let hidden_size = need_usize(cfg, &["hidden_size"])?;
        let num_layers = need_usize(cfg, &["num_hidden_layers"])?;
        if num_layers == 0 {
            return Err(MoeError::Config("num_hidden_layers = 0; expected at least 1".into()));
        }
        let top_k = need_usize(cfg, &["num_experts_per_tok"])?;
        let mut c = MoeConfig {
            family,
            hidden_size,
            intermediate_size: 0,
            num_layers,
            router: RouterSpec::softmax_topk(1, 1, false),
            has_correction_bias: false,
            shared: None,
            first_k_dense_replace: 0,
            moe_layer_freq: 1,
            decoder_sparse_step: 1,
            mlp_only_layers: Vec::new(),
        };
        match family {
            ModelFamily::DeepseekV3 => {
                let e = need_usize(cfg, &["n_routed_experts"])?;
                match cfg.get("scoring_func") {
                    None | Some(Value::Null) => {}
                    Some(Value::String(s)) if s == "sigmoid" => {}
                    Some(v) => {
                        return Err(MoeError::Config(format!(
                            "scoring_func = {v}; expected \"sigmoid\" for DeepSeek-V3"
                        )))
                    }
                }
                c.intermediate_size = need_usize(cfg, &["moe_intermediate_size"])?;
                // transformers' DeepseekV3Config defaults (module docs).
                c.router = RouterSpec::deepseek_v3(
                    e,
                    top_k,
                    positive(cfg, "n_group", 8)?,
                    positive(cfg, "topk_group", 4)?,
                    None,
                    get_bool(cfg, "norm_topk_prob", true)?,
                    get_f32(cfg, "routed_scaling_factor", 2.5)?,
                );
                c.has_correction_bias = true;
                let n_shared = get_usize(cfg, "n_shared_experts")?.unwrap_or(1);
                if n_shared > 0 {
                    let si = c.intermediate_size.checked_mul(n_shared).ok_or_else(|| {
                        MoeError::Config(format!(
                            "moe_intermediate_size {} * n_shared_experts {n_shared} does not fit in usize",
                            c.intermediate_size
                        ))
                    })?;
                    c.shared = Some(SharedExpertConfig {
                        intermediate_size: si,
                        gated: false,
                    });
                }
                c.first_k_dense_replace = get_usize(cfg, "first_k_dense_replace")?.unwrap_or(3);
                c.moe_layer_freq = positive(cfg, "moe_layer_freq", 1)?;
            }
            ModelFamily::Mixtral => {
                let e = need_usize(cfg, &["num_local_experts", "num_experts"])?;
                c.intermediate_size = need_usize(cfg, &["intermediate_size"])?;
                c.router = RouterSpec::softmax_topk(e, top_k, true);
            }
            ModelFamily::Qwen2Moe | ModelFamily::Qwen3Moe => {
                // Released Qwen configs say num_experts; transformers 5 writes num_local_experts.
                let e = need_usize(cfg, &["num_experts", "num_local_experts"])?;
                c.intermediate_size = need_usize(cfg, &["moe_intermediate_size"])?;
                c.router = RouterSpec::softmax_topk(e, top_k, get_bool(cfg, "norm_topk_prob", false)?);
                if family == ModelFamily::Qwen2Moe {
                    // transformers' Qwen2MoeConfig default.
                    let si = get_usize(cfg, "shared_expert_intermediate_size")?.unwrap_or(5632);
                    if si > 0 {
                        c.shared = Some(SharedExpertConfig {
                            intermediate_size: si,
                            gated: true,
                        });
                    }
                }
                c.decoder_sparse_step = positive(cfg, "decoder_sparse_step", 1)?;
                c.mlp_only_layers = match cfg.get("mlp_only_layers") {
                    None | Some(Value::Null) => Vec::new(),
                    Some(Value::Array(a)) => a
                        .iter()
                        .map(|x| {
                            x.as_u64().map(|x| x as usize).ok_or_else(|| {
                                MoeError::Config(format!("mlp_only_layers holds {x}; expected integers"))
                            })
                        })
                        .collect::<Result<_>>()?,
                    Some(v) => {
                        return Err(MoeError::Config(format!(
                            "mlp_only_layers = {v}; expected a list of layer indices"
                        )))
                    }
                };
            }
        }
        if hidden_size == 0 || c.intermediate_size == 0 {
            return Err(MoeError::Config(format!(
                "hidden_size = {hidden_size}, intermediate size = {}; expected both > 0",
                c.intermediate_size
            )));
        }
        // The correction bias comes with the checkpoint; the rest of the router validates now.
        c.router.validate().map_err(|e| {
            // Point at transformers' group defaults only where they are what fails: the same
            // router without groups validates.
            let defaulted = cfg.get("n_group").is_none() || cfg.get("topk_group").is_none();
            let ungrouped = RouterSpec {
                grouping: None,
                ..c.router.clone()
            };
            if family == ModelFamily::DeepseekV3 && defaulted && ungrouped.validate().is_ok() {
                MoeError::Config(format!(
                    "{e} (config.json does not set n_group or topk_group, which then take transformers' \
                     defaults, 8 and 4)"
                ))
            } else {
                e
            }
        })?;
        Ok(c)
    }

    /// Ok when layer `layer` is a MoE layer; a clear error when it is dense or out of range.
    pub fn check_moe_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.num_layers {
            return Err(MoeError::Config(format!(
                "layer {layer} is out of range; the model has {} layers (0 ..= {})",
                self.num_layers,
                self.num_layers.saturating_sub(1)
            )));
        }
        let dense_why = match self.family {
            ModelFamily::DeepseekV3 => {
                if layer < self.first_k_dense_replace {
                    Some(format!("first_k_dense_replace = {}", self.first_k_dense_replace))
                } else if !layer.is_multiple_of(self.moe_layer_freq) {
                    Some(format!("moe_layer_freq = {}", self.moe_layer_freq))
                } else {
                    None
                }
            }
            ModelFamily::Mixtral => None,
            ModelFamily::Qwen2Moe | ModelFamily::Qwen3Moe => {
                if self.mlp_only_layers.contains(&layer) {
                    Some("it is listed in mlp_only_layers".to_string())
                } else if !(layer + 1).is_multiple_of(self.decoder_sparse_step) {
                    Some(format!("decoder_sparse_step = {}", self.decoder_sparse_step))
                } else {
                    None
                }
            }
        };
        match dense_why {
            Some(why) => Err(MoeError::Config(format!(
                "layer {layer} is a dense MLP layer in this model ({why}); choose a MoE layer"
            ))),
            None => Ok(()),
        }
    }

    /// True when the routing renormalises (for reporting).
    pub fn renormalizes(&self) -> bool {
        !matches!(self.router.renorm, Renorm::None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{GroupScore, Grouping, Scoring};

    #[test]
    fn deepseek_v3_config() {
        let c = MoeConfig::from_json_str(
            r#"{"model_type":"deepseek_v3","hidden_size":7168,"num_hidden_layers":61,
            "num_experts_per_tok":8,"n_routed_experts":256,"n_group":8,"topk_group":4,
            "moe_intermediate_size":2048,"n_shared_experts":1,"routed_scaling_factor":2.5,
            "norm_topk_prob":true,"scoring_func":"sigmoid","first_k_dense_replace":3,"moe_layer_freq":1}"#,
        )
        .unwrap();
        assert_eq!(c.family, ModelFamily::DeepseekV3);
        assert_eq!(c.router.scoring, Scoring::Sigmoid);
        assert_eq!(
            c.router.grouping,
            Some(Grouping {
                n_group: 8,
                topk_group: 4,
                score: GroupScore::Top2Sum
            })
        );
        assert_eq!(c.router.renorm, Renorm::SumEps(1e-20));
        assert_eq!(c.router.routed_scaling_factor, 2.5);
        assert_eq!(c.shared.unwrap().intermediate_size, 2048);
        assert!(c.check_moe_layer(2).unwrap_err().to_string().contains("dense"));
        c.check_moe_layer(3).unwrap();
        assert!(c.check_moe_layer(61).unwrap_err().to_string().contains("out of range"));
    }

    #[test]
    fn kimi_k2_is_deepseek_without_groups() {
        let c = MoeConfig::from_json_str(
            r#"{"model_type":"kimi_k2","hidden_size":7168,"num_hidden_layers":61,
            "num_experts_per_tok":8,"n_routed_experts":384,"n_group":1,"topk_group":1,
            "moe_intermediate_size":2048,"n_shared_experts":1,"routed_scaling_factor":2.827,"norm_topk_prob":true}"#,
        )
        .unwrap();
        assert_eq!(c.family, ModelFamily::DeepseekV3);
        assert_eq!(c.router.grouping, None);
        assert_eq!(c.router.num_experts, 384);
    }

    #[test]
    fn mixtral_and_qwen_configs() {
        let m = MoeConfig::from_json_str(
            r#"{"architectures":["MixtralForCausalLM"],"hidden_size":4096,"num_hidden_layers":32,
            "num_experts_per_tok":2,"num_local_experts":8,"intermediate_size":14336}"#,
        )
        .unwrap();
        assert_eq!(m.router, RouterSpec::softmax_topk(8, 2, true));
        let q2 = MoeConfig::from_json_str(
            r#"{"model_type":"qwen2_moe","hidden_size":2048,"num_hidden_layers":24,"num_experts_per_tok":4,
            "num_experts":60,"moe_intermediate_size":1408,"shared_expert_intermediate_size":5632,
            "decoder_sparse_step":1,"mlp_only_layers":[0]}"#,
        )
        .unwrap();
        assert_eq!(q2.router.renorm, Renorm::None);
        assert_eq!(
            q2.shared,
            Some(SharedExpertConfig {
                intermediate_size: 5632,
                gated: true
            })
        );
        assert!(q2
            .check_moe_layer(0)
            .unwrap_err()
            .to_string()
            .contains("mlp_only_layers"));
        let q3 = MoeConfig::from_json_str(
            r#"{"model_type":"qwen3_moe","hidden_size":2048,"num_hidden_layers":48,"num_experts_per_tok":8,
            "num_experts":128,"moe_intermediate_size":768,"norm_topk_prob":true,"decoder_sparse_step":2}"#,
        )
        .unwrap();
        assert_eq!(q3.router.renorm, Renorm::Sum);
        assert!(q3.check_moe_layer(0).is_err());
        q3.check_moe_layer(1).unwrap();
    }

    #[test]
    fn bad_configs_are_refused() {
        for (text, needle) in [
            (r#"{"model_type":"llama"}"#, "unsupported model"),
            (
                r#"{"model_type":"mixtral","hidden_size":8}"#,
                "missing num_hidden_layers",
            ),
            (
                r#"{"model_type":"qwen3_moe","hidden_size":8,"num_hidden_layers":1,"num_experts_per_tok":9,"num_experts":8,"moe_intermediate_size":4}"#,
                "top_k = 9",
            ),
            ("not json", "not valid JSON"),
            (
                r#"{"model_type":"qwen3_moe","hidden_size":8,"num_hidden_layers":0,"num_experts_per_tok":2,"num_experts":8,"moe_intermediate_size":4}"#,
                "num_hidden_layers = 0",
            ),
            (
                r#"{"model_type":"qwen3_moe","hidden_size":8,"num_hidden_layers":1,"num_experts_per_tok":2,"num_experts":8,"moe_intermediate_size":4,"decoder_sparse_step":0}"#,
                "decoder_sparse_step = 0",
            ),
            (
                r#"{"model_type":"deepseek_v3","hidden_size":8,"num_hidden_layers":4,"num_experts_per_tok":2,"n_routed_experts":8,"moe_intermediate_size":4,"n_group":0,"topk_group":1}"#,
                "n_group = 0",
            ),
            (
                r#"{"model_type":"deepseek_v3","hidden_size":8,"num_hidden_layers":4,"num_experts_per_tok":2,"n_routed_experts":8,"moe_intermediate_size":4,"n_group":1,"topk_group":1,"moe_layer_freq":0}"#,
                "moe_layer_freq = 0",
            ),
            // More experts than any router takes: refused before anything is sized by it (a
            // stand-in bias of that length once aborted the process).
            (
                r#"{"model_type":"deepseek_v3","hidden_size":8,"num_hidden_layers":4,"num_experts_per_tok":2,"n_routed_experts":1099511627776,"moe_intermediate_size":4,"n_group":1,"topk_group":1}"#,
                "experts",
            ),
            (
                r#"{"model_type":"deepseek_v3","hidden_size":8,"num_hidden_layers":4,"num_experts_per_tok":2,"n_routed_experts":8,"moe_intermediate_size":4294967296,"n_shared_experts":4294967296,"n_group":1,"topk_group":1}"#,
                "does not fit in usize",
            ),
            // 12 experts in transformers' default 8 groups.
            (
                r#"{"model_type":"deepseek_v3","hidden_size":8,"num_hidden_layers":4,"num_experts_per_tok":2,"n_routed_experts":12,"moe_intermediate_size":4}"#,
                "transformers' defaults",
            ),
        ] {
            let msg = MoeConfig::from_json_str(text).unwrap_err().to_string();
            assert!(msg.contains(needle), "{msg:?} should contain {needle:?}");
        }
    }

    /// Keys a config.json leaves out take transformers' defaults, as loading the model there
    /// would (they once fell back to no shared expert, no groups and a scale of 1).
    #[test]
    fn missing_keys_take_transformers_defaults() {
        let d = MoeConfig::from_json_str(
            r#"{"model_type":"deepseek_v3","hidden_size":16,"num_hidden_layers":8,"num_experts_per_tok":4,
            "n_routed_experts":16,"moe_intermediate_size":6}"#,
        )
        .unwrap();
        assert_eq!(d.router.routed_scaling_factor, 2.5);
        assert_eq!(d.router.renorm, Renorm::SumEps(crate::spec::DEEPSEEK_RENORM_EPS));
        let g = d.router.grouping.expect("grouped");
        assert_eq!((g.n_group, g.topk_group), (8, 4));
        assert_eq!(d.shared.map(|s| s.intermediate_size), Some(6));
        assert!(d.check_moe_layer(2).is_err());
        d.check_moe_layer(3).unwrap();
        let q2 = MoeConfig::from_json_str(
            r#"{"model_type":"qwen2_moe","hidden_size":16,"num_hidden_layers":2,"num_experts_per_tok":2,
            "num_experts":4,"moe_intermediate_size":6}"#,
        )
        .unwrap();
        assert_eq!(
            q2.shared,
            Some(SharedExpertConfig {
                intermediate_size: 5632,
                gated: true
            })
        );
    }
}

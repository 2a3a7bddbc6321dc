//! The decoder's hyper-parameters, read from GGUF metadata or a Hugging Face `config.json`,
//! and written back as a `config.json` that Hugging Face tools also read.

use serde::{Deserialize, Serialize};

use super::ModelError;
use super::gguf::GgufFile;

/// Hyper-parameters of a Llama-family decoder (Llama, SmolLM, Qwen2).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// `llama` or `qwen2` (Qwen2 adds biases to the q/k/v projections).
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub num_key_value_heads: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// Longest supported sequence.
    pub max_position_embeddings: usize,
    /// Output projection shares the token embedding.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// q/k/v projections have biases (Qwen2).
    #[serde(default)]
    pub attention_bias: bool,
}

impl LlamaConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Checks the shape relations the decoder relies on.
    pub fn validate(&self, origin: &str) -> Result<(), ModelError> {
        let bad = |m: String| ModelError::Config {
            origin: origin.to_string(),
            message: m,
        };
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_hidden_layers == 0 {
            return Err(bad(
                "vocab, hidden size and layer count must be positive".into()
            ));
        }
        if self.num_attention_heads == 0
            || self.num_key_value_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
            || !self.head_dim().is_multiple_of(2)
        {
            return Err(bad(format!(
                "heads do not divide evenly: hidden {} / {} heads / {} kv heads",
                self.hidden_size, self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if self.max_position_embeddings == 0 {
            return Err(bad("max_position_embeddings must be positive".into()));
        }
        Ok(())
    }

    /// Reads the configuration of a GGUF model (`{arch}.*` metadata keys).
    pub fn from_gguf(gguf: &GgufFile, origin: &str) -> Result<LlamaConfig, ModelError> {
        let cfg_err = |e: super::gguf::GgufError| ModelError::Config {
            origin: origin.to_string(),
            message: e.to_string(),
        };
        let arch = gguf
            .get_str("general.architecture")
            .map_err(cfg_err)?
            .to_string();
        if arch != "llama" && arch != "qwen2" {
            return Err(ModelError::Unsupported {
                origin: origin.to_string(),
                message: format!("architecture `{arch}` (supported: llama, qwen2)"),
            });
        }
        let key = |k: &str| format!("{arch}.{k}");
        let int = |k: &str| gguf.get_u64(&key(k)).map(|v| v as usize).map_err(cfg_err);
        let vocab_size = match gguf.get_u64(&key("vocab_size")) {
            Ok(v) => v as usize,
            Err(_) => gguf
                .get_str_array("tokenizer.ggml.tokens")
                .map_err(cfg_err)?
                .len(),
        };
        let heads = int("attention.head_count")?;
        let config = LlamaConfig {
            model_type: arch.clone(),
            vocab_size,
            hidden_size: int("embedding_length")?,
            intermediate_size: int("feed_forward_length")?,
            num_hidden_layers: int("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: gguf
                .get_u64(&key("attention.head_count_kv"))
                .map(|v| v as usize)
                .unwrap_or(heads),
            rms_norm_eps: gguf
                .get_f32(&key("attention.layer_norm_rms_epsilon"))
                .map_err(cfg_err)? as f64,
            rope_theta: gguf
                .get_f32(&key("rope.freq_base"))
                .map(f64::from)
                .unwrap_or(10_000.0),
            max_position_embeddings: int("context_length")?,
            tie_word_embeddings: gguf.tensor_info("output.weight").is_none(),
            attention_bias: gguf.tensor_info("blk.0.attn_q.bias").is_some(),
        };
        config.validate(origin)?;
        Ok(config)
    }

    /// Parses a Hugging Face `config.json` (Llama / Qwen2 / SmolLM).
    pub fn from_hf_json(text: &str, origin: &str) -> Result<LlamaConfig, ModelError> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ModelError::Config {
                origin: origin.to_string(),
                message: format!("line {} column {}: {e}", e.line(), e.column()),
            })?;
        let model_type = value
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("llama");
        if model_type != "llama" && model_type != "qwen2" {
            return Err(ModelError::Unsupported {
                origin: origin.to_string(),
                message: format!("model_type `{model_type}` (supported: llama, qwen2)"),
            });
        }
        let mut value = value.clone();
        if let Some(obj) = value.as_object_mut() {
            obj.entry("model_type").or_insert_with(|| "llama".into());
            if !obj.contains_key("num_key_value_heads")
                && let Some(h) = obj.get("num_attention_heads").cloned()
            {
                obj.insert("num_key_value_heads".into(), h);
            }
            obj.entry("rope_theta").or_insert_with(|| 10_000.0.into());
            if model_type == "qwen2" {
                obj.entry("attention_bias").or_insert(true.into());
            }
        }
        let config: LlamaConfig =
            serde_json::from_value(value).map_err(|e| ModelError::Config {
                origin: origin.to_string(),
                message: e.to_string(),
            })?;
        config.validate(origin)?;
        Ok(config)
    }

    /// A `config.json` in Hugging Face's layout.
    pub fn to_hf_json(&self) -> String {
        let arch = if self.model_type == "qwen2" {
            "Qwen2ForCausalLM"
        } else {
            "LlamaForCausalLM"
        };
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(obj) = v.as_object_mut() {
            obj.insert("architectures".into(), serde_json::json!([arch]));
            obj.insert("hidden_act".into(), "silu".into());
            obj.insert("torch_dtype".into(), "float32".into());
        }
        serde_json::to_string_pretty(&v).unwrap_or_default()
    }

    /// A tiny configuration for tests.
    pub fn tiny(vocab_size: usize) -> LlamaConfig {
        LlamaConfig {
            model_type: "llama".into(),
            vocab_size,
            hidden_size: 32,
            intermediate_size: 48,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: 256,
            tie_word_embeddings: true,
            attention_bias: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_json_round_trips_and_fills_defaults() {
        let c = LlamaConfig::tiny(100);
        let back = LlamaConfig::from_hf_json(&c.to_hf_json(), "x").expect("parse");
        assert_eq!(back, c);
        let minimal = r#"{"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "rms_norm_eps": 1e-6, "max_position_embeddings": 64}"#;
        let m = LlamaConfig::from_hf_json(minimal, "x").expect("parse");
        assert_eq!((m.num_key_value_heads, m.rope_theta), (2, 10_000.0));
    }

    #[test]
    fn bad_configs_are_named_errors() {
        let e =
            LlamaConfig::from_hf_json("{\"model_type\": \"gpt_neox\"}", "c.json").expect_err("bad");
        assert!(e.to_string().contains("gpt_neox"), "{e}");
        let e = LlamaConfig::from_hf_json("{", "c.json").expect_err("bad");
        assert!(
            e.to_string().contains("c.json") && e.to_string().contains("line 1"),
            "{e}"
        );
        let mut c = LlamaConfig::tiny(10);
        c.num_key_value_heads = 3;
        assert!(c.validate("t").is_err());
    }
}

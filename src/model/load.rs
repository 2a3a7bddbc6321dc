//! Loading models: a GGUF file (weights dequantised to f32, llama.cpp's Q/K row order
//! undone) or a Hugging Face directory (`config.json`, `*.safetensors`, `tokenizer.json`),
//! which is also the layout cairn saves finetuned checkpoints in.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use super::config::LlamaConfig;
use super::gguf::GgufFile;
use super::llama::{KeptWeights, Llama, WeightSource};
use super::quantised::{QuantRows, pack_quantised};
use super::tokenizer::Tokenizer;
use super::{Dtype, ModelError};

/// A model ready to run, with its tokenizer.
pub struct LoadedModel {
    /// The decoder.
    pub model: Llama,
    /// Its tokenizer and chat format.
    pub tokenizer: Tokenizer,
    /// Where it came from.
    pub path: PathBuf,
}

/// Loads a GGUF file or a Hugging Face model directory onto `device`.
pub fn load(path: &Path, device: Device) -> Result<LoadedModel, ModelError> {
    load_as(path, device, Dtype::F32)
}

/// Loads a model with its weight matrices in `dtype` (as [`load`] then `set_dtype`, bit for
/// bit); a GGUF file's matrices are converted one by one as they are read, so a bf16 model
/// never holds all its weights in f32.
pub fn load_as(path: &Path, device: Device, dtype: Dtype) -> Result<LoadedModel, ModelError> {
    if path.is_dir() {
        let mut loaded = load_hf_dir(path, device)?;
        loaded.model.set_dtype(dtype);
        return Ok(loaded);
    }
    if !path.exists() {
        return Err(ModelError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such model file or directory",
            ),
        });
    }
    load_gguf_as(path, device, dtype)
}

/// Makes a loaded inference-only model keep its projection matrices as the GGUF file's
/// quantised blocks ([`super::quantised`]) where the file has them in a type the quantised
/// products read, and packed panels elsewhere; the unpacked matrices are released
/// ([`Llama::keep_only_packed_with`]). The model must have been loaded from that file
/// unchanged: products stay bit for bit what they were. A model directory (no quantised
/// blocks) is only packed.
pub fn keep_quantised(loaded: &mut LoadedModel) -> Result<KeptWeights, ModelError> {
    if loaded.path.is_dir() {
        return loaded.model.keep_only_packed_with(|_| Ok(None));
    }
    let file = GgufFile::open(&loaded.path).map_err(ModelError::Gguf)?;
    let config = loaded.model.config().clone();
    let permuted_qk = config.model_type == "llama";
    let parts = loaded.model.projection_parts();
    loaded.model.keep_only_packed_with(|i| {
        let mut rows = Vec::new();
        let mut cols = None;
        for hf in &parts[i] {
            let Some(name) = gguf_name(hf) else {
                return Ok(None);
            };
            let Some(info) = file.tensor_info(&name) else {
                return Ok(None);
            };
            let [n, k] = info.shape()[..] else {
                return Ok(None);
            };
            if cols.is_some_and(|c| c != k) {
                return Ok(None);
            }
            cols = Some(k);
            let heads = if hf.ends_with("q_proj.weight") {
                Some(config.num_attention_heads)
            } else if hf.ends_with("k_proj.weight") {
                Some(config.num_key_value_heads)
            } else {
                None
            };
            let row_of = heads
                .filter(|_| permuted_qk)
                .map(|h| interleaved_rows(n, h));
            rows.push(QuantRows {
                ggml_type: info.ggml_type,
                bytes: file.tensor_bytes(&name).map_err(ModelError::Gguf)?,
                rows: n,
                row_of,
            });
        }
        let Some(k) = cols else {
            return Ok(None);
        };
        pack_quantised(&rows, k).map_err(|message| ModelError::Weights {
            path: loaded_path(&file),
            message,
        })
    })
}

/// The file a GGUF was opened from, for errors.
fn loaded_path(file: &GgufFile) -> PathBuf {
    PathBuf::from(file.label())
}

/// For `n` rows of `heads` heads in the rotate-half layout, the llama.cpp (interleaved
/// pair) row holding each: row `h·d + a·d/2 + b` of a head of `d` rows is stored at
/// `h·d + 2b + a` (the inverse of [`unpermute_rows`]).
fn interleaved_rows(n: usize, heads: usize) -> Vec<usize> {
    let d = n / heads.max(1);
    (0..n)
        .map(|r| {
            let (h, within) = (r / d, r % d);
            let (a, b) = (within / (d / 2), within % (d / 2));
            h * d + 2 * b + a
        })
        .collect()
}

/// Loads only the tokenizer of a GGUF file or model directory (cheap: no weights).
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer, ModelError> {
    if path.is_dir() {
        return Tokenizer::from_dir(path);
    }
    let file = GgufFile::open(path).map_err(ModelError::Gguf)?;
    Tokenizer::from_gguf(&file, path)
}

/// Loads a GGUF model.
pub fn load_gguf(path: &Path, device: Device) -> Result<LoadedModel, ModelError> {
    load_gguf_as(path, device, Dtype::F32)
}

/// Loads a GGUF model with its weight matrices in `dtype`.
pub fn load_gguf_as(path: &Path, device: Device, dtype: Dtype) -> Result<LoadedModel, ModelError> {
    let file = GgufFile::open(path).map_err(ModelError::Gguf)?;
    let origin = path.display().to_string();
    let config = LlamaConfig::from_gguf(&file, &origin)?;
    let tokenizer = Tokenizer::from_gguf(&file, path)?;
    let mut source = GgufSource {
        file,
        origin,
        permuted_qk: config.model_type == "llama",
        heads: config.num_attention_heads,
        kv_heads: config.num_key_value_heads,
    };
    let model = Llama::from_source_as(config, &mut source, device, dtype)?;
    Ok(LoadedModel {
        model,
        tokenizer,
        path: path.to_path_buf(),
    })
}

/// Loads a Hugging Face style directory (also cairn's checkpoint layout).
pub fn load_hf_dir(dir: &Path, device: Device) -> Result<LoadedModel, ModelError> {
    let tokenizer = Tokenizer::from_dir(dir)?;
    let model = load_hf_weights(dir, device)?;
    Ok(LoadedModel {
        model,
        tokenizer,
        path: dir.to_path_buf(),
    })
}

/// Loads only the decoder of a Hugging Face style directory (`config.json` and
/// `*.safetensors`), e.g. a checkpoint whose tokenizer is known already.
pub fn load_hf_weights(dir: &Path, device: Device) -> Result<Llama, ModelError> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| ModelError::Io {
        path: config_path.clone(),
        source: e,
    })?;
    let config = LlamaConfig::from_hf_json(&text, &config_path.display().to_string())?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ModelError::Io {
            path: dir.to_path_buf(),
            source: e,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::MissingTensor {
            origin: dir.display().to_string(),
            name: "*.safetensors (no weight files in the directory)".into(),
        });
    }
    let mut tensors = HashMap::new();
    for file in &files {
        let named = Tensor::read_safetensors(file).map_err(|e| ModelError::Weights {
            path: file.clone(),
            message: e.to_string(),
        })?;
        tensors.extend(named);
    }
    let mut source = SafetensorsSource {
        tensors,
        origin: dir.display().to_string(),
    };
    Llama::from_source(config, &mut source, device)
}

/// Saves a model and its tokenizer as a Hugging Face directory.
pub fn save_dir(model: &Llama, tokenizer: &Tokenizer, dir: &Path) -> Result<(), ModelError> {
    model.save_dir(dir)?;
    tokenizer.save_dir(dir)
}

struct SafetensorsSource {
    tensors: HashMap<String, Tensor>,
    origin: String,
}

impl WeightSource for SafetensorsSource {
    fn get(&mut self, name: &str) -> Result<Option<Tensor>, ModelError> {
        Ok(self.tensors.remove(name).map(|t| t.to_kind(Kind::Float)))
    }

    fn origin(&self) -> String {
        self.origin.clone()
    }
}

struct GgufSource {
    file: GgufFile,
    origin: String,
    permuted_qk: bool,
    heads: usize,
    kv_heads: usize,
}

/// The GGUF name of a Hugging Face tensor name.
fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let part = match rest {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{part}"))
}

impl WeightSource for GgufSource {
    fn get(&mut self, name: &str) -> Result<Option<Tensor>, ModelError> {
        let Some(gname) = gguf_name(name) else {
            return Ok(None);
        };
        let Some(info) = self.file.tensor_info(&gname) else {
            return Ok(None);
        };
        let shape: Vec<i64> = info.shape().iter().map(|&d| d as i64).collect();
        let data = self.file.dequantize(&gname).map_err(ModelError::Gguf)?;
        let t = Tensor::from_slice(&data).view(shape.as_slice());
        // llama.cpp interleaves each head's rows so RoPE can rotate adjacent pairs; undo it to
        // get the rotate-half layout this decoder (and Hugging Face) uses.
        let heads = if name.ends_with("q_proj.weight") {
            Some(self.heads)
        } else if name.ends_with("k_proj.weight") {
            Some(self.kv_heads)
        } else {
            None
        };
        match heads {
            Some(h) if self.permuted_qk => Ok(Some(unpermute_rows(&t, h as i64))),
            _ => Ok(Some(t)),
        }
    }

    fn origin(&self) -> String {
        self.origin.clone()
    }
}

/// Reorders `[heads·head_dim, in]` rows from llama.cpp's interleaved-pair layout to the
/// rotate-half layout.
pub fn unpermute_rows(t: &Tensor, heads: i64) -> Tensor {
    let size = t.size();
    let (rows, cols) = (size[0], size[1]);
    let hd = rows / heads;
    t.view([heads, hd / 2, 2, cols])
        .transpose(1, 2)
        .reshape([rows, cols])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_map_every_block_tensor() {
        assert_eq!(
            gguf_name("model.layers.12.self_attn.o_proj.weight").as_deref(),
            Some("blk.12.attn_output.weight")
        );
        assert_eq!(
            gguf_name("model.embed_tokens.weight").as_deref(),
            Some("token_embd.weight")
        );
        assert_eq!(gguf_name("model.layers.x"), None);
        assert_eq!(gguf_name("score.weight"), None);
    }

    #[test]
    fn unpermuting_inverts_the_llama_cpp_permutation() {
        // llama.cpp: rows (head, half, i) -> (head, i, half) for a [heads, 2, hd/2, in] view.
        let heads = 3;
        let hd = 4;
        let hf = Tensor::arange(heads * hd * 2, (Kind::Float, Device::Cpu)).view([heads * hd, 2]);
        let permuted = hf
            .view([heads, 2, hd / 2, 2])
            .transpose(1, 2)
            .reshape([heads * hd, 2]);
        let back = unpermute_rows(&permuted, heads);
        assert!(back.equal(&hf));
    }
}

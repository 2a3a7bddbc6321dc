//! The model runtime on tch: loading GGUF and Hugging Face models, the Llama-family
//! decoder with a KV cache, batched seeded generation and scoring, and the model worker
//! thread that serves dataflow operators.
//!
//! - [`gguf`]: GGUF reader and dequantisation.
//! - [`config`], [`tokenizer`], [`load`](mod@load): configurations, tokenizers and chat format, loading.
//! - [`llama`]: the decoder and its KV cache; [`fused`]: its fused CPU inference kernels;
//!   [`quantised`]: weight matrices kept as their file's quantised blocks.
//! - [`sampling`], [`generate`]: seeded sampling, batched generation and scoring;
//!   [`decoder`]: a generation that requests join between steps (continuous batching).
//! - [`crate::worker`]: the thread that owns the models and batches requests.

pub mod config;
pub mod decoder;
pub mod fused;
pub mod generate;
pub mod gguf;
pub mod llama;
pub mod load;
pub mod quantised;
pub mod sampling;
pub mod tokenizer;

use std::path::PathBuf;

use tch::Device;

pub use config::LlamaConfig;
pub use generate::{ChoiceRequest, Finish, GenerateRequest, Generation, ScoreRequest, Scored};
pub use llama::{KvCache, Llama};
pub use load::{LoadedModel, load};
pub use sampling::SamplingParams;
pub use tokenizer::{ChatFormat, Message, Role, Tokenizer};

/// Errors of the model runtime.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A GGUF file is malformed or unsupported.
    #[error(transparent)]
    Gguf(#[from] gguf::GgufError),
    /// A configuration is missing values or inconsistent.
    #[error("{origin}: {message}")]
    Config {
        /// The file.
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// An architecture or feature this runtime does not implement.
    #[error("{origin}: unsupported {message}")]
    Unsupported {
        /// The file.
        origin: String,
        /// What is unsupported.
        message: String,
    },
    /// The tokenizer is missing or malformed.
    #[error("{path}: tokenizer: {message}")]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A weight is missing.
    #[error("{origin}: missing tensor `{name}`")]
    MissingTensor {
        /// The model.
        origin: String,
        /// The tensor.
        name: String,
    },
    /// A weight has the wrong shape.
    #[error("{origin}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    Shape {
        /// The model.
        origin: String,
        /// The tensor.
        name: String,
        /// The shape the configuration implies.
        expected: Vec<i64>,
        /// The shape found.
        found: Vec<i64>,
    },
    /// Weight files could not be read.
    #[error("{path}: {message}")]
    Weights {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A libtorch call failed.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// A sequence does not fit the model's context.
    #[error(
        "sequence of {needed} tokens (prompt + new tokens) exceeds the model's context of {limit}"
    )]
    Context {
        /// Tokens needed.
        needed: usize,
        /// The limit.
        limit: usize,
    },
    /// A request is malformed.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A device string is malformed or names a missing device.
    #[error("device: {0}")]
    Device(String),
    /// The model worker has stopped.
    #[error("the model worker has stopped")]
    WorkerGone,
    /// A libtorch call panicked inside the worker (it keeps serving other requests).
    #[error("model call failed: {0}")]
    Panicked(String),
}

pub use crate::dtype::Dtype;

impl Dtype {
    /// The tch kind the weight matrices are stored in.
    pub fn kind(self) -> tch::Kind {
        match self {
            Dtype::F32 => tch::Kind::Float,
            Dtype::Bf16 => tch::Kind::BFloat16,
        }
    }
}

/// Parses `auto`, `cpu`, `cuda` or `cuda:N`. `auto` picks the first CUDA device when
/// libtorch has CUDA and a GPU is present, else the CPU.
///
/// ```
/// use cairn::model::parse_device;
/// assert_eq!(parse_device("cpu").ok(), Some(tch::Device::Cpu));
/// assert!(parse_device("tpu").is_err());
/// ```
pub fn parse_device(text: &str) -> Result<Device, ModelError> {
    let cuda_count = || {
        if tch::Cuda::is_available() {
            tch::Cuda::device_count() as usize
        } else {
            0
        }
    };
    match text {
        "auto" => Ok(if cuda_count() > 0 {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }),
        "cpu" => Ok(Device::Cpu),
        other => {
            let index = match other {
                "cuda" => Some(0),
                _ => other
                    .strip_prefix("cuda:")
                    .and_then(|n| n.parse::<usize>().ok()),
            };
            let Some(index) = index else {
                return Err(ModelError::Device(format!(
                    "`{other}`: expected auto, cpu, cuda or cuda:N"
                )));
            };
            let count = cuda_count();
            if index >= count {
                return Err(ModelError::Device(format!(
                    "`{other}`: this machine has {count} CUDA device(s) visible to libtorch"
                )));
            }
            Ok(Device::Cuda(index))
        }
    }
}

//! The number format a model computes in, as a spec names it (`dtype = "bf16"`). Plain data
//! with no tensor library behind it, so the spec layer can parse and check it; the model
//! runtime maps it onto tensor kinds (`Dtype::kind`, in `model`).

/// The number format of a model's weight matrices.
///
/// `F32` is exact and trainable. `Bf16` stores the projection and embedding matrices as
/// bfloat16 and runs the matmuls in bfloat16 (inputs rounded, f32 accumulation), while norms,
/// rotary embeddings, attention arithmetic, the residual stream and the log-probabilities stay
/// f32: half the bytes to read per step, and on CPUs with AVX512-BF16 (or any CUDA GPU) about
/// twice the matmul throughput. On the CPU the KV cache of a bf16 model is f16 (see
/// `Llama::new_cache`), and the packed product kernels return f32 logits. Outputs differ from
/// f32 by bfloat16 rounding (about 3 significant digits in a logit), so a bf16 model is for
/// inference only: training one is refused.
///
/// ```
/// use cairn::dtype::Dtype;
/// assert_eq!("bf16".parse::<Dtype>().ok(), Some(Dtype::Bf16));
/// assert_eq!(Dtype::F32.to_string(), "f32");
/// assert!("fp8".parse::<Dtype>().is_err());
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// 32-bit floats everywhere (the default).
    #[default]
    F32,
    /// bfloat16 weight matrices and matmuls, f32 elsewhere.
    Bf16,
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
        })
    }
}

impl std::str::FromStr for Dtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Dtype, String> {
        match s {
            "f32" | "float32" => Ok(Dtype::F32),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            other => Err(format!("unknown dtype `{other}` (expected f32 or bf16)")),
        }
    }
}

/// What a spec's `dtype` or a command's `--dtype` names: a number format, and whether an
/// inference-only model keeps its GGUF file's quantised blocks instead of dequantised
/// matrices (`quantised`, computing in bf16; `quantised-f32`, computing in f32). A quantised
/// model gives the same results, bit for bit, as the same format without it; it holds the
/// projection matrices in about the file's size, and cannot be trained.
///
/// ```
/// use cairn::dtype::{Dtype, WeightFormat};
/// let q: WeightFormat = "quantised".parse().unwrap();
/// assert_eq!((q.dtype, q.quantised), (Dtype::Bf16, true));
/// assert_eq!("bf16".parse::<WeightFormat>().unwrap().quantised, false);
/// assert_eq!(q.to_string(), "quantised");
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct WeightFormat {
    /// The number format products compute in.
    pub dtype: Dtype,
    /// Keep the file's quantised blocks (inference-only models).
    pub quantised: bool,
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.quantised, self.dtype) {
            (false, d) => write!(f, "{d}"),
            (true, Dtype::Bf16) => f.write_str("quantised"),
            (true, Dtype::F32) => f.write_str("quantised-f32"),
        }
    }
}

impl std::str::FromStr for WeightFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<WeightFormat, String> {
        let quantised = |dtype| WeightFormat {
            dtype,
            quantised: true,
        };
        match s {
            "quantised" | "quantized" | "q" => Ok(quantised(Dtype::Bf16)),
            "quantised-f32" | "quantized-f32" => Ok(quantised(Dtype::F32)),
            other => other
                .parse()
                .map(|dtype| WeightFormat {
                    dtype,
                    quantised: false,
                })
                .map_err(|_| {
                    format!(
                        "unknown dtype `{other}` (expected f32, bf16, quantised or quantised-f32)"
                    )
                }),
        }
    }
}

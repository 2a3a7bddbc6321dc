//! The Llama-family decoder in tch (Llama / SmolLM / Qwen2): RMSNorm, rotary position
//! embeddings (rotate-half form), grouped-query attention, SwiGLU, tied embeddings, and an
//! optional scalar head for reward and value models.
//!
//! Weights live in a `VarStore` (so the same model trains), with the q/k/v and gate/up
//! projections fused into one matrix each: a decode step then runs two large matmuls per
//! block instead of five. The KV cache ([`KvCache`]) lives outside the weights; one row per
//! sequence, left-padded, so sequences of different lengths share a batch.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tch::{Device, Kind, Tensor, nn};

use super::config::LlamaConfig;
use super::quantised::QuantMatrix;
use super::{Dtype, ModelError};

struct Block {
    attn_norm: Tensor,
    /// `[(heads + 2·kv_heads)·head_dim, hidden]`.
    wqkv: Tensor,
    bqkv: Option<Tensor>,
    wo: Tensor,
    ffn_norm: Tensor,
    /// `[2·ffn, hidden]`: gate rows first, then up rows.
    w_gate_up: Tensor,
    w_down: Tensor,
}

/// A weight matrix packed for [`super::fused::linear_packed`], and what it was packed from:
/// the source's version counter (bumped by in-place updates) and storage address.
struct PackedWeight {
    source: (i64, usize),
    panels: Panels,
    /// Output rows of the matrix (kept here so the products need not read the source,
    /// which an inference-only model releases).
    rows: i64,
}

/// What a packed product reads: panels in the model's number format, or the file's quantised
/// blocks (an inference-only model loaded with `Llama::keep_only_packed_with`).
enum Panels {
    Dense(Tensor),
    Quantised(Arc<QuantMatrix>),
}

impl Panels {
    fn shallow_clone(&self) -> Panels {
        match self {
            Panels::Dense(t) => Panels::Dense(t.shallow_clone()),
            Panels::Quantised(q) => Panels::Quantised(Arc::clone(q)),
        }
    }
}

/// The keys and values of a shared prompt prefix, with what they were computed from.
struct CachedPrefix {
    tokens: Vec<u32>,
    weights: Vec<(i64, usize)>,
    cache: KvCache,
}

/// Shared prefixes kept per model: the few-shot openings of the stages that call it
/// (critique, revision, judge, filter) at once.
const PREFIXES_KEPT: usize = 8;

/// A loaded decoder.
pub struct Llama {
    config: LlamaConfig,
    vs: nn::VarStore,
    embed: Tensor,
    lm_head: Option<Tensor>,
    blocks: Vec<Block>,
    norm: Tensor,
    score_head: Option<Tensor>,
    rope_cos: Tensor,
    /// Sines with the first half of each row negated (see `apply_rope`).
    rope_sin: Tensor,
    dtype: Dtype,
    /// Whether inference on the CPU uses the fused kernels of [`super::fused`].
    fused: bool,
    /// Compute a prompt batch's common prefix once and share its keys and values.
    share_prefix: bool,
    /// The most sequences a generation call decodes at once (`None`: all of them); the
    /// rest wait and start as running ones finish (see [`Llama::decode_rows`]).
    decode_rows: Option<usize>,
    /// Shared prefixes computed by earlier calls, most recent first, each with the weights
    /// it was computed from (see [`Llama::cached_prefix`]).
    prefixes: Mutex<Vec<CachedPrefix>>,
    /// Prefix tokens served from `prefixes` instead of computed, over the model's life.
    prefix_tokens_reused: std::sync::atomic::AtomicU64,
    /// Prompt tokens run through the model by prefills (padding and served prefixes not
    /// counted).
    prompt_tokens_prefilled: std::sync::atomic::AtomicU64,
    /// Wall time spent in those prefills (shared prefixes included), in nanoseconds: what a
    /// benchmark subtracts from a call's time to see its decode steps alone.
    prefill_nanos: std::sync::atomic::AtomicU64,
    /// Decode steps run, the rows they advanced (one new token each), and their wall time
    /// in nanoseconds: how full the batches were, and the decode rate, over the model's life.
    decode_steps: std::sync::atomic::AtomicU64,
    decode_rows_advanced: std::sync::atomic::AtomicU64,
    decode_nanos: std::sync::atomic::AtomicU64,
    /// Inference on the CPU: each weight matrix repacked, in its format, into the column
    /// panels of [`super::fused::linear_packed`], by the address of the matrix's tensor
    /// handle (a field of this struct), with the version counter and storage it was packed
    /// from, so an optimizer step or a reload repacks it (see `packed_weight`).
    packed: Mutex<HashMap<usize, PackedWeight>>,
    /// The projection matrices were released after packing ([`Llama::keep_only_packed`]):
    /// the packed copies are the weights, and nothing may train, save or copy them.
    packed_only: bool,
}

/// What [`Llama::keep_only_packed_with`] did with the projection matrices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeptWeights {
    /// Matrices kept as quantised panels.
    pub quantised: usize,
    /// Matrices kept as packed panels in the model's number format.
    pub packed: usize,
    /// Bytes of the released matrices.
    pub released: u64,
    /// Bytes the kept forms hold.
    pub held: u64,
}

/// Keys and values of past positions, per layer: `[batch, kv_heads, capacity, head_dim]`,
/// in f32, or f16 for bf16 models on the CPU ([`Llama::new_cache`] picks).
pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    /// `[batch, capacity]`: whether each cached column is a real token (not padding).
    valid: Tensor,
    len: i64,
    capacity: i64,
}

impl KvCache {
    /// An empty f32 cache for `batch` sequences of up to `capacity` positions.
    pub fn new(config: &LlamaConfig, batch: i64, capacity: i64, device: Device) -> KvCache {
        KvCache::with_kind(config, batch, capacity, device, Kind::Float)
    }

    /// An empty cache whose keys and values are stored as `kind` (`Float` or `Half`; the
    /// forward passes compute in f32 either way).
    pub fn with_kind(
        config: &LlamaConfig,
        batch: i64,
        capacity: i64,
        device: Device,
        kind: Kind,
    ) -> KvCache {
        let shape = [
            batch,
            config.num_key_value_heads as i64,
            capacity,
            config.head_dim() as i64,
        ];
        let zeros = || Tensor::zeros(shape, (kind, device));
        KvCache {
            k: (0..config.num_hidden_layers).map(|_| zeros()).collect(),
            v: (0..config.num_hidden_layers).map(|_| zeros()).collect(),
            valid: Tensor::zeros([batch, capacity], (Kind::Bool, device)),
            len: 0,
            capacity,
        }
    }

    /// Checks that `t` more positions fit and records which of them are real tokens
    /// (`valid` `[batch, t]`); the forward pass then writes their keys and values.
    fn admit(&mut self, t: i64, valid: &Tensor) -> Result<(), ModelError> {
        if self.len + t > self.capacity {
            return Err(ModelError::Context {
                needed: (self.len + t) as usize,
                limit: self.capacity as usize,
            });
        }
        self.valid.narrow(1, self.len, t).copy_(valid);
        Ok(())
    }

    /// The first `total` cached keys and values of `layer` as f32 (a view of an f32 cache, a
    /// widened copy of an f16 one).
    fn attended(&self, layer: usize, total: i64) -> (Tensor, Tensor) {
        let f32 = |t: &Tensor| {
            let t = t.narrow(2, 0, total);
            if t.kind() == Kind::Float {
                t
            } else {
                t.to_kind(Kind::Float)
            }
        };
        (f32(&self.k[layer]), f32(&self.v[layer]))
    }

    /// The format keys and values are stored in.
    pub fn kind(&self) -> Kind {
        self.k.first().map(|t| t.kind()).unwrap_or(Kind::Float)
    }

    /// Positions filled so far.
    pub fn len(&self) -> i64 {
        self.len
    }

    /// True before the first forward pass.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `rows` copies of this one-row cache's positions, in a new cache with room for
    /// `capacity` positions per row.
    pub(crate) fn broadcast(&self, rows: i64, capacity: i64) -> KvCache {
        let grow = |t: &Tensor| {
            let mut size = t.size();
            size[0] = rows;
            size[2] = capacity;
            let out = Tensor::zeros(size.as_slice(), (t.kind(), t.device()));
            out.narrow(2, 0, self.len)
                .copy_(&t.narrow(2, 0, self.len).expand([rows, -1, -1, -1], false));
            out
        };
        let valid = Tensor::zeros([rows, capacity], (Kind::Bool, self.valid.device()));
        valid
            .narrow(1, 0, self.len)
            .copy_(&self.valid.narrow(1, 0, self.len).expand([rows, -1], false));
        KvCache {
            k: self.k.iter().map(grow).collect(),
            v: self.v.iter().map(grow).collect(),
            valid,
            len: self.len,
            capacity,
        }
    }

    /// How many trailing columns hold every row's tokens: the columns before them are
    /// padding in every row and can be dropped.
    fn used_span(&self) -> Result<i64, ModelError> {
        if self.len == 0 {
            return Ok(0);
        }
        let any = self
            .valid
            .narrow(1, 0, self.len)
            .any_dim(0, false)
            .to_device(Device::Cpu);
        let any = Vec::<bool>::try_from(&any).map_err(ModelError::Torch)?;
        let first = any.iter().position(|&v| v).unwrap_or(any.len());
        Ok(self.len - first as i64)
    }

    /// One cache holding `self`'s rows, then `other`'s, with room for `extra` more
    /// positions. Each side's used columns ([`KvCache::used_span`]) are copied so that
    /// both end at the same column; the columns in front are masked padding. A row's
    /// positions travel with its keys (rotary embedding is applied before caching), so
    /// where its columns sit changes nothing but which columns are masked.
    pub(crate) fn join(&self, other: &KvCache, extra: i64) -> Result<KvCache, ModelError> {
        KvCache::stack(&[self, other], extra)
    }

    /// The rows of `parts`, in order, in one new cache: each part's used columns
    /// ([`KvCache::used_span`]) copied so that all end at the same column, with room for
    /// `extra` more positions; the columns in front are masked padding.
    fn stack(parts: &[&KvCache], extra: i64) -> Result<KvCache, ModelError> {
        let spans = parts
            .iter()
            .map(|c| c.used_span())
            .collect::<Result<Vec<_>, _>>()?;
        let len = spans.iter().copied().max().unwrap_or(0);
        let capacity = len + extra.max(0);
        let rows: i64 = parts.iter().map(|c| c.valid.size()[0]).sum();
        // Part by part into `[rows, .., capacity, ..]` along `dim`, the column dimension.
        let place = |of: &dyn Fn(&KvCache) -> &Tensor, dim: i64| {
            let first = of(parts[0]);
            let mut size = first.size();
            size[0] = rows;
            size[dim as usize] = capacity;
            let out = Tensor::zeros(size.as_slice(), (first.kind(), first.device()));
            let mut row = 0;
            for (part, &span) in parts.iter().zip(&spans) {
                let t = of(part);
                let n = t.size()[0];
                out.narrow(0, row, n)
                    .narrow(dim, len - span, span)
                    .copy_(&t.narrow(dim, part.len - span, span));
                row += n;
            }
            out
        };
        let layers = parts[0].k.len();
        Ok(KvCache {
            k: (0..layers).map(|l| place(&|c| &c.k[l], 2)).collect(),
            v: (0..layers).map(|l| place(&|c| &c.v[l], 2)).collect(),
            valid: place(&|c| &c.valid, 1),
            len,
            capacity,
        })
    }

    /// Keeps only the given rows and only the columns they use, with room for `extra` more
    /// positions: when the row that started first finishes, the columns in front of every
    /// remaining row's tokens are dropped, so attention stops walking them. (Moving a row's
    /// columns changes no result: its positions travel with its keys.)
    pub(crate) fn compact(&self, rows: &Tensor, extra: i64) -> Result<KvCache, ModelError> {
        let kept = KvCache {
            k: self.k.iter().map(|t| t.index_select(0, rows)).collect(),
            v: self.v.iter().map(|t| t.index_select(0, rows)).collect(),
            valid: self.valid.index_select(0, rows),
            len: self.len,
            capacity: self.capacity,
        };
        if kept.used_span()? == kept.len && kept.len + extra <= kept.capacity {
            return Ok(kept);
        }
        KvCache::stack(&[&kept], extra)
    }

    /// Keeps only the given rows (sequences that are still running), so finished
    /// sequences stop costing compute.
    pub fn retain_rows(&mut self, rows: &Tensor) {
        for t in self.k.iter_mut().chain(self.v.iter_mut()) {
            *t = t.index_select(0, rows);
        }
        self.valid = self.valid.index_select(0, rows);
    }
}

/// The projection matrices: every block's four and an untied vocabulary head.
fn projections<'a>(blocks: &'a mut [Block], head: &'a mut Option<Tensor>) -> Vec<&'a mut Tensor> {
    let mut out: Vec<&mut Tensor> = Vec::with_capacity(blocks.len() * 4 + 1);
    for blk in blocks {
        out.extend([
            &mut blk.wqkv,
            &mut blk.wo,
            &mut blk.w_gate_up,
            &mut blk.w_down,
        ]);
    }
    out.extend(head.as_mut());
    out
}

/// HF-style names of the tensors of block `i`, in a fixed order.
fn block_names(i: usize) -> [String; 9] {
    let p = format!("model.layers.{i}");
    [
        format!("{p}.input_layernorm.weight"),
        format!("{p}.self_attn.q_proj.weight"),
        format!("{p}.self_attn.k_proj.weight"),
        format!("{p}.self_attn.v_proj.weight"),
        format!("{p}.self_attn.o_proj.weight"),
        format!("{p}.post_attention_layernorm.weight"),
        format!("{p}.mlp.gate_proj.weight"),
        format!("{p}.mlp.up_proj.weight"),
        format!("{p}.mlp.down_proj.weight"),
    ]
}

/// Supplies weights by Hugging Face name as f32 CPU tensors.
pub trait WeightSource {
    /// The tensor called `name`, or `None` if the source has no such tensor.
    fn get(&mut self, name: &str) -> Result<Option<Tensor>, ModelError>;
    /// Label for error messages.
    fn origin(&self) -> String;
}

impl Llama {
    /// Builds the decoder from a weight source, checking every shape.
    pub fn from_source(
        config: LlamaConfig,
        source: &mut dyn WeightSource,
        device: Device,
    ) -> Result<Llama, ModelError> {
        Llama::from_source_as(config, source, device, Dtype::F32)
    }

    /// Builds the decoder with its weight matrices in `dtype`, converting each matrix as it
    /// is read, so a bf16 model never holds an f32 copy of all its weights at once. The
    /// weights are those of `from_source` followed by [`Llama::set_dtype`], bit for bit.
    pub fn from_source_as(
        config: LlamaConfig,
        source: &mut dyn WeightSource,
        device: Device,
        dtype: Dtype,
    ) -> Result<Llama, ModelError> {
        config.validate(&source.origin())?;
        let c = &config;
        let (h, hd) = (c.hidden_size as i64, c.head_dim() as i64);
        let (nh, nkv, ffn) = (
            c.num_attention_heads as i64,
            c.num_key_value_heads as i64,
            c.intermediate_size as i64,
        );
        let origin = source.origin();
        let mut take = |name: &str, shape: &[i64]| -> Result<Tensor, ModelError> {
            let t = source.get(name)?.ok_or_else(|| ModelError::MissingTensor {
                origin: origin.clone(),
                name: name.to_string(),
            })?;
            if t.size() != shape {
                return Err(ModelError::Shape {
                    origin: origin.clone(),
                    name: name.to_string(),
                    expected: shape.to_vec(),
                    found: t.size(),
                });
            }
            Ok(t.to_kind(Kind::Float))
        };
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        // A weight matrix as a variable in the model's number format (as `set_dtype` would
        // convert it: the same rounding of the same f32 values).
        let matrix = |path: &nn::Path, name: &str, t: &Tensor| {
            let mut v = path.var_copy(name, t);
            if dtype != Dtype::F32 {
                let _guard = tch::no_grad_guard();
                let converted = v.to_kind(dtype.kind());
                v.set_data(&converted);
            }
            v
        };
        let embed = matrix(
            &root,
            "embed",
            &take("model.embed_tokens.weight", &[c.vocab_size as i64, h])?,
        );
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(matrix(
                &root,
                "lm_head",
                &take("lm_head.weight", &[c.vocab_size as i64, h])?,
            ))
        };
        let norm = root.var_copy("norm", &take("model.norm.weight", &[h])?);
        let mut blocks = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let n = block_names(i);
            let p = root.sub("blocks").sub(i.to_string());
            let q = take(&n[1], &[nh * hd, h])?;
            let k = take(&n[2], &[nkv * hd, h])?;
            let v = take(&n[3], &[nkv * hd, h])?;
            let bqkv = if c.attention_bias {
                let pre = format!("model.layers.{i}.self_attn");
                let qb = take(&format!("{pre}.q_proj.bias"), &[nh * hd])?;
                let kb = take(&format!("{pre}.k_proj.bias"), &[nkv * hd])?;
                let vb = take(&format!("{pre}.v_proj.bias"), &[nkv * hd])?;
                Some(p.var_copy("bqkv", &Tensor::cat(&[qb, kb, vb], 0)))
            } else {
                None
            };
            let gate = take(&n[6], &[ffn, h])?;
            let up = take(&n[7], &[ffn, h])?;
            blocks.push(Block {
                attn_norm: p.var_copy("attn_norm", &take(&n[0], &[h])?),
                wqkv: matrix(&p, "wqkv", &Tensor::cat(&[q, k, v], 0)),
                bqkv,
                wo: matrix(&p, "wo", &take(&n[4], &[h, nh * hd])?),
                ffn_norm: p.var_copy("ffn_norm", &take(&n[5], &[h])?),
                w_gate_up: matrix(&p, "w_gate_up", &Tensor::cat(&[gate, up], 0)),
                w_down: matrix(&p, "w_down", &take(&n[8], &[h, ffn])?),
            });
        }
        let score_head = match source.get("score.weight")? {
            Some(t) if t.size() == [1, h] => Some(root.var_copy("score", &t.to_kind(Kind::Float))),
            Some(t) => {
                return Err(ModelError::Shape {
                    origin,
                    name: "score.weight".into(),
                    expected: vec![1, h],
                    found: t.size(),
                });
            }
            None => None,
        };
        let (rope_cos, rope_sin) = rope_tables(c, device);
        Ok(Llama {
            config,
            vs,
            embed,
            lm_head,
            blocks,
            norm,
            score_head,
            rope_cos,
            rope_sin,
            dtype,
            fused: true,
            share_prefix: false,
            decode_rows: None,
            prefixes: Mutex::new(Vec::new()),
            prefix_tokens_reused: std::sync::atomic::AtomicU64::new(0),
            prompt_tokens_prefilled: std::sync::atomic::AtomicU64::new(0),
            prefill_nanos: std::sync::atomic::AtomicU64::new(0),
            decode_steps: std::sync::atomic::AtomicU64::new(0),
            decode_rows_advanced: std::sync::atomic::AtomicU64::new(0),
            decode_nanos: std::sync::atomic::AtomicU64::new(0),
            packed: Mutex::new(HashMap::new()),
            packed_only: false,
        })
    }

    /// The number format of the weight matrices.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// Converts the weight matrices (embedding, projections, untied head) to `dtype`, in
    /// place: the variable store holds the converted tensors, so saving and copying weights
    /// see them too. Norm weights, biases and the scalar head stay f32 (they are tiny and
    /// feed f32 arithmetic).
    pub fn set_dtype(&mut self, dtype: Dtype) {
        if dtype == self.dtype {
            return;
        }
        if self.packed_only {
            tracing::warn!("a packed-only model keeps its number format");
            return;
        }
        let _guard = tch::no_grad_guard();
        let kind = dtype.kind();
        let mut matrices = projections(&mut self.blocks, &mut self.lm_head);
        matrices.push(&mut self.embed);
        for t in matrices {
            // `set_data` swaps the storage of the variable itself, which the var store
            // shares, rather than rebinding this field to a new tensor.
            let converted = t.to_kind(kind);
            t.set_data(&converted);
        }
        // Copies packed in the old format would be repacked on first use anyway; drop them
        // now rather than hold both formats.
        self.packed
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.dtype = dtype;
    }

    /// `x · wᵀ` in the model's number format, returned as f32 (the packed kernels write
    /// their f32 sums directly; no bf16 rounding on the way).
    fn linear(&self, x: &Tensor, w: &Tensor) -> Tensor {
        self.product(x, w, None, Kind::Float, Kind::Float)
    }

    /// `x · wᵀ (+ bias)` as f32, the bias added in f32 (the q/k/v projection).
    fn linear_bias(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Tensor {
        self.product(x, w, bias, Kind::Float, Kind::Float)
    }

    /// `x · wᵀ` in the model's number format, returned in that format (the residual adds
    /// below take a bf16 product into the f32 stream without a separate conversion).
    fn linear_raw(&self, x: &Tensor, w: &Tensor) -> Tensor {
        let kind = self.dtype.kind();
        self.product(x, w, None, kind, kind)
    }

    /// `x · wᵀ (+ bias)` in the model's number format: through the packed kernels where
    /// [`Self::packed_weight`] allows, returned as `packed_out`, else libtorch's product
    /// returned as `fallback_out`. A bias is added in f32.
    fn product(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        packed_out: Kind,
        fallback_out: Kind,
    ) -> Tensor {
        let x = match self.dtype {
            Dtype::F32 => x.shallow_clone(),
            Dtype::Bf16 => x.to_kind(Kind::BFloat16),
        };
        if let Some((panels, n)) = self.packed_weight(w) {
            let x = x.contiguous();
            let y = match &panels {
                Panels::Dense(t) => super::fused::linear_packed(&x, t, n, bias, packed_out),
                Panels::Quantised(q) => super::fused::linear_quant(&x, q, bias, packed_out),
            };
            match y {
                Ok(y) => return y,
                Err(e) => tracing::warn!("packed product failed, using the tensor op: {e}"),
            }
        }
        let y = x.matmul(&w.tr());
        match bias {
            Some(b) => (y.to_kind(Kind::Float) + b).to_kind(fallback_out),
            None => y.to_kind(fallback_out),
        }
    }

    /// `x += y · wᵀ` for the residual stream `x` `[rows, hidden]` (f32, no autograd): the
    /// packed product accumulating into `x` in f32, else one BLAS call accumulating into `x`
    /// (f32 weights) or a bf16 product added in place.
    fn add_linear_(&self, x: &mut Tensor, y: &Tensor, w: &Tensor) {
        if let Some((panels, _)) = self.packed_weight(w).filter(|_| x.is_contiguous()) {
            let y = y.to_kind(self.dtype.kind()).contiguous();
            let done = match &panels {
                Panels::Dense(t) => super::fused::add_linear_packed_(x, &y, t, None),
                Panels::Quantised(q) => super::fused::add_linear_quant_(x, &y, q, None),
            };
            match done {
                Ok(()) => return,
                Err(e) => tracing::warn!("packed product failed, using the tensor op: {e}"),
            }
        }
        match self.dtype {
            Dtype::F32 => {
                let _ = x.addmm_(y, &w.tr());
            }
            Dtype::Bf16 => {
                let _ = x.g_add_(&y.to_kind(Kind::BFloat16).matmul(&w.tr()));
            }
        }
    }

    /// Whether batched generation and choice scoring compute the prompts' common prefix
    /// once and copy its keys and values into every row (off by default: results then
    /// agree with the unshared path within floating-point rounding, not bit for bit).
    pub fn shares_prefix(&self) -> bool {
        self.share_prefix
    }

    /// Turns prefix sharing on or off (see [`Llama::shares_prefix`]).
    pub fn set_share_prefix(&mut self, on: bool) {
        self.share_prefix = on;
    }

    /// The most sequences one generation call decodes at once, or `None` for all of them.
    /// With a limit, a call given more requests starts the first `rows` and, as each one
    /// finishes, prefills the next waiting request and adds it to the running batch
    /// (continuous batching), so the batch stays full instead of thinning out as short
    /// answers end. Which requests share a step depends only on the requests and the
    /// tokens drawn, so the results are as deterministic as without a limit.
    pub fn decode_rows(&self) -> Option<usize> {
        self.decode_rows
    }

    /// Whether a generated row's results are the same bits whatever rows share its batch:
    /// true on the CPU's fused kernels (products sum over k in one order for any number of
    /// rows; attention sums a row's unmasked columns in column order), so merging calls or
    /// joining a running batch cannot change a record. Elsewhere they agree within rounding.
    pub fn batch_invariant(&self) -> bool {
        self.fused && self.device() == Device::Cpu
    }

    /// Sets [`Llama::decode_rows`] (`Some(0)` is taken as 1).
    pub fn set_decode_rows(&mut self, rows: Option<usize>) {
        self.decode_rows = rows.map(|r| r.max(1));
    }

    /// What the weights are now: every variable's version counter and storage address. Any
    /// in-place update (an optimiser step), `set_data`, a dtype change or a reload changes it.
    fn weights_stamp(&self) -> Vec<(i64, usize)> {
        let mut vars: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars.iter()
            .map(|(_, t)| (t.internal_version(), t.data_ptr() as usize))
            .collect()
    }

    /// The keys and values of `prefix` (one row), computed once per prefix and weights and
    /// served from memory to later calls: the same forward pass over the same tokens gives
    /// the same values, so a call served from memory computes exactly what it would have.
    /// Weights that changed since (a training step) invalidate the entry.
    /// Returns `rows` copies of the prefix in a cache with room for `capacity` positions.
    pub(crate) fn cached_prefix(
        &self,
        prefix: &[u32],
        rows: i64,
        capacity: i64,
    ) -> Result<KvCache, ModelError> {
        let stamp = self.weights_stamp();
        {
            let mut kept = self.prefixes.lock().unwrap_or_else(|e| e.into_inner());
            kept.retain(|e| e.weights == stamp);
            if let Some(i) = kept.iter().position(|e| e.tokens == prefix) {
                let entry = kept.remove(i);
                let cache = entry.cache.broadcast(rows, capacity);
                kept.insert(0, entry);
                let total = self
                    .prefix_tokens_reused
                    .fetch_add(prefix.len() as u64, std::sync::atomic::Ordering::Relaxed)
                    + prefix.len() as u64;
                tracing::debug!(
                    tokens = prefix.len(),
                    total,
                    "shared prefix served from memory"
                );
                return Ok(cache);
            }
        }
        let device = self.device();
        let n = prefix.len() as i64;
        let ids: Vec<i64> = prefix.iter().map(|&t| i64::from(t)).collect();
        let tokens = Tensor::from_slice(&ids).view([1, n]).to_device(device);
        let positions = Tensor::arange(n, (Kind::Int64, device)).view([1, n]);
        let valid = Tensor::ones([1, n], (Kind::Bool, device));
        let mut cache = self.new_cache(1, n);
        // Only the cache matters: the prefix's own outputs predict nothing.
        let _ = self.forward(&tokens, &positions, &valid, Some(&mut cache))?;
        self.count_prefilled(prefix.len());
        let out = cache.broadcast(rows, capacity);
        let mut kept = self.prefixes.lock().unwrap_or_else(|e| e.into_inner());
        kept.insert(
            0,
            CachedPrefix {
                tokens: prefix.to_vec(),
                weights: stamp,
                // Computed with exactly the prefix's capacity, so it is kept as it is.
                cache,
            },
        );
        kept.truncate(PREFIXES_KEPT);
        Ok(out)
    }

    /// Counts prompt tokens a prefill ran through the model.
    pub(crate) fn count_prefilled(&self, tokens: usize) {
        self.prompt_tokens_prefilled
            .fetch_add(tokens as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Prompt tokens run through the model by prefills so far: every row's own tokens, and
    /// a shared prefix once per call unless it was served from memory. Padding is not
    /// counted. (Training and scoring passes outside generation are not prefills.)
    pub fn prompt_tokens_prefilled(&self) -> u64 {
        self.prompt_tokens_prefilled
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Adds the wall time of one prefill.
    pub(crate) fn count_prefill_time(&self, elapsed: std::time::Duration) {
        self.prefill_nanos.fetch_add(
            elapsed.as_nanos().min(u128::from(u64::MAX)) as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Wall time spent in prefills so far, in seconds (generation and multiple-choice
    /// scoring; a shared prefix computed for a call counts in that call's prefill).
    pub fn prefill_seconds(&self) -> f64 {
        self.prefill_nanos
            .load(std::sync::atomic::Ordering::Relaxed) as f64
            / 1e9
    }

    /// Adds one decode step that advanced `rows` sequences in `elapsed`.
    pub(crate) fn count_decode_step(&self, rows: usize, elapsed: std::time::Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        self.decode_steps.fetch_add(1, Relaxed);
        self.decode_rows_advanced.fetch_add(rows as u64, Relaxed);
        self.decode_nanos
            .fetch_add(elapsed.as_nanos().min(u128::from(u64::MAX)) as u64, Relaxed);
    }

    /// Decode steps so far, the rows they advanced in all, and their wall time in
    /// nanoseconds (the forward pass and the logits' summary; drawing tokens excluded).
    pub fn decode_counts(&self) -> (u64, u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.decode_steps.load(Relaxed),
            self.decode_rows_advanced.load(Relaxed),
            self.decode_nanos.load(Relaxed),
        )
    }

    /// Prefix tokens served from memory instead of computed, so far.
    pub fn prefix_tokens_reused(&self) -> u64 {
        self.prefix_tokens_reused
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether CPU inference uses the fused kernels (on by default).
    pub fn fused_kernels(&self) -> bool {
        self.fused
    }

    /// Turns the fused CPU kernels on or off; off runs the plain tensor ops everywhere (the
    /// reference the kernels are tested and benchmarked against). A packed-only model keeps
    /// them on.
    pub fn set_fused_kernels(&mut self, on: bool) {
        if self.packed_only && !on {
            // The plain ops would need the released matrices.
            tracing::warn!("a packed-only model keeps the fused kernels on");
            return;
        }
        self.fused = on;
    }

    /// Whether a forward pass with a cache may take the fused path: CPU, no autograd.
    fn fused_path(&self) -> bool {
        self.fused && self.device() == Device::Cpu && !super::fused::grad_enabled()
    }

    /// An empty KV cache for `batch` sequences of up to `capacity` positions, in the format
    /// this model decodes fastest with: f16 for bf16 weights on the CPU (half the bytes for
    /// the decode-attention kernel to stream; three more mantissa bits than bf16, so a bf16
    /// projection's values between 6·10⁻⁵ and 65504 fit it exactly), f32 otherwise (exact; f32 models stay the
    /// reference). The plain tensor path reads either format, so the fused kernels and the
    /// plain ops see the same cache.
    pub fn new_cache(&self, batch: i64, capacity: i64) -> KvCache {
        let kind = if self.dtype == Dtype::Bf16 && self.device() == Device::Cpu {
            Kind::Half
        } else {
            Kind::Float
        };
        KvCache::with_kind(&self.config, batch, capacity, self.device(), kind)
    }

    /// A randomly initialised model (for tests and benchmarks), reproducible from `seed`.
    pub fn random(config: LlamaConfig, seed: u64, device: Device) -> Result<Llama, ModelError> {
        let mut source = RandomSource::new(&config, seed);
        Llama::from_source(config, &mut source, device)
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The device the weights are on.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// The variables (for optimisers).
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// Mutable access to the variables (freezing, loading).
    pub fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }

    /// Adds a zero-initialised scalar head (reward / value model) if there is none.
    pub fn ensure_score_head(&mut self) {
        if self.score_head.is_none() {
            let h = self.config.hidden_size as i64;
            self.score_head = Some(self.vs.root().zeros("score", &[1, h]));
        }
    }

    /// Whether the model has a scalar head.
    pub fn has_score_head(&self) -> bool {
        self.score_head.is_some()
    }

    // `x = x + …` rather than `+=`: an in-place add would overwrite activations that
    // autograd saved for the backward pass of the norms.
    #[allow(clippy::assign_op_pattern)]
    /// Runs the decoder over `tokens` `[batch, t]` at `positions` `[batch, t]`, where `valid`
    /// `[batch, t]` marks real (non-padding) tokens. With a cache, the new keys/values are
    /// appended to it and attention covers everything cached; without, attention covers only
    /// these tokens (training and scoring). Returns the final-norm hidden states
    /// `[batch, t, hidden]`.
    pub fn forward(
        &self,
        tokens: &Tensor,
        positions: &Tensor,
        valid: &Tensor,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor, ModelError> {
        let c = &self.config;
        let size = tokens.size();
        let (b, t) = (size[0], size[1]);
        let (nh, nkv, hd) = (
            c.num_attention_heads as i64,
            c.num_key_value_heads as i64,
            c.head_dim() as i64,
        );
        let past = cache.as_ref().map(|c| c.len).unwrap_or(0);
        if let Some(cache) = cache.as_deref_mut()
            && self.fused_path()
        {
            return self.forward_fused(tokens, positions, valid, cache);
        }
        if let Some(cache) = cache.as_deref_mut() {
            cache.admit(t, valid)?;
        }
        let total = past + t;
        // Which key columns are real tokens; `additive_mask` adds causality and grouping.
        let key_valid = match cache.as_deref() {
            Some(cache) => cache.valid.narrow(1, 0, total),
            None => valid.shallow_clone(),
        };
        let group = nh / nkv;
        let rows_mask = additive_mask(&key_valid, past, t, group);
        // Rotary tables per (sequence, position), shaped to broadcast over heads of the
        // `[b, t, heads, hd]` layout the projections come out in.
        let cos = self
            .rope_cos
            .index_select(0, &positions.flatten(0, 1))
            .view([b, t, 1, hd]);
        let sin = self
            .rope_sin
            .index_select(0, &positions.flatten(0, 1))
            .view([b, t, 1, hd]);

        let mut x = Tensor::embedding(&self.embed, tokens, -1, false, false).to_kind(Kind::Float);
        for (layer, blk) in self.blocks.iter().enumerate() {
            let hidden = x.rms_norm([c.hidden_size as i64], Some(&blk.attn_norm), c.rms_norm_eps);
            let qkv = self.linear_bias(&hidden, &blk.wqkv, blk.bqkv.as_ref());
            // Queries and keys are adjacent columns: one rotary pass covers both.
            let qk = apply_rope(
                &qkv.narrow(-1, 0, (nh + nkv) * hd)
                    .view([b, t, nh + nkv, hd]),
                &cos,
                &sin,
            );
            let q = qk.narrow(2, 0, nh).transpose(1, 2);
            let k = qk.narrow(2, nh, nkv).transpose(1, 2);
            let v = qkv
                .narrow(-1, (nh + nkv) * hd, nkv * hd)
                .view([b, t, nkv, hd])
                .transpose(1, 2);
            let (keys, values) = match cache.as_deref_mut() {
                Some(cache) => {
                    cache.k[layer].narrow(2, past, t).copy_(&k);
                    cache.v[layer].narrow(2, past, t).copy_(&v);
                    cache.attended(layer, total)
                }
                None => (k, v),
            };
            // Grouped-query attention without copying keys/values per query head: the query
            // heads that share a kv head become extra query rows of that kv head.
            let q_rows = if group > 1 {
                q.reshape([b, nkv, group * t, hd])
            } else {
                q.shallow_clone()
            };
            let attn = if t == 1 {
                // A decode step: a handful of query rows per kv head. Plain batched matmuls
                // beat the fused kernel here, whose per-(sequence, head) tiling costs more
                // than the arithmetic (~2x at batch 32).
                let scores = q_rows
                    .matmul(&keys.transpose(-1, -2))
                    .multiply_scalar(1.0 / (hd as f64).sqrt())
                    + &rows_mask;
                scores.softmax(-1, Kind::Float).matmul(&values)
            } else {
                Tensor::f_scaled_dot_product_attention(
                    &q_rows,
                    &keys,
                    &values,
                    Some(&rows_mask),
                    0.0,
                    false,
                    None::<f64>,
                    false,
                )
                .map_err(ModelError::Torch)?
            }
            .reshape([b, nh, t, hd]);
            let attn = attn.transpose(1, 2).reshape([b, t, nh * hd]);
            x = x + self.linear(&attn, &blk.wo);
            let hidden = x.rms_norm([c.hidden_size as i64], Some(&blk.ffn_norm), c.rms_norm_eps);
            let gate_up = self.linear(&hidden, &blk.w_gate_up);
            let ffn = c.intermediate_size as i64;
            let act = gate_up.narrow(-1, 0, ffn).silu() * gate_up.narrow(-1, ffn, ffn);
            x = x + self.linear(&act, &blk.w_down);
        }
        if let Some(cache) = cache {
            cache.len = total;
        }
        Ok(x.rms_norm([c.hidden_size as i64], Some(&self.norm), c.rms_norm_eps))
    }

    /// [`Llama::forward`] with a cache on the CPU without autograd, through the fused
    /// kernels: rotary embedding and cache append in one pass, decode attention in one pass,
    /// residual adds folded into the projections, SiLU-gated product in one pass. Prefill
    /// (more than one new token) keeps libtorch's fused attention.
    fn forward_fused(
        &self,
        tokens: &Tensor,
        positions: &Tensor,
        valid: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor, ModelError> {
        use super::fused;
        let c = &self.config;
        let size = tokens.size();
        let (b, t) = (size[0], size[1]);
        let (h, nh, nkv, hd) = (
            c.hidden_size as i64,
            c.num_attention_heads as i64,
            c.num_key_value_heads as i64,
            c.head_dim() as i64,
        );
        let past = cache.len;
        cache.admit(t, valid)?;
        let total = past + t;
        let positions = positions.contiguous();
        let scale = 1.0 / (hd as f64).sqrt();
        let mut x = Tensor::embedding(&self.embed, tokens, -1, false, false)
            .to_kind(Kind::Float)
            .reshape([b * t, h]);
        // Activations between the norms, projections and kernels stay in the weights' format;
        // the residual stream is f32.
        let kind = self.dtype.kind();
        for (layer, blk) in self.blocks.iter().enumerate() {
            let hidden = fused::rms_norm(&x, &blk.attn_norm, c.rms_norm_eps, kind)?;
            let mut qkv = self.linear_raw(&hidden, &blk.wqkv);
            if let Some(bias) = &blk.bqkv {
                // In f32, to the product in the weights' format, as the plain path adds it
                // (the fused and plain decodes are held to each other's bf16 roundings).
                qkv = qkv.to_kind(Kind::Float) + bias;
            }
            let q = fused::rope_append(
                &qkv.view([b, t, -1]),
                &positions,
                &self.rope_cos,
                &self.rope_sin,
                &mut cache.k[layer],
                &mut cache.v[layer],
                past,
                (nh, nkv),
            )?;
            // Prefill and decode attend through the same per-query kernel, over the
            // unmasked columns in order, so padding and shared prefixes change no bits.
            let attn = fused::cache_attention(
                &q.contiguous(),
                &cache.k[layer],
                &cache.v[layer],
                &cache.valid,
                past,
                scale,
                kind,
            )?;
            self.add_linear_(&mut x, &attn.reshape([b * t, nh * hd]), &blk.wo);
            let hidden = fused::rms_norm(&x, &blk.ffn_norm, c.rms_norm_eps, kind)?;
            let act = fused::silu_mul(&self.linear_raw(&hidden, &blk.w_gate_up))?;
            self.add_linear_(&mut x, &act, &blk.w_down);
        }
        cache.len = total;
        Ok(x.rms_norm([h], Some(&self.norm), c.rms_norm_eps)
            .view([b, t, h]))
    }

    /// Next-token logits `[.., vocab]` of final hidden states `[.., hidden]` for sampling:
    /// f32 from the packed kernels (whose sums are f32 anyway; bf16 logits near 25 are 0.125
    /// apart, coarse enough to tie the top two tokens), else in the weights' format (a bf16
    /// libtorch product skips a conversion pass when only its summary is needed).
    pub fn logits_raw(&self, hidden: &Tensor) -> Tensor {
        let w = self.vocab_matrix();
        self.product(hidden, w, None, Kind::Float, self.dtype.kind())
    }

    /// Next-token logits `[.., vocab]` of final hidden states `[.., hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        self.linear(hidden, self.vocab_matrix())
    }

    /// The `[vocab, hidden]` matrix of the vocabulary projection (the tied embedding when
    /// the model has no separate head).
    fn vocab_matrix(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// The packed panels of weight matrix `w` (a field of this model) when its products
    /// take [`super::fused::linear_packed`]: inference on the CPU with the fused kernels on,
    /// in either weight format. libtorch sends f32 products to MKL, which on AMD CPUs runs
    /// AVX2 code and repacks the weights on every call; the packed kernels ran the decode
    /// chain of products 2.5–3.3× faster than MKL in f32 here (BENCHMARKS.md, session 7).
    /// The copy costs the matrix's size again and is rebuilt, on first use, whenever the
    /// matrix's version counter (every in-place update, optimizer steps included) or storage
    /// (`set_data`, `set_dtype`, reloads) changes.
    fn packed_weight(&self, w: &Tensor) -> Option<(Panels, i64)> {
        if !self.fused || self.device() != Device::Cpu || super::fused::grad_enabled() {
            return None;
        }
        let mut packed = self.packed.lock().unwrap_or_else(|e| e.into_inner());
        if self.packed_only
            && let Some(entry) = packed.get(&(w.as_ptr() as usize))
        {
            // The source was released; its packed copy cannot be stale (nothing may change
            // the weights of a packed-only model).
            return Some((entry.panels.shallow_clone(), entry.rows));
        }
        let source = (w.internal_version(), w.data_ptr() as usize);
        let entry = packed
            .entry(w.as_ptr() as usize)
            .or_insert_with(|| PackedWeight {
                source: (-1, 0),
                panels: Panels::Dense(Tensor::new()),
                rows: 0,
            });
        if entry.source != source {
            match super::fused::pack_linear(w) {
                Ok(panels) => entry.panels = Panels::Dense(panels),
                Err(e) => {
                    tracing::warn!("cannot pack a weight, using the tensor op: {e}");
                    return None;
                }
            }
            entry.source = source;
            entry.rows = w.size()[0];
        }
        Some((entry.panels.shallow_clone(), entry.rows))
    }

    /// Packs every projection matrix for the CPU kernels now and releases the unpacked
    /// matrices, so an inference-only model holds its weights once instead of twice (the
    /// embedding stays: token lookup reads it). Products are unchanged, bit for bit: they
    /// read the packed copies either way. Afterwards the model can no longer be trained,
    /// saved, copied or converted ([`Llama::is_packed_only`]). Returns the bytes released;
    /// 0 where the packed kernels do not run (another device, or fused kernels off).
    pub fn keep_only_packed(&mut self) -> Result<u64, ModelError> {
        self.keep_only_packed_with(|_| Ok(None))
            .map(|kept| kept.released)
    }

    /// The Hugging Face names of the tensors each projection matrix is made of, in the
    /// order [`Llama::keep_only_packed_with`] asks for them: per block the fused q/k/v
    /// projection (`q_proj`, `k_proj`, `v_proj` rows stacked), `o_proj`, the fused gate/up
    /// projection and `down_proj`; then the untied head (`lm_head.weight`), if any.
    pub fn projection_parts(&self) -> Vec<Vec<String>> {
        let mut out = Vec::with_capacity(self.blocks.len() * 4 + 1);
        for i in 0..self.blocks.len() {
            let p = format!("model.layers.{i}");
            out.push(vec![
                format!("{p}.self_attn.q_proj.weight"),
                format!("{p}.self_attn.k_proj.weight"),
                format!("{p}.self_attn.v_proj.weight"),
            ]);
            out.push(vec![format!("{p}.self_attn.o_proj.weight")]);
            out.push(vec![
                format!("{p}.mlp.gate_proj.weight"),
                format!("{p}.mlp.up_proj.weight"),
            ]);
            out.push(vec![format!("{p}.mlp.down_proj.weight")]);
        }
        if self.lm_head.is_some() {
            out.push(vec!["lm_head.weight".to_owned()]);
        }
        out
    }

    /// [`Llama::keep_only_packed`], with each projection matrix (in the order of
    /// [`Llama::projection_parts`]) kept as the quantised panels `quantised(i)` gives where it
    /// gives some, else packed. A quantised matrix must hold exactly the values of the
    /// matrix it replaces (its dequantisation, which is what a GGUF model was loaded from):
    /// products are then unchanged, bit for bit. A matrix of another shape is an error.
    pub fn keep_only_packed_with(
        &mut self,
        mut quantised: impl FnMut(usize) -> Result<Option<QuantMatrix>, ModelError>,
    ) -> Result<KeptWeights, ModelError> {
        let mut kept = KeptWeights::default();
        if self.packed_only || !self.fused || self.device() != Device::Cpu {
            return Ok(kept);
        }
        let _guard = tch::no_grad_guard();
        let matrices = projections(&mut self.blocks, &mut self.lm_head);
        // One matrix at a time, packed then released, so the model never holds both forms
        // of all its matrices at once. A failure part-way leaves a model that must not be
        // used; the error reaches the caller, which gives up on it.
        let packed = self.packed.get_mut().unwrap_or_else(|e| e.into_inner());
        for (i, t) in matrices.into_iter().enumerate() {
            let handle = t.as_ptr() as usize;
            let source = (t.internal_version(), t.data_ptr() as usize);
            let rows = t.size()[0];
            if let Some(q) = quantised(i)? {
                if [q.rows() as i64, q.cols() as i64] != t.size().as_slice() {
                    return Err(ModelError::InvalidRequest(format!(
                        "quantised projection {i} is [{}, {}], the matrix {:?}",
                        q.rows(),
                        q.cols(),
                        t.size()
                    )));
                }
                kept.quantised += 1;
                kept.held += q.bytes() as u64;
                packed.insert(
                    handle,
                    PackedWeight {
                        source,
                        panels: Panels::Quantised(Arc::new(q)),
                        rows,
                    },
                );
            } else {
                let fresh = packed
                    .get(&handle)
                    .is_some_and(|e| e.source == source && e.rows == rows);
                if !fresh {
                    let panels = super::fused::pack_linear(t).map_err(|e| {
                        ModelError::InvalidRequest(format!("packing a weight: {e}"))
                    })?;
                    packed.insert(
                        handle,
                        PackedWeight {
                            source,
                            panels: Panels::Dense(panels),
                            rows,
                        },
                    );
                }
                kept.packed += 1;
                kept.held += (t.numel() * t.kind().elt_size_in_bytes()) as u64;
            }
            kept.released += (t.numel() * t.kind().elt_size_in_bytes()) as u64;
            // `set_data` empties the variable itself, which the var store shares.
            let empty = Tensor::empty([0], (t.kind(), Device::Cpu));
            t.set_data(&empty);
        }
        self.packed_only = true;
        Ok(kept)
    }

    /// Whether the model keeps only packed projection matrices (inference only).
    pub fn is_packed_only(&self) -> bool {
        self.packed_only
    }

    /// Scalar-head outputs `[..]` of hidden states `[.., hidden]`, if the model has a head.
    pub fn score(&self, hidden: &Tensor) -> Option<Tensor> {
        self.score_head
            .as_ref()
            .map(|w| hidden.matmul(&w.tr()).squeeze_dim(-1))
    }

    /// The weights under Hugging Face names (fused matrices split back), for saving.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let c = &self.config;
        let (nh, nkv, hd, ffn) = (
            c.num_attention_heads as i64,
            c.num_key_value_heads as i64,
            c.head_dim() as i64,
            c.intermediate_size as i64,
        );
        let detach = |t: &Tensor| t.detach().to_device(Device::Cpu).contiguous();
        let mut out = vec![
            ("model.embed_tokens.weight".to_string(), detach(&self.embed)),
            ("model.norm.weight".to_string(), detach(&self.norm)),
        ];
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".into(), detach(head)));
        }
        if let Some(score) = &self.score_head {
            out.push(("score.weight".into(), detach(score)));
        }
        for (i, blk) in self.blocks.iter().enumerate() {
            let n = block_names(i);
            out.push((n[0].clone(), detach(&blk.attn_norm)));
            out.push((n[1].clone(), detach(&blk.wqkv.narrow(0, 0, nh * hd))));
            out.push((n[2].clone(), detach(&blk.wqkv.narrow(0, nh * hd, nkv * hd))));
            out.push((
                n[3].clone(),
                detach(&blk.wqkv.narrow(0, (nh + nkv) * hd, nkv * hd)),
            ));
            out.push((n[4].clone(), detach(&blk.wo)));
            out.push((n[5].clone(), detach(&blk.ffn_norm)));
            out.push((n[6].clone(), detach(&blk.w_gate_up.narrow(0, 0, ffn))));
            out.push((n[7].clone(), detach(&blk.w_gate_up.narrow(0, ffn, ffn))));
            out.push((n[8].clone(), detach(&blk.w_down)));
            if let Some(bias) = &blk.bqkv {
                let pre = format!("model.layers.{i}.self_attn");
                out.push((
                    format!("{pre}.q_proj.bias"),
                    detach(&bias.narrow(0, 0, nh * hd)),
                ));
                out.push((
                    format!("{pre}.k_proj.bias"),
                    detach(&bias.narrow(0, nh * hd, nkv * hd)),
                ));
                out.push((
                    format!("{pre}.v_proj.bias"),
                    detach(&bias.narrow(0, (nh + nkv) * hd, nkv * hd)),
                ));
            }
        }
        out
    }

    /// Writes `config.json` and `model.safetensors` (Hugging Face layout) into `dir`.
    pub fn save_dir(&self, dir: &Path) -> Result<(), ModelError> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::Io {
            path: dir.to_path_buf(),
            source: e,
        })?;
        let config_path = dir.join("config.json");
        std::fs::write(&config_path, self.config.to_hf_json()).map_err(|e| ModelError::Io {
            path: config_path,
            source: e,
        })?;
        let tensors = self.named_tensors();
        let path = dir.join("model.safetensors");
        Tensor::write_safetensors(&tensors, &path).map_err(ModelError::Torch)
    }
}

/// The attention mask `[b, 1, group·t, past + t]` of `t` new queries at positions
/// `past..past + t` over keys whose real (non-padding) columns `key_valid` `[b, past + t]`
/// marks: causal, real keys only, and always the query's own position (so padding rows stay
/// finite and never poison real rows with NaN). Query rows are grouped per kv head (one row
/// per head in the group and position), and the mask is additive (0 / −∞), built once per
/// forward pass rather than converted in every layer.
fn additive_mask(key_valid: &Tensor, past: i64, t: i64, group: i64) -> Tensor {
    let device = key_valid.device();
    let total = past + t;
    let q_pos = Tensor::arange_start(past, total, (Kind::Int64, device)).view([t, 1]);
    let k_pos = Tensor::arange(total, (Kind::Int64, device)).view([1, total]);
    let mask = (k_pos.le_tensor(&q_pos).unsqueeze(0) * key_valid.unsqueeze(1))
        .logical_or(&k_pos.eq_tensor(&q_pos).unsqueeze(0))
        .unsqueeze(1);
    let mask = if group > 1 {
        mask.repeat([1, 1, group, 1])
    } else {
        mask
    };
    Tensor::zeros(mask.size(), (Kind::Float, device))
        .masked_fill(&mask.logical_not(), f64::NEG_INFINITY)
}

fn rope_tables(c: &LlamaConfig, device: Device) -> (Tensor, Tensor) {
    let hd = c.head_dim();
    let half = hd / 2;
    let max = c.max_position_embeddings;
    let mut cos = Vec::with_capacity(max * hd);
    let mut sin = Vec::with_capacity(max * hd);
    for pos in 0..max {
        let mut row_cos = Vec::with_capacity(half);
        let mut row_sin = Vec::with_capacity(half);
        for i in 0..half {
            let inv_freq = c.rope_theta.powf(-(2.0 * i as f64) / hd as f64);
            let angle = pos as f64 * inv_freq;
            row_cos.push(angle.cos() as f32);
            row_sin.push(angle.sin() as f32);
        }
        // Rotate-half layout: the same angle for dimension i and i + half; the sine's first
        // half negated (see `apply_rope`).
        cos.extend_from_slice(&row_cos);
        cos.extend_from_slice(&row_cos);
        sin.extend(row_sin.iter().map(|s| -s));
        sin.extend_from_slice(&row_sin);
    }
    let shape = [max as i64, hd as i64];
    (
        Tensor::from_slice(&cos).view(shape).to_device(device),
        Tensor::from_slice(&sin).view(shape).to_device(device),
    )
}

/// Rotate-half rotary embedding: `x·cos + rotate_half(x)·sin`, where `rotate_half` swaps the
/// halves of the last dimension and negates the new first half. The sign lives in the sine
/// table (its first half is stored negated), so this is one concatenation and two kernels.
fn apply_rope(x: &Tensor, cos: &Tensor, signed_sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let swapped = Tensor::cat(&[x.narrow(-1, half, half), x.narrow(-1, 0, half)], -1);
    (x * cos).addcmul(&swapped, signed_sin)
}

/// Standard deviation of random weights: large enough that tiny test models have peaked
/// next-token distributions (near-ties would make batch-invariance tests flaky).
const RANDOM_STD: f64 = 0.2;

/// Deterministic random weights: normal(0, 0.2) matrices (`RANDOM_STD`), unit norms.
pub struct RandomSource {
    shapes: HashMap<String, Vec<i64>>,
    rng: rand_chacha::ChaCha8Rng,
}

impl RandomSource {
    /// Random weights for `config`, drawn from `seed`.
    pub fn new(config: &LlamaConfig, seed: u64) -> RandomSource {
        use rand::SeedableRng;
        let c = config;
        let (h, hd, nh, nkv, ffn, v) = (
            c.hidden_size as i64,
            c.head_dim() as i64,
            c.num_attention_heads as i64,
            c.num_key_value_heads as i64,
            c.intermediate_size as i64,
            c.vocab_size as i64,
        );
        let mut shapes = HashMap::new();
        shapes.insert("model.embed_tokens.weight".to_string(), vec![v, h]);
        shapes.insert("model.norm.weight".to_string(), vec![h]);
        if !c.tie_word_embeddings {
            shapes.insert("lm_head.weight".to_string(), vec![v, h]);
        }
        for i in 0..c.num_hidden_layers {
            let n = block_names(i);
            let dims = [
                vec![h],
                vec![nh * hd, h],
                vec![nkv * hd, h],
                vec![nkv * hd, h],
                vec![h, nh * hd],
                vec![h],
                vec![ffn, h],
                vec![ffn, h],
                vec![h, ffn],
            ];
            for (name, d) in n.into_iter().zip(dims) {
                shapes.insert(name, d);
            }
            if c.attention_bias {
                let pre = format!("model.layers.{i}.self_attn");
                shapes.insert(format!("{pre}.q_proj.bias"), vec![nh * hd]);
                shapes.insert(format!("{pre}.k_proj.bias"), vec![nkv * hd]);
                shapes.insert(format!("{pre}.v_proj.bias"), vec![nkv * hd]);
            }
        }
        RandomSource {
            shapes,
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed),
        }
    }
}

impl WeightSource for RandomSource {
    fn get(&mut self, name: &str) -> Result<Option<Tensor>, ModelError> {
        use rand::Rng;
        let Some(shape) = self.shapes.get(name) else {
            return Ok(None);
        };
        let n: i64 = shape.iter().product();
        let data: Vec<f32> = if shape.len() == 1 && name.ends_with("norm.weight") {
            vec![1.0; n as usize]
        } else {
            (0..n)
                .map(|_| {
                    // Box–Muller: portable normal draws from the seeded stream.
                    let u1: f64 = self.rng.r#gen::<f64>().max(1e-12);
                    let u2: f64 = self.rng.r#gen::<f64>();
                    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * RANDOM_STD)
                        as f32
                })
                .collect()
        };
        Ok(Some(Tensor::from_slice(&data).view(shape.as_slice())))
    }

    fn origin(&self) -> String {
        "random weights".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn packed_weights_follow_every_weight_update() {
        let mut model = Llama::random(LlamaConfig::tiny(97), 5, Device::Cpu).expect("model");
        let _g = tch::no_grad_guard();
        let hidden = Tensor::randn(
            [3, model.config.hidden_size as i64],
            (Kind::Float, Device::Cpu),
        );
        let direct = |m: &Llama| hidden.matmul(&m.vocab_matrix().tr());
        assert!(
            model.packed_weight(model.vocab_matrix()).is_some(),
            "f32 CPU inference uses packed weights"
        );
        assert!(max_diff(&model.logits(&hidden), &direct(&model)) < 1e-5);
        // An in-place update (what an optimizer step does) bumps the version counter.
        let before = model.logits(&hidden);
        let _ = model.embed.g_add_scalar_(0.25);
        let after = model.logits(&hidden);
        assert!(
            max_diff(&after, &before) > 1e-3,
            "the update reached the logits"
        );
        assert!(max_diff(&after, &model.logits_raw(&hidden)) < 1e-6);
        assert!(max_diff(&after, &direct(&model)) < 1e-5);
        // New storage under the same variable (what `set_dtype` and reloads do).
        let doubled = &model.embed * 2.0;
        model.embed.set_data(&doubled);
        assert!(max_diff(&model.logits(&hidden), &direct(&model)) < 1e-5);
        // One packed copy per matrix, however often it was repacked.
        assert_eq!(model.packed.lock().expect("lock").len(), 1);
        // Autograd and the unfused reference take the tensor ops.
        tch::with_grad(|| assert!(model.packed_weight(&model.embed).is_none()));
        model.set_fused_kernels(false);
        assert!(model.packed_weight(&model.embed).is_none());
        model.set_fused_kernels(true);
        // bf16 weights are packed in their own format, after the f32 copies are dropped.
        model.set_dtype(Dtype::Bf16);
        assert!(model.packed.lock().expect("lock").is_empty());
        let logits = model.logits_raw(&hidden);
        assert_eq!(
            logits.kind(),
            Kind::Float,
            "packed sums are not rounded to bf16"
        );
        let exact = hidden
            .to_kind(Kind::BFloat16)
            .to_kind(Kind::Float)
            .matmul(&model.embed.to_kind(Kind::Float).tr());
        assert!(max_diff(&logits, &exact) < 1e-4);
        let _ = model.embed.g_add_scalar_(0.5);
        let moved = model.logits_raw(&hidden);
        assert!(max_diff(&moved, &logits) > 0.1);
    }

    /// Hidden states of `tokens` through the cached (fused decode) path and the uncached
    /// (scoring) path.
    fn both_paths(model: &Llama, tokens: &[i64]) -> (Tensor, Tensor) {
        let t = tokens.len() as i64;
        let ids = Tensor::from_slice(tokens).view([1, t]);
        let positions = Tensor::arange(t, (Kind::Int64, Device::Cpu)).view([1, t]);
        let valid = Tensor::ones([1, t], (Kind::Bool, Device::Cpu));
        let mut cache = model.new_cache(1, t + 1);
        let cached = model
            .forward(&ids, &positions, &valid, Some(&mut cache))
            .expect("cached forward");
        let plain = model
            .forward(&ids, &positions, &valid, None)
            .expect("plain forward");
        (model.logits(&cached), model.logits(&plain))
    }

    #[test]
    fn a_packed_only_model_computes_the_same_bits_with_its_matrices_released() {
        for dtype in [Dtype::F32, Dtype::Bf16] {
            let mut config = LlamaConfig::tiny(97);
            config.tie_word_embeddings = false;
            let mut model = Llama::random(config, 9, Device::Cpu).expect("model");
            model.set_dtype(dtype);
            let _g = tch::no_grad_guard();
            let tokens = [3i64, 17, 42, 5, 88];
            let (cached, plain) = both_paths(&model, &tokens);
            let bytes = |m: &Llama| -> i64 {
                m.var_store()
                    .variables()
                    .values()
                    .map(|t| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64)
                    .sum()
            };
            let before = bytes(&model);
            let released = model.keep_only_packed().expect("packs");
            assert!(released > 0 && model.is_packed_only());
            assert_eq!(bytes(&model), before - released as i64, "{dtype}");
            let (cached_after, plain_after) = both_paths(&model, &tokens);
            assert!(cached.equal(&cached_after), "{dtype}: cached path changed");
            assert!(plain.equal(&plain_after), "{dtype}: plain path changed");
            // The plain ops would need the released matrices: they stay off limits.
            model.set_fused_kernels(false);
            assert!(model.fused_kernels());
            assert_eq!(model.keep_only_packed().expect("idempotent"), 0);
        }
    }
}

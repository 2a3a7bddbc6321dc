//! Batched generation and scoring over a [`Llama`]: prompts of different lengths share one
//! left-padded batch with a KV cache; finished sequences leave the batch; each sequence
//! samples from its own seeded generator. Scoring returns the log-probabilities of given
//! continuations (and the scalar head's value, when the model has one).

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::ModelError;
use super::llama::Llama;
use super::sampling::{Sampler, SamplingParams};

/// One sequence to continue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// How to sample.
    pub params: SamplingParams,
}

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// An end-of-turn or stop token was produced (it is the last token).
    Stop,
    /// `max_new_tokens` was reached.
    Length,
}

/// A finished sequence.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// New token ids (a final stop token included).
    pub tokens: Vec<u32>,
    /// Each token's log-probability under the raw model distribution.
    pub logprobs: Vec<f32>,
    /// Why it stopped.
    pub finish: Finish,
}

/// A continuation to score.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScoreRequest {
    /// Context token ids (non-empty).
    pub context: Vec<u32>,
    /// Continuation token ids whose log-probabilities are wanted.
    pub continuation: Vec<u32>,
}

/// A context and alternative continuations to compare after it (a multiple-choice question).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChoiceRequest {
    /// Context token ids (non-empty).
    pub context: Vec<u32>,
    /// The alternatives (each non-empty).
    pub choices: Vec<Vec<u32>>,
}

/// Scores of one continuation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    /// `log p(token | everything before)` per continuation token.
    pub logprobs: Vec<f32>,
    /// Their sum.
    pub total: f32,
    /// The scalar head at the last token, if the model has one.
    pub value: Option<f32>,
}

/// Rejects token ids outside the vocabulary and sequences longer than the context.
fn check_tokens(model: &Llama, ids: &[u32], extra: usize, what: &str) -> Result<(), ModelError> {
    let c = model.config();
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= c.vocab_size) {
        return Err(ModelError::InvalidRequest(format!(
            "{what}: token id {bad} is outside the vocabulary of {}",
            c.vocab_size
        )));
    }
    if ids.len() + extra > c.max_position_embeddings {
        return Err(ModelError::Context {
            needed: ids.len() + extra,
            limit: c.max_position_embeddings,
        });
    }
    Ok(())
}

/// Left-pads sequences into `[b, len]` tokens, positions and validity tensors.
pub fn left_pad(seqs: &[&[u32]], device: Device) -> (Tensor, Tensor, Tensor, i64) {
    let len = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut tokens = Vec::with_capacity(seqs.len() * len);
    let mut positions = Vec::with_capacity(seqs.len() * len);
    let mut valid = Vec::with_capacity(seqs.len() * len);
    for s in seqs {
        let pad = len - s.len();
        for i in 0..len {
            let real = i >= pad;
            tokens.push(if real { s[i - pad] as i64 } else { 0 });
            positions.push(if real { (i - pad) as i64 } else { 0 });
            valid.push(real);
        }
    }
    let shape = [seqs.len() as i64, len as i64];
    (
        Tensor::from_slice(&tokens).view(shape).to_device(device),
        Tensor::from_slice(&positions).view(shape).to_device(device),
        Tensor::from_slice(&valid).view(shape).to_device(device),
        len as i64,
    )
}

/// Shared prefixes shorter than this are not worth a separate pass.
const MIN_SHARED_PREFIX: usize = 16;

/// The number of leading tokens every prompt shares, capped so each prompt keeps at least
/// one token of its own (its last position gives the next-token logits).
///
/// ```
/// use cairn::model::generate::common_prefix;
/// assert_eq!(common_prefix(&[&[1, 2, 3, 4], &[1, 2, 5]]), 2);
/// assert_eq!(common_prefix(&[&[1, 2], &[1, 2, 3]]), 1);
/// assert_eq!(common_prefix(&[&[7, 8]]), 1);
/// ```
pub fn common_prefix(prompts: &[&[u32]]) -> usize {
    let Some(first) = prompts.first() else {
        return 0;
    };
    let shortest = prompts.iter().map(|p| p.len()).min().unwrap_or(0);
    let mut n = 0;
    while n < shortest && prompts.iter().all(|p| p[n] == first[n]) {
        n += 1;
    }
    n.min(shortest.saturating_sub(1))
}

/// Runs `prompts` through the model into a new cache with room for `extra` more positions
/// per row; returns the hidden state of each prompt's last token `[b, hidden]`, the cache,
/// and the number of columns used. With prefix sharing on ([`Llama::shares_prefix`]) and a
/// common prefix of at least 16 tokens, the prefix runs once (batch 1), its keys and values
/// are copied into every row, and only each row's own tokens follow — laid out as
/// `[prefix | padding | own tokens]`, the padding masked and positions kept, so attention
/// sees what it would see without sharing.
pub(super) fn prefill(
    model: &Llama,
    prompts: &[&[u32]],
    extra: i64,
    shared: usize,
) -> Result<(Tensor, super::KvCache, i64), ModelError> {
    let started = std::time::Instant::now();
    let out = prefill_untimed(model, prompts, extra, shared);
    model.count_prefill_time(started.elapsed());
    out
}

/// The prefix [`prefill`] shares among `prompts`: their common prefix when the model shares
/// prefixes and there is more than one prompt, else nothing.
pub(super) fn shared_prefix_len(model: &Llama, prompts: &[&[u32]]) -> usize {
    if model.shares_prefix() && prompts.len() > 1 {
        common_prefix(prompts)
    } else {
        0
    }
}

fn prefill_untimed(
    model: &Llama,
    prompts: &[&[u32]],
    extra: i64,
    shared: usize,
) -> Result<(Tensor, super::KvCache, i64), ModelError> {
    let device = model.device();
    if shared < MIN_SHARED_PREFIX {
        let (tokens, positions, valid, len) = left_pad(prompts, device);
        let mut cache = model.new_cache(prompts.len() as i64, len + extra);
        let hidden = model.forward(&tokens, &positions, &valid, Some(&mut cache))?;
        model.count_prefilled(prompts.iter().map(|p| p.len()).sum());
        return Ok((hidden.select(1, len - 1), cache, len));
    }
    let own: Vec<&[u32]> = prompts.iter().map(|p| &p[shared..]).collect();
    let own_len = own.iter().map(|p| p.len()).max().unwrap_or(0) as i64;
    let len = shared as i64 + own_len;
    // The prefix's keys and values, computed once (or served from an earlier call with the
    // same prefix and weights), copied into every row.
    let mut cache =
        model.cached_prefix(&prompts[0][..shared], prompts.len() as i64, len + extra)?;
    let (tokens, positions, valid, _) = left_pad(&own, device);
    let positions = positions + shared as i64;
    let hidden = model.forward(&tokens, &positions, &valid, Some(&mut cache))?;
    model.count_prefilled(own.iter().map(|p| p.len()).sum());
    Ok((hidden.select(1, own_len - 1), cache, len))
}

/// How many prompt tokens a prefill runs through the model for `prompts` (for reports),
/// counting a shared prefix once; a prefix served from an earlier call
/// ([`Llama::prefix_tokens_reused`]) is counted too.
pub fn prefill_tokens(model: &Llama, prompts: &[&[u32]]) -> usize {
    let shared = if model.shares_prefix() && prompts.len() > 1 {
        common_prefix(prompts)
    } else {
        0
    };
    if shared < MIN_SHARED_PREFIX {
        prompts.iter().map(|p| p.len()).sum()
    } else {
        shared + prompts.iter().map(|p| p.len() - shared).sum::<usize>()
    }
}

pub(crate) fn to_vec_f32(t: &Tensor) -> Result<Vec<f32>, ModelError> {
    let flat = t
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous()
        .view([-1]);
    Vec::<f32>::try_from(&flat).map_err(ModelError::Torch)
}

/// One decode step's logits, reduced on the device: the log-normaliser and the argmax of
/// every row come from batched tensor ops; rows are copied to the host only when some
/// sequence samples (greedy sequences need just the argmax and its log-probability).
pub(super) struct StepLogits {
    log_z: Vec<f32>,
    argmax: Vec<i64>,
    max_logit: Vec<f32>,
    rows: Option<Vec<f32>>,
}

impl StepLogits {
    /// The summary of `logits` `[rows, vocab]`, row `i` drawn by `samplers[i]`.
    pub(super) fn new(
        logits: &Tensor,
        samplers: &[&Sampler],
        fused: bool,
    ) -> Result<StepLogits, ModelError> {
        // On the CPU one fused pass per row replaces the log-sum-exp's and the max's kernels,
        // reading bf16 logits as they are.
        let summary = if fused && logits.device() == Device::Cpu {
            Some(super::fused::logits_summary(&logits.contiguous())?)
        } else {
            None
        };
        let (log_z, max_logit, argmax) = if let Some(summary) = summary {
            summary
        } else {
            let logits = logits.to_kind(Kind::Float);
            let (max_logit, argmax) = logits.max_dim(-1, false);
            (
                logits.logsumexp([-1i64].as_slice(), false),
                max_logit,
                argmax,
            )
        };
        let log_z = to_vec_f32(&log_z)?;
        let argmax =
            Vec::<i64>::try_from(&argmax.to_device(Device::Cpu)).map_err(ModelError::Torch)?;
        let max_logit = to_vec_f32(&max_logit)?;
        let sampling = samplers.iter().any(|s| s.params().temperature > 0.0);
        let rows = if sampling {
            // `to_vec_f32` widens bf16 rows on the way to the host.
            Some(to_vec_f32(logits)?)
        } else {
            None
        };
        Ok(StepLogits {
            log_z,
            argmax,
            max_logit,
            rows,
        })
    }

    /// Row `row`'s next token, drawn by `sampler` (greedy: the argmax).
    pub(super) fn draw(
        &self,
        sampler: &mut Sampler,
        row: usize,
        vocab: usize,
    ) -> super::sampling::Draw {
        match &self.rows {
            Some(rows) if sampler.params().temperature > 0.0 => sampler.sample_with_log_z(
                &rows[row * vocab..(row + 1) * vocab],
                self.log_z[row] as f64,
            ),
            _ => super::sampling::Draw {
                token: self.argmax[row] as u32,
                logprob: self.max_logit[row] - self.log_z[row],
            },
        }
    }
}

/// Checks one request: a prompt, valid sampling settings, token ids in the vocabulary, and
/// room in the context for its new tokens (`i` names it in the error).
pub(super) fn check_request(
    model: &Llama,
    r: &GenerateRequest,
    i: usize,
) -> Result<(), ModelError> {
    if r.prompt.is_empty() {
        return Err(ModelError::InvalidRequest(format!(
            "request {i}: empty prompt"
        )));
    }
    r.params
        .validate()
        .map_err(|m| ModelError::InvalidRequest(format!("request {i}: {m}")))?;
    check_tokens(
        model,
        &r.prompt,
        r.params.max_new_tokens,
        &format!("request {i}"),
    )
}

/// Generates a continuation for every request, batched. With a row limit
/// ([`Llama::decode_rows`]) smaller than the number of requests, the first `rows` requests
/// start together and each finished one makes room for the next waiting request
/// ([`super::decoder::Decoder`]).
pub fn generate(
    model: &Llama,
    eos: &[u32],
    requests: &[GenerateRequest],
) -> Result<Vec<Generation>, ModelError> {
    if requests.is_empty() {
        return Ok(Vec::new());
    }
    let mut decoder = super::decoder::Decoder::new(model, eos);
    decoder.add(requests)?;
    let mut out: Vec<Option<Generation>> = vec![None; requests.len()];
    while !decoder.is_idle() {
        for (id, generation) in decoder.step()? {
            out[id] = Some(generation);
        }
    }
    out.into_iter()
        .enumerate()
        .map(|(i, g)| {
            g.ok_or_else(|| ModelError::InvalidRequest(format!("request {i} never finished")))
        })
        .collect()
}

/// The total log-probability of each choice after its context, batched. Each context runs
/// through the model once; its choices then continue from its cached keys and values — for a
/// multiple-choice question, one pass over the long context instead of one per option.
pub fn score_choices(
    model: &Llama,
    requests: &[ChoiceRequest],
) -> Result<Vec<Vec<f32>>, ModelError> {
    if requests.is_empty() {
        return Ok(Vec::new());
    }
    let mut longest = 0;
    for (i, r) in requests.iter().enumerate() {
        if r.context.is_empty() || r.choices.is_empty() || r.choices.iter().any(|c| c.is_empty()) {
            return Err(ModelError::InvalidRequest(format!(
                "choice request {i}: empty context, no choices or an empty choice"
            )));
        }
        let widest = r.choices.iter().map(|c| c.len()).max().unwrap_or(0);
        longest = longest.max(widest);
        check_tokens(model, &r.context, widest, &format!("choice request {i}"))?;
        for c in &r.choices {
            check_tokens(model, c, 0, &format!("choice request {i}"))?;
        }
    }
    let _guard = tch::no_grad_guard();
    let device = model.device();
    let contexts: Vec<&[u32]> = requests.iter().map(|r| r.context.as_slice()).collect();
    let shared = shared_prefix_len(model, &contexts);
    let (last, mut cache, _) = prefill(model, &contexts, longest as i64, shared)?;
    // The first token of every choice is predicted by its context's last position.
    let first = model.logits(&last).log_softmax(-1, Kind::Float);
    // One cache row per (request, choice).
    let mut rows = Vec::new();
    let mut flat: Vec<(usize, &[u32])> = Vec::new();
    for (i, r) in requests.iter().enumerate() {
        for c in &r.choices {
            rows.push(i as i64);
            flat.push((i, c.as_slice()));
        }
    }
    let rows_t = Tensor::from_slice(&rows).to_device(device);
    let first = first.index_select(0, &rows_t);
    let first_ids: Vec<i64> = flat.iter().map(|(_, c)| c[0] as i64).collect();
    let first_lp = to_vec_f32(
        &first
            .gather(
                1,
                &Tensor::from_slice(&first_ids)
                    .to_device(device)
                    .unsqueeze(1),
                false,
            )
            .squeeze_dim(1),
    )?;
    let mut totals: Vec<f32> = first_lp;
    if longest > 1 {
        // The remaining tokens: feed each choice but its last token (right-padded; padding is
        // masked and comes after every real token, so no real token attends to it).
        cache.retain_rows(&rows_t);
        let steps = longest - 1;
        let n = flat.len();
        let mut tok = vec![0i64; n * steps];
        let mut pos = vec![0i64; n * steps];
        let mut ok = vec![false; n * steps];
        for (row, (i, c)) in flat.iter().enumerate() {
            for j in 0..steps {
                let at = row * steps + j;
                pos[at] = (requests[*i].context.len() + j) as i64;
                if j + 1 < c.len() {
                    tok[at] = c[j] as i64;
                    ok[at] = true;
                }
            }
        }
        let shape = [n as i64, steps as i64];
        let hidden = model.forward(
            &Tensor::from_slice(&tok).view(shape).to_device(device),
            &Tensor::from_slice(&pos).view(shape).to_device(device),
            &Tensor::from_slice(&ok).view(shape).to_device(device),
            Some(&mut cache),
        )?;
        let lp = model.logits(&hidden).log_softmax(-1, Kind::Float);
        let mut next = vec![0i64; n * steps];
        for (row, (_, c)) in flat.iter().enumerate() {
            for j in 0..steps {
                if j + 1 < c.len() {
                    next[row * steps + j] = c[j + 1] as i64;
                }
            }
        }
        let picked = to_vec_f32(
            &lp.gather(
                2,
                &Tensor::from_slice(&next)
                    .view(shape)
                    .to_device(device)
                    .unsqueeze(2),
                false,
            )
            .squeeze_dim(2),
        )?;
        for (row, (_, c)) in flat.iter().enumerate() {
            for j in 0..c.len() - 1 {
                totals[row] += picked[row * steps + j];
            }
        }
    }
    let mut out = Vec::with_capacity(requests.len());
    let mut at = 0;
    for r in requests {
        out.push(totals[at..at + r.choices.len()].to_vec());
        at += r.choices.len();
    }
    Ok(out)
}

/// Scores continuations, batched. Without gradients (see [`score_tensors`] for training).
pub fn score(model: &Llama, requests: &[ScoreRequest]) -> Result<Vec<Scored>, ModelError> {
    if requests.is_empty() {
        return Ok(Vec::new());
    }
    let _guard = tch::no_grad_guard();
    let (logprobs, values) = score_tensors(model, requests)?;
    let flat = to_vec_f32(&logprobs)?;
    let values = match values {
        Some(v) => Some(to_vec_f32(&v)?),
        None => None,
    };
    let mut out = Vec::with_capacity(requests.len());
    let mut at = 0;
    for (i, r) in requests.iter().enumerate() {
        let lp = flat[at..at + r.continuation.len()].to_vec();
        at += r.continuation.len();
        out.push(Scored {
            total: lp.iter().sum(),
            logprobs: lp,
            value: values.as_ref().map(|v| v[i]),
        });
    }
    Ok(out)
}

/// The differentiable core of scoring: continuation log-probabilities, concatenated over
/// requests in order (`[Σ continuation lengths]`), and the scalar head at each sequence's
/// last token (`[requests]`) when the model has one.
pub fn score_tensors(
    model: &Llama,
    requests: &[ScoreRequest],
) -> Result<(Tensor, Option<Tensor>), ModelError> {
    for (i, r) in requests.iter().enumerate() {
        if r.context.is_empty() {
            return Err(ModelError::InvalidRequest(format!(
                "score request {i}: empty context"
            )));
        }
        let mut all = r.context.clone();
        all.extend_from_slice(&r.continuation);
        check_tokens(model, &all, 0, &format!("score request {i}"))?;
    }
    let device = model.device();
    let seqs: Vec<Vec<u32>> = requests
        .iter()
        .map(|r| r.context.iter().chain(&r.continuation).copied().collect())
        .collect();
    let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
    let (tokens, positions, valid, len) = left_pad(&refs, device);
    let hidden = model.forward(&tokens, &positions, &valid, None)?;
    let h = model.config().hidden_size as i64;
    // Hidden state at position p predicts token p + 1: gather only the positions needed.
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (b, r) in requests.iter().enumerate() {
        let pad = len - seqs[b].len() as i64;
        for (j, &t) in r.continuation.iter().enumerate() {
            rows.push(b as i64 * len + pad + r.context.len() as i64 - 1 + j as i64);
            targets.push(t as i64);
        }
    }
    let flat = hidden.view([-1, h]);
    let logprobs = if rows.is_empty() {
        Tensor::zeros([0], (Kind::Float, device))
    } else {
        let picked = flat.index_select(0, &Tensor::from_slice(&rows).to_device(device));
        let lp = model.logits(&picked).log_softmax(-1, Kind::Float);
        lp.gather(
            1,
            &Tensor::from_slice(&targets).to_device(device).unsqueeze(1),
            false,
        )
        .squeeze_dim(1)
    };
    let values = model.score(&hidden.select(1, len - 1));
    Ok((logprobs, values))
}

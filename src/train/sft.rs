//! Supervised finetuning: the mean negative log-likelihood of target tokens given their
//! context (the prompt's tokens carry no loss), minimised with AdamW. One optimiser step
//! may span several micro-batches (gradient accumulation), so the effective batch does not
//! have to fit in memory at once.

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::adamw::AdamW;
use super::algorithm::{Algorithm, Measurement, Report};

use crate::model::ModelError;
use crate::model::generate::{ScoreRequest, score_tensors};
use crate::model::llama::Llama;

/// One training example: the context (e.g. a chat-rendered prompt) and the tokens to learn.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SftExample {
    /// Conditioning tokens (no loss).
    pub context: Vec<u32>,
    /// Tokens whose likelihood is maximised.
    pub target: Vec<u32>,
}

/// AdamW settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimConfig {
    /// Learning rate of this step (a schedule is the caller's: it sends each step's rate).
    pub lr: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    pub max_grad_norm: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 1e-5,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
        }
    }
}

/// What one step did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    /// Mean loss per target token.
    pub loss: f64,
    /// Target tokens in the step.
    pub tokens: usize,
    /// Gradient norm before clipping (0 when not computed).
    pub grad_norm: f64,
    /// Steps taken so far by this trainer, this one included.
    pub step: u64,
}

/// An AdamW optimiser over a model's variables.
pub struct Trainer {
    pub(crate) opt: AdamW,
    pub(crate) steps: u64,
}

impl Trainer {
    /// Creates the optimiser for `model`'s trainable variables. A model whose weights are not f32 is refused: bfloat16 weights would silently drop
    /// most small updates.
    pub fn new(model: &Llama, config: &OptimConfig) -> Result<Trainer, ModelError> {
        if model.dtype() != crate::model::Dtype::F32 {
            return Err(ModelError::InvalidRequest(format!(
                "cannot train a model with {} weights; load it with dtype f32",
                model.dtype()
            )));
        }
        let opt = AdamW::new(model.var_store(), config.lr, config.weight_decay);
        Ok(Trainer { opt, steps: 0 })
    }

    /// Starts an optimiser step: this step's learning rate and weight decay, gradients
    /// zeroed. Backpropagate the step's loss(es), then call [`Trainer::finish_step`].
    pub fn begin_step(&mut self, config: &OptimConfig) {
        self.opt.set_lr(config.lr);
        self.opt.set_weight_decay(config.weight_decay);
        self.opt.zero_grad();
    }

    /// Ends an optimiser step: measures the gradient norm (returned, before clipping),
    /// clips it to `config.max_grad_norm` (0: no clipping), updates the weights and counts
    /// the step.
    pub fn finish_step(&mut self, config: &OptimConfig) -> f64 {
        let grad_norm = global_grad_norm(&self.opt.trainable_variables());
        if config.max_grad_norm > 0.0 {
            self.opt.clip_grad_norm(config.max_grad_norm);
        }
        self.opt.step();
        self.steps += 1;
        grad_norm
    }

    /// Optimiser steps taken so far (restored with a training state).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One optimiser step over `examples`, accumulated over micro-batches of `micro_batch`.
    pub fn sft_step(
        &mut self,
        model: &Llama,
        examples: &[SftExample],
        micro_batch: usize,
        config: &OptimConfig,
    ) -> Result<StepStats, ModelError> {
        let tokens: usize = examples.iter().map(|e| e.target.len()).sum();
        if tokens == 0 {
            return Err(ModelError::InvalidRequest(
                "an SFT step needs at least one target token".into(),
            ));
        }
        self.begin_step(config);
        let mut total = 0.0;
        for chunk in examples.chunks(micro_batch.max(1)) {
            let (nll, _) = sum_nll(model, chunk)?;
            total += nll.double_value(&[]);
            // Scale by the whole step's token count so accumulation equals one big batch.
            (nll / tokens as f64).backward();
        }
        let grad_norm = self.finish_step(config);
        Ok(StepStats {
            loss: total / tokens as f64,
            tokens,
            grad_norm,
            step: self.steps,
        })
    }
}

/// Mean loss per target token without training (held-out evaluation).
pub fn sft_eval(
    model: &Llama,
    examples: &[SftExample],
    micro_batch: usize,
) -> Result<(f64, usize), ModelError> {
    let _g = tch::no_grad_guard();
    let mut total = 0.0;
    let mut tokens = 0;
    for chunk in examples.chunks(micro_batch.max(1)) {
        let (nll, n) = sum_nll(model, chunk)?;
        total += nll.double_value(&[]);
        tokens += n;
    }
    if tokens == 0 {
        return Err(ModelError::InvalidRequest(
            "evaluation needs at least one target token".into(),
        ));
    }
    Ok((total / tokens as f64, tokens))
}

/// Held-out loss of an SFT evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SftEvalStats {
    /// Mean loss per target token.
    pub loss: f64,
    /// Target tokens.
    pub tokens: usize,
}

/// One supervised optimiser step (the [`Algorithm`] behind an `sft` stage's steps).
#[derive(Clone, Debug, PartialEq)]
pub struct SftStep {
    /// The step's examples.
    pub examples: Vec<SftExample>,
    /// Examples per forward/backward pass (gradient accumulation).
    pub micro_batch: usize,
    /// Optimiser settings for this step.
    pub optim: OptimConfig,
}

impl Algorithm for SftStep {
    fn kind_name(&self) -> &'static str {
        "sft step"
    }
    fn optimiser(&self) -> &'static str {
        "sft"
    }
    fn optim(&self) -> OptimConfig {
        self.optim.clone()
    }
    fn sequences(&self) -> usize {
        self.examples.len()
    }
    fn step(&self, model: &Llama, trainer: &mut Trainer) -> Result<Report, ModelError> {
        trainer
            .sft_step(model, &self.examples, self.micro_batch, &self.optim)
            .map(Report::new)
    }
    fn stand_in(&self) -> Report {
        Report::new(StepStats {
            loss: 0.0,
            tokens: self.examples.iter().map(|e| e.target.len()).sum(),
            grad_norm: 0.0,
            step: 0,
        })
    }
}

/// Mean loss per target token, without training (an `sft` stage's held-out loss).
#[derive(Clone, Debug, PartialEq)]
pub struct SftEval {
    /// The examples.
    pub examples: Vec<SftExample>,
    /// Examples per forward pass.
    pub micro_batch: usize,
}

impl Measurement for SftEval {
    fn kind_name(&self) -> &'static str {
        "sft eval"
    }
    fn sequences(&self) -> usize {
        self.examples.len()
    }
    fn measure(&self, model: &Llama) -> Result<Report, ModelError> {
        let (loss, tokens) = sft_eval(model, &self.examples, self.micro_batch)?;
        Ok(Report::new(SftEvalStats { loss, tokens }))
    }
    fn stand_in(&self) -> Report {
        Report::new(SftEvalStats {
            loss: 0.0,
            tokens: self.examples.iter().map(|e| e.target.len()).sum(),
        })
    }
}

/// Summed negative log-likelihood of the targets, and their count.
fn sum_nll(model: &Llama, examples: &[SftExample]) -> Result<(Tensor, usize), ModelError> {
    let requests: Vec<ScoreRequest> = examples
        .iter()
        .map(|e| ScoreRequest {
            context: e.context.clone(),
            continuation: e.target.clone(),
        })
        .collect();
    let (logprobs, _) = score_tensors(model, &requests)?;
    let n = logprobs.size()[0] as usize;
    Ok((-logprobs.sum(tch::Kind::Float), n))
}

pub(crate) fn global_grad_norm(vars: &[Tensor]) -> f64 {
    let _g = tch::no_grad_guard();
    vars.iter()
        .map(|v| {
            let g = v.grad();
            if g.defined() {
                g.pow_tensor_scalar(2)
                    .sum(tch::Kind::Double)
                    .double_value(&[])
            } else {
                0.0
            }
        })
        .sum::<f64>()
        .sqrt()
}

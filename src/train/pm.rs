//! The preference model: the decoder with a scalar head, read at the last token of
//! `prompt + response`. For a comparison with soft label `p` = P(A preferred), the loss is the
//! cross-entropy between `p` and σ(r_A − r_B) — Bradley–Terry with a probability target, so
//! an uncertain AI label (0.55) pulls far less than a confident one (0.95).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::algorithm::{Algorithm, Measurement, Report};
use super::sft::{OptimConfig, Trainer};
use crate::model::ModelError;
use crate::model::generate::{left_pad, to_vec_f32};
use crate::model::llama::Llama;

/// One labelled comparison: the two full token sequences (prompt and response) and the
/// probability that `a` is preferred.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PmExample {
    /// Prompt and first response.
    pub a: Vec<u32>,
    /// Prompt and second response.
    pub b: Vec<u32>,
    /// P(`a` preferred), in [0, 1].
    pub p_a: f32,
}

/// What one preference-model step did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PmStats {
    /// Mean loss per comparison.
    pub loss: f64,
    /// Share of comparisons ranked the way their label leans (before the step).
    pub accuracy: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Steps taken so far by this trainer.
    pub step: u64,
}

/// Held-out quality of the preference model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PmEvalStats {
    /// Mean loss per comparison.
    pub loss: f64,
    /// Share ranked the way their label leans (labels of exactly 0.5 are left out).
    pub accuracy: f64,
    /// Mean squared difference between predicted and labelled probability.
    pub brier: f64,
    /// Expected calibration error over 10 equal-width bins of the prediction.
    pub ece: f64,
    /// Comparisons.
    pub examples: usize,
}

/// Scalar-head outputs at the last token of each sequence, `[n]`.
pub fn pm_scores(model: &Llama, seqs: &[&[u32]]) -> Result<Tensor, ModelError> {
    if !model.has_score_head() {
        return Err(ModelError::InvalidRequest(
            "the preference model has no scalar head (set `score_head = true` on the model)".into(),
        ));
    }
    if let Some(i) = seqs.iter().position(|s| s.is_empty()) {
        return Err(ModelError::InvalidRequest(format!(
            "preference sequence {i} is empty"
        )));
    }
    let (tokens, positions, valid, len) = left_pad(seqs, model.device());
    let hidden = model.forward(&tokens, &positions, &valid, None)?;
    model
        .score(&hidden.select(1, len - 1))
        .ok_or_else(|| ModelError::InvalidRequest("no scalar head".into()))
}

/// Summed soft-label loss over `examples` (differentiable) and the predicted P(a ≻ b) of each.
pub fn pm_loss(model: &Llama, examples: &[PmExample]) -> Result<(Tensor, Vec<f64>), ModelError> {
    let seqs: Vec<&[u32]> = examples
        .iter()
        .flat_map(|e| [e.a.as_slice(), e.b.as_slice()])
        .collect();
    let scores = pm_scores(model, &seqs)?.view([-1, 2]);
    let margin = scores.select(1, 0) - scores.select(1, 1);
    let p = Tensor::from_slice(&examples.iter().map(|e| e.p_a).collect::<Vec<f32>>())
        .to_device(model.device());
    let q: Tensor = -&p + 1.0;
    let loss: Tensor = -(&p * margin.log_sigmoid() + q * (-&margin).log_sigmoid());
    let predicted = to_vec_f32(&margin.detach().sigmoid())?
        .into_iter()
        .map(f64::from)
        .collect();
    Ok((loss.sum(Kind::Float), predicted))
}

fn check_labels(examples: &[PmExample]) -> Result<(), ModelError> {
    if examples.is_empty() {
        return Err(ModelError::InvalidRequest(
            "a preference step needs at least one comparison".into(),
        ));
    }
    if let Some(e) = examples
        .iter()
        .find(|e| !(0.0..=1.0).contains(&e.p_a) || e.p_a.is_nan())
    {
        return Err(ModelError::InvalidRequest(format!(
            "soft label {} is not a probability",
            e.p_a
        )));
    }
    Ok(())
}

/// Share of comparisons whose prediction leans the same way as the label (ties left out).
fn agreement(predicted: &[f64], examples: &[PmExample]) -> (usize, usize) {
    let mut right = 0;
    let mut counted = 0;
    for (q, e) in predicted.iter().zip(examples) {
        let p = f64::from(e.p_a);
        if p == 0.5 {
            continue;
        }
        counted += 1;
        if (q > &0.5) == (p > 0.5) {
            right += 1;
        }
    }
    (right, counted)
}

impl Trainer {
    /// One preference-model optimiser step over `examples`, accumulated over micro-batches.
    pub fn pm_step(
        &mut self,
        model: &Llama,
        examples: &[PmExample],
        micro_batch: usize,
        config: &OptimConfig,
    ) -> Result<PmStats, ModelError> {
        check_labels(examples)?;
        self.begin_step(config);
        let n = examples.len() as f64;
        let mut total = 0.0;
        let (mut right, mut counted) = (0, 0);
        for chunk in examples.chunks(micro_batch.max(1)) {
            let (loss, predicted) = pm_loss(model, chunk)?;
            total += loss.double_value(&[]);
            let (r, c) = agreement(&predicted, chunk);
            right += r;
            counted += c;
            (loss / n).backward();
        }
        let grad_norm = self.finish_step(config);
        Ok(PmStats {
            loss: total / n,
            accuracy: if counted == 0 {
                0.0
            } else {
                right as f64 / counted as f64
            },
            grad_norm,
            step: self.steps,
        })
    }
}

/// Held-out loss, accuracy and calibration.
pub fn pm_eval(
    model: &Llama,
    examples: &[PmExample],
    micro_batch: usize,
) -> Result<PmEvalStats, ModelError> {
    check_labels(examples)?;
    let _g = tch::no_grad_guard();
    let mut total = 0.0;
    let mut predicted = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(micro_batch.max(1)) {
        let (loss, q) = pm_loss(model, chunk)?;
        total += loss.double_value(&[]);
        predicted.extend(q);
    }
    let labels: Vec<f64> = examples.iter().map(|e| f64::from(e.p_a)).collect();
    let (right, counted) = agreement(&predicted, examples);
    Ok(PmEvalStats {
        loss: total / examples.len() as f64,
        accuracy: if counted == 0 {
            0.0
        } else {
            right as f64 / counted as f64
        },
        brier: predicted
            .iter()
            .zip(&labels)
            .map(|(q, p)| (q - p).powi(2))
            .sum::<f64>()
            / examples.len() as f64,
        ece: calibration_error(&predicted, &labels),
        examples: examples.len(),
    })
}

/// One preference-model optimiser step (the [`Algorithm`] behind a `pm` stage's steps).
#[derive(Clone, Debug, PartialEq)]
pub struct PmStep {
    /// Labelled comparisons.
    pub examples: Vec<PmExample>,
    /// Comparisons per forward/backward pass.
    pub micro_batch: usize,
    /// Optimiser settings for this step.
    pub optim: OptimConfig,
}

impl Algorithm for PmStep {
    fn kind_name(&self) -> &'static str {
        "pm step"
    }
    fn optimiser(&self) -> &'static str {
        "pm"
    }
    fn optim(&self) -> OptimConfig {
        self.optim.clone()
    }
    fn sequences(&self) -> usize {
        self.examples.len()
    }
    fn step(&self, model: &Llama, trainer: &mut Trainer) -> Result<Report, ModelError> {
        trainer
            .pm_step(model, &self.examples, self.micro_batch, &self.optim)
            .map(Report::new)
    }
    fn stand_in(&self) -> Report {
        Report::new(PmStats {
            loss: std::f64::consts::LN_2,
            accuracy: 0.0,
            grad_norm: 0.0,
            step: 0,
        })
    }
}

/// Held-out preference-model quality (a `pm` stage's evaluation).
#[derive(Clone, Debug, PartialEq)]
pub struct PmEval {
    /// Labelled comparisons.
    pub examples: Vec<PmExample>,
    /// Comparisons per forward pass.
    pub micro_batch: usize,
}

impl Measurement for PmEval {
    fn kind_name(&self) -> &'static str {
        "pm eval"
    }
    fn sequences(&self) -> usize {
        self.examples.len()
    }
    fn measure(&self, model: &Llama) -> Result<Report, ModelError> {
        pm_eval(model, &self.examples, self.micro_batch).map(Report::new)
    }
    fn stand_in(&self) -> Report {
        let n = self.examples.len().max(1) as f64;
        Report::new(PmEvalStats {
            loss: std::f64::consts::LN_2,
            accuracy: 0.0,
            brier: self
                .examples
                .iter()
                .map(|e| (0.5 - f64::from(e.p_a)).powi(2))
                .sum::<f64>()
                / n,
            ece: 0.0,
            examples: self.examples.len(),
        })
    }
}

/// Expected calibration error: predictions binned into 10 equal-width bins; the
/// count-weighted mean of |mean prediction − mean label| per bin.
///
/// ```
/// use cairn::train::pm::calibration_error;
/// // Perfectly calibrated: each bin's mean prediction equals its mean label.
/// assert!(calibration_error(&[0.25, 0.75], &[0.25, 0.75]) < 1e-12);
/// // Always 0.9 when the truth is 0.5: off by 0.4.
/// assert!((calibration_error(&[0.9, 0.9], &[0.5, 0.5]) - 0.4).abs() < 1e-12);
/// ```
pub fn calibration_error(predicted: &[f64], labels: &[f64]) -> f64 {
    let mut bins = [(0usize, 0.0f64, 0.0f64); 10];
    for (q, p) in predicted.iter().zip(labels) {
        let b = ((q * 10.0).floor() as usize).min(9);
        bins[b].0 += 1;
        bins[b].1 += q;
        bins[b].2 += p;
    }
    let n = predicted.len().max(1) as f64;
    bins.iter()
        .filter(|b| b.0 > 0)
        .map(|(c, q, p)| (*c as f64 / n) * ((q - p) / *c as f64).abs())
        .sum()
}

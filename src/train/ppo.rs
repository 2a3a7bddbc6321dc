//! PPO against a preference model, with a KL penalty to a frozen reference.
//!
//! Per rollout (prompt `x`, response `y₁…y_T`): the per-token reward is
//! `−β·(log π(y_t) − log π_ref(y_t))`, plus the preference model's score on the last token.
//! The value head (the policy's scalar head, sharing its trunk) estimates returns;
//! advantages come from GAE(γ, λ) and are whitened over the batch. Each update runs
//! `epochs` passes over the rollouts in seeded random minibatches, minimising the clipped
//! policy loss plus `vf_coef` × the clipped value loss. Old log-probabilities and values are
//! recomputed under the current weights at the start of the update, so they match the
//! policy exactly whatever sampling temperature produced the rollouts.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::algorithm::{Algorithm, Report};
use super::sft::{OptimConfig, Trainer};
use crate::model::ModelError;
use crate::model::generate::{left_pad, to_vec_f32};
use crate::model::llama::Llama;

/// One rollout to learn from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PpoRollout {
    /// Prompt tokens as the policy saw them.
    pub context: Vec<u32>,
    /// Response tokens.
    pub response: Vec<u32>,
    /// Reference log-probability of each response token.
    pub ref_logprobs: Vec<f32>,
    /// The preference model's score.
    pub score: f32,
}

/// PPO settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PpoConfig {
    /// Learning rate.
    pub lr: f64,
    /// KL penalty coefficient β.
    pub kl_coef: f64,
    /// Discount γ.
    pub gamma: f64,
    /// GAE λ.
    pub lam: f64,
    /// Policy ratio clip ε.
    pub clip: f64,
    /// Value clip (around the old value).
    pub value_clip: f64,
    /// Weight of the value loss.
    pub vf_coef: f64,
    /// Passes over the rollouts per update.
    pub epochs: usize,
    /// Rollouts per minibatch.
    pub minibatch: usize,
    /// Clip the global gradient norm to this (0: off).
    pub max_grad_norm: f64,
    /// Seed of the minibatch order.
    pub seed: u64,
}

impl Default for PpoConfig {
    fn default() -> Self {
        PpoConfig {
            lr: 1e-6,
            kl_coef: 0.05,
            gamma: 1.0,
            lam: 0.95,
            clip: 0.2,
            value_clip: 0.2,
            vf_coef: 0.1,
            epochs: 2,
            minibatch: 4,
            max_grad_norm: 1.0,
            seed: 0,
        }
    }
}

/// What one update did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PpoStats {
    /// Mean preference-model score.
    pub mean_score: f64,
    /// Mean total reward per rollout (score minus KL penalty).
    pub mean_reward: f64,
    /// Mean per-rollout KL to the reference, before the update: the sum over the sampled
    /// tokens of the k3 estimate `exp(r) − 1 − r`, `r = log π_ref − log π` ([`k3`]); never
    /// negative.
    pub kl: f64,
    /// Mean per-token entropy, before the update.
    pub entropy: f64,
    /// Mean response length.
    pub response_length: f64,
    /// Share of token ratios outside [1 − ε, 1 + ε].
    pub clip_fraction: f64,
    /// Mean value loss over minibatches.
    pub value_loss: f64,
    /// Mean clipped policy loss over minibatches.
    pub policy_loss: f64,
}

/// Per response token of each rollout (concatenated in order): log-probability under the
/// policy, the value head's estimate, and the entropy of the policy's distribution.
pub fn policy_pass(
    model: &Llama,
    rollouts: &[&PpoRollout],
) -> Result<(Tensor, Tensor, Tensor), ModelError> {
    let seqs: Vec<Vec<u32>> = rollouts
        .iter()
        .map(|r| r.context.iter().chain(&r.response).copied().collect())
        .collect();
    let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
    let device = model.device();
    let (tokens, positions, valid, len) = left_pad(&refs, device);
    let hidden = model.forward(&tokens, &positions, &valid, None)?;
    let h = model.config().hidden_size as i64;
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (b, r) in rollouts.iter().enumerate() {
        let pad = len - seqs[b].len() as i64;
        for (j, &t) in r.response.iter().enumerate() {
            rows.push(b as i64 * len + pad + r.context.len() as i64 - 1 + j as i64);
            targets.push(t as i64);
        }
    }
    let picked = hidden
        .view([-1, h])
        .index_select(0, &Tensor::from_slice(&rows).to_device(device));
    let logp = model.logits(&picked).log_softmax(-1, Kind::Float);
    let lp = logp
        .gather(
            1,
            &Tensor::from_slice(&targets).to_device(device).unsqueeze(1),
            false,
        )
        .squeeze_dim(1);
    let entropy = -(logp.exp() * &logp).sum_dim_intlist(-1, false, Kind::Float);
    let values = model
        .score(&picked)
        .ok_or_else(|| ModelError::InvalidRequest("the policy has no value head".into()))?;
    Ok((lp, values, entropy))
}

/// Per-token advantages and returns by GAE for one rollout.
///
/// ```
/// use cairn::train::ppo::gae;
/// // γ = λ = 1 and zero values: every advantage is the reward still to come.
/// let (adv, ret) = gae(&[1.0, 0.0, 2.0], &[0.0, 0.0, 0.0], 1.0, 1.0);
/// assert_eq!(adv, vec![3.0, 2.0, 2.0]);
/// assert_eq!(ret, adv);
/// ```
pub fn gae(rewards: &[f64], values: &[f64], gamma: f64, lam: f64) -> (Vec<f64>, Vec<f64>) {
    let n = rewards.len();
    let mut adv = vec![0.0; n];
    let mut next_value = 0.0;
    let mut running = 0.0;
    for t in (0..n).rev() {
        let delta = rewards[t] + gamma * next_value - values[t];
        running = delta + gamma * lam * running;
        adv[t] = running;
        next_value = values[t];
    }
    let ret = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, ret)
}

/// The share of repeated token 3-grams in a response: 0 for varied text, near 1 for a loop.
///
/// ```
/// use cairn::train::ppo::repetition;
/// assert_eq!(repetition(&[1, 2, 3, 4, 5]), 0.0);
/// assert!(repetition(&[7, 7, 7, 7, 7, 7]) > 0.7);
/// ```
pub fn repetition(tokens: &[u32]) -> f64 {
    if tokens.len() < 4 {
        return 0.0;
    }
    let grams: Vec<&[u32]> = tokens.windows(3).collect();
    let distinct: std::collections::HashSet<&[u32]> = grams.iter().copied().collect();
    1.0 - distinct.len() as f64 / grams.len() as f64
}

/// The k3 estimate of KL(π ‖ π_ref) from one sampled token's log-ratio `r = log π_ref − log π`:
/// `exp(r) − 1 − r`, unbiased and never negative.
///
/// ```
/// use cairn::train::ppo::k3;
/// assert_eq!(k3(0.0), 0.0);
/// assert!(k3(-2.0) > 0.0 && k3(2.0) > 0.0);
/// ```
pub fn k3(r: f64) -> f64 {
    r.exp_m1() - r
}

/// One PPO update (the [`Algorithm`] behind a `ppo` stage's updates): adds a value head on
/// first use and keeps its own optimiser per model.
#[derive(Clone, Debug, PartialEq)]
pub struct PpoStep {
    /// The rollouts.
    pub rollouts: Vec<PpoRollout>,
    /// PPO settings.
    pub config: PpoConfig,
}

impl Algorithm for PpoStep {
    fn kind_name(&self) -> &'static str {
        "ppo update"
    }
    fn optimiser(&self) -> &'static str {
        "ppo"
    }
    fn optim(&self) -> OptimConfig {
        OptimConfig {
            lr: self.config.lr,
            weight_decay: 0.0,
            max_grad_norm: self.config.max_grad_norm,
        }
    }
    fn sequences(&self) -> usize {
        self.rollouts.len()
    }
    fn prepare(&self, model: &mut Llama) {
        // The value head shares the policy's trunk.
        model.ensure_score_head();
    }
    fn step(&self, model: &Llama, trainer: &mut Trainer) -> Result<Report, ModelError> {
        trainer.opt.set_lr(self.config.lr);
        trainer.steps += 1;
        ppo_update(model, &mut trainer.opt, &self.rollouts, &self.config).map(Report::new)
    }
    fn stand_in(&self) -> Report {
        let n = self.rollouts.len().max(1) as f64;
        Report::new(PpoStats {
            mean_score: self
                .rollouts
                .iter()
                .map(|r| f64::from(r.score))
                .sum::<f64>()
                / n,
            response_length: self
                .rollouts
                .iter()
                .map(|r| r.response.len() as f64)
                .sum::<f64>()
                / n,
            ..PpoStats::default()
        })
    }
}

/// One PPO update of `model` (which must have a value head) with optimiser `opt`.
pub fn ppo_update(
    model: &Llama,
    opt: &mut super::adamw::AdamW,
    rollouts: &[PpoRollout],
    config: &PpoConfig,
) -> Result<PpoStats, ModelError> {
    let rollouts: Vec<&PpoRollout> = rollouts.iter().filter(|r| !r.response.is_empty()).collect();
    if rollouts.is_empty() {
        return Err(ModelError::InvalidRequest(
            "a PPO update needs at least one non-empty rollout".into(),
        ));
    }
    for r in &rollouts {
        if r.ref_logprobs.len() != r.response.len() || r.context.is_empty() {
            return Err(ModelError::InvalidRequest(format!(
                "rollout with {} response tokens has {} reference log-probabilities and {} context tokens",
                r.response.len(),
                r.ref_logprobs.len(),
                r.context.len()
            )));
        }
    }
    let device = model.device();
    let mb = config.minibatch.max(1);
    // 1. Old log-probabilities, values and entropies under the current weights.
    let (old_lp, old_v, entropy) = {
        let _g = tch::no_grad_guard();
        let mut lp = Vec::new();
        let mut v = Vec::new();
        let mut e = Vec::new();
        for chunk in rollouts.chunks(mb) {
            let (a, b, c) = policy_pass(model, chunk)?;
            lp.extend(to_vec_f32(&a)?);
            v.extend(to_vec_f32(&b)?);
            e.extend(to_vec_f32(&c)?);
        }
        (lp, v, e)
    };
    // 2. Rewards, advantages and returns per rollout.
    let mut stats = PpoStats::default();
    let mut adv_all = Vec::with_capacity(old_lp.len());
    let mut ret_all = Vec::with_capacity(old_lp.len());
    let mut spans = Vec::with_capacity(rollouts.len());
    let mut at = 0;
    for r in &rollouts {
        let n = r.response.len();
        let kl: Vec<f64> = (0..n)
            .map(|j| f64::from(old_lp[at + j]) - f64::from(r.ref_logprobs[j]))
            .collect();
        let mut rewards: Vec<f64> = kl.iter().map(|k| -config.kl_coef * k).collect();
        rewards[n - 1] += f64::from(r.score);
        let values: Vec<f64> = old_v[at..at + n].iter().map(|&v| f64::from(v)).collect();
        let (adv, ret) = gae(&rewards, &values, config.gamma, config.lam);
        // The penalty uses the plain log-ratio per token (its expectation is the KL); the
        // logged KL uses the k3 estimator, exp(r) - 1 - r with r = log π_ref - log π, which
        // has the same expectation and is never negative, so a logged negative KL cannot
        // hide a policy that drifted.
        stats.kl += kl.iter().map(|&k| k3(-k)).sum::<f64>();
        stats.mean_reward += rewards.iter().sum::<f64>();
        stats.mean_score += f64::from(r.score);
        stats.response_length += n as f64;
        adv_all.extend(adv);
        ret_all.extend(ret);
        spans.push((at, n));
        at += n;
    }
    let count = rollouts.len() as f64;
    stats.kl /= count;
    stats.mean_reward /= count;
    stats.mean_score /= count;
    stats.response_length /= count;
    stats.entropy = entropy.iter().map(|&e| f64::from(e)).sum::<f64>() / entropy.len() as f64;
    // Whitened advantages: the update's scale does not depend on the reward's.
    let mean = adv_all.iter().sum::<f64>() / adv_all.len() as f64;
    let var = adv_all.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / adv_all.len() as f64;
    if adv_all.len() > 1 {
        let std = var.sqrt() + 1e-8;
        for a in &mut adv_all {
            *a = (*a - mean) / std;
        }
    }
    // 3. Epochs of clipped updates over seeded minibatches.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(config.seed);
    let mut order: Vec<usize> = (0..rollouts.len()).collect();
    let (mut clipped, mut seen, mut batches) = (0.0, 0.0, 0.0);
    for _ in 0..config.epochs.max(1) {
        order.shuffle(&mut rng);
        for idx in order.chunks(mb) {
            let batch: Vec<&PpoRollout> = idx.iter().map(|&i| rollouts[i]).collect();
            let gather = |all: &[f64]| -> Tensor {
                let v: Vec<f32> = idx
                    .iter()
                    .flat_map(|&i| {
                        let (s, n) = spans[i];
                        all[s..s + n].iter().map(|&x| x as f32)
                    })
                    .collect();
                Tensor::from_slice(&v).to_device(device)
            };
            let to64 = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
            let adv = gather(&adv_all);
            let ret = gather(&ret_all);
            let old_lp_t = gather(&to64(&old_lp));
            let old_v_t = gather(&to64(&old_v));
            let (lp, v, _) = policy_pass(model, &batch)?;
            let ratio = (&lp - &old_lp_t).exp();
            let pg1 = -&adv * &ratio;
            let pg2 = -&adv * ratio.clamp(1.0 - config.clip, 1.0 + config.clip);
            let pg = pg1.maximum(&pg2).mean(Kind::Float);
            let v_clipped = &old_v_t + (&v - &old_v_t).clamp(-config.value_clip, config.value_clip);
            let vf = (&v - &ret)
                .square()
                .maximum(&(v_clipped - &ret).square())
                .mean(Kind::Float)
                * 0.5;
            let loss = &pg + &vf * config.vf_coef;
            opt.zero_grad();
            loss.backward();
            if config.max_grad_norm > 0.0 {
                opt.clip_grad_norm(config.max_grad_norm);
            }
            opt.step();
            let outside = (&ratio - 1.0)
                .abs()
                .gt(config.clip)
                .to_kind(Kind::Float)
                .sum(Kind::Float)
                .double_value(&[]);
            clipped += outside;
            seen += ratio.size()[0] as f64;
            stats.policy_loss += pg.double_value(&[]);
            stats.value_loss += vf.double_value(&[]);
            batches += 1.0;
        }
    }
    stats.clip_fraction = if seen > 0.0 { clipped / seen } else { 0.0 };
    stats.policy_loss /= batches;
    stats.value_loss /= batches;
    Ok(stats)
}

//! Seeded next-token sampling: temperature, top-k, top-p (nucleus), greedy. Each sequence
//! owns its generator, and a draw reads only that sequence's logits, so a sequence's output
//! does not depend on which other sequences shared its batch.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// How to pick tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 picks the most likely token (greedy); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: no limit).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose mass reaches p (1: no limit).
    pub top_p: f32,
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// Seed of this sequence's generator.
    pub seed: u64,
    /// Extra tokens that end generation (the model's end-of-turn tokens always do).
    #[serde(default)]
    pub stop: Vec<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 128,
            seed: 0,
            stop: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Greedy decoding of up to `max_new_tokens`.
    pub fn greedy(max_new_tokens: usize) -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            max_new_tokens,
            ..SamplingParams::default()
        }
    }

    /// Checks the values are usable.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature {} must be a finite number >= 0",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p {} must be in (0, 1]", self.top_p));
        }
        Ok(())
    }
}

/// One sequence's sampler.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

/// A sampled token with its log-probability under the model (temperature 1, unfiltered),
/// which is what PPO's ratios and KL estimates need.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Draw {
    /// The token.
    pub token: u32,
    /// `log p(token)` under the raw model distribution.
    pub logprob: f32,
}

/// How many candidates to examine before falling back to a full sort for top-p.
const NUCLEUS_CANDIDATES: usize = 512;

impl Sampler {
    /// A sampler seeded from `params.seed`.
    pub fn new(params: SamplingParams) -> Sampler {
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Sampler { params, rng }
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from one sequence's logits.
    pub fn sample(&mut self, logits: &[f32]) -> Draw {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let log_z = (logits
            .iter()
            .map(|&l| ((l - max) as f64).exp())
            .sum::<f64>())
        .ln()
            + max as f64;
        self.sample_with_log_z(logits, log_z)
    }

    /// [`Sampler::sample`] with the row's log-normaliser already known (computed for the
    /// whole batch at once by the caller).
    pub fn sample_with_log_z(&mut self, logits: &[f32], log_z: f64) -> Draw {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let logprob = |t: usize| (logits[t] as f64 - log_z) as f32;
        let p = &self.params;
        if p.temperature == 0.0 || logits.len() == 1 {
            let token = argmax(logits);
            return Draw {
                token: token as u32,
                logprob: logprob(token),
            };
        }
        let temp = p.temperature as f64;
        let weight = |l: f32| (((l - max) as f64) / temp).exp();
        // One uniform draw per step keeps the stream aligned however the token is chosen.
        let u: f64 = self.rng.r#gen::<f64>();
        let token = if p.top_k == 0 && p.top_p >= 1.0 {
            let total: f64 = logits.iter().map(|&l| weight(l)).sum();
            let target = u * total;
            let mut acc = 0.0;
            let mut chosen = logits.len() - 1;
            for (i, &l) in logits.iter().enumerate() {
                acc += weight(l);
                if acc > target {
                    chosen = i;
                    break;
                }
            }
            chosen
        } else {
            // The whole vocabulary's mass, summed once: over a 150k-token vocabulary these
            // exponentials are most of a draw's cost (`cairn bench pipeline`).
            let mut vocab_total = None;
            let mut whole = || {
                *vocab_total
                    .get_or_insert_with(|| -> f64 { logits.iter().map(|&l| weight(l)).sum() })
            };
            let candidates = if p.top_k > 0 {
                top_candidates(logits, p.top_k)
            } else {
                let mut c = top_candidates(logits, NUCLEUS_CANDIDATES);
                let mass: f64 = c.iter().map(|&i| weight(logits[i])).sum::<f64>() / whole();
                if mass < p.top_p as f64 && c.len() < logits.len() {
                    c = top_candidates(logits, logits.len());
                }
                c
            };
            // With top-k, top-p applies to the distribution renormalised over the k kept.
            let total: f64 = if p.top_k > 0 {
                candidates.iter().map(|&i| weight(logits[i])).sum()
            } else {
                whole()
            };
            let mut kept = Vec::with_capacity(candidates.len());
            let mut before = 0.0;
            for &i in &candidates {
                if before >= p.top_p as f64 * total && !kept.is_empty() {
                    break;
                }
                let w = weight(logits[i]);
                kept.push((i, w));
                before += w;
            }
            let kept_total: f64 = kept.iter().map(|&(_, w)| w).sum();
            let target = u * kept_total;
            let mut acc = 0.0;
            let mut chosen = kept.last().map(|&(i, _)| i).unwrap_or(0);
            for &(i, w) in &kept {
                acc += w;
                if acc > target {
                    chosen = i;
                    break;
                }
            }
            chosen
        };
        Draw {
            token: token as u32,
            logprob: logprob(token),
        }
    }
}

/// Index of the largest value (the lowest index among equals).
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

/// The `k` most likely indices, most likely first (ties: lower index first).
fn top_candidates(logits: &[f32], k: usize) -> Vec<usize> {
    let k = k.min(logits.len());
    let order = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    if k < idx.len() {
        idx.select_nth_unstable_by(k, order);
        idx.truncate(k);
    }
    idx.sort_by(order);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            max_new_tokens: 1,
            seed,
            stop: vec![],
        }
    }

    #[test]
    fn greedy_is_argmax_with_lowest_index_on_ties() {
        let mut s = Sampler::new(SamplingParams::greedy(1));
        assert_eq!(s.sample(&[0.0, 3.0, 3.0, 1.0]).token, 1);
    }

    #[test]
    fn log_probabilities_are_of_the_raw_distribution() {
        let mut s = Sampler::new(params(0.0, 0, 1.0, 0));
        let d = s.sample(&[0.0, (3.0f32).ln()]);
        assert!((d.logprob - (0.75f32).ln()).abs() < 1e-6);
    }

    #[test]
    fn frequencies_follow_the_tempered_distribution() {
        let logits = [0.0f32, (2.0f32).ln(), (5.0f32).ln(), -30.0];
        let mut s = Sampler::new(params(1.0, 0, 1.0, 7));
        let mut counts = [0usize; 4];
        for _ in 0..20_000 {
            counts[s.sample(&logits).token as usize] += 1;
        }
        let f: Vec<f64> = counts.iter().map(|&c| c as f64 / 20_000.0).collect();
        assert!(
            (f[0] - 0.125).abs() < 0.015
                && (f[1] - 0.25).abs() < 0.015
                && (f[2] - 0.625).abs() < 0.015,
            "{f:?}"
        );
        assert_eq!(counts[3], 0);
    }

    #[test]
    fn top_k_and_top_p_cut_the_tail() {
        let logits = [(0.5f32).ln(), (0.3f32).ln(), (0.15f32).ln(), (0.05f32).ln()];
        let mut k = Sampler::new(params(1.0, 2, 1.0, 1));
        let mut p = Sampler::new(params(1.0, 0, 0.75, 2));
        for _ in 0..2_000 {
            assert!(k.sample(&logits).token < 2);
            assert!(p.sample(&logits).token < 2, "0.5 + 0.3 reaches 0.75");
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_stream() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 37 % 101) as f32) / 20.0).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(0.8, 0, 0.9, seed));
            (0..50).map(|_| s.sample(&logits).token).collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }

    #[test]
    fn bad_parameters_are_rejected() {
        assert!(params(-1.0, 0, 1.0, 0).validate().is_err());
        assert!(params(1.0, 0, 0.0, 0).validate().is_err());
        assert!(params(f32::NAN, 0, 1.0, 0).validate().is_err());
        assert!(params(0.7, 40, 0.9, 0).validate().is_ok());
    }
}

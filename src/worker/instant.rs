//! The instant stand-in backend: answers every job at once without computing (a
//! generation echoes the prompt's last tokens, every log-probability is 0). `cairn bench
//! engine` serves it in place of a decoder so that what it measures is the engine's own
//! overhead — operators, batching, the log — with the model's cost taken out.

use super::{Job, JobOutput, Reply};
use crate::model::{Finish, Generation, ModelError, Scored};
use crate::train::{PmEvalStats, PmStats, PpoStats, StepStats};

/// The instant model's answers.
pub(super) fn reply(job: &Job) -> Reply {
    Ok(match job {
        Job::Generate(r) => JobOutput::Generated(
            r.iter()
                .map(|r| {
                    let n = r.params.max_new_tokens.min(r.prompt.len()).min(8);
                    Generation {
                        tokens: r.prompt[r.prompt.len() - n..].to_vec(),
                        logprobs: vec![0.0; n],
                        finish: Finish::Length,
                    }
                })
                .collect(),
        ),
        Job::Score(r) => JobOutput::Scored(
            r.iter()
                .map(|r| Scored {
                    logprobs: vec![0.0; r.continuation.len()],
                    total: 0.0,
                    value: None,
                })
                .collect(),
        ),
        Job::ScoreChoices(r) => {
            JobOutput::ChoiceScores(r.iter().map(|r| vec![0.0; r.choices.len()]).collect())
        }
        Job::TrainSft { examples, .. } => JobOutput::Trained(StepStats {
            loss: 0.0,
            tokens: examples.iter().map(|e| e.target.len()).sum(),
            grad_norm: 0.0,
            step: 0,
        }),
        Job::EvalSft { examples, .. } => JobOutput::Evaluated {
            loss: 0.0,
            tokens: examples.iter().map(|e| e.target.len()).sum(),
        },
        Job::Save(_) | Job::SaveState(_) | Job::LoadState(_) => {
            return Err(ModelError::InvalidRequest(
                "the instant model has no weights to save or restore".into(),
            ));
        }
        Job::TrainPm { .. } => JobOutput::PmTrained(PmStats {
            loss: std::f64::consts::LN_2,
            accuracy: 0.0,
            grad_norm: 0.0,
            step: 0,
        }),
        Job::EvalPm { examples, .. } => JobOutput::PmEvaluated(PmEvalStats {
            loss: std::f64::consts::LN_2,
            accuracy: 0.0,
            brier: examples
                .iter()
                .map(|e| (0.5 - f64::from(e.p_a)).powi(2))
                .sum::<f64>()
                / examples.len().max(1) as f64,
            ece: 0.0,
            examples: examples.len(),
        }),
        Job::TrainPpo { rollouts, .. } => JobOutput::PpoTrained(PpoStats {
            mean_score: rollouts.iter().map(|r| f64::from(r.score)).sum::<f64>()
                / rollouts.len().max(1) as f64,
            response_length: rollouts
                .iter()
                .map(|r| r.response.len() as f64)
                .sum::<f64>()
                / rollouts.len().max(1) as f64,
            ..PpoStats::default()
        }),
        Job::CopyFrom(_) => JobOutput::Copied,
    })
}

//! The instant stand-in backend: answers every job at once without computing (a
//! generation echoes the prompt's last tokens, every log-probability is 0). `cairn bench
//! engine` serves it in place of a decoder so that what it measures is the engine's own
//! overhead — operators, batching, the log — with the model's cost taken out.

use super::{Job, JobOutput, Reply};
use crate::model::{Finish, Generation, ModelError, Scored};

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
        Job::Train(algorithm) => JobOutput::Trained(algorithm.stand_in()),
        Job::Measure(measurement) => JobOutput::Measured(measurement.stand_in()),
        Job::Save(_) | Job::SaveState(_) | Job::LoadState(_) => {
            return Err(ModelError::InvalidRequest(
                "the instant model has no weights to save or restore".into(),
            ));
        }
        Job::CopyFrom(_) => JobOutput::Copied,
    })
}

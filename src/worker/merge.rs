//! Merging jobs into one model call and splitting the answer back: the one helper both
//! sides use — the worker, to merge the same model's waiting jobs into one batch, and the
//! engine, to turn a chunk of a stage's tasks into one job. A merged job carries the
//! requests of its parts in order, and its output splits by each part's request count.

use super::{Job, JobOutput};
use crate::model::ModelError;

impl Job {
    /// How many sequences (requests, examples or rollouts) the job carries.
    pub fn requests(&self) -> usize {
        match self {
            Job::Generate(r) => r.len(),
            Job::Score(r) => r.len(),
            Job::ScoreChoices(r) => r.len(),
            Job::Train(a) => a.sequences(),
            Job::Measure(m) => m.sequences(),
            Job::Save(_) | Job::CopyFrom(_) | Job::SaveState(_) | Job::LoadState(_) => 0,
        }
    }

    /// Whether jobs of this kind may share a model call with others.
    pub fn mergeable(&self) -> bool {
        matches!(
            self,
            Job::Generate(_) | Job::Score(_) | Job::ScoreChoices(_)
        )
    }

    /// One job carrying every request of `jobs`, in order. The jobs must be of one
    /// mergeable kind.
    ///
    /// ```
    /// use cairn::model::ScoreRequest;
    /// use cairn::worker::{Job, JobOutput};
    /// let score = |n: u32| ScoreRequest { context: vec![1], continuation: vec![n] };
    /// let jobs = vec![Job::Score(vec![score(2), score(3)]), Job::Score(vec![score(4)])];
    /// let lens: Vec<usize> = jobs.iter().map(Job::requests).collect();
    /// let merged = Job::concat(jobs).unwrap();
    /// assert_eq!(merged.requests(), 3);
    /// // ... the model answers the merged job; its output splits back per job:
    /// let out = JobOutput::ChoiceScores(vec![vec![0.1], vec![0.2], vec![0.3]]);
    /// let parts = out.split(&lens).unwrap();
    /// assert_eq!(parts[1], JobOutput::ChoiceScores(vec![vec![0.3]]));
    /// ```
    pub fn concat(jobs: impl IntoIterator<Item = Job>) -> Result<Job, ModelError> {
        let mut jobs = jobs.into_iter();
        let Some(mut merged) = jobs.next() else {
            return Err(ModelError::InvalidRequest("no jobs to merge".into()));
        };
        if !merged.mergeable() {
            return Err(ModelError::InvalidRequest(format!(
                "{} jobs are not merged",
                merged.kind_name()
            )));
        }
        for job in jobs {
            match (&mut merged, job) {
                (Job::Generate(all), Job::Generate(more)) => all.extend(more),
                (Job::Score(all), Job::Score(more)) => all.extend(more),
                (Job::ScoreChoices(all), Job::ScoreChoices(more)) => all.extend(more),
                (m, other) => {
                    return Err(ModelError::InvalidRequest(format!(
                        "cannot merge a {} job into a {} job",
                        other.kind_name(),
                        m.kind_name()
                    )));
                }
            }
        }
        Ok(merged)
    }

    /// The job's kind, for messages.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Job::Generate(_) => "generate",
            Job::Score(_) => "score",
            Job::ScoreChoices(_) => "score-choices",
            Job::Train(a) => a.kind_name(),
            Job::Measure(m) => m.kind_name(),
            Job::Save(_) => "save",
            Job::CopyFrom(_) => "copy",
            Job::SaveState(_) => "save-state",
            Job::LoadState(_) => "load-state",
        }
    }
}

impl JobOutput {
    /// Splits the output of a merged job into one output per part, `lens[i]` results for
    /// part `i` (see [`Job::concat`]). Too few or too many results is an error, never a
    /// silent shift of one part's answers onto another.
    pub fn split(self, lens: &[usize]) -> Result<Vec<JobOutput>, ModelError> {
        fn cut<T>(
            items: Vec<T>,
            lens: &[usize],
            wrap: fn(Vec<T>) -> JobOutput,
        ) -> Result<Vec<JobOutput>, ModelError> {
            let wanted: usize = lens.iter().sum();
            if items.len() != wanted {
                return Err(ModelError::InvalidRequest(format!(
                    "a merged job of {wanted} requests was answered with {} results",
                    items.len()
                )));
            }
            let mut items = items.into_iter();
            Ok(lens
                .iter()
                .map(|&n| wrap(items.by_ref().take(n).collect()))
                .collect())
        }
        match self {
            JobOutput::Generated(g) => cut(g, lens, JobOutput::Generated),
            JobOutput::Scored(s) => cut(s, lens, JobOutput::Scored),
            JobOutput::ChoiceScores(c) => cut(c, lens, JobOutput::ChoiceScores),
            other if lens.len() == 1 => Ok(vec![other]),
            other => Err(ModelError::InvalidRequest(format!(
                "{other:?} does not split into {} parts",
                lens.len()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Finish, Generation, ScoreRequest};

    fn generation(token: u32) -> Generation {
        Generation {
            tokens: vec![token],
            logprobs: vec![0.0],
            finish: Finish::Length,
        }
    }

    #[test]
    fn jobs_of_different_kinds_or_unmergeable_jobs_are_refused() {
        let score = Job::Score(vec![ScoreRequest {
            context: vec![1],
            continuation: vec![2],
        }]);
        let e = Job::concat(vec![score, Job::ScoreChoices(Vec::new())]).unwrap_err();
        assert!(
            e.to_string()
                .contains("cannot merge a score-choices job into a score job")
        );
        assert!(Job::concat(vec![Job::CopyFrom("a".into())]).is_err());
        assert!(Job::concat(Vec::new()).is_err());
    }

    #[test]
    fn a_split_keeps_each_parts_results_and_refuses_a_wrong_count() {
        let out = JobOutput::Generated((1..=4).map(generation).collect());
        let parts = out.clone().split(&[1, 0, 3]).expect("splits");
        assert_eq!(parts[0], JobOutput::Generated(vec![generation(1)]));
        assert_eq!(parts[1], JobOutput::Generated(Vec::new()));
        assert_eq!(
            parts[2],
            JobOutput::Generated(vec![generation(2), generation(3), generation(4)])
        );
        assert!(out.clone().split(&[1, 2]).is_err());
        assert!(out.split(&[5]).is_err());
        assert_eq!(
            JobOutput::Copied.split(&[0]).expect("one part"),
            vec![JobOutput::Copied]
        );
    }
}

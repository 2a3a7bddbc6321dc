//! Batching: tasks cut into chunks of one kind of work, each chunk one model job, and the
//! job's reply split back into one reply per task.

use super::*;

/// Cuts key-sorted tasks into chunks of at most `batch`; a chunk is one model call, so it
/// never mixes kinds of work or models.
pub(in crate::engine) fn chunks(tasks: Vec<Task>, batch: usize) -> Vec<Vec<Task>> {
    let mut groups: BTreeMap<(u8, String), Vec<Task>> = BTreeMap::new();
    for task in tasks {
        groups.entry(work_group(&task.work)).or_default().push(task);
    }
    groups
        .into_values()
        .flat_map(|g| g.chunks(batch).map(|c| c.to_vec()).collect::<Vec<_>>())
        .collect()
}

/// Which model call a task needs; chunks never mix groups.
pub(super) fn work_group(work: &Work) -> (u8, String) {
    match work {
        Work::Pure(_) => (0, String::new()),
        Work::Model { model, job } => {
            let kind = match job {
                Job::Generate(_) => 1,
                Job::Score(_) => 2,
                Job::ScoreChoices(_) => 3,
                // Not model calls a stage makes; kept apart so they never merge.
                _ => 4,
            };
            (kind, model.clone())
        }
    }
}

/// The model and job for a chunk of generate or score tasks (`None` for pure work): each
/// task's work as a job, merged in task order by the worker's own helper. `chunks` never
/// mixes kinds of work, so a chunk that does not merge is a bug reported as an error,
/// never mistaken for pure work.
pub(in crate::engine) fn model_job(
    name: &str,
    tasks: &[Task],
) -> Result<Option<(String, Job)>, EngineError> {
    let Some(model) = tasks.first().and_then(|t| t.work.model()) else {
        return Ok(None);
    };
    let bad = |what: String| EngineError::Input(format!("stage `{name}`: {what}"));
    let jobs = tasks
        .iter()
        .map(|t| {
            t.work
                .job()
                .cloned()
                .ok_or_else(|| bad("pure work in a chunk of model work".into()))
        })
        .collect::<Result<Vec<Job>, _>>()?;
    let job = Job::concat(jobs).map_err(|e| bad(e.to_string()))?;
    Ok(Some((model.to_string(), job)))
}

/// A chunk's tasks after their replies: the tasks done, each with its last reply, and the
/// tasks with another call to make ([`Stage::more`]), their reply kept in the history and
/// their work replaced by the next call.
pub(in crate::engine) type Advanced = (Vec<Task>, Vec<Reply>, Vec<Task>);

/// Sorts a chunk's tasks after their replies into done and continuing ([`Advanced`]).
pub(in crate::engine) fn advance_tasks(
    stage: &dyn Stage,
    tasks: Vec<Task>,
    replies: Vec<Reply>,
) -> Result<Advanced, StageError> {
    let mut done_tasks = Vec::new();
    let mut done_replies = Vec::new();
    let mut going = Vec::new();
    for (mut task, reply) in tasks.into_iter().zip(replies) {
        match stage.more(&task, &reply)? {
            Some(work) => {
                task.history.push(reply);
                task.work = work;
                going.push(task);
            }
            None => {
                done_tasks.push(task);
                done_replies.push(reply);
            }
        }
    }
    Ok((done_tasks, done_replies, going))
}

/// Splits a worker reply back into one [`Reply`] per task.
pub(in crate::engine) fn split_reply(
    name: &str,
    tasks: &[Task],
    reply: WorkerReply,
) -> Result<Vec<Reply>, EngineError> {
    let bad = |what: String| EngineError::Input(format!("stage `{name}`: {what}"));
    let lens: Vec<usize> = tasks.iter().map(|t| t.work.requests()).collect();
    let parts = reply?.split(&lens).map_err(|e| bad(e.to_string()))?;
    tasks
        .iter()
        .zip(parts)
        .map(|(t, out)| t.work.reply(out).map_err(bad))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Finish, GenerateRequest, Generation, SamplingParams, ScoreRequest};
    use crate::record::{FlagRecord, Key};

    fn task(i: u64, work: Work) -> Task {
        let input = Rec {
            key: Key::builder("input").u64(i).finish(),
            parents: Vec::new(),
            stage: "prompts".into(),
            payload: Payload::Flag(FlagRecord {
                flagged: Key::builder("x").finish(),
                reason: String::new(),
            }),
        };
        Task::new(Key::builder("out").u64(i).finish(), input, work)
    }
    fn generate(model: &str, first_token: u32) -> Work {
        Work::generate(
            model,
            GenerateRequest {
                prompt: vec![first_token],
                params: SamplingParams::greedy(1),
            },
        )
    }
    fn generation(token: u32) -> Generation {
        Generation {
            tokens: vec![token],
            logprobs: vec![0.0],
            finish: Finish::Length,
        }
    }

    #[test]
    fn chunks_never_mix_work_or_models_and_keep_task_order() {
        let pure = |i| {
            Work::Pure(Payload::Flag(FlagRecord {
                flagged: Key::builder("p").u64(i).finish(),
                reason: String::new(),
            }))
        };
        let score = Work::score(
            "pm",
            ScoreRequest {
                context: vec![1],
                continuation: vec![2],
            },
        );
        let tasks = vec![
            task(0, generate("policy", 0)),
            task(1, pure(1)),
            task(2, generate("feedback", 2)),
            task(3, generate("policy", 3)),
            task(4, score),
            task(5, generate("policy", 5)),
            task(6, pure(6)),
        ];
        let keys: Vec<Key> = tasks.iter().map(|t| t.key).collect();
        let chunks = chunks(tasks, 2);
        let mut seen = Vec::new();
        for c in &chunks {
            assert!(!c.is_empty() && c.len() <= 2, "chunk of {}", c.len());
            let group = work_group(&c[0].work);
            assert!(c.iter().all(|t| work_group(&t.work) == group));
            seen.extend(c.iter().map(|t| t.key));
        }
        assert_eq!(seen.len(), keys.len(), "every task exactly once");
        // Within one group, tasks keep their order: policy's 0, 3 | 5.
        let policy: Vec<Key> = chunks
            .iter()
            .flatten()
            .filter(|t| work_group(&t.work) == (1, "policy".into()))
            .map(|t| t.key)
            .collect();
        assert_eq!(policy, vec![keys[0], keys[3], keys[5]]);
        assert_eq!(chunks.len(), 5, "pure 2, feedback 1, policy 2+1, pm 1");
    }

    #[test]
    fn a_chunk_is_one_job_and_its_reply_splits_back_per_task() {
        let many = Work::generate_many(
            "policy",
            vec![
                GenerateRequest {
                    prompt: vec![11],
                    params: SamplingParams::greedy(1),
                },
                GenerateRequest {
                    prompt: vec![12],
                    params: SamplingParams::greedy(1),
                },
            ],
        );
        let tasks = vec![task(0, generate("policy", 10)), task(1, many)];
        let (model, job) = model_job("s", &tasks)
            .expect("merges")
            .expect("a model job");
        assert_eq!(model, "policy");
        let Job::Generate(requests) = job else {
            panic!("a generate job, got {job:?}");
        };
        let prompts: Vec<u32> = requests.iter().map(|r| r.prompt[0]).collect();
        assert_eq!(prompts, vec![10, 11, 12], "every request, in task order");

        let reply = Ok(JobOutput::Generated(vec![
            generation(10),
            generation(11),
            generation(12),
        ]));
        let replies = split_reply("s", &tasks, reply).expect("split");
        match (replies[0].generation(), replies[1].generations()) {
            (Some(a), Some(b)) if b.len() == 2 => {
                assert_eq!(a.tokens, vec![10]);
                assert_eq!(
                    b.iter().map(|g| g.tokens[0]).collect::<Vec<_>>(),
                    vec![11, 12]
                );
            }
            other => panic!("wrong replies {other:?}"),
        }
        let short = Ok(JobOutput::Generated(vec![generation(10), generation(11)]));
        let err = split_reply("s", &tasks, short).expect_err("too few generations");
        assert!(err.to_string().contains("stage `s`"), "{err}");
        assert!(
            model_job(
                "s",
                &[task(
                    2,
                    Work::Pure(Payload::Flag(FlagRecord {
                        flagged: Key::builder("p").finish(),
                        reason: String::new(),
                    }))
                )]
            )
            .expect("no error")
            .is_none(),
            "pure work is no model job"
        );
    }
}

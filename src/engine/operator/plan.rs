//! The plan: every stage of a spec built from its settings, placed (central or not) from
//! the contract each stage declares, and chained into timely operators.

use super::*;

pub(in crate::engine) enum Built {
    Model {
        name: String,
        from: Vec<String>,
        stage: Box<dyn Stage + Send + Sync>,
        batch: usize,
        after: Option<String>,
    },
    Training {
        name: String,
        from: Vec<String>,
        stage: Box<dyn TrainingStage>,
        after: Option<String>,
        state_every: u64,
    },
}

/// The stages of a spec, built and ready to attach.
pub struct Plan {
    pub(in crate::engine) stages: Vec<Built>,
    /// Per stage: run it on worker 0 only (its input exchanged there) — set for multi-worker
    /// runs by [`Plan::centralise`].
    pub(super) central: Vec<bool>,
}

impl Plan {
    /// Builds every stage of `spec` (configuration errors surface here, before any work).
    pub fn build(
        spec: &Spec,
        ctx: &StageContext,
        kinds: &[StageKind],
    ) -> Result<Plan, EngineError> {
        let mut stages = Vec::new();
        let mut earlier: Vec<&str> = Vec::new();
        for s in &spec.stages {
            let at = |message: String| {
                EngineError::Input(format!(
                    "{}:{}: stage `{}`: {message}",
                    spec.path.display(),
                    s.line,
                    s.name
                ))
            };
            let mut settings = s.settings.clone();
            // `batch` and `after` are the engine's: tasks per model job, and the gate.
            let batch = match settings.remove("batch") {
                None => 16,
                Some(toml::Value::Integer(n)) if n > 0 => n as usize,
                Some(other) => {
                    return Err(at(format!(
                        "`batch` must be a positive integer, found {other}"
                    )));
                }
            };
            let after = match settings.remove("after") {
                None => None,
                Some(toml::Value::String(a)) if earlier.contains(&a.as_str()) => Some(a),
                Some(other) => {
                    return Err(at(format!(
                        "`after` must name an earlier stage, found {other}"
                    )));
                }
            };
            // `state_every` is the engine's too: how often a training stage saves its state.
            let state_every = match settings.remove("state_every") {
                None => None,
                Some(toml::Value::Integer(n)) if n >= 0 => Some(n as u64),
                Some(other) => {
                    return Err(at(format!(
                        "`state_every` must be a non-negative integer, found {other}"
                    )));
                }
            };
            earlier.push(&s.name);
            let located = |e: StageError| {
                EngineError::Input(format!("{}:{}: {e}", spec.path.display(), s.line))
            };
            let Some(kind) = kinds.iter().find(|k| k.name == s.kind) else {
                let known: Vec<&str> = kinds.iter().map(|k| k.name).collect();
                return Err(at(format!(
                    "unknown kind `{}` (known: {})",
                    s.kind,
                    known.join(", ")
                )));
            };
            match kind.builder {
                Builder::Training(builder) => {
                    let stage = builder(&s.name, &settings, ctx).map_err(located)?;
                    let m = stage.trained_model();
                    if let Some(model) = spec.models.iter().find(|x| x.name == m)
                        && (model.dtype != crate::model::Dtype::F32 || model.quantised)
                    {
                        let format = crate::dtype::WeightFormat {
                            dtype: model.dtype,
                            quantised: model.quantised,
                        };
                        return Err(at(format!(
                            "trains model `{m}`, which is loaded as {format}; a trained model \
                             needs dtype f32"
                        )));
                    }
                    stages.push(Built::Training {
                        name: s.name.clone(),
                        from: s.from.clone(),
                        stage,
                        after,
                        state_every: state_every.unwrap_or(DEFAULT_STATE_EVERY),
                    });
                }
                Builder::Model(builder) => {
                    if state_every.is_some() {
                        return Err(at("`state_every` applies to training stages only \
                             (see `cairn stages`)"
                            .into()));
                    }
                    stages.push(Built::Model {
                        name: s.name.clone(),
                        from: s.from.clone(),
                        stage: builder(&s.name, &settings, ctx).map_err(located)?,
                        batch,
                        after,
                    });
                }
            }
        }
        let central = vec![false; stages.len()];
        Ok(Plan { stages, central })
    }

    /// The models the plan's training stages train.
    pub fn trained_models(&self) -> std::collections::HashSet<String> {
        self.stages
            .iter()
            .filter_map(|b| match b {
                Built::Training { stage, .. } => Some(stage.trained_model().to_string()),
                Built::Model { .. } => None,
            })
            .collect()
    }

    /// The models whose weights change during the run: those a training stage trains, and
    /// those a stage's setup copies weights into or out of (the RL reference and its
    /// source). Every other model is inference-only and may keep just its packed weights.
    pub fn weights_change(&self) -> std::collections::HashSet<String> {
        let mut changing = self.trained_models();
        for built in &self.stages {
            if let Built::Model { stage, .. } = built {
                for (model, job) in stage.setup() {
                    if let Job::CopyFrom(source) = job {
                        changing.insert(source);
                    }
                    changing.insert(model);
                }
            }
        }
        changing
    }

    /// The stages inside a feedback loop: those a training stage that feeds back reads from
    /// (the rollouts a PPO stage updates the policy of).
    pub fn looped(&self) -> Vec<String> {
        self.stages
            .iter()
            .filter_map(|b| match b {
                Built::Training { stage, from, .. } if stage.feeds_back().is_some() => {
                    Some(from.clone())
                }
                _ => None,
            })
            .flatten()
            .collect()
    }

    /// Marks the stages that must run on worker 0 of a multi-worker run: training stages
    /// (they see every epoch, in order), gated stages, stages in a feedback loop, and stages
    /// whose models the run trains (their weights exist only where the training ran). Every
    /// other stage runs where its epoch's prompts were fed. Returns the central stages' names.
    pub fn centralise(&mut self) -> Vec<String> {
        let trained = self.trained_models();
        let looped = self.looped();
        let mut names = Vec::new();
        for (built, central) in self.stages.iter().zip(&mut self.central) {
            let (name, is_central) = match built {
                Built::Training { name, .. } => (name, true),
                Built::Model {
                    name, stage, after, ..
                } => {
                    let uses_trained = stage.models().iter().any(|m| trained.contains(m));
                    (
                        name,
                        after.is_some() || uses_trained || looped.contains(name),
                    )
                }
            };
            *central = is_central;
            if is_central {
                names.push(name.clone());
            }
        }
        names
    }

    /// Whether any stage waits for another to finish (then only the stages before the first
    /// such stage stream with bounded lag; the engine measures progress there).
    pub fn first_gated(&self) -> Option<usize> {
        self.stages.iter().position(|b| match b {
            Built::Model { after, .. } | Built::Training { after, .. } => after.is_some(),
        })
    }

    /// Chains the operators after `stream`. Returns the final stream and the stream entering
    /// the first gated stage (the point the engine's lag is measured at).
    pub fn attach<'s>(
        self,
        stream: Stream<'s, u64, Vec<Rec>>,
        env: &Env,
        shared: &Shared,
    ) -> (Stream<'s, u64, Vec<Rec>>, Stream<'s, u64, Vec<Rec>>) {
        use timely::dataflow::operators::vec::Filter;
        use timely::dataflow::operators::{Concatenate, ConnectLoop, Exchange, Feedback};
        let scope = stream.scope();
        let first_gated = self.first_gated();
        let central = self.central.clone();
        // A feedback edge into every stage that a `ppo` stage consumes from.
        let looped = self.looped();
        let mut loops: HashMap<
            String,
            timely::dataflow::operators::feedback::Handle<'s, u64, Vec<Rec>>,
        > = HashMap::new();
        // Each operator's own outputs (not what it passes through), for the aggregates.
        let mut own = vec![stream.clone().filter(|r: &Rec| r.stage == "prompts")];
        let mut stream = stream;
        let mut lag_point = None;
        for (i, built) in self.stages.into_iter().enumerate() {
            if central[i] {
                // Everything (consumed or passing through) moves to worker 0, so each record
                // still exists exactly once downstream.
                stream = stream.exchange(|_| 0);
            }
            if Some(i) == first_gated {
                lag_point = Some(stream.clone());
            }
            let (name, next) = match built {
                Built::Model {
                    name,
                    from,
                    stage,
                    batch,
                    after,
                } => {
                    let back = if looped.contains(&name) {
                        let (handle, back) = scope.feedback::<Vec<Rec>>(1);
                        loops.insert(name.clone(), handle);
                        back
                    } else {
                        timely::dataflow::operators::generic::operator::empty(scope)
                    };
                    let out = model_operator(
                        stream,
                        back,
                        ModelOp {
                            name: name.clone(),
                            from,
                            stage,
                            batch,
                            after,
                        },
                        env.clone(),
                        shared.clone(),
                    );
                    (name, out)
                }
                Built::Training {
                    name,
                    from,
                    stage,
                    after,
                    state_every,
                } => {
                    let feeds_back = stage.feeds_back();
                    let out = training_operator(
                        stream,
                        from.clone(),
                        stage,
                        after,
                        state_every,
                        env.clone(),
                        shared.clone(),
                    );
                    if let Some(kind) = feeds_back {
                        for f in &from {
                            if let Some(handle) = loops.remove(f) {
                                let me = name.clone();
                                out.clone()
                                    .filter(move |r: &Rec| {
                                        r.stage == me && r.payload.kind() == kind
                                    })
                                    .connect_loop(handle);
                            }
                        }
                    }
                    (name, out)
                }
            };
            own.push(next.clone().filter(move |r: &Rec| r.stage == name));
            stream = next;
        }
        // A loop whose consumer came earlier than its source cannot be closed; feed it
        // nothing (the handle must be connected for the dataflow to be well-formed).
        for (_, handle) in loops {
            timely::dataflow::operators::generic::operator::empty::<u64, Vec<Rec>>(scope)
                .connect_loop(handle);
        }
        aggregates(scope.concatenate(own), shared);
        let lag_point = lag_point.unwrap_or_else(|| stream.clone());
        (stream, lag_point)
    }
}

#[cfg(test)]
mod tests {
    //! The plan read from a spec with stand-in stages: which settings are the engine's,
    //! what errors name, and which stages a multi-worker run centralises, from the
    //! contract alone.

    use std::collections::HashMap;
    use std::path::Path;
    use std::sync::Arc;

    use super::*;
    use crate::stages::{StageSettings, TrainWork};

    /// A model stage that calls the models listed in its `models` setting.
    struct Calls {
        name: String,
        models: Vec<String>,
    }

    impl Stage for Calls {
        fn name(&self) -> &str {
            &self.name
        }
        fn accepts(&self, _: &Rec) -> bool {
            false
        }
        fn plan(&self, _: &Rec) -> Result<Vec<Task>, StageError> {
            Ok(Vec::new())
        }
        fn complete(&self, _: &Task, reply: Reply) -> Result<Payload, StageError> {
            Err(StageError::Config {
                stage: self.name.clone(),
                message: format!("no work was planned, got {reply:?}"),
            })
        }
        fn models(&self) -> Vec<String> {
            self.models.clone()
        }
    }

    fn calls(
        name: &str,
        settings: &StageSettings,
        _: &StageContext,
    ) -> Result<Box<dyn Stage>, StageError> {
        let models = settings
            .get("models")
            .and_then(|m| m.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Box::new(Calls {
            name: name.to_string(),
            models,
        }))
    }

    /// A training stage that trains its `model` setting and feeds back when `loop = true`.
    struct Trains {
        name: String,
        model: String,
        feeds_back: bool,
    }

    impl TrainingStage for Trains {
        fn name(&self) -> &str {
            &self.name
        }
        fn accepts(&self, _: &Rec) -> bool {
            false
        }
        fn add_epoch(&mut self, _: Vec<Rec>) -> Result<Vec<TrainWork>, StageError> {
            Ok(Vec::new())
        }
        fn finish(&mut self) -> Result<Vec<TrainWork>, StageError> {
            Ok(Vec::new())
        }
        fn trained_model(&self) -> &str {
            &self.model
        }
        fn feeds_back(&self) -> Option<&'static str> {
            self.feeds_back.then_some("ppo_update")
        }
    }

    fn trains(
        name: &str,
        settings: &StageSettings,
        _: &StageContext,
    ) -> Result<Box<dyn TrainingStage>, StageError> {
        Ok(Box::new(Trains {
            name: name.to_string(),
            model: settings
                .get("model")
                .and_then(|m| m.as_str())
                .unwrap_or("policy")
                .to_string(),
            feeds_back: settings
                .get("loop")
                .and_then(|l| l.as_bool())
                .unwrap_or(false),
        }))
    }

    fn kinds() -> Vec<StageKind> {
        vec![
            StageKind::model("calls", "calls the models it lists", calls),
            StageKind::training("trains", "trains one model", trains),
        ]
    }

    fn context() -> StageContext {
        let constitution =
            crate::constitution::Constitution::load(Path::new("constitutions/default.toml"))
                .expect("the default constitution loads");
        StageContext {
            constitution: Arc::new(constitution),
            seed: 1,
            tokenizers: Arc::new(HashMap::new()),
        }
    }

    const MODELS: &str = "name = \"t\"\nseed = 1\nconstitution = \"c.toml\"\n[models.policy]\npath = \"p.gguf\"\n[models.judge]\npath = \"j.gguf\"\ndtype = \"bf16\"\n[prompts]\nred_team = [\"r.txt\"]\n";

    fn plan(stages: &str) -> Result<Plan, EngineError> {
        let text = format!("{MODELS}{stages}");
        let spec = Spec::parse(&text, Path::new("dataflows/t.toml")).expect("the spec parses");
        Plan::build(&spec, &context(), &kinds())
    }

    fn error(stages: &str) -> String {
        match plan(stages) {
            Ok(_) => panic!("expected the plan to be refused"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_engine_takes_its_own_settings_and_names_the_line_of_a_bad_one() {
        let e =
            error("\n[[stage]]\nname = \"a\"\nkind = \"calls\"\nfrom = [\"prompts\"]\nbatch = 0\n");
        assert!(e.contains("dataflows/t.toml:12"), "{e}");
        assert!(e.contains("`batch` must be a positive integer"), "{e}");
        let e = error(
            "\n[[stage]]\nname = \"a\"\nkind = \"calls\"\nfrom = [\"prompts\"]\nafter = \"b\"\n",
        );
        assert!(e.contains("`after` must name an earlier stage"), "{e}");
        let e = error(
            "\n[[stage]]\nname = \"a\"\nkind = \"calls\"\nfrom = [\"prompts\"]\nstate_every = 2\n",
        );
        assert!(e.contains("training stages only"), "{e}");
    }

    #[test]
    fn an_unknown_kind_lists_every_kind_of_the_registry() {
        let e = error("\n[[stage]]\nname = \"a\"\nkind = \"nope\"\nfrom = [\"prompts\"]\n");
        assert!(
            e.contains("unknown kind `nope` (known: calls, trains)"),
            "{e}"
        );
    }

    #[test]
    fn a_model_loaded_in_bf16_cannot_be_trained() {
        let e = error(
            "\n[[stage]]\nname = \"t\"\nkind = \"trains\"\nfrom = [\"prompts\"]\nmodel = \"judge\"\n",
        );
        assert!(
            e.contains("trains model `judge`, which is loaded as bf16"),
            "{e}"
        );
        assert!(
            plan("\n[[stage]]\nname = \"t\"\nkind = \"trains\"\nfrom = [\"prompts\"]\nmodel = \"policy\"\n")
                .is_ok()
        );
    }

    #[test]
    fn the_contract_alone_decides_which_stages_are_central() {
        let mut plan = plan(concat!(
            "\n[[stage]]\nname = \"free\"\nkind = \"calls\"\nfrom = [\"prompts\"]\nmodels = [\"judge\"]\n",
            "\n[[stage]]\nname = \"rollouts\"\nkind = \"calls\"\nfrom = [\"free\"]\nmodels = [\"judge\"]\n",
            "\n[[stage]]\nname = \"uses_policy\"\nkind = \"calls\"\nfrom = [\"free\"]\nmodels = [\"policy\"]\n",
            "\n[[stage]]\nname = \"gated\"\nkind = \"calls\"\nfrom = [\"free\"]\nafter = \"free\"\n",
            "\n[[stage]]\nname = \"update\"\nkind = \"trains\"\nfrom = [\"rollouts\"]\nmodel = \"policy\"\nloop = true\n",
        ))
        .expect("the plan builds");
        assert_eq!(
            plan.trained_models(),
            std::collections::HashSet::from(["policy".to_string()])
        );
        assert_eq!(plan.looped(), vec!["rollouts".to_string()]);
        assert_eq!(plan.first_gated(), Some(3));
        assert_eq!(
            plan.centralise(),
            ["rollouts", "uses_policy", "gated", "update"].map(String::from)
        );
        assert_eq!(plan.central, vec![false, true, true, true, true]);
    }

    #[test]
    fn without_training_or_gates_nothing_is_central() {
        let mut plan = plan(concat!(
            "\n[[stage]]\nname = \"a\"\nkind = \"calls\"\nfrom = [\"prompts\"]\nmodels = [\"policy\"]\n",
            "\n[[stage]]\nname = \"b\"\nkind = \"calls\"\nfrom = [\"a\"]\nmodels = [\"judge\"]\n",
        ))
        .expect("the plan builds");
        assert!(plan.centralise().is_empty());
        assert_eq!(plan.first_gated(), None);
        assert!(plan.looped().is_empty());
    }
}

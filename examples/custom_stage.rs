//! Adding a stage of your own: `flag` marks answers that contain any word of a list, as
//! events of a record kind of its own (`word_hit`, carried as an `extension` record), without
//! model work and without editing the crate. It shows the whole recipe — define the record,
//! implement [`Stage`], give it a builder, list it next to the built-in kinds, name it in a
//! spec:
//!
//! ```toml
//! [[stage]]
//! name = "flag"
//! kind = "flag"
//! from = ["sample", "revise_2"]
//! words = ["bleach", "password"]
//! ```
//!
//! Run it on the default model (after `scripts/setup`):
//! `cargo run --example custom_stage -- dataflows/sl_cai.toml runs/flagged`
//! (the spec gets a `flag` stage appended after `sample` when it has none).

use std::path::PathBuf;

use cairn::engine::{self, RunOptions};
use cairn::record::{ExtensionRecord, Key, Payload};
use cairn::spec::Spec;
use cairn::stages::{
    Rec, Reply, Stage, StageContext, StageError, StageKind, StageSettings, Task, Work,
    parse_settings, registry,
};

/// The stage's own record kind: which answer was flagged, and for which word.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WordHit {
    /// Key of the flagged answer.
    pub flagged: Key,
    /// The first listed word it contains.
    pub word: String,
}

/// The kind name of [`WordHit`] records.
pub const WORD_HIT: &str = "word_hit";

/// Flags answers (samples and revisions) containing any of `words` (case-insensitive).
pub struct FlagStage {
    name: String,
    words: Vec<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    words: Vec<String>,
}

/// The builder the registry line points at.
pub fn build(
    name: &str,
    settings: &StageSettings,
    _ctx: &StageContext,
) -> Result<Box<dyn Stage>, StageError> {
    let s: Settings = parse_settings(name, settings)?;
    if s.words.is_empty() {
        return Err(StageError::Config {
            stage: name.to_string(),
            message: "`words` must name at least one word".into(),
        });
    }
    Ok(Box::new(FlagStage {
        name: name.to_string(),
        words: s.words.iter().map(|w| w.to_lowercase()).collect(),
    }))
}

/// The registry line: the kind's name in specs, what it does, its builder.
pub fn kind() -> StageKind {
    StageKind::model(
        "flag",
        "flag answers that contain any word of a list",
        build,
    )
}

fn answer(rec: &Rec) -> Option<&str> {
    match &rec.payload {
        Payload::Sample(s) => Some(&s.response),
        Payload::Revision(r) => Some(&r.response),
        _ => None,
    }
}

impl Stage for FlagStage {
    fn name(&self) -> &str {
        &self.name
    }

    fn accepts(&self, rec: &Rec) -> bool {
        answer(rec).is_some()
    }

    /// The contract the engine reads: this stage calls no model.
    fn models(&self) -> Vec<String> {
        Vec::new()
    }

    fn plan(&self, rec: &Rec) -> Result<Vec<Task>, StageError> {
        let text = answer(rec).unwrap_or_default().to_lowercase();
        let Some(word) = self.words.iter().find(|w| text.contains(w.as_str())) else {
            return Ok(Vec::new());
        };
        let hit = WordHit {
            flagged: rec.key,
            word: word.clone(),
        };
        let record = ExtensionRecord::new(WORD_HIT, &hit).map_err(|e| StageError::Record {
            stage: self.name.clone(),
            key: rec.key,
            message: e.to_string(),
        })?;
        Ok(vec![Task {
            key: Key::builder(&self.name).key(rec.key).str(word).finish(),
            input: rec.clone(),
            history: Vec::new(),
            work: Work::Pure(Payload::Extension(record)),
        }])
    }

    fn complete(&self, _task: &Task, reply: Reply) -> Result<Payload, StageError> {
        match reply {
            Reply::Pure(p) => Ok(p),
            _ => Err(StageError::Config {
                stage: self.name.clone(),
                message: "flag does no model work".into(),
            }),
        }
    }
}

#[allow(dead_code)]
fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let spec_path = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "dataflows/sl_cai.toml".into()),
    );
    let log = PathBuf::from(args.next().unwrap_or_else(|| "runs/flagged".into()));
    let mut text = std::fs::read_to_string(&spec_path)?;
    if !text.contains("kind = \"flag\"") {
        text.push_str("\n[[stage]]\nname = \"flag\"\nkind = \"flag\"\nfrom = \"sample\"\nwords = [\"sorry\", \"cannot\", \"illegal\"]\n");
    }
    let spec = Spec::parse(&text, &spec_path)?;
    let mut kinds = registry();
    kinds.push(kind());
    let summary = engine::run_with(
        &spec,
        &RunOptions {
            log: log.clone(),
            device: tch::Device::Cpu,
            new_run: true,
            stop: None,
            progress: None,
            parent: None,
            cluster: None,
        },
        &kinds,
    )?;
    println!("{:?}", summary.stages.get("flag"));
    println!(
        "see the flags: cairn log cat {} --stage flag",
        log.display()
    );
    Ok(())
}

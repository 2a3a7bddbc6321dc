//! Dataflow specs (`dataflows/*.toml`): the models, constitution, prompt sources, seed and
//! the chain of stages of a run, with each stage's settings. Parsing rejects unknown keys,
//! unknown stage kinds and wiring mistakes (a `from` naming no earlier stage), naming the file
//! and line. Stage kinds are checked against the registry when the engine builds the stages.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A parsed dataflow spec.
#[derive(Clone, Debug)]
pub struct Spec {
    /// The file it came from.
    pub path: PathBuf,
    /// Its text (recorded in the run's first event).
    pub text: String,
    /// Run name.
    pub name: String,
    /// Master seed.
    pub seed: u64,
    /// Constitution file (resolved against the spec's folder).
    pub constitution: PathBuf,
    /// Models by name.
    pub models: Vec<ModelSpec>,
    /// Prompt sources.
    pub prompts: PromptsSpec,
    /// Stages in order.
    pub stages: Vec<StageSpec>,
    /// Let the model worker merge chunks of different stages (e.g. a critique chunk and a
    /// sample chunk) into one model call: faster, but floating-point results then depend on
    /// timing, so events are no longer bit-identical across runs and resumes. Default off.
    pub merge_model_calls: bool,
}

/// A model of the run.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    /// Name stages refer to.
    pub name: String,
    /// GGUF file or model directory; `default` for the fetched default model, `feedback`
    /// for the fetched feedback model.
    pub path: PathBuf,
    /// Serve an instant stand-in (no computation; the file gives only the tokenizer): for
    /// measuring the engine's own overhead.
    pub instant: bool,
    /// Give the model a scalar head (zero-initialised when the file has none): the
    /// preference model.
    pub score_head: bool,
    /// Number format of the weight matrices (`dtype = "bf16"` for faster inference; a model
    /// a stage trains must stay `f32`).
    pub dtype: crate::dtype::Dtype,
    /// Keep the GGUF file's quantised blocks instead of dequantised matrices (`dtype =
    /// "quantised"`, computing in bf16, or `"quantised-f32"`): the same results in about the
    /// file's size, for a model nothing in the run trains or copies into.
    pub quantised: bool,
    /// Compute the common prefix of a batch's prompts (the few-shot examples) once and share
    /// its keys and values across the rows (`share_prefix = true`): much less prefill for
    /// critique, revision and judge calls; results within floating-point rounding of the
    /// unshared path (still deterministic run to run).
    pub share_prefix: bool,
    /// The most sequences a generation call decodes at once (`decode_rows = 8`); a stage
    /// whose `batch` is larger sends that many requests per call, and each one that
    /// finishes makes room for the next (continuous batching). Unset: a call decodes all
    /// its requests together and the batch thins out as they finish.
    pub decode_rows: Option<usize>,
    /// Keep the unpacked projection matrices of a model that nothing in the run trains or
    /// copies into (`keep_unpacked = true`). By default, on the CPU, such a model keeps only
    /// the packed copy its products read: the same results with the weights held once.
    pub keep_unpacked: bool,
}

/// Where prompts come from.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptsSpec {
    /// Red-team prompt files (`default`: the fetched red-team sets).
    #[serde(default)]
    pub red_team: Vec<String>,
    /// Helpful prompt files (`default`: the fetched helpful sets).
    #[serde(default)]
    pub helpful: Vec<String>,
    /// Use at most this many red-team prompts (in file order).
    pub red_team_limit: Option<usize>,
    /// Use at most this many helpful prompts.
    pub helpful_limit: Option<usize>,
    /// Skip this many red-team prompts first (e.g. those a training run used).
    #[serde(default)]
    pub red_team_skip: usize,
    /// Skip this many helpful prompts first.
    #[serde(default)]
    pub helpful_skip: usize,
    /// Prompts per dataflow epoch (the unit of progress and of SFT batching order).
    #[serde(default = "default_epoch_size")]
    pub epoch_size: usize,
    /// Keep reading the files for appended prompts until interrupted.
    #[serde(default)]
    pub follow: bool,
    /// Prompt files (any format a prompt source may have) whose texts are left out — e.g.
    /// every prompt a training run saw, so an evaluation is disjoint from it by text.
    /// Skips and limits count only the prompts kept.
    #[serde(default)]
    pub exclude: Vec<String>,
}

fn default_epoch_size() -> usize {
    8
}

/// One stage instance.
#[derive(Clone, Debug)]
pub struct StageSpec {
    /// Unique name.
    pub name: String,
    /// Stage kind (see `cairn stages`).
    pub kind: String,
    /// Names of the stages (or `prompts`) whose records it consumes.
    pub from: Vec<String>,
    /// The remaining keys: the stage's own settings.
    pub settings: toml::Table,
    /// Line of the `[[stage]]` entry, for messages.
    pub line: usize,
}

/// A spec that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}:{line}: {message}")]
pub struct SpecError {
    /// The file.
    pub path: PathBuf,
    /// 1-based line (0 when unknown).
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    name: String,
    seed: u64,
    constitution: String,
    models: toml::Table,
    prompts: PromptsSpec,
    #[serde(rename = "stage")]
    stages: Vec<toml::Table>,
    #[serde(default)]
    merge_model_calls: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    path: String,
    #[serde(default)]
    instant: bool,
    #[serde(default)]
    score_head: bool,
    #[serde(default)]
    dtype: Option<String>,
    #[serde(default)]
    share_prefix: bool,
    #[serde(default)]
    decode_rows: Option<usize>,
    #[serde(default)]
    keep_unpacked: bool,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

impl Spec {
    /// Points model `name` at `path` (a `--model NAME=PATH` override); an unknown name is an
    /// error listing the spec's models.
    pub fn set_model_path(&mut self, name: &str, path: PathBuf) -> Result<(), String> {
        let Some(model) = self.models.iter_mut().find(|m| m.name == name) else {
            let known: Vec<&str> = self.models.iter().map(|m| m.name.as_str()).collect();
            return Err(format!(
                "{} has no model `{name}` (it has: {})",
                self.path.display(),
                known.join(", ")
            ));
        };
        model.path = path;
        Ok(())
    }

    /// Reads and checks a spec file.
    pub fn load(path: &Path) -> Result<Spec, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|e| SpecError {
            path: path.to_path_buf(),
            line: 0,
            message: e.to_string(),
        })?;
        Spec::parse(&text, path)
    }

    /// Parses spec text; `path` names it in errors and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Spec, SpecError> {
        let err = |line: usize, message: String| SpecError {
            path: path.to_path_buf(),
            line,
            message,
        };
        let raw: RawSpec = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(0);
            err(line, e.message().to_string())
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let models_line = text.find("[models").map(|o| line_of(text, o)).unwrap_or(0);
        // `[[stage]]` headers in order give each entry's line.
        let stage_lines: Vec<usize> = text
            .match_indices("[[stage]]")
            .filter(|(o, _)| {
                text[..*o]
                    .rsplit('\n')
                    .next()
                    .is_some_and(|l| l.trim().is_empty())
            })
            .map(|(o, _)| line_of(text, o))
            .collect();
        let mut models = Vec::new();
        for (name, value) in &raw.models {
            let m: RawModel = value.clone().try_into().map_err(|e: toml::de::Error| {
                err(models_line, format!("model `{name}`: {}", e.message()))
            })?;
            let path = crate::paths::named_model(&m.path).unwrap_or_else(|| resolve(base, &m.path));
            let format: crate::dtype::WeightFormat = match &m.dtype {
                None => Default::default(),
                Some(d) => d
                    .parse()
                    .map_err(|e: String| err(models_line, format!("model `{name}`: {e}")))?,
            };
            if m.decode_rows == Some(0) {
                return Err(err(
                    models_line,
                    format!("model `{name}`: decode_rows must be at least 1"),
                ));
            }
            if format.quantised && m.keep_unpacked {
                return Err(err(
                    models_line,
                    format!(
                        "model `{name}`: dtype `{format}` keeps only quantised blocks, which \
                         keep_unpacked = true contradicts"
                    ),
                ));
            }
            models.push(ModelSpec {
                name: name.clone(),
                path,
                instant: m.instant,
                score_head: m.score_head,
                share_prefix: m.share_prefix,
                decode_rows: m.decode_rows,
                keep_unpacked: m.keep_unpacked,
                dtype: format.dtype,
                quantised: format.quantised,
            });
        }
        if models.is_empty() {
            return Err(err(
                models_line,
                "at least one model is needed under [models]".into(),
            ));
        }
        if raw.prompts.epoch_size == 0 {
            return Err(err(0, "prompts.epoch_size must be at least 1".into()));
        }
        let mut seen: HashSet<String> = HashSet::from(["prompts".to_string()]);
        let mut stages = Vec::new();
        for (i, mut table) in raw.stages.into_iter().enumerate() {
            let line = stage_lines.get(i).copied().unwrap_or(0);
            let mut take_str = |key: &str| -> Result<String, SpecError> {
                match table.remove(key) {
                    Some(toml::Value::String(s)) => Ok(s),
                    Some(other) => Err(err(
                        line,
                        format!("stage `{key}` must be a string, found {}", other.type_str()),
                    )),
                    None => Err(err(line, format!("stage entry is missing `{key}`"))),
                }
            };
            let name = take_str("name")?;
            let kind = take_str("kind")?;
            let from = match table.remove("from") {
                Some(toml::Value::String(s)) => vec![s],
                Some(toml::Value::Array(items)) => items
                    .into_iter()
                    .map(|v| match v {
                        toml::Value::String(s) => Ok(s),
                        other => Err(err(
                            line,
                            format!("`from` items must be strings, found {}", other.type_str()),
                        )),
                    })
                    .collect::<Result<_, _>>()?,
                Some(other) => {
                    return Err(err(
                        line,
                        format!(
                            "`from` must be a string or a list, found {}",
                            other.type_str()
                        ),
                    ));
                }
                None => return Err(err(line, format!("stage `{name}` is missing `from`"))),
            };
            for f in &from {
                if !seen.contains(f) {
                    return Err(err(
                        line,
                        format!(
                            "stage `{name}` reads from `{f}`, which is not `prompts` or an earlier stage"
                        ),
                    ));
                }
            }
            if !seen.insert(name.clone()) {
                return Err(err(line, format!("stage name `{name}` is used twice")));
            }
            stages.push(StageSpec {
                name,
                kind,
                from,
                settings: table,
                line,
            });
        }
        if stages.is_empty() {
            return Err(err(0, "a dataflow needs at least one [[stage]]".into()));
        }
        Ok(Spec {
            path: path.to_path_buf(),
            text: text.to_string(),
            name: raw.name,
            seed: raw.seed,
            constitution: resolve(base, &raw.constitution),
            models,
            prompts: raw.prompts,
            stages,
            merge_model_calls: raw.merge_model_calls,
        })
    }
}

/// Rewrites spec text for use from another folder, with changed settings: relative paths
/// (constitution, model paths, prompt files) become absolute paths resolved against `base`
/// (the original spec's folder), then each `key=value` in `sets` is applied. Keys are dotted
/// paths into the spec (`seed`, `constitution`, `models.pm.path`, `prompts.red_team_limit`);
/// `stage.NAME.KEY` addresses a stage's setting by the stage's name. Values are TOML
/// (`3`, `1e-5`, `true`, `["a", "b"]`); anything else is taken as a string. Comments are not
/// kept.
///
/// ```
/// use cairn::spec::rewrite;
/// let text = "name = \"x\"\nseed = 1\nconstitution = \"c.toml\"\n[[stage]]\nname = \"s\"\nlr = 1.0\n";
/// let out = rewrite(text, std::path::Path::new("/runs"), &[("stage.s.lr".into(), "0.5".into()),
///     ("seed".into(), "7".into())]).unwrap();
/// assert!(out.contains("constitution = \"/runs/c.toml\"") && out.contains("lr = 0.5") && out.contains("seed = 7"));
/// ```
pub fn rewrite(text: &str, base: &Path, sets: &[(String, String)]) -> Result<String, String> {
    let mut doc: toml::Table = toml::from_str(text).map_err(|e| e.message().to_string())?;
    let absolute = |v: &mut toml::Value| {
        if let toml::Value::String(p) = v
            && !crate::paths::is_model_name(p)
        {
            *p = resolve(base, p).display().to_string();
        }
    };
    if let Some(c) = doc.get_mut("constitution") {
        absolute(c);
    }
    if let Some(toml::Value::Table(models)) = doc.get_mut("models") {
        for (_, m) in models.iter_mut() {
            if let Some(p) = m.get_mut("path") {
                absolute(p);
            }
        }
    }
    if let Some(toml::Value::Table(prompts)) = doc.get_mut("prompts") {
        for key in ["red_team", "helpful"] {
            if let Some(toml::Value::Array(files)) = prompts.get_mut(key) {
                files.iter_mut().for_each(absolute);
            }
        }
    }
    for (key, value) in sets {
        let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.clone()));
        let parts: Vec<&str> = key.split('.').collect();
        let (table, leaf) = match parts.as_slice() {
            ["stage", name, leaf] => {
                let stages = doc
                    .get_mut("stage")
                    .and_then(|v| v.as_array_mut())
                    .ok_or_else(|| "the spec has no [[stage]] entries".to_string())?;
                let stage = stages
                    .iter_mut()
                    .filter_map(|s| s.as_table_mut())
                    .find(|s| s.get("name").and_then(|n| n.as_str()) == Some(name))
                    .ok_or_else(|| format!("`{key}`: no stage named `{name}`"))?;
                (stage, *leaf)
            }
            [path @ .., leaf] if !path.is_empty() || !leaf.is_empty() => {
                let mut table = &mut doc;
                for p in path {
                    table = table
                        .entry(p.to_string())
                        .or_insert_with(|| toml::Value::Table(Default::default()))
                        .as_table_mut()
                        .ok_or_else(|| format!("`{key}`: `{p}` is not a table"))?;
                }
                (table, *leaf)
            }
            _ => return Err(format!("`{key}`: expected a dotted key")),
        };
        let mut value = parsed;
        // A path given on the command line is relative to where the command runs.
        if (leaf == "constitution" || leaf == "path")
            && let toml::Value::String(p) = &mut value
            && !crate::paths::is_model_name(p)
            && let Ok(cwd) = std::env::current_dir()
        {
            *p = resolve(&cwd, p).display().to_string();
        }
        table.insert(leaf.to_string(), value);
    }
    toml::to_string(&doc).map_err(|e| e.to_string())
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let expanded = p.replace(
        "$CAIRN_HOME",
        &crate::paths::cairn_home().display().to_string(),
    );
    let path = PathBuf::from(expanded);
    if path.is_absolute() {
        path
    } else {
        base.join(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "t"
seed = 1
constitution = "c.toml"
[models.policy]
path = "m.gguf"
[prompts]
red_team = ["a.txt"]
[[stage]]
name = "sample"
kind = "sample"
from = "prompts"
max_new_tokens = 8
[[stage]]
name = "critique_1"
kind = "critique"
from = ["sample"]
round = 1
"#;

    #[test]
    fn a_good_spec_parses_with_stage_settings_and_lines() {
        let spec = Spec::parse(GOOD, Path::new("/x/flow.toml")).expect("parses");
        assert_eq!(spec.stages.len(), 2);
        assert_eq!(
            spec.stages[0]
                .settings
                .get("max_new_tokens")
                .and_then(|v| v.as_integer()),
            Some(8)
        );
        assert_eq!(spec.stages[1].line, 14);
        assert_eq!(spec.constitution, PathBuf::from("/x/c.toml"));
        assert_eq!(spec.models[0].path, PathBuf::from("/x/m.gguf"));
    }

    #[test]
    fn mistakes_name_file_and_line() {
        let unknown = GOOD.replace("seed = 1", "seed = 1\ncolour = 2");
        let e = Spec::parse(&unknown, Path::new("f.toml")).expect_err("unknown key");
        assert!(
            e.to_string().starts_with("f.toml:4:") && e.to_string().contains("colour"),
            "{e}"
        );
        let wiring = GOOD.replace("from = [\"sample\"]", "from = [\"samples\"]");
        let e = Spec::parse(&wiring, Path::new("f.toml")).expect_err("wiring");
        assert!(
            e.to_string().starts_with("f.toml:14:") && e.to_string().contains("samples"),
            "{e}"
        );
        let dup = GOOD.replace("name = \"critique_1\"", "name = \"sample\"");
        assert!(
            Spec::parse(&dup, Path::new("f.toml"))
                .expect_err("dup")
                .to_string()
                .contains("twice")
        );
        let e = Spec::parse("name = 3", Path::new("f.toml")).expect_err("type");
        assert!(e.to_string().starts_with("f.toml:1:"), "{e}");
    }
}

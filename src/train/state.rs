//! Training state on disk: a model's variables exactly as they are in memory (value head
//! included), the moments and step counts of each of its optimisers ([`super::adamw`]), and
//! a small manifest — everything a resumed run needs to continue a training stage from this
//! point bit for bit. A state directory appears whole or not at all: it is written under a
//! temporary name, every file is synced, and then it is renamed into place and its parent
//! synced.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::sft::Trainer;
use crate::model::ModelError;
use crate::model::llama::Llama;

/// File of the model's variables in a state directory.
pub const WEIGHTS_FILE: &str = "weights.safetensors";
/// File of the manifest in a state directory.
pub const MANIFEST_FILE: &str = "state.json";

/// What a state directory holds besides tensors.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    /// Whether the model had a value/score head (it is added before loading).
    score_head: bool,
    /// Each optimiser of the model: its purpose ("sft", "pm", "ppo") and steps taken.
    trainers: Vec<(String, u64)>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn optimizer_file(purpose: &str) -> String {
    format!("optimizer-{purpose}.safetensors")
}

fn sync_file(path: &Path) -> Result<(), ModelError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))
}

/// Writes `model`'s training state into `dir` (replacing one left there), atomically.
/// `trainers` are the model's optimisers by purpose. Returns the files, in a fixed order.
pub fn save(
    model: &Llama,
    trainers: &[(&str, &Trainer)],
    dir: &Path,
) -> Result<Vec<PathBuf>, ModelError> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "state".into());
    let parent = dir.parent().unwrap_or(Path::new("."));
    let temp = parent.join(format!(".{name}.partial"));
    if temp.exists() {
        std::fs::remove_dir_all(&temp).map_err(io(&temp))?;
    }
    std::fs::create_dir_all(&temp).map_err(io(&temp))?;
    let mut names = vec![WEIGHTS_FILE.to_string()];
    model
        .var_store()
        .save(temp.join(WEIGHTS_FILE))
        .map_err(ModelError::Torch)?;
    let mut sorted: Vec<&(&str, &Trainer)> = trainers.iter().collect();
    sorted.sort_by_key(|(purpose, _)| *purpose);
    for (purpose, trainer) in &sorted {
        let file = optimizer_file(purpose);
        trainer.opt.save(&temp.join(&file))?;
        names.push(file);
    }
    let manifest = Manifest {
        score_head: model.has_score_head(),
        trainers: sorted
            .iter()
            .map(|(p, t)| (p.to_string(), t.steps))
            .collect(),
    };
    let manifest_path = temp.join(MANIFEST_FILE);
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| ModelError::Weights {
        path: manifest_path.clone(),
        message: e.to_string(),
    })?;
    std::fs::write(&manifest_path, text).map_err(io(&manifest_path))?;
    names.push(MANIFEST_FILE.to_string());
    for n in &names {
        sync_file(&temp.join(n))?;
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(io(dir))?;
    }
    std::fs::rename(&temp, dir).map_err(io(dir))?;
    sync_file(parent)?;
    Ok(names.iter().map(|n| dir.join(n)).collect())
}

/// Restores a state [`save`] wrote into `model` (adding its value head when the state has
/// one) and returns each optimiser's purpose, step count and moments file, for the caller
/// to load into its trainers.
pub fn load(model: &mut Llama, dir: &Path) -> Result<Vec<(String, u64, PathBuf)>, ModelError> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&manifest_path).map_err(io(&manifest_path))?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| ModelError::Weights {
        path: manifest_path.clone(),
        message: format!("not a training-state manifest: {e}"),
    })?;
    if manifest.score_head {
        model.ensure_score_head();
    }
    let weights = dir.join(WEIGHTS_FILE);
    model
        .var_store_mut()
        .load(&weights)
        .map_err(|e| ModelError::Weights {
            path: weights.clone(),
            message: e.to_string(),
        })?;
    Ok(manifest
        .trainers
        .into_iter()
        .map(|(purpose, steps)| {
            let file = dir.join(optimizer_file(&purpose));
            (purpose, steps, file)
        })
        .collect())
}

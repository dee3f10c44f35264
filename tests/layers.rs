//! The house: the files of src/ sit in layers, wiring (main, server) over
//! the stages over the state layer over the libraries they all use, and
//! the `use crate::...` imports between files form no cycle. No function
//! in src/ is longer than 150 lines. (README, "Layout".)
//!
//! A file-level import graph read from the source text: `crate::a::b`
//! paths (in `use` lines and in code) and `super::` paths, resolved to the
//! file of the longest module prefix. Test modules (`#[cfg(test)]` to the
//! end of a file) are left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layer of a file, from the bottom (0) up.
fn layer(file: &str) -> (u8, &'static str) {
    const WIRING: &[&str] = &["main.rs", "lib.rs", "server.rs"];
    const LIBRARIES: &[&str] = &[
        "budget.rs",
        "config.rs",
        "dkim.rs",
        "dns.rs",
        "http.rs",
        "limit.rs",
        "live.rs",
        "mime.rs",
        "notify.rs",
        "replies.rs",
        "reply.rs",
        "report.rs",
        "rewrite.rs",
        "shutdown.rs",
        "tls.rs",
        "token.rs",
    ];
    if WIRING.contains(&file) {
        (3, "wiring")
    } else if file.starts_with("state/") {
        (1, "state")
    } else if LIBRARIES.contains(&file) {
        (0, "libraries")
    } else {
        (2, "stages")
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module path of a file: src/a/b.rs -> [a, b]; src/a/mod.rs -> [a].
fn module_of(rel: &str) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .trim_end_matches(".rs")
        .split('/')
        .map(String::from)
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// The source without comments and test modules.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Paths that follow `prefix` in `text`: "crate::a::b::{c, d}" gives
/// [a, b, c] and [a, b, d].
fn paths_after(text: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(i) = text[from..].find(prefix) {
        let start = from + i;
        from = start + prefix.len();
        if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
            continue;
        }
        let mut path = Vec::new();
        let mut j = from;
        loop {
            let k = text[j..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(text.len(), |k| j + k);
            if k == j {
                break;
            }
            path.push(text[j..k].to_string());
            if text[k..].starts_with("::{") {
                let end = text[k..].find('}').map_or(text.len(), |e| k + e);
                for item in text[k + 3..end].split(',') {
                    let first = item.trim().split("::").next().unwrap_or("");
                    let first = first.split_whitespace().next().unwrap_or("");
                    if !first.is_empty() && first != "self" {
                        let mut p = path.clone();
                        p.push(first.to_string());
                        out.push(p);
                    }
                }
                break;
            }
            if text[k..].starts_with("::") {
                j = k + 2;
            } else {
                break;
            }
        }
        if !path.is_empty() {
            out.push(path);
        }
    }
    out
}

struct House {
    /// file (relative to src/) -> files it imports
    edges: BTreeMap<String, BTreeSet<String>>,
    /// (lines, file, function) of every function
    functions: Vec<(usize, String, String)>,
}

fn house() -> House {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let rel = |p: &Path| {
        p.strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/")
    };
    let modules: BTreeMap<Vec<String>, String> = files
        .iter()
        .map(|p| rel(p))
        .filter(|r| r != "main.rs")
        .map(|r| (module_of(&r), r))
        .collect();
    let resolve = |parts: &[String]| -> Option<String> {
        (1..=parts.len())
            .rev()
            .find_map(|k| modules.get(&parts[..k]).cloned())
    };
    let mut edges = BTreeMap::new();
    let mut functions = Vec::new();
    for p in &files {
        let r = rel(p);
        let text = std::fs::read_to_string(p).unwrap();
        functions.extend(
            long_functions(&text)
                .into_iter()
                .map(|(n, f)| (n, r.clone(), f)),
        );
        let me = module_of(&r);
        let c = code(&text);
        let mut to = BTreeSet::new();
        let mut targets: Vec<Vec<String>> = paths_after(&c, "crate::");
        let parent: Vec<String> = me[..me.len().saturating_sub(1)].to_vec();
        for p in paths_after(&c, "super::") {
            targets.push(parent.iter().cloned().chain(p).collect());
        }
        for t in targets {
            if let Some(f) = resolve(&t) {
                if f != r {
                    to.insert(f);
                }
            }
        }
        edges.insert(r, to);
    }
    House { edges, functions }
}

/// Every function of `text` with its length in lines (from `fn` to the
/// brace that closes it at the same indentation).
fn long_functions(text: &str) -> Vec<(usize, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim_start();
        let indent = &l[..l.len() - t.len()];
        let mut rest = t;
        for q in [
            "pub(crate) ",
            "pub(super) ",
            "pub ",
            "const ",
            "async ",
            "unsafe ",
        ] {
            rest = rest.strip_prefix(q).unwrap_or(rest);
            rest = rest.strip_prefix(q).unwrap_or(rest);
        }
        let Some(sig) = rest.strip_prefix("fn ") else {
            continue;
        };
        let name: String = sig
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        // A declaration without a body (in a trait) ends with ';'.
        let Some(open) = (i..lines.len()).find(|&j| {
            let s = lines[j].trim_end();
            s.ends_with('{') || s.ends_with(';')
        }) else {
            continue;
        };
        if lines[open].trim_end().ends_with(';') {
            continue;
        }
        let close = format!("{indent}}}");
        if let Some(end) = (open + 1..lines.len()).find(|&j| lines[j].trim_end() == close) {
            out.push((end - i + 1, name));
        }
    }
    out
}

/// Strongly connected components of more than one file (Tarjan).
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        let n = t.index.len();
        t.index.insert(v, n);
        t.low.insert(v, n);
        t.stack.push(v);
        t.on.insert(v);
        let edges = t.edges;
        for w in edges.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = t.stack.pop().unwrap();
                t.on.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

#[test]
fn the_imports_between_files_form_no_cycle() {
    let h = house();
    assert!(h.edges.len() > 40, "src/ was read: {} files", h.edges.len());
    // The reader sees imports: delivery uses the state layer.
    assert!(h.edges["delivery/attempt.rs"].contains("state/ledger.rs"));
    let c = cycles(&h.edges);
    assert!(
        c.is_empty(),
        "files that import each other in a circle: {c:?}"
    );
}

#[test]
fn files_import_only_their_own_layer_and_those_below() {
    let h = house();
    let mut against = Vec::new();
    for (from, tos) in &h.edges {
        for to in tos {
            let (lf, nf) = layer(from);
            let (lt, nt) = layer(to);
            if lt > lf {
                against.push(format!("{from} ({nf}) -> {to} ({nt})"));
            }
        }
    }
    // Nothing in the state layer imports a stage.
    assert!(
        !against.iter().any(|a| a.starts_with("state/")),
        "{against:#?}"
    );
    assert!(
        against.len() <= 3,
        "imports against the layers: {against:#?}"
    );
}

#[test]
fn no_function_is_longer_than_150_lines() {
    let h = house();
    assert!(
        h.functions
            .iter()
            .any(|(n, f, _)| *n > 20 && f == "state/ledger.rs"),
        "functions were measured"
    );
    let long: Vec<_> = h.functions.iter().filter(|(n, ..)| *n > 150).collect();
    assert!(long.is_empty(), "functions over 150 lines: {long:?}");
}

#[test]
fn a_circle_of_imports_is_found() {
    let e = |pairs: &[(&str, &str)]| {
        let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in pairs {
            m.entry(a.to_string()).or_default().insert(b.to_string());
            m.entry(b.to_string()).or_default();
        }
        m
    };
    let found = cycles(&e(&[("a", "b"), ("b", "c"), ("c", "a"), ("d", "a")]));
    assert_eq!(found, vec![vec!["a".to_string(), "b".into(), "c".into()]]);
    assert!(cycles(&e(&[("a", "b"), ("b", "c"), ("d", "a")])).is_empty());
}

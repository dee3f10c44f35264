//! The documentation cannot drift: every configuration key of the code is
//! in docs/configuration.md and nothing else is, and every relative link in
//! README.md and docs/ leads to a file of the repository.

use std::collections::BTreeSet;
use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The section each raw struct of src/config.rs is read from.
fn section_of(raw_struct: &str) -> Option<&'static str> {
    Some(match raw_struct {
        "Config" => "top level",
        "Listen" => "[listen]",
        "Tls" => "[listen] tls",
        "User" => "[[listen.users]]",
        "Storage" => "[storage]",
        "Sender" => "[sender]",
        "Dkim" => "[[dkim]]",
        "Delivery" => "[delivery]",
        "Upstream" => "[upstreams.NAME]",
        "Route" => "[[routes]]",
        "Tracking" => "[tracking]",
        "Control" => "[control]",
        "Dns" => "[dns]",
        "Webhook" => "[[webhooks]]",
        "Api" => "[api]",
        "Bounces" => "[bounces]",
        "Cluster" => "[cluster]",
        "Tenant" => "[[tenants]]",
        _ => return None,
    })
}

/// (section, key) of every field of the `raw` structs serde reads the file
/// into (a field of Config whose type is a section is the section itself).
fn keys_in_code() -> BTreeSet<(String, String)> {
    let code = std::fs::read_to_string(root().join("src/config.rs")).unwrap();
    let start = code.find("mod raw {").expect("mod raw in src/config.rs");
    let mut out = BTreeSet::new();
    let mut current: Option<&str> = None;
    let mut depth = 0i32;
    for line in code[start..].lines() {
        let t = line.trim();
        depth += t.matches('{').count() as i32 - t.matches('}').count() as i32;
        if depth <= 0 && t.starts_with('}') {
            break;
        }
        if let Some(rest) = t.strip_prefix("pub struct ") {
            let name = rest.split([' ', '{']).next().unwrap();
            current =
                Some(section_of(name).unwrap_or_else(|| {
                    panic!("raw struct {name}: add its section to tests/docs.rs")
                }));
            continue;
        }
        let Some(section) = current else { continue };
        if let Some(field) = t.strip_prefix("pub ") {
            let Some((name, ty)) = field.split_once(':') else {
                continue;
            };
            let ty = ty.trim();
            if section == "top level"
                && ty.chars().any(|c| c.is_ascii_uppercase())
                && !ty.starts_with("Option<String")
            {
                continue;
            }
            out.insert((section.to_string(), name.trim().to_string()));
        }
    }
    out
}

/// (section, key) of the tables of docs/configuration.md: a `### ` heading
/// names the section, a row's first cell the key.
fn keys_in_docs() -> BTreeSet<(String, String)> {
    let text = std::fs::read_to_string(root().join("docs/configuration.md")).unwrap();
    let mut out = BTreeSet::new();
    let mut section = String::new();
    for line in text.lines() {
        if let Some(h) = line.strip_prefix("### ") {
            section = h.trim().trim_matches('`').to_string();
            continue;
        }
        if let Some(row) = line.strip_prefix("| `") {
            let key = row.split('`').next().unwrap();
            out.insert((section.clone(), key.to_string()));
        }
    }
    out
}

#[test]
fn every_configuration_key_is_documented_and_only_those() {
    let code = keys_in_code();
    let docs = keys_in_docs();
    assert!(
        code.len() > 70,
        "{} keys found in src/config.rs",
        code.len()
    );
    let missing: Vec<_> = code.difference(&docs).collect();
    let extra: Vec<_> = docs.difference(&code).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "in the code, not in docs/configuration.md: {missing:?}\nin docs/configuration.md, not in the code: {extra:?}"
    );
}

/// Relative link targets of a markdown text: `](target)`.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("](") {
        rest = &rest[i + 2..];
        let Some(end) = rest.find(')') else { break };
        let target = &rest[..end];
        if !target.contains("://") && !target.starts_with('#') && !target.starts_with("mailto:") {
            out.push(target.split('#').next().unwrap().to_string());
        }
        rest = &rest[end..];
    }
    out
}

#[test]
fn every_link_in_the_documentation_resolves() {
    let mut files = vec![root().join("README.md")];
    for e in std::fs::read_dir(root().join("docs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            files.push(p);
        }
    }
    let mut checked = 0;
    let mut broken = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for l in links(&text) {
            checked += 1;
            let target = f.parent().unwrap().join(&l);
            if !target.exists() {
                broken.push(format!("{}: {l}", f.display()));
            }
        }
    }
    assert!(broken.is_empty(), "links that lead nowhere: {broken:#?}");
    assert!(checked >= 8, "only {checked} links checked");
}

//! Golden files for the rewrite stage: `tests/data/NN-name.eml` is what the
//! platform sends, `NN-name.expected` what herald queues after its own
//! `Received:` header (a line ending in `*` matches any line with that
//! prefix; `QUEUEID` stands for the queue id; `#= key: value` lines check
//! what the control headers said; `ERROR: text` expects a refusal).
//! `NN-name.toml`, when present, adds configuration. Adding a case is adding
//! files.

use std::path::Path;

use herald::config::Config;
use herald::state::envelope::Transaction;

const ID: &str = "QUEUEID";

fn config(dir: &Path, extra: &str) -> Config {
    let sender = "[sender]\ndefault_sender = \"notifications@example.com\"\n";
    let mut text = String::from(
        "hostname = \"relay.test\"\n[delivery]\nupstream = \"up\"\n[upstreams.up]\nhost = \"127.0.0.1\"\nport = 2600\nsecurity = \"none\"\n",
    );
    if extra.contains("[sender]\n") {
        text.push_str(&extra.replace("[sender]\n", sender));
    } else {
        text.push_str(extra);
        text.push_str(sender);
    }
    if extra.contains("key.pem") && !dir.join("key.pem").exists() {
        herald::dkim::keygen("customer.com", "s", "ed25519", &dir.join("key.pem")).unwrap();
    }
    let path = dir.join("herald.toml");
    Config::parse(&text, &path).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn matches(expected: &str, got: &str) -> bool {
    let e: Vec<&str> = expected.split("\r\n").collect();
    let g: Vec<&str> = got.split("\r\n").collect();
    e.len() == g.len()
        && e.iter().zip(&g).all(|(e, g)| match e.strip_suffix('*') {
            Some(prefix) => g.starts_with(prefix),
            None => e == g,
        })
}

#[test]
fn golden_rewrite_cases() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let mut cases: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            (p.extension()? == "eml").then_some(p)
        })
        .collect();
    cases.sort();
    assert!(cases.len() >= 15, "golden cases missing");
    let t = Transaction {
        peer: "127.0.0.1".parse().unwrap(),
        helo: "client.test".into(),
        tls: false,
        auth_user: None,
        sender: "app@platform.test".into(),
        rcpts: vec!["a@dest.test".into()],
        smtputf8: false,
        body_8bit: false,
    };
    let mut failures = Vec::new();
    for eml in cases {
        let name = eml.file_stem().unwrap().to_string_lossy().into_owned();
        let dir = tempfile::tempdir().unwrap();
        let extra = std::fs::read_to_string(eml.with_extension("toml")).unwrap_or_default();
        let cfg = config(dir.path(), &extra);
        let signers = herald::dkim::Signers::from_config(&cfg).unwrap();
        let has_key = |d: &str| signers.has_key_for(d);
        let input = std::fs::read(&eml).unwrap();
        let expected =
            String::from_utf8(std::fs::read(eml.with_extension("expected")).unwrap()).unwrap();
        let result = herald::rewrite::prepare(&cfg, &has_key, &t, ID, &input);
        if let Some(err) = expected.strip_prefix("ERROR: ") {
            match result {
                Err(e) if e.to_string().contains(err.trim()) => {}
                other => failures.push(format!("{name}: expected error {err:?}, got {other:?}")),
            }
            continue;
        }
        let p = match result {
            Ok(p) => p,
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        let mut want = String::new();
        for line in expected.split_inclusive('\n') {
            match line.strip_prefix("#= ") {
                Some(meta) => {
                    let (k, v) = meta.trim_end().split_once(": ").unwrap();
                    let got = match k {
                        "tag" => p.tag.clone().unwrap_or_default(),
                        "delay" => p
                            .delay
                            .map(|d| format!("{}s", d.as_secs()))
                            .unwrap_or_default(),
                        "track" => {
                            if p.track {
                                "yes".into()
                            } else {
                                "no".into()
                            }
                        }
                        "subject" => p.subject.clone().unwrap_or_default(),
                        "upstream" => p.upstream.clone(),
                        "mail_from" => p.mail_from.clone(),
                        other => panic!("{name}: unknown meta {other}"),
                    };
                    if got != v {
                        failures.push(format!("{name}: {k} = {got:?}, want {v:?}"));
                    }
                }
                None => want.push_str(line),
            }
        }
        let text = String::from_utf8_lossy(&p.message).into_owned();
        // Our Received: header comes first, then the message as rewritten.
        assert!(text.starts_with("Received: from client.test (127.0.0.1)\r\n\tby relay.test (herald) with ESMTP id QUEUEID\r\n\tfor <a@dest.test>;\r\n\t"), "{name}: {text}");
        let after = text.split_once("\r\n\t").unwrap().1;
        let after = after.splitn(4, "\r\n").nth(3).unwrap();
        if !matches(&want, after) {
            failures.push(format!("{name}:\n--- want\n{want}\n--- got\n{after}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

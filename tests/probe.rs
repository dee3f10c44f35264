//! `herald probe`: a smart host tested step by step, against sinks that
//! refuse the login, require TLS, or present an expired certificate.

mod common;

use common::*;

/// Writes a config with upstream `up` (`extra` in its section), runs
/// `herald probe up ARGS`, returns (exit code, stdout + stderr).
fn probe(port: u16, security: &str, extra: &str, args: &[&str]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("herald.toml");
    let text = format!(
        "{BASE}[delivery]\nupstream = \"up\"\n[upstreams.up]\nhost = \"localhost\"\nport = {port}\nsecurity = \"{security}\"\n{}\n",
        extra.replace("{dir}", &dir.path().display().to_string())
    );
    std::fs::write(&cfg, text).unwrap();
    std::fs::write(dir.path().join("pass"), "secret\n").unwrap();
    std::fs::write(dir.path().join("wrong"), "wrong\n").unwrap();
    let mut all: Vec<&std::ffi::OsStr> = vec![
        "probe".as_ref(),
        "up".as_ref(),
        "--config".as_ref(),
        cfg.as_os_str(),
    ];
    all.extend(args.iter().map(std::ffi::OsStr::new));
    run_herald(all)
}

fn step<'a>(out: &'a str, name: &str) -> &'a str {
    out.lines()
        .find(|l| l.split_whitespace().nth(1) == Some(name))
        .unwrap_or_else(|| panic!("no step {name}:\n{out}"))
}

#[test]
fn every_step_passes_and_send_delivers_a_test_message() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let sink = Sink::start(Script {
        starttls: Some(pki.server_config()),
        auth: Some(("relay".into(), "secret".into())),
        ..Default::default()
    });
    let extra = format!(
        "username = \"relay\"\npassword_file = \"{{dir}}/pass\"\nca_file = \"{}\"",
        pki.ca.display()
    );
    let (code, out) = probe(
        sink.port(),
        "starttls",
        &extra,
        &["--to", "louise@dest.test", "--send"],
    );
    assert_eq!(code, 0, "{out}");
    for s in [
        "connect", "greeting", "EHLO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "QUIT",
    ] {
        assert!(step(&out, s).trim_start().starts_with("ok"), "{s}:\n{out}");
    }
    assert!(step(&out, "STARTTLS").contains("valid until"), "{out}");
    assert!(
        step(&out, "MAIL").contains("<bounces@example.com>"),
        "{out}"
    );
    assert!(!out.contains("secret"), "a secret in the output:\n{out}");
    let msgs = sink.wait_for(1, 5);
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].rcpts, vec!["louise@dest.test"]);
    assert!(msgs[0].tls);
    // Without --send: nothing is sent.
    let (code, out) = probe(sink.port(), "starttls", &extra, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(step(&out, "RSET").trim_start().starts_with("ok"), "{out}");
    assert_eq!(sink.count(), 1);
}

#[test]
fn refused_login_fails_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let sink = Sink::start(Script {
        starttls: Some(pki.server_config()),
        auth: Some(("relay".into(), "secret".into())),
        ..Default::default()
    });
    let extra = format!(
        "username = \"relay\"\npassword_file = \"{{dir}}/wrong\"\nca_file = \"{}\"",
        pki.ca.display()
    );
    let (code, out) = probe(sink.port(), "starttls", &extra, &[]);
    assert_eq!(code, 1, "{out}");
    let auth = step(&out, "AUTH");
    assert!(auth.contains("FAIL") && auth.contains("535"), "{out}");
    assert!(out.contains("hint: 535 bad credentials"), "{out}");
    assert!(
        !out.contains("wrong\n") && !out.contains("MAIL FROM"),
        "{out}"
    );
}

#[test]
fn a_server_that_requires_tls_fails_at_mail_with_a_hint() {
    let sink = Sink::start(Script {
        require_tls: true,
        ..Default::default()
    });
    let (code, out) = probe(sink.port(), "none", "", &[]);
    assert_eq!(code, 1, "{out}");
    assert!(step(&out, "MAIL").contains("FAIL"), "{out}");
    assert!(out.contains("530 5.7.0 Must issue a STARTTLS"), "{out}");
    assert!(
        out.contains("requires TLS: set upstreams.up.security = \"starttls\""),
        "{out}"
    );
}

#[test]
fn an_expired_certificate_fails_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::expired(dir.path());
    let sink = Sink::start(Script {
        implicit_tls: Some(pki.server_config()),
        ..Default::default()
    });
    let extra = format!("ca_file = \"{}\"", pki.ca.display());
    let (code, out) = probe(sink.port(), "tls", &extra, &[]);
    assert_eq!(code, 1, "{out}");
    let tls = step(&out, "TLS");
    assert!(tls.contains("FAIL"), "{out}");
    assert!(out.contains("certificate has expired"), "{out}");
    // And a plain port probed with implicit TLS says which setting to use.
    let plain = Sink::start(Script::default());
    let (code, out) = probe(plain.port(), "tls", &extra, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("does not speak TLS from the first byte"),
        "{out}"
    );
}

#[test]
fn a_probe_that_stops_early_still_says_it_failed_and_why() {
    // Nothing listens: it stops at connect.
    let port = free_port();
    let (code, out) = probe(port, "none", "", &[]);
    assert_eq!(code, 1, "{out}");
    assert!(step(&out, "connect").contains("FAIL"), "{out}");
    assert_eq!(
        out.trim_end().lines().last(),
        Some("the probe FAILED (see the hints above)"),
        "{out}"
    );
    // A certificate from a CA herald does not know: stops at TLS, names
    // ca_file.
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let sink = Sink::start(Script {
        implicit_tls: Some(pki.server_config()),
        ..Default::default()
    });
    let (code, out) = probe(sink.port(), "tls", "", &[]);
    assert_eq!(code, 1, "{out}");
    assert!(step(&out, "TLS").contains("FAIL"), "{out}");
    assert!(
        out.contains(
            "hint: the certificate is not signed by a CA herald trusts: set upstreams.up.ca_file"
        ),
        "{out}"
    );
    assert!(
        out.trim_end()
            .ends_with("the probe FAILED (see the hints above)"),
        "{out}"
    );
}

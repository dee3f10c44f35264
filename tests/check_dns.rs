//! `herald check-dns` against a local DNS stub: what is right is ok, what
//! is missing or wrong fails with a hint that says what to publish.

mod common;

use common::*;

fn check(dir: &std::path::Path, args: &[&str]) -> (i32, String) {
    let config = dir.join("herald.toml");
    let mut all: Vec<&std::ffi::OsStr> = vec!["check-dns".as_ref()];
    all.extend(args.iter().map(std::ffi::OsStr::new));
    all.extend(["--config".as_ref(), config.as_os_str()]);
    run_herald(all)
}

#[test]
fn check_dns_reports_spf_dkim_dmarc_and_alignment() {
    let dir = tempfile::tempdir().unwrap();
    let record = dkim_keygen(dir.path(), "example.com", "herald", "rsa", "example.pem").1;
    let other = dkim_keygen(dir.path(), "wrong.test", "herald", "rsa", "wrong.pem").1;
    let dns = Dns::start(&[
        ("example.com", "TXT", "v=spf1 ip4:127.0.0.1 -all"),
        ("herald._domainkey.example.com", "TXT", &record),
        ("_dmarc.example.com", "TXT", "v=DMARC1; p=reject; adkim=s"),
        // wrong.test is signed with example.pem, but another key is published.
        ("herald._domainkey.wrong.test", "TXT", &other),
        ("wrong.test", "TXT", "v=spf1 ip4:192.0.2.1 -all"),
        ("wrong.test", "TXT", "v=spf1 -all"),
    ]);
    let config = format!(
        "{BASE}[[dkim]]\ndomain = \"example.com\"\nselector = \"herald\"\nprivate_key = \"example.pem\"\n\
         [[dkim]]\ndomain = \"wrong.test\"\nselector = \"herald\"\nprivate_key = \"example.pem\"\n\
         [[routes]]\nsender_domain = \"acme.test\"\nupstream = \"up\"\ndefault_sender = \"notify@acme.test\"\n\
         [delivery]\nupstream = \"up\"\n[upstreams.up]\nhost = \"127.0.0.1\"\nport = 2600\nsecurity = \"none\"\n\
         [dns]\nnameservers = [\"127.0.0.1:{}\"]\n",
        dns.port
    );
    std::fs::write(dir.path().join("herald.toml"), config).unwrap();

    let (code, out) = check(dir.path(), &["example.com"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(
            "ok    SPF    example.com: \"v=spf1 ip4:127.0.0.1 -all\" authorizes upstream 127.0.0.1"
        ),
        "{out}"
    );
    assert!(
        out.contains("ok    DKIM   herald._domainkey.example.com: published key matches"),
        "{out}"
    );
    assert!(out.contains("ok    DMARC  _dmarc.example.com"), "{out}");
    assert!(out.contains("ok    align  From example.com: DKIM d=example.com passes and is aligned (strict); SPF example.com passes and is aligned (relaxed)"), "{out}");

    // The whole config: the acme route has no key, so its From fails DMARC.
    let (code, out) = check(dir.path(), &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL  DKIM   no [[dkim]] key covers acme.test"),
        "{out}"
    );
    assert!(
        out.contains("hint: herald dkim-keygen --domain acme.test"),
        "{out}"
    );
    assert!(out.contains("FAIL  align  From acme.test"), "{out}");

    // A published key that is not ours, and two SPF records.
    let (code, out) = check(dir.path(), &["wrong.test"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("is not the one in"), "{out}");
    assert!(
        out.contains("FAIL  align  From wrong.test: DKIM cannot pass"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "hint: publish TXT herald._domainkey.wrong.test \"{record}\""
        )),
        "{out}"
    );
    assert!(
        out.contains("FAIL  SPF    wrong.test has 2 SPF records"),
        "{out}"
    );
    assert!(
        out.contains("warn  DMARC  no DMARC record for wrong.test"),
        "{out}"
    );

    // A domain nobody configured: nothing published at all.
    let (code, out) = check(dir.path(), &["nothing.test"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL  SPF    nothing.test (envelope sender domain) has no SPF record"),
        "{out}"
    );
}

/// With `[bounces]`, SPF is checked for the bounce domain (the envelope
/// sender now), and its MX must be this host.
#[test]
fn check_dns_checks_the_bounce_domain() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bounce.key"),
        "a key of sixteen bytes or more\n",
    )
    .unwrap();
    let dns = Dns::start(&[
        ("bounces.example.com", "TXT", "v=spf1 ip4:127.0.0.1 -all"),
        ("bounces.example.com", "MX", "10 mx.elsewhere.test."),
        ("good.example.com", "MX", "10 relay.test."),
    ]);
    let write = |domain: &str| {
        let config = format!(
            "{BASE}[delivery]\nupstream = \"up\"\n[upstreams.up]\nhost = \"127.0.0.1\"\nport = 2600\nsecurity = \"none\"\n\
             [bounces]\ndomain = \"{domain}\"\nlisten = [\"127.0.0.1:2599\"]\nsecret_file = \"bounce.key\"\n\
             [dns]\nnameservers = [\"127.0.0.1:{}\"]\n",
            dns.port
        );
        std::fs::write(dir.path().join("herald.toml"), config).unwrap();
    };
    write("bounces.example.com");
    let (code, out) = check(dir.path(), &["example.com"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("(envelope bounces.example.com, route up)"),
        "{out}"
    );
    assert!(
        out.contains(
            "SPF    bounces.example.com: \"v=spf1 ip4:127.0.0.1 -all\" authorizes upstream"
        ),
        "{out}"
    );
    assert!(
        out.contains(
            "FAIL  MX     bounces.example.com: MX mx.elsewhere.test is not this host (relay.test)"
        ),
        "{out}"
    );
    assert!(
        out.contains("hint: publish MX bounces.example.com. 10 relay.test."),
        "{out}"
    );
    write("good.example.com");
    let (_, out) = check(dir.path(), &["example.com"]);
    assert!(
        out.contains("ok    MX     good.example.com: MX relay.test (this host) takes its reports"),
        "{out}"
    );
    write("none.example.com");
    let (_, out) = check(dir.path(), &["example.com"]);
    assert!(
        out.contains("FAIL  MX     none.example.com (the [bounces] domain) has no MX"),
        "{out}"
    );
}

/// With `[bounces]`: each domain's DMARC record should send aggregate
/// reports to herald's `dmarc_address`, and a bounce domain of another
/// organization must authorize them (RFC 7489 7.1).
#[test]
fn check_dns_tells_the_rua_to_add_and_checks_the_authorization_record() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bounce.key"),
        "a key of sixteen bytes or more\n",
    )
    .unwrap();
    let dns = Dns::start(&[
        (
            "_dmarc.example.com",
            "TXT",
            "v=DMARC1; p=none; rua=mailto:dmarc@reports.test",
        ),
        (
            "_dmarc.acme.test",
            "TXT",
            "v=DMARC1; p=quarantine; rua=mailto:d@acme.test",
        ),
        ("example.com._report._dmarc.reports.test", "TXT", "v=DMARC1"),
        ("reports.test", "MX", "10 relay.test."),
    ]);
    let config = format!(
        "{BASE}[delivery]\nupstream = \"up\"\n[upstreams.up]\nhost = \"127.0.0.1\"\nport = 2600\nsecurity = \"none\"\n\
         [bounces]\ndomain = \"reports.test\"\nlisten = [\"127.0.0.1:2599\"]\nsecret_file = \"bounce.key\"\n\
         [dns]\nnameservers = [\"127.0.0.1:{}\"]\n",
        dns.port
    );
    std::fs::write(dir.path().join("herald.toml"), config).unwrap();
    let (_, out) = check(dir.path(), &["example.com"]);
    assert!(
        out.contains("ok    rua    aggregate reports of example.com come to herald (mailto:dmarc@reports.test)"),
        "{out}"
    );
    assert!(
        out.contains("ok    rua    example.com._report._dmarc.reports.test authorizes reports about example.com"),
        "{out}"
    );
    let (_, out) = check(dir.path(), &["acme.test"]);
    assert!(
        out.contains("hint: publish TXT _dmarc.acme.test \"v=DMARC1; p=quarantine; rua=mailto:d@acme.test,mailto:dmarc@reports.test\""),
        "{out}"
    );
    assert!(
        out.contains("hint: publish TXT acme.test._report._dmarc.reports.test \"v=DMARC1\""),
        "{out}"
    );
}

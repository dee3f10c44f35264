//! Direct delivery to the recipients' MX, resolved through a local DNS stub.

mod common;

use common::*;

#[test]
fn delivers_to_mx_implicit_mx_and_bounces_null_mx() {
    let sink = Sink::start(Script {
        rcpt_replies: vec![("denied".into(), "554 5.7.1 Relay access denied".into())],
        ..Default::default()
    });
    let dns = Dns::start(&[
        ("mx.test", "MX", "10 mail.mx.test."),
        ("mail.mx.test", "A", "127.0.0.1"),
        ("amx.test", "A", "127.0.0.1"),
        ("nullmx.test", "MX", "0 ."),
        ("noaddr.test", "TXT", "v=spf1 -all"),
    ]);
    let h = Herald::start(&format!(
        "[delivery]\nupstream = \"mx\"\nmx_port = {}\nretry_schedule = [\"1s\"]\n[dns]\nnameservers = [\"127.0.0.1:{}\"]\n",
        sink.port(),
        dns.port
    ));
    let mut c = h.client();
    c.ehlo();
    let (code, text) = c.send(
        "app@platform.test",
        &[
            "a@mx.test",
            "b@amx.test",
            "c@nullmx.test",
            "d@nowhere.test",
            "e@noaddr.test",
            "denied@mx.test",
        ],
        &message("mx"),
    );
    assert_eq!(code, 250, "{text}");
    let msgs = sink.wait_for(2, 15);
    assert_eq!(msgs.len(), 2, "{}", h.log());
    let mut rcpts: Vec<String> = msgs.iter().flat_map(|m| m.rcpts.clone()).collect();
    rcpts.sort();
    assert_eq!(rcpts, vec!["a@mx.test", "b@amx.test"]);
    // Each domain is looked up and judged on its own, in any order: wait
    // for every verdict before reading them.
    assert!(
        wait_until(10, || {
            let log = h.log();
            log.contains("null MX")
                && log.contains("NXDOMAIN")
                && log.contains("Relay access denied")
                && log.lines().any(|l| l.contains("e@noaddr.test"))
        }),
        "{}",
        h.log()
    );
    let log = h.log();
    let null_line = log
        .lines()
        .find(|l| l.contains("c@nullmx.test") && l.contains("null MX"))
        .unwrap();
    assert!(null_line.contains("bounced"), "{null_line}");
    // A domain that does not exist bounces; one that exists but has no
    // address yet is deferred.
    let nowhere = log
        .lines()
        .find(|l| l.contains("d@nowhere.test") && l.contains("NXDOMAIN"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(nowhere.contains("bounced"), "{nowhere}");
    // At a recipient's own MX, a policy refusal judges the recipient.
    let denied = log
        .lines()
        .find(|l| l.contains("denied@mx.test") && l.contains("Relay access denied"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(denied.contains("bounced"), "{denied}");
    let noaddr = log
        .lines()
        .find(|l| l.contains("e@noaddr.test"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        noaddr.contains("deferred") && noaddr.contains("no address"),
        "{noaddr}"
    );
}

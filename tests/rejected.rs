//! Every refusal is on record: mail herald refuses leaves a `rejected`
//! event per recipient, and `herald trace` says herald refused it, when,
//! from which client and why, instead of blaming the platform.

mod common;

use common::*;

fn rejected_events(h: &Herald) -> Vec<serde_json::Value> {
    let (code, out, err) = h.cli(&["history", "--json"]);
    assert_eq!(code, 0, "{err}");
    out.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "rejected")
        .collect()
}

fn diagnosis(h: &Herald, addr: &str) -> String {
    let (code, out, err) = h.cli(&["trace", addr]);
    assert_eq!(code, 0, "{err}");
    out.lines()
        .find(|l| l.starts_with("diagnosis: "))
        .unwrap_or_else(|| panic!("{out}"))
        .to_string()
}

#[test]
fn refusals_at_the_end_of_data_are_recorded_and_traced() {
    let h = Herald::start("[listen]\nsmtp = [\"{smtp}\"]\nmax_message_size = 1000\n");
    let mut c = h.client();
    c.ehlo();
    let big = format!("Subject: big\n\n{}\n", "z".repeat(2000));
    assert_eq!(
        c.send(
            "app@platform.test",
            &["big@dest.test", "big2@dest.test"],
            &big
        )
        .0,
        552
    );
    let two_from = "From: a@customer.test\nFrom: b@customer.test\nSubject: x\n\nhi\n";
    assert_eq!(
        c.send("app@platform.test", &["hdr@dest.test"], two_from).0,
        554
    );
    let bad_delay = "X-Herald-Delay: soon\nSubject: x\n\nhi\n";
    assert_eq!(
        c.send("app@platform.test", &["delay@dest.test"], bad_delay)
            .0,
        554
    );
    // The session goes on: a good message is still taken.
    assert_eq!(
        c.send("app@platform.test", &["ok@dest.test"], &message("ok"))
            .0,
        250
    );

    let d = diagnosis(&h, "big@dest.test");
    assert!(d.contains("herald refused it at 20"), "{d}");
    assert!(
        d.contains("from 127.0.0.1: 552 5.3.4 Message too big"),
        "{d}"
    );
    assert!(diagnosis(&h, "big2@dest.test").contains("552 5.3.4"));
    let d = diagnosis(&h, "hdr@dest.test");
    assert!(
        d.contains("from 127.0.0.1: 554 5.6.0") && d.contains("From:"),
        "{d}"
    );
    let d = diagnosis(&h, "delay@dest.test");
    assert!(d.contains("X-Herald-Delay"), "{d}");
    assert!(!diagnosis(&h, "ok@dest.test").contains("refused"));
    assert_eq!(rejected_events(&h).len(), 4);
    assert!(h.log().contains("rejected"), "logged at info: {}", h.log());
}

#[test]
fn relay_refusal_at_rcpt_is_recorded_with_the_address() {
    let h = Herald::start("[listen]\nsmtp = [\"{smtp}\"]\nallowed_networks = [\"10.0.0.0/8\"]\n");
    let mut c = h.client();
    c.ehlo();
    assert_eq!(c.cmd("MAIL FROM:<app@platform.test>").0, 250);
    let (code, text) = c.cmd("RCPT TO:<outsider@dest.test>");
    assert_eq!(code, 550, "{text}");
    let d = diagnosis(&h, "outsider@dest.test");
    assert!(
        d.contains("herald refused it at")
            && d.contains("from 127.0.0.1: 550 5.7.1 Relaying denied"),
        "{d}"
    );
    let (_, table, _) = h.cli(&["trace", "outsider@dest.test"]);
    assert!(table.contains("rejected"), "{table}");
}

#[test]
fn a_hostile_client_cannot_flood_history_with_refusals() {
    let h = Herald::start("[listen]\nsmtp = [\"{smtp}\"]\nallowed_networks = [\"10.0.0.0/8\"]\n");
    let mut c = h.client();
    c.ehlo();
    assert_eq!(c.cmd("MAIL FROM:<app@platform.test>").0, 250);
    // The same recipient twice in one transaction: one event.
    assert_eq!(c.cmd("RCPT TO:<dup@dest.test>").0, 550);
    assert_eq!(c.cmd("RCPT TO:<dup@DEST.test>").0, 550);
    assert_eq!(rejected_events(&h).len(), 1);
    // 300 more, pipelined: every one answered 550, at most 100 recorded.
    let mut batch = String::new();
    for i in 0..300 {
        batch.push_str(&format!("RCPT TO:<flood{i}@dest.test>\r\n"));
    }
    c.send_raw(batch.as_bytes());
    for _ in 0..300 {
        assert_eq!(c.read_reply().0, 550);
    }
    assert_eq!(rejected_events(&h).len(), 100);
    assert!(
        h.log().contains("the rest are logged, not recorded"),
        "{}",
        h.log()
    );
    // A new connection has its own allowance.
    let mut c2 = h.client();
    c2.ehlo();
    assert_eq!(c2.cmd("MAIL FROM:<app@platform.test>").0, 250);
    assert_eq!(c2.cmd("RCPT TO:<later@dest.test>").0, 550);
    assert!(diagnosis(&h, "later@dest.test").contains("refused"));
}

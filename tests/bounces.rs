//! `[bounces]`: signed return paths out, reports and complaints back in,
//! through the real listener, with real bounce messages
//! (tests/data/bounces, from sisimai/set-of-emails).

mod common;

use std::net::SocketAddr;
use std::path::Path;

use common::*;

const DOMAIN: &str = "bounces.example.test";
const KEY: &str = "an HMAC key of return-path tokens, 32+";

struct Setup {
    herald: Herald,
    sink: Sink,
    intake: SocketAddr,
}

fn setup(extra: &str) -> Setup {
    let sink = Sink::start(Script::default());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bounce.key"), format!("{KEY}\n")).unwrap();
    let port = free_port();
    let intake: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let herald = Herald::start_in(
        dir,
        &format!(
            "{}\n[bounces]\ndomain = \"{DOMAIN}\"\nlisten = [\"{intake}\"]\nsecret_file = \"{{dir}}/bounce.key\"\nmax_size = 200000\n{extra}\n[control]\nsocket = \"{{dir}}/herald.sock\"\n",
            upstream(sink.port(), "none", "")
        ),
    );
    Setup {
        herald,
        sink,
        intake,
    }
}

fn data(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/bounces")
            .join(name),
    )
    .unwrap()
}

/// Sends `rcpts` one message; returns (queue id, rcpt -> the return path
/// the upstream saw it with).
fn send(s: &Setup, rcpts: &[&str], subject: &str) -> (String, Vec<(String, String)>) {
    let before = s.sink.count();
    let mut c = s.herald.client();
    c.ehlo();
    let (code, reply) = c.send("app@customer.test", rcpts, &message(subject));
    assert_eq!(code, 250, "{reply}");
    let got = s.sink.wait_for(before + rcpts.len(), 20);
    assert_eq!(got.len(), before + rcpts.len(), "{}", s.herald.log());
    let paths = got[before..]
        .iter()
        .map(|m| {
            assert_eq!(m.rcpts.len(), 1, "one recipient per transaction");
            (m.rcpts[0].clone(), m.mail_from.clone())
        })
        .collect();
    (queue_id(&reply), paths)
}

fn path_of<'a>(paths: &'a [(String, String)], rcpt: &str) -> &'a str {
    &paths.iter().find(|(r, _)| r == rcpt).unwrap().1
}

/// One report over SMTP to the intake; the reply to its end of DATA (or
/// the first refusal).
fn report(s: &Setup, from: &str, to: &str, msg: &[u8]) -> (u16, String) {
    let mut c = Client::connect(s.intake);
    c.ehlo();
    let r = c.send_bytes(from, &[to], msg);
    c.cmd("QUIT");
    r
}

fn wait_event(h: &Herald, rcpt: &str, event: &str) -> serde_json::Value {
    let mut found = None;
    wait_until(20, || {
        found = h.events(rcpt).into_iter().find(|e| e["event"] == event);
        found.is_some()
    });
    found.unwrap_or_else(|| {
        panic!(
            "no {event} event for {rcpt}: {:?}\n{}",
            h.events(rcpt),
            h.log()
        )
    })
}

fn suppression(h: &Herald) -> Vec<serde_json::Value> {
    json_lines(&h.ok(&["suppression", "list", "--json"]))
}

fn metric(h: &Herald, outcome: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(&h.ok(&["status", "--json"])).unwrap();
    v["reports"]["since_start"][outcome].as_u64().unwrap_or(0)
}

#[test]
fn each_recipient_gets_a_signed_return_path_and_the_message_a_reference() {
    let s = setup("");
    let (id, paths) = send(&s, &["ann@dest.test", "bob@dest.test"], "two");
    let a = path_of(&paths, "ann@dest.test");
    let b = path_of(&paths, "bob@dest.test");
    assert_ne!(a, b);
    for p in [a, b] {
        let (local, domain) = p.rsplit_once('@').unwrap();
        assert_eq!(domain, DOMAIN);
        assert!(local.starts_with("b-") && local.len() <= 64, "{p}");
        assert!(
            local[2..]
                .bytes()
                .all(|c| b"abcdefghijklmnopqrstuvwxyz234567".contains(&c)),
            "{p}"
        );
    }
    let msgs = s.sink.messages();
    for m in &msgs {
        let text = m.text();
        let refs: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("X-Herald-Ref: "))
            .collect();
        assert_eq!(refs.len(), 1, "{text}");
        assert!(refs[0].contains(&id), "{}", refs[0]);
    }
    // A client's own X-Herald-Ref does not go out.
    let mut c = s.herald.client();
    c.ehlo();
    let (code, _) = c.send(
        "app@customer.test",
        &["cid@dest.test"],
        "From: a@customer.test\nX-Herald-Ref: 01ABCDEFGHJK.forged\nSubject: f\n\nx\n",
    );
    assert_eq!(code, 250);
    let m = s.sink.wait_for(3, 20).pop().unwrap();
    assert!(!m.text().contains("forged"), "{}", m.text());
    assert_eq!(m.text().matches("X-Herald-Ref:").count(), 1);
}

#[test]
fn the_intake_takes_reports_only_for_genuine_tokens() {
    let s = setup("");
    let (id, paths) = send(&s, &["ann@dest.test"], "one");
    let good = path_of(&paths, "ann@dest.test").to_string();
    let mut c = Client::connect(s.intake);
    let ehlo = c.ehlo();
    assert!(!ehlo.contains("AUTH"), "{ehlo}");
    assert!(ehlo.contains("SIZE 200000"), "{ehlo}");
    // The null sender, as bounces use.
    assert_eq!(c.cmd("MAIL FROM:<>").0, 250);
    // A forged token: one character changed.
    let mut forged = good.clone().into_bytes();
    forged[5] = if forged[5] == b'a' { b'b' } else { b'a' };
    let forged = String::from_utf8(forged).unwrap();
    let (code, text) = c.cmd(&format!("RCPT TO:<{forged}>"));
    assert_eq!(code, 550, "{text}");
    assert!(text.contains("5.1.1"), "{text}");
    // Another domain: never relayed.
    let (code, text) = c.cmd("RCPT TO:<someone@dest.test>");
    assert_eq!(code, 550, "{text}");
    assert!(text.contains("5.7.1"), "{text}");
    // An unknown address of the bounce domain.
    assert_eq!(c.cmd(&format!("RCPT TO:<postmaster@{DOMAIN}>")).0, 550);
    // Genuine, also in upper case (some servers change the case).
    let (code, text) = c.cmd(&format!("RCPT TO:<{}>", good.to_ascii_uppercase()));
    assert_eq!(code, 250, "{text}");
    // One recipient per report.
    let (code, text) = c.cmd(&format!("RCPT TO:<fbl@{DOMAIN}>"));
    assert_eq!(code, 452, "{text}");
    assert_eq!(c.cmd("RSET").0, 250);
    // AUTH is not offered here.
    assert_eq!(c.cmd("AUTH PLAIN AGFiYw==").0, 503);
    // Too big: 552 at MAIL (SIZE=) and at the end of DATA.
    assert_eq!(c.cmd("MAIL FROM:<> SIZE=300000").0, 552);
    assert_eq!(c.cmd("MAIL FROM:<>").0, 250);
    assert_eq!(c.cmd(&format!("RCPT TO:<{good}>")).0, 250);
    assert_eq!(c.cmd("DATA").0, 354);
    let line = format!("{}\r\n", "x".repeat(998));
    for _ in 0..250 {
        c.send_raw(line.as_bytes());
    }
    c.send_raw(b".\r\n");
    let (code, text) = c.read_reply();
    assert_eq!(code, 552, "{text}");
    c.cmd("QUIT");

    // An expired token (made with the key, as herald would have 31 days ago).
    let key = herald::bounces::token::Key::new(KEY.as_bytes());
    let old = herald::queue::now_ms() - 31 * 86_400_000;
    let expired = herald::bounces::token::make(&key, &id, 0, old).unwrap();
    let mut c = Client::connect(s.intake);
    c.ehlo();
    assert_eq!(c.cmd("MAIL FROM:<>").0, 250);
    let (code, text) = c.cmd(&format!("RCPT TO:<{expired}@{DOMAIN}>"));
    assert_eq!(code, 550, "{text}");
    assert!(text.contains("expired"), "{text}");
    c.cmd("QUIT");
    // The forged token and postmaster@ (not a token at all).
    assert_eq!(metric(&s.herald, "refused_forged"), 2);
    assert_eq!(metric(&s.herald, "refused_expired"), 1);
    // Nothing of this reached the outbound queue or the history.
    assert_eq!(s.sink.count(), 1);
    assert!(s.herald.events("someone@dest.test").is_empty());
}

#[test]
fn a_bounce_after_delivery_marks_the_recipient_bounced_and_suppresses_it() {
    let s = setup("");
    let (id, paths) = send(&s, &["ann@dest.test", "bob@dest.test"], "hello");
    wait_event(&s.herald, "ann@dest.test", "delivered");
    // A real Postfix bounce ("User unknown"), sent to ann's return path.
    let (code, text) = report(
        &s,
        "",
        path_of(&paths, "ann@dest.test"),
        &data("lhost-postfix-05.eml"),
    );
    assert_eq!(code, 250, "{text}");
    let rid = queue_id(&text);
    let ev = wait_event(&s.herald, "ann@dest.test", "bounced");
    assert_eq!(ev["id"], id.as_str());
    assert_eq!(ev["class"], "hard", "{ev}");
    assert_eq!(ev["report"], rid.as_str());
    // The history shows both, newest last; bob is untouched.
    let kinds: Vec<String> = s
        .herald
        .events("ann@dest.test")
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_string())
        .collect();
    let d = kinds.iter().position(|k| k == "delivered").unwrap();
    let b = kinds.iter().position(|k| k == "bounced").unwrap();
    assert!(d < b, "{kinds:?}");
    assert!(!s.herald.has_event("bob@dest.test", "bounced"));
    // Suppressed, as a hard bounce at RCPT would.
    let supp = suppression(&s.herald);
    assert!(
        supp.iter().any(|e| e["addr"] == "ann@dest.test"),
        "{supp:?}"
    );
    assert!(!supp.iter().any(|e| e["addr"] == "bob@dest.test"));
    // trace tells the story in one line.
    let t = s.herald.ok(&["trace", "ann@dest.test"]);
    assert!(t.contains("accepted by"), "{t}");
    assert!(
        t.contains("then bounced by the recipient's server (reported by"),
        "{t}"
    );
    assert!(t.contains("the address does not exist"), "{t}");
    // The report is kept and shown.
    let shown = s.herald.ok(&["show", &rid]);
    assert!(shown.contains("state: applied"), "{shown}");
    assert!(
        shown.contains("Final-Recipient") || shown.contains("Diagnostic"),
        "{shown}"
    );
    // The next mail to ann is not attempted.
    let before = s.sink.count();
    let mut c = s.herald.client();
    c.ehlo();
    assert_eq!(
        c.send("app@customer.test", &["ann@dest.test"], &message("again"))
            .0,
        250
    );
    wait_event(&s.herald, "ann@dest.test", "suppressed");
    assert_eq!(s.sink.count(), before);
}

#[test]
fn delays_auto_replies_and_garbage_change_nothing() {
    let s = setup("");
    let (_, paths) = send(
        &s,
        &["ann@dest.test", "bob@dest.test", "cid@dest.test"],
        "x",
    );
    // An RFC 3464 "Action: delayed" report.
    let delayed =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/bounces"))
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                std::fs::read(p).is_ok_and(|b| {
                    let t = String::from_utf8_lossy(&b).to_ascii_lowercase();
                    t.contains("action: delayed") && !t.contains("action: failed")
                })
            })
            .expect("a delayed report in the test data");
    let (code, text) = report(
        &s,
        "",
        path_of(&paths, "ann@dest.test"),
        &std::fs::read(&delayed).unwrap(),
    );
    assert_eq!(code, 250, "{text}");
    wait_event(&s.herald, "ann@dest.test", "delayed");
    // A vacation reply.
    let (code, _) = report(
        &s,
        "bob@dest.test",
        path_of(&paths, "bob@dest.test"),
        &data("rfc3834-02.eml"),
    );
    assert_eq!(code, 250);
    wait_until(20, || metric(&s.herald, "auto_reply") == 1);
    assert_eq!(metric(&s.herald, "auto_reply"), 1);
    // Not a report at all.
    let (code, text) = report(
        &s,
        "x@else.test",
        path_of(&paths, "cid@dest.test"),
        b"Subject: hello\n\nthis is not a delivery report\n",
    );
    assert_eq!(code, 250);
    let rid = queue_id(&text);
    wait_until(20, || metric(&s.herald, "unparsed") == 1);
    let shown = s.herald.ok(&["show", &rid]);
    assert!(shown.contains("state: unparsed"), "{shown}");
    assert!(shown.contains("this is not a delivery report"), "{shown}");
    // Nobody bounced or suppressed.
    for r in ["ann@dest.test", "bob@dest.test", "cid@dest.test"] {
        assert!(!s.herald.has_event(r, "bounced"), "{r}");
    }
    assert!(suppression(&s.herald).is_empty());
    assert!(s.herald.log().contains("report not understood"));
}

/// An ARF report (RFC 5965) quoting the message as sent.
fn arf(original: &str, feedback_type: &str) -> String {
    format!(
        "From: staff@isp.test\nTo: fbl@{DOMAIN}\nSubject: FW: complaint\nMIME-Version: 1.0\nContent-Type: multipart/report; report-type=feedback-report; boundary=\"b1\"\n\n--b1\nContent-Type: text/plain\n\nThis is an email abuse report.\n\n--b1\nContent-Type: message/feedback-report\n\nFeedback-Type: {feedback_type}\nUser-Agent: SomeISP-FBL/1.0\nVersion: 1\nSource-IP: 192.0.2.1\n\n--b1\nContent-Type: message/rfc822\nContent-Disposition: inline\n\n{original}\n--b1--\n"
    )
}

#[test]
fn a_complaint_suppresses_the_address_for_good() {
    let s = setup("");
    let (id, _) = send(&s, &["ann@dest.test"], "spammy?");
    let sent = s.sink.messages()[0].text().replace("\r\n", "\n");
    let (code, text) = report(
        &s,
        "fbl@isp.test",
        &format!("fbl@{DOMAIN}"),
        arf(&sent, "abuse").as_bytes(),
    );
    assert_eq!(code, 250, "{text}");
    let ev = wait_event(&s.herald, "ann@dest.test", "complained");
    assert_eq!(ev["id"], id.as_str());
    let supp = suppression(&s.herald);
    let e = supp
        .iter()
        .find(|e| e["addr"] == "ann@dest.test")
        .expect("suppressed");
    assert_eq!(e["reason"], "complaint");
    assert!(e["expires_ms"].is_null(), "{e}");
    let t = s.herald.ok(&["trace", "ann@dest.test"]);
    assert!(t.contains("as spam"), "{t}");
    // A complaint quoting a forged reference maps to nothing.
    let forged = sent.replace(&id, "01ABCDEFGHJK");
    let (code, _) = report(
        &s,
        "fbl@isp.test",
        &format!("fbl@{DOMAIN}"),
        arf(&forged, "abuse").as_bytes(),
    );
    assert_eq!(code, 250);
    wait_until(20, || metric(&s.herald, "unmatched") == 1);
    assert_eq!(metric(&s.herald, "unmatched"), 1);
    // An authentication-failure report is counted, nobody suppressed.
    let (_, paths) = send(&s, &["bob@dest.test"], "auth");
    let sent_b = s
        .sink
        .messages()
        .last()
        .unwrap()
        .text()
        .replace("\r\n", "\n");
    let _ = paths;
    let (code, _) = report(
        &s,
        "fbl@isp.test",
        &format!("fbl@{DOMAIN}"),
        arf(&sent_b, "auth-failure").as_bytes(),
    );
    assert_eq!(code, 250);
    wait_until(20, || metric(&s.herald, "auth_failure") == 1);
    assert_eq!(metric(&s.herald, "auth_failure"), 1);
    assert!(!suppression(&s.herald)
        .iter()
        .any(|e| e["addr"] == "bob@dest.test"));
    assert!(!s.herald.has_event("bob@dest.test", "complained"));
}

#[test]
fn a_report_acknowledged_before_a_crash_is_applied_after_it() {
    let mut s = setup("");
    let (_, paths) = send(&s, &["ann@dest.test"], "crash");
    wait_event(&s.herald, "ann@dest.test", "delivered");
    let (code, _) = report(
        &s,
        "",
        path_of(&paths, "ann@dest.test"),
        &data("lhost-postfix-05.eml"),
    );
    assert_eq!(code, 250);
    s.herald.kill9();
    s.herald.spawn();
    wait_event(&s.herald, "ann@dest.test", "bounced");
    let n = s
        .herald
        .events("ann@dest.test")
        .iter()
        .filter(|e| e["event"] == "bounced")
        .count();
    assert_eq!(n, 1, "applied once");
}

#[test]
fn a_thousand_reports_in_a_burst_are_all_applied() {
    let s = setup("[listen]\nsmtp = [\"{smtp}\"]\nmax_recipients = 1000\n");
    let rcpts: Vec<String> = (0..1000).map(|i| format!("user{i}@dest.test")).collect();
    let refs: Vec<&str> = rcpts.iter().map(|s| s.as_str()).collect();
    let (_, paths) = send(&s, &refs, "burst");
    let bounce = data("lhost-postfix-05.eml");
    // Eight senders at once, many reports per connection.
    std::thread::scope(|sc| {
        for part in paths.chunks(125) {
            let (intake, bounce) = (s.intake, &bounce);
            sc.spawn(move || {
                let mut c = Client::connect(intake);
                c.ehlo();
                for (_, rp) in part {
                    let (code, text) = c.send_bytes("", &[rp], bounce);
                    assert_eq!(code, 250, "{text}");
                }
                c.cmd("QUIT");
            });
        }
    });
    let ok = wait_until(60, || metric(&s.herald, "bounced") == 1000);
    assert!(ok, "{} of 1000 applied", metric(&s.herald, "bounced"));
    assert_eq!(suppression(&s.herald).len(), 1000);
}

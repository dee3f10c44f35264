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
    let got = s
        .sink
        .wait_for(before + rcpts.len(), 20 + rcpts.len() as u64 / 10);
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
    let old = herald::state::spool::now_ms() - 31 * 86_400_000;
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
    // herald reports lists them, newest first, by state and kind.
    let unparsed = json_lines(&s.herald.ok(&["reports", "--state", "unparsed", "--json"]));
    assert_eq!(unparsed.len(), 1, "{unparsed:?}");
    assert_eq!(unparsed[0]["id"], rid.as_str());
    let all = json_lines(&s.herald.ok(&["reports", "--json"]));
    assert_eq!(all.len(), 3, "{all:?}");
    assert_eq!(all[0]["id"], rid.as_str(), "newest first");
    let table = s.herald.ok(&["reports", "--kind", "auto-reply"]);
    assert!(
        table.contains("REPORT") && table.contains("auto-reply"),
        "{table}"
    );
    assert!(!table.contains(&rid), "{table}");
    let (code, _, err) = s.herald.cli(&["reports", "--state", "lost"]);
    assert_eq!(code, 1);
    assert!(err.contains("state: \"lost\" is not one of"), "{err}");
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
fn four_hundred_reports_in_a_burst_are_all_applied() {
    // One trusted relay reporting a lot: its rate and connections allowed.
    let s = setup(
        "max_rate_per_ip = \"0\"\nmax_connections_per_ip = 8\n[listen]\nsmtp = [\"{smtp}\"]\nmax_recipients = 1000\n",
    );
    // Each recipient's outcome is committed after its transaction: 400
    // recipients take a while to go out on a slow disk.
    let rcpts: Vec<String> = (0..400).map(|i| format!("user{i}@dest.test")).collect();
    let refs: Vec<&str> = rcpts.iter().map(|s| s.as_str()).collect();
    let (_, paths) = send(&s, &refs, "burst");
    let bounce = data("lhost-postfix-05.eml");
    // Eight senders at once, many reports per connection.
    std::thread::scope(|sc| {
        for part in paths.chunks(50) {
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
    let ok = wait_until(60, || metric(&s.herald, "bounced") == 400);
    assert!(ok, "{} of 400 applied", metric(&s.herald, "bounced"));
    assert_eq!(suppression(&s.herald).len(), 400);
}

/// The copy of the last message the sink received for `rcpt`, as text.
fn copy_for(s: &Setup, rcpt: &str) -> String {
    s.sink
        .messages()
        .iter()
        .rev()
        .find(|m| m.rcpts == [rcpt])
        .unwrap_or_else(|| panic!("no copy for {rcpt}"))
        .text()
        .replace("\r\n", "\n")
}

fn header<'a>(text: &'a str, name: &str) -> &'a str {
    text.lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim())
        })
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

#[test]
fn a_recipient_cannot_suppress_another_recipient_of_the_same_message() {
    let s = setup("");
    let (id, paths) = send(&s, &["eve@dest.test", "frank@dest.test"], "Team alert");
    let eve_copy = copy_for(&s, "eve@dest.test");
    let eve_ref = header(&eve_copy, "X-Herald-Ref").to_string();
    // The attack as reported: a plain message, null sender, naming frank.
    let forged = format!(
        "From: eve@dest.test\nSubject: complaint\n\nFeedback-Type: abuse\nOriginal-Rcpt-To: frank@dest.test\nX-Herald-Ref: {eve_ref}\n"
    );
    let (code, text) = report(&s, "", &format!("fbl@{DOMAIN}"), forged.as_bytes());
    assert_eq!(code, 250, "{text}");
    let rid = queue_id(&text);
    // The same as an ARF report quoting eve's copy, Original-Rcpt-To frank.
    let arf_forged = arf(&eve_copy, "abuse").replace(
        "Source-IP: 192.0.2.1\n",
        "Source-IP: 192.0.2.1\nOriginal-Rcpt-To: frank@dest.test\n",
    );
    let (code, _) = report(&s, "", &format!("fbl@{DOMAIN}"), arf_forged.as_bytes());
    assert_eq!(code, 250);
    assert!(wait_until(20, || metric(&s.herald, "complaint_unpinned") == 2));
    for r in ["eve@dest.test", "frank@dest.test"] {
        assert!(!s.herald.has_event(r, "complained"), "{r}");
    }
    assert!(suppression(&s.herald).is_empty());
    // Recorded against the message, for an operator to read.
    let shown = s.herald.ok(&["show", &id]);
    assert!(shown.contains("reports about this message"), "{shown}");
    assert!(shown.contains(&rid), "{shown}");
    assert!(shown.contains("nobody suppressed"), "{shown}");
    // Frank's next mail goes out.
    let before = s.sink.count();
    let mut c = s.herald.client();
    c.ehlo();
    assert_eq!(
        c.send("app@customer.test", &["frank@dest.test"], &message("reset"))
            .0,
        250
    );
    assert_eq!(s.sink.wait_for(before + 1, 20).len(), before + 1);
    // A complaint that quotes eve's own copy as delivered (its Return-Path,
    // eve's signed token) names eve, and only eve.
    let delivered = format!(
        "Return-Path: <{}>\n{eve_copy}",
        path_of(&paths, "eve@dest.test")
    );
    let (code, _) = report(
        &s,
        "",
        &format!("fbl@{DOMAIN}"),
        arf(&delivered, "abuse")
            .replace(
                "Source-IP: 192.0.2.1\n",
                "Source-IP: 192.0.2.1\nOriginal-Rcpt-To: frank@dest.test\n",
            )
            .as_bytes(),
    );
    assert_eq!(code, 250);
    let ev = wait_event(&s.herald, "eve@dest.test", "complained");
    assert_eq!(ev["id"], id.as_str());
    assert!(!s.herald.has_event("frank@dest.test", "complained"));
    let supp = suppression(&s.herald);
    assert_eq!(supp.len(), 1, "{supp:?}");
    assert_eq!(supp[0]["addr"], "eve@dest.test");
}

#[test]
fn repeated_reports_make_one_event_per_recipient_and_message() {
    let s = setup("");
    let (id, paths) = send(&s, &["ann@dest.test"], "once");
    wait_event(&s.herald, "ann@dest.test", "delivered");
    let bounce = data("lhost-postfix-05.eml");
    for _ in 0..3 {
        let (code, text) = report(&s, "", path_of(&paths, "ann@dest.test"), &bounce);
        assert_eq!(code, 250, "{text}");
    }
    let copy = copy_for(&s, "ann@dest.test");
    for _ in 0..4 {
        let (code, _) = report(
            &s,
            "",
            &format!("fbl@{DOMAIN}"),
            arf(&copy, "abuse").as_bytes(),
        );
        assert_eq!(code, 250);
    }
    assert!(
        wait_until(20, || metric(&s.herald, "duplicate") == 5),
        "{}",
        s.herald.ok(&["status", "--json"])
    );
    let count = |kind: &str| {
        s.herald
            .events("ann@dest.test")
            .iter()
            .filter(|e| e["event"] == kind && e["id"] == id.as_str())
            .count()
    };
    assert_eq!(count("bounced"), 1);
    assert_eq!(count("complained"), 1);
    assert_eq!(metric(&s.herald, "bounced"), 1);
    assert_eq!(metric(&s.herald, "complained"), 1);
}

fn status(h: &Herald) -> serde_json::Value {
    serde_json::from_str(&h.ok(&["status", "--json"])).unwrap()
}

/// One report from the loopback address `source`.
fn report_from(s: &Setup, source: &str, to: &str, msg: &[u8]) -> (u16, String) {
    let mut c = Client::over(connect_from(source, s.intake));
    c.ehlo();
    let r = c.send_bytes("", &[to], msg);
    c.cmd("QUIT");
    r
}

#[test]
fn each_client_gets_few_connections_and_a_report_rate() {
    let s = setup("max_rate_per_ip = \"3/m\"\nmax_connections_per_ip = 2\n");
    let (_, paths) = send(&s, &["ann@dest.test"], "limits");
    let junk = b"Subject: not a report\n\nhello\n";
    let fbl = format!("fbl@{DOMAIN}");
    // Two connections from one address; the third is turned away.
    let mut a = Client::connect(s.intake);
    a.ehlo();
    let mut b = Client::connect(s.intake);
    b.ehlo();
    let mut third = std::net::TcpStream::connect(s.intake).unwrap();
    third
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut text = String::new();
    let _ = std::io::Read::read_to_string(&mut third, &mut text);
    assert!(text.starts_with("421 4.7.0"), "{text}");
    assert!(
        text.contains("Too many connections from your address"),
        "{text}"
    );
    assert!(wait_until(10, || s
        .herald
        .log()
        .contains("bounces.max_connections_per_ip reached")));
    // Three reports, then 450 at MAIL FROM, on any connection.
    for _ in 0..3 {
        assert_eq!(a.send_bytes("", &[&fbl], junk).0, 250);
    }
    let (code, text) = b.cmd("MAIL FROM:<>");
    assert_eq!(code, 450, "{text}");
    assert!(text.contains("4.7.1"), "{text}");
    assert!(text.contains("bounces.max_rate_per_ip"), "{text}");
    // What the client pipelined behind a refused MAIL goes nowhere.
    let (code, _) = b.cmd(&format!("RCPT TO:<{fbl}>"));
    assert_eq!(code, 503);
    drop(a);
    drop(b);
    // Another client is not held back by that one.
    let (code, text) = report_from(
        &s,
        "127.0.0.2",
        path_of(&paths, "ann@dest.test"),
        &data("lhost-postfix-05.eml"),
    );
    assert_eq!(code, 250, "{text}");
    wait_event(&s.herald, "ann@dest.test", "bounced");
    assert!(metric(&s.herald, "refused_rate") >= 1);
}

#[test]
fn stored_reports_stay_within_max_stored() {
    // Room for four reports of max_size (200,000 bytes here).
    let s = setup("max_rate_per_ip = \"0\"\nmax_stored = 800000\n");
    let reports = s.herald.path("data/reports");
    let on_disk = || -> u64 {
        std::fs::read_dir(&reports)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.metadata().unwrap().len())
            .sum()
    };
    let (_, paths) = send(&s, &["ann@dest.test"], "budget");
    let junk = {
        let mut m = b"Subject: junk\n\n".to_vec();
        while m.len() < 190_000 {
            m.extend_from_slice(b"junk junk junk junk junk junk junk junk junk junk junk junk\n");
        }
        m
    };
    // A report over max_size is refused outright (552).
    let mut big = junk.clone();
    big.extend_from_slice(&junk);
    let (code, _) = report(&s, "", &format!("fbl@{DOMAIN}"), &big);
    assert_eq!(code, 552);
    let mut accepted: Vec<String> = Vec::new();
    for i in 0..30 {
        // 452 while reports not applied yet fill the complaint address's
        // half of the budget: a sender tries again once they are applied.
        let mut tries = 0;
        loop {
            let (code, text) = report_from(
                &s,
                &format!("127.0.0.{}", 10 + i % 5),
                &format!("fbl@{DOMAIN}"),
                &junk,
            );
            match code {
                250 => {
                    accepted.push(queue_id(&text));
                    break;
                }
                452 if tries < 3 => {
                    assert!(text.contains("4.3.1 Report storage full"), "{text}");
                    tries += 1;
                    let n = accepted.len() as u64;
                    assert!(wait_until(30, || metric(&s.herald, "unparsed") == n));
                }
                _ => panic!("{code} {text}"),
            }
        }
        let st = status(&s.herald);
        let stored = st["reports"]["stored_bytes"].as_u64().unwrap();
        assert!(stored <= 800_000, "{stored} after report {i}");
        assert!(
            on_disk() <= 800_000,
            "{} on disk after report {i}",
            on_disk()
        );
    }
    assert!(wait_until(30, || metric(&s.herald, "unparsed")
        == accepted.len() as u64));
    // Applied reports keep only their start, and the oldest went.
    for e in std::fs::read_dir(&reports).unwrap() {
        assert!(e.unwrap().metadata().unwrap().len() <= 64 * 1024);
    }
    assert!(metric(&s.herald, "evicted") > 0);
    let (code, _, err) = s.herald.cli(&["show", &accepted[0]]);
    assert_ne!(code, 0);
    assert!(err.contains("no message"), "{err}");
    let newest = s.herald.ok(&["show", accepted.last().unwrap()]);
    assert!(newest.contains("state: unparsed"), "{newest}");
    // A genuine bounce still gets in and is applied.
    let (code, text) = report_from(
        &s,
        "127.0.0.3",
        path_of(&paths, "ann@dest.test"),
        &data("lhost-postfix-05.eml"),
    );
    assert_eq!(code, 250, "{text}");
    wait_event(&s.herald, "ann@dest.test", "bounced");
    assert!(on_disk() <= 800_000);
    let st = s.herald.ok(&["status"]);
    assert!(st.contains("reports stored:"), "{st}");
}

#[test]
fn a_crash_mid_delivery_resends_at_most_the_transaction_in_flight() {
    let sink = Sink::start(Script {
        data_delay: Some(std::time::Duration::from_millis(40)),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bounce.key"), format!("{KEY}\n")).unwrap();
    let intake = free_port();
    let mut herald = Herald::start_in(
        dir,
        &format!(
            "{}\n[bounces]\ndomain = \"{DOMAIN}\"\nlisten = [\"127.0.0.1:{intake}\"]\nsecret_file = \"{{dir}}/bounce.key\"\n",
            upstream(sink.port(), "none", "")
        ),
    );
    let rcpts: Vec<String> = (0..60).map(|i| format!("r{i}@dest.test")).collect();
    let refs: Vec<&str> = rcpts.iter().map(|s| s.as_str()).collect();
    let mut c = herald.client();
    c.ehlo();
    let (code, text) = c.send("app@customer.test", &refs, &message("sixty"));
    assert_eq!(code, 250, "{text}");
    assert!(wait_until(30, || sink.count() >= 25), "{}", herald.log());
    herald.kill9();
    let at_kill = sink.count();
    assert!(at_kill < 60, "all delivered before the kill: slow the sink");
    herald.spawn();
    let mut by_rcpt = std::collections::HashMap::new();
    assert!(
        wait_until(60, || {
            by_rcpt.clear();
            for m in sink.messages() {
                *by_rcpt.entry(m.rcpts[0].clone()).or_insert(0) += 1;
            }
            by_rcpt.len() == 60
        }),
        "{} of 60 after the restart\n{}",
        by_rcpt.len(),
        herald.log()
    );
    let dups: Vec<_> = by_rcpt.iter().filter(|(_, &n)| n > 1).collect();
    assert!(
        dups.len() <= 1,
        "sent twice: {dups:?} (killed at {at_kill})"
    );
    assert!(by_rcpt.values().all(|&n| n <= 2));
}

#[test]
fn intake_limits_that_make_no_sense_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bounce.key"), format!("{KEY}\n")).unwrap();
    let port = free_port();
    let config = |extra: &str| {
        format!(
            "{BASE}[listen]\nsmtp = [\"127.0.0.1:{port}\"]\n[bounces]\ndomain = \"{DOMAIN}\"\nlisten = [\"127.0.0.1:{}\"]\nsecret_file = \"bounce.key\"\n{extra}\n",
            free_port()
        )
    };
    let err = serve_fails(
        dir.path(),
        &config("max_size = 1048576\nmax_stored = 2000000"),
    );
    assert!(
        err.contains("bounces.max_stored") && err.contains("fewer than 4 reports"),
        "{err}"
    );
    let err = serve_fails(dir.path(), &config("max_rate_per_ip = \"lots\""));
    assert!(err.contains("bounces.max_rate_per_ip"), "{err}");
    let err = serve_fails(dir.path(), &config("max_connections_per_ip = 0"));
    assert!(err.contains("bounces.max_connections_per_ip"), "{err}");
}

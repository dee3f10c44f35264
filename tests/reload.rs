//! Configuration reload without restart (`herald reload`, SIGHUP): a DKIM
//! key rotated under load loses and leaves unsigned no message; a broken
//! config is refused as a whole and the old one goes on; users, routes and
//! upstreams change for what comes next; listeners need a restart; a
//! session open across a reload finishes its transaction.

mod common;

use common::*;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

/// `[[dkim]]` for example.com with selector `sel`, key file `sel.pem`.
fn dkim(sel: &str) -> String {
    format!(
        "[[dkim]]\ndomain = \"example.com\"\nselector = \"{sel}\"\nprivate_key = \"{sel}.pem\"\n"
    )
}

/// Rewrites the config of `h` with `f`.
fn edit(h: &Herald, f: impl FnOnce(String) -> String) {
    let text = std::fs::read_to_string(&h.config).unwrap();
    std::fs::write(&h.config, f(text)).unwrap();
}

/// The selector (s=) of a message's DKIM signature, if it has one.
fn selector(m: &Received) -> Option<String> {
    let t = m.text();
    let sig = t.strip_prefix("DKIM-Signature: ")?;
    let s = sig.split("; s=").nth(1)?;
    Some(s.split(';').next()?.trim().to_string())
}

/// Subject "load N": N.
fn number(m: &Received) -> usize {
    let t = m.text();
    let at = t.find("Subject: load ").expect("subject") + "Subject: load ".len();
    t[at..]
        .split("\r\n")
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn dkim_key_rotated_under_load_signs_every_message_with_the_old_or_the_new_key() {
    let sink = Sink::start(Script::default());
    let dir = tempfile::tempdir().unwrap();
    let a = dkim_keygen(dir.path(), "example.com", "a", "rsa", "a.pem");
    let b = dkim_keygen(dir.path(), "example.com", "b", "ed25519", "b.pem");
    let h = Herald::start_in(
        dir,
        &format!("{}{}", dkim("a"), upstream(sink.port(), "none", "")),
    );

    // Two senders: one keeps its session for every message (a pooled
    // platform connection), one opens a session per message.
    let started = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = [true, false]
        .into_iter()
        .map(|keep| {
            let (started, stop, addr) = (started.clone(), stop.clone(), h.smtp);
            thread::spawn(move || {
                let mut replies = Vec::new();
                let mut session: Option<Client> = None;
                while !stop.load(Ordering::Relaxed) {
                    let n = started.fetch_add(1, Ordering::SeqCst);
                    let c = session.get_or_insert_with(|| {
                        let mut c = Client::connect(addr);
                        c.ehlo();
                        c
                    });
                    let (code, text) = c.send(
                        "app@platform.test",
                        &["louise@dest.test"],
                        &message(&format!("load {n}")),
                    );
                    replies.push((n, code, text));
                    if !keep {
                        c.cmd("QUIT");
                        session = None;
                    }
                }
                replies
            })
        })
        .collect();

    assert!(wait_until(30, || started.load(Ordering::SeqCst) >= 30));
    edit(&h, |t| t.replace(&dkim("a"), &dkim("b")));
    let out = h.ok(&["reload"]);
    assert!(out.contains("reloaded "), "{out}");
    assert!(out.contains("dkim (1 key)"), "{out}");
    assert!(!out.contains("needs a restart"), "{out}");
    // Every message started from here on is signed with the new key.
    let mark = started.load(Ordering::SeqCst);
    assert!(wait_until(30, || started.load(Ordering::SeqCst) >= mark + 30));
    stop.store(true, Ordering::Relaxed);
    let replies: Vec<(usize, u16, String)> = senders
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    for (n, code, text) in &replies {
        assert_eq!(*code, 250, "message {n}: {text}");
    }

    // None lost.
    let msgs = sink.wait_for(replies.len(), 30);
    assert_eq!(msgs.len(), replies.len(), "{}", h.log());
    // None unsigned, every signature verified by dkimpy against the
    // published record of its selector.
    let data: Vec<Vec<u8>> = msgs.iter().map(|m| m.data.clone()).collect();
    let verdicts = dkimpy_all(&data, &[a, b]);
    let (mut by_a, mut by_b) = (0, 0);
    for (m, v) in msgs.iter().zip(verdicts) {
        let n = number(m);
        let v = v.unwrap_or_else(|e| panic!("message {n}: {e}\n{}", m.text()));
        match selector(m).as_deref() {
            Some("a") => {
                assert!(v.contains("s=a a=rsa-sha256"), "{v}");
                assert!(
                    n < mark,
                    "message {n} started after the reload, signed by a"
                );
                by_a += 1;
            }
            Some("b") => {
                assert!(v.contains("s=b a=ed25519-sha256"), "{v}");
                by_b += 1;
            }
            other => panic!("message {n}: selector {other:?}\n{}", m.text()),
        }
    }
    assert!(by_a >= 30 && by_b >= 30, "a: {by_a}, b: {by_b}");
}

#[test]
fn a_broken_config_is_refused_and_the_old_one_goes_on() {
    let sink = Sink::start(Script::default());
    let dir = tempfile::tempdir().unwrap();
    let a = dkim_keygen(dir.path(), "example.com", "a", "ed25519", "a.pem");
    let h = Herald::start_in(
        dir,
        &format!("{}{}", dkim("a"), upstream(sink.port(), "none", "")),
    );
    let good = std::fs::read_to_string(&h.config).unwrap();
    std::fs::write(h.path("b.pem"), "not a key\n").unwrap();
    let cases = [
        (
            // A bad duration.
            good.replace(
                "retry_schedule = [\"1s\"]",
                "retry_schedule = [\"1s\"]\nmax_age = \"forever\"",
            ),
            "delivery.max_age: \"forever\" is not a duration",
        ),
        (
            // A route to an upstream that does not exist.
            format!("{good}\n[[routes]]\nsender_domain = \"customer.test\"\nupstream = \"nope\"\n"),
            "routes[0].upstream",
        ),
        (
            // Valid keys, but the new DKIM key file holds no key: nothing
            // of the file applies, the valid parts neither.
            good.replace(&dkim("a"), &dkim("b"))
                .replace("retry_schedule = [\"1s\"]", "retry_schedule = [\"2s\"]"),
            "b.pem: no PEM private key found",
        ),
        (format!("{good}\nnot toml ["), "herald.toml"),
    ];
    for (n, (text, want)) in cases.iter().enumerate() {
        std::fs::write(&h.config, text).unwrap();
        let (code, out, err) = h.cli(&["reload"]);
        assert_eq!(code, 1, "case {n}: {out}{err}");
        assert!(err.contains(want), "case {n}: {err}");
        assert!(!out.contains("reloaded"), "case {n}: {out}");
        // check-config says the same.
        let (code, check) = run_herald([
            "check-config".as_ref(),
            "--config".as_ref(),
            h.config.as_os_str(),
        ]);
        assert_eq!(code, 1, "case {n}: {check}");
        assert!(check.contains(want), "case {n}: {check}");

        // Still running on the old config: relayed, signed by a.
        let mut c = h.client();
        c.ehlo();
        let subject = format!("after refusal {n}");
        assert_eq!(
            c.send(
                "app@platform.test",
                &["louise@dest.test"],
                &message(&subject)
            )
            .0,
            250
        );
        assert!(wait_until(10, || sink
            .messages()
            .iter()
            .any(|m| m.text().contains(&subject))));
        let m = sink
            .messages()
            .into_iter()
            .find(|m| m.text().contains(&subject))
            .unwrap();
        assert_eq!(selector(&m).as_deref(), Some("a"));
        dkimpy(&m.data, std::slice::from_ref(&a)).unwrap();
    }
    assert!(h.log().contains("reload refused"), "{}", h.log());
    // Fixed: accepted.
    std::fs::write(&h.config, &good).unwrap();
    let out = h.ok(&["reload"]);
    assert!(out.contains("nothing changed"), "{out}");
}

/// AUTH PLAIN for user/pass.
fn plain(user: &str, pass: &str) -> String {
    use base64::Engine;
    let b = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{pass}"));
    format!("AUTH PLAIN {b}")
}

#[test]
fn sighup_reloads_the_users() {
    let sink = Sink::start(Script::default());
    let h = Herald::start(&format!(
        "[listen]\nsmtp = [\"{{smtp}}\"]\nallowed_networks = []\n[[listen.users]]\nusername = \"old\"\npassword = \"old-secret\"\n{}",
        upstream(sink.port(), "none", "")
    ));
    let mut c = h.client();
    c.ehlo();
    assert_eq!(c.cmd(&plain("old", "old-secret")).0, 235);

    edit(&h, |t| {
        t.replace("username = \"old\"", "username = \"new\"")
            .replace("old-secret", "new-secret")
    });
    let pid = h.child.as_ref().unwrap().id() as i32;
    unsafe {
        libc::kill(pid, libc::SIGHUP);
    }
    assert!(wait_until(10, || h
        .log()
        .contains("configuration reloaded")));
    assert!(
        h.log().contains("listen.users (1)"),
        "the log says what changed: {}",
        h.log()
    );
    // A session authenticated before goes on.
    assert_eq!(
        c.send("app@platform.test", &["a@dest.test"], &message("before"))
            .0,
        250
    );
    // The removed user cannot authenticate any more; the new one can.
    let mut c = h.client();
    c.ehlo();
    assert_eq!(c.cmd(&plain("old", "old-secret")).0, 535);
    let mut c = h.client();
    c.ehlo();
    assert_eq!(c.cmd(&plain("new", "new-secret")).0, 235);
    assert_eq!(
        c.send("app@platform.test", &["b@dest.test"], &message("after"))
            .0,
        250
    );
    assert_eq!(sink.wait_for(2, 10).len(), 2);
    // The passwords are not in the log.
    let log = h.log();
    assert!(
        !log.contains("old-secret") && !log.contains("new-secret"),
        "{log}"
    );
}

#[test]
fn new_routes_and_upstreams_apply_to_new_mail() {
    let first = Sink::start(Script::default());
    let second = Sink::start(Script::default());
    let h = Herald::start(&upstream(first.port(), "none", ""));
    let mut c = h.client();
    c.ehlo();
    assert_eq!(
        c.send("app@platform.test", &["a@dest.test"], &message("one"))
            .0,
        250
    );
    assert_eq!(first.wait_for(1, 10).len(), 1);

    edit(&h, |t| {
        format!(
            "{t}\n[upstreams.second]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\nmax_connections = 2\n\
             [[routes]]\nsender_domain = \"customer.test\"\nupstream = \"second\"\ndefault_sender = \"notify@second.example\"\n",
            second.port()
        )
    });
    let out = h.ok(&["reload"]);
    assert!(out.contains("upstreams"), "{out}");
    assert!(out.contains("routes"), "{out}");
    // The session opened before the reload sends its next message by the
    // new route, with the route's sender.
    assert_eq!(
        c.send("app@platform.test", &["b@dest.test"], &message("two"))
            .0,
        250
    );
    let got = second.wait_for(1, 10);
    assert_eq!(got.len(), 1, "{}", h.log());
    assert!(
        got[0].text().contains("<notify@second.example>"),
        "{}",
        got[0].text()
    );
    assert_eq!(first.count(), 1);
    // status knows the new upstream and its limit; a new limit applies
    // in place.
    let max_sessions = || {
        let status: serde_json::Value = serde_json::from_str(&h.ok(&["status", "--json"])).unwrap();
        status["destinations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == "second")
            .map(|d| d["max_sessions"].clone())
    };
    assert_eq!(max_sessions(), Some(2.into()));
    edit(&h, |t| {
        t.replace(
            "max_connections = 2",
            "max_connections = 5\nmax_rate = \"30/m\"",
        )
    });
    assert!(h.ok(&["reload"]).contains("upstreams"));
    assert_eq!(max_sessions(), Some(5.into()));

    // Removed again: new mail goes by [delivery] upstream.
    std::fs::write(
        &h.config,
        std::fs::read_to_string(&h.config)
            .unwrap()
            .split("\n[upstreams.second]")
            .next()
            .unwrap(),
    )
    .unwrap();
    let out = h.ok(&["reload"]);
    assert!(out.contains("upstreams") && out.contains("routes"), "{out}");
    assert_eq!(
        c.send("app@platform.test", &["c@dest.test"], &message("three"))
            .0,
        250
    );
    assert_eq!(first.wait_for(2, 10).len(), 2, "{}", h.log());
    assert_eq!(second.count(), 1);
}

#[test]
fn a_new_listener_address_needs_a_restart_and_the_old_one_keeps_serving() {
    let sink = Sink::start(Script::default());
    let h = Herald::start(&upstream(sink.port(), "none", ""));
    let other = free_port();
    edit(&h, |t| {
        t.replace(&h.smtp.to_string(), &format!("127.0.0.1:{other}"))
            .replace("retry_schedule = [\"1s\"]", "retry_schedule = [\"2s\"]")
    });
    for _ in 0..2 {
        // Said again at each reload, until a restart.
        let (code, out, err) = h.cli(&["reload"]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("needs a restart: listen.smtp"), "{out}");
    }
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", other)).is_err(),
        "not bound without a restart"
    );
    assert!(h.log().contains("only a restart applies"), "{}", h.log());
    let mut c = h.client();
    c.ehlo();
    assert_eq!(
        c.send("app@platform.test", &["a@dest.test"], &message("still"))
            .0,
        250
    );
    assert_eq!(sink.wait_for(1, 10).len(), 1);
}

#[test]
fn a_session_open_across_a_reload_finishes_its_transaction() {
    let sink = Sink::start(Script::default());
    let h = Herald::start(&format!(
        "[listen]\nsmtp = [\"{{smtp}}\"]\nmax_recipients = 2\n{}",
        upstream(sink.port(), "none", "")
    ));
    let mut c = h.client();
    c.ehlo();
    assert_eq!(c.cmd("MAIL FROM:<app@platform.test>").0, 250);
    assert_eq!(c.cmd("RCPT TO:<a@dest.test>").0, 250);
    edit(&h, |t| {
        t.replace("max_recipients = 2", "max_recipients = 1")
    });
    let out = h.ok(&["reload"]);
    assert!(out.contains("listen"), "{out}");
    // The transaction keeps the limits it started with.
    assert_eq!(c.cmd("RCPT TO:<b@dest.test>").0, 250);
    assert_eq!(c.cmd("DATA").0, 354);
    c.send_raw(message("across").replace('\n', "\r\n").as_bytes());
    let (code, text) = c.cmd(".");
    assert_eq!(code, 250, "{text}");
    // The next one in the same session has the new ones.
    assert_eq!(c.cmd("MAIL FROM:<app@platform.test>").0, 250);
    assert_eq!(c.cmd("RCPT TO:<a@dest.test>").0, 250);
    assert_eq!(c.cmd("RCPT TO:<b@dest.test>").0, 452);
    let got = sink.wait_for(1, 10);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpts.len(), 2);
}

#[test]
fn reload_without_a_running_herald_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("herald.toml");
    std::fs::write(&cfg, BASE).unwrap();
    let (code, out) = run_herald(["reload".as_ref(), "--config".as_ref(), cfg.as_os_str()]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("herald is not running"), "{out}");
}

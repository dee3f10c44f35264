//! The support console in a real browser: herald with a sink upstream, mail
//! sent over SMTP, then headless Chromium (tests/console_test.py, selenium)
//! checks every view and action through the page.

mod common;

use common::*;

const TOKEN: &str = "support-console-token-0123";

#[test]
fn a_support_person_answers_from_the_browser_alone() {
    let sink = Sink::start(Script {
        rcpt_replies: vec![
            (
                "gone".into(),
                "550 5.1.1 <gone@dest.test>: Recipient address rejected: User unknown".into(),
            ),
            ("later".into(), "451 4.3.0 try again later".into()),
        ],
        ..Default::default()
    });
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("api.tokens"), format!("{TOKEN}\n")).unwrap();
    let h = Herald::start_in(
        dir,
        &format!(
            "[api]\nlisten = \"127.0.0.1:{port}\"\ntokens_file = \"api.tokens\"\n\
             [delivery]\nupstream = \"up\"\nretry_schedule = [\"1h\"]\n\
             [upstreams.up]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\n",
            sink.port()
        ),
    );
    let mut c = h.client();
    c.ehlo();
    for (rcpt, subject) in [
        ("ok@dest.test", "Your file is ready"),
        ("gone@dest.test", "Your file is ready"),
        ("hostile@dest.test", "<img src=x onerror=alert(1)>"),
    ] {
        let (code, _) = c.send(
            "app@platform.test",
            &[rcpt],
            &format!("Subject: {subject}\n\nhello\n"),
        );
        assert_eq!(code, 250);
    }
    let (code, reply) = c.send("app@platform.test", &["later@dest.test"], &message("later"));
    assert_eq!(code, 250);
    let deferred = queue_id(&reply);
    assert_eq!(sink.wait_for(2, 10).len(), 2);
    assert!(wait_until(10, || h
        .events("gone@dest.test")
        .iter()
        .any(|e| e["event"] == "bounced")));
    assert!(wait_until(10, || h
        .events("later@dest.test")
        .iter()
        .any(|e| e["event"] == "deferred")));

    let shots =
        std::env::var("HERALD_SCREENSHOTS").unwrap_or_else(|_| h.path("").display().to_string());
    let base = format!("http://127.0.0.1:{port}");
    let (ok, text) = python_script("console_test.py", &[&base, TOKEN, &deferred, &shots]);
    assert!(ok, "{text}\n{}", h.log());

    // What the page did, seen from outside the page.
    let (_, list, _) = h.cli(&["suppression", "list"]);
    assert!(!list.contains("gone@dest.test"), "Remove lifted it: {list}");
    let later = h.events("later@dest.test");
    assert!(later.iter().filter(|e| e["event"] == "deferred").count() >= 1);
    assert!(later.iter().any(|e| e["event"] == "cancelled"), "{later:?}");
    let seen = sink.state.lock().unwrap().rcpt_seen.clone();
    assert!(
        seen.iter().filter(|r| r.contains("later")).count() >= 2,
        "Retry now made another attempt: {seen:?}"
    );
}

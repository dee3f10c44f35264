//! Black-box tests of the relay core: the real binary, real sockets.

mod common;

use common::*;
use std::time::Duration;

#[test]
fn relays_one_and_many_recipients_with_rewritten_envelope_sender() {
    let sink = Sink::start(Script::default());
    let h = Herald::start(&upstream(sink.port(), "none", ""));
    let mut c = h.client();
    let ehlo = c.ehlo();
    assert!(ehlo.contains("PIPELINING"), "{ehlo}");
    assert!(ehlo.contains("SIZE 26214400"), "{ehlo}");
    assert!(ehlo.contains("8BITMIME"), "{ehlo}");
    let (code, text) = c.send("app@platform.test", &["one@dest.test"], &message("single"));
    assert_eq!(code, 250, "{text}");
    assert!(text.contains("queued as"), "{text}");
    let (code, _) = c.send(
        "app@platform.test",
        &["a@dest.test", "b@dest.test", "c@other.test"],
        &message("multi"),
    );
    assert_eq!(code, 250);
    c.cmd("QUIT");

    let msgs = sink.wait_for(2, 10);
    assert_eq!(msgs.len(), 2, "{}", h.log());
    let single = msgs
        .iter()
        .find(|m| m.text().contains("Subject: single"))
        .unwrap();
    assert_eq!(single.rcpts, vec!["one@dest.test"]);
    assert_eq!(single.mail_from, "bounces@example.com");
    assert!(
        single
            .text()
            .starts_with("Received: from client.test (127.0.0.1)"),
        "{}",
        single.text()
    );
    assert!(single.text().contains("your file is ready."));
    let multi = msgs
        .iter()
        .find(|m| m.text().contains("Subject: multi"))
        .unwrap();
    assert_eq!(
        multi.rcpts,
        vec!["a@dest.test", "b@dest.test", "c@other.test"]
    );
}

#[test]
fn accepts_null_sender_space_after_colon_and_pipelining() {
    let sink = Sink::start(Script::default());
    let h = Herald::start(&upstream(sink.port(), "none", ""));
    let mut c = h.client();
    c.ehlo();
    // The whole transaction in one write: replies come back in order.
    c.send_raw(
        b"MAIL FROM: <> SIZE=200 BODY=8BITMIME\r\nRCPT TO: <x@dest.test>\r\nDATA\r\nSubject: piped\r\n\r\nb\xc3\xa9\r\n.\r\nQUIT\r\n",
    );
    let codes: Vec<u16> = (0..5).map(|_| c.read_reply().0).collect();
    assert_eq!(codes, vec![250, 250, 354, 250, 221]);
    let msgs = sink.wait_for(1, 10);
    assert_eq!(msgs.len(), 1);
    assert!(
        msgs[0].data.ends_with(b"b\xc3\xa9\r\n"),
        "8-bit body intact"
    );
}

#[test]
fn smuggling_attempt_does_not_create_a_second_message() {
    let sink = Sink::start(Script::default());
    let h = Herald::start(&upstream(sink.port(), "none", ""));
    let mut c = h.client();
    c.ehlo();
    assert_eq!(c.cmd("MAIL FROM:<app@platform.test>").0, 250);
    assert_eq!(c.cmd("RCPT TO:<legit@dest.test>").0, 250);
    assert_eq!(c.cmd("DATA").0, 354);
    c.send_raw(
        b"Subject: smuggle\r\n\r\nhello\n.\r\nMAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@dest.test>\r\nDATA\r\nsmuggled\r\n.\r\n",
    );
    let (code, text) = c.read_reply();
    assert_eq!(code, 250, "{text}");
    // Only one reply: nothing after the bare LF was taken as a command.
    let (code, _) = c.cmd("NOOP");
    assert_eq!(code, 250);
    c.cmd("QUIT");
    let msgs = sink.wait_for(1, 10);
    std::thread::sleep(Duration::from_millis(500));
    let msgs_after = sink.messages();
    assert_eq!(msgs_after.len(), 1, "{msgs:?}");
    assert_eq!(msgs_after[0].rcpts, vec!["legit@dest.test"]);
    assert!(!sink
        .state
        .lock()
        .unwrap()
        .rcpt_seen
        .iter()
        .any(|r| r.contains("victim")));
    assert!(msgs_after[0].text().contains("smuggled"), "stays content");
}

#[test]
fn overlong_lines_and_bad_syntax_get_5xx_and_the_session_goes_on() {
    let h = Herald::start("");
    let mut c = h.client();
    c.ehlo();
    let long = format!("NOOP {}", "x".repeat(5000));
    assert_eq!(c.cmd(&long).0, 500);
    assert_eq!(c.cmd("NOOP").0, 250);
    assert_eq!(c.cmd("FROB").0, 500);
    assert_eq!(c.cmd("MAIL FROM:<a@b.test").0, 501);
    assert_eq!(c.cmd("MAIL FROM:<not-an-address>").0, 501);
    assert_eq!(c.cmd("RCPT TO:<x@dest.test>").0, 503);
    assert_eq!(c.cmd("MAIL FROM:<a@b.test> FOO=1").0, 555);
    assert_eq!(c.cmd("MAIL FROM:<a@b.test>").0, 250);
    assert_eq!(c.cmd("RCPT TO:<postmaster>").0, 501);
    assert_eq!(c.cmd("DATA").0, 503);
    c.send_raw(b"NOOP\n");
    assert_eq!(c.read_reply().0, 500, "bare LF command");
    // A data line over 1000 bytes is accepted (tests/long_lines.rs shows
    // what goes out).
    assert_eq!(c.cmd("RCPT TO:<x@dest.test>").0, 250);
    assert_eq!(c.cmd("DATA").0, 354);
    c.send_raw(format!("Subject: x\r\n\r\n{}\r\n.\r\n", "y".repeat(1200)).as_bytes());
    assert_eq!(c.read_reply().0, 250);
    assert_eq!(c.cmd("QUIT").0, 221);
}

#[test]
fn oversize_gets_552_and_too_many_recipients_452() {
    let h = Herald::start(
        "[listen]\nsmtp = [\"{smtp}\"]\nmax_message_size = 1000\nmax_recipients = 2\n",
    );
    let mut c = h.client();
    let ehlo = c.ehlo();
    assert!(ehlo.contains("SIZE 1000"), "{ehlo}");
    assert_eq!(c.cmd("MAIL FROM:<a@b.test> SIZE=5000").0, 552);
    let (code, _) = c.send(
        "a@b.test",
        &["x@dest.test"],
        &format!(
            "Subject: big\n\n{}\n",
            "z".repeat(100)
                .repeat(20)
                .chars()
                .collect::<Vec<_>>()
                .chunks(80)
                .map(|c| c.iter().collect::<String>())
                .collect::<Vec<_>>()
                .join("\n")
        ),
    );
    assert_eq!(code, 552);
    // One line longer than the whole size limit: 552 too, and the session
    // goes on.
    let (code, _) = c.send(
        "a@b.test",
        &["x@dest.test"],
        &format!("Subject: one line\n\n{}\n", "w".repeat(5000)),
    );
    assert_eq!(code, 552);
    assert_eq!(c.cmd("MAIL FROM:<a@b.test>").0, 250);
    assert_eq!(c.cmd("RCPT TO:<1@dest.test>").0, 250);
    assert_eq!(c.cmd("RCPT TO:<2@dest.test>").0, 250);
    assert_eq!(c.cmd("RCPT TO:<3@dest.test>").0, 452);
    assert_eq!(c.cmd("RSET").0, 250);
}

#[test]
fn relay_from_outside_allowed_networks_is_refused() {
    // 127.0.0.1 is outside these networks, and nobody can authenticate.
    let h = Herald::start("[listen]\nsmtp = [\"{smtp}\"]\nallowed_networks = [\"10.0.0.0/8\"]\n");
    let mut c = h.client();
    let ehlo = c.ehlo();
    assert!(!ehlo.contains("AUTH"), "{ehlo}");
    // Refused at RCPT, where the address is known (tests/rejected.rs).
    assert_eq!(c.cmd("MAIL FROM:<a@b.test>").0, 250);
    let (code, text) = c.cmd("RCPT TO:<x@dest.test>");
    assert_eq!(code, 550, "{text}");
    assert!(text.contains("allowed_networks"), "{text}");
    assert_eq!(c.cmd("DATA").0, 503);
}

#[test]
fn auth_is_required_outside_allowed_networks_and_checked() {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let sink = Sink::start(Script::default());
    let h = Herald::start(&format!(
        "[listen]\nsmtp = [\"{{smtp}}\"]\nallowed_networks = []\n[[listen.users]]\nusername = \"platform\"\npassword = \"s3cret\"\n{}",
        upstream(sink.port(), "none", "")
    ));
    let mut c = h.client();
    let ehlo = c.ehlo();
    assert!(ehlo.contains("AUTH PLAIN LOGIN"), "{ehlo}");
    assert_eq!(c.cmd("MAIL FROM:<a@b.test>").0, 250);
    assert_eq!(c.cmd("RCPT TO:<x@dest.test>").0, 530);
    assert_eq!(c.cmd("RSET").0, 250);
    let bad = b64.encode(b"\0platform\0wrong");
    assert_eq!(c.cmd(&format!("AUTH PLAIN {bad}")).0, 535);
    // AUTH LOGIN, answered line by line.
    assert_eq!(c.cmd("AUTH LOGIN").0, 334);
    assert_eq!(c.cmd(&b64.encode("platform")).0, 334);
    assert_eq!(c.cmd(&b64.encode("s3cret")).0, 235);
    let (code, text) = c.send("a@b.test", &["x@dest.test"], &message("authed"));
    assert_eq!(code, 250, "{text}");
    assert_eq!(sink.wait_for(1, 10).len(), 1);
    assert!(!h.log().contains("s3cret"), "password must never be logged");

    let mut c = h.client();
    c.ehlo();
    let good = b64.encode(b"\0platform\0s3cret");
    assert_eq!(c.cmd(&format!("AUTH PLAIN {good}")).0, 235);
    assert_eq!(c.cmd("MAIL FROM:<a@b.test>").0, 250);
}

#[test]
fn starttls_and_implicit_tls_inbound() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let sink = Sink::start(Script::default());
    let smtps = free_port();
    let h = Herald::start_in(
        dir,
        &format!(
            "[listen]\nsmtp = [\"{{smtp}}\"]\nsmtps = [\"127.0.0.1:{smtps}\"]\ntls = {{ cert = \"cert.pem\", key = \"key.pem\" }}\n{}",
            upstream(sink.port(), "none", "")
        ),
    );
    let mut c = h.client();
    let ehlo = c.ehlo();
    assert!(ehlo.contains("STARTTLS"), "{ehlo}");
    c.starttls(pki.client_config());
    let ehlo = c.ehlo();
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    assert_eq!(
        c.send("a@b.test", &["x@dest.test"], &message("starttls")).0,
        250
    );

    let mut c = Client::connect_tls(
        format!("127.0.0.1:{smtps}").parse().unwrap(),
        pki.client_config(),
    );
    c.ehlo();
    assert_eq!(
        c.send("a@b.test", &["y@dest.test"], &message("smtps")).0,
        250
    );

    let msgs = sink.wait_for(2, 10);
    assert_eq!(msgs.len(), 2);
    let st = msgs
        .iter()
        .find(|m| m.text().contains("Subject: starttls"))
        .unwrap();
    assert!(st.text().contains("with ESMTPS"), "{}", st.text());
}

#[test]
fn temporary_failure_is_retried_then_delivered() {
    let sink = Sink::start(Script {
        data_replies: ["451 4.3.0 try again later".to_string()].into(),
        ..Default::default()
    });
    let h = Herald::start(&upstream(sink.port(), "none", ""));
    let mut c = h.client();
    c.ehlo();
    assert_eq!(
        c.send("a@b.test", &["x@dest.test"], &message("retry")).0,
        250
    );
    let msgs = sink.wait_for(1, 15);
    assert_eq!(msgs.len(), 1, "{}", h.log());
    assert_eq!(sink.state.lock().unwrap().data_attempts, 2);
    assert!(h.log().contains("451 4.3.0 try again later"), "{}", h.log());
}

#[test]
fn permanent_failure_bounces_once_and_is_never_retried() {
    let sink = Sink::start(Script {
        rcpt_replies: vec![("gone".into(), "550 5.1.1 no such user".into())],
        ..Default::default()
    });
    let h = Herald::start(&upstream(sink.port(), "none", ""));
    let mut c = h.client();
    c.ehlo();
    assert_eq!(
        c.send(
            "a@b.test",
            &["gone@dest.test", "here@dest.test"],
            &message("bounce")
        )
        .0,
        250
    );
    let msgs = sink.wait_for(1, 10);
    assert_eq!(msgs[0].rcpts, vec!["here@dest.test"]);
    // Retries run every second: wait for three of them.
    std::thread::sleep(Duration::from_secs(3));
    let seen = sink.state.lock().unwrap().rcpt_seen.clone();
    assert_eq!(
        seen.iter().filter(|r| r.contains("gone")).count(),
        1,
        "{seen:?}"
    );
    assert_eq!(sink.count(), 1);
    assert!(h.log().contains("bounced"), "{}", h.log());
}

#[test]
fn upstream_down_defers_then_delivers_when_it_returns() {
    let port = free_port();
    let h = Herald::start(&upstream(port, "none", ""));
    let mut c = h.client();
    c.ehlo();
    assert_eq!(
        c.send("a@b.test", &["x@dest.test"], &message("later")).0,
        250
    );
    // One line for the destination, not one per message.
    assert!(
        wait_until(10, || h.log().contains("destination throttled")),
        "{}",
        h.log()
    );
    let sink = Sink::start_on(port, Script::default());
    let msgs = sink.wait_for(1, 15);
    assert_eq!(msgs.len(), 1, "{}", h.log());
}

#[test]
fn upstream_starttls_with_private_ca_and_auth() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    std::fs::write(dir.path().join("up.pass"), "hunter2\n").unwrap();
    let sink = Sink::start(Script {
        starttls: Some(pki.server_config()),
        auth: Some(("relay".into(), "hunter2".into())),
        ..Default::default()
    });
    let h = Herald::start_in(
        dir,
        &upstream(
            sink.port(),
            "starttls",
            "username = \"relay\"\npassword_file = \"up.pass\"\nca_file = \"ca.pem\"\n",
        ),
    );
    let mut c = h.client();
    c.ehlo();
    for i in 0..3 {
        assert_eq!(
            c.send("a@b.test", &["x@dest.test"], &message(&format!("tls {i}")))
                .0,
            250
        );
    }
    let msgs = sink.wait_for(3, 15);
    assert_eq!(msgs.len(), 3, "{}", h.log());
    assert!(msgs
        .iter()
        .all(|m| m.tls && m.auth.as_deref() == Some("relay")));
    assert!(!h.log().contains("hunter2"));
}

/// A sink speaking implicit TLS with a certificate of a fresh test CA,
/// and the directory holding `ca.pem` for herald's config.
fn implicit_tls_sink() -> (tempfile::TempDir, Sink) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let sink = Sink::start(Script {
        implicit_tls: Some(pki.server_config()),
        ..Default::default()
    });
    (dir, sink)
}

#[test]
fn upstream_implicit_tls() {
    let (dir, sink) = implicit_tls_sink();
    let h = Herald::start_in(dir, &upstream(sink.port(), "tls", "ca_file = \"ca.pem\"\n"));
    let mut c = h.client();
    c.ehlo();
    assert_eq!(
        c.send("a@b.test", &["x@dest.test"], &message("implicit")).0,
        250
    );
    let msgs = sink.wait_for(1, 10);
    assert_eq!(msgs.len(), 1, "{}", h.log());
    assert!(msgs[0].tls);
}

#[test]
fn upstream_certificate_is_verified_by_default() {
    let (dir, sink) = implicit_tls_sink();
    // No ca_file: the test CA is not trusted, so nothing is delivered.
    let h = Herald::start_in(dir, &upstream(sink.port(), "tls", ""));
    let mut c = h.client();
    c.ehlo();
    assert_eq!(
        c.send("a@b.test", &["x@dest.test"], &message("untrusted"))
            .0,
        250
    );
    assert!(
        wait_until(10, || h.log().contains("TLS handshake")),
        "{}",
        h.log()
    );
    assert_eq!(sink.count(), 0);
}

#[test]
fn auth_refused_by_upstream_defers_everyone_and_marks_the_route() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("up.pass"), "wrong").unwrap();
    let sink = Sink::start(Script {
        auth: Some(("relay".into(), "right".into())),
        ..Default::default()
    });
    let h = Herald::start_in(
        dir,
        &upstream(
            sink.port(),
            "none",
            "username = \"relay\"\npassword_file = \"up.pass\"\n",
        ),
    );
    let mut c = h.client();
    c.ehlo();
    assert_eq!(
        c.send("a@b.test", &["x@dest.test", "y@dest.test"], &message("535"))
            .0,
        250
    );
    assert!(wait_until(10, || sink.state.lock().unwrap().auth_failures >= 3));
    let log = h.log();
    assert!(!log.contains("bounced"), "{log}");
    assert!(log.contains("deferred"), "{log}");
    assert!(log.contains("535 5.7.8"), "{log}");
    assert_eq!(
        log.matches("route refused by upstream").count(),
        1,
        "logged once:\n{log}"
    );
    assert_eq!(sink.count(), 0);
    // The operator fixes the credentials upstream: mail flows.
    sink.state.lock().unwrap().script.auth = Some(("relay".into(), "wrong".into()));
    let msgs = sink.wait_for(1, 10);
    assert_eq!(msgs[0].rcpts.len(), 2, "{}", h.log());
    assert!(wait_until(5, || h.log().contains("route works again")));
}

#[test]
fn kill_9_loses_no_acknowledged_message() {
    let port = free_port();
    let mut h = Herald::start(&upstream(port, "none", ""));
    let addr = h.smtp;
    let mut threads = Vec::new();
    for t in 0..4 {
        threads.push(std::thread::spawn(move || {
            let mut acked = Vec::new();
            let mut c = Client::connect(addr);
            c.ehlo();
            for i in 0..25 {
                let subject = format!("crash {t}-{i}");
                let (code, _) = c.send("a@b.test", &["x@dest.test"], &message(&subject));
                if code == 250 {
                    acked.push(subject);
                }
            }
            acked
        }));
    }
    let acked: Vec<String> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert_eq!(acked.len(), 100);
    h.kill9();
    let sink = Sink::start_on(port, Script::default());
    h.spawn();
    let msgs = sink.wait_for(100, 30);
    for s in &acked {
        assert!(
            msgs.iter()
                .any(|m| m.text().contains(&format!("Subject: {s}\r\n"))),
            "lost {s}:\n{}",
            h.log()
        );
    }
}

#[test]
fn sigterm_lets_a_session_in_flight_finish() {
    let sink = Sink::start(Script::default());
    let maddr = format!("127.0.0.1:{}", free_port());
    let mut h = Herald::start(&format!(
        "{}\n[control]\nmetrics_listen = \"{maddr}\"\n",
        upstream(sink.port(), "none", "")
    ));
    assert_eq!(http_get(&maddr, "/healthz").0, 200);
    let mut c = h.client();
    c.ehlo();
    assert_eq!(c.cmd("MAIL FROM:<a@b.test>").0, 250);
    assert_eq!(c.cmd("RCPT TO:<x@dest.test>").0, 250);
    assert_eq!(c.cmd("DATA").0, 354);
    let pid = h.child.as_ref().unwrap().id() as i32;
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    std::thread::sleep(Duration::from_millis(300));
    // New connections are refused while the session in flight goes on,
    // and a balancer's health check fails from the first moment.
    assert!(std::net::TcpStream::connect(h.smtp).is_err());
    assert!(std::net::TcpStream::connect(&maddr).is_err());
    c.send_raw(b"Subject: drain\r\n\r\nbody\r\n.\r\n");
    assert_eq!(c.read_reply().0, 250);
    let st = h.terminate();
    assert!(st.is_some_and(|s| s.success()), "{}", h.log());
}

#[test]
fn connection_cap_gets_421() {
    let h = Herald::start("[listen]\nsmtp = [\"{smtp}\"]\nmax_connections = 2\n");
    use std::io::{BufRead, BufReader};
    let greeting = |s: &std::net::TcpStream| {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut line = String::new();
        let _ = BufReader::new(s).read_line(&mut line);
        line
    };
    // The start-up probe's connection may hold a slot for a moment after it
    // closed: wait until two sessions are really greeted.
    let mut held = Vec::new();
    assert!(wait_until(10, || {
        let s = std::net::TcpStream::connect(h.smtp).unwrap();
        if greeting(&s).starts_with("220 ") {
            held.push(s);
        }
        held.len() == 2
    }));
    let mut s = std::net::TcpStream::connect(h.smtp).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = String::new();
    use std::io::Read;
    let _ = s.read_to_string(&mut buf);
    assert!(buf.starts_with("421 "), "{buf:?}");
}

#[test]
fn check_config_names_the_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[delivery]\nmax_age = \"forever\"\n", "delivery.max_age"),
        (
            "[listen]\nmax_message_size = -1\n",
            "listen.max_message_size",
        ),
        ("[listen]\nsmtp = [\"localhost\"]\n", "listen.smtp"),
        ("[delivery]\nupstream = \"nowhere\"\n", "delivery.upstream"),
        (
            "[upstreams.p]\nhost = \"h\"\npassword_file = \"missing.pass\"\nusername = \"u\"\n",
            "upstreams.p.password_file",
        ),
        ("[storage]\nretention = \"7d\"\n", "retention"),
    ];
    for (extra, key) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, format!("{BASE}{extra}")).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra}");
        assert!(err.contains(key), "{extra}: {err}");
    }
    // The example config is valid as shipped.
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/herald.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["check-config", "--config", example])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn idle_upstream_connection_is_reused_for_the_next_message() {
    let sink = Sink::start(Script::default());
    let h = Herald::start(&upstream(sink.port(), "none", ""));
    let mut c = h.client();
    c.ehlo();
    for i in 1..=3 {
        assert_eq!(
            c.send(
                "a@b.test",
                &["x@dest.test"],
                &message(&format!("reuse {i}"))
            )
            .0,
            250
        );
        assert_eq!(sink.wait_for(i, 10).len(), i);
    }
    assert_eq!(sink.state.lock().unwrap().connections, 1, "{}", h.log());
}

#[test]
fn recipients_expire_after_max_age() {
    let port = free_port();
    let h = Herald::start(&format!(
        "[delivery]\nupstream = \"up\"\nretry_schedule = [\"1s\"]\nmax_age = \"2s\"\n[upstreams.up]\nhost = \"127.0.0.1\"\nport = {port}\nsecurity = \"none\"\n"
    ));
    let mut c = h.client();
    c.ehlo();
    assert_eq!(
        c.send("a@b.test", &["x@dest.test"], &message("stale")).0,
        250
    );
    assert!(
        wait_until(10, || h.log().contains("expired")),
        "{}",
        h.log()
    );
    let log = h.log();
    let line = log.lines().find(|l| l.contains("expired")).unwrap();
    assert!(line.contains("delivery.max_age"), "{line}");
    // Nothing is tried after expiry: a sink that comes up gets nothing.
    let sink = Sink::start_on(port, Script::default());
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(sink.count(), 0);
}

#[test]
fn malformed_headers_and_bad_control_headers_get_554() {
    let h = Herald::start("");
    let mut c = h.client();
    c.ehlo();
    let (code, text) = c.send(
        "a@b.test",
        &["x@dest.test"],
        "From: a@b.test\nnot a header line\n\nbody\n",
    );
    assert_eq!(code, 554, "{text}");
    assert!(text.contains("malformed header"), "{text}");
    let (code, text) = c.send(
        "a@b.test",
        &["x@dest.test"],
        "From: a@b.test\nFrom: c@d.test\n\nbody\n",
    );
    assert_eq!(code, 554, "{text}");
    let (code, text) = c.send(
        "a@b.test",
        &["x@dest.test"],
        "X-Herald-Delay: soon\nFrom: a@b.test\n\nbody\n",
    );
    assert_eq!(code, 554, "{text}");
    assert!(text.contains("X-Herald-Delay"), "{text}");
    let (code, text) = c.send(
        "a@b.test",
        &["x@dest.test"],
        "X-Herald-Delay: 30d\nFrom: a@b.test\n\nbody\n",
    );
    assert_eq!(code, 554, "longer than max_age: {text}");
    // The session is still usable.
    assert_eq!(
        c.send("a@b.test", &["x@dest.test"], &message("fine")).0,
        250
    );
}

#[test]
fn other_smuggling_variants_are_content_too() {
    let sink = Sink::start(Script::default());
    let h = Herald::start(&upstream(sink.port(), "none", ""));
    let smuggled =
        "MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@dest.test>\r\nDATA\r\nsmuggled\r\n";
    let long = "y".repeat(1200);
    let cases: Vec<(String, u16)> = vec![
        // "." + bare LF after a CRLF line.
        (
            format!("Subject: a\r\n\r\nhello\r\n.\n{smuggled}.\r\n"),
            250,
        ),
        // "." + bare LF after a bare LF line.
        (format!("Subject: b\r\n\r\nhello\n.\n{smuggled}.\r\n"), 250),
        // <LF>.<CR><LF> right after a line over 1000 bytes.
        (
            format!("Subject: c\r\n\r\n{long}\n.\r\n{smuggled}.\r\n"),
            250,
        ),
        // A bare CR is not a line end either.
        (
            format!("Subject: d\r\n\r\nhello\r.\r\n{smuggled}.\r\n"),
            250,
        ),
    ];
    for (i, (data, want)) in cases.iter().enumerate() {
        let mut c = h.client();
        c.ehlo();
        assert_eq!(c.cmd("MAIL FROM:<app@platform.test>").0, 250);
        assert_eq!(c.cmd(&format!("RCPT TO:<legit{i}@dest.test>")).0, 250);
        assert_eq!(c.cmd("DATA").0, 354);
        c.send_raw(data.as_bytes());
        let (code, text) = c.read_reply();
        assert_eq!(code, *want, "case {i}: {text}");
        let (code, text) = c.cmd("NOOP");
        assert_eq!(code, 250, "case {i}: exactly one reply to the data: {text}");
    }
    sink.wait_for(4, 10);
    std::thread::sleep(Duration::from_millis(500));
    assert!(!sink
        .state
        .lock()
        .unwrap()
        .rcpt_seen
        .iter()
        .any(|r| r.contains("victim")));
    for m in sink.messages() {
        assert_eq!(m.rcpts.len(), 1);
        assert!(m.text().contains("smuggled"), "stays content: {}", m.text());
    }
}

#[test]
fn authenticated_session_sends_several_messages_and_routes_by_auth_user() {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let main_sink = Sink::start(Script::default());
    let acme_sink = Sink::start(Script::default());
    // Loopback is in allowed_networks, yet the platform logs in: AUTH is
    // offered and its user picks the route.
    let h = Herald::start(&format!(
        "[[listen.users]]\nusername = \"acme\"\npassword = \"pw\"\n\
         [[routes]]\nauth_user = \"acme\"\nupstream = \"acme\"\n\
         [upstreams.acme]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\n{}",
        acme_sink.port(),
        upstream(main_sink.port(), "none", "")
    ));
    let mut c = h.client();
    let ehlo = c.ehlo();
    assert!(ehlo.contains("AUTH PLAIN LOGIN"), "{ehlo}");
    // Without AUTH a loopback client may relay: it goes the default route.
    assert_eq!(
        c.send("a@b.test", &["x@dest.test"], &message("anon")).0,
        250
    );
    assert_eq!(c.cmd("AUTH PLAIN").0, 334);
    assert_eq!(c.cmd("*").0, 501, "cancelled");
    assert_eq!(c.cmd("AUTH CRAM-MD5").0, 504);
    assert_eq!(c.cmd("AUTH PLAIN").0, 334);
    assert_eq!(c.cmd("not base64!").0, 501);
    assert_eq!(c.cmd("AUTH PLAIN").0, 334);
    assert_eq!(c.cmd(&b64.encode("\0acme\0pw")).0, 235);
    assert_eq!(c.cmd("AUTH PLAIN").0, 503, "already authenticated");
    assert_eq!(
        c.send("a@b.test", &["y@dest.test"], &message("acme 1")).0,
        250
    );
    assert_eq!(c.cmd("RSET").0, 250);
    assert_eq!(c.cmd("EHLO again.test").0, 250);
    let (code, text) = c.send("a@b.test", &["z@dest.test"], &message("acme 2"));
    assert_eq!(code, 250, "still authenticated after RSET and EHLO: {text}");
    assert_eq!(main_sink.wait_for(1, 10).len(), 1);
    let acme = acme_sink.wait_for(2, 10);
    assert_eq!(acme.len(), 2, "{}", h.log());
    assert!(acme[0].text().contains("with ESMTPA"), "{}", acme[0].text());
}

#[test]
fn sender_refusal_at_rcpt_is_a_route_failure_not_a_bounce() {
    let sink = Sink::start(Script {
        rcpt_replies: vec![(
            "@".into(),
            "553 5.7.1 <bounces@example.com>: Sender address rejected: not owned by user relay"
                .into(),
        )],
        ..Default::default()
    });
    let h = Herald::start(&upstream(sink.port(), "none", ""));
    let mut c = h.client();
    c.ehlo();
    assert_eq!(
        c.send(
            "a@b.test",
            &["x@dest.test", "y@dest.test"],
            &message("owned")
        )
        .0,
        250
    );
    assert!(
        wait_until(10, || h.log().contains("route refused by upstream")),
        "{}",
        h.log()
    );
    let log = h.log();
    assert!(!log.contains("bounced"), "{log}");
    assert!(!log.contains("address suppressed"), "{log}");
    // Fixed upstream-side: delivered on the next retry.
    sink.state.lock().unwrap().script.rcpt_replies.clear();
    assert_eq!(sink.wait_for(1, 10)[0].rcpts.len(), 2, "{}", h.log());
}

#[test]
fn mail_held_past_max_age_expires_instead_of_going_out_late() {
    let sink = Sink::start(Script::default());
    let h = Herald::start(&format!(
        "[delivery]\nupstream = \"up\"\nretry_schedule = [\"1s\"]\nmax_age = \"2s\"\n[upstreams.up]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\n",
        sink.port()
    ));
    let (code, out, err) = h.cli(&["pause"]);
    assert_eq!(code, 0, "{out}{err}");
    let mut c = h.client();
    c.ehlo();
    assert_eq!(
        c.send("a@b.test", &["x@dest.test"], &message("stale")).0,
        250
    );
    std::thread::sleep(Duration::from_millis(2500));
    let (code, _, _) = h.cli(&["resume"]);
    assert_eq!(code, 0);
    assert!(wait_until(5, || h.log().contains("expired")), "{}", h.log());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(sink.count(), 0);
    assert!(sink.state.lock().unwrap().rcpt_seen.is_empty());
}

#[test]
fn large_message_survives_kill_9() {
    let port = free_port();
    let mut h = Herald::start(&upstream(port, "none", ""));
    let mut c = h.client();
    c.ehlo();
    // ~400 KB: sled keeps values this large in blob files of their own.
    let line = "0123456789".repeat(7);
    let body = format!("{}\n", line).repeat(6000);
    let msg = format!("From: a@b.test\nSubject: big\n\n{body}");
    assert_eq!(c.send("a@b.test", &["x@dest.test"], &msg).0, 250);
    h.kill9();
    let sink = Sink::start_on(port, Script::default());
    h.spawn();
    let msgs = sink.wait_for(1, 20);
    assert_eq!(msgs.len(), 1, "{}", h.log());
    assert!(msgs[0].data.len() > 400_000);
    assert!(msgs[0].text().ends_with(&format!("{line}\r\n")));
}

#[test]
fn tls_verify_false_is_the_explicit_opt_out() {
    let (dir, sink) = implicit_tls_sink();
    let h = Herald::start_in(dir, &upstream(sink.port(), "tls", "tls_verify = false\n"));
    let mut c = h.client();
    c.ehlo();
    assert_eq!(
        c.send("a@b.test", &["x@dest.test"], &message("unverified"))
            .0,
        250
    );
    let msgs = sink.wait_for(1, 10);
    assert_eq!(msgs.len(), 1, "{}", h.log());
    assert!(msgs[0].tls);
}

#[test]
fn an_untrusted_upstream_certificate_is_diagnosed_as_one() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let sink = Sink::start(Script {
        implicit_tls: Some(pki.server_config()),
        ..Default::default()
    });
    // No ca_file: herald does not know the CA that signed the certificate.
    let h = Herald::start_in(
        dir,
        &upstream(sink.port(), "tls", "").replace("127.0.0.1", "localhost"),
    );
    let mut c = h.client();
    c.ehlo();
    assert_eq!(c.send("a@b.test", &["x@dest.test"], &message("tls")).0, 250);
    assert!(
        wait_until(20, || h.has_event("x@dest.test", "deferred")),
        "{}",
        h.log()
    );
    let t = h.ok(&["trace", "x@dest.test"]);
    assert!(t.contains("TLS handshake"), "{t}");
    assert!(
        t.contains("the certificate is not signed by a CA herald trusts") && t.contains("ca_file"),
        "{t}"
    );
    assert!(!t.contains("fix the route's credentials"), "{t}");
    assert_eq!(sink.count(), 0);
}

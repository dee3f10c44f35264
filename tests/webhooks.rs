//! Webhooks end to end: a receiver on loopback records the POSTs and checks
//! their signatures; events survive the receiver being down and a kill -9.

mod common;

use common::hooks::{Receiver, HOOK_KEY};
use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

const KEY: &str = HOOK_KEY;

const HTML: &str = "From: Claire <claire@customer.test>\nSubject: Your file\nX-Herald-Tag: file-7\nMIME-Version: 1.0\nContent-Type: text/html; charset=utf-8\n\n<html><body><p>Your file is ready.</p></body></html>\n";

#[test]
fn events_arrive_signed_once_each_after_the_receiver_was_down_and_a_kill_9() {
    let sink = Sink::start(Script {
        rcpt_replies: vec![(
            "gone".into(),
            "550 5.1.1 <gone@dest.test>: no such user".into(),
        )],
        ..Default::default()
    });
    let hook_port = free_port();
    let pixel_port = free_port();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tracking.key"), [7u8; 32]).unwrap();
    std::fs::write(dir.path().join("webhook.key"), KEY).unwrap();
    let mut h = Herald::start_in(
        dir,
        &format!(
            "[tracking]\nenabled = true\nlisten = \"127.0.0.1:{pixel_port}\"\nbase_url = \"http://127.0.0.1:{pixel_port}/\"\nsecret_file = \"tracking.key\"\n\
             [[webhooks]]\nname = \"platform\"\nurl = \"http://127.0.0.1:{hook_port}/hooks/mail\"\nsecret_file = \"webhook.key\"\n\
             events = [\"delivered\", \"bounced\", \"opened\", \"rejected\", \"cancelled\"]\ntimeout = \"2s\"\n{}",
            upstream(sink.port(), "none", "")
        ),
    );
    let mut c = h.client();
    c.ehlo();
    let (code, _) = c.send(
        "app@platform.test",
        &["ok@dest.test", "gone@dest.test"],
        HTML,
    );
    assert_eq!(code, 250);
    let msgs = sink.wait_for(1, 10);
    assert_eq!(msgs.len(), 1, "{}", h.log());
    assert!(wait_until(10, || h.has_event("gone@dest.test", "bounced")));
    // Opened: fetch the pixel that arrived.
    let text = msgs[0].text().replace("=\r\n", "");
    let at = text.find("/o/").expect("pixel");
    let path: String = text[at..].chars().take_while(|c| *c != '"').collect();
    let path = path.replace("=3D", "=");
    assert_eq!(http_get(&format!("127.0.0.1:{pixel_port}"), &path).0, 200);
    assert!(wait_until(10, || h.has_event("ok@dest.test", "opened")));
    // Rejected: two From fields.
    let (code, _) = c.send(
        "app@platform.test",
        &["rej@dest.test"],
        "From: a@b.test\nFrom: c@d.test\nSubject: two\n\nx\n",
    );
    assert_eq!(code, 554);
    assert!(wait_until(10, || h.has_event("rej@dest.test", "rejected")));
    // Cancelled: held by a delay, then cancelled (which commits everything
    // recorded before it).
    let (code, reply) = c.send(
        "app@platform.test",
        &["later@dest.test"],
        "Subject: later\nX-Herald-Delay: 1h\n\nlater\n",
    );
    assert_eq!(code, 250);
    let id = queue_id(&reply);
    drop(c);
    let (code, out, err) = h.cli(&["cancel", &id]);
    assert_eq!(code, 0, "{out}{err}");

    // The receiver is down: the backlog shows, with the error.
    assert!(
        wait_until(10, || {
            let (_, out, _) = h.cli(&["webhooks", "--json"]);
            out.contains("\"backlog\":") && out.contains("connect")
        }),
        "{}",
        h.cli(&["webhooks", "--json"]).1
    );
    let (code, out, _) = h.cli(&["webhooks"]);
    assert_eq!(code, 0);
    assert!(out.contains("platform") && out.contains("BACKLOG"), "{out}");
    let (code, _, err) = h.cli(&["webhooks", "test", "platform"]);
    assert_eq!(code, 1, "a dead endpoint fails the test");
    assert!(err.contains("platform"), "{err}");

    // kill -9, restart, then the receiver comes up: everything arrives.
    h.kill9();
    h.spawn();
    let rx = Receiver::start(hook_port, 200);
    let all = wait_until(30, || {
        rx.count("delivered", "ok@dest.test") == 1
            && rx.count("bounced", "gone@dest.test") == 1
            && rx.count("opened", "ok@dest.test") == 1
            && rx.count("rejected", "rej@dest.test") == 1
            && rx.count("cancelled", "later@dest.test") == 1
    });
    assert!(all, "{:#?}\n{}", rx.events(), h.log());
    let posts = rx.posts.lock().unwrap().clone();
    assert!(posts.iter().all(|p| p.signature_ok), "{posts:?}");
    for p in &posts {
        let ids: Vec<&str> = p
            .events
            .iter()
            .filter_map(|e| e["event_id"].as_str())
            .collect();
        assert_eq!(
            p.event_ids,
            ids.join(","),
            "Herald-Event-Id names the events"
        );
    }
    let bounced = rx
        .events()
        .into_iter()
        .find(|e| e["event"] == "bounced")
        .unwrap();
    assert_eq!(bounced["class"], "hard");
    assert_eq!(bounced["attempts"], 1);
    assert!(bounced["upstream"].is_string(), "{bounced}");
    let opened = rx
        .events()
        .into_iter()
        .find(|e| e["event"] == "opened")
        .unwrap();
    assert_eq!(opened["user_agent"], "test-mua");
    // Not asked for: no received or deferred events.
    assert!(!rx.events().iter().any(|e| e["event"] == "received"));
    // Nothing left, and the test event goes through.
    assert!(wait_until(10, || h
        .cli(&["webhooks", "--json"])
        .1
        .contains("\"backlog\":0")));
    let (code, out, err) = h.cli(&["webhooks", "test", "platform"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(rx.events().iter().any(|e| e["event"] == "test"));
}

#[test]
fn a_client_error_drops_the_event_with_a_log_line_and_a_server_error_or_redirect_retries() {
    let sink = Sink::start(Script::default());
    let hook_port = free_port();
    let rx = Receiver::start(hook_port, 503);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("webhook.key"), KEY).unwrap();
    let h = Herald::start_in(
        dir,
        &format!(
            "[[webhooks]]\nurl = \"http://127.0.0.1:{hook_port}/h\"\nsecret_file = \"webhook.key\"\nevents = [\"delivered\"]\n{}",
            upstream(sink.port(), "none", "")
        ),
    );
    let mut c = h.client();
    c.ehlo();
    assert_eq!(
        c.send("a@b.test", &["one@dest.test"], &message("one")).0,
        250
    );
    assert!(
        wait_until(10, || h.log().contains("webhook endpoint failing")),
        "{}",
        h.log()
    );
    // 503 is retried: once the endpoint answers 200, the event arrives.
    rx.status.store(200, Ordering::Relaxed);
    assert!(
        wait_until(20, || rx.count("delivered", "one@dest.test") == 1),
        "{}",
        h.log()
    );
    // A redirect is not followed, and the event is not lost: it waits.
    rx.status.store(302, Ordering::Relaxed);
    assert_eq!(
        c.send("a@b.test", &["redirected@dest.test"], &message("r"))
            .0,
        250
    );
    assert!(
        wait_until(20, || h
            .cli(&["webhooks", "--json"])
            .1
            .contains("a redirect, not followed")),
        "{}",
        h.log()
    );
    assert_eq!(rx.count("delivered", "redirected@dest.test"), 0);
    rx.status.store(200, Ordering::Relaxed);
    assert!(
        wait_until(20, || rx.count("delivered", "redirected@dest.test") == 1),
        "{}",
        h.log()
    );
    // 400 is final: dropped, logged, not retried.
    rx.status.store(400, Ordering::Relaxed);
    assert_eq!(
        c.send("a@b.test", &["two@dest.test"], &message("two")).0,
        250
    );
    assert!(
        wait_until(20, || h.log().contains("refused events; dropped")),
        "{}",
        h.log()
    );
    let (_, out, _) = h.cli(&["webhooks", "--json"]);
    assert!(
        out.contains("\"backlog\":0") && out.contains("\"dropped\":1"),
        "{out}"
    );
    let (code, _, err) = h.cli(&["webhooks", "test", "no-such-hook"]);
    assert_eq!(code, 1);
    assert!(err.contains("no webhook named"), "{err}");
}

#[test]
fn a_webhook_key_shorter_than_16_bytes_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("short.key"), "short").unwrap();
    let err = serve_fails(
        dir.path(),
        &format!(
            "{BASE}[[webhooks]]\nurl = \"http://127.0.0.1:9/h\"\nsecret_file = \"short.key\"\n"
        ),
    );
    assert!(err.contains("webhooks[0].secret_file"), "{err}");
}

#[test]
fn a_reload_adds_moves_and_removes_an_endpoint() {
    let sink = Sink::start(Script::default());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("webhook.key"), KEY).unwrap();
    let h = Herald::start_in(dir, &upstream(sink.port(), "none", ""));
    let base = std::fs::read_to_string(&h.config).unwrap();
    let hook = |port: u16| {
        format!("{base}\n[[webhooks]]\nname = \"platform\"\nurl = \"http://127.0.0.1:{port}/h\"\nsecret_file = \"webhook.key\"\nevents = [\"delivered\"]\ntimeout = \"2s\"\n")
    };
    let send = |rcpt: &str| {
        let mut c = h.client();
        c.ehlo();
        assert_eq!(c.send("app@platform.test", &[rcpt], HTML).0, 250);
    };

    // Added: the next events go to it, signed.
    let first_port = free_port();
    let first = Receiver::start(first_port, 200);
    std::fs::write(&h.config, hook(first_port)).unwrap();
    assert!(h.ok(&["reload"]).contains("webhooks (1)"));
    send("one@dest.test");
    assert!(wait_until(10, || first.count("delivered", "one@dest.test") == 1));
    assert!(first.posts.lock().unwrap().iter().all(|p| p.signature_ok));

    // Moved to another URL: the same sender (and counters) goes on there.
    let second_port = free_port();
    let second = Receiver::start(second_port, 200);
    std::fs::write(&h.config, hook(second_port)).unwrap();
    assert!(h.ok(&["reload"]).contains("webhooks (1)"));
    send("two@dest.test");
    assert!(wait_until(10, || second
        .count("delivered", "two@dest.test")
        == 1));
    assert_eq!(first.count("delivered", "two@dest.test"), 0);
    let list = h.ok(&["webhooks", "--json"]);
    assert!(list.contains(&format!("127.0.0.1:{second_port}")), "{list}");
    assert!(list.contains("\"delivered\":2"), "{list}");

    // Removed: nothing more is sent, and it is no longer listed.
    std::fs::write(&h.config, &base).unwrap();
    assert!(h.ok(&["reload"]).contains("webhooks (0)"));
    send("three@dest.test");
    assert_eq!(sink.wait_for(3, 10).len(), 3);
    assert!(wait_until(10, || h.has_event("three@dest.test", "delivered")));
    assert!(h.ok(&["webhooks"]).contains("no [[webhooks]] configured"));
    assert_eq!(second.count("delivered", "three@dest.test"), 0);
}

/// An HTTPS endpoint (its certificate from a private CA, given as the
/// webhook's `ca_file`) that keeps connections open: it counts them and
/// the POSTs it answers 200.
fn https_receiver(pki: &Pki) -> (u16, Arc<Mutex<Vec<Value>>>, Arc<AtomicU16>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let events: Arc<Mutex<Vec<Value>>> = Arc::default();
    let conns = Arc::new(AtomicU16::new(0));
    let cfg = pki.server_config();
    let (ev, n) = (events.clone(), conns.clone());
    thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(tcp) = tcp else { return };
            n.fetch_add(1, Ordering::SeqCst);
            let (cfg, ev) = (cfg.clone(), ev.clone());
            thread::spawn(move || {
                tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                let conn = rustls::ServerConnection::new(cfg).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut rd = BufReader::new(&mut tls);
                // Requests one after the other on this connection.
                loop {
                    let mut line = String::new();
                    if rd.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut len = 0;
                    loop {
                        line.clear();
                        if rd.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0u8; len];
                    if rd.read_exact(&mut body).is_err() {
                        return;
                    }
                    match serde_json::from_slice(&body).unwrap_or(Value::Null) {
                        Value::Array(a) => ev.lock().unwrap().extend(a),
                        other => ev.lock().unwrap().push(other),
                    }
                    let w = rd.get_mut();
                    if w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                        .is_err()
                    {
                        return;
                    }
                    let _ = w.flush();
                }
            });
        }
    });
    (port, events, conns)
}

#[test]
fn an_https_endpoint_with_its_own_ca_gets_every_event_over_one_kept_connection() {
    let sink = Sink::start(Script::default());
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let (port, events, conns) = https_receiver(&pki);
    std::fs::write(dir.path().join("webhook.key"), KEY).unwrap();
    let h = Herald::start_in(
        dir,
        &format!(
            "[[webhooks]]\nname = \"platform\"\nurl = \"https://localhost:{port}/hooks\"\nsecret_file = \"webhook.key\"\n\
             ca_file = \"{}\"\nevents = [\"delivered\"]\n{}",
            pki.ca.display(),
            upstream(sink.port(), "none", "")
        ),
    );
    let mut c = h.client();
    c.ehlo();
    // One message at a time: each delivery is its own POST.
    for i in 0..3 {
        let (code, _) = c.send("app@platform.test", &[&format!("u{i}@dest.test")], HTML);
        assert_eq!(code, 250);
        let n = i + 1;
        assert!(
            wait_until(10, || events.lock().unwrap().len() >= n),
            "{:?}\n{}",
            events.lock().unwrap(),
            h.log()
        );
    }
    let got = events.lock().unwrap().clone();
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got.iter().all(|e| e["event"] == "delivered"), "{got:?}");
    assert_eq!(
        conns.load(Ordering::SeqCst),
        1,
        "the three POSTs went over one kept TLS connection"
    );
}

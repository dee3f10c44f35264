//! Operations end to end: the real daemon, the real CLI on its control
//! socket, a sink as upstream.

mod common;

use common::*;
use serde_json::Value;
use std::time::Duration;

#[test]
fn pause_survives_restart_queue_lists_held_mail_and_resume_delivers() {
    let sink = Sink::start(Script::default());
    let mut h = Herald::start(&upstream(sink.port(), "none", ""));
    let out = h.ok(&["pause"]);
    assert!(out.contains("paused"), "{out}");
    let mut c = h.client();
    c.ehlo();
    let (code, reply) = c.send("a@b.test", &["louise@dest.test"], &message("paused"));
    assert_eq!(code, 250);
    let id = queue_id(&reply);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(sink.count(), 0, "paused: nothing goes out");
    let q = h.ok(&["queue"]);
    assert!(
        q.contains(&id) && q.contains("louise@dest.test") && q.contains("queued"),
        "{q}"
    );
    assert!(q.starts_with("ID "), "a table with headers: {q}");

    h.terminate().unwrap();
    h.spawn();
    let st = h.ok(&["status"]);
    assert!(st.contains("PAUSED"), "{st}");
    assert!(st.contains("queue: 1 message"), "{st}");
    let st = json_lines(&h.ok(&["status", "--json"]));
    assert_eq!(st[0]["paused"], Value::Bool(true));
    let q = json_lines(&h.ok(&["queue", "--json"]));
    assert_eq!(q.len(), 1);
    assert_eq!(q[0]["id"], Value::String(id.clone()));
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(sink.count(), 0, "still paused after restart");

    h.ok(&["resume"]);
    assert_eq!(sink.wait_for(1, 10).len(), 1, "{}", h.log());
    let st = json_lines(&h.ok(&["status", "--json"]));
    assert_eq!(st[0]["paused"], Value::Bool(false));
    assert_eq!(st[0]["messages"], 0, "delivered mail leaves the queue");
}

#[test]
fn history_shows_received_and_delivered_and_show_explains_a_message() {
    let sink = Sink::start(Script::default());
    let h = Herald::start(&upstream(sink.port(), "none", ""));
    let mut c = h.client();
    c.ehlo();
    let (_, reply) = c.send("a@b.test", &["Louise@Dest.test"], &message("history"));
    let id = queue_id(&reply);
    sink.wait_for(1, 10);
    assert!(wait_until(5, || h
        .ok(&["history", "--id", &id])
        .contains("delivered")));
    let ev = json_lines(&h.ok(&["history", "--rcpt", "louise@dest.test", "--json"]));
    let kinds: Vec<&str> = ev.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        vec!["received", "delivered"],
        "case-insensitive rcpt search"
    );
    assert_eq!(ev[1]["subject"], "history");
    assert!(
        ev[1]["detail"].as_str().unwrap().contains("250 2.0.0 ok"),
        "{:?}",
        ev[1]
    );
    assert!(ev[0]["time"].as_str().unwrap().ends_with('Z'));
    let human = h.ok(&["history", "--since", "1h"]);
    assert!(
        human.contains("TIME") && human.contains("delivered"),
        "{human}"
    );
    let shown = h.ok(&["show", &id]);
    assert!(
        shown.contains("no longer queued") && shown.contains("delivered"),
        "{shown}"
    );
    let (code, _, err) = h.cli(&["show", "0NQSVCH1D000"]);
    assert_eq!(code, 1);
    assert!(err.contains("no message 0NQSVCH1D000"), "{err}");
    let (code, _, err) = h.cli(&["show", "NOSUCHID"]);
    assert_eq!(code, 1);
    assert!(err.contains("is not a queue or report id"), "{err}");
}

#[test]
fn bounce_suppresses_then_trace_explains_and_remove_lifts() {
    let sink = Sink::start(Script {
        rcpt_replies: vec![(
            "gone".into(),
            "550 5.1.1 <gone@dest.test>: no such user".into(),
        )],
        ..Default::default()
    });
    let h = Herald::start(&upstream(sink.port(), "none", ""));
    let mut c = h.client();
    c.ehlo();
    assert_eq!(
        c.send("a@b.test", &["gone@dest.test"], &message("first")).0,
        250
    );
    assert!(
        wait_until(10, || h.log().contains("address suppressed")),
        "{}",
        h.log()
    );

    let list = h.ok(&["suppression", "list"]);
    assert!(
        list.contains("gone@dest.test") && list.contains("550 5.1.1"),
        "{list}"
    );
    // The next mail is accepted, recorded as suppressed, and never attempted.
    assert_eq!(
        c.send("a@b.test", &["gone@dest.test"], &message("second"))
            .0,
        250
    );
    std::thread::sleep(Duration::from_millis(1500));
    let seen = sink.state.lock().unwrap().rcpt_seen.clone();
    assert_eq!(
        seen.iter().filter(|r| r.contains("gone")).count(),
        1,
        "{seen:?}"
    );

    let t = h.ok(&["trace", "GONE@dest.test"]);
    assert!(t.contains("SUPPRESSED"), "{t}");
    assert!(t.contains("550 5.1.1"), "{t}");
    assert!(
        t.contains("diagnosis: not sent: the address is suppressed"),
        "{t}"
    );
    assert!(t.contains("herald suppression remove"), "{t}");
    let tj = json_lines(&h.ok(&["trace", "gone@dest.test", "--json"]));
    let kinds: Vec<&str> = tj[0]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        vec!["suppressed", "received", "bounced", "received"],
        "newest first"
    );

    let out = h.ok(&["suppression", "remove", "gone@dest.test"]);
    assert!(out.contains("lifted"), "{out}");
    sink.state.lock().unwrap().script.rcpt_replies.clear();
    assert_eq!(
        c.send("a@b.test", &["gone@dest.test"], &message("third")).0,
        250
    );
    let msgs = sink.wait_for(1, 10);
    assert_eq!(msgs.len(), 1);
    assert!(msgs[0].text().contains("Subject: third"));
    assert!(wait_until(5, || h
        .ok(&["trace", "gone@dest.test"])
        .contains("diagnosis: delivered")));
}

#[test]
fn delayed_mail_cancelled_by_tag_never_goes_out() {
    let sink = Sink::start(Script::default());
    let h = Herald::start(&upstream(sink.port(), "none", ""));
    let mut c = h.client();
    c.ehlo();
    let msg = format!(
        "X-Herald-Tag: file-1234\nX-Herald-Delay: 1h\n{}",
        message("upload")
    );
    let (code, reply) = c.send("a@b.test", &["louise@dest.test", "paul@dest.test"], &msg);
    assert_eq!(code, 250);
    let id = queue_id(&reply);
    let q = h.ok(&["queue"]);
    assert!(
        q.contains("file-1234") && q.contains("in 59m"),
        "held an hour: {q}"
    );
    let t = h.ok(&["trace", "louise@dest.test"]);
    assert!(t.contains("held until its first attempt"), "{t}");

    let out = h.ok(&["cancel", "--tag", "file-1234"]);
    assert_eq!(out.matches("cancelled ").count(), 2, "{out}");
    h.ok(&["retry", "--all"]);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(sink.count(), 0);
    let ev = json_lines(&h.ok(&["history", "--tag", "file-1234", "--json"]));
    assert_eq!(
        ev.iter().filter(|e| e["event"] == "cancelled").count(),
        2,
        "{ev:?}"
    );
    assert!(h.ok(&["queue"]).contains("queue is empty"));
    let t = h.ok(&["trace", "paul@dest.test"]);
    assert!(t.contains("diagnosis: cancelled"), "{t}");
    // Cancelling again changes nothing and says so.
    let out = h.ok(&["cancel", &id]);
    assert!(
        out.contains("already cancelled") && out.contains("nothing was cancelled"),
        "{out}"
    );

    // Cancelling mail that is already delivered says so and changes nothing.
    let msg = format!("X-Herald-Tag: file-99\n{}", message("sent"));
    assert_eq!(c.send("a@b.test", &["louise@dest.test"], &msg).0, 250);
    sink.wait_for(1, 10);
    assert!(wait_until(5, || h
        .ok(&["history", "--tag", "file-99"])
        .contains("delivered")));
    let out = h.ok(&["cancel", "--tag", "file-99"]);
    assert!(out.contains("already delivered"), "{out}");
    let (code, _, err) = h.cli(&["cancel", "--tag", "never-seen"]);
    assert_eq!(code, 1);
    assert!(err.contains("no mail with tag"), "{err}");
}

#[test]
fn retry_makes_deferred_mail_due_now() {
    let port = free_port();
    let h = Herald::start(&format!(
        "[delivery]\nupstream = \"up\"\nretry_schedule = [\"1h\"]\n[upstreams.up]\nhost = \"127.0.0.1\"\nport = {port}\nsecurity = \"none\"\n"
    ));
    let mut c = h.client();
    c.ehlo();
    let (_, reply) = c.send("a@b.test", &["louise@dest.test"], &message("resend"));
    let id = queue_id(&reply);
    assert!(wait_until(10, || h.ok(&["queue"]).contains("deferred")));
    let t = h.ok(&["trace", "louise@dest.test"]);
    assert!(
        t.contains("diagnosis: deferred") && t.contains("next attempt in 59m"),
        "{t}"
    );
    assert!(t.contains(&format!("herald retry {id}")), "{t}");
    let sink = Sink::start_on(port, Script::default());
    let out = h.ok(&["retry", &id]);
    assert!(out.contains("1 recipient(s) due now"), "{out}");
    assert_eq!(sink.wait_for(1, 10).len(), 1, "{}", h.log());
    let (code, _, _) = h.cli(&["retry", "NOSUCHID"]);
    assert_eq!(code, 1);
}

#[test]
fn history_is_purged_after_retention() {
    let sink = Sink::start(Script::default());
    let h = Herald::start(&format!(
        "[storage]\nhistory_retention = \"2s\"\n{}",
        upstream(sink.port(), "none", "")
    ));
    let mut c = h.client();
    c.ehlo();
    assert_eq!(
        c.send("a@b.test", &["louise@dest.test"], &message("old")).0,
        250
    );
    sink.wait_for(1, 10);
    assert!(!json_lines(&h.ok(&["history", "--json"])).is_empty());
    assert!(
        wait_until(8, || h.ok(&["history", "--json"]).trim().is_empty()),
        "{}",
        h.ok(&["history"])
    );
    let t = h.ok(&["trace", "louise@dest.test"]);
    assert!(
        t.contains("diagnosis: no mail for louise@dest.test in the last 2s"),
        "{t}"
    );
}

#[test]
fn suppression_add_export_import_round_trip() {
    let h = Herald::start("");
    h.ok(&[
        "suppression",
        "add",
        "x@dest.test",
        "--reason",
        "asked to stop",
    ]);
    let csv = h.ok(&["suppression", "export"]);
    assert!(csv.starts_with("address,reason"), "{csv}");
    assert!(csv.contains("x@dest.test,asked to stop"), "{csv}");
    h.ok(&["suppression", "remove", "x@dest.test"]);
    assert!(h
        .ok(&["suppression", "list"])
        .contains("no suppressed addresses"));
    let file = h.path("list.csv");
    std::fs::write(&file, format!("{csv}y@dest.test,,,,,,\n")).unwrap();
    let out = h.ok(&["suppression", "import", file.to_str().unwrap()]);
    assert!(out.contains("imported 2"), "{out}");
    let list = json_lines(&h.ok(&["suppression", "list", "--json"]));
    let addrs: Vec<&str> = list.iter().map(|e| e["addr"].as_str().unwrap()).collect();
    assert!(
        addrs.contains(&"x@dest.test") && addrs.contains(&"y@dest.test"),
        "{addrs:?}"
    );
    std::fs::write(&file, "address\nnot-an-address\n").unwrap();
    let (code, _, err) = h.cli(&["suppression", "import", file.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("not an address"), "{err}");
}

#[test]
fn cli_against_a_stopped_daemon_exits_2_with_one_line() {
    let mut h = Herald::start("");
    let sock = h.path("data/herald.sock");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660);
    assert!(h.terminate().unwrap().success());
    assert!(!sock.exists(), "socket removed on clean exit");
    for args in [
        &["status"][..],
        &["queue", "--json"],
        &["trace", "a@b.test"],
        &["pause"],
    ] {
        let (code, out, err) = h.cli(args);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("not running"), "{err}");
    }
    // A stale socket left by a crash is replaced at start.
    h.spawn();
    h.kill9();
    assert!(sock.exists());
    h.spawn();
    h.ok(&["status"]);
}

fn get_text(addr: &str, path: &str) -> (u16, String) {
    let (code, body) = http_get(addr, path);
    (code, String::from_utf8_lossy(&body).into_owned())
}

#[test]
fn healthz_and_metrics() {
    let sink = Sink::start(Script::default());
    let port = free_port();
    let h = Herald::start(&format!(
        "[control]\nmetrics_listen = \"127.0.0.1:{port}\"\n{}",
        upstream(sink.port(), "none", "")
    ));
    let addr = format!("127.0.0.1:{port}");
    assert!(wait_until(10, || std::net::TcpStream::connect(&addr).is_ok()));
    let (code, body) = get_text(&addr, "/healthz");
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let mut c = h.client();
    c.ehlo();
    assert_eq!(
        c.send("a@b.test", &["x@dest.test", "y@dest.test"], &message("m"))
            .0,
        250
    );
    sink.wait_for(1, 10);
    assert!(wait_until(5, || get_text(&addr, "/metrics").1.contains(
        "herald_events_total{event=\"delivered\",class=\"\"} 2"
    )));
    let (code, m) = get_text(&addr, "/metrics");
    assert_eq!(code, 200);
    assert!(
        m.contains("herald_events_total{event=\"received\",class=\"\"} 2"),
        "{m}"
    );
    assert!(m.contains("herald_queue_messages 0"), "{m}");
    assert!(m.contains("herald_route_healthy{route=\"up\"} 1"), "{m}");
    assert!(m.contains("herald_paused 0"), "{m}");
    h.ok(&["pause"]);
    assert!(get_text(&addr, "/metrics").1.contains("herald_paused 1"));
    assert_eq!(get_text(&addr, "/healthz").1, "ok (delivery paused)\n");
    assert_eq!(get_text(&addr, "/nope").0, 404);
}

#[test]
fn addresses_are_found_however_people_paste_them() {
    let sink = Sink::start(Script::default());
    let h = Herald::start(&upstream(sink.port(), "none", ""));
    let mut c = h.client();
    c.ehlo();
    assert_eq!(
        c.send("a@b.test", &["alice@dest.test"], &message("hello"))
            .0,
        250
    );
    assert!(wait_until(20, || h.has_event("alice@dest.test", "delivered")));
    for pasted in [
        " alice@dest.test",
        "alice@dest.test ",
        "<alice@dest.test>",
        "Alice <ALICE@dest.test>",
        "\"Alice\" <alice@dest.test>,",
        "mailto:alice@dest.test",
    ] {
        let t = h.ok(&["trace", pasted]);
        assert!(t.contains("delivered"), "{pasted:?}: {t}");
        assert!(!t.contains("never received"), "{pasted:?}: {t}");
        let hist = json_lines(&h.ok(&["history", "--rcpt", pasted, "--json"]));
        assert!(
            hist.iter().any(|e| e["event"] == "delivered"),
            "{pasted:?}: {hist:?}"
        );
    }
    // Suppression add and remove take them too, keyed by the address.
    h.ok(&["suppression", "add", "Bob <Bob@Dest.test>"]);
    let list = json_lines(&h.ok(&["suppression", "list", "--json"]));
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["addr"], "bob@dest.test");
    let out = h.ok(&["suppression", "remove", " <bob@dest.test>"]);
    assert!(!out.is_empty());
    assert!(json_lines(&h.ok(&["suppression", "list", "--json"])).is_empty());
}

#[test]
fn trace_names_only_the_unhealthy_routes_a_recipients_mail_takes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.pass"), "wrong").unwrap();
    let good = Sink::start(Script::default());
    let bad = Sink::start(Script {
        auth: Some(("relay".into(), "right".into())),
        ..Default::default()
    });
    let h = Herald::start_in(
        dir,
        &format!(
            "{}[upstreams.bad]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\nusername = \"relay\"\npassword_file = \"bad.pass\"\n[[routes]]\nsender_domain = \"acme.example\"\nupstream = \"bad\"\n",
            upstream(good.port(), "none", ""),
            bad.port()
        ),
    );
    let mut c = h.client();
    c.ehlo();
    assert_eq!(
        c.send(
            "app@acme.example",
            &["x@dest.test"],
            &message("via bad").replace("claire@customer.test", "claire@acme.example")
        )
        .0,
        250
    );
    assert_eq!(
        c.send("app@platform.test", &["y@dest.test"], &message("via up"))
            .0,
        250
    );
    assert!(wait_until(20, || h.has_event("y@dest.test", "delivered")));
    assert!(wait_until(20, || h.has_event("x@dest.test", "deferred")));
    let tx = h.ok(&["trace", "x@dest.test"]);
    assert!(tx.contains("route bad is UNHEALTHY"), "{tx}");
    let ty = h.ok(&["trace", "y@dest.test"]);
    assert!(!ty.contains("UNHEALTHY"), "{ty}");
    let tz = h.ok(&["trace", "nobody@dest.test"]);
    assert!(!tz.contains("UNHEALTHY"), "{tz}");
}

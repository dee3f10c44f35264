//! Sending at the pace each destination accepts: session and rate limits,
//! pipelined RCPTs, and the back-off of a destination that says "slow down".
//! The real daemon against a sink that enforces limits of its own.

mod common;

use common::*;
use serde_json::Value;

/// Sends `n` messages on one session, each to `rcpts` recipients.
fn submit(h: &Herald, n: usize, rcpts: usize, subject: &str) {
    let mut c = h.client();
    c.ehlo();
    for i in 0..n {
        let to: Vec<String> = (0..rcpts).map(|r| format!("u{i}-{r}@dest.test")).collect();
        let to: Vec<&str> = to.iter().map(String::as_str).collect();
        let (code, reply) = c.send(
            "app@platform.test",
            &to,
            &message(&format!("{subject} {i}")),
        );
        assert_eq!(code, 250, "{reply}");
    }
}

#[test]
fn a_throttling_sink_gets_everything_within_its_limits_and_no_retry_is_spent() {
    let sink = Sink::start(Script {
        max_sessions: Some(2),
        rate_limit: Some((5, "421 4.7.0 rate limited".into())),
        pipelining: true,
        ..Default::default()
    });
    let h = Herald::start(&upstream(sink.port(), "none", "max_connections = 2"));
    let n = 30;
    submit(&h, n, 2, "paced");
    // While it runs: no recipient ever has a retry counted.
    let mut polls = 0;
    let done = wait_until(90, || {
        let (_, out, _) = h.cli(&["queue", "--json"]);
        for m in json_lines(&out) {
            for r in m["rcpts"].as_array().cloned().unwrap_or_default() {
                assert_eq!(r["attempts"], Value::from(0), "retry counter spent: {m}");
            }
        }
        polls += 1;
        sink.count() >= n
    });
    let st = sink.state.lock().unwrap();
    assert!(done, "{} of {n} delivered\n{}", st.messages.len(), h.log());
    assert!(polls > 1);
    assert_eq!(
        st.messages.iter().map(|m| m.rcpts.len()).sum::<usize>(),
        2 * n
    );
    assert!(st.peak_sessions <= 2, "peak {} sessions", st.peak_sessions);
    assert_eq!(st.sessions_refused, 0);
    assert!(st.rate_limited > 0, "the sink never had to throttle");
    assert!(st.pipelined > 0, "RCPTs were not pipelined");
    let limited = st.rate_limited;
    drop(st);

    // One deferred event per recipient held back, saying why and when.
    let (_, out, _) = h.cli(&["history", "--json"]);
    let deferred: Vec<Value> = json_lines(&out)
        .into_iter()
        .filter(|e| e["event"] == "deferred")
        .collect();
    assert!(!deferred.is_empty());
    for e in &deferred {
        let d = e["detail"].as_str().unwrap();
        assert!(
            d.starts_with("destination throttled: ")
                && d.contains("421 4.7.0 rate limited")
                && d.contains("; next try in "),
            "{d}"
        );
        assert!(!d.contains("attempt"), "{d}");
        assert_eq!(e["class"], "throttle");
    }
    // One log line per back-off of the destination, not one per message.
    let log = h.log();
    let lines = log
        .matches("destination throttled: no new sessions")
        .count();
    assert!(
        lines >= 1 && lines <= limited,
        "{lines} lines, {limited} refusals"
    );
    assert!(
        lines < deferred.len(),
        "{lines} lines, {} deferred",
        deferred.len()
    );
    let (_, st, _) = h.cli(&["status", "--json"]);
    let st = &json_lines(&st)[0];
    let up = st["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "up")
        .unwrap_or_else(|| panic!("{st}"))
        .clone();
    assert_eq!(up["max_sessions"], 2);
    assert!(up["last_reply"].as_str().unwrap().contains("rate limited"));
}

#[test]
fn max_rate_holds_within_ten_percent_over_200_messages() {
    let sink = Sink::start(Script::default());
    let h = Herald::start(&upstream(sink.port(), "none", "max_rate = \"10/s\""));
    let n = 200;
    submit(&h, n, 1, "rated");
    let msgs = sink.wait_for(n, 60);
    assert_eq!(msgs.len(), n, "{}", h.log());
    let mut at: Vec<_> = msgs.iter().map(|m| m.at).collect();
    at.sort();
    let secs = at[n - 1].duration_since(at[0]).as_secs_f64();
    // A bucket of 10 starts full: 200 messages need at least 19 s.
    let rate = (n - 1) as f64 / secs;
    assert!(
        (9.0..=11.0).contains(&rate),
        "{rate:.2} msg/s over {secs:.1} s"
    );
    let (_, out, _) = h.cli(&["history", "--json"]);
    assert!(
        !out.contains("\"deferred\""),
        "waiting for a token is not a deferral"
    );
}

#[test]
fn a_session_carries_at_most_max_messages_per_connection() {
    let sink = Sink::start(Script::default());
    let h = Herald::start(&upstream(
        sink.port(),
        "none",
        "max_connections = 1\nmax_messages_per_connection = 3",
    ));
    submit(&h, 9, 1, "rotated");
    assert_eq!(sink.wait_for(9, 30).len(), 9, "{}", h.log());
    let st = sink.state.lock().unwrap();
    assert!(st.connections >= 3, "{} sessions", st.connections);
    assert_eq!(st.peak_sessions, 1);
}

#[test]
fn a_smart_host_that_refuses_connections_is_backed_off_without_spending_retries() {
    let port = free_port();
    let metrics = format!("127.0.0.1:{}", free_port());
    let h = Herald::start(&format!(
        "{}\n[control]\nmetrics_listen = \"{metrics}\"\n",
        upstream(port, "none", "")
    ));
    submit(&h, 3, 1, "down");
    assert!(wait_until(20, || {
        let (_, out, _) = h.cli(&["history", "--json"]);
        json_lines(&out)
            .iter()
            .filter(|e| e["event"] == "deferred")
            .count()
            >= 3
    }));
    let (_, out, _) = h.cli(&["queue", "--json"]);
    for m in json_lines(&out) {
        for r in m["rcpts"].as_array().unwrap() {
            assert_eq!(r["attempts"], 0, "{m}");
            let last = r["last_reply"].as_str().unwrap();
            assert!(last.starts_with("destination throttled: "), "{last}");
        }
    }
    let (code, body) = http_get(&metrics, "/metrics");
    assert_eq!(code, 200);
    let body = String::from_utf8(body).unwrap();
    assert!(
        body.contains("herald_destination_throttled{destination=\"up\"} 1"),
        "{body}"
    );
    // It comes back: everything goes, and the back-off is over.
    let sink = Sink::start_on(port, Script::default());
    assert_eq!(sink.wait_for(3, 30).len(), 3, "{}", h.log());
    let (_, st, _) = h.cli(&["status"]);
    assert!(st.contains("destination up: sessions "), "{st}");
    let (_, body) = http_get(&metrics, "/metrics");
    assert!(String::from_utf8(body)
        .unwrap()
        .contains("herald_destination_throttled{destination=\"up\"} 0"));
}

fn from(domain: &str, subject: &str) -> String {
    format!("From: App <app@{domain}>\nTo: louise@dest.test\nSubject: {subject}\n\nHello.\n")
}

#[test]
fn a_paused_route_holds_its_mail_across_restart_while_the_other_delivers() {
    let acme = Sink::start(Script::default());
    let other = Sink::start(Script::default());
    let mut h = Herald::start(&format!(
        "{}[upstreams.acme]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\n[[routes]]\nsender_domain = \"acme.test\"\nupstream = \"acme\"\n",
        upstream(other.port(), "none", ""),
        acme.port()
    ));
    let (code, out, err) = h.cli(&["pause", "--route", "acme"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("route acme paused"), "{out}");
    let (code, _, err) = h.cli(&["pause", "--route", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("no route \"nope\""), "{err}");

    let mut c = h.client();
    c.ehlo();
    for i in 0..3 {
        let (code, _) = c.send(
            "a@acme.test",
            &["held@dest.test"],
            &from("acme.test", &format!("held {i}")),
        );
        assert_eq!(code, 250);
    }
    let (code, _) = c.send(
        "a@other.test",
        &["flows@dest.test"],
        &from("other.test", "flows"),
    );
    assert_eq!(code, 250);
    drop(c);
    assert_eq!(other.wait_for(1, 10).len(), 1, "{}", h.log());
    let q = h.cli(&["queue"]).1;
    assert!(q.contains("held: route acme paused"), "{q}");
    let t = h.cli(&["trace", "held@dest.test"]).1;
    assert!(t.contains("held: route acme paused"), "{t}");

    // Kept across a restart.
    h.terminate().unwrap();
    h.spawn();
    let st = h.cli(&["status"]).1;
    assert!(
        st.contains("route acme: ") && st.contains("PAUSED: herald resume --route acme"),
        "{st}"
    );
    let (_, st, _) = h.cli(&["status", "--json"]);
    assert_eq!(
        json_lines(&st)[0]["paused_routes"],
        serde_json::json!(["acme"])
    );
    let mut c = h.client();
    c.ehlo();
    let (code, _) = c.send(
        "a@other.test",
        &["flows2@dest.test"],
        &from("other.test", "flows 2"),
    );
    assert_eq!(code, 250);
    assert_eq!(other.wait_for(2, 10).len(), 2, "{}", h.log());
    assert_eq!(acme.count(), 0, "a paused route sends nothing");

    // Socket requests too: one message cancelled by route, then resume.
    let (code, out, err) = h.cli(&["cancel", "--route", "acme"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.matches("cancelled ").count(), 3, "{out}");
    let (code, _) = c.send(
        "a@acme.test",
        &["later@dest.test"],
        &from("acme.test", "after cancel"),
    );
    assert_eq!(code, 250);
    let (code, out, _) = h.cli(&["resume", "--route", "acme"]);
    assert_eq!(code, 0);
    assert!(out.contains("route acme resumed"));
    let got = acme.wait_for(1, 10);
    assert_eq!(got.len(), 1, "{}", h.log());
    assert_eq!(got[0].rcpts, vec!["later@dest.test"]);
    assert!(wait_until(5, || h
        .cli(&["queue", "--json"])
        .1
        .trim()
        .is_empty()));
    assert_eq!(acme.count(), 1, "cancelled mail never goes out");
}

#[test]
fn one_recipients_try_again_later_does_not_slow_the_destination() {
    let sink = Sink::start(Script {
        rcpt_replies: vec![(
            "later@".into(),
            "451 4.3.0 <later@dest.test>: Temporary lookup failure, try again later".into(),
        )],
        ..Default::default()
    });
    let h = Herald::start(&upstream(sink.port(), "none", ""));
    let mut c = h.client();
    c.ehlo();
    let (code, _) = c.send(
        "app@platform.test",
        &["later@dest.test", "now@dest.test"],
        &message("one"),
    );
    assert_eq!(code, 250);
    assert!(wait_until(20, || h.has_event("later@dest.test", "deferred")));
    // The next message goes out at once: the destination is not backing off.
    let (code, _) = c.send("app@platform.test", &["other@dest.test"], &message("two"));
    assert_eq!(code, 250);
    let got = sink.wait_for(2, 20);
    assert!(
        got.iter().any(|m| m.rcpts == ["other@dest.test"]),
        "{}",
        h.log()
    );
    let st: Value = serde_json::from_str(&h.ok(&["status", "--json"])).unwrap();
    for d in st["destinations"].as_array().cloned().unwrap_or_default() {
        assert!(d["throttled_until_ms"].is_null(), "{d}");
    }
    assert!(!h.log().contains("destination throttled"), "{}", h.log());
    // The recipient's own deferral says what it is.
    let ev = h
        .events("later@dest.test")
        .into_iter()
        .find(|e| e["event"] == "deferred")
        .unwrap();
    assert_eq!(ev["class"], "transient", "{ev}");
}

#[test]
fn trace_says_what_held_mail_waits_for_and_until_when() {
    let sink = Sink::start(Script {
        mail_replies: ["421 4.7.0 rate limited, slow down".to_string()].into(),
        ..Default::default()
    });
    // A back-off of a minute: long enough to look at it.
    let h = Herald::start(&format!(
        "\n[delivery]\nupstream = \"up\"\nretry_schedule = [\"1m\"]\n[upstreams.up]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\n",
        sink.port()
    ));
    let mut c = h.client();
    c.ehlo();
    assert_eq!(
        c.send("app@platform.test", &["first@dest.test"], &message("one"))
            .0,
        250
    );
    assert!(wait_until(20, || h.log().contains("destination throttled")));
    let (code, reply) = c.send("app@platform.test", &["second@dest.test"], &message("two"));
    assert_eq!(code, 250);
    let id = queue_id(&reply);
    let t = h.ok(&["trace", "second@dest.test"]);
    assert!(
        t.contains("held: destination up asked herald to slow down")
            && t.contains("rate limited")
            && t.contains("until its back-off ends in")
            && t.contains(&format!("herald retry {id}")),
        "{t}"
    );
    assert!(!t.contains("waiting for its first attempt\n"), "{t}");
    // The retry it names sends it now.
    h.ok(&["retry", &id]);
    assert!(sink
        .wait_for(1, 20)
        .iter()
        .any(|m| m.rcpts == ["second@dest.test"]));
}

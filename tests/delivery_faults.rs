//! Faults on the way out: a pooled connection that died, a reply lost after
//! the message was sent.

mod common;

use common::*;

#[test]
fn a_dead_pooled_connection_is_replaced_without_a_deferral() {
    // The upstream answers RSET and then hangs up, as a server that drops
    // idle sessions does: the pooled connection is dead when reused.
    let sink = Sink::start(Script {
        close_after_rset: true,
        ..Default::default()
    });
    let h = Herald::start(&upstream(sink.port(), "none", ""));
    let mut c = h.client();
    c.ehlo();
    assert_eq!(
        c.send("a@b.test", &["one@dest.test"], &message("one")).0,
        250
    );
    assert_eq!(sink.wait_for(1, 10).len(), 1, "{}", h.log());
    assert_eq!(
        c.send("a@b.test", &["two@dest.test"], &message("two")).0,
        250
    );
    assert_eq!(sink.wait_for(2, 10).len(), 2, "{}", h.log());
    assert!(wait_until(5, || h
        .events("two@dest.test")
        .iter()
        .any(|e| e["event"] == "delivered")));
    let evs = h.events("two@dest.test");
    assert!(
        !evs.iter().any(|e| e["event"] == "deferred"),
        "a dead pooled connection is not the recipient's deferral: {evs:?}"
    );
    assert_eq!(
        sink.state.lock().unwrap().connections,
        2,
        "reused, then a fresh one"
    );
}

#[test]
fn a_reply_lost_after_the_dot_defers_and_never_tries_the_next_mx() {
    let port = free_port();
    // The best MX reads the whole message and hangs up without a reply.
    let first = Sink::start_at(
        "127.0.0.1",
        port,
        Script {
            data_replies: [DROP.to_string()].into(),
            ..Default::default()
        },
    );
    let second = Sink::start_at("127.0.0.2", port, Script::default());
    let dns = Dns::start(&[
        ("d.test", "MX", "10 a.d.test."),
        ("d.test", "MX", "20 b.d.test."),
        ("a.d.test", "A", "127.0.0.1"),
        ("b.d.test", "A", "127.0.0.2"),
    ]);
    let h = Herald::start(&format!(
        "[delivery]\nupstream = \"mx\"\nmx_port = {port}\nretry_schedule = [\"1s\"]\n[dns]\nnameservers = [\"127.0.0.1:{}\"]\n",
        dns.port
    ));
    let mut c = h.client();
    c.ehlo();
    assert_eq!(
        c.send("app@platform.test", &["u@d.test"], &message("lost"))
            .0,
        250
    );
    assert!(
        wait_until(15, || h
            .events("u@d.test")
            .iter()
            .any(|e| e["event"] == "deferred")),
        "{}",
        h.log()
    );
    let evs = h.events("u@d.test");
    let d = evs.iter().find(|e| e["event"] == "deferred").unwrap();
    assert!(
        d["detail"]
            .as_str()
            .unwrap()
            .contains("may have been delivered"),
        "{d}"
    );
    // The retry goes to the best MX again, which now answers.
    let got = first.wait_for(1, 15);
    assert_eq!(got.len(), 1, "{}", h.log());
    assert_eq!(
        second.state.lock().unwrap().connections,
        0,
        "the next MX must not get a second copy\n{}",
        h.log()
    );
    assert_eq!(first.state.lock().unwrap().data_attempts, 2);
}

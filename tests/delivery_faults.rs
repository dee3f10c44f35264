//! Faults on the way out: a pooled connection that died, a reply lost after
//! the message was sent.

mod common;

use common::*;

#[test]
fn a_dead_pooled_connection_is_replaced_without_a_deferral() {
    // The upstream hangs up after each message, as a server that drops
    // idle sessions does: the pooled connection is dead when reused.
    // Silently, and with its "421" last word (unread in the kept session:
    // taken for the reply to the next MAIL, it would throttle the
    // destination and defer the recipient); with and without PIPELINING.
    for (last, pipelining) in [("", false), ("421 4.4.2 idle timeout", true)] {
        dead_pooled_connection(last, pipelining);
    }
}

fn dead_pooled_connection(last: &str, pipelining: bool) {
    let sink = Sink::start(Script {
        hang_up_after_message: Some(last.to_string()),
        pipelining,
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
    assert!(wait_until(10, || sink.state.lock().unwrap().hung_up == 1));
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

#[test]
fn one_pipelined_round_trip_keeps_the_session_whatever_the_recipients_get() {
    // MAIL, RCPT and DATA go in one write. A refused recipient bounces and
    // the others get the message; when every recipient is refused and the
    // server still answers DATA with 354 (this sink does), an empty message
    // ends the data phase; the session serves the next message either way.
    let sink = Sink::start(Script {
        pipelining: true,
        rcpt_replies: vec![("dead".into(), "550 5.1.1 no such user".into())],
        ..Default::default()
    });
    let h = Herald::start(&upstream(sink.port(), "none", ""));
    let mut c = h.client();
    c.ehlo();
    let final_for = |rcpt: &str, event: &str| {
        let ok = wait_until(10, || h.events(rcpt).iter().any(|e| e["event"] == event));
        assert!(ok, "{rcpt}: no {event}: {:?}\n{}", h.events(rcpt), h.log());
    };
    let to: &[(&[&str], &str)] = &[
        (&["dead1@dest.test", "live1@dest.test"], "some refused"),
        (&["dead2@dest.test"], "all refused"),
        (&["live2@dest.test"], "after"),
    ];
    for (rcpts, subject) in to {
        assert_eq!(c.send("a@b.test", rcpts, &message(subject)).0, 250);
        for r in rcpts.iter() {
            final_for(
                r,
                if r.starts_with("dead") {
                    "bounced"
                } else {
                    "delivered"
                },
            );
        }
    }
    let st = sink.state.lock().unwrap();
    let got: Vec<Vec<String>> = st
        .messages
        .iter()
        .filter(|m| !m.rcpts.is_empty())
        .map(|m| m.rcpts.clone())
        .collect();
    assert_eq!(got, vec![vec!["live1@dest.test"], vec!["live2@dest.test"]]);
    assert!(st.pipelined > 0, "not pipelined");
    assert_eq!(st.connections, 1, "the session was not kept");
    drop(st);
    for r in [
        "dead1@dest.test",
        "live1@dest.test",
        "dead2@dest.test",
        "live2@dest.test",
    ] {
        assert!(
            !h.events(r).iter().any(|e| e["event"] == "deferred"),
            "{r}: {:?}",
            h.events(r)
        );
    }
}

#[test]
fn a_transaction_given_up_after_a_pipelined_data_sends_no_empty_message() {
    // A smart host that refuses one recipient's relaying while it accepts
    // the other, and answers the pipelined DATA with 354: the recipients
    // wait for the route (a refusal of the route), and the session is
    // dropped, never ended with an empty message to the one accepted.
    // Then one that refuses the sender at MAIL yet accepts the RCPT and
    // DATA after it (this sink does): the same.
    let relay = (
        "denied".to_string(),
        "554 5.7.1 <denied@dest.test>: Relay access denied".to_string(),
    );
    let scripts = [
        Script {
            pipelining: true,
            rcpt_replies: vec![relay],
            ..Default::default()
        },
        Script {
            pipelining: true,
            mail_replies: ["553 5.7.1 <a@b.test>: Sender address rejected".to_string()].into(),
            ..Default::default()
        },
    ];
    for script in scripts {
        let sink = Sink::start(script);
        let h = Herald::start(&upstream(sink.port(), "none", ""));
        let mut c = h.client();
        c.ehlo();
        let rcpts = ["ok@dest.test", "denied@dest.test"];
        assert_eq!(c.send("a@b.test", &rcpts, &message("x")).0, 250);
        for r in rcpts {
            let deferred = wait_until(10, || h.events(r).iter().any(|e| e["event"] == "deferred"));
            assert!(deferred, "{r}: {:?}\n{}", h.events(r), h.log());
        }
        let st = sink.state.lock().unwrap();
        assert!(st.pipelined > 0, "not pipelined");
        assert!(
            st.messages.is_empty(),
            "a message was delivered: {:?}",
            st.messages.iter().map(|m| &m.rcpts).collect::<Vec<_>>()
        );
    }
}

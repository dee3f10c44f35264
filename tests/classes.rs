//! Reply classes end to end: what a refusal means decides whether the
//! recipient bounces, whether the address is suppressed, and what `trace`,
//! `show`, `history --json` and `/metrics` say.

mod common;

use common::*;
use serde_json::Value;

fn with_metrics(port: u16, extra: &str) -> String {
    format!("{extra}\n[control]\nmetrics_listen = \"127.0.0.1:{port}\"\n")
}

const SES_UNVERIFIED: &str = "554 Message rejected: Email address is not verified. The following identities failed the check in region EU-WEST-1: bounces@example.com";

#[test]
fn unverified_sender_at_smart_host_defers_everyone_and_suppresses_nobody() {
    let sink = Sink::start(Script {
        data_replies: [SES_UNVERIFIED.to_string()].into(),
        ..Default::default()
    });
    let h = Herald::start(&upstream(sink.port(), "none", ""));
    let mut c = h.client();
    c.ehlo();
    let rcpts = ["louise@dest.test", "paul@dest.test"];
    assert_eq!(c.send("a@b.test", &rcpts, &message("ses")).0, 250);
    assert!(
        wait_until(10, || h.log().contains("route refused by upstream")),
        "{}",
        h.log()
    );
    // The next attempt gets 250: both delivered, nobody ever bounced.
    let msgs = sink.wait_for(1, 15);
    assert_eq!(msgs.len(), 1, "{}", h.log());
    assert!(wait_until(10, || h
        .events("paul@dest.test")
        .iter()
        .any(|e| e["event"] == "delivered")));
    for r in rcpts {
        let evs = h.events(r);
        let deferred: Vec<&Value> = evs.iter().filter(|e| e["event"] == "deferred").collect();
        assert_eq!(deferred.len(), 1, "{evs:?}");
        assert_eq!(deferred[0]["class"], "route", "{evs:?}");
        assert!(
            deferred[0]["detail"]
                .as_str()
                .unwrap()
                .contains("not verified"),
            "{evs:?}"
        );
        assert!(!evs.iter().any(|e| e["event"] == "bounced"), "{evs:?}");
    }
    let list = h.ok(&["suppression", "list"]);
    assert!(list.contains("no suppressed addresses"), "{list}");
    assert!(!h.log().contains("address suppressed"), "{}", h.log());
}

#[test]
fn policy_refusal_bounces_without_suppressing_and_trace_says_why() {
    let sink = Sink::start(Script {
        data_replies: [
            "550 5.7.1 Service unavailable; client [127.0.0.1] blocked using zen.spamhaus.org"
                .to_string(),
        ]
        .into(),
        ..Default::default()
    });
    let mport = free_port();
    let h = Herald::start(&with_metrics(mport, &upstream(sink.port(), "none", "")));
    let mut c = h.client();
    c.ehlo();
    assert_eq!(
        c.send("a@b.test", &["louise@dest.test"], &message("spam?"))
            .0,
        250
    );
    assert!(
        wait_until(10, || h
            .events("louise@dest.test")
            .iter()
            .any(|e| e["event"] == "bounced")),
        "{}",
        h.log()
    );
    let evs = h.events("louise@dest.test");
    let bounced = evs.iter().find(|e| e["event"] == "bounced").unwrap();
    assert_eq!(bounced["class"], "policy", "{bounced}");
    assert!(
        bounced["detail"]
            .as_str()
            .unwrap()
            .contains("not the address"),
        "{bounced}"
    );
    // Never suppressed: the next mail to the address is attempted.
    let list = h.ok(&["suppression", "list"]);
    assert!(list.contains("no suppressed addresses"), "{list}");
    let t = h.ok(&["trace", "louise@dest.test"]);
    assert!(
        t.contains("herald check-dns") && t.contains("nothing is wrong with the address"),
        "{t}"
    );
    assert!(t.contains("policy"), "{t}");
    let (code, body) = http_get(&format!("127.0.0.1:{mport}"), "/metrics");
    assert_eq!(code, 200);
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("herald_events_total{event=\"bounced\",class=\"policy\"} 1"),
        "{body}"
    );
    assert_eq!(
        c.send("a@b.test", &["louise@dest.test"], &message("again"))
            .0,
        250
    );
    let msgs = sink.wait_for(1, 10);
    assert_eq!(msgs.len(), 1, "{}", h.log());
    assert!(msgs[0].text().contains("Subject: again"));
}

#[test]
fn unknown_user_bounces_hard_and_is_suppressed_full_mailbox_is_not() {
    let sink = Sink::start(Script {
        rcpt_replies: vec![
            (
                "gone".into(),
                "550 5.1.1 <gone@dest.test>: Recipient address rejected: User unknown in virtual mailbox table".into(),
            ),
            ("full".into(), "552 5.2.2 <full@dest.test>: Mailbox full".into()),
            ("busy".into(), "451 4.7.650 The mail server [127.0.0.1] has been temporarily rate limited due to IP reputation.".into()),
        ],
        ..Default::default()
    });
    let h = Herald::start(&upstream(sink.port(), "none", ""));
    let mut c = h.client();
    c.ehlo();
    let (code, reply) = c.send(
        "a@b.test",
        &[
            "gone@dest.test",
            "full@dest.test",
            "busy@dest.test",
            "fine@dest.test",
        ],
        &message("classes"),
    );
    assert_eq!(code, 250, "{reply}");
    let id = queue_id(&reply);
    assert!(
        wait_until(10, || h.log().contains("address suppressed")),
        "{}",
        h.log()
    );
    let shown = json_lines(&h.ok(&["show", &id, "--json"]));
    let rcpts = shown[0]["queued"]["rcpts"].as_array().unwrap().clone();
    let class_of = |addr: &str| {
        rcpts
            .iter()
            .find(|r| r["addr"] == addr)
            .map(|r| (r["status"].clone(), r["class"].clone()))
            .unwrap()
    };
    assert_eq!(
        class_of("gone@dest.test"),
        ("bounced".into(), "hard".into())
    );
    assert_eq!(
        class_of("full@dest.test"),
        ("bounced".into(), "soft".into())
    );
    assert_eq!(
        class_of("busy@dest.test"),
        ("deferred".into(), "throttle".into())
    );
    let human = h.ok(&["show", &id]);
    assert!(
        human.contains("CLASS") && human.contains("throttle"),
        "{human}"
    );

    let list = json_lines(&h.ok(&["suppression", "list", "--json"]));
    let addrs: Vec<&str> = list.iter().map(|e| e["addr"].as_str().unwrap()).collect();
    assert_eq!(addrs, vec!["gone@dest.test"]);
    let t = h.ok(&["trace", "gone@dest.test"]);
    assert!(t.contains("remove it from your platform"), "{t}");
    let t = h.ok(&["trace", "full@dest.test"]);
    assert!(t.contains("mailbox is full"), "{t}");
    let t = h.ok(&["trace", "busy@dest.test"]);
    assert!(t.contains("slow down") || t.contains("limiting"), "{t}");
}

#[test]
fn mx_refusals_are_classified_too() {
    // One MX refuses the connection as blocked, the other refuses one
    // recipient as unknown: the first is policy (bounced, not suppressed),
    // the second hard (suppressed).
    let blocked = Sink::start(Script {
        greeting: Some(
            "554 5.7.1 Service unavailable; Client host [127.0.0.1] blocked using zen.spamhaus.org"
                .into(),
        ),
        ..Default::default()
    });
    let dns = Dns::start(&[
        ("blocked.test", "MX", "10 mail.blocked.test."),
        ("mail.blocked.test", "A", "127.0.0.1"),
    ]);
    let h = Herald::start(&format!(
        "[delivery]\nupstream = \"mx\"\nmx_port = {}\nretry_schedule = [\"1s\"]\n[dns]\nnameservers = [\"127.0.0.1:{}\"]\n",
        blocked.port(),
        dns.port
    ));
    let mut c = h.client();
    c.ehlo();
    assert_eq!(
        c.send("app@platform.test", &["x@blocked.test"], &message("mx"))
            .0,
        250
    );
    assert!(
        wait_until(15, || h
            .events("x@blocked.test")
            .iter()
            .any(|e| e["event"] == "bounced")),
        "{}",
        h.log()
    );
    let evs = h.events("x@blocked.test");
    let b = evs.iter().find(|e| e["event"] == "bounced").unwrap();
    assert_eq!(b["class"], "policy", "{b}");
    assert!(b["detail"].as_str().unwrap().contains("spamhaus"), "{b}");
    let list = h.ok(&["suppression", "list"]);
    assert!(list.contains("no suppressed addresses"), "{list}");
}

//! `[cluster]`: three herald nodes, each with its own spool, sharing one
//! real `redis-server` (started by the test on a free loopback port, and
//! stopped by it): suppression, pauses, history, reports, pacing, and what
//! happens while Redis is away.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const DOMAIN: &str = "bounces.example.test";
const KEY: &str = "an HMAC key of return-path tokens, 32+";

struct Node {
    herald: Herald,
    intake: SocketAddr,
}

/// A node named `name` relaying to `sink_port`, in the cluster of `redis`
/// (none: standalone); `extra` goes into the config (after `[delivery]`'s
/// keys, before `[upstreams.up]`'s end).
fn node(name: &str, redis: Option<&Redis>, sink_port: u16, up_extra: &str, extra: &str) -> Node {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bounce.key"), format!("{KEY}\n")).unwrap();
    let intake: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let cluster = redis
        .map(|r| format!("[cluster]\nredis = \"{}\"\nnode = \"{name}\"\n", r.url()))
        .unwrap_or_default();
    let herald = Herald::start_in(
        dir,
        &format!(
            "{}\n[bounces]\ndomain = \"{DOMAIN}\"\nlisten = [\"{intake}\"]\nsecret_file = \"{{dir}}/bounce.key\"\n[control]\nsocket = \"{{dir}}/herald.sock\"\n{cluster}{extra}\n",
            upstream(sink_port, "none", up_extra)
        ),
    );
    Node { herald, intake }
}

fn status(h: &Herald) -> serde_json::Value {
    serde_json::from_str(&h.ok(&["status", "--json"])).unwrap()
}

fn suppressed(h: &Herald) -> Vec<String> {
    json_lines(&h.ok(&["suppression", "list", "--json"]))
        .iter()
        .map(|e| e["addr"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Sends one message to `rcpts` through `h`; its queue id.
fn send(h: &Herald, rcpts: &[&str], subject: &str) -> String {
    let mut c = h.client();
    c.ehlo();
    let (code, reply) = c.send("app@customer.test", rcpts, &message(subject));
    assert_eq!(code, 250, "{reply}");
    queue_id(&reply)
}

fn kinds(h: &Herald, rcpt: &str) -> Vec<(String, String)> {
    h.events(rcpt)
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap_or_default().to_string(),
                e["node"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn a_hard_bounce_or_a_suppression_on_one_node_stops_mail_from_every_node() {
    let redis = Redis::start();
    let mut script = Script::default();
    script
        .rcpt_replies
        .push(("dead".into(), "550 5.1.1 no such user".into()));
    let sink = Sink::start(script);
    let a = node("a", Some(&redis), sink.port(), "", "");
    let b = node("b", Some(&redis), sink.port(), "", "");
    let c = node("c", Some(&redis), sink.port(), "", "");
    // 200 addresses bounce hard at RCPT on A.
    let dead: Vec<String> = (0..200).map(|i| format!("dead{i}@dest.test")).collect();
    for chunk in dead.chunks(50) {
        let r: Vec<&str> = chunk.iter().map(String::as_str).collect();
        send(&a.herald, &r, "to the dead");
    }
    assert!(
        wait_until(30, || suppressed(&a.herald).len() == 200),
        "A suppresses them: {}\n{}",
        suppressed(&a.herald).len(),
        a.herald.log()
    );
    let learned = Instant::now();
    assert!(
        wait_until(10, || suppressed(&b.herald).len() == 200
            && suppressed(&c.herald).len() == 200),
        "B and C learn them: {} {}\n{}",
        suppressed(&b.herald).len(),
        suppressed(&c.herald).len(),
        b.herald.log()
    );
    let took = learned.elapsed();
    // The figure is 1 s; the check allows for a busy machine
    // (the two CLI calls per round are part of it).
    assert!(took < Duration::from_secs(3), "took {took:?}");
    eprintln!("200 suppressions reached B and C within {took:?}");
    // Nothing goes to them from B or C afterwards.
    let rcpt_seen = sink.state.lock().unwrap().rcpt_seen.len();
    let r: Vec<&str> = dead[..20].iter().map(String::as_str).collect();
    send(&b.herald, &r, "again from B");
    send(&c.herald, &r, "again from C");
    send(&b.herald, &["alive@dest.test"], "to the living");
    sink.wait_for(1, 20);
    assert!(wait_until(10, || b
        .herald
        .has_event("dead0@dest.test", "suppressed")
        && c.herald.has_event("dead0@dest.test", "suppressed")));
    assert_eq!(
        sink.state.lock().unwrap().rcpt_seen.len(),
        rcpt_seen + 1,
        "only the living address was tried"
    );

    // By hand, on C: B refuses the address at once; lifted on B: A sends.
    c.herald.ok(&[
        "suppression",
        "add",
        "manual@dest.test",
        "--reason",
        "asked",
    ]);
    assert!(wait_until(3, || suppressed(&b.herald)
        .contains(&"manual@dest.test".to_string())));
    b.herald.ok(&["suppression", "remove", "manual@dest.test"]);
    assert!(wait_until(3, || !suppressed(&a.herald)
        .contains(&"manual@dest.test".to_string())));
    send(&a.herald, &["manual@dest.test"], "lifted");
    sink.wait_for(2, 20);
    assert_eq!(sink.count(), 2, "{}", a.herald.log());

    // status lists the three nodes.
    let st = status(&a.herald);
    let nodes: Vec<&str> = st["cluster"]["nodes"]
        .as_array()
        .map(|n| n.iter().filter_map(|n| n["node"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        wait_until(5, || {
            let st = status(&a.herald);
            st["cluster"]["nodes"].as_array().map_or(0, |n| n.len()) == 3
        }),
        "{nodes:?}"
    );
    let text = a.herald.ok(&["status"]);
    assert!(text.contains("cluster: node a, connected"), "{text}");
    assert!(text.contains("node b: up"), "{text}");
}

#[test]
fn pause_on_one_node_holds_all_three_and_resume_on_another_frees_them() {
    let redis = Redis::start();
    let sink = Sink::start(Script::default());
    let a = node("a", Some(&redis), sink.port(), "", "");
    let b = node("b", Some(&redis), sink.port(), "", "");
    let c = node("c", Some(&redis), sink.port(), "", "");
    a.herald.ok(&["pause"]);
    for n in [&b, &c] {
        assert!(
            wait_until(3, || status(&n.herald)["paused"] == true),
            "{}",
            n.herald.log()
        );
    }
    send(&b.herald, &["x@dest.test"], "held on b");
    send(&c.herald, &["y@dest.test"], "held on c");
    assert!(wait_until(5, || b
        .herald
        .has_event("x@dest.test", "received")));
    assert!(wait_until(5, || c
        .herald
        .has_event("y@dest.test", "received")));
    // Held (a negative: it cannot fail falsely, only pass slowly; an
    // unpaused node delivers within milliseconds here).
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(sink.count(), 0);
    assert_eq!(status(&b.herald)["messages"], 1);
    c.herald.ok(&["resume"]);
    let got = sink.wait_for(2, 20);
    assert_eq!(got.len(), 2, "{}", b.herald.log());
    assert!(status(&a.herald)["paused"] == false);
}

/// An HTTP endpoint that answers 200 and keeps each body.
struct Hook {
    port: u16,
    bodies: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl Hook {
    fn start() -> Hook {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let bodies: Arc<Mutex<Vec<String>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (b, s) = (bodies.clone(), stop.clone());
        thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok((tcp, _)) = l.accept() else {
                    thread::sleep(Duration::from_millis(5));
                    continue;
                };
                tcp.set_nonblocking(false).unwrap();
                let mut rd = BufReader::new(tcp.try_clone().unwrap());
                let mut len = 0usize;
                let mut line = String::new();
                let _ = rd.read_line(&mut line);
                loop {
                    line.clear();
                    if rd.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0u8; len];
                let _ = rd.read_exact(&mut body);
                b.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&body).into_owned());
                let mut w = tcp;
                let _ = w.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
            }
        });
        Hook { port, bodies, stop }
    }

    fn count(&self, needle: &str) -> usize {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .map(|b| b.matches(needle).count())
            .sum()
    }
}

impl Drop for Hook {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn a_bounce_reported_to_another_node_is_in_every_nodes_history_and_posted_once() {
    let redis = Redis::start();
    let sink = Sink::start(Script::default());
    let hook = Hook::start();
    let hooks = |dir_key: &str| {
        format!(
            "[[webhooks]]\nname = \"platform\"\nurl = \"http://127.0.0.1:{}/h\"\nsecret_file = \"{{dir}}/{dir_key}\"\nevents = [\"delivered\", \"bounced\"]\n",
            hook.port
        )
    };
    // The webhook key: the bounce key file serves (16+ bytes).
    let a = node("a", Some(&redis), sink.port(), "", &hooks("bounce.key"));
    let b = node("b", Some(&redis), sink.port(), "", &hooks("bounce.key"));
    let c = node("c", Some(&redis), sink.port(), "", &hooks("bounce.key"));
    let id = send(&a.herald, &["ann@dest.test"], "hello");
    let got = sink.wait_for(1, 20);
    let return_path = got[0].mail_from.clone();
    assert!(wait_until(10, || a
        .herald
        .has_event("ann@dest.test", "delivered")));
    // A real Postfix bounce ("User unknown") to ann's return path, at B's
    // intake.
    let dsn = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/bounces/lhost-postfix-05.eml"),
    )
    .unwrap();
    let mut cl = Client::connect(b.intake);
    cl.ehlo();
    let (code, text) = cl.send_bytes("", &[&return_path], &dsn);
    assert_eq!(code, 250, "{text}\n{}", b.herald.log());
    let sent = Instant::now();
    // C's trace: delivered (by A), then bounced (reported at B).
    assert!(
        wait_until(5, || {
            let k = kinds(&c.herald, "ann@dest.test");
            k.iter().any(|e| e == &("delivered".into(), "a".into()))
                && k.iter().any(|e| e == &("bounced".into(), "b".into()))
        }),
        "{:?}\n{}",
        kinds(&c.herald, "ann@dest.test"),
        b.herald.log()
    );
    let took = sent.elapsed();
    assert!(took < Duration::from_secs(3), "took {took:?}");
    let t = c.herald.ok(&["trace", "ann@dest.test"]);
    assert!(t.contains("bounced"), "{t}");
    // show on C says which node holds the message.
    let shown = c.herald.ok(&["show", &id]);
    assert!(shown.contains("received by node a"), "{shown}");
    let ev = c
        .herald
        .events("ann@dest.test")
        .into_iter()
        .find(|e| e["event"] == "bounced")
        .unwrap();
    assert_eq!(ev["id"], id.as_str());
    // The same report again, at C's intake (a sender retrying another MX):
    // a duplicate there too, no second event.
    let mut cl = Client::connect(c.intake);
    cl.ehlo();
    let (code, text) = cl.send_bytes("", &[&return_path], &dsn);
    assert_eq!(code, 250, "{text}");
    assert!(
        wait_until(10, || status(&c.herald)["reports"]["since_start"]
            ["duplicate"]
            == 1),
        "{}",
        status(&c.herald)["reports"]
    );
    let bounced = |h: &Herald| {
        h.events("ann@dest.test")
            .iter()
            .filter(|e| e["event"] == "bounced")
            .count()
    };
    assert_eq!(bounced(&c.herald), 1);
    // The hard bounce suppresses on every node.
    assert!(wait_until(3, || suppressed(&a.herald)
        .contains(&"ann@dest.test".to_string())));
    // The webhook gets the delivery and the bounce once each, from
    // whichever node recorded them.
    assert!(wait_until(10, || hook.count("\"bounced\"") >= 1
        && hook.count("\"delivered\"") >= 1));
    // Give every node's sender a chance to post a second copy (a
    // duplicate would come within the same second).
    let settled = hook.bodies.lock().unwrap().len();
    send(&c.herald, &["later@dest.test"], "after");
    assert!(wait_until(10, || hook.bodies.lock().unwrap().len() > settled));
    assert_eq!(
        hook.count("\"event\":\"bounced\""),
        1,
        "{:?}",
        hook.bodies.lock().unwrap()
    );
    assert_eq!(
        hook.count("\"event\":\"delivered\""),
        2,
        "ann's and later's, once each: {:?}",
        hook.bodies.lock().unwrap()
    );
}

#[test]
fn with_redis_away_mail_flows_and_the_outage_reaches_every_node_when_it_is_back() {
    let mut redis = Redis::start();
    let sink = Sink::start(Script::default());
    let a = node("a", Some(&redis), sink.port(), "", "");
    let b = node("b", Some(&redis), sink.port(), "", "");
    for i in 0..10 {
        send(&a.herald, &[&format!("before{i}@dest.test")], "before");
    }
    sink.wait_for(10, 20);
    assert!(wait_until(5, || b
        .herald
        .has_event("before9@dest.test", "delivered")));
    // A suppression made before the outage must survive Redis losing
    // everything (no persistence here).
    b.herald.ok(&["suppression", "add", "kept@dest.test"]);
    assert!(wait_until(3, || suppressed(&a.herald)
        .contains(&"kept@dest.test".to_string())));
    redis.kill();
    // Mail goes on: accepted, delivered, never refused.
    for i in 0..20 {
        send(&a.herald, &[&format!("during{i}@dest.test")], "during");
        send(&b.herald, &[&format!("during-b{i}@dest.test")], "during");
    }
    let got = sink.wait_for(50, 30);
    assert_eq!(got.len(), 50, "{}", a.herald.log());
    // Degraded, said once.
    assert!(wait_until(10, || status(&a.herald)["cluster"]["degraded"].is_string()));
    let text = a.herald.ok(&["status"]);
    assert!(text.contains("DEGRADED"), "{text}");
    // Suppression still holds, from the mirror.
    send(&a.herald, &["kept@dest.test"], "still suppressed");
    assert!(wait_until(10, || a
        .herald
        .has_event("kept@dest.test", "suppressed")));
    redis.spawn();
    let back = Instant::now();
    assert!(
        wait_until(15, || b.herald.has_event("during19@dest.test", "delivered")
            && a.herald.has_event("during-b19@dest.test", "delivered")),
        "{}\n{}",
        a.herald.log(),
        b.herald.log()
    );
    let took = back.elapsed();
    eprintln!("the outage's events reached the other node {took:?} after Redis was back");
    assert!(took < Duration::from_secs(8), "took {took:?}");
    assert!(
        wait_until(5, || status(&a.herald)["cluster"]["degraded"].is_null()),
        "{}\n{}",
        status(&a.herald)["cluster"],
        a.herald.log()
    );
    // Each message once.
    let mut subjects: Vec<String> = sink
        .messages()
        .iter()
        .flat_map(|m| m.rcpts.clone())
        .collect();
    let n = subjects.len();
    subjects.sort();
    subjects.dedup();
    assert_eq!(subjects.len(), n, "a message was delivered twice");
    assert_eq!(n, 50);
    // The suppression came back into the empty Redis from the nodes.
    assert!(wait_until(5, || redis
        .cmd(&["HKEYS", "herald:suppression"])
        .contains("kept@dest.test")));
    let log = a.herald.log();
    assert_eq!(
        log.matches("cluster degraded").count(),
        1,
        "one line per change of state:\n{log}"
    );
}

/// Sends `n` messages (one recipient each) through `h` on one session.
fn offer(h: &Herald, n: usize, tag: &str) {
    let mut c = h.client();
    c.ehlo();
    for i in 0..n {
        let (code, r) = c.send(
            "app@customer.test",
            &[&format!("{tag}{i}@dest.test")],
            &message(tag),
        );
        assert_eq!(code, 250, "{r}");
    }
}

/// Three nodes, `up_extra` on their upstream, each offered `n` messages
/// at once (standalone nodes when `redis` is None); the sink and the nodes.
fn three_nodes_offered(
    redis: Option<&Redis>,
    up_extra: &str,
    script: Script,
    n: usize,
) -> (Sink, Vec<Node>) {
    let sink = Sink::start(script);
    let nodes: Vec<Node> = ["a", "b", "c"]
        .iter()
        .map(|name| node(name, redis, sink.port(), up_extra, ""))
        .collect();
    thread::scope(|s| {
        for (i, nd) in nodes.iter().enumerate() {
            s.spawn(move || offer(&nd.herald, n, &format!("n{i}-")));
        }
    });
    (sink, nodes)
}

/// Messages that arrived within `window` of the first.
fn first_window(sink: &Sink, window: Duration) -> usize {
    let mut at: Vec<Instant> = sink.messages().iter().map(|m| m.at).collect();
    at.sort();
    let Some(&t0) = at.first() else { return 0 };
    at.iter().filter(|t| t.duration_since(t0) <= window).count()
}

/// Messages in the first 10 s at the sink of three nodes at 600/m with a
/// burst of one, each offered 150 (`redis`: as a cluster).
fn first_ten_seconds_at_600_per_minute(redis: Option<&Redis>) -> usize {
    let limits = "max_rate = \"600/m\"\nmax_burst = 1";
    let (sink, nodes) = three_nodes_offered(redis, limits, Script::default(), 150);
    sink.wait_for(1, 20);
    // Past the window, even for three nodes at 600/m each.
    let past = if redis.is_some() { 115 } else { 330 };
    assert!(
        wait_until(30, || sink.count() >= past),
        "{}",
        nodes[0].herald.log()
    );
    first_window(&sink, Duration::from_secs(10))
}

#[test]
fn three_nodes_keep_max_rate_together_and_would_not_alone() {
    // 600/m with a burst of one: one message per 100 ms, for the cluster.
    let redis = Redis::start();
    let n = first_ten_seconds_at_600_per_minute(Some(&redis));
    eprintln!("cluster: {n} messages in the first 10 s (limit 101)");
    // Never more than 5% over the limit. Under it, a token asked late is
    // lost (a burst of one keeps no credit); a node asks again at the
    // moment Redis named, so even with two CPU hogs beside three nodes on
    // two cores it kept 99: the bound below leaves room for a busier CI.
    assert!((90..=106).contains(&n), "cluster: {n} in 10 s");
    // The same nodes without [cluster]: each keeps its own 600/m.
    let n = first_ten_seconds_at_600_per_minute(None);
    eprintln!("standalone: {n} messages in the first 10 s");
    assert!(n > 200, "standalone nodes must exceed it: {n}");
}

#[test]
fn three_nodes_share_max_connections_and_a_dead_nodes_leases_expire() {
    let limits = "max_connections = 2";
    let script = Script {
        data_delay: Some(Duration::from_millis(100)),
        ..Default::default()
    };
    let redis = Redis::start();
    let (sink, mut nodes) = three_nodes_offered(Some(&redis), limits, script, 15);
    let got = sink.wait_for(45, 60);
    assert_eq!(got.len(), 45, "{}", nodes[0].herald.log());
    let peak = sink.state.lock().unwrap().peak_sessions;
    eprintln!("peak sessions at the sink: {peak}");
    assert!(peak <= 2, "the sink saw {peak} sessions at once");
    assert!(peak >= 1);
    // Node C takes both leases for a slow upstream and is killed with
    // them held: A waits for them to expire, then sends.
    sink.state.lock().unwrap().script.data_delay = Some(Duration::from_secs(60));
    let (mut c, a) = (nodes.pop().unwrap(), nodes.remove(0));
    send(&c.herald, &["slow1@dest.test"], "slow");
    send(&c.herald, &["slow2@dest.test"], "slow");
    let leases = || redis.cmd(&["ZRANGE", "herald:pace:leases:up", "0", "-1"]);
    assert!(
        wait_until(10, || {
            let l = leases();
            l.matches("c:").count() == 2 && !l.contains("a:") && !l.contains("b:")
        }),
        "{}",
        leases()
    );
    c.herald.kill9();
    let killed = Instant::now();
    sink.state.lock().unwrap().script.data_delay = None;
    let before = sink.count();
    send(&a.herald, &["after@dest.test"], "after the death");
    assert!(
        wait_until(30, || sink.count() > before),
        "{}",
        a.herald.log()
    );
    let took = killed.elapsed();
    eprintln!("A sent {took:?} after C died with both leases");
    // Not before C's leases expired (10 s after their last renewal, at
    // most 3 s before the kill).
    assert!(
        took >= Duration::from_secs(6),
        "took {took:?}: C's leases were not counted"
    );
    assert!(took < Duration::from_secs(20), "took {took:?}");
    drop(c);
}

#[test]
fn an_open_counted_by_another_nodes_pixel_server_is_in_every_nodes_history() {
    const HTML: &str = "From: Claire <claire@customer.test>\nTo: louise@dest.test\nSubject: Your file\nMIME-Version: 1.0\nContent-Type: text/html; charset=utf-8\n\n<html><body><p>Your file is ready.</p></body></html>\n";
    let redis = Redis::start();
    let sink = Sink::start(Script::default());
    let tracking = |port: u16| {
        format!(
            "[tracking]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\nbase_url = \"http://127.0.0.1:{port}/\"\nsecret_file = \"{{dir}}/bounce.key\"\n"
        )
    };
    let (pa, pb) = (free_port(), free_port());
    let a = node("a", Some(&redis), sink.port(), "", &tracking(pa));
    let b = node("b", Some(&redis), sink.port(), "", &tracking(pb));
    let mut c = a.herald.client();
    c.ehlo();
    let (code, reply) = c.send("app@platform.test", &["louise@dest.test"], HTML);
    assert_eq!(code, 250, "{reply}");
    let id = queue_id(&reply);
    let got = sink.wait_for(1, 20);
    let text = got[0].text();
    let prefix = format!("http://127.0.0.1:{pa}/o/{id}.");
    let at = text.find(&prefix).unwrap_or_else(|| panic!("{text}"));
    let path = text[at + format!("http://127.0.0.1:{pa}").len()..]
        .split('"')
        .next()
        .unwrap()
        .to_string();
    // The received event reaches B, then B's pixel server counts the open.
    assert!(wait_until(5, || b
        .herald
        .has_event("louise@dest.test", "received")));
    let (code, body) = http_get(&format!("127.0.0.1:{pb}"), &path);
    assert_eq!(code, 200);
    assert!(body.starts_with(b"GIF89a"));
    assert!(
        wait_until(5, || kinds(&a.herald, "louise@dest.test")
            .contains(&("opened".to_string(), "b".to_string()))),
        "{:?}\n{}",
        kinds(&a.herald, "louise@dest.test"),
        b.herald.log()
    );
}

#[test]
fn on_redis_down_hold_holds_delivery_until_redis_answers_and_healthz_says_degraded() {
    let mut redis = Redis::start();
    let sink = Sink::start(Script::default());
    let maddr = format!("127.0.0.1:{}", free_port());
    let h = Herald::start(&format!(
        "{}\n[control]\nsocket = \"{{dir}}/herald.sock\"\nmetrics_listen = \"{maddr}\"\n[cluster]\nredis = \"{}\"\nnode = \"a\"\non_redis_down = \"hold\"\n",
        upstream(sink.port(), "none", ""),
        redis.url()
    ));
    send(&h, &["first@dest.test"], "with Redis");
    sink.wait_for(1, 20);
    assert_eq!(http_get(&maddr, "/healthz").0, 200);
    redis.kill();
    assert!(
        wait_until(10, || {
            let (code, body) = http_get(&maddr, "/healthz");
            code == 200 && String::from_utf8_lossy(&body).contains("cluster degraded")
        }),
        "{:?}",
        String::from_utf8_lossy(&http_get(&maddr, "/healthz").1)
    );
    let metrics = String::from_utf8_lossy(&http_get(&maddr, "/metrics").1).into_owned();
    assert!(metrics.contains("herald_cluster_degraded 1"), "{metrics}");
    // Accepted, and held while Redis is away (a negative: it cannot fail
    // falsely, only pass slowly; delivery takes milliseconds here).
    send(&h, &["held@dest.test"], "held");
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(sink.count(), 1, "held while Redis is away");
    assert_eq!(status(&h)["paused"], true, "status says delivery is held");
    redis.spawn();
    assert!(sink.wait_for(2, 20).len() == 2, "{}", h.log());
    assert!(wait_until(10, || String::from_utf8_lossy(
        &http_get(&maddr, "/metrics").1
    )
    .contains("herald_cluster_degraded 0")));
}

#[test]
fn a_wrong_redis_password_degrades_the_node_and_mail_still_flows() {
    let redis = Redis::start();
    assert!(redis
        .cmd(&["CONFIG", "SET", "requirepass", "the-right-one"])
        .contains("OK"));
    let sink = Sink::start(Script::default());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("redis.password"), "a-wrong-one\n").unwrap();
    let h = Herald::start_in(
        dir,
        &format!(
            "{}\n[control]\nsocket = \"{{dir}}/herald.sock\"\n[cluster]\nredis = \"{}\"\nnode = \"a\"\nredis_password_file = \"redis.password\"\n",
            upstream(sink.port(), "none", ""),
            redis.url()
        ),
    );
    assert!(
        wait_until(10, || status(&h)["cluster"]["degraded"].is_string()),
        "{}",
        h.log()
    );
    let why = status(&h)["cluster"]["degraded"].to_string();
    assert!(
        why.to_lowercase().contains("pass") || why.contains("AUTH"),
        "{why}"
    );
    let text = h.ok(&["status"]);
    assert!(
        !text.contains("a-wrong-one") && !h.log().contains("a-wrong-one"),
        "the password is never shown"
    );
    // Accepted and delivered all the same.
    send(&h, &["x@dest.test"], "without Redis");
    assert_eq!(sink.wait_for(1, 20).len(), 1, "{}", h.log());
    // The right one: two nodes with it share a suppression through Redis.
    let right = |name: &str| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("redis.password"), "the-right-one\n").unwrap();
        Herald::start_in(
            dir,
            &format!(
                "{}\n[control]\nsocket = \"{{dir}}/herald.sock\"\n[cluster]\nredis = \"{}\"\nnode = \"{name}\"\nredis_password_file = \"redis.password\"\n",
                upstream(sink.port(), "none", ""),
                redis.url()
            ),
        )
    };
    let (b, c) = (right("b"), right("c"));
    b.ok(&["suppression", "add", "shared@dest.test"]);
    assert!(
        wait_until(10, || suppressed(&c)
            .contains(&"shared@dest.test".to_string())),
        "{}",
        c.log()
    );
    assert!(status(&c)["cluster"]["degraded"].is_null());
}

#[test]
fn a_tenants_suppressions_and_quota_hold_on_every_node() {
    let redis = Redis::start();
    let sink = Sink::start(Script::default());
    let tenants = "[[tenants]]\nname = \"acme\"\nsender_domains = [\"acme.example\"]\nmax_rate = \"60/m\"\nmax_burst = 1\n\
                   [[tenants]]\nname = \"beta\"\nsender_domains = [\"beta.example\"]\n";
    let a = node("a", Some(&redis), sink.port(), "", tenants);
    let b = node("b", Some(&redis), sink.port(), "", tenants);
    let from = |h: &Herald, sender: &str, rcpt: &str, subject: &str| {
        let mut c = h.client();
        c.ehlo();
        let (code, reply) = c.send(
            "app@platform.test",
            &[rcpt],
            &format!("From: {sender}\nSubject: {subject}\n\nx\n"),
        );
        assert_eq!(code, 250, "{reply}");
    };
    // A suppression for acme's mail, made on A, holds on B for acme only.
    a.herald
        .ok(&["suppression", "add", "shared@dest.test", "--tenant", "acme"]);
    let on_b = || {
        json_lines(&b.herald.ok(&["suppression", "list", "--json"]))
            .into_iter()
            .find(|e| e["addr"] == "shared@dest.test")
    };
    assert!(wait_until(10, || on_b().is_some()), "{}", b.herald.log());
    assert_eq!(on_b().unwrap()["tenant"], "acme");
    from(
        &b.herald,
        "news@acme.example",
        "shared@dest.test",
        "acme news",
    );
    from(
        &b.herald,
        "auth@beta.example",
        "shared@dest.test",
        "beta reset",
    );
    assert!(wait_until(20, || b
        .herald
        .has_event("shared@dest.test", "suppressed")
        && b.herald.has_event("shared@dest.test", "delivered")));
    let beta_only = sink.wait_for(1, 10);
    assert_eq!(beta_only.len(), 1);
    assert!(beta_only[0].text().contains("beta reset"));
    // acme's quota (one a second) is the cluster's, not each node's.
    let start = Instant::now();
    for i in 0..6 {
        from(
            &a.herald,
            "news@acme.example",
            &format!("a{i}@dest.test"),
            "acme burst",
        );
        from(
            &b.herald,
            "news@acme.example",
            &format!("b{i}@dest.test"),
            "acme burst",
        );
    }
    let acme = || {
        sink.messages()
            .iter()
            .filter(|m| m.text().contains("acme burst"))
            .count()
    };
    assert!(wait_until(20, || acme() >= 4), "{}", a.herald.log());
    let (n, t) = (acme(), start.elapsed());
    // Two nodes with a quota each would have sent about 10 by now.
    assert!(n as u64 <= t.as_secs() + 2, "{n} of acme's in {t:?}");
    assert!(wait_until(30, || acme() == 12), "{}", a.herald.log());
}

//! `[[tenants]]` end to end: two customers of one platform side by side.
//! Scoped API tokens see and act on their own tenant's mail only (every
//! route of the OpenAPI document, and the console in a real browser); a
//! complaint about acme's mail stops acme's mail only, a hard bounce stops
//! everyone's; webhooks filtered by tenant; a burst from one tenant over
//! its quota never holds the other's mail.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::hooks::{Receiver, HOOK_KEY};
use common::*;
use serde_json::Value;

const STAFF: &str = "staff-token-0123456789";
const ACME: &str = "acme-token-0123456789";
const BETA: &str = "beta-token-0123456789";
const ACME_VIEWER: &str = "acme-viewer-0123456789";
const DOMAIN: &str = "bounces.example.test";

struct Setup {
    h: Herald,
    /// The platform's relay (beta's mail and the platform's own).
    sink: Sink,
    /// acme's own relay (its [[routes]] entry).
    acme_sink: Sink,
    api: String,
    intake: SocketAddr,
    metrics: String,
    acme_hook: Receiver,
    beta_hook: Receiver,
}

fn setup() -> Setup {
    let sink = Sink::start(Script {
        rcpt_replies: vec![(
            "dead".into(),
            "550 5.1.1 <dead@dest.test>: Recipient address rejected: User unknown".into(),
        )],
        ..Default::default()
    });
    let acme_sink = Sink::start(Script::default());
    let (api_port, intake_port, metrics_port) = (free_port(), free_port(), free_port());
    let (acme_hook_port, beta_hook_port) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("api.tokens"),
        format!(
            "# the platform's support staff\n{STAFF}\n{ACME} tenant=acme\n{BETA} tenant=beta\n{ACME_VIEWER} tenant=acme read-only\n"
        ),
    )
    .unwrap();
    std::fs::write(dir.path().join("webhook.key"), HOOK_KEY).unwrap();
    std::fs::write(
        dir.path().join("bounce.key"),
        "an HMAC key of return-path tokens, 32+\n",
    )
    .unwrap();
    let events = r#"events = ["delivered", "bounced", "suppressed", "complained"]"#;
    let h = Herald::start_in(
        dir,
        &format!(
            "{}\n[upstreams.acme-relay]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\n\
             [[tenants]]\nname = \"acme\"\nsender_domains = [\"acme.example\"]\n\
             [[tenants]]\nname = \"beta\"\nsender_domains = [\"beta.example\"]\n\
             [[routes]]\nsender_domain = \"acme.example\"\nupstream = \"acme-relay\"\ntenant = \"acme\"\n\
             [api]\nlisten = \"127.0.0.1:{api_port}\"\ntokens_file = \"api.tokens\"\n\
             [bounces]\ndomain = \"{DOMAIN}\"\nlisten = [\"127.0.0.1:{intake_port}\"]\nsecret_file = \"bounce.key\"\n\
             [[webhooks]]\nname = \"acme-crm\"\nurl = \"http://127.0.0.1:{acme_hook_port}/h\"\nsecret_file = \"webhook.key\"\n{events}\ntenants = [\"acme\"]\n\
             [[webhooks]]\nname = \"beta-crm\"\nurl = \"http://127.0.0.1:{beta_hook_port}/h\"\nsecret_file = \"webhook.key\"\n{events}\ntenants = [\"beta\"]\n\
             [control]\nsocket = \"{{dir}}/herald.sock\"\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n",
            upstream(sink.port(), "none", ""),
            acme_sink.port(),
        ),
    );
    Setup {
        h,
        sink,
        acme_sink,
        api: format!("127.0.0.1:{api_port}"),
        intake: format!("127.0.0.1:{intake_port}").parse().unwrap(),
        metrics: format!("127.0.0.1:{metrics_port}"),
        acme_hook: Receiver::start(acme_hook_port, 200),
        beta_hook: Receiver::start(beta_hook_port, 200),
    }
}

/// Sends one message from `from` to `rcpt`; its queue id.
fn send(h: &Herald, from: &str, rcpt: &str, subject: &str, tag: &str) -> String {
    let mut c = h.client();
    c.ehlo();
    let (code, reply) = c.send(
        &format!(
            "app@{}",
            from.rsplit_once('@').unwrap().1.trim_end_matches('>')
        ),
        &[rcpt],
        &format!("From: {from}\nSubject: {subject}\nX-Herald-Tag: {tag}\n\nhello\n"),
    );
    assert_eq!(code, 250, "{reply}");
    queue_id(&reply)
}

fn get(s: &Setup, path: &str, token: &str) -> (u16, Value) {
    api_call(&s.api, "GET", path, Some(token), "")
}

/// The queue ids of a `/queue` answer.
fn queued_ids(q: &Value) -> Vec<&str> {
    q["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect()
}

fn events_of(s: &Setup, rcpt: &str) -> Vec<Value> {
    s.h.events(rcpt)
}

fn wait_event(s: &Setup, rcpt: &str, event: &str, tenant: &str) -> Value {
    let mut found = None;
    wait_until(20, || {
        found = events_of(s, rcpt)
            .into_iter()
            .find(|e| e["event"] == event && e["tenant"] == tenant);
        found.is_some()
    });
    found.unwrap_or_else(|| {
        panic!(
            "no {event} of {tenant} for {rcpt}: {:?}\n{}",
            events_of(s, rcpt),
            s.h.log()
        )
    })
}

#[test]
fn scoped_tokens_see_and_act_on_their_own_tenant_only() {
    let s = setup();
    // Delivered mail of each tenant, with the same tag.
    let acme_done = send(
        &s.h,
        "Ann <ann@acme.example>",
        "carol@dest.test",
        "Acme order 1",
        "shared-tag",
    );
    let beta_done = send(
        &s.h,
        "bob@beta.example",
        "dave@dest.test",
        "Beta reset",
        "shared-tag",
    );
    assert_eq!(
        s.acme_sink.wait_for(1, 10).len(),
        1,
        "acme's mail takes acme's route"
    );
    assert_eq!(s.sink.wait_for(1, 10).len(), 1);
    wait_event(&s, "carol@dest.test", "delivered", "acme");
    wait_event(&s, "dave@dest.test", "delivered", "beta");
    // Queued mail of each (delivery paused by the staff).
    assert_eq!(s.h.cli(&["pause"]).0, 0);
    let acme_id = send(
        &s.h,
        "ann@acme.example",
        "erin@dest.test",
        "Acme invoice 2",
        "shared-tag",
    );
    let beta_id = send(
        &s.h,
        "bob@beta.example",
        "frank@dest.test",
        "Beta digest",
        "shared-tag",
    );
    // acme suppresses an address for its own mail.
    let (code, v) = api_call(
        &s.api,
        "POST",
        "/api/v1/suppressions",
        Some(ACME),
        r#"{"addr": "gina@dest.test", "reason": "asked acme to stop"}"#,
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["entry"]["tenant"], "acme");
    // A tenant's token cannot suppress for another tenant; the staff
    // cannot name a tenant that does not exist.
    let suppress = |token: &str, body: &str| {
        api_call(&s.api, "POST", "/api/v1/suppressions", Some(token), body)
    };
    let (code, v) = suppress(ACME, r#"{"addr": "x@dest.test", "tenant": "beta"}"#);
    assert_eq!(code, 403, "{v}");
    let (code, v) = suppress(STAFF, r#"{"addr": "x@dest.test", "tenant": "nobody"}"#);
    assert_eq!(code, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("nobody"), "{v}");
    let (code, _, err) =
        s.h.cli(&["suppression", "add", "x@dest.test", "--tenant", "nobody"]);
    assert_ne!(code, 0);
    assert!(err.contains("no tenant"), "{err}");

    // What each tenant's token sees of its own: its counts (kept as mail
    // comes and goes, not scanned) agree with its queue and its events.
    let kinds = |s: &Setup| {
        let (_, ev) = get(s, "/api/v1/events?limit=1000", ACME);
        let mut n = std::collections::BTreeMap::<String, u64>::new();
        for e in ev["events"].as_array().unwrap() {
            *n.entry(e["event"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
        serde_json::to_value(n).unwrap()
    };
    let before = kinds(&s);
    let (code, st) = get(&s, "/api/v1/status", ACME);
    let after = kinds(&s);
    assert_eq!(code, 200, "{st}");
    assert_eq!(st["tenant"], "acme");
    assert_eq!(st["messages"], 1);
    let pending = |st: &Value| {
        st["recipients"]["queued"].as_u64().unwrap_or(0)
            + st["recipients"]["deferred"].as_u64().unwrap_or(0)
    };
    assert_eq!(pending(&st), 1, "{st}");
    assert!(
        st["last_24h"] == before || st["last_24h"] == after,
        "{st} vs {before} / {after}"
    );
    assert!(st["last_24h"]["received"].as_u64().unwrap() >= 2, "{st}");
    assert_eq!(st["routes"][0]["name"], "acme-relay");
    let (_, q) = get(&s, "/api/v1/queue", ACME);
    let ids = queued_ids(&q);
    assert_eq!(ids, [acme_id.as_str()]);
    let (code, m) = get(&s, &format!("/api/v1/messages/{acme_done}"), ACME);
    assert_eq!(code, 200, "{m}");
    assert_eq!(m["tenant"], "acme");
    assert_eq!(
        get(&s, &format!("/api/v1/messages/{beta_done}"), ACME).0,
        404
    );
    let (_, ev) = get(&s, "/api/v1/events?tag=shared-tag&limit=100", ACME);
    let evs = ev["events"].as_array().unwrap();
    assert!(
        !evs.is_empty() && evs.iter().all(|e| e["tenant"] == "acme"),
        "{ev}"
    );

    // beta's token, asked about acme's mail on every route of the OpenAPI
    // document: 403 or 404, or beta's own data, never acme's.
    let acme_marks = [acme_id.as_str(), acme_done.as_str(), "acme", "Acme", "ann@"];
    let (_, doc) = api_call(&s.api, "GET", "/api/v1/openapi.json", None, "");
    let mut asked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        if path.ends_with("openapi.json") {
            continue;
        }
        for (method, op) in item.as_object().unwrap() {
            if method == "parameters" {
                continue;
            }
            let url = path
                .replace("{id}", &acme_id)
                .replace("{addr}", "gina@dest.test");
            let mut query = vec![];
            let params = item["parameters"].as_array().into_iter().flatten();
            for p in params.chain(op["parameters"].as_array().into_iter().flatten()) {
                let value = match p["name"].as_str().unwrap() {
                    "rcpt" => "erin@dest.test",
                    "tag" => "shared-tag",
                    "route" => "acme-relay",
                    "domain" => "acme.example",
                    "since" => "2h",
                    _ => continue,
                };
                if p["in"] == "query" {
                    query.push(format!("{}={value}", p["name"].as_str().unwrap()));
                }
            }
            let full = format!("{url}?{}", query.join("&"));
            let body = match op["requestBody"]["content"]["application/json"]["example"] {
                Value::Null => String::new(),
                _ => r#"{"addr": "gina@dest.test", "reason": "beta's own"}"#.to_string(),
            };
            let (code, v) = api_call(&s.api, &method.to_uppercase(), &full, Some(BETA), &body);
            asked += 1;
            assert!(
                [200, 403, 404].contains(&code),
                "{method} {full}: {code} {v}"
            );
            if code == 200 {
                let text = v.to_string();
                for mark in acme_marks {
                    assert!(
                        !text.contains(mark),
                        "{method} {full} shows acme's {mark}: {text}"
                    );
                }
            }
            // What must be refused outright.
            let refused = [
                ("get", "/api/v1/messages/{id}"),
                ("delete", "/api/v1/messages/{id}"),
                ("post", "/api/v1/messages/{id}/retry"),
                ("post", "/api/v1/pause"),
                ("post", "/api/v1/resume"),
                ("get", "/api/v1/reports"),
                ("get", "/api/v1/dmarc"),
            ];
            if refused.contains(&(method.as_str(), path.as_str())) {
                assert!([403, 404].contains(&code), "{method} {full}: {code} {v}");
            }
        }
    }
    assert!(asked >= 16, "{asked} operations");
    // Nothing of acme's changed: its message still queued, its
    // suppression there; beta's own tag-wide cancel took beta's mail only.
    let (_, q) = get(&s, "/api/v1/queue", STAFF);
    let ids = queued_ids(&q);
    assert_eq!(
        ids,
        [acme_id.as_str()],
        "beta's cancel by tag took its own message only: {q}"
    );
    assert!(s.h.has_event("frank@dest.test", "cancelled"));
    let (_, sup) = get(&s, "/api/v1/suppressions", ACME);
    assert_eq!(sup["entries"].as_array().unwrap().len(), 1, "{sup}");
    assert_eq!(sup["entries"][0]["addr"], "gina@dest.test");
    let (code, e) = get(&s, "/api/v1/suppressions/gina@dest.test", ACME);
    assert_eq!(
        (code, &e["entry"]["tenant"]),
        (200, &Value::from("acme")),
        "{e}"
    );
    let (code, _) = get(&s, "/api/v1/suppressions/gina@dest.test", BETA);
    assert_eq!(code, 404);
    // acme may hold its own route, not the platform's.
    let post = |path: &str, token: &str| api_call(&s.api, "POST", path, Some(token), "").0;
    assert_eq!(post("/api/v1/pause?route=acme-relay", ACME), 200);
    assert_eq!(post("/api/v1/pause?route=up", ACME), 403);
    assert_eq!(post("/api/v1/resume", ACME), 403);
    assert_eq!(post("/api/v1/resume?route=acme-relay", ACME), 200);

    // A read-only token of acme: reads, never acts.
    let (code, q) = get(&s, "/api/v1/queue", ACME_VIEWER);
    assert_eq!(code, 200);
    assert_eq!(q["messages"][0]["id"], acme_id.as_str());
    assert_eq!(
        post(&format!("/api/v1/messages/{acme_id}/retry"), ACME_VIEWER),
        403
    );
    let (code, v) = api_call(
        &s.api,
        "DELETE",
        &format!("/api/v1/messages/{acme_id}"),
        Some(ACME_VIEWER),
        "",
    );
    assert_eq!(code, 403, "{v}");
    assert!(v["error"].as_str().unwrap().contains("read-only"));
    let (code, _) = api_call(
        &s.api,
        "POST",
        "/api/v1/suppressions",
        Some(ACME_VIEWER),
        r#"{"addr": "x@dest.test"}"#,
    );
    assert_eq!(code, 403);

    // The staff sees both, and each message's tenant everywhere.
    let (_, st) = get(&s, "/api/v1/status", STAFF);
    assert!(st["tenant"].is_null());
    let shown: Value = serde_json::from_str(&s.h.ok(&["show", &beta_done, "--json"])).unwrap();
    assert_eq!(shown["tenant"], "beta");
    let history = json_lines(&s.h.ok(&["history", "--tag", "shared-tag", "--json"]));
    for (tenant, rcpt) in [("acme", "carol@dest.test"), ("beta", "dave@dest.test")] {
        assert!(
            history
                .iter()
                .any(|e| e["tenant"] == tenant && e["rcpt"] == rcpt),
            "{history:?}"
        );
    }
    let trace = s.h.ok(&["trace", "gina@dest.test"]);
    assert!(trace.contains("for tenant acme's mail only"), "{trace}");

    // The console in a real browser, logged in with acme's token.
    let (ok, out) = python_script(
        "tenant_console.py",
        &[
            &format!("http://{}", s.api),
            ACME,
            &acme_id,
            &beta_id,
            &acme_done,
        ],
    );
    assert!(ok, "{out}");
    assert_eq!(s.h.cli(&["resume"]).0, 0);
}

fn arf(original: &str) -> String {
    format!(
        "From: staff@isp.test\nTo: fbl@{DOMAIN}\nSubject: FW: complaint\nMIME-Version: 1.0\nContent-Type: multipart/report; report-type=feedback-report; boundary=\"b1\"\n\n--b1\nContent-Type: text/plain\n\nThis is an email abuse report.\n\n--b1\nContent-Type: message/feedback-report\n\nFeedback-Type: abuse\nUser-Agent: SomeISP-FBL/1.0\nVersion: 1\nSource-IP: 192.0.2.1\n\n--b1\nContent-Type: message/rfc822\nContent-Disposition: inline\n\n{original}\n--b1--\n"
    )
}

#[test]
fn a_complaint_stays_with_its_tenant_and_a_hard_bounce_stops_everyone() {
    let s = setup();
    // acme's newsletter draws a complaint.
    send(
        &s.h,
        "news@acme.example",
        "shared@dest.test",
        "Acme newsletter",
        "news",
    );
    let copy = s.acme_sink.wait_for(1, 10);
    assert_eq!(copy.len(), 1, "{}", s.h.log());
    let mut c = Client::connect(s.intake);
    c.ehlo();
    let (code, text) = c.send_bytes(
        "fbl@isp.test",
        &[&format!("fbl@{DOMAIN}")],
        arf(&copy[0].text().replace("\r\n", "\n")).as_bytes(),
    );
    assert_eq!(code, 250, "{text}");
    wait_event(&s, "shared@dest.test", "complained", "acme");
    let list = json_lines(&s.h.ok(&["suppression", "list", "--json"]));
    let e = list
        .iter()
        .find(|e| e["addr"] == "shared@dest.test")
        .expect("suppressed");
    assert_eq!(
        e["tenant"], "acme",
        "a complaint is a judgement of one sender: {e}"
    );

    // acme's next mail there is suppressed; beta's password reset goes out.
    send(
        &s.h,
        "news@acme.example",
        "shared@dest.test",
        "Acme newsletter 2",
        "news",
    );
    wait_event(&s, "shared@dest.test", "suppressed", "acme");
    send(
        &s.h,
        "auth@beta.example",
        "shared@dest.test",
        "Beta password reset",
        "reset",
    );
    wait_event(&s, "shared@dest.test", "delivered", "beta");
    assert_eq!(s.acme_sink.count(), 1, "acme's second message never left");
    assert!(s
        .sink
        .messages()
        .iter()
        .any(|m| m.text().contains("Beta password reset")));
    let (_, t) = get(&s, "/api/v1/trace?rcpt=shared@dest.test", ACME);
    assert_eq!(t["suppression"]["tenant"], "acme", "{t}");
    assert!(
        t["diagnosis"]
            .as_str()
            .unwrap()
            .contains("tenant acme's mail only"),
        "{t}"
    );
    let (_, t) = get(&s, "/api/v1/trace?rcpt=shared@dest.test", BETA);
    assert!(
        t["suppression"].is_null(),
        "beta's mail is not suppressed: {t}"
    );

    // A hard bounce of beta's mail: the address does not exist, for anyone.
    send(
        &s.h,
        "auth@beta.example",
        "dead@dest.test",
        "Beta welcome",
        "welcome",
    );
    wait_event(&s, "dead@dest.test", "bounced", "beta");
    send(
        &s.h,
        "news@acme.example",
        "dead@dest.test",
        "Acme newsletter 3",
        "news",
    );
    wait_event(&s, "dead@dest.test", "suppressed", "acme");
    assert_eq!(s.acme_sink.count(), 1);
    let list = json_lines(&s.h.ok(&["suppression", "list", "--json"]));
    let e = list
        .iter()
        .find(|e| e["addr"] == "dead@dest.test")
        .expect("suppressed");
    assert!(e["tenant"].is_null(), "{e}");

    // Each tenant's endpoint got its own tenant's events, and all of them.
    let hooks_done = wait_until(20, || {
        s.acme_hook.count("complained", "shared@dest.test") == 1
            && s.acme_hook.count("suppressed", "dead@dest.test") == 1
            && s.beta_hook.count("delivered", "shared@dest.test") == 1
            && s.beta_hook.count("bounced", "dead@dest.test") == 1
    });
    assert!(
        hooks_done,
        "{:?}\n{:?}",
        s.acme_hook.events(),
        s.beta_hook.events()
    );
    for (hook, tenant) in [(&s.acme_hook, "acme"), (&s.beta_hook, "beta")] {
        let evs = hook.events();
        assert!(
            evs.iter().all(|e| e["tenant"] == tenant),
            "{tenant}: {evs:?}"
        );
    }
    assert_eq!(s.acme_hook.count("delivered", "shared@dest.test"), 1);
    // Metrics per tenant.
    let (_, body) = http_get(&s.metrics, "/metrics");
    let text = String::from_utf8_lossy(&body);
    for line in [
        "herald_tenant_events_total{tenant=\"acme\",event=\"complained\"} 1",
        "herald_tenant_events_total{tenant=\"beta\",event=\"bounced\"} 1",
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }
}

#[test]
fn a_burst_over_one_tenants_quota_never_holds_the_others_mail() {
    let sink = Sink::start(Script::default());
    let h = Herald::start(&format!(
        "{}\n[[tenants]]\nname = \"acme\"\nsender_domains = [\"acme.example\"]\nmax_rate = \"60/m\"\nmax_burst = 1\n\
         [[tenants]]\nname = \"beta\"\nsender_domains = [\"beta.example\"]\n",
        upstream(sink.port(), "none", "")
    ));
    // acme's burst: 20 messages on the same route as beta's mail.
    let start = Instant::now();
    let mut c = h.client();
    c.ehlo();
    for i in 0..20 {
        let (code, reply) = c.send(
            "app@acme.example",
            &[&format!("a{i}@dest.test")],
            &format!("From: news@acme.example\nSubject: acme {i}\n\nx\n"),
        );
        assert_eq!(code, 250, "{reply}");
    }
    // Then beta's password resets.
    let beta_sent = Instant::now();
    for i in 0..5 {
        let (code, _) = c.send(
            "app@beta.example",
            &[&format!("b{i}@dest.test")],
            &format!("From: auth@beta.example\nSubject: beta {i}\n\nx\n"),
        );
        assert_eq!(code, 250);
    }
    let count = |who: &str| {
        sink.messages()
            .iter()
            .filter(|m| m.text().contains(&format!("Subject: {who}")))
            .count()
    };
    assert!(wait_until(20, || count("beta") == 5), "{}", h.log());
    let beta_took = beta_sent.elapsed();
    let acme_so_far = count("acme");
    let elapsed = start.elapsed();
    // beta waited for none of acme's queue (acme's alone takes ~19 s).
    assert!(
        beta_took < Duration::from_secs(8),
        "beta's mail took {beta_took:?}"
    );
    // acme at its own pace: one at once, then one a second.
    assert!(
        acme_so_far as u64 <= elapsed.as_secs() + 2,
        "{acme_so_far} of acme's in {elapsed:?}"
    );
    // The rest of acme's burst follows at that pace; none is refused.
    assert!(wait_until(40, || count("acme") == 20), "{}", h.log());
    let acme_times: Vec<Instant> = sink
        .messages()
        .iter()
        .filter(|m| m.text().contains("Subject: acme"))
        .map(|m| m.at)
        .collect();
    let spread = *acme_times.last().unwrap() - acme_times[0];
    assert!(
        spread >= Duration::from_secs(17),
        "20 at 1/s took {spread:?}"
    );
}

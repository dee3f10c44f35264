//! The HTTP API end to end: every route, every error status, tokens, and
//! every route of the OpenAPI document answers.

mod common;

use common::*;
use serde_json::Value;

const TOKEN: &str = "support-console-token-0123";

use common::api_call as call;

fn start() -> (Herald, String, Sink) {
    let sink = Sink::start(Script::default());
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("api.tokens"),
        format!("# console\n{TOKEN}\n"),
    )
    .unwrap();
    let h = Herald::start_in(
        dir,
        &format!(
            "[api]\nlisten = \"127.0.0.1:{port}\"\ntokens_file = \"api.tokens\"\n{}",
            upstream(sink.port(), "none", "")
        ),
    );
    (h, format!("127.0.0.1:{port}"), sink)
}

#[test]
fn every_route_and_its_errors() {
    let (h, api, sink) = start();
    let get = |path: &str| call(&api, "GET", path, Some(TOKEN), "");
    // Tokens.
    let (code, v) = call(&api, "GET", "/api/v1/status", None, "");
    assert_eq!(code, 401, "{v}");
    assert!(v["error"].as_str().unwrap().contains("Bearer"));
    assert_eq!(
        call(
            &api,
            "GET",
            "/api/v1/status",
            Some("wrong-token-0123456789"),
            ""
        )
        .0,
        401
    );
    let (code, v) = get("/api/v1/status");
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["ok"], true);
    assert_eq!(v["paused"], false);

    // A held message to look at.
    let (code, _, _) = h.cli(&["pause"]);
    assert_eq!(code, 0);
    let mut c = h.client();
    c.ehlo();
    let (code, reply) = c.send(
        "app@platform.test",
        &["louise@dest.test"],
        "Subject: Your file\nX-Herald-Tag: file-1\n\nready\n",
    );
    assert_eq!(code, 250);
    let id = queue_id(&reply);
    let (code, v) = get("/api/v1/queue");
    assert_eq!(code, 200);
    assert_eq!(v["messages"][0]["id"], id.as_str());
    let (code, v) = get(&format!("/api/v1/messages/{id}"));
    assert_eq!(code, 200, "{v}");
    assert!(v["headers"]
        .as_str()
        .unwrap()
        .contains("Subject: Your file"));
    assert_eq!(get("/api/v1/messages/0NQSVCH1D000").0, 404);
    assert_eq!(
        call(
            &api,
            "POST",
            &format!("/api/v1/messages/{id}/retry"),
            Some(TOKEN),
            ""
        )
        .0,
        200
    );
    assert_eq!(
        call(
            &api,
            "POST",
            "/api/v1/messages/0NQSVCH1D000/retry",
            Some(TOKEN),
            ""
        )
        .0,
        404
    );
    let (code, v) = get("/api/v1/trace?rcpt=louise@dest.test");
    assert_eq!(code, 200);
    assert!(v["diagnosis"].as_str().unwrap().contains(&id), "{v}");
    assert_eq!(get("/api/v1/trace").0, 400);

    // Events, paged.
    let mut c2 = h.client();
    c2.ehlo();
    assert_eq!(
        c2.send("app@platform.test", &["paul@dest.test"], &message("two"))
            .0,
        250
    );
    let (code, v) = get("/api/v1/events?event=received&limit=1");
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["events"].as_array().unwrap().len(), 1);
    assert_eq!(v["events"][0]["rcpt"], "louise@dest.test");
    let cursor = v["next_cursor"].as_str().expect("more").to_string();
    let (_, v) = get(&format!(
        "/api/v1/events?event=received&limit=1&cursor={cursor}"
    ));
    assert_eq!(v["events"][0]["rcpt"], "paul@dest.test");
    assert!(v["next_cursor"].is_null(), "{v}");
    let (_, v) = get("/api/v1/events?rcpt=paul@dest.test&since=1h");
    assert_eq!(v["events"].as_array().unwrap().len(), 1, "{v}");
    let (_, v) = get("/api/v1/events?tag=file-1");
    assert_eq!(v["events"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(get("/api/v1/events?since=yesterday-ish").0, 400);
    assert_eq!(get("/api/v1/events?event=nonsense").0, 400);
    assert_eq!(get("/api/v1/events?limit=x").0, 400);
    assert_eq!(get("/api/v1/events?cursor=zz").0, 400);

    // Cancel by tag, by id.
    let (code, v) = call(&api, "POST", "/api/v1/cancel?tag=file-1", Some(TOKEN), "");
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["cancelled"][0]["rcpt"], "louise@dest.test");
    assert_eq!(
        call(
            &api,
            "POST",
            "/api/v1/cancel?tag=no-such-tag",
            Some(TOKEN),
            ""
        )
        .0,
        404
    );
    assert_eq!(call(&api, "POST", "/api/v1/cancel", Some(TOKEN), "").0, 400);
    let paul = get("/api/v1/queue").1["messages"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, v) = call(
        &api,
        "DELETE",
        &format!("/api/v1/messages/{paul}"),
        Some(TOKEN),
        "",
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        call(
            &api,
            "DELETE",
            "/api/v1/messages/0NQSVCH1D000",
            Some(TOKEN),
            ""
        )
        .0,
        404
    );

    // Suppressions.
    let (code, v) = call(
        &api,
        "POST",
        "/api/v1/suppressions",
        Some(TOKEN),
        r#"{"addr": "x@dest.test", "reason": "asked us to stop"}"#,
    );
    assert_eq!(code, 200, "{v}");
    let (code, v) = get("/api/v1/suppressions/x@dest.test");
    assert_eq!(code, 200);
    assert_eq!(v["entry"]["reason"], "asked us to stop");
    assert_eq!(
        get("/api/v1/suppressions").1["entries"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        call(&api, "POST", "/api/v1/suppressions", Some(TOKEN), "{nope").0,
        400
    );
    assert_eq!(
        call(
            &api,
            "POST",
            "/api/v1/suppressions",
            Some(TOKEN),
            r#"{"addr": "not-an-address"}"#
        )
        .0,
        400
    );
    assert_eq!(
        call(
            &api,
            "DELETE",
            "/api/v1/suppressions/x@dest.test",
            Some(TOKEN),
            ""
        )
        .0,
        200
    );
    assert_eq!(get("/api/v1/suppressions/x@dest.test").0, 404);
    assert_eq!(
        call(
            &api,
            "DELETE",
            "/api/v1/suppressions/x@dest.test",
            Some(TOKEN),
            ""
        )
        .0,
        404
    );

    // Unknown route: JSON 404.
    let (code, v) = get("/api/v1/nothing-here");
    assert_eq!(code, 404);
    assert!(v["error"].as_str().unwrap().contains("no such route"));
    assert_eq!(sink.count(), 0, "paused throughout");
}

#[test]
fn every_route_of_the_openapi_document_answers() {
    let (_h, api, _sink) = start();
    let (code, doc) = call(&api, "GET", "/api/v1/openapi.json", None, "");
    assert_eq!(code, 200);
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 9);
    let mut n = 0;
    for (path, item) in paths {
        let item = item.as_object().unwrap();
        // Fill path parameters with their examples.
        let mut url = path.clone();
        let mut query = Vec::new();
        let mut params: Vec<Value> = item
            .get("parameters")
            .and_then(|p| p.as_array().cloned())
            .unwrap_or_default();
        for (method, op) in item {
            if method == "parameters" {
                continue;
            }
            let mut all = params.clone();
            all.extend(op["parameters"].as_array().cloned().unwrap_or_default());
            for p in &all {
                let ex = p["example"].as_str().unwrap_or("x");
                let name = p["name"].as_str().unwrap();
                match p["in"].as_str() {
                    Some("path") => url = url.replace(&format!("{{{name}}}"), ex),
                    Some("query") if p["required"] == true => query.push(format!("{name}={ex}")),
                    _ => {}
                }
            }
            let full = if query.is_empty() {
                url.clone()
            } else {
                format!("{url}?{}", query.join("&"))
            };
            let body = op["requestBody"]["content"]["application/json"]["example"].to_string();
            let body = if body == "null" { String::new() } else { body };
            let (code, v) = call(&api, &method.to_uppercase(), &full, Some(TOKEN), &body);
            assert!(v.is_object() && code != 405, "{method} {full}: {code} {v}");
            assert!(
                !v["error"].as_str().unwrap_or("").contains("no such route"),
                "{method} {full} is in the document but not served: {v}"
            );
            n += 1;
        }
        params.clear();
    }
    assert!(n >= 12, "{n} operations");
}

#[test]
fn a_reload_reads_the_tokens_file_again() {
    let (h, api, _sink) = start();
    let status = |t: &str| call(&api, "GET", "/api/v1/status", Some(t), "").0;
    assert_eq!(status(TOKEN), 200);
    let next = "rotated-console-token-4567";
    std::fs::write(h.path("api.tokens"), format!("{next}\n")).unwrap();
    assert!(h.ok(&["reload"]).contains("api.tokens_file"));
    assert_eq!(status(next), 200);
    assert_eq!(status(TOKEN), 401, "the removed token is refused");
    // A tokens file that is refused keeps the tokens in force.
    std::fs::write(h.path("api.tokens"), "short\n").unwrap();
    let (code, _, err) = h.cli(&["reload"]);
    assert_eq!(code, 1);
    assert!(err.contains("api.tokens_file: line 1"), "{err}");
    assert_eq!(status(next), 200);
}

#[test]
fn identifiers_from_a_request_never_reach_a_path() {
    let (h, api, _sink) = start();
    // A FIFO beside the config: opening it would hang a thread.
    let fifo = h.path("fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    for id in [
        "%2Fdev%2Fzero",
        "%2Fetc%2Fpasswd",
        "..%2F..%2Fherald.toml",
        "..%2Ffifo",
        "..",
        "01JH5Z8Q3M7K%2F..",
        "%00",
    ] {
        for (method, path) in [
            ("GET", format!("/api/v1/messages/{id}")),
            ("DELETE", format!("/api/v1/messages/{id}")),
            ("POST", format!("/api/v1/messages/{id}/retry")),
        ] {
            let (code, v) = call(&api, method, &path, Some(TOKEN), "");
            assert!(code == 400 || code == 404, "{method} {path}: {code} {v}");
            if code == 400 {
                assert!(
                    v["error"]
                        .as_str()
                        .unwrap()
                        .contains("is not a queue or report id"),
                    "{v}"
                );
            }
        }
    }
    // An id of the right form that names nothing is a 404.
    let (code, _) = call(
        &api,
        "GET",
        "/api/v1/messages/01JH5Z8Q3M7K",
        Some(TOKEN),
        "",
    );
    assert_eq!(code, 404);
    // The control socket checks the same way.
    let (code, _, err) = h.cli(&["show", "/etc/passwd"]);
    assert_ne!(code, 0);
    assert!(err.contains("is not a queue or report id"), "{err}");
    let (code, _, err) = h.cli(&["cancel", "../../herald.toml"]);
    assert_ne!(code, 0);
    assert!(err.contains("is not a queue or report id"), "{err}");
    // herald is still fine (nothing read /dev/zero or hung on the FIFO).
    let (code, v) = call(&api, "GET", "/api/v1/status", Some(TOKEN), "");
    assert_eq!(code, 200, "{v}");
    // An operator's address must be one.
    for addr in ["   @   ", "@", "nobody@", "@dest.test", "a b@dest.test"] {
        let body = serde_json::json!({ "addr": addr }).to_string();
        let (code, v) = call(&api, "POST", "/api/v1/suppressions", Some(TOKEN), &body);
        assert_eq!(code, 400, "{addr:?}: {v}");
        assert!(
            v["error"].as_str().unwrap().contains("is not an address"),
            "{v}"
        );
    }
    let (_, v) = call(&api, "GET", "/api/v1/suppressions", Some(TOKEN), "");
    assert_eq!(v["entries"].as_array().unwrap().len(), 0, "{v}");
}

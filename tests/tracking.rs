//! Open tracking end to end: the pixel is in the HTML that arrives, fetching
//! it records `opened`, and `X-Herald-Track: no` leaves the message alone.

mod common;

use common::*;

const HTML: &str = "From: Claire <claire@customer.test>\nTo: louise@dest.test\nSubject: Your file\nX-Herald-Tag: file-7\nMIME-Version: 1.0\nContent-Type: multipart/alternative; boundary=\"zz\"\n\n--zz\nContent-Type: text/plain; charset=utf-8\n\nYour file is ready.\n--zz\nContent-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: quoted-printable\n\n<html><body><p style=3D\"color:red\">Your file is ready.</p></body></html>\n--zz--\n";

#[test]
fn pixel_is_injected_and_its_fetch_records_opened() {
    let sink = Sink::start(Script::default());
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tracking.key"), [7u8; 32]).unwrap();
    let h = Herald::start_in(
        dir,
        &format!(
            "[tracking]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\nbase_url = \"http://127.0.0.1:{port}/\"\nsecret_file = \"tracking.key\"\n{}",
            upstream(sink.port(), "none", "")
        ),
    );
    let mut c = h.client();
    c.ehlo();
    let (code, reply) = c.send("app@platform.test", &["louise@dest.test"], HTML);
    assert_eq!(code, 250);
    let id = queue_id(&reply);
    let untracked = HTML.replace("X-Herald-Tag: file-7", "X-Herald-Track: no");
    assert_eq!(
        c.send("app@platform.test", &["paul@dest.test"], &untracked)
            .0,
        250
    );
    let msgs = sink.wait_for(2, 10);
    assert_eq!(msgs.len(), 2);

    let tracked = msgs
        .iter()
        .find(|m| m.rcpts[0] == "louise@dest.test")
        .unwrap();
    let parsed = mail_parser::MessageParser::default()
        .parse(&tracked.data)
        .unwrap();
    let html = parsed.body_html(0).unwrap().into_owned();
    let prefix = format!("<img src=\"http://127.0.0.1:{port}/o/{id}.");
    let at = html.find(&prefix).unwrap_or_else(|| panic!("{html}"));
    assert!(
        html[at..].contains("\">\r\n</body>"),
        "before </body>: {html}"
    );
    assert_eq!(parsed.body_text(0).unwrap().trim(), "Your file is ready.");
    let url = html[at + 10..].split('"').next().unwrap().to_string();

    let other = msgs
        .iter()
        .find(|m| m.rcpts[0] == "paul@dest.test")
        .unwrap();
    assert!(!other.text().contains("/o/"), "X-Herald-Track: no");
    assert!(
        !other.text().contains("X-Herald-Track"),
        "control header removed"
    );

    let path = url.split_once(&port.to_string()).unwrap().1.to_string();
    let addr = format!("127.0.0.1:{port}");
    let (code, body) = http_get(&addr, &path);
    assert_eq!(code, 200);
    assert!(body.starts_with(b"GIF89a"));
    let (code, _) = http_get(&addr, &path);
    assert_eq!(code, 200, "a reload gets the pixel but is not a new open");
    let (code, _) = http_get(&addr, &path.replace(&id, "M00000000000"));
    assert_eq!(code, 404, "a forged token records nothing");

    let (code, out, err) = h.cli(&["trace", "louise@dest.test"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("opened") && out.contains("test-mua"), "{out}");
    assert!(
        out.contains("diagnosis: delivered") && out.contains("; opened"),
        "{out}"
    );
    let (_, out, _) = h.cli(&["history", "--tag", "file-7", "--json"]);
    assert!(
        out.lines().any(|l| l.contains("\"event\":\"opened\"")),
        "{out}"
    );
    let (_, out, _) = h.cli(&["trace", "paul@dest.test"]);
    assert!(!out.contains("opened"), "{out}");
}

#[test]
fn tracking_needs_a_readable_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("short.key"), "abc").unwrap();
    let err = serve_fails(
        dir.path(),
        &format!(
            "{BASE}[listen]\nsmtp = [\"127.0.0.1:{}\"]\n[tracking]\nenabled = true\nlisten = \"127.0.0.1:{}\"\nbase_url = \"https://t.example\"\nsecret_file = \"short.key\"\n",
            free_port(),
            free_port()
        ),
    );
    assert!(err.contains("tracking.secret_file"), "{err}");
}

#[test]
fn a_reloaded_secret_signs_new_pixels_and_old_ones_still_count() {
    let sink = Sink::start(Script::default());
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tracking.key"), [7u8; 32]).unwrap();
    std::fs::write(dir.path().join("tracking2.key"), [9u8; 32]).unwrap();
    let h = Herald::start_in(
        dir,
        &format!(
            "[tracking]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\nbase_url = \"http://127.0.0.1:{port}/\"\nsecret_file = \"tracking.key\"\n{}",
            upstream(sink.port(), "none", "")
        ),
    );
    let addr = format!("127.0.0.1:{port}");
    let pixel = |rcpt: &str| {
        let mut c = h.client();
        c.ehlo();
        assert_eq!(c.send("app@platform.test", &[rcpt], HTML).0, 250);
        assert!(wait_until(10, || sink
            .messages()
            .iter()
            .any(|m| m.rcpts[0] == rcpt)));
        let m = sink
            .messages()
            .into_iter()
            .find(|m| m.rcpts[0] == rcpt)
            .unwrap();
        let html = mail_parser::MessageParser::default()
            .parse(&m.data)
            .unwrap()
            .body_html(0)
            .unwrap()
            .into_owned();
        let at = html.find("/o/").unwrap_or_else(|| panic!("{html}"));
        html[at..].split('"').next().unwrap().to_string()
    };
    let old = pixel("before@dest.test");
    let text = std::fs::read_to_string(&h.config).unwrap();
    std::fs::write(&h.config, text.replace("tracking.key", "tracking2.key")).unwrap();
    assert!(h.ok(&["reload"]).contains("tracking"));
    let new = pixel("after@dest.test");
    assert_ne!(
        old.rsplit('.').nth(1),
        new.rsplit('.').nth(1),
        "new key, new token"
    );
    assert_eq!(http_get(&addr, &new).0, 200);
    assert_eq!(http_get(&addr, &old).0, 200, "signed with the previous key");
    assert!(wait_until(10, || h.has_event("before@dest.test", "opened")
        && h.has_event("after@dest.test", "opened")));
}

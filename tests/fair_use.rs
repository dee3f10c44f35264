//! Fair use of slots: no client holds connections it does not use. SMTP
//! writes time out, one address gets `max_connections_per_ip`, a session
//! that completes no transaction ends after `session_timeout`; every HTTP
//! listener caps its connections and times out slow headers; the control
//! socket caps a request line and is 0660 from the start; X-Forwarded-For
//! is believed only from `[tracking] trusted_proxies`.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

#[test]
fn one_address_gets_max_connections_per_ip_then_421() {
    // 127.0.0.2 is a stranger here: only 127.0.0.1 is the platform.
    let h = Herald::start(
        "[listen]\nsmtp = [\"{smtp}\"]\nmax_connections_per_ip = 3\nallowed_networks = [\"127.0.0.1/32\"]\n",
    );
    let held: Vec<Client> = (0..3)
        .map(|_| Client::over(connect_from("127.0.0.2", h.smtp)))
        .collect();
    let mut extra = connect_from("127.0.0.2", h.smtp);
    extra
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut got = String::new();
    extra.read_to_string(&mut got).unwrap();
    assert!(
        got.starts_with("421 4.7.0") && got.contains("from your address"),
        "{got}"
    );
    drop(held);
    // A freed slot serves the address again.
    assert!(wait_until(10, || {
        let mut s = connect_from("127.0.0.2", h.smtp);
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 3];
        s.read_exact(&mut b).is_ok() && &b == b"220"
    }));
    assert!(h.log().contains("listen.max_connections_per_ip"));
}

#[test]
fn the_platform_in_allowed_networks_is_not_held_to_max_connections_per_ip() {
    // 50 PHP workers on one host: one address, many sessions at once.
    let sink = Sink::start(Script::default());
    let h = Herald::start(&format!(
        "[listen]\nsmtp = [\"{{smtp}}\"]\nmax_connections_per_ip = 3\nmax_connections = 40\n{}",
        upstream(sink.port(), "none", "")
    ));
    let mut held: Vec<Client> = (0..30).map(|_| h.client()).collect();
    for (i, c) in held.iter_mut().enumerate() {
        c.ehlo();
        let (code, text) = c.send(
            "app@platform.test",
            &[&format!("u{i}@dest.test")],
            &message("w"),
        );
        assert_eq!(code, 250, "session {i}: {text}");
    }
    assert_eq!(sink.wait_for(30, 30).len(), 30);
    // max_connections still holds everyone.
    let more: Vec<Client> = (0..10).map(|_| h.client()).collect();
    let mut over = TcpStream::connect(h.smtp).unwrap();
    over.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut got = String::new();
    over.read_to_string(&mut got).unwrap();
    assert!(
        got.starts_with("421 4.7.0") && got.contains("Too many connections"),
        "{got}"
    );
    drop(more);
    drop(held);
}

#[test]
fn a_session_without_a_completed_transaction_ends_after_session_timeout() {
    let sink = Sink::start(Script::default());
    let h = Herald::start(&format!(
        "[listen]\nsmtp = [\"{{smtp}}\"]\nsession_timeout = \"4s\"\n{}",
        upstream(sink.port(), "none", "")
    ));
    // A line now and then keeps a session from the idle timeout, not from
    // this one.
    let start = Instant::now();
    let mut c = h.client();
    c.ehlo();
    let (code, text) = loop {
        let (code, text) = c.cmd("NOOP");
        if code != 250 || start.elapsed() > Duration::from_secs(60) {
            break (code, text);
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(code, 421, "{text}");
    assert!(
        text.contains("4.4.2") && text.contains("No transaction"),
        "{text}"
    );
    assert!(start.elapsed() >= Duration::from_millis(3500));
    assert_eq!(c.read_reply().0, 0, "closed");

    // A completed transaction starts the clock again.
    let mut c = h.client();
    c.ehlo();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        c.send("app@platform.test", &["a@dest.test"], &message("x"))
            .0,
        250
    );
    let accepted = Instant::now();
    let code = loop {
        let (code, _) = c.cmd("NOOP");
        if code != 250 || accepted.elapsed() > Duration::from_secs(60) {
            break code;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(code, 421);
    assert!(accepted.elapsed() >= Duration::from_millis(3500));
}

#[test]
fn a_client_that_never_reads_its_replies_is_cut_off() {
    let h = Herald::start("");
    let tcp = TcpStream::connect(h.smtp).unwrap();
    let writer = tcp.try_clone().unwrap();
    let start = Instant::now();
    // 16 MB of NOOP, replies never read: more than any socket buffers hold.
    let done = std::thread::spawn(move || {
        let mut w = writer;
        let chunk = b"NOOP\r\n".repeat(10_000);
        for _ in 0..270 {
            if w.write_all(&chunk).is_err() {
                return true;
            }
        }
        // Everything fit in buffers: wait for herald to give up on us.
        for _ in 0..600 {
            std::thread::sleep(Duration::from_millis(200));
            if w.write_all(b"NOOP\r\n").is_err() {
                return true;
            }
        }
        false
    });
    assert!(wait_until(120, || done.is_finished()));
    assert!(done.join().unwrap(), "herald kept the connection");
    let secs = start.elapsed().as_secs();
    assert!((25..120).contains(&secs), "{secs} s");
    let _ = tcp.shutdown(std::net::Shutdown::Both);
    // Others are served meanwhile and after.
    h.client().ehlo();
}

/// True once the peer closed `s` (a read timeout set on it means "still open").
fn closed_by_peer(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 256];
    match s.read(&mut b) {
        // EOF, or an answer (hyper may say 408) before it closes.
        Ok(n) => n <= b.len(),
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// Connections to `addr` that send nothing.
fn idle(addr: &str, n: usize) -> Vec<TcpStream> {
    (0..n).map(|_| TcpStream::connect(addr).unwrap()).collect()
}

#[test]
fn http_listeners_cap_connections_and_time_out_slow_headers() {
    let port = free_port();
    let h = Herald::start(&format!(
        "[control]\nmetrics_listen = \"127.0.0.1:{port}\"\n"
    ));
    let addr = format!("127.0.0.1:{port}");
    assert!(wait_until(10, || TcpStream::connect(&addr).is_ok()));
    assert_eq!(http_get(&addr, "/healthz").0, 200);

    let held = idle(&addr, 256);
    let (code, body) = http_get(&addr, "/healthz");
    assert_eq!(code, 503, "{}", String::from_utf8_lossy(&body));
    // SMTP still accepts (file descriptors are not exhausted).
    h.client().ehlo();
    drop(held);
    assert!(wait_until(10, || http_get(&addr, "/healthz").0 == 200));

    // A header sent a byte at a time is cut off, like an idle connection.
    let start = Instant::now();
    let mut slow = TcpStream::connect(&addr).unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut quiet = TcpStream::connect(&addr).unwrap();
    let closed = wait_until(60, || {
        let _ = slow.write_all(b"X");
        closed_by_peer(&mut slow)
    });
    assert!(closed, "slow header kept open");
    let secs = start.elapsed().as_secs();
    assert!((8..60).contains(&secs), "{secs} s");
    quiet
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut rest = Vec::new();
    let _ = quiet.read_to_end(&mut rest);
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "idle connection kept"
    );
}

#[test]
fn tracking_listener_caps_connections_too() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tracking.key"), [7u8; 32]).unwrap();
    let _h = Herald::start_in(
        dir,
        &format!("[tracking]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\nbase_url = \"http://t.test/\"\nsecret_file = \"tracking.key\"\n"),
    );
    let addr = format!("127.0.0.1:{port}");
    assert!(wait_until(10, || http_get(&addr, "/o/x.gif").0 == 404));
    let held = idle(&addr, 256);
    assert_eq!(http_get(&addr, "/o/x.gif").0, 503);
    drop(held);
    assert!(wait_until(10, || http_get(&addr, "/o/x.gif").0 == 404));
}

/// Sends a tracked message through a herald with `trusted` as
/// `trusted_proxies`, fetches its pixel with an X-Forwarded-For header and
/// returns what `trace` says.
fn open_with_forwarded_for(trusted: &str) -> String {
    let sink = Sink::start(Script::default());
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tracking.key"), [7u8; 32]).unwrap();
    let h = Herald::start_in(
        dir,
        &format!(
            "[tracking]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\nbase_url = \"http://127.0.0.1:{port}/\"\nsecret_file = \"tracking.key\"\ntrusted_proxies = [{trusted}]\n{}",
            upstream(sink.port(), "none", "")
        ),
    );
    let html = "Subject: t\r\nMIME-Version: 1.0\r\nContent-Type: text/html\r\n\r\n<html><body>hi</body></html>\r\n";
    let mut c = h.client();
    c.ehlo();
    assert_eq!(c.send("app@platform.test", &["u@dest.test"], html).0, 250);
    let m = sink.wait_for(1, 10);
    let text = m[0].text();
    let at = text.find("/o/").expect("pixel");
    let path: String = text[at..].chars().take_while(|&c| c != '"').collect();
    let mut s = TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.7, 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    assert!(raw.starts_with(b"HTTP/1.1 200"));
    let mut out = String::new();
    wait_until(10, || {
        out = h.cli(&["trace", "u@dest.test"]).1;
        out.contains("pixel fetched")
    });
    out
}

#[test]
fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let out = open_with_forwarded_for("");
    assert!(out.contains("pixel fetched from 127.0.0.1"), "{out}");
    assert!(!out.contains("203.0.113.7"), "{out}");
    let out = open_with_forwarded_for("\"127.0.0.0/8\"");
    assert!(out.contains("pixel fetched from 203.0.113.7"), "{out}");
}

#[test]
fn control_socket_is_0660_and_caps_a_request_line() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;
    let h = Herald::start("");
    let sock = h.path("data/herald.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660, "{mode:o}");
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let writer = {
        let mut w = s.try_clone().unwrap();
        std::thread::spawn(move || {
            let big = vec![b'x'; 4 << 20];
            let _ = w.write_all(&big);
            let _ = w.write_all(b"\n");
        })
    };
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(
        answer.contains("\"ok\":false") && answer.contains("longer than 1048576"),
        "{answer}"
    );
    let _ = writer.join();
    let (code, out, err) = h.cli(&["status"]);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn check_config_names_the_new_keys() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (extra, key) in [
        (
            "[listen]\nmax_connections_per_ip = 0\n",
            "listen.max_connections_per_ip",
        ),
        (
            "[listen]\nsession_timeout = \"0s\"\n",
            "listen.session_timeout",
        ),
        (
            "[listen]\nsession_timeout = \"soon\"\n",
            "listen.session_timeout",
        ),
        (
            "[tracking]\ntrusted_proxies = [\"proxy\"]\n",
            "tracking.trusted_proxies",
        ),
    ] {
        let path = d.join("herald.toml");
        std::fs::write(&path, format!("{BASE}{extra}")).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{extra}");
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(key), "{extra}: {text}");
    }
}

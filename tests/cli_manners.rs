//! CLI manners: a listing into a closed pipe exits quietly, `queue` says
//! "paused" while delivery is paused, durations read "7 days", and a client
//! that refuses the `[listen] tls` certificate leaves a log line that says
//! what to do.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

#[test]
fn history_into_a_closed_pipe_exits_quietly() {
    let h = Herald::start("");
    let mut c = h.client();
    c.ehlo();
    assert_eq!(
        c.send("a@b.test", &["x@dest.test"], &message("pipe")).0,
        250
    );
    // `herald history | head -0`: the reader is gone before herald writes.
    let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["history", "--config"])
        .arg(&h.config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.is_empty(), "{err}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}", out.status);
}

#[test]
fn queue_says_paused_and_durations_have_a_space() {
    // Nothing listens upstream: the message stays queued.
    let h = Herald::start(&upstream(free_port(), "none", ""));
    assert_eq!(h.cli(&["pause"]).0, 0);
    let mut c = h.client();
    c.ehlo();
    assert_eq!(
        c.send("a@b.test", &["x@dest.test"], &message("held")).0,
        250
    );
    let (code, out, err) = h.cli(&["queue"]);
    assert_eq!(code, 0, "{err}");
    let row = out.lines().find(|l| l.contains("x@dest.test")).unwrap();
    assert!(row.contains(" paused "), "{out}");
    assert_eq!(
        row.matches("ago").count(),
        1,
        "only RECEIVED is a time: {out}"
    );
    assert!(out.contains("PAUSED"), "{out}");
    let (_, out, _) = h.cli(&["trace", "nobody@dest.test"]);
    assert!(out.contains("in the last 7 days"), "{out}");
}

/// herald with STARTTLS, and a connection to it that has just been told
/// "220" to STARTTLS.
fn at_starttls() -> (Herald, std::net::TcpStream) {
    let dir = tempfile::tempdir().unwrap();
    let _pki = Pki::new(dir.path());
    let h = Herald::start_in(
        dir,
        "[listen]\nsmtp = [\"{smtp}\"]\ntls = { cert = \"cert.pem\", key = \"key.pem\" }\n",
    );
    let mut tcp = std::net::TcpStream::connect(h.smtp).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut rd = BufReader::new(tcp.try_clone().unwrap());
    let mut line = String::new();
    rd.read_line(&mut line).unwrap();
    tcp.write_all(b"EHLO client.test\r\nSTARTTLS\r\n").unwrap();
    loop {
        line.clear();
        assert!(
            rd.read_line(&mut line).unwrap() > 0,
            "closed before STARTTLS was answered"
        );
        if line.starts_with("220") {
            break;
        }
    }
    (h, tcp)
}

/// A TLS client that trusts only the public CAs (here: none).
fn untrusting_client() -> rustls::ClientConnection {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    rustls::ClientConnection::new(std::sync::Arc::new(cfg), "localhost".try_into().unwrap())
        .unwrap()
}

#[test]
fn a_client_refusing_the_certificate_gets_a_hint_in_the_log() {
    let (h, mut tcp) = at_starttls();
    let mut conn = untrusting_client();
    assert!(conn.complete_io(&mut tcp).is_err());
    let _ = conn.complete_io(&mut tcp);
    assert!(
        wait_until(10, || h
            .log()
            .contains("does not trust the [listen] tls certificate")),
        "{}",
        h.log()
    );
}

#[test]
fn a_client_that_closes_in_the_handshake_gets_a_hint_in_the_log() {
    let (h, mut tcp) = at_starttls();
    // nodemailer's way of refusing a certificate: the hello, then it hangs
    // up without an alert.
    let mut conn = untrusting_client();
    conn.write_tls(&mut tcp).unwrap();
    tcp.shutdown(std::net::Shutdown::Both).unwrap();
    assert!(
        wait_until(10, || h.log().contains(
            "closed the connection in the middle of the TLS handshake"
        )),
        "{}",
        h.log()
    );
}

#[test]
fn status_shows_the_last_error_of_a_route_whose_host_refuses_connections() {
    // Nothing listens on the upstream's port: every attempt is refused.
    let port = free_port();
    let h = Herald::start(&upstream(port, "none", ""));
    let (_, out, _) = h.cli(&["status"]);
    assert!(out.contains("route up: no attempt yet"), "{out}");
    let mut c = h.client();
    c.ehlo();
    assert_eq!(
        c.send("a@b.test", &["x@dest.test"], &message("down")).0,
        250
    );
    let mut out = String::new();
    assert!(wait_until(15, || {
        out = h.cli(&["status"]).1;
        out.contains("last error")
    }));
    let line = out.lines().find(|l| l.starts_with("route up:")).unwrap();
    assert!(
        line.starts_with("route up: ok; last error") && line.contains("connect"),
        "a refused connection is shown but does not make the route unhealthy: {line}"
    );
    let (_, json, _) = h.cli(&["status", "--json"]);
    assert!(json.contains("\"last_error_ms\":"), "{json}");
}

#[test]
fn the_manual_pages_come_from_the_commands() {
    let (code, page) = run_herald(["man"]);
    assert_eq!(code, 0, "{page}");
    assert!(page.contains(".TH herald 8"), "{page}");
    for sub in ["serve", "trace", "reports", "suppression", "probe"] {
        assert!(
            page.contains(&format!("herald\\-{sub}(8)")),
            "{sub}: {page}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = run_herald(["man".as_ref(), dir.path().as_os_str()]);
    assert_eq!(code, 0, "{out}");
    let trace = std::fs::read_to_string(dir.path().join("herald-trace.8")).unwrap();
    assert!(trace.contains("diagnosis"), "{trace}");
    assert!(dir.path().join("herald-suppression-add.8").exists());
}

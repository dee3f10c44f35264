//! Running under systemd: readiness, status, watchdog, reloading and
//! stopping notifications arrive in order on a datagram socket given as
//! NOTIFY_SOCKET, as systemd would see them with Type=notify.

mod common;

use common::*;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn ready_status_watchdog_reloading_and_stopping_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let port = free_port();
    let cfg = dir.path().join("herald.toml");
    std::fs::write(
        &cfg,
        format!("{BASE}[listen]\nsmtp = [\"127.0.0.1:{port}\"]\n[delivery]\nupstream = \"mx\"\n"),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 4096];
    let mut recv = || -> String {
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = recv();
    assert!(first.contains("READY=1"), "{first:?}");
    assert!(first.contains("STATUS=0 queued"), "{first:?}");
    // Ready means listening.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    // Pings at half the watchdog interval.
    let start = Instant::now();
    let mut pings = 0;
    while pings < 2 {
        let m = recv();
        if m.contains("WATCHDOG=1") {
            pings += 1;
        }
        assert!(!m.contains("STOPPING"), "{m:?}");
    }
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    // SIGHUP reloads: RELOADING=1 (with the monotonic time systemd wants),
    // then READY=1 again.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGHUP);
    }
    let mut m = recv();
    while m.contains("WATCHDOG=1") && !m.contains("RELOADING") {
        m = recv();
    }
    assert!(m.contains("RELOADING=1"), "{m:?}");
    assert!(m.contains("MONOTONIC_USEC="), "{m:?}");
    let mut m = recv();
    while !m.contains("READY=1") {
        assert!(!m.contains("STOPPING"), "{m:?}");
        m = recv();
    }
    assert!(m.contains("STATUS=0 queued"), "{m:?}");
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let mut stopping = false;
    while !stopping {
        stopping = recv().contains("STOPPING=1");
    }
    let st = child.wait().unwrap();
    assert!(st.success(), "{st:?}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = dir.path().join("herald.toml");
    std::fs::write(
        &cfg,
        format!("{BASE}[listen]\nsmtp = [\"127.0.0.1:{port}\"]\n[delivery]\nupstream = \"mx\"\n"),
    )
    .unwrap();
    let log = dir.path().join("herald.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("HERALD_LOG_FORMAT", "json")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    assert!(wait_until(20, || std::net::TcpStream::connect((
        "127.0.0.1",
        port
    ))
    .is_ok()));
    assert!(wait_until(10, || std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("herald started")));
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    assert!(child.wait().unwrap().success());
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let started = lines
        .iter()
        .find(|l| l["message"] == "herald started")
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(started["level"], "INFO");
    assert_eq!(started["hostname"], "relay.test");
    assert!(started["timestamp"].is_string());
}

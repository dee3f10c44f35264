//! Storage faults for real: the spool on a small tmpfs that fills up, and a
//! record that does not decode. Nothing acknowledged is lost, nothing is
//! delivered in a loop, nothing hangs.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(Tmpfs(dir.to_path_buf()))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes a file until the filesystem is full.
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
}

fn subject_of(m: &Received) -> String {
    m.text()
        .lines()
        .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
        .unwrap_or_default()
}

const TOKEN: &str = "storage-test-token-0123456789";

fn api_post(addr: &str, path: &str, body: &str) -> (u16, String) {
    let (code, raw) = http(addr, "POST", path, Some(TOKEN), body);
    (code, String::from_utf8_lossy(&raw).into_owned())
}

fn health(addr: &str) -> u16 {
    http_get(addr, "/healthz").0
}

#[test]
fn a_full_disk_gets_451_loses_nothing_and_delivers_each_message_at_most_twice() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let _mnt = match Tmpfs::mount(&spool, "30m") {
        Ok(m) => m,
        Err(e) => {
            eprintln!("SKIPPED: cannot mount a tmpfs here (needs root): {e}");
            return;
        }
    };
    // The upstream is down at first: everything stays queued.
    let up_port = free_port();
    let mport = free_port();
    let maddr = format!("127.0.0.1:{mport}");
    let api = format!("127.0.0.1:{}", free_port());
    std::fs::write(dir.path().join("api.tokens"), format!("{TOKEN}\n")).unwrap();
    let mut h = Herald::start_in(
        dir,
        &format!(
            "[storage]\npath = \"{}\"\n[control]\nsocket = \"{{dir}}/herald.sock\"\nmetrics_listen = \"{maddr}\"\n[api]\nlisten = \"{api}\"\ntokens_file = \"api.tokens\"\n{}",
            spool.join("data").display(),
            upstream(up_port, "none", "")
        ),
    );
    assert_eq!(health(&maddr), 200);
    let body = format!("{}\r\n", "x".repeat(98)).repeat(200);
    let mut acked: Vec<String> = Vec::new();
    let send = |h: &Herald, n: usize, acked: &mut Vec<String>| -> (usize, usize) {
        let (mut ok, mut refused) = (0, 0);
        let mut c = h.client();
        c.ehlo();
        for _ in 0..n {
            let subject = format!("m{}", acked.len() + ok + refused);
            let start = Instant::now();
            let (code, text) = c.send(
                "a@b.test",
                &["x@dest.test"],
                &format!("Subject: {subject}\r\n\r\n{body}\r\n"),
            );
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "reply took {:?}",
                start.elapsed()
            );
            match code {
                250 => {
                    ok += 1;
                    acked.push(subject);
                }
                451 => {
                    assert!(text.contains("4.3.0"), "{text}");
                    refused += 1;
                }
                other => panic!("unexpected reply {other} {text}"),
            }
            c.cmd("RSET");
        }
        (ok, refused)
    };
    let (ok, _) = send(&h, 20, &mut acked);
    assert_eq!(ok, 20, "{}", h.log());

    // Fill the disk: new mail is refused with 451, never a hang, and
    // /healthz says so.
    fill(&spool.join("filler"));
    // The upstream comes back while the disk is full: deliveries whose new
    // state cannot be written must not be sent again in a loop.
    let sink = Sink::start_on(up_port, Script::default());
    let mut refused_total = 0;
    for _ in 0..10 {
        let (_, refused) = send(&h, 20, &mut acked);
        refused_total += refused;
        if refused_total > 0 && health(&maddr) == 503 {
            break;
        }
    }
    assert!(
        refused_total > 0,
        "a full disk must refuse mail\n{}",
        h.log()
    );
    assert!(
        wait_until(20, || health(&maddr) == 503),
        "healthz must be 503 while storage fails\n{}",
        h.log()
    );
    let (code, out, _) = h.cli(&["status"]);
    assert_eq!(code, 0);
    assert!(out.contains("storage: FAILED"), "{out}");
    // Once failed, every DATA gets 451 at once.
    let (ok, refused) = send(&h, 3, &mut acked);
    assert_eq!((ok, refused), (0, 3));
    // A change over the HTTP API cannot be stored: 503.
    let (code, body) = api_post(&api, "/api/v1/suppressions", r#"{"addr": "x@dest.test"}"#);
    assert_eq!(code, 503, "{body}");
    // A message too large to keep in memory cannot be spooled to the full
    // disk either: 451, and the log says where it failed.
    let mut c = h.client();
    c.ehlo();
    let big = format!(
        "Subject: big\r\n\r\n{}",
        format!("{}\r\n", "y".repeat(98)).repeat(30_000)
    );
    let (code, text) = c.send("a@b.test", &["x@dest.test"], &big);
    assert_eq!(code, 451, "{text}");
    assert!(h.log().contains("cannot spool the message"), "{}", h.log());
    drop(c);

    // Space again, the upstream back.
    std::fs::remove_file(spool.join("filler")).unwrap();
    // herald probes the disk and recovers by itself; if sled stays failed
    // a restart brings it back (nothing acknowledged is lost either way).
    // herald probes the disk; when sled keeps its I/O error (it does), herald
    // stops by itself with exit code 75 to reopen the database, and a
    // supervisor (systemd's Restart=on-failure) starts it again.
    if wait_until(15, || {
        health(&maddr) == 200 || h.log().contains("restarting herald")
    }) && health(&maddr) == 200
    {
        eprintln!("storage recovered by probe");
    } else {
        let st = h
            .wait_exit(60)
            .expect("herald stops itself to reopen the database");
        assert_eq!(st.code(), Some(75), "{}", h.log());
        h.spawn();
    }
    assert!(wait_until(20, || health(&maddr) == 200), "{}", h.log());
    let all_in = wait_until(60, || {
        let got: std::collections::HashSet<String> =
            sink.messages().iter().map(subject_of).collect();
        acked.iter().all(|s| got.contains(s))
    });
    let got: Vec<String> = sink.messages().iter().map(subject_of).collect();
    assert!(
        all_in,
        "acknowledged but not delivered: {:?}\n{}",
        acked
            .iter()
            .filter(|s| !got.contains(s))
            .collect::<Vec<_>>(),
        h.log()
    );
    for s in &acked {
        let n = got.iter().filter(|g| *g == s).count();
        assert!(n <= 2, "{s} delivered {n} times\n{}", h.log());
    }
    // New mail works again.
    let (ok, _) = send(&h, 1, &mut acked);
    assert_eq!(ok, 1, "{}", h.log());
    let start = Instant::now();
    let st = h.terminate().expect("herald must stop on SIGTERM");
    assert!(st.success(), "{st:?}");
    assert!(start.elapsed() < Duration::from_secs(40));
}

#[test]
fn a_record_that_does_not_decode_is_quarantined_and_the_rest_of_the_queue_works() {
    let mut h = Herald::start("[delivery]\nupstream = \"up\"\n[upstreams.up]\nhost = \"127.0.0.1\"\nport = 9\nsecurity = \"none\"\n");
    let (code, _, _) = h.cli(&["pause"]);
    assert_eq!(code, 0);
    let mut c = h.client();
    c.ehlo();
    let (code, reply) = c.send("a@b.test", &["x@dest.test"], &message("good"));
    assert_eq!(code, 250);
    let good = queue_id(&reply);
    drop(c);
    assert!(h.terminate().unwrap().success());

    // Garbage in the spool of the stopped daemon.
    {
        let db = sled::open(h.path("data")).unwrap();
        let env = db.open_tree("envelopes").unwrap();
        env.insert("BADREC0RD001", &b"{not json"[..]).unwrap();
        db.open_tree("bodies")
            .unwrap()
            .insert("BADREC0RD001", &b"Subject: x\r\n\r\nx\r\n"[..])
            .unwrap();
        db.flush().unwrap();
    }
    h.spawn();
    assert!(
        wait_until(10, || h.log().contains("moved to quarantine")),
        "{}",
        h.log()
    );
    let (code, out, err) = h.cli(&["queue"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&good), "{out}");
    assert!(
        out.contains("quarantined") && out.contains("BADREC0RD001"),
        "{out}"
    );
    let (code, out, _) = h.cli(&["queue", "--json"]);
    assert_eq!(code, 0);
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        lines.iter().any(|l| l["quarantined"] == "BADREC0RD001"),
        "{out}"
    );
    let (code, out, _) = h.cli(&["status"]);
    assert_eq!(code, 0);
    assert!(out.contains("queue: 1 message"), "{out}");
    let (code, out, err) = h.cli(&["retry", "--all"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = h.cli(&["cancel", "BADREC0RD001"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("removed quarantined record BADREC0RD001"),
        "{out}"
    );
    let (_, out, _) = h.cli(&["queue"]);
    assert!(!out.contains("BADREC0RD001"), "{out}");
    // The good message still goes out once the upstream is there.
    let (code, out, err) = h.cli(&["cancel", &good]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("cancelled"), "{out}");
}

#[test]
fn a_body_missing_from_the_spool_gives_expired_with_the_reason() {
    let mut h = Herald::start("[delivery]\nupstream = \"up\"\n[upstreams.up]\nhost = \"127.0.0.1\"\nport = 9\nsecurity = \"none\"\n");
    let (code, _, _) = h.cli(&["pause"]);
    assert_eq!(code, 0);
    let mut c = h.client();
    c.ehlo();
    let (code, reply) = c.send("a@b.test", &["lost@dest.test"], &message("lost body"));
    assert_eq!(code, 250);
    let id = queue_id(&reply);
    drop(c);
    assert!(h.terminate().unwrap().success());
    // Storage damage: every byte of the body gone, the envelope kept.
    {
        let db = sled::open(h.path("data")).unwrap();
        let bodies = db.open_tree("bodies").unwrap();
        let keys: Vec<_> = bodies
            .scan_prefix(id.as_bytes())
            .keys()
            .map(|k| k.unwrap())
            .collect();
        assert!(!keys.is_empty());
        for k in keys {
            bodies.remove(k).unwrap();
        }
        db.flush().unwrap();
    }
    h.spawn();
    let (code, _, _) = h.cli(&["resume"]);
    assert_eq!(code, 0);
    assert!(
        wait_until(10, || h
            .cli(&["trace", "lost@dest.test"])
            .1
            .contains("expired")),
        "{}",
        h.log()
    );
    let (_, t, _) = h.cli(&["trace", "lost@dest.test"]);
    assert!(t.contains("body is missing"), "{t}");
    let (_, q, _) = h.cli(&["queue"]);
    assert!(!q.contains(&id), "{q}");
}

#[test]
fn a_suppression_entry_that_cannot_be_read_never_sends() {
    let sink = Sink::start(Script::default());
    let mut h = Herald::start(&upstream(sink.port(), "none", ""));
    assert!(h.terminate().unwrap().success());
    // An entry for ann that does not decode, in the stopped daemon's list.
    {
        let db = sled::open(h.path("data")).unwrap();
        db.open_tree("suppression")
            .unwrap()
            .insert("ann@dest.test", &b"{not json"[..])
            .unwrap();
        db.flush().unwrap();
    }
    h.spawn();
    let mut c = h.client();
    c.ehlo();
    let (code, reply) = c.send(
        "a@b.test",
        &["ann@dest.test", "bob@dest.test"],
        &message("is ann suppressed?"),
    );
    assert_eq!(code, 250, "{reply}");
    let id = queue_id(&reply);
    // bob goes out; ann waits, and says why.
    assert!(wait_until(20, || h.has_event("bob@dest.test", "delivered")));
    assert!(
        wait_until(20, || h.events("ann@dest.test").iter().any(|e| e["event"]
            == "deferred"
            && e["detail"]
                .as_str()
                .unwrap_or("")
                .contains("the suppression list cannot be read"))),
        "{:?}\n{}",
        h.events("ann@dest.test"),
        h.log()
    );
    assert!(sink
        .messages()
        .iter()
        .all(|m| !m.rcpts.iter().any(|r| r == "ann@dest.test")));
    assert_eq!(
        h.log()
            .matches("the suppression list cannot be read: mail to such addresses is deferred")
            .count(),
        1,
        "{}",
        h.log()
    );
    // The operator removes the broken entry: ann goes out on the retry.
    h.ok(&["suppression", "remove", "ann@dest.test"]);
    h.ok(&["retry", &id]);
    let got = sink.wait_for(2, 20);
    assert!(
        got.iter().any(|m| m.rcpts == ["ann@dest.test"]),
        "{}",
        h.log()
    );
    assert!(h.log().contains("the suppression list can be read again"));
}

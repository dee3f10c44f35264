//! PROXY protocol (issue 12): connections from `[listen]
//! proxy_protocol_from` begin with a v1 or v2 header, and the client it
//! names is the client for `allowed_networks`, the per-IP slots, logs,
//! `Received:` and history. A listed balancer that sends no header, or a
//! bad one, is closed without a greeting; anyone else who sends one is an
//! SMTP client with a strange first line, and keeps its own address.
//!
//! Here 127.0.0.1 is the balancer and 127.0.0.2 an ordinary client; the
//! headers name 192.0.2.0/24 and 2001:db8:1::/48 (allowed to relay) or
//! 203.0.113.9 (not).

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

const LISTEN: &str = "allowed_networks = [\"127.0.0.0/8\", \"192.0.2.0/24\", \"2001:db8:1::/48\"]\nproxy_protocol_from = [\"127.0.0.1/32\"]\n";

/// A herald behind a balancer at 127.0.0.1, relaying to `sink`; `extra`
/// goes into `[listen]`.
fn behind_balancer(sink: &Sink, extra: &str) -> Herald {
    Herald::start(&format!(
        "[listen]\nsmtp = [\"{{smtp}}\"]\n{LISTEN}{extra}\n{}",
        upstream(sink.port(), "none", "")
    ))
}

fn v1(client: &str, port: u16) -> Vec<u8> {
    let family = if client.contains(':') { "TCP6" } else { "TCP4" };
    let server = if client.contains(':') {
        "2001:db8::25"
    } else {
        "10.0.0.25"
    };
    format!("PROXY {family} {client} {server} {port} 25\r\n").into_bytes()
}

const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// A v2 PROXY header as HAProxy sends it (TCP over IPv4 or IPv6).
fn v2(client: SocketAddr) -> Vec<u8> {
    let mut h = V2_SIGNATURE.to_vec();
    h.push(0x21); // version 2, PROXY
    let mut addrs = Vec::new();
    match client {
        SocketAddr::V4(c) => {
            h.push(0x11); // AF_INET, STREAM
            addrs.extend_from_slice(&c.ip().octets());
            addrs.extend_from_slice(&[10, 0, 0, 25]);
        }
        SocketAddr::V6(c) => {
            h.push(0x21); // AF_INET6, STREAM
            addrs.extend_from_slice(&c.ip().octets());
            addrs.extend_from_slice(
                &"2001:db8::25"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .octets(),
            );
        }
    }
    addrs.extend_from_slice(&client.port().to_be_bytes());
    addrs.extend_from_slice(&25u16.to_be_bytes());
    h.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
    h.extend_from_slice(&addrs);
    h
}

/// Connects as the balancer and sends `header` (in pieces, one write
/// each), then expects the greeting.
fn via_balancer(h: &Herald, pieces: &[&[u8]]) -> Client {
    let mut tcp = TcpStream::connect(h.smtp).unwrap();
    tcp.set_nodelay(true).unwrap();
    for (i, p) in pieces.iter().enumerate() {
        if i > 0 {
            // Let the first piece arrive on its own.
            std::thread::sleep(Duration::from_millis(100));
        }
        tcp.write_all(p).unwrap();
    }
    Client::over(tcp)
}

/// Sends `bytes` on `tcp` and expects herald to close it without a word.
fn closed_without_greeting(mut tcp: TcpStream, bytes: &[u8]) {
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    tcp.write_all(bytes).unwrap();
    let mut got = Vec::new();
    match tcp.read_to_end(&mut got) {
        Ok(_) => {}
        // Closing with the client's bytes unread is a reset on Linux.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("not closed: {e}"),
    }
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
}

fn received_detail(h: &Herald, rcpt: &str) -> String {
    let events = h.events(rcpt);
    let r = events
        .iter()
        .find(|e| e["event"] == "received")
        .unwrap_or_else(|| panic!("{events:?}"));
    r["detail"].as_str().unwrap().to_string()
}

#[test]
fn v1_and_v2_headers_name_the_client_for_relay_received_and_history() {
    let sink = Sink::start(Script::default());
    let h = behind_balancer(&sink, "");
    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("v1-tcp4@dest.test", v1("192.0.2.7", 40001), "192.0.2.7"),
        (
            "v1-tcp6@dest.test",
            v1("2001:db8:1::7", 40002),
            "2001:db8:1::7",
        ),
        (
            "v2-ipv4@dest.test",
            v2("192.0.2.8:40003".parse().unwrap()),
            "192.0.2.8",
        ),
        (
            "v2-ipv6@dest.test",
            v2("[2001:db8:1::8]:40004".parse().unwrap()),
            "2001:db8:1::8",
        ),
    ];
    for (rcpt, header, ip) in &cases {
        let mut c = via_balancer(&h, &[header]);
        c.ehlo();
        let (code, text) = c.send("app@platform.test", &[rcpt], &message(rcpt));
        assert_eq!(code, 250, "{rcpt}: {text}");
        let id = queue_id(&text);
        let show = json_lines(&h.ok(&["show", &id, "--json"]));
        let client_ip = &show[0]["queued"]["client_ip"];
        // Null once delivered; then history below has it.
        if !client_ip.is_null() {
            assert_eq!(client_ip, ip, "{rcpt}");
        }
        c.cmd("QUIT");
    }
    let msgs = sink.wait_for(4, 20);
    assert_eq!(msgs.len(), 4, "{}", h.log());
    for (rcpt, _, ip) in &cases {
        let m = msgs
            .iter()
            .find(|m| m.rcpts == vec![rcpt.to_string()])
            .unwrap();
        assert!(
            m.text()
                .starts_with(&format!("Received: from client.test ({ip})\r\n")),
            "{rcpt}: {}",
            m.text()
        );
        let detail = received_detail(&h, rcpt);
        assert!(detail.contains(&format!("via {ip} ")), "{rcpt}: {detail}");
    }
}

#[test]
fn a_header_naming_a_client_outside_allowed_networks_is_refused_relay() {
    let sink = Sink::start(Script::default());
    let h = behind_balancer(&sink, "");
    for header in [
        v1("203.0.113.9", 40000),
        v2("203.0.113.9:40000".parse().unwrap()),
    ] {
        let mut c = via_balancer(&h, &[&header]);
        c.ehlo();
        assert_eq!(c.cmd("MAIL FROM:<app@platform.test>").0, 250);
        let (code, text) = c.cmd("RCPT TO:<louise@dest.test>");
        assert_eq!(code, 550, "{text}");
        assert!(
            text.contains("203.0.113.9 is not in listen.allowed_networks"),
            "{text}"
        );
    }
    let events = h.events("louise@dest.test");
    assert_eq!(events.len(), 2, "{events:?}");
    for e in &events {
        assert_eq!(e["event"], "rejected");
        assert!(
            e["detail"].as_str().unwrap().contains("from 203.0.113.9"),
            "{e}"
        );
    }
    assert!(h.log().contains("203.0.113.9"), "{}", h.log());
    assert_eq!(sink.count(), 0);
}

#[test]
fn auth_rules_follow_the_client_in_the_header() {
    use base64::Engine;
    let plain = base64::engine::general_purpose::STANDARD.encode(b"\0platform\0s3cret");
    let sink = Sink::start(Script::default());
    let h = behind_balancer(
        &sink,
        "[[listen.users]]\nusername = \"platform\"\npassword = \"s3cret\"\n",
    );
    // A remote client must AUTH to relay, and only over TLS: loopback's
    // exemption is the balancer's, not its clients'.
    let mut c = via_balancer(&h, &[&v1("203.0.113.9", 40000)]);
    c.ehlo();
    assert_eq!(c.cmd("MAIL FROM:<app@platform.test>").0, 250);
    assert_eq!(c.cmd("RCPT TO:<x@dest.test>").0, 530);
    assert_eq!(c.cmd("RSET").0, 250);
    let (code, text) = c.cmd(&format!("AUTH PLAIN {plain}"));
    assert_eq!(code, 538, "{text}");
    // The balancer's own connection (LOCAL) is on loopback.
    let mut c = via_balancer(&h, &[&[V2_SIGNATURE, &[0x20, 0x00, 0, 0]].concat()]);
    c.ehlo();
    assert_eq!(c.cmd(&format!("AUTH PLAIN {plain}")).0, 235);
}

#[test]
fn v2_local_and_v1_unknown_keep_the_balancers_address() {
    let sink = Sink::start(Script::default());
    let h = behind_balancer(&sink, "");
    let local = [V2_SIGNATURE, &[0x20, 0x00, 0, 0]].concat();
    for (rcpt, header) in [
        ("local@dest.test", local),
        ("unknown@dest.test", b"PROXY UNKNOWN\r\n".to_vec()),
    ] {
        let mut c = via_balancer(&h, &[&header]);
        c.ehlo();
        assert_eq!(c.send("app@platform.test", &[rcpt], &message(rcpt)).0, 250);
    }
    let msgs = sink.wait_for(2, 20);
    assert_eq!(msgs.len(), 2);
    for m in msgs {
        assert!(
            m.text()
                .starts_with("Received: from client.test (127.0.0.1)"),
            "{}",
            m.text()
        );
    }
}

#[test]
fn a_header_split_over_several_writes_is_read_whole() {
    let sink = Sink::start(Script::default());
    let h = behind_balancer(&sink, "");
    let one = v1("192.0.2.10", 40000);
    let two = v2("192.0.2.11:40000".parse().unwrap());
    for (rcpt, pieces) in [
        ("split-v1@dest.test", vec![&one[..9], &one[9..]]),
        // Inside the signature, then inside the addresses.
        (
            "split-v2@dest.test",
            vec![&two[..5], &two[5..20], &two[20..]],
        ),
    ] {
        let mut c = via_balancer(&h, &pieces);
        c.ehlo();
        assert_eq!(c.send("app@platform.test", &[rcpt], &message(rcpt)).0, 250);
    }
    let msgs = sink.wait_for(2, 20);
    assert_eq!(msgs.len(), 2);
    for (rcpt, ip) in [
        ("split-v1@dest.test", "192.0.2.10"),
        ("split-v2@dest.test", "192.0.2.11"),
    ] {
        let m = msgs.iter().find(|m| m.rcpts == vec![rcpt]).unwrap();
        assert!(
            m.text().contains(&format!("({ip})")),
            "{rcpt}: {}",
            m.text()
        );
    }
}

#[test]
fn a_listed_balancer_without_a_good_header_is_closed_without_greeting() {
    let sink = Sink::start(Script::default());
    let h = behind_balancer(&sink, "");
    let mut too_long_v2 = V2_SIGNATURE.to_vec();
    too_long_v2.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            b"EHLO client.test\r\n".to_vec(),
            "does not begin with a PROXY header",
        ),
        (
            b"PROXY TCP4 999.0.2.7 10.0.0.25 40000 25\r\n".to_vec(),
            "bad PROXY header",
        ),
        (
            b"PROXY TCP9 192.0.2.7 10.0.0.25 40000 25\r\n".to_vec(),
            "bad PROXY header",
        ),
        (
            format!("PROXY TCP4 192.0.2.7 {}\r\n", "1".repeat(120)).into_bytes(),
            "longer than 107 bytes",
        ),
        (too_long_v2, "announces 65535 bytes"),
        (
            [V2_SIGNATURE, &[0x21, 0x11, 0, 3, 1, 2, 3]].concat(),
            "bad PROXY header",
        ),
    ];
    for (bytes, why) in cases {
        let before = h.log().matches(why).count();
        closed_without_greeting(TcpStream::connect(h.smtp).unwrap(), &bytes);
        assert!(
            wait_until(10, || h.log().matches(why).count() > before),
            "{why}: {}",
            h.log()
        );
    }
    // One warning per connection, naming the balancer.
    let log = h.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("PROXY protocol balancer closed"))
        .collect();
    assert_eq!(warnings.len(), 6, "{warnings:?}");
    assert!(warnings
        .iter()
        .all(|l| l.contains("WARN") && l.contains("127.0.0.1")));

    // A balancer that sends nothing is given HEADER_TIMEOUT (5 s).
    closed_without_greeting(TcpStream::connect(h.smtp).unwrap(), b"");
    assert!(
        wait_until(10, || h.log().contains("no PROXY header within 5s")),
        "{}",
        h.log()
    );
    // Connect and close (a TCP health check, and the test harness's own
    // start-up probe) is no warning.
    assert!(!h.log().contains("closed before"), "{}", h.log());
    assert_eq!(sink.count(), 0);
}

#[test]
fn a_header_from_an_unlisted_address_is_an_smtp_line_and_changes_nothing() {
    let sink = Sink::start(Script::default());
    let h = behind_balancer(&sink, "");
    // 127.0.0.2 may relay; 203.0.113.9 may not. Were the header believed,
    // the RCPT below would be refused.
    let mut tcp = connect_from("127.0.0.2", h.smtp);
    tcp.write_all(&v1("203.0.113.9", 40000)).unwrap();
    let mut c = Client::over(tcp);
    let (code, text) = c.read_reply();
    assert_eq!(code, 500, "the header is an unknown command: {text}");
    c.ehlo();
    let (code, text) = c.send(
        "app@platform.test",
        &["forged@dest.test"],
        &message("forged"),
    );
    assert_eq!(code, 250, "{text}");

    // The v2 signature is binary junk to an SMTP session: lines of junk
    // (empty, "\0", "QUIT" ended by a bare LF...), each a 500; the session
    // goes on from 127.0.0.2.
    let mut tcp = connect_from("127.0.0.2", h.smtp);
    let mut forged = v2("203.0.113.9:40000".parse().unwrap());
    forged.extend_from_slice(b"\r\nNOOP\r\n");
    tcp.write_all(&forged).unwrap();
    let mut c = Client::over(tcp);
    let mut junk = 0;
    loop {
        let (code, text) = c.read_reply();
        if code == 250 {
            break;
        }
        assert_eq!(code, 500, "{text}");
        junk += 1;
    }
    assert!(junk >= 4, "{junk}");
    c.ehlo();
    let (code, text) = c.send(
        "app@platform.test",
        &["forged2@dest.test"],
        &message("forged2"),
    );
    assert_eq!(code, 250, "{text}");
    let msgs = sink.wait_for(2, 20);
    assert_eq!(msgs.len(), 2);
    for m in &msgs {
        assert!(
            m.text()
                .starts_with("Received: from client.test (127.0.0.2)"),
            "{}",
            m.text()
        );
    }
    for rcpt in ["forged@dest.test", "forged2@dest.test"] {
        assert!(received_detail(&h, rcpt).contains("via 127.0.0.2 "));
    }
    assert!(!h.log().contains("203.0.113.9"), "{}", h.log());
}

#[test]
fn the_per_ip_slot_is_the_real_clients() {
    let sink = Sink::start(Script::default());
    let h = behind_balancer(&sink, "max_connections_per_ip = 1\n");
    // Every client comes from the balancer's address; each gets its slot.
    // (Clients outside allowed_networks: the platform's own are not held
    // to max_connections_per_ip.)
    let _a = via_balancer(&h, &[&v1("198.51.100.1", 40000)]);
    let _b = via_balancer(&h, &[&v1("198.51.100.2", 40000)]);
    let mut tcp = TcpStream::connect(h.smtp).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    tcp.write_all(&v1("198.51.100.1", 40001)).unwrap();
    let mut got = String::new();
    let _ = tcp.read_to_string(&mut got);
    assert!(
        got.starts_with("421 4.7.0") && got.contains("from your address"),
        "{got}"
    );
    assert!(
        h.log()
            .lines()
            .any(|l| l.contains("max_connections_per_ip") && l.contains("198.51.100.1")),
        "{}",
        h.log()
    );
}

#[test]
fn implicit_tls_behind_a_balancer_reads_the_header_before_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let sink = Sink::start(Script::default());
    let smtps = free_port();
    let _h = Herald::start_in(
        dir,
        &format!(
            "[listen]\nsmtp = [\"{{smtp}}\"]\nsmtps = [\"127.0.0.1:{smtps}\"]\ntls = {{ cert = \"cert.pem\", key = \"key.pem\" }}\n{LISTEN}{}",
            upstream(sink.port(), "none", "")
        ),
    );
    let mut tcp = TcpStream::connect(format!("127.0.0.1:{smtps}")).unwrap();
    tcp.write_all(&v2("192.0.2.20:40000".parse().unwrap()))
        .unwrap();
    let mut c = Client::over_tls(tcp, pki.client_config());
    c.ehlo();
    assert_eq!(
        c.send("app@platform.test", &["tls@dest.test"], &message("tls"))
            .0,
        250
    );
    let m = &sink.wait_for(1, 20)[0];
    assert!(
        m.text()
            .starts_with("Received: from client.test (192.0.2.20)"),
        "{}",
        m.text()
    );
    assert!(m.text().contains("with ESMTPS"), "{}", m.text());
}

#[test]
fn check_config_names_a_bad_proxy_protocol_from() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("herald.toml");
    std::fs::write(
        &path,
        format!("{BASE}[listen]\nproxy_protocol_from = [\"10.0.0.0/33\"]\n"),
    )
    .unwrap();
    let (code, out) = run_herald([
        "check-config".as_ref(),
        "--config".as_ref(),
        path.as_os_str(),
    ]);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("listen.proxy_protocol_from: \"10.0.0.0/33\" is not a network"),
        "{out}"
    );
}

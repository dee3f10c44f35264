//! A webhook receiver on loopback: records the POSTs and checks their
//! `Herald-Signature` against [`HOOK_KEY`].

use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// The key of every test endpoint's `secret_file`.
pub const HOOK_KEY: &str = "0123456789abcdef0123456789abcdef";
const KEY: &str = HOOK_KEY;

/// One POST as received.
#[derive(Clone, Debug)]
pub struct Post {
    pub event_ids: String,
    pub signature_ok: bool,
    pub events: Vec<Value>,
}

/// An HTTP receiver that answers `status` and records what it got.
pub struct Receiver {
    pub posts: Arc<Mutex<Vec<Post>>>,
    pub status: Arc<AtomicU16>,
    stop: Arc<AtomicBool>,
}

fn hmac_hex(key: &[u8], msg: &[u8]) -> String {
    use aws_lc_rs::hmac;
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    hmac::sign(&k, msg)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Receiver {
    pub fn start(port: u16, status: u16) -> Receiver {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let posts: Arc<Mutex<Vec<Post>>> = Arc::default();
        let st = Arc::new(AtomicU16::new(status));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s2, sp) = (posts.clone(), st.clone(), stop.clone());
        thread::spawn(move || {
            while !sp.load(Ordering::Relaxed) {
                let Ok((tcp, _)) = listener.accept() else {
                    thread::sleep(Duration::from_millis(5));
                    continue;
                };
                tcp.set_nonblocking(false).unwrap();
                tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut rd = BufReader::new(tcp.try_clone().unwrap());
                let mut headers = HashMap::new();
                let mut line = String::new();
                if rd.read_line(&mut line).is_err() {
                    continue;
                }
                loop {
                    line.clear();
                    if rd.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some((k, v)) = line.trim_end().split_once(':') {
                        headers.insert(k.to_ascii_lowercase(), v.trim().to_string());
                    }
                }
                let len: usize = headers
                    .get("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0u8; len];
                if rd.read_exact(&mut body).is_err() {
                    continue;
                }
                let sig = headers.get("herald-signature").cloned().unwrap_or_default();
                let signature_ok = sig
                    .split_once(",v1=")
                    .and_then(|(t, v)| t.strip_prefix("t=").map(|t| (t, v)))
                    .is_some_and(|(t, v)| {
                        let mut m = t.as_bytes().to_vec();
                        m.push(b'.');
                        m.extend_from_slice(&body);
                        hmac_hex(KEY.as_bytes(), &m) == v
                    });
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let events = match v {
                    Value::Array(a) => a,
                    other => vec![other],
                };
                let code = s2.load(Ordering::Relaxed);
                if (200..300).contains(&code) {
                    p.lock().unwrap().push(Post {
                        event_ids: headers.get("herald-event-id").cloned().unwrap_or_default(),
                        signature_ok,
                        events,
                    });
                }
                let mut w = tcp;
                let _ = write!(
                    w,
                    "HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            }
        });
        Receiver {
            posts,
            status: st,
            stop,
        }
    }

    pub fn events(&self) -> Vec<Value> {
        self.posts
            .lock()
            .unwrap()
            .iter()
            .flat_map(|p| p.events.clone())
            .collect()
    }

    /// Distinct events (by event_id) of this kind for this recipient.
    pub fn count(&self, event: &str, rcpt: &str) -> usize {
        let mut ids: Vec<String> = self
            .events()
            .iter()
            .filter(|e| e["event"] == event && e["rcpt"] == rcpt)
            .map(|e| e["event_id"].as_str().unwrap_or("").to_string())
            .collect();
        ids.sort();
        ids.dedup();
        ids.len()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

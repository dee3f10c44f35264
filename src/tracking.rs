//! Open tracking: a 1x1 pixel in the HTML parts of a message, served from
//! `[tracking] listen` at `/o/<token>.gif`; fetching it records `opened`.
//!
//! The token is the queue id and an HMAC of it under the key in
//! `tracking.secret_file`, so nobody can forge opens for other messages.
//! The pixel goes in before DKIM signs the message. It is inserted without
//! touching the part's charset: in the transfer-decoded bytes (7bit/8bit
//! as is, quoted-printable as encoded text, base64 decoded and re-encoded),
//! just before `</body>`, else at the end of the part.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use aws_lc_rs::hmac;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use base64::Engine;
use ipnet::IpNet;
use mail_parser::{Encoding, MessageParser, MimeHeaders, PartType};

use crate::mime::{base64_lines, qp_encode};
use crate::state::history::{By, EventKind};
use crate::state::Services;

/// The smallest transparent GIF.
const GIF: &[u8] = &[
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x01, 0x00, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b,
];

fn mac(key: &[u8], id: &str) -> String {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    let tag = hmac::sign(&k, id.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&tag.as_ref()[..16])
}

/// `<id>.<mac>`: what goes in the pixel URL.
pub fn token(key: &[u8], id: &str) -> String {
    format!("{id}.{}", mac(key, id))
}

/// The queue id of a genuine token.
pub fn verify(key: &[u8], token: &str) -> Option<String> {
    let (id, m) = token.split_once('.')?;
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(m)
        .ok()?;
    // Constant-time check of the truncated tag.
    let full = hmac::sign(&k, id.as_bytes());
    let ok = raw.len() == 16
        && raw
            .iter()
            .zip(&full.as_ref()[..16])
            .fold(0u8, |d, (a, b)| d | (a ^ b))
            == 0;
    ok.then(|| id.to_string())
}

fn pixel_tag(url: &str) -> String {
    format!(
        "<img src=\"{url}\" width=\"1\" height=\"1\" alt=\"\" style=\"display:block;border:0;width:1px;height:1px\">"
    )
}

fn find_ci(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len())
        .rposition(|w| w.eq_ignore_ascii_case(needle))
}

/// Inserts `tag` before the last `</body>` of decoded HTML, else at the end.
fn insert_html(html: &[u8], tag: &[u8]) -> Vec<u8> {
    let at = find_ci(html, b"</body>").unwrap_or_else(|| {
        // Keep a final line break after the tag.
        html.len()
            - html
                .iter()
                .rev()
                .take_while(|b| **b == b'\n' || **b == b'\r')
                .count()
    });
    let mut out = Vec::with_capacity(html.len() + tag.len());
    out.extend_from_slice(&html[..at]);
    out.extend_from_slice(tag);
    out.extend_from_slice(&html[at..]);
    out
}

/// The body of one HTML part with the pixel, in the part's own encoding.
/// The tag goes on a line of its own so that no line grows past the
/// RFC 5322 limit.
fn rewrite_part(raw: &[u8], encoding: Encoding, tag: &str) -> Option<Vec<u8>> {
    let line = format!("\r\n{tag}\r\n");
    match encoding {
        Encoding::None => Some(insert_html(raw, line.as_bytes())),
        Encoding::QuotedPrintable => {
            // Decode first: `</body>` may be split by a soft line break.
            let html = mail_parser::decoders::quoted_printable::quoted_printable_decode(raw)?;
            let mut out = qp_encode(&insert_html(&html, line.as_bytes()));
            if raw.ends_with(b"\n") && !out.ends_with(b"\n") {
                out.extend_from_slice(b"\r\n");
            }
            Some(out)
        }
        Encoding::Base64 => {
            let clean: Vec<u8> = raw
                .iter()
                .copied()
                .filter(|b| !b.is_ascii_whitespace())
                .collect();
            let html = base64::engine::general_purpose::STANDARD
                .decode(clean)
                .ok()?;
            let mut out = base64_lines(&insert_html(&html, line.as_bytes()));
            // Keep the part's trailing line break where the original had one.
            if !raw.ends_with(b"\n") {
                out.truncate(out.len() - 2);
            }
            Some(out)
        }
    }
}

/// Adds the pixel to every HTML part that is not an attachment. Messages
/// without HTML are returned unchanged.
pub fn inject(message: &[u8], url: &str) -> Vec<u8> {
    let Some(msg) = MessageParser::default().parse(message) else {
        return message.to_vec();
    };
    let tag = pixel_tag(url);
    let mut edits: Vec<(usize, usize, Vec<u8>)> = Vec::new();
    for (i, part) in msg.parts.iter().enumerate() {
        if !matches!(part.body, PartType::Html(_)) || part.is_encoding_problem {
            continue;
        }
        // An attached .html file is the customer's document, not the mail:
        // mail-parser lists it among the attachments (disposition or name).
        let attachment = msg.attachments.contains(&(i as u32))
            || part.attachment_name().is_some()
            || part
                .content_disposition()
                .is_some_and(|d| d.ctype().eq_ignore_ascii_case("attachment"));
        if attachment {
            continue;
        }
        let (start, end) = (part.offset_body as usize, part.offset_end as usize);
        if start > end || end > message.len() {
            continue;
        }
        if let Some(new) = rewrite_part(&message[start..end], part.encoding, &tag) {
            edits.push((start, end, new));
        }
    }
    if edits.is_empty() {
        return message.to_vec();
    }
    edits.sort_by_key(|e| e.0);
    let mut out = Vec::with_capacity(message.len() + edits.len() * 256);
    let mut pos = 0;
    for (start, end, new) in edits {
        if start < pos {
            continue;
        }
        out.extend_from_slice(&message[pos..start]);
        out.extend_from_slice(&new);
        pos = end;
    }
    out.extend_from_slice(&message[pos..]);
    out
}

async fn open(
    State(s): State<Arc<Services>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    headers: HeaderMap,
    Path(file): Path<String>,
) -> impl IntoResponse {
    // The key before the last reload's change still counts its pixels.
    let live = s.live();
    let id = file.strip_suffix(".gif").and_then(|t| {
        [&live.tracking_key, &live.tracking_previous]
            .into_iter()
            .flatten()
            .find_map(|k| verify(k, t))
    });
    let Some(id) = id else {
        return (
            StatusCode::NOT_FOUND,
            [
                (header::CONTENT_TYPE, "text/plain"),
                (header::CACHE_CONTROL, "no-store, private"),
            ],
            b"not found\n".to_vec(),
        );
    };
    let agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    let pixel = (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "image/gif"),
            (header::CACHE_CONTROL, "no-store, private"),
        ],
        GIF.to_vec(),
    );
    // HEAD probes and repeated fetches (reloads, proxies) are not new opens.
    if method != Method::GET || !s.opens.first(&id) {
        return pixel;
    }
    let forwarded = headers.get("x-forwarded-for").and_then(|v| v.to_str().ok());
    let client = client_addr(peer.ip(), forwarded, &live.cfg.tracking.trusted_proxies);
    let received = s
        .history
        .query_by(By::Id(&id), 0, |e| e.event == EventKind::Received)
        .unwrap_or_default();
    let n = received.len();
    let l = s.ledger();
    for e in &received {
        let mut detail = format!("pixel fetched from {client} ({agent})");
        if n > 1 {
            detail.push_str(&format!(
                "; the message had {n} recipients, any of them may have opened it"
            ));
        }
        l.opened(e, &detail, agent);
    }
    tracing::info!(%id, recipients = n, "opened");
    pixel
}

/// The client that fetched the pixel. `X-Forwarded-For` is believed only
/// from `trusted_proxies` (anyone else could write any address there), and
/// then read from the right: the last hop that is not a trusted proxy.
fn client_addr(peer: IpAddr, forwarded: Option<&str>, trusted: &[IpNet]) -> String {
    let peer = crate::limit::canonical_ip(peer);
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    let (Some(list), true) = (forwarded, is_trusted(&peer)) else {
        return peer.to_string();
    };
    let mut client = peer;
    for hop in list.rsplit(',') {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) => {
                client = ip;
                if !is_trusted(&ip) {
                    break;
                }
            }
            // A hop that is not an address: stop at what is known.
            Err(_) => break,
        }
    }
    client.to_string()
}

/// Serves the pixel until shutdown.
pub async fn serve(services: Arc<Services>, listener: tokio::net::TcpListener) {
    let shutdown = services.shutdown.clone();
    let app = Router::new()
        .route("/o/{file}", get(open))
        .with_state(services);
    crate::http::serve(listener, app, shutdown, "tracking").await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let proxy: IpNet = "10.0.0.0/8".parse().unwrap();
        let p: IpAddr = "10.1.2.3".parse().unwrap();
        let other: IpAddr = "192.0.2.9".parse().unwrap();
        let xff = Some("203.0.113.7, 198.51.100.1, 10.9.9.9");
        assert_eq!(client_addr(other, xff, &[proxy]), "192.0.2.9");
        assert_eq!(client_addr(p, xff, &[]), "10.1.2.3");
        assert_eq!(client_addr(p, xff, &[proxy]), "198.51.100.1");
        assert_eq!(client_addr(p, Some("10.2.2.2"), &[proxy]), "10.2.2.2");
        assert_eq!(client_addr(p, Some("junk"), &[proxy]), "10.1.2.3");
        assert_eq!(client_addr(p, None, &[proxy]), "10.1.2.3");
    }

    #[test]
    fn tokens_verify_and_resist_forgery() {
        let t = token(b"k", "ID1");
        assert_eq!(verify(b"k", &t).as_deref(), Some("ID1"));
        assert_eq!(verify(b"other", &t), None);
        assert_eq!(verify(b"k", &t.replace("ID1", "ID2")), None);
        assert_eq!(verify(b"k", "ID1"), None);
    }

    #[test]
    fn pixel_goes_before_body_end_in_each_encoding() {
        let url = "https://t.example/o/X.Y.gif";
        let plain = inject(
            b"Content-Type: text/html\r\n\r\n<html><body>Hi</body></html>\r\n",
            url,
        );
        let s = String::from_utf8(plain).unwrap();
        assert!(
            s.contains("Hi\r\n<img src=\"https://t.example/o/X.Y.gif\""),
            "{s}"
        );
        assert!(s.ends_with("</body></html>\r\n"), "{s}");

        let qp = inject(
            b"Content-Type: text/html\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n<p style=3D\"x\">caf=C3=A9</p></BODY>\r\n",
            url,
        );
        let parsed = MessageParser::default().parse(&qp).unwrap();
        let html = parsed.body_html(0).unwrap();
        assert!(
            html.contains("café</p>\r\n<img src=\"https://t.example/o/X.Y.gif\""),
            "{html}"
        );
        assert!(String::from_utf8_lossy(&qp).lines().all(|l| l.len() <= 76));

        let b64 = base64::engine::general_purpose::STANDARD.encode("<body>Hello</body>");
        let msg = format!(
            "Content-Type: multipart/alternative; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nHello\r\n--b\r\nContent-Type: text/html\r\nContent-Transfer-Encoding: base64\r\n\r\n{b64}\r\n--b--\r\n"
        );
        let out = inject(msg.as_bytes(), url);
        let parsed = MessageParser::default().parse(&out).unwrap();
        assert!(parsed.body_html(0).unwrap().contains("Hello\r\n<img src="));
        assert_eq!(parsed.body_text(0).unwrap(), "Hello");
        assert!(String::from_utf8_lossy(&out)
            .contains("\r\n--b\r\nContent-Type: text/plain\r\n\r\nHello\r\n--b\r\n"));

        let text_only = b"Content-Type: text/plain\r\n\r\nno html\r\n";
        assert_eq!(inject(text_only, url), text_only.to_vec());

        // An attached HTML file (named, no disposition) is left alone.
        let attached = b"Content-Type: multipart/mixed; boundary=\"m\"\r\n\r\n--m\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n--m\r\nContent-Type: text/html; name=\"invoice.html\"\r\n\r\n<body>INVOICE</body>\r\n--m--\r\n";
        assert_eq!(inject(attached, url), attached.to_vec());

        // </body> split by a soft line break is still found.
        let split = inject(
            b"Content-Type: text/html\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n<p>x</p></bo=\r\ndy>=\r\n",
            url,
        );
        let parsed = MessageParser::default().parse(&split).unwrap();
        assert!(!parsed.parts[0].is_encoding_problem);
        let html = parsed.body_html(0).unwrap();
        assert!(
            html.contains("</p>\r\n<img") && html.contains(">\r\n</body>"),
            "{html}"
        );
    }

    #[test]
    fn qp_round_trip() {
        let text = "a=b café \t\r\nline with trailing space \r\n".to_string() + &"x".repeat(200);
        let enc = qp_encode(text.as_bytes());
        assert!(String::from_utf8_lossy(&enc).lines().all(|l| l.len() <= 76));
        let dec = mail_parser::decoders::quoted_printable::quoted_printable_decode(&enc).unwrap();
        assert_eq!(String::from_utf8(dec).unwrap(), text);
    }
}

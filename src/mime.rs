//! Making a message transportable: no line longer than RFC 5322's 998
//! bytes.
//!
//! Platforms render HTML notifications on one line; herald accepts them
//! (refusing would lose the notification at the platform) and, before
//! DKIM signing, re-encodes every MIME leaf part that has a line over 998
//! bytes: quoted-printable for text, base64 for anything else, with
//! `Content-Transfer-Encoding` updated. Header lines over 998 bytes are
//! folded. A downstream hop then has nothing to rewrap, so the signature
//! stays valid. Parts without long lines, and messages without any, are
//! left byte for byte.

use base64::Engine;
use mail_parser::MimeHeaders;

use crate::rewrite::{split, Field};

/// RFC 5322 2.1.1: at most 998 characters on a line, excluding the CRLF.
pub const MAX_LINE: usize = 998;

/// Whether any line of `b` (CRLF excluded) is longer than [`MAX_LINE`].
pub fn has_long_line(b: &[u8]) -> bool {
    // Line ends found with memchr's SIMD search (this runs on every
    // message); the last piece after the final LF counts as a line too.
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', b).chain(std::iter::once(b.len())) {
        let line = &b[start..end];
        if line.strip_suffix(b"\r").unwrap_or(line).len() > MAX_LINE {
            return true;
        }
        start = end + 1;
    }
    false
}

/// The message with every line at most [`MAX_LINE`] bytes, decoded
/// content unchanged. Returns `None` when the message already fits.
pub fn transportable(msg: &[u8]) -> Option<Vec<u8>> {
    if !has_long_line(msg) {
        return None;
    }
    Some(entity(msg, Implied::Text, true))
}

/// The type a part has when it has no `Content-Type` (RFC 2046 5.1.5).
#[derive(Clone, Copy, PartialEq)]
enum Implied {
    Text,
    /// In a multipart/digest.
    Message,
}

/// One entity (a message, `top`, or a part of a multipart): its header
/// fields folded and its body made transportable.
fn entity(raw: &[u8], implied: Implied, top: bool) -> Vec<u8> {
    let Ok((fields, body)) = split(raw) else {
        // Not a header section we can read: wrap it as plain lines.
        return hard_wrap(raw);
    };
    if fields.is_empty() && body.len() == raw.len() {
        // No header section at all: the whole entity is body.
        return match leaf(&[], body, top) {
            Some((new, added)) if added.is_empty() => new,
            Some((new, added)) => {
                let mut out = added.concat().into_bytes();
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(&new);
                out
            }
            None => raw.to_vec(),
        };
    }
    let ctype = content_type(&fields);
    let embedded = match &ctype {
        Some((t, s, _)) => t == "message" && (s == "rfc822" || s == "global"),
        None => implied == Implied::Message,
    };
    let (new_body, mut replaced) = match &ctype {
        Some((t, s, Some(boundary))) if t == "multipart" => {
            (multipart(body, boundary.as_bytes(), s == "digest"), None)
        }
        // An embedded message may only be 7bit, 8bit or binary (RFC 2046
        // 5.2.1): it is made transportable inside instead.
        _ if embedded => (
            has_long_line(body).then(|| entity(body, Implied::Text, true)),
            None,
        ),
        _ => match leaf(&fields, body, top) {
            Some((new, added)) => (Some(new), Some(added)),
            None => (None, None),
        },
    };
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 3);
    for f in &fields {
        if replaced.is_some() && f.name.eq_ignore_ascii_case("content-transfer-encoding") {
            continue;
        }
        out.extend_from_slice(&fold(f.raw));
        if !f.raw.ends_with(b"\n") {
            out.extend_from_slice(b"\r\n");
        }
    }
    if let Some(added) = replaced.take() {
        for h in added {
            out.extend_from_slice(h.as_bytes());
        }
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(new_body.as_deref().unwrap_or(body));
    out
}

/// Content-Type as (type, subtype, boundary), lowercased, read by
/// mail-parser (quoted parameters, comments, RFC 2231).
fn content_type(fields: &[Field]) -> Option<(String, String, Option<String>)> {
    let f = fields
        .iter()
        .find(|f| f.name.eq_ignore_ascii_case("content-type"))?;
    let mut buf = f.raw.to_vec();
    if !buf.ends_with(b"\n") {
        buf.extend_from_slice(b"\r\n");
    }
    buf.extend_from_slice(b"\r\n");
    let msg = mail_parser::MessageParser::default().parse_headers(&buf)?;
    let ct = msg.content_type()?;
    Some((
        ct.ctype().to_ascii_lowercase(),
        ct.subtype().unwrap_or("").to_ascii_lowercase(),
        ct.attribute("boundary").map(str::to_string),
    ))
}

/// A leaf part with a long line, re-encoded: the new body and the header
/// fields to add (Content-Transfer-Encoding, and at the `top` of a message
/// without MIME headers, MIME-Version and Content-Type). `None` when the
/// part fits or its encoding is one we cannot decode.
fn leaf(fields: &[Field], body: &[u8], top: bool) -> Option<(Vec<u8>, Vec<String>)> {
    if !has_long_line(body) {
        return None;
    }
    let cte = fields
        .iter()
        .find(|f| f.name.eq_ignore_ascii_case("content-transfer-encoding"))
        .map(|f| f.value().to_ascii_lowercase())
        .unwrap_or_default();
    let decoded = match cte.as_str() {
        "" | "7bit" | "8bit" | "binary" => body.to_vec(),
        "quoted-printable" => {
            mail_parser::decoders::quoted_printable::quoted_printable_decode(body)?
        }
        "base64" => mail_parser::decoders::base64::base64_decode(body)?,
        _ => return None,
    };
    let ctype = content_type(fields);
    let text = ctype.as_ref().is_none_or(|(t, _, _)| t == "text");
    let mut added = Vec::new();
    let has = |n: &str| fields.iter().any(|f| f.name.eq_ignore_ascii_case(n));
    if top && !has("mime-version") {
        added.push("MIME-Version: 1.0\r\n".to_string());
    }
    if top && ctype.is_none() && !decoded.is_ascii() {
        // Without a charset the text would read as US-ASCII; UTF-8 is what
        // a platform writes today.
        let charset = if std::str::from_utf8(&decoded).is_ok() {
            "utf-8"
        } else {
            "unknown-8bit"
        };
        added.push(format!("Content-Type: text/plain; charset={charset}\r\n"));
    }
    let ends_crlf = body.ends_with(b"\r\n");
    let new = if text {
        added.push("Content-Transfer-Encoding: quoted-printable\r\n".into());
        qp_encode(&decoded)
    } else {
        added.push("Content-Transfer-Encoding: base64\r\n".into());
        let mut b = base64_lines(&decoded);
        if !ends_crlf {
            b.truncate(b.len().saturating_sub(2));
        }
        b
    };
    Some((new, added))
}

/// A multipart body with each part made transportable; `None` when
/// nothing changed.
fn multipart(body: &[u8], boundary: &[u8], digest: bool) -> Option<Vec<u8>> {
    if !has_long_line(body) {
        return None;
    }
    let mut delim = b"--".to_vec();
    delim.extend_from_slice(boundary);
    // (line start, line end with CRLF, closing?) of every delimiter line.
    let mut lines = Vec::new();
    let mut pos = 0;
    while pos < body.len() {
        let end = body[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|i| pos + i + 1)
            .unwrap_or(body.len());
        let line = &body[pos..end];
        if let Some(rest) = line.strip_prefix(delim.as_slice()) {
            let (closing, rest) = match rest.strip_prefix(b"--") {
                Some(r) => (true, r),
                None => (false, rest),
            };
            if rest.iter().all(|b| b" \t\r\n".contains(b)) {
                lines.push((pos, end, closing));
                if closing {
                    break;
                }
            }
        }
        pos = end;
    }
    let Some(&(first, _, _)) = lines.first() else {
        return Some(hard_wrap(body));
    };
    let implied = if digest {
        Implied::Message
    } else {
        Implied::Text
    };
    let mut out = Vec::with_capacity(body.len() + body.len() / 3);
    // The CRLF before a delimiter belongs to the delimiter (RFC 2046 5.1.1).
    let content_end = |next: usize, start: usize| {
        if next >= start + 2 && &body[next - 2..next] == b"\r\n" {
            next - 2
        } else {
            next.max(start)
        }
    };
    let pre_end = content_end(first, 0);
    out.extend_from_slice(&hard_wrap(&body[..pre_end]));
    out.extend_from_slice(&body[pre_end..first]);
    for (i, &(start, end, closing)) in lines.iter().enumerate() {
        out.extend_from_slice(&body[start..end]);
        if closing {
            out.extend_from_slice(&hard_wrap(&body[end..]));
            return Some(out);
        }
        let next = lines.get(i + 1).map(|l| l.0).unwrap_or(body.len());
        let cend = if next == body.len() {
            next
        } else {
            content_end(next, end)
        };
        out.extend_from_slice(&entity(&body[end..cend], implied, false));
        out.extend_from_slice(&body[cend..next]);
    }
    Some(out)
}

/// Text whose meaning does not depend on its line breaks (a preamble, an
/// epilogue, an unreadable part) cut into lines of at most [`MAX_LINE`].
fn hard_wrap(b: &[u8]) -> Vec<u8> {
    if !has_long_line(b) {
        return b.to_vec();
    }
    let mut out = Vec::with_capacity(b.len() + b.len() / 400);
    for (n, line) in b.split(|&c| c == b'\n').enumerate() {
        if n > 0 {
            out.push(b'\n');
        }
        let cr = line.ends_with(b"\r");
        let content = line.strip_suffix(b"\r").unwrap_or(line);
        for (i, chunk) in content.chunks(MAX_LINE).enumerate() {
            if i > 0 {
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(chunk);
        }
        if cr {
            out.push(b'\r');
        }
    }
    out
}

/// One header field (folds and CRLF included) with every physical line
/// at most [`MAX_LINE`] bytes: folded before a blank where there is one,
/// else after a `,` or `;`, else (a single token of 998 bytes) cut with a
/// fold, which adds a space.
fn fold(raw: &[u8]) -> Vec<u8> {
    if !has_long_line(raw) {
        return raw.to_vec();
    }
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 64);
    for (n, line) in raw.split(|&c| c == b'\n').enumerate() {
        if n > 0 {
            out.push(b'\n');
        }
        let cr = line.ends_with(b"\r");
        let mut rest = line.strip_suffix(b"\r").unwrap_or(line);
        while rest.len() > MAX_LINE {
            let window = &rest[..=MAX_LINE];
            // A fold needs something other than blanks before it.
            let first_text = window.iter().position(|b| !b" \t".contains(b)).unwrap_or(0);
            let at = window
                .iter()
                .rposition(|b| b" \t".contains(b))
                .filter(|&i| i > first_text)
                .map(|i| (i, false))
                .or_else(|| {
                    window[..MAX_LINE - 1]
                        .iter()
                        .rposition(|b| b",;".contains(b))
                        .filter(|&i| i > first_text)
                        .map(|i| (i + 1, true))
                })
                .unwrap_or_else(|| {
                    let mut i = MAX_LINE - 1;
                    while i > 1 && (rest[i] & 0xC0) == 0x80 {
                        i -= 1;
                    }
                    (i, true)
                });
            out.extend_from_slice(&rest[..at.0]);
            out.extend_from_slice(if at.1 { b"\r\n " } else { b"\r\n" });
            rest = &rest[at.0..];
        }
        out.extend_from_slice(rest);
        if cr {
            out.push(b'\r');
        }
    }
    out
}

/// Quoted-printable (RFC 2045 6.7) of `data`: CRLF stays a hard line
/// break, lines are soft-broken before 76 characters, and `=`, bytes
/// outside printable ASCII (a bare CR or LF too) and line-final blanks are
/// encoded, so that decoding gives back `data` exactly.
pub fn qp_encode(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 8);
    let mut width = 0;
    let mut i = 0;
    while i < data.len() {
        let b = data[i];
        if b == b'\r' && data.get(i + 1) == Some(&b'\n') {
            out.extend_from_slice(b"\r\n");
            width = 0;
            i += 2;
            continue;
        }
        let line_end = i + 1 == data.len() || data[i + 1..].starts_with(b"\r\n");
        let plain = (33..=126).contains(&b) && b != b'=' || (b == b' ' || b == b'\t') && !line_end;
        let len = if plain { 1 } else { 3 };
        if width + len > 75 {
            out.extend_from_slice(b"=\r\n");
            width = 0;
        }
        if plain {
            out.push(b);
        } else {
            out.extend_from_slice(format!("={b:02X}").as_bytes());
        }
        width += len;
        i += 1;
    }
    out
}

/// Base64 in lines of 76 characters, each ending in CRLF.
pub fn base64_lines(data: &[u8]) -> Vec<u8> {
    let text = base64::engine::general_purpose::STANDARD.encode(data);
    let mut out = Vec::with_capacity(text.len() + text.len() / 38 + 2);
    for chunk in text.as_bytes().chunks(76) {
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qp_decode(b: &[u8]) -> Vec<u8> {
        mail_parser::decoders::quoted_printable::quoted_printable_decode(b).unwrap()
    }

    fn max_line(b: &[u8]) -> usize {
        b.split(|&c| c == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l).len())
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn qp_round_trips_exactly() {
        let long = format!("{}=é \t", "a ".repeat(700));
        for data in [
            long.as_bytes(),
            b"x\r\n\r\n.dot\r\ntrailing \r\n",
            b"bare\nlf and bare\rcr\r\n",
            b"",
        ] {
            let enc = qp_encode(data);
            assert!(max_line(&enc) <= 76, "{}", String::from_utf8_lossy(&enc));
            assert_eq!(qp_decode(&enc), data);
        }
    }

    #[test]
    fn messages_that_fit_are_untouched() {
        assert!(transportable(b"Subject: x\r\n\r\nshort\r\n").is_none());
    }

    #[test]
    fn plain_message_gets_mime_headers() {
        let body = format!("{}é\r\nend\r\n", "w".repeat(2000));
        let msg = format!("From: a@b.c\r\nSubject: s\r\n\r\n{body}");
        let out = transportable(msg.as_bytes()).unwrap();
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(max_line(&out) <= MAX_LINE);
        assert!(text.contains("\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"), "{text}");
        let (_, b) = split(&out).unwrap();
        assert_eq!(qp_decode(b), body.as_bytes());
    }

    #[test]
    fn long_header_lines_fold() {
        let refs = (0..60)
            .map(|i| format!("<{i}-abcdefghijklmnop@example.com>"))
            .collect::<Vec<_>>()
            .join(" ");
        let token = "t".repeat(2500);
        let msg = format!("References: {refs}\r\nX-Token: {token}\r\n\r\nbody\r\n");
        let out = transportable(msg.as_bytes()).unwrap();
        assert!(
            max_line(&out) <= MAX_LINE,
            "{}",
            String::from_utf8_lossy(&out)
        );
        let (fields, body) = split(&out).unwrap();
        assert_eq!(body, b"body\r\n");
        // Folding before a blank changes nothing once unfolded.
        assert_eq!(fields[0].value(), refs);
        assert_eq!(fields[1].value().replace(' ', ""), token);
    }

    #[test]
    fn a_long_line_is_one_over_998_without_its_line_end() {
        let l = |n: usize| "a".repeat(n);
        assert!(!has_long_line(
            format!("{}\r\n{}\r\n", l(998), l(3)).as_bytes()
        ));
        assert!(!has_long_line(format!("{}\n", l(998)).as_bytes()));
        assert!(has_long_line(format!("{}\r\nx", l(999)).as_bytes()));
        assert!(
            has_long_line(format!("x\r\n{}", l(999)).as_bytes()),
            "the last line, without LF"
        );
        assert!(!has_long_line(format!("x\r\n{}", l(998)).as_bytes()));
        assert!(!has_long_line(b""));
        assert!(
            has_long_line(format!("{}\r\r\n", l(998)).as_bytes()),
            "one CR only is the line end"
        );
    }

    #[test]
    fn only_the_parts_with_long_lines_are_re_encoded() {
        let long = "L".repeat(3000);
        let msg = format!(
            "Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\npre\r\n--b1\r\n\
             Content-Type: text/plain\r\n\r\nshort\r\n--b1\r\n\
             Content-Type: text/html\r\nContent-Transfer-Encoding: 8bit\r\n\r\n<p>{long}</p>\r\n--b1\r\n\
             Content-Type: application/octet-stream\r\n\r\n{long}\r\n--b1--\r\nepilogue\r\n"
        );
        let out = transportable(msg.as_bytes()).unwrap();
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(max_line(&out) <= MAX_LINE, "{text}");
        assert!(text.contains("--b1\r\nContent-Type: text/plain\r\n\r\nshort\r\n--b1\r\n"));
        assert!(text.contains(
            "Content-Type: text/html\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n<p>LLL"
        ));
        assert!(!text.contains("8bit"));
        assert!(text.contains("Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\nTExM"));
        assert!(text.ends_with("\r\n--b1--\r\nepilogue\r\n"), "{text}");
        let m = mail_parser::MessageParser::default().parse(&out).unwrap();
        assert_eq!(m.parts[2].contents(), format!("<p>{long}</p>").as_bytes());
        assert_eq!(m.parts[3].contents(), long.as_bytes());
    }
}

//! Mail with lines over 1000 bytes (HTML rendered on one line by a
//! template engine) is accepted and leaves transportable: every line at
//! most 998 bytes, the decoded content byte for byte what the platform
//! sent (read by Python's email package on both sides), and a DKIM
//! signature that dkimpy verifies.

mod common;

use common::*;

/// Sends `msg` (LF line ends, made CRLF), waits for it at the sink and
/// checks what the issue asks: delivered, lines of at most 998 bytes,
/// decoded parts identical to the ones sent, DKIM verified. Returns what
/// arrived.
fn relay_and_check(
    h: &Herald,
    sink: &Sink,
    keys: &[(String, String)],
    msg: &str,
    n: usize,
) -> Received {
    let mut c = h.client();
    c.ehlo();
    let (code, text) = c.send("app@platform.test", &["louise@dest.test"], msg);
    assert_eq!(code, 250, "{text}");
    let got = sink.wait_for(n, 10);
    assert_eq!(got.len(), n, "{}", h.log());
    let m = got[n - 1].clone();
    assert!(
        longest_line(&m.data) <= 998,
        "a line of {} bytes went out:\n{}",
        longest_line(&m.data),
        m.text()
    );
    let sent = msg.replace('\n', "\r\n");
    assert!(
        longest_line(sent.as_bytes()) > 998,
        "the test sends long lines"
    );
    assert_eq!(
        mime_parts(&m.data),
        mime_parts(sent.as_bytes()),
        "decoded content changed:\n{}",
        m.text()
    );
    let v = dkimpy(&m.data, keys).unwrap_or_else(|e| panic!("dkimpy: {e}\n{}", m.text()));
    assert!(v.starts_with("pass"), "{v}");
    m
}

#[test]
fn html_body_on_one_5000_byte_line() {
    let sink = Sink::start(Script::default());
    let (h, keys) = signing_herald(&sink);
    let cells: String = (0..250)
        .map(|i| format!("<td>cell {i:03} é</td>"))
        .collect();
    let html = format!("<html><body><table><tr>{cells}</tr></table></body></html>");
    assert!(html.len() >= 5000, "{}", html.len());
    let msg = format!(
        "From: Claire <claire@customer.com>\nTo: louise@dest.test\nSubject: report\nMIME-Version: 1.0\nContent-Type: text/html; charset=utf-8\n\n{html}\n"
    );
    let m = relay_and_check(&h, &sink, &keys, &msg, 1);
    let t = m.text();
    assert!(
        t.contains("Content-Transfer-Encoding: quoted-printable\r\n"),
        "{t}"
    );
    let parts = mime_parts(&m.data);
    assert_eq!(parts[0].0, "text/html");
    assert_eq!(parts[0].1, format!("{html}\r\n").into_bytes());
}

#[test]
fn eight_bit_text_part_with_a_3000_byte_line_inside_multipart_alternative() {
    let sink = Sink::start(Script::default());
    let (h, keys) = signing_herald(&sink);
    let line: String = "Le fichier « rapport.pdf » est prêt. "
        .repeat(90)
        .chars()
        .take(3000)
        .collect();
    let binary = "PDF".repeat(500);
    let msg = format!(
        "From: Bob <bob@edcustomer.test>\nTo: louise@dest.test\nSubject: fichier\nMIME-Version: 1.0\n\
         Content-Type: multipart/mixed; boundary=\"outer\"\n\nThis is a multi-part message.\n\
         --outer\nContent-Type: multipart/alternative; boundary=\"alt\"\n\n\
         --alt\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n{line}\n.next line\n\n\
         --alt\nContent-Type: text/html; charset=utf-8\n\n<p>short</p>\n\
         --alt--\n\
         --outer\nContent-Type: application/octet-stream; name=\"r.bin\"\nContent-Disposition: attachment\n\n{binary}\n\
         --outer--\n"
    );
    let m = relay_and_check(&h, &sink, &keys, &msg, 1);
    let t = m.text();
    assert!(
        t.contains("Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"),
        "{t}"
    );
    assert!(!t.contains("8bit"), "{t}");
    assert!(
        t.contains("Content-Type: text/html; charset=utf-8\r\n\r\n<p>short</p>\r\n--alt--"),
        "parts without long lines stay byte for byte: {t}"
    );
    assert!(
        t.contains("Content-Disposition: attachment\r\nContent-Transfer-Encoding: base64\r\n"),
        "{t}"
    );
    let parts = mime_parts(&m.data);
    assert_eq!(parts[0].0, "text/plain");
    assert_eq!(parts[0].1, format!("{line}\r\n.next line\r\n").into_bytes());
    assert_eq!(parts[2].1, binary.as_bytes());
    assert!(dkimpy(&m.data, &keys).unwrap().contains("a=ed25519-sha256"));
}

#[test]
fn single_part_message_without_mime_headers_and_a_long_header() {
    let sink = Sink::start(Script::default());
    let (h, keys) = signing_herald(&sink);
    let refs = (0..40)
        .map(|i| format!("<thread-{i}-0123456789@platform.test>"))
        .collect::<Vec<_>>()
        .join(" ");
    let long = "données ".repeat(300);
    let msg = format!(
        "From: Claire <claire@customer.com>\nTo: louise@dest.test\nSubject: plain\nReferences: {refs}\n\n{long}\nsecond line\n"
    );
    let m = relay_and_check(&h, &sink, &keys, &msg, 1);
    let t = m.text();
    assert!(
        t.contains("MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n"),
        "{t}"
    );
    let parts = mime_parts(&m.data);
    assert_eq!(
        parts[0].1,
        format!("{long}\r\nsecond line\r\n").into_bytes()
    );
    // The References field was folded, not cut: the same ids unfolded.
    let folded = t
        .split("\r\nReferences: ")
        .nth(1)
        .unwrap()
        .split("\r\n")
        .take_while(|l| !l.contains(':') || l.starts_with(' ') || l.starts_with('\t'))
        .collect::<Vec<_>>()
        .join(" ");
    assert_eq!(
        folded.split_whitespace().collect::<Vec<_>>(),
        refs.split_whitespace().collect::<Vec<_>>()
    );
}

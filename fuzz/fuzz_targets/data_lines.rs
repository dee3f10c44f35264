//! `herald::smtp_in::data::DataLines`: the input is split into lines at LF
//! as the session reads them; lines longer than a cap (first byte) are
//! skipped as `Line::TooLong`, a last line without LF dropped as at EOF.
//! Checked against the module's promises:
//! - what mailin gets ends in CRLF and has no bare CR or LF;
//! - only `CRLF "." CRLF` as sent ends the data, and then the line is `.`;
//! - any other line is the sent line normalised (bare CR/LF -> CRLF),
//!   with at most one dot added in front, so mailin never sees the end
//!   marker; after a bare LF a leading dot is always protected.
#![no_main]

use herald::smtp_in::data::DataLines;
use libfuzzer_sys::fuzz_target;

/// The sent line, line end stripped, every CR made CRLF, CRLF appended.
fn normalised(sent: &[u8]) -> Vec<u8> {
    let body = sent
        .strip_suffix(b"\r\n")
        .or_else(|| sent.strip_suffix(b"\n"))
        .unwrap();
    let mut out = Vec::new();
    for &b in body {
        if b == b'\r' {
            out.extend_from_slice(b"\r\n");
        } else {
            out.push(b);
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&cap, rest)) = data.split_first() else {
        return;
    };
    let cap = (cap as usize).max(1) * 4;
    let mut d = DataLines::new();
    // The model: did the previous line end in CRLF?
    let mut prev_crlf = true;
    for sent in rest.split_inclusive(|&b| b == b'\n') {
        if !sent.ends_with(b"\n") {
            break; // EOF in the middle of a line
        }
        let crlf = sent.ends_with(b"\r\n");
        if sent.len() >= cap {
            d.skipped(crlf);
            prev_crlf = crlf;
            continue;
        }
        let mut line = sent.to_vec();
        let is_end = d.feed(&mut line);
        // No bare CR or LF: every CR is followed by LF and every LF
        // follows a CR; the line ends in CRLF.
        assert!(line.ends_with(b"\r\n"), "{sent:?} -> {line:?}");
        for (i, &b) in line.iter().enumerate() {
            if b == b'\r' {
                assert_eq!(line.get(i + 1), Some(&b'\n'), "{sent:?} -> {line:?}");
            }
            if b == b'\n' {
                assert!(i > 0 && line[i - 1] == b'\r', "{sent:?} -> {line:?}");
            }
        }
        let expect_end = prev_crlf && sent == b".\r\n";
        assert_eq!(is_end, expect_end, "{sent:?} after crlf={prev_crlf}");
        if is_end {
            assert_eq!(line, b".\r\n");
        } else {
            assert_ne!(line, b".\r\n", "mailin would end the data at {sent:?}");
            let norm = normalised(sent);
            let dotted = [&b"."[..], &norm].concat();
            assert!(
                line == norm || line == dotted,
                "{sent:?} -> {line:?} (normalised {norm:?})"
            );
            if !prev_crlf && norm.starts_with(b".") {
                assert_eq!(line, dotted, "a dot after a bare LF is content");
            }
        }
        prev_crlf = crlf;
    }
});

//! DATA line handling: where the message ends, and what each line becomes
//! before mailin sees it.
//!
//! The end of DATA is decided on the bytes as the client sent them: only
//! `CRLF "." CRLF` ends the message, so `<LF>.<CR><LF>` is content, not
//! the end (no SMTP smuggling). Bare LFs and bare CRs are normalised to
//! CRLF, so what herald stores and relays has no line end a hop downstream
//! could read differently. A line that only looks like the end marker once
//! normalised, or that begins with a dot after a bare LF (so the client did
//! not dot-stuff it), gets an extra dot, which mailin then removes.

/// The state carried from one DATA line to the next.
#[derive(Debug, Default)]
pub struct DataLines {
    /// The previous line ended in a bare LF (no CR before it).
    prev_bare_lf: bool,
}

impl DataLines {
    pub fn new() -> DataLines {
        DataLines::default()
    }

    /// Takes one line as read (ending in LF) and makes it safe for mailin
    /// in place. True when it is the end-of-data marker.
    pub fn feed(&mut self, line: &mut Vec<u8>) -> bool {
        let bare_lf = !line.ends_with(b"\r\n");
        let is_end = !bare_lf && line == b".\r\n" && !self.prev_bare_lf;
        if bare_lf {
            line.pop();
            line.extend_from_slice(b"\r\n");
        }
        if line[..line.len() - 2].contains(&b'\r') {
            // A bare CR is no line end here, but a hop downstream may take
            // `<CR>.<CR>` for one.
            let mut fixed = Vec::with_capacity(line.len() + 16);
            for &b in &line[..line.len() - 2] {
                if b == b'\r' {
                    fixed.extend_from_slice(b"\r\n");
                } else {
                    fixed.push(b);
                }
            }
            fixed.extend_from_slice(b"\r\n");
            *line = fixed;
        }
        if !is_end && (line == b".\r\n" || (self.prev_bare_lf && line.first() == Some(&b'.'))) {
            line.insert(0, b'.');
        }
        self.prev_bare_lf = bare_lf;
        is_end
    }

    /// A line too long to keep was discarded; `crlf` says how it ended.
    pub fn skipped(&mut self, crlf: bool) {
        self.prev_bare_lf = !crlf;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `lines` in order: (each line as mailin gets it, end seen at).
    fn run(lines: &[&[u8]]) -> (Vec<Vec<u8>>, Option<usize>) {
        let mut d = DataLines::new();
        let mut out = Vec::new();
        let mut end = None;
        for (i, l) in lines.iter().enumerate() {
            let mut l = l.to_vec();
            if d.feed(&mut l) && end.is_none() {
                end = Some(i);
            }
            out.push(l);
        }
        (out, end)
    }

    #[test]
    fn only_crlf_dot_crlf_ends_the_data() {
        let (out, end) = run(&[b"Subject: x\r\n", b"\r\n", b"hello\r\n", b".\r\n"]);
        assert_eq!(end, Some(3));
        assert_eq!(out[2], b"hello\r\n");
        assert_eq!(out[3], b".\r\n");
        // The very first line may be the end (an empty message).
        assert_eq!(run(&[b".\r\n"]).1, Some(0));
    }

    #[test]
    fn dot_stuffed_lines_pass_as_sent() {
        let (out, end) = run(&[b"..leading dot\r\n", b"...\r\n", b".\r\n"]);
        assert_eq!(end, Some(2));
        assert_eq!(out[0], b"..leading dot\r\n");
        assert_eq!(out[1], b"...\r\n");
    }

    #[test]
    fn a_dot_after_a_bare_lf_is_content_not_the_end() {
        // <LF>.<CR><LF>: the smuggling pattern.
        let (out, end) = run(&[b"hello\n", b".\r\n", b"MAIL FROM:<x>\r\n", b".\r\n"]);
        assert_eq!(end, Some(3));
        assert_eq!(out[0], b"hello\r\n", "bare LF normalised");
        assert_eq!(out[1], b"..\r\n", "protected for mailin");
        // <CR><LF>.<LF>: the dot line ends in a bare LF.
        let (out, end) = run(&[b"hello\r\n", b".\n", b"x\r\n", b".\r\n"]);
        assert_eq!(end, Some(3));
        assert_eq!(out[1], b"..\r\n");
        // Not dot-stuffed after a bare LF: its dot is kept.
        let (out, _) = run(&[b"a\n", b".b\r\n"]);
        assert_eq!(out[1], b"..b\r\n");
    }

    #[test]
    fn bare_crs_become_crlf() {
        let (out, end) = run(&[b"hello\r.\rMAIL FROM:<x>\r\n", b".\r\n"]);
        assert_eq!(end, Some(1));
        assert_eq!(out[0], b"hello\r\n.\r\nMAIL FROM:<x>\r\n");
        let (out, end) = run(&[b"a\rb\n", b".\r\n"]);
        assert_eq!(out[0], b"a\r\nb\r\n");
        assert_eq!(end, None, "a dot line after a bare LF is content");
    }

    #[test]
    fn a_skipped_long_line_keeps_its_line_end() {
        let mut d = DataLines::new();
        d.skipped(false);
        let mut l = b".\r\n".to_vec();
        assert!(!d.feed(&mut l), "after a bare LF");
        d.skipped(true);
        let mut l = b".\r\n".to_vec();
        assert!(d.feed(&mut l));
    }
}

//! Reading SMTP lines with a length cap.
//!
//! mailin has no cap of its own, so a client could make us buffer an
//! endless line. Here a line longer than the cap is consumed up to its LF
//! and reported as [`Line::TooLong`]; the caller answers 500 and goes on.

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// `buf` holds one line, ending in LF (CRLF when the client is correct).
    Complete,
    /// The line was longer than the cap; it was discarded. `crlf` tells
    /// whether it ended in CRLF (a bare LF matters for the end of DATA).
    TooLong { crlf: bool },
    /// The connection closed (a partial line, if any, is dropped).
    Eof,
}

pub async fn read_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Line> {
    buf.clear();
    let mut too_long = false;
    // Last byte of a discarded chunk, to see a CR split from its LF.
    let mut last = 0u8;
    loop {
        let avail = r.fill_buf().await?;
        if avail.is_empty() {
            return Ok(Line::Eof);
        }
        match memchr::memchr(b'\n', avail) {
            Some(i) => {
                if !too_long && buf.len() + i < max {
                    buf.extend_from_slice(&avail[..=i]);
                    r.consume(i + 1);
                    return Ok(Line::Complete);
                }
                let before = match (i, buf.last()) {
                    (0, Some(&b)) => b,
                    (0, None) => last,
                    _ => avail[i - 1],
                };
                r.consume(i + 1);
                buf.clear();
                return Ok(Line::TooLong {
                    crlf: before == b'\r',
                });
            }
            None => {
                let n = avail.len();
                if !too_long && buf.len() + n < max {
                    buf.extend_from_slice(avail);
                } else {
                    too_long = true;
                    last = avail[n - 1];
                    buf.clear();
                }
                r.consume(n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn splits_caps_and_recovers() {
        let input: &[u8] = b"EHLO a\r\nxxxxxxxxxxxxxxxxxxxx\r\nQUIT\r\npartial";
        let mut r = tokio::io::BufReader::with_capacity(4, input);
        let mut buf = Vec::new();
        assert_eq!(
            read_line(&mut r, &mut buf, 10).await.unwrap(),
            Line::Complete
        );
        assert_eq!(buf, b"EHLO a\r\n");
        assert_eq!(
            read_line(&mut r, &mut buf, 10).await.unwrap(),
            Line::TooLong { crlf: true }
        );
        assert_eq!(
            read_line(&mut r, &mut buf, 10).await.unwrap(),
            Line::Complete
        );
        assert_eq!(buf, b"QUIT\r\n");
        assert_eq!(read_line(&mut r, &mut buf, 10).await.unwrap(), Line::Eof);
        // A long line ending in a bare LF says so, wherever the buffer splits.
        for cap in [3, 4, 7, 64] {
            let input: &[u8] = b"yyyyyyyyyyyyyyyyyyyyyyy\nok\r\n";
            let mut r = tokio::io::BufReader::with_capacity(cap, input);
            assert_eq!(
                read_line(&mut r, &mut buf, 10).await.unwrap(),
                Line::TooLong { crlf: false }
            );
            assert_eq!(
                read_line(&mut r, &mut buf, 10).await.unwrap(),
                Line::Complete
            );
            assert_eq!(buf, b"ok\r\n");
        }
    }
}

//! The PROXY protocol (v1 text, v2 binary) in front of an SMTP session.
//!
//! A load balancer in `[listen] proxy_protocol_from` opens each connection
//! with a header naming the real client; that address, not the balancer's,
//! is what `allowed_networks`, AUTH, the per-IP slots, logs, `Received:`
//! and history see. Only listed peers are read this way: from anyone else
//! the same bytes are just an SMTP client's (wrong) first line, so no client
//! can name an address of its choice.
//!
//! The header is read byte by byte up to its end and never beyond, so that
//! what follows it (the TLS handshake on `smtps`, or SMTP) stays in the
//! socket for the session. Parsing is `ppp`'s.

use std::net::SocketAddr;
use std::time::Duration;

use ppp::v2;
use tokio::io::{AsyncRead, AsyncReadExt};

/// A balancer sends the header with the connection: waiting longer only
/// holds a slot for something that is not a balancer.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The v2 signature; a v1 header starts with `PROXY `.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8; 6] = b"PROXY ";
/// The spec's limit for a v1 line, CRLF included.
const V1_MAX: usize = 107;
/// The v2 address block is at most 216 bytes (AF_UNIX); TLVs (TLS, ALPN,
/// unique ids) come after it. Balancers send far less than this.
const V2_MAX_PAYLOAD: usize = 1024;

/// Why a connection from a listed balancer is closed without a greeting.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum HeaderError {
    /// Closed before sending anything: a balancer's TCP health check.
    #[error("closed before sending a PROXY header")]
    Empty,
    #[error("no PROXY header within {}s", HEADER_TIMEOUT.as_secs())]
    Timeout,
    #[error("closed in the middle of the PROXY header")]
    Truncated,
    #[error("does not begin with a PROXY header (first bytes {0:?})")]
    Missing(String),
    #[error("PROXY v1 header longer than {V1_MAX} bytes")]
    TooLong,
    #[error("PROXY v2 header announces {0} bytes (at most {V2_MAX_PAYLOAD})")]
    TooLongV2(usize),
    #[error("bad PROXY header: {0}")]
    Invalid(String),
    #[error("{0}")]
    Io(String),
}

/// Reads the header from `r` within [`HEADER_TIMEOUT`]. Returns the real
/// client's address, or `None` when the header says to keep the
/// connection's own (v1 `UNKNOWN`, v2 `LOCAL`: the balancer's own checks).
pub async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<SocketAddr>, HeaderError> {
    tokio::time::timeout(HEADER_TIMEOUT, read_unbounded(r))
        .await
        .map_err(|_| HeaderError::Timeout)?
}

async fn read_unbounded<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<SocketAddr>, HeaderError> {
    let mut buf = Vec::with_capacity(V1_MAX);
    // The first bytes say which version, or that it is neither: a client
    // that starts with EHLO is turned away at its first byte.
    loop {
        let b = next_byte(r, buf.is_empty()).await?;
        buf.push(b);
        if V1_PREFIX.starts_with(&buf) {
            if buf.len() == V1_PREFIX.len() {
                return v1(r, buf).await;
            }
        } else if V2_SIGNATURE.starts_with(&buf) {
            if buf.len() == V2_SIGNATURE.len() {
                return v2(r, buf).await;
            }
        } else {
            return Err(HeaderError::Missing(
                String::from_utf8_lossy(&buf).into_owned(),
            ));
        }
    }
}

async fn next_byte<R: AsyncRead + Unpin>(r: &mut R, first: bool) -> Result<u8, HeaderError> {
    let mut b = [0u8; 1];
    match r.read(&mut b).await {
        Ok(1) => Ok(b[0]),
        Ok(_) if first => Err(HeaderError::Empty),
        Ok(_) => Err(HeaderError::Truncated),
        Err(e) => Err(HeaderError::Io(e.to_string())),
    }
}

async fn v1<R: AsyncRead + Unpin>(
    r: &mut R,
    mut buf: Vec<u8>,
) -> Result<Option<SocketAddr>, HeaderError> {
    while !buf.ends_with(b"\r\n") {
        if buf.len() >= V1_MAX {
            return Err(HeaderError::TooLong);
        }
        buf.push(next_byte(r, false).await?);
    }
    let header =
        ppp::v1::Header::try_from(&buf[..]).map_err(|e| HeaderError::Invalid(e.to_string()))?;
    Ok(match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Unknown => None,
    })
}

async fn v2<R: AsyncRead + Unpin>(
    r: &mut R,
    mut buf: Vec<u8>,
) -> Result<Option<SocketAddr>, HeaderError> {
    let mut fixed = [0u8; 4];
    read_exact(r, &mut fixed).await?;
    buf.extend_from_slice(&fixed);
    let len = u16::from_be_bytes([fixed[2], fixed[3]]) as usize;
    if len > V2_MAX_PAYLOAD {
        return Err(HeaderError::TooLongV2(len));
    }
    let start = buf.len();
    buf.resize(start + len, 0);
    read_exact(r, &mut buf[start..]).await?;
    let header = v2::Header::try_from(&buf[..]).map_err(|e| HeaderError::Invalid(e.to_string()))?;
    if header.command == v2::Command::Local {
        return Ok(None);
    }
    Ok(match header.addresses {
        v2::Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v2::Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        // The spec: for a family we cannot use, keep the connection's own.
        v2::Addresses::Unspecified | v2::Addresses::Unix(_) => None,
    })
}

async fn read_exact<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), HeaderError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(HeaderError::Truncated),
        Err(e) => Err(HeaderError::Io(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(bytes: &[u8]) -> (Result<Option<SocketAddr>, HeaderError>, Vec<u8>) {
        let mut r = bytes;
        let got = read_header(&mut r).await;
        (got, r.to_vec())
    }

    fn v2_header(command: u8, family: u8, addrs: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
        h.extend_from_slice(addrs);
        h
    }

    #[tokio::test]
    async fn v1_tcp4_tcp6_and_unknown() {
        let (got, rest) = parse(b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 25\r\nEHLO x\r\n").await;
        assert_eq!(got, Ok(Some("192.0.2.7:40000".parse().unwrap())));
        assert_eq!(rest, b"EHLO x\r\n", "nothing after the header is consumed");
        let (got, _) = parse(b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 25\r\n").await;
        assert_eq!(got, Ok(Some("[2001:db8::7]:40000".parse().unwrap())));
        let (got, _) = parse(b"PROXY UNKNOWN\r\n").await;
        assert_eq!(got, Ok(None));
    }

    #[tokio::test]
    async fn v2_proxy_and_local() {
        let ipv4 = [192, 0, 2, 7, 10, 0, 0, 1, 0x9c, 0x40, 0, 25];
        let (got, rest) = parse(&[v2_header(1, 0x11, &ipv4), b"EHLO".to_vec()].concat()).await;
        assert_eq!(got, Ok(Some("192.0.2.7:40000".parse().unwrap())));
        assert_eq!(rest, b"EHLO");
        let (got, _) = parse(&v2_header(0, 0x00, &[])).await;
        assert_eq!(got, Ok(None), "LOCAL keeps the connection's address");
        // TLVs after the addresses are read and skipped.
        let tlv = [&ipv4[..], &[0x04, 0, 1, 42]].concat();
        let (got, rest) = parse(&[v2_header(1, 0x11, &tlv), b"X".to_vec()].concat()).await;
        assert_eq!(got, Ok(Some("192.0.2.7:40000".parse().unwrap())));
        assert_eq!(rest, b"X");
    }

    #[tokio::test]
    async fn refusals() {
        assert_eq!(parse(b"").await.0, Err(HeaderError::Empty));
        assert_eq!(
            parse(b"EHLO x\r\n").await.0,
            Err(HeaderError::Missing("E".into()))
        );
        assert_eq!(
            parse(b"PROXY TCP4 1.2").await.0,
            Err(HeaderError::Truncated)
        );
        let long = format!("PROXY TCP4 {}\r\n", "1".repeat(200));
        assert_eq!(parse(long.as_bytes()).await.0, Err(HeaderError::TooLong));
        assert!(matches!(
            parse(b"PROXY TCP4 999.0.2.7 10.0.0.1 1 25\r\n").await.0,
            Err(HeaderError::Invalid(_))
        ));
        let mut big = V2_SIGNATURE.to_vec();
        big.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(parse(&big).await.0, Err(HeaderError::TooLongV2(65535)));
        // Version 3, and an IPv4 block too short for its addresses.
        assert!(matches!(
            parse(&[&V2_SIGNATURE[..], &[0x31, 0x11, 0, 0]].concat())
                .await
                .0,
            Err(HeaderError::Invalid(_))
        ));
        assert!(matches!(
            parse(&v2_header(1, 0x11, &[1, 2, 3])).await.0,
            Err(HeaderError::Invalid(_))
        ));
    }
}

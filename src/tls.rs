//! TLS plumbing shared by the listener and the delivery client: loading
//! certificates, building rustls configs, and one stream type that is either
//! plain TCP or TLS on either side, so SMTP code is written once.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Makes aws-lc-rs the process-wide rustls provider. Called once at start,
/// before any config is built, so that a second provider pulled in by a
/// dependency can never make `ClientConfig::builder()` panic.
pub fn install_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

pub fn load_certs(path: &Path) -> io::Result<Vec<CertificateDer<'static>>> {
    let mut rd = io::BufReader::new(std::fs::File::open(path)?);
    let certs = rustls_pemfile::certs(&mut rd).collect::<Result<Vec<_>, _>>()?;
    if certs.is_empty() {
        return Err(io::Error::other(format!(
            "{}: no PEM certificate found",
            path.display()
        )));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> io::Result<PrivateKeyDer<'static>> {
    let mut rd = io::BufReader::new(std::fs::File::open(path)?);
    rustls_pemfile::private_key(&mut rd)?
        .ok_or_else(|| io::Error::other(format!("{}: no PEM private key found", path.display())))
}

/// The server side, for STARTTLS and implicit-TLS listeners.
pub fn server_config(cert: &Path, key: &Path) -> io::Result<Arc<rustls::ServerConfig>> {
    let certs = load_certs(cert)?;
    let key = load_key(key)?;
    let cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| io::Error::other(format!("{}: {e}", cert.display())))?;
    Ok(Arc::new(cfg))
}

/// The client side, for upstream relays. Certificates are verified against
/// the system roots, or against `ca_file` alone when it is given;
/// `verify = false` is the explicit opt-out for a relay with a self-made
/// certificate.
pub fn client_config(
    ca_file: Option<&Path>,
    verify: bool,
) -> io::Result<Arc<rustls::ClientConfig>> {
    let builder = rustls::ClientConfig::builder();
    let cfg = if !verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(
                rustls::crypto::aws_lc_rs::default_provider(),
            )))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match ca_file {
            Some(ca) => {
                for c in load_certs(ca)? {
                    roots
                        .add(c)
                        .map_err(|e| io::Error::other(format!("{}: {e}", ca.display())))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for c in found.certs {
                    let _ = roots.add(c);
                }
                if roots.is_empty() {
                    return Err(io::Error::other(
                        "no system CA certificates found (install ca-certificates or set ca_file)",
                    ));
                }
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    Ok(Arc::new(cfg))
}

/// Accepts any server certificate: only when the operator wrote
/// `tls_verify = false`.
#[derive(Debug)]
struct NoVerify(rustls::crypto::CryptoProvider);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TCP connection, possibly wrapped in TLS (server or client side).
pub enum Stream {
    Plain(TcpStream),
    ServerTls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    ClientTls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    pub fn is_tls(&self) -> bool {
        !matches!(self, Stream::Plain(_))
    }

    /// The TCP connection under it.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::ServerTls(s) => s.get_ref().0,
            Stream::ClientTls(s) => s.get_ref().0,
        }
    }

    /// Whether the peer has said nothing since we last read: no bytes
    /// waiting (a "421 idle timeout", a TLS alert) and no end of stream.
    /// Asks the kernel (a peek that does not wait), so it is true only of a
    /// session that can carry the next command.
    pub fn quiet(&self) -> bool {
        use std::os::fd::AsRawFd;
        let fd = self.tcp().as_raw_fd();
        let mut b = [0u8; 1];
        // SAFETY: a one-byte buffer we own; MSG_PEEK leaves the data.
        let n = unsafe {
            libc::recv(
                fd,
                b.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::ServerTls(s) => Pin::new(s).poll_read(cx, buf),
            Stream::ClientTls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::ServerTls(s) => Pin::new(s).poll_write(cx, buf),
            Stream::ClientTls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::ServerTls(s) => Pin::new(s).poll_flush(cx),
            Stream::ClientTls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::ServerTls(s) => Pin::new(s).poll_shutdown(cx),
            Stream::ClientTls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// TLS client configs per upstream, built once per configuration.
pub fn client_tls_configs(
    cfg: &crate::config::Config,
) -> std::io::Result<std::collections::HashMap<String, std::sync::Arc<rustls::ClientConfig>>> {
    let mut out = std::collections::HashMap::new();
    for (name, u) in &cfg.upstreams {
        let c = if u.security == crate::config::Security::None && u.ca_file.is_none() {
            // Never used for TLS, but keeps the map total.
            client_config(None, false)?
        } else {
            client_config(u.ca_file.as_deref(), u.tls_verify)
                .map_err(|e| std::io::Error::other(format!("upstreams.{name}: {e}")))?
        };
        out.insert(name.clone(), c);
    }
    Ok(out)
}

/// Why a TLS handshake with `host` failed and what fixes it (`upstream`:
/// its name in the config, when known). Empty when there is nothing to say
/// beyond the error.
pub fn tls_advice(err: &str, upstream: Option<&str>, host: &str, port: u16) -> String {
    let key = |k: &str| match upstream {
        Some(n) => format!("upstreams.{n}.{k}"),
        None => format!("the upstream's {k}"),
    };
    let e = err.to_ascii_lowercase();
    if e.contains("causedasendentity")
        || e.contains("ca used as end entity")
        || e.contains("self signed")
        || e.contains("self-signed")
    {
        format!(
            "the server presents a CA certificate as its own (a self-signed certificate): if it is the one you expect, put it in {} to trust it (tls_verify = false would trust anyone)",
            key("ca_file")
        )
    } else if e.contains("expired") {
        "the server's certificate has expired: the smart host's operator must renew it (tls_verify = false would hide the problem, not fix it)".into()
    } else if e.contains("notvalidforname") || e.contains("not valid for name") {
        format!(
            "certificate name mismatch: {} = {host:?} is not a name in the server's certificate; use the host name the provider documents",
            key("host")
        )
    } else if e.contains("unknownissuer") || e.contains("unknown issuer") {
        format!(
            "the certificate is not signed by a CA herald trusts: set {} to the provider's CA (or, for a private smart host, the CA that signed its certificate)",
            key("ca_file")
        )
    } else if e.contains("corrupt")
        || e.contains("invalid content type")
        || e.contains("wrong version")
        || e.contains("received corrupt message")
    {
        format!(
            "port {port} does not speak TLS from the first byte: use security = \"starttls\" (usually port 587) or \"none\""
        )
    } else {
        String::new()
    }
}

//! DKIM: signers built once at start-up from `[[dkim]]`, the choice of key
//! by the final From domain, and `herald dkim-keygen`.
//!
//! mail-auth canonicalizes and signs, but herald writes the
//! `DKIM-Signature` field itself: mail-auth ends it with `;` after `b=`
//! and, when the value ends at a wrap point, folds before that `;`, which
//! dkimpy (and so many receivers' milters) refuses. Here `b=` comes last
//! and nothing follows its value, so every verifier reads the field the
//! same way.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der, PublicKeyX509Der};
use aws_lc_rs::signature::KeyPair as _;
use base64::Engine;
use mail_auth::common::crypto::{Algorithm, DkimKey, Ed25519Key, RsaKey, Sha256, SigningKey};
use mail_auth::dkim::Canonicalization;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::config::Config;

/// Signed header fields. From is listed twice: the second, unmatched entry
/// "oversigns" it, so that a From added in transit breaks the signature.
/// Fields listed but absent are signed as absent (mail-auth appends them),
/// so nobody can add a Cc or Reply-To later either.
pub const SIGNED_HEADERS: [&str; 12] = [
    "From",
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    // Maps complaints back to the message ([bounces]); signed, and listed
    // when absent, so that nobody can add one on the way.
    "X-Herald-Ref",
];

#[derive(Debug, thiserror::Error)]
pub enum DkimError {
    #[error("{path}: {problem}")]
    Key { path: String, problem: String },
    #[error("signing failed: {0}")]
    Sign(String),
}

struct Signer {
    domain: String,
    selector: String,
    key: DkimKey,
}

/// All configured signers.
#[derive(Default)]
pub struct Signers {
    list: Vec<Signer>,
}

fn key_error(path: &Path, problem: String) -> DkimError {
    DkimError::Key {
        path: path.display().to_string(),
        problem,
    }
}

/// Reads the first private key of a PEM file.
fn read_pem_key(path: &Path) -> Result<PrivateKeyDer<'static>, DkimError> {
    let pem = std::fs::read(path).map_err(|e| key_error(path, e.to_string()))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| key_error(path, format!("not a PEM private key: {e}")))?
        .ok_or_else(|| key_error(path, "no PEM private key found".into()))
}

/// Loads a PKCS#8 (or PKCS#1 RSA) PEM private key for DKIM.
pub fn load_key(path: &Path) -> Result<DkimKey, DkimError> {
    let err = |problem: String| key_error(path, problem);
    let der = read_pem_key(path)?;
    match der {
        PrivateKeyDer::Pkcs8(p8) => {
            let bytes = p8.secret_pkcs8_der().to_vec();
            if let Ok(k) = RsaKey::<Sha256>::from_key_der(PrivateKeyDer::Pkcs8(
                PrivatePkcs8KeyDer::from(bytes.clone()),
            )) {
                return Ok(DkimKey::Rsa(k));
            }
            Ed25519Key::from_pkcs8_der(&bytes)
                .or_else(|_| Ed25519Key::from_pkcs8_maybe_unchecked_der(&bytes))
                .map(DkimKey::Ed25519)
                .map_err(|_| err("PKCS#8 key is neither RSA nor Ed25519".into()))
        }
        other @ PrivateKeyDer::Pkcs1(_) => RsaKey::<Sha256>::from_key_der(other)
            .map(DkimKey::Rsa)
            .map_err(|e| err(format!("bad RSA key: {e}"))),
        _ => Err(err(
            "unsupported key type (use RSA or Ed25519, PKCS#8 PEM)".into()
        )),
    }
}

impl Signers {
    /// Builds every signer; a key that does not load is an error naming
    /// its file.
    pub fn from_config(cfg: &Config) -> Result<Signers, DkimError> {
        let mut list = Vec::new();
        for d in &cfg.dkim {
            list.push(Signer {
                domain: d.domain.clone(),
                selector: d.selector.clone(),
                key: load_key(&d.private_key)?,
            });
        }
        Ok(Signers { list })
    }

    /// The signer for `domain`: an exact match, else the nearest parent.
    fn find(&self, domain: &str) -> Option<&Signer> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let mut d = domain.as_str();
        loop {
            if let Some(s) = self.list.iter().find(|s| s.domain == d) {
                return Some(s);
            }
            match d.split_once('.') {
                Some((_, parent)) if parent.contains('.') => d = parent,
                _ => return None,
            }
        }
    }

    pub fn has_key_for(&self, domain: &str) -> bool {
        self.find(domain).is_some()
    }

    /// Returns the DKIM-Signature header (with CRLF) for the message, or
    /// None when no key covers the From domain.
    pub fn sign(&self, from_domain: &str, message: &[u8]) -> Result<Option<String>, DkimError> {
        let Some(s) = self.find(from_domain) else {
            return Ok(None);
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        s.sign(message, now).map(Some)
    }
}

impl Signer {
    /// relaxed/relaxed over [`SIGNED_HEADERS`]: every instance present,
    /// bottom-up (RFC 6376 5.4.2), then the names absent (and the second
    /// From) so that none can be added later.
    fn sign(&self, message: &[u8], now: u64) -> Result<String, DkimError> {
        let relaxed = Canonicalization::Relaxed;
        let (fields, body) =
            crate::rewrite::split(message).map_err(|e| DkimError::Sign(e.to_string()))?;
        let mut found: Vec<(&[u8], &[u8])> = Vec::new();
        let mut seen = [false; SIGNED_HEADERS.len()];
        for f in &fields {
            let (name, value) = (f.name.as_bytes(), &f.raw[f.name.len() + 1..]);
            if let Some(pos) = SIGNED_HEADERS
                .iter()
                .position(|h| name.eq_ignore_ascii_case(h.as_bytes()))
            {
                found.push((name, value));
                seen[pos] = true;
            }
        }
        if found.is_empty() {
            return Err(DkimError::Sign("no header field to sign".into()));
        }
        found.reverse();
        let mut names: Vec<String> = found
            .iter()
            .map(|(n, _)| String::from_utf8_lossy(n).into_owned())
            .collect();
        for (pos, h) in SIGNED_HEADERS.iter().enumerate() {
            if !seen[pos] {
                names.push(h.to_string());
            }
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        let bh = b64.encode(
            self.key
                .hash(relaxed.canonical_body(body, u64::MAX))
                .as_ref(),
        );
        let alg = match self.key.algorithm() {
            Algorithm::Ed25519Sha256 => "ed25519-sha256",
            Algorithm::RsaSha1 => "rsa-sha1",
            Algorithm::RsaSha256 => "rsa-sha256",
        };
        // Folds only between tags and before a ':' of h=, where FWS is
        // allowed; b= last, empty while hashing (RFC 6376 3.7).
        let mut field = format!(
            "DKIM-Signature: v=1; a={alg}; c=relaxed/relaxed; d={}; s={};\r\n\tt={now};\r\n\th=",
            self.domain, self.selector
        );
        let mut width = 3;
        for (i, n) in names.iter().enumerate() {
            if i > 0 {
                if width + n.len() + 1 > 76 {
                    field.push_str("\r\n\t");
                    width = 1;
                }
                field.push(':');
                width += 1;
            }
            field.push_str(n);
            width += n.len();
        }
        field.push_str(&format!(";\r\n\tbh={bh};\r\n\tb="));
        let mut signed = Vec::with_capacity(1024);
        relaxed.canonicalize_headers(found.into_iter(), &mut signed);
        let value = &field.as_bytes()["DKIM-Signature:".len()..];
        relaxed.canonicalize_headers(
            std::iter::once((&b"DKIM-Signature"[..], value)),
            &mut signed,
        );
        let b = self
            .key
            .sign(&signed[..])
            .map_err(|e| DkimError::Sign(e.to_string()))?;
        let b = b64.encode(b);
        for (i, chunk) in b.as_bytes().chunks(72).enumerate() {
            if i > 0 {
                field.push_str("\r\n\t  ");
            }
            field.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        }
        field.push_str("\r\n");
        Ok(field)
    }
}

fn record(k: &str, public: &[u8]) -> String {
    format!(
        "v=DKIM1; k={k}; p={}",
        base64::engine::general_purpose::STANDARD.encode(public)
    )
}

/// The TXT record (`v=DKIM1; k=...; p=...`) that goes with a private key
/// file: p= is the SubjectPublicKeyInfo for RSA, the raw key for Ed25519.
pub fn public_record(path: &Path) -> Result<String, DkimError> {
    let err = |problem: String| key_error(path, problem);
    let der = read_pem_key(path)?;
    let rsa = match &der {
        PrivateKeyDer::Pkcs8(p8) => aws_lc_rs::rsa::KeyPair::from_pkcs8(p8.secret_pkcs8_der()).ok(),
        PrivateKeyDer::Pkcs1(p1) => aws_lc_rs::rsa::KeyPair::from_der(p1.secret_pkcs1_der()).ok(),
        _ => None,
    };
    if let Some(kp) = rsa {
        let spki: PublicKeyX509Der = kp
            .public_key()
            .as_der()
            .map_err(|_| err("cannot encode the public key".into()))?;
        return Ok(record("rsa", spki.as_ref()));
    }
    if let PrivateKeyDer::Pkcs8(p8) = &der {
        if let Ok(kp) =
            aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(p8.secret_pkcs8_der())
        {
            return Ok(record("ed25519", kp.public_key().as_ref()));
        }
    }
    Err(err("neither an RSA nor an Ed25519 key".into()))
}

/// Whether a published p= is our key. RSA records may carry the
/// SubjectPublicKeyInfo (what we print) or only the PKCS#1 key inside it.
pub fn same_public_key(ours_b64: &str, published_b64: &str) -> bool {
    let b64 = base64::engine::general_purpose::STANDARD;
    match (b64.decode(ours_b64), b64.decode(published_b64)) {
        (Ok(ours), Ok(theirs)) => {
            !theirs.is_empty() && (ours == theirs || (theirs.len() > 64 && ours.ends_with(&theirs)))
        }
        _ => false,
    }
}

/// What `dkim-keygen` made: the DNS name and TXT record to publish.
pub struct Generated {
    pub name: String,
    pub record: String,
}

impl Generated {
    /// The record split in quoted strings of at most 255 characters, as a
    /// zone file or a DNS console wants it.
    pub fn zone_line(&self) -> String {
        let parts: Vec<String> = self
            .record
            .as_bytes()
            .chunks(255)
            .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
            .collect();
        format!("{}. IN TXT ( {} )", self.name, parts.join(" "))
    }
}

/// Generates a key, writes it as PKCS#8 PEM with mode 0600 (refusing to
/// overwrite), and returns the record to publish.
pub fn keygen(
    domain: &str,
    selector: &str,
    algorithm: &str,
    out: &Path,
) -> anyhow::Result<Generated> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let (pkcs8, k, public) = match algorithm {
        "rsa" => {
            let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
                .map_err(|_| anyhow::anyhow!("RSA key generation failed"))?;
            let der: Pkcs8V1Der = kp
                .as_der()
                .map_err(|_| anyhow::anyhow!("encoding failed"))?;
            let spki: PublicKeyX509Der = kp
                .public_key()
                .as_der()
                .map_err(|_| anyhow::anyhow!("encoding failed"))?;
            (der.as_ref().to_vec(), "rsa", spki.as_ref().to_vec())
        }
        "ed25519" => {
            let doc = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8v1(
                &aws_lc_rs::rand::SystemRandom::new(),
            )
            .map_err(|_| anyhow::anyhow!("Ed25519 key generation failed"))?;
            let kp = aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(doc.as_ref())
                .map_err(|_| anyhow::anyhow!("Ed25519 key generation failed"))?;
            // RFC 8463: p= is the raw 32-byte public key.
            (
                doc.as_ref().to_vec(),
                "ed25519",
                kp.public_key().as_ref().to_vec(),
            )
        }
        other => anyhow::bail!("--algorithm: {other:?} is not rsa or ed25519"),
    };
    let body = b64.encode(&pkcs8);
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|e| anyhow::anyhow!("--out {}: {e}", out.display()))?;
    f.write_all(pem.as_bytes())?;
    f.sync_all()?;
    Ok(Generated {
        name: format!("{selector}._domainkey.{domain}"),
        record: record(k, &public),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_chosen_by_exact_then_parent_domain() {
        let dir = tempfile::tempdir().unwrap();
        keygen("example.com", "a", "ed25519", &dir.path().join("a.pem")).unwrap();
        keygen("mail.example.com", "b", "rsa", &dir.path().join("b.pem")).unwrap();
        let text = "[sender]\ndefault_sender = \"n@example.com\"\n\
            [[dkim]]\ndomain = \"example.com\"\nselector = \"a\"\nprivate_key = \"a.pem\"\n\
            [[dkim]]\ndomain = \"mail.example.com\"\nselector = \"b\"\nprivate_key = \"b.pem\"\n";
        let cfg = Config::parse(text, &dir.path().join("h.toml")).unwrap();
        let s = Signers::from_config(&cfg).unwrap();
        assert_eq!(
            s.find("mail.example.com").unwrap().domain,
            "mail.example.com"
        );
        assert_eq!(
            s.find("x.mail.example.com").unwrap().domain,
            "mail.example.com"
        );
        assert_eq!(s.find("news.example.com").unwrap().domain, "example.com");
        assert_eq!(s.find("EXAMPLE.COM").unwrap().domain, "example.com");
        assert!(s.find("example.org").is_none());
        assert!(s.find("com").is_none());
        let msg = b"From: n@news.example.com\r\nSubject: x\r\n\r\nbody\r\n";
        let sig = s.sign("news.example.com", msg).unwrap().unwrap();
        assert!(
            sig.contains("d=example.com") && sig.contains("s=a"),
            "{sig}"
        );
        assert!(
            sig.contains(":From:From:To:Cc:"),
            "From oversigned, absent Cc signed: {sig}"
        );
        assert!(keygen("example.com", "a", "dsa", &dir.path().join("c.pem")).is_err());
    }
}

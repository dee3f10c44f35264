//! SMTP AUTH (RFC 4954), PLAIN and LOGIN, checked against
//! `[[listen.users]]`.
//!
//! The session loop handles AUTH rather than mailin: mailin's state machine
//! demands AUTH of every client once it is enabled and forgets a successful
//! login after RSET or EHLO. The loop decides whether AUTH may be used at
//! all (users configured, TLS or loopback, no transaction open); this module
//! runs the exchange.

use std::net::SocketAddr;

use base64::Engine;

use crate::config::Config;
use crate::replies::{self, Reply};

/// Failed logins before the connection is closed.
const MAX_FAILURES: u32 = 3;

#[derive(Default)]
enum Step {
    #[default]
    Idle,
    PlainWait,
    LoginUser,
    LoginPass(String),
}

/// The AUTH state of one session.
#[derive(Default)]
pub struct Auth {
    step: Step,
    /// The user that logged in, for the whole session.
    pub user: Option<String>,
    failures: u32,
}

fn say(out: &mut Vec<u8>, r: &Reply) {
    r.write_to(out);
}

/// A continuation (334) or a reply not in the table.
fn reply(out: &mut Vec<u8>, code: u16, text: &str) {
    out.extend_from_slice(format!("{code} {text}\r\n").as_bytes());
}

/// Compares without an early exit, so timing does not leak a prefix.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() != b.len()) as u8;
    for (x, y) in a.iter().zip(b.iter()) {
        diff |= x ^ y;
    }
    diff == 0
}

fn decode(b64: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()
}

/// An AUTH PLAIN response: authzid NUL authcid NUL password. An authzid
/// other than the user itself is refused.
fn decode_plain(b64: &str) -> Option<(String, String)> {
    let raw = decode(b64)?;
    let mut parts = raw.split(|&b| b == 0);
    let authz = String::from_utf8(parts.next()?.to_vec()).ok()?;
    let user = String::from_utf8(parts.next()?.to_vec()).ok()?;
    let pass = String::from_utf8(parts.next()?.to_vec()).ok()?;
    if parts.next().is_some() || (!authz.is_empty() && authz != user) {
        return None;
    }
    Some((user, pass))
}

fn decode_text(b64: &str) -> Option<String> {
    String::from_utf8(decode(b64)?).ok()
}

impl Auth {
    /// Abandons an exchange (the client sent something that is no answer).
    pub fn abort(&mut self) {
        self.step = Step::Idle;
    }

    /// An exchange is waiting for the client's next base64 line.
    pub fn in_progress(&self) -> bool {
        !matches!(self.step, Step::Idle)
    }

    /// `AUTH mech [initial-response]`. Returns true when the session must
    /// close.
    pub fn start(
        &mut self,
        cfg: &Config,
        peer: SocketAddr,
        mech: &str,
        initial: Option<&str>,
        out: &mut Vec<u8>,
    ) -> bool {
        match (mech.to_ascii_uppercase().as_str(), initial) {
            ("PLAIN", None) => {
                self.step = Step::PlainWait;
                reply(out, 334, "");
                false
            }
            ("LOGIN", None) => {
                self.step = Step::LoginUser;
                reply(out, 334, "VXNlcm5hbWU6");
                false
            }
            ("PLAIN", Some(r)) => {
                self.step = Step::PlainWait;
                self.answer(cfg, peer, r, out)
            }
            ("LOGIN", Some(r)) => {
                self.step = Step::LoginUser;
                self.answer(cfg, peer, r, out)
            }
            _ => {
                say(out, &replies::AUTH_UNKNOWN_MECHANISM);
                false
            }
        }
    }

    /// The client's answer to a 334 challenge. Returns true when the
    /// session must close.
    pub fn answer(
        &mut self,
        cfg: &Config,
        peer: SocketAddr,
        line: &str,
        out: &mut Vec<u8>,
    ) -> bool {
        let step = std::mem::take(&mut self.step);
        if line == "*" {
            say(out, &replies::AUTH_CANCELLED);
            return false;
        }
        let creds = match step {
            Step::PlainWait => decode_plain(line),
            Step::LoginUser => match decode_text(line) {
                Some(u) => {
                    self.step = Step::LoginPass(u);
                    reply(out, 334, "UGFzc3dvcmQ6");
                    return false;
                }
                None => None,
            },
            Step::LoginPass(u) => decode_text(line).map(|p| (u, p)),
            Step::Idle => None,
        };
        let Some((user, pass)) = creds else {
            // Bad base64 or a foreign authzid is a failed attempt too, or
            // a client could guess without limit by sending junk between
            // tries.
            self.failures += 1;
            tracing::warn!(%peer, "AUTH failed: undecodable response or foreign authzid");
            say(out, &replies::AUTH_UNDECODABLE);
            return self.too_many(out);
        };
        let ok = cfg.listen.users.iter().any(|u| {
            ct_eq(u.username.as_bytes(), user.as_bytes())
                & ct_eq(u.password.expose().as_bytes(), pass.as_bytes())
        });
        if ok {
            tracing::info!(%peer, user, "AUTH ok");
            self.user = Some(user);
            say(out, &replies::AUTH_OK);
            return false;
        }
        self.failures += 1;
        tracing::warn!(%peer, user, "AUTH failed");
        say(out, &replies::AUTH_INVALID);
        self.too_many(out)
    }

    /// After the last allowed failure: 421, and the session closes.
    fn too_many(&self, out: &mut Vec<u8>) -> bool {
        if self.failures >= MAX_FAILURES {
            say(out, &replies::AUTH_TOO_MANY_FAILURES);
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_responses() {
        let b = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
        assert_eq!(decode_plain(&b(b"\0u\0p")), Some(("u".into(), "p".into())));
        assert_eq!(decode_plain(&b(b"u\0u\0p")), Some(("u".into(), "p".into())));
        assert_eq!(
            decode_plain(&b(b"other\0u\0p")),
            None,
            "acting as someone else"
        );
        assert_eq!(decode_plain(&b(b"\0u")), None);
        assert_eq!(decode_plain("!!"), None);
    }
}

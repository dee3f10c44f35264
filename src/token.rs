//! Return-path tokens and `X-Herald-Ref:` values: what herald writes into
//! outgoing mail so that what comes back names the message and recipient,
//! and nobody else can make a report count against an address.
//!
//! A token is the local part `b-` + lowercase base32 (RFC 4648, no padding)
//! of: version (1 byte), key id (1), expiry day since the epoch (2, big
//! endian), the queue id (its 60 bits in 8 bytes), the recipient's index
//! in the message (2) and the first 10 bytes (80 bits) of HMAC-SHA256 over
//! what precedes it: 24 bytes, 39 characters, 41 with `b-`.

use aws_lc_rs::hmac;

const VERSION: u8 = 1;
const MAC_LEN: usize = 10;
const BODY_LEN: usize = 1 + 1 + 2 + 8 + 2;
const DAY_MS: u64 = 86_400_000;
/// A report may come this long after the attempt (RFC 5321 suggests
/// queues of 4 to 5 days; some providers report later).
pub const LIFETIME_DAYS: u64 = 30;

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// RFC 4648 base32 in lowercase, no padding; decoding takes either case
/// (a hop may uppercase the local part).
static B32: std::sync::LazyLock<data_encoding::Encoding> = std::sync::LazyLock::new(|| {
    let mut spec = data_encoding::Specification::new();
    spec.symbols.push_str("abcdefghijklmnopqrstuvwxyz234567");
    spec.translate.from.push_str("ABCDEFGHIJKLMNOPQRSTUVWXYZ");
    spec.translate.to.push_str("abcdefghijklmnopqrstuvwxyz");
    spec.encoding().expect("a valid base32 specification")
});

fn base32(bytes: &[u8]) -> String {
    B32.encode(bytes)
}

fn unbase32(text: &str) -> Option<Vec<u8>> {
    B32.decode(text.as_bytes()).ok()
}

/// A queue id (12 Crockford base32 characters) as a number.
fn id_value(id: &str) -> Option<u64> {
    if id.len() != 12 {
        return None;
    }
    id.bytes().try_fold(0u64, |v, c| {
        let d = CROCKFORD
            .iter()
            .position(|&x| x == c.to_ascii_uppercase())? as u64;
        Some((v << 5) | d)
    })
}

fn id_text(v: u64) -> String {
    (0..12)
        .rev()
        .map(|i| CROCKFORD[((v >> (i * 5)) & 31) as usize] as char)
        .collect()
}

/// The key and its id (the first byte of its SHA-256), which says in a log
/// line that a token was made under another key.
#[derive(Clone)]
pub struct Key {
    key: hmac::Key,
    id: u8,
}

impl Key {
    pub fn new(secret: &[u8]) -> Key {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, secret);
        Key {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            id: digest.as_ref()[0],
        }
    }

    fn mac(&self, domain: u8, data: &[u8]) -> [u8; MAC_LEN] {
        let mut ctx = hmac::Context::with_key(&self.key);
        // Tokens and references are signed apart: one is never the other.
        ctx.update(&[domain]);
        ctx.update(data);
        let tag = ctx.sign();
        let mut out = [0u8; MAC_LEN];
        out.copy_from_slice(&tag.as_ref()[..MAC_LEN]);
        out
    }
}

fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// The local part `b-...` for recipient `index` of message `id`, valid
/// until [`LIFETIME_DAYS`] after `now_ms`. None for an id herald did not make.
pub fn make(key: &Key, id: &str, index: usize, now_ms: u64) -> Option<String> {
    let v = id_value(id)?;
    let index = u16::try_from(index).ok()?;
    let day = u16::try_from(now_ms / DAY_MS + LIFETIME_DAYS).ok()?;
    let mut b = Vec::with_capacity(BODY_LEN + MAC_LEN);
    b.push(VERSION);
    b.push(key.id);
    b.extend_from_slice(&day.to_be_bytes());
    b.extend_from_slice(&v.to_be_bytes());
    b.extend_from_slice(&index.to_be_bytes());
    let mac = key.mac(b't', &b);
    b.extend_from_slice(&mac);
    Some(format!("b-{}", base32(&b)))
}

/// What a genuine token names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub id: String,
    pub index: usize,
    /// The last day (since the epoch) on which it is accepted.
    pub expires_day: u64,
}

/// Why a local part is not a token that herald accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not of the form, or its signature does not verify.
    Forged,
    /// Genuine, but older than its lifetime.
    Expired,
}

/// Checks a local part (case does not matter: some servers lowercase or
/// uppercase addresses).
pub fn verify(key: &Key, local: &str, now_ms: u64) -> Result<Token, Refusal> {
    let body = local
        .get(..2)
        .filter(|p| p.eq_ignore_ascii_case("b-"))
        .and_then(|_| local.get(2..))
        .ok_or(Refusal::Forged)?;
    let raw = unbase32(body).ok_or(Refusal::Forged)?;
    if raw.len() != BODY_LEN + MAC_LEN || raw[0] != VERSION {
        return Err(Refusal::Forged);
    }
    let (data, mac) = raw.split_at(BODY_LEN);
    if raw[1] != key.id || !same(&key.mac(b't', data), mac) {
        return Err(Refusal::Forged);
    }
    let day = u16::from_be_bytes([data[2], data[3]]) as u64;
    if now_ms / DAY_MS > day {
        return Err(Refusal::Expired);
    }
    let v = u64::from_be_bytes(data[4..12].try_into().expect("8 bytes"));
    let index = u16::from_be_bytes([data[12], data[13]]) as usize;
    Ok(Token {
        id: id_text(v),
        index,
        expires_day: day,
    })
}

/// The value of `X-Herald-Ref:` for message `id`: the id and a MAC, so a
/// complaint quoting the message maps back to it, and a forged header in a
/// quoted message maps to nothing.
pub fn reference(key: &Key, id: &str) -> String {
    format!("{id}.{}", base32(&key.mac(b'r', id.as_bytes())))
}

/// The queue id named by a genuine `X-Herald-Ref:` value.
pub fn verify_reference(key: &Key, value: &str) -> Option<String> {
    let value = value.trim().trim_matches(|c| c == '<' || c == '>');
    let (id, mac) = value.split_once('.')?;
    let id = id.to_ascii_uppercase();
    id_value(&id)?;
    let mac = unbase32(mac)?;
    same(&key.mac(b'r', id.as_bytes()), &mac).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_790_000_000_000;

    #[test]
    fn a_token_names_its_message_and_recipient_until_it_expires() {
        let k = Key::new(b"0123456789abcdef0123");
        let t = make(&k, "01JH5Z8Q3M7K", 7, NOW).unwrap();
        assert!(t.starts_with("b-"));
        assert!(t.len() <= 64, "{t}");
        assert_eq!(t.len(), 41);
        assert!(t[2..]
            .bytes()
            .all(|c| b"abcdefghijklmnopqrstuvwxyz234567".contains(&c)));
        let v = verify(&k, &t, NOW).unwrap();
        assert_eq!(v.id, "01JH5Z8Q3M7K");
        assert_eq!(v.index, 7);
        // Case changed by a server on the way: still the token.
        assert_eq!(verify(&k, &t.to_ascii_uppercase(), NOW).unwrap().index, 7);
        let later = NOW + (LIFETIME_DAYS + 1) * DAY_MS;
        assert_eq!(verify(&k, &t, later), Err(Refusal::Expired));
        assert!(verify(&k, &t, NOW + (LIFETIME_DAYS - 1) * DAY_MS).is_ok());
    }

    #[test]
    fn forged_tokens_are_refused() {
        let k = Key::new(b"0123456789abcdef0123");
        let other = Key::new(b"another key of twenty");
        let t = make(&k, "01JH5Z8Q3M7K", 0, NOW).unwrap();
        assert_eq!(verify(&other, &t, NOW), Err(Refusal::Forged));
        // Every single-character change is caught.
        for i in 2..t.len() {
            let mut b = t.clone().into_bytes();
            b[i] = if b[i] == b'a' { b'b' } else { b'a' };
            let s = String::from_utf8(b).unwrap();
            if s != t {
                assert!(verify(&k, &s, NOW).is_err(), "{s}");
            }
        }
        for bad in ["", "b-", "bounces", "b-!!!", "b-aaaa", &t[..t.len() - 1]] {
            assert_eq!(verify(&k, bad, NOW), Err(Refusal::Forged), "{bad}");
        }
        assert!(make(&k, "not-an-id", 0, NOW).is_none());
    }

    #[test]
    fn references_verify_and_differ_from_tokens() {
        let k = Key::new(b"0123456789abcdef0123");
        let r = reference(&k, "01JH5Z8Q3M7K");
        assert_eq!(verify_reference(&k, &r).as_deref(), Some("01JH5Z8Q3M7K"));
        assert_eq!(
            verify_reference(&k, &format!(" <{r}> ")).as_deref(),
            Some("01JH5Z8Q3M7K")
        );
        assert!(verify_reference(&k, "01JH5Z8Q3M7K.aaaaaaaaaaaaaaaa").is_none());
        assert!(verify_reference(&Key::new(b"another key of twenty"), &r).is_none());
        assert_eq!(base32(&unbase32("abcdefgh").unwrap()), "abcdefgh");
    }
}

//! Types that travel with the mail from the listener to the queue: every
//! stage (`rewrite`, `smtp_in::reception`, `queue`) takes them from here,
//! so that the pure rewrite stage does not depend on the listener it
//! serves. The queued form, [`crate::state::spool::Envelope`], lives with the
//! spool that owns it.

use std::net::IpAddr;

/// One SMTP transaction as the session collected it.
#[derive(Debug, Clone)]
pub struct Transaction {
    pub peer: IpAddr,
    pub helo: String,
    pub tls: bool,
    pub auth_user: Option<String>,
    /// MAIL FROM as given ("" for the null sender).
    pub sender: String,
    pub rcpts: Vec<String>,
    /// MAIL FROM had SMTPUTF8.
    pub smtputf8: bool,
    /// MAIL FROM had BODY=8BITMIME.
    pub body_8bit: bool,
}

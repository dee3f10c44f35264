//! Every SMTP reply herald sends, in one table: the platform's listeners,
//! the `[bounces]` intake, AUTH, and the refusals at connect time. (What
//! herald makes of a remote server's replies is [`crate::reply`].)
//!
//! A reply is a code and a text that begins with the enhanced status code
//! (RFC 3463) where one applies; the session writes it as `CODE TEXT`.

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

/// One SMTP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub text: Cow<'static, str>,
}

impl Reply {
    pub const fn fixed(code: u16, text: &'static str) -> Reply {
        Reply {
            code,
            text: Cow::Borrowed(text),
        }
    }

    pub fn new(code: u16, text: String) -> Reply {
        Reply {
            code,
            text: Cow::Owned(text),
        }
    }

    /// Appends `CODE TEXT\r\n` to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(format!("{self}\r\n").as_bytes());
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.text)
    }
}

// Session: commands and their order.
pub const OK: Reply = Reply::fixed(250, "2.0.0 Ok");
pub const SENDER_OK: Reply = Reply::fixed(250, "2.1.0 Ok");
pub const RECIPIENT_OK: Reply = Reply::fixed(250, "2.1.5 Ok");
pub const START_DATA: Reply = Reply::fixed(354, "End data with <CR><LF>.<CR><LF>");
pub const BYE: Reply = Reply::fixed(221, "2.0.0 Bye");
pub const HELP: Reply = Reply::fixed(214, "2.0.0 See RFC 5321");
pub const CANNOT_VRFY: Reply = Reply::fixed(252, "2.5.0 Cannot VRFY user, but will accept message");
pub const NOT_RECOGNIZED: Reply = Reply::fixed(500, "5.5.2 Command not recognized");
pub const NOT_CRLF: Reply = Reply::fixed(500, "5.5.2 Syntax error: command not terminated by CRLF");
pub const BAD_SEQUENCE: Reply = Reply::fixed(503, "5.5.1 Bad sequence of commands");
pub const EHLO_FIRST: Reply = Reply::fixed(503, "5.5.1 Send EHLO or HELO first");
pub const NESTED_MAIL: Reply = Reply::fixed(503, "5.5.1 Nested MAIL command");
pub const NEED_MAIL: Reply = Reply::fixed(503, "5.5.1 Need MAIL command first");
pub const NEED_RCPT: Reply = Reply::fixed(503, "5.5.1 Need RCPT command first");
pub const NO_BDAT: Reply = Reply::fixed(502, "5.5.1 BDAT not implemented; use DATA");
pub const MAIL_SYNTAX: Reply = Reply::fixed(501, "5.5.4 Syntax: MAIL FROM:<address>");
pub const RCPT_SYNTAX: Reply = Reply::fixed(501, "5.5.4 Syntax: RCPT TO:<address>");
pub const BAD_SIZE: Reply = Reply::fixed(501, "5.5.4 Bad SIZE value");
pub const SENDER_NOT_UTF8: Reply = Reply::fixed(501, "5.1.7 Bad sender address: not UTF-8");
pub const SENDER_SYNTAX: Reply = Reply::fixed(501, "5.1.7 Bad sender address syntax");
pub const RCPT_NOT_UTF8: Reply = Reply::fixed(501, "5.1.3 Bad recipient address: not UTF-8");
pub const RCPT_SYNTAX_BAD: Reply = Reply::fixed(501, "5.1.3 Bad recipient address syntax");
pub const AUTH_REQUIRED: Reply = Reply::fixed(530, "5.7.0 Authentication required");
/// A local failure: the message is not acknowledged, the client retries.
pub const STORAGE_ERROR: Reply = Reply::fixed(451, "4.3.0 Local storage error; try again later");
pub const SIGNING_ERROR: Reply =
    Reply::fixed(451, "4.3.0 Local error while signing; try again later");

// AUTH (RFC 4954).
pub const AUTH_NOT_FOR_REPORTS: Reply = Reply::fixed(
    503,
    "5.5.1 AUTH not available: this listener only takes reports",
);
pub const AUTH_NO_USERS: Reply =
    Reply::fixed(503, "5.5.1 AUTH not available: no users are configured");
pub const AUTH_NEEDS_TLS: Reply =
    Reply::fixed(538, "5.7.11 Encryption required: use STARTTLS first");
pub const AUTH_ALREADY: Reply = Reply::fixed(503, "5.5.1 Already authenticated");
pub const AUTH_IN_TRANSACTION: Reply =
    Reply::fixed(503, "5.5.1 AUTH not allowed during a mail transaction");
pub const AUTH_UNKNOWN_MECHANISM: Reply = Reply::fixed(
    504,
    "5.5.4 Unrecognized authentication type (use PLAIN or LOGIN)",
);
pub const AUTH_CANCELLED: Reply = Reply::fixed(501, "5.7.0 Authentication cancelled");
pub const AUTH_UNDECODABLE: Reply = Reply::fixed(501, "5.5.2 Cannot decode the AUTH response");
pub const AUTH_OK: Reply = Reply::fixed(235, "2.7.0 Authentication successful");
pub const AUTH_INVALID: Reply = Reply::fixed(535, "5.7.8 Authentication credentials invalid");
pub const AUTH_TOO_MANY_FAILURES: Reply =
    Reply::fixed(421, "4.7.0 Too many authentication failures");

// The [bounces] intake.
pub const NOT_ACCEPTING_REPORTS: Reply = Reply::fixed(550, "5.7.1 Not accepting reports");
pub const NOT_ACCEPTING_REPORTS_DATA: Reply = Reply::fixed(554, "5.7.1 Not accepting reports");
pub const ONE_RECIPIENT_PER_REPORT: Reply = Reply::fixed(
    452,
    "4.5.3 One recipient per report here; send the others in their own transaction",
);
pub const REPORT_STORAGE_FULL: Reply =
    Reply::fixed(452, "4.3.1 Report storage full; try again later");

pub fn greeting(host: &str) -> Reply {
    Reply::new(220, format!("{host} ESMTP herald"))
}

pub fn ehlo_name(host: &str) -> Reply {
    Reply::new(250, host.to_string())
}

pub fn shutting_down(host: &str) -> Reply {
    Reply::new(
        421,
        format!("4.3.2 {host} Service shutting down, try again later"),
    )
}

pub fn idle_too_long(host: &str, limit: Duration) -> Reply {
    Reply::new(
        421,
        format!(
            "4.4.2 {host} No transaction completed in {}, closing connection",
            crate::config::format_duration(limit)
        ),
    )
}

pub fn timeout(host: &str) -> Reply {
    Reply::new(421, format!("4.4.2 {host} Timeout, closing connection"))
}

pub fn too_many_errors(host: &str) -> Reply {
    Reply::new(
        421,
        format!("4.7.0 {host} Too many errors, closing connection"),
    )
}

/// A connection refused before its greeting (`why`: which limit).
pub fn refused_connection(host: &str, why: &str) -> Reply {
    Reply::new(421, format!("4.7.0 {host} {why}, try again later"))
}

pub fn line_too_long(limit: usize) -> Reply {
    Reply::new(500, format!("5.5.2 Line too long (limit {limit} bytes)"))
}

pub fn sender_syntax(why: &str) -> Reply {
    Reply::new(501, format!("5.1.7 Bad sender address syntax: {why}"))
}

pub fn rcpt_syntax(why: &str) -> Reply {
    Reply::new(501, format!("5.1.3 Bad recipient address syntax: {why}"))
}

pub fn unsupported_parameter(name: &str) -> Reply {
    Reply::new(555, format!("5.5.4 Unsupported parameter {name}"))
}

pub fn size_exceeds(limit: usize) -> Reply {
    Reply::new(
        552,
        format!("5.3.4 Message size exceeds limit ({limit} bytes)"),
    )
}

pub fn too_big(limit: usize) -> Reply {
    Reply::new(552, format!("5.3.4 Message too big (limit {limit} bytes)"))
}

pub fn relaying_denied(ip: IpAddr) -> Reply {
    Reply::new(
        550,
        format!("5.7.1 Relaying denied: {ip} is not in listen.allowed_networks"),
    )
}

pub fn too_many_recipients(limit: usize) -> Reply {
    Reply::new(452, format!("4.5.3 Too many recipients (limit {limit})"))
}

pub fn queued(id: &str) -> Reply {
    Reply::new(250, format!("2.0.0 Ok: queued as {id}"))
}

/// A message refused as it is (`why`: what the rewrite found).
pub fn refused_message(why: &str) -> Reply {
    Reply::new(554, format!("5.6.0 {why}"))
}

pub fn delay_beyond_max_age(max_age: Duration) -> Reply {
    Reply::new(
        554,
        format!(
            "5.6.0 X-Herald-Delay is longer than delivery.max_age ({})",
            crate::config::format_duration(max_age)
        ),
    )
}

pub fn report_stored(id: &str) -> Reply {
    Reply::new(250, format!("2.0.0 Ok: report stored as {id}"))
}

pub fn no_such_return_path(addr: &str) -> Reply {
    Reply::new(550, format!("5.1.1 <{addr}>: no such return path here"))
}

pub fn expired_return_path(addr: &str) -> Reply {
    Reply::new(550, format!("5.1.1 <{addr}>: this return path has expired"))
}

/// A domain other than the bounce domain, at the intake.
pub fn not_the_bounce_domain(addr: &str, domain: &str) -> Reply {
    Reply::new(
        550,
        format!("5.7.1 <{addr}>: relaying denied; this server only takes reports for {domain}"),
    )
}

/// A client over `bounces.max_rate_per_ip`.
pub fn too_many_reports(rate: impl fmt::Display, wait_s: u64) -> Reply {
    Reply::new(
        450,
        format!(
            "4.7.1 Too many reports from your address (bounces.max_rate_per_ip {rate}); try again in {wait_s}s"
        ),
    )
}

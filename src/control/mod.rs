//! The control socket: JSON Lines over a Unix socket. Each request is one
//! JSON object on a line (`{"cmd":"status"}`), each answer one JSON object
//! on a line with `"ok": true` and the data, or `"ok": false` and `"error"`.
//! The `herald` CLI is one client; `socat` is another (see README).

pub mod dmarc;
pub mod failure;
pub mod ops;
pub mod reload;
pub mod tenant;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::smtp_in::line::{read_line, Line};
use crate::state::suppression::Entry;
use crate::state::Services;

/// The longest request line (a suppression import of many entries fits):
/// a client cannot make herald buffer without end.
pub const MAX_REQUEST_LINE: usize = 1 << 20;

/// Every request the socket understands.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Queue,
    Show {
        id: String,
    },
    Retry {
        #[serde(default)]
        id: Option<String>,
        #[serde(default)]
        all: bool,
    },
    Cancel {
        #[serde(default)]
        id: Option<String>,
        #[serde(default)]
        tag: Option<String>,
        /// Everything queued for this upstream ("mx": direct delivery).
        #[serde(default)]
        route: Option<String>,
    },
    /// Without a route: all outbound delivery.
    Pause {
        #[serde(default)]
        route: Option<String>,
    },
    Resume {
        #[serde(default)]
        route: Option<String>,
    },
    History {
        #[serde(default)]
        rcpt: Option<String>,
        #[serde(default)]
        id: Option<String>,
        #[serde(default)]
        tag: Option<String>,
        /// Only events of the last this many seconds.
        #[serde(default)]
        since_s: Option<u64>,
    },
    Trace {
        addr: String,
    },
    /// Events oldest first, paged: `cursor` is the last `event_id` seen.
    Events {
        #[serde(default)]
        since_ms: Option<u64>,
        #[serde(default)]
        rcpt: Option<String>,
        #[serde(default)]
        tag: Option<String>,
        #[serde(default)]
        event: Option<String>,
        #[serde(default)]
        limit: Option<usize>,
        #[serde(default)]
        cursor: Option<String>,
    },
    Webhooks,
    /// Reports received at the `[bounces]` intake, newest first.
    Reports {
        /// pending, applied, ignored, unmatched, unparsed
        #[serde(default)]
        state: Option<String>,
        /// failed, delayed, complaint, auto-reply, ... (what the parser made of it)
        #[serde(default)]
        kind: Option<String>,
        #[serde(default)]
        limit: Option<usize>,
    },
    WebhookTest {
        name: String,
    },
    /// What receivers saw (DMARC aggregate and TLS reports), per domain.
    Dmarc {
        #[serde(default)]
        domain: Option<String>,
        /// Reports whose period ended in the last this many seconds.
        #[serde(default)]
        since_s: Option<u64>,
    },
    SuppressionList,
    SuppressionAdd {
        addr: String,
        #[serde(default)]
        reason: Option<String>,
        /// For this tenant's mail only (None: for everyone).
        #[serde(default)]
        tenant: Option<String>,
    },
    SuppressionRemove {
        addr: String,
        /// The tenant's entry (None: the entry for everyone).
        #[serde(default)]
        tenant: Option<String>,
    },
    SuppressionImport {
        entries: Vec<Entry>,
    },
    /// Re-read the config file herald was started with (`herald reload`).
    Reload,
}

impl Request {
    /// Whether it changes anything (a read-only API token may not ask it).
    pub fn changes(&self) -> bool {
        !matches!(
            self,
            Request::Status
                | Request::Queue
                | Request::Show { .. }
                | Request::History { .. }
                | Request::Trace { .. }
                | Request::Events { .. }
                | Request::Webhooks
                | Request::Reports { .. }
                | Request::Dmarc { .. }
                | Request::SuppressionList
        )
    }
}

pub use crate::live::Scope;

/// Binds the socket: creates its directory, replaces a stale socket (one
/// nobody answers on), refuses to steal a live one. The socket is created
/// with mode 0660 (under a umask of 0117): a chmod after bind would leave
/// a moment in which anyone could connect.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "control.socket: {} is in use: is another herald running?",
                path.display()
            );
        }
        std::fs::remove_file(path)?;
    }
    // The umask is the process's: this runs at start-up, before any
    // session or delivery could create a file in the meantime.
    // SAFETY: umask only swaps the process's file mode mask.
    let old = unsafe { libc::umask(0o117) };
    let l = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    l.map_err(|e| anyhow::anyhow!("control.socket: cannot bind {}: {e}", path.display()))
}

/// Serves the socket until shutdown, then removes it.
pub async fn serve(services: Arc<Services>, listener: UnixListener, path: PathBuf) {
    let mut shutdown = services.shutdown.clone();
    loop {
        tokio::select! {
            r = listener.accept() => {
                if let Ok((stream, _)) = r {
                    tokio::spawn(connection(services.clone(), stream));
                }
            }
            _ = shutdown.wait() => break,
        }
    }
    let _ = std::fs::remove_file(&path);
}

async fn connection(services: Arc<Services>, stream: UnixStream) {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut buf = Vec::new();
    loop {
        match read_line(&mut rd, &mut buf, MAX_REQUEST_LINE).await {
            Ok(Line::Complete) => {}
            Ok(Line::TooLong { .. }) => {
                let answer = ops::error(format!(
                    "bad request: line longer than {MAX_REQUEST_LINE} bytes"
                ));
                let mut out = serde_json::to_vec(&answer).unwrap_or_default();
                out.push(b'\n');
                let _ = wr.write_all(&out).await;
                return;
            }
            Ok(Line::Eof) | Err(_) => return,
        }
        let line = String::from_utf8_lossy(&buf);
        if line.trim().is_empty() {
            continue;
        }
        let answer = match serde_json::from_str::<Request>(&line) {
            // Listings scan the queue or the history: run every request on
            // a blocking thread, never on the threads that serve SMTP.
            Ok(req) => {
                let s = services.clone();
                let rt = tokio::runtime::Handle::current();
                tokio::task::spawn_blocking(move || rt.block_on(ops::handle(&s, req)))
                    .await
                    .unwrap_or_else(|e| ops::error(format!("internal error: {e}")))
            }
            Err(e) => ops::error(format!("bad request: {e}")),
        };
        let mut out = serde_json::to_vec(&answer).unwrap_or_default();
        out.push(b'\n');
        if wr.write_all(&out).await.is_err() {
            return;
        }
    }
}

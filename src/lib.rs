//! herald's library: the modules follow the mail's path (DESIGN.md).
//!
//! smtp_in -> rewrite -> queue -> delivery -> upstream, with history beside.

pub mod api;
pub mod bounces;
pub mod budget;
pub mod check_dns;
pub mod cli;
pub mod config;
pub mod control;
pub mod delivery;
pub mod dkim;
pub mod dns;
pub mod http;
pub mod limit;
pub mod live;
pub mod metrics;
pub mod mime;
pub mod notify;
pub mod pipeline;
pub mod replies;
pub mod reply;
pub mod report;
pub mod rewrite;
pub mod server;
pub mod shutdown;
pub mod smtp_in;
pub mod state;
pub mod tls;
pub mod token;
pub mod tracking;
pub mod webhooks;

/// Logs to stderr (journald picks it up under systemd); `RUST_LOG` or
/// `HERALD_LOG` set the filter, default `info`.
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("HERALD_LOG")
        .ok()
        .and_then(|s| EnvFilter::try_new(s).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info"))
        // mailin traces every line it sees, message content included.
        .add_directive("mailin=warn".parse().expect("static directive"))
        // rustls warns of what clients do that is normal (msmtp connecting
        // by IP sends the IP as SNI: "Illegal SNI extension"); herald logs
        // the handshake failures that matter itself.
        .add_directive("rustls=error".parse().expect("static directive"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    // HERALD_LOG_FORMAT=json: one JSON object per line, for log pipelines
    // (Vector, Loki, Elasticsearch) that gather several herald nodes.
    if std::env::var("HERALD_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        builder.json().flatten_event(true).init();
    } else {
        // Colours only on a terminal: journald would store the escapes.
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}

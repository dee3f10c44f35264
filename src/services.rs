//! The shared state of a running herald: what a session, a delivery attempt
//! or a control request needs, built once by `serve` and passed as an
//! `Arc<Services>`.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use tokio_rustls::TlsAcceptor;

use crate::config::Config;
use crate::delivery::{Routes, Scheduler, Unsaved};
use crate::history::History;
use crate::queue::Store;
use crate::shutdown::Shutdown;

/// Everything a session or a delivery attempt needs, built once.
pub struct Services {
    pub cfg: Arc<Config>,
    pub store: Store,
    pub history: History,
    pub suppression: crate::suppression::Suppression,
    pub scheduler: Scheduler,
    pub routes: Routes,
    /// Delivery results not written yet (storage failure).
    pub unsaved: Unsaved,
    pub client_tls: HashMap<String, Arc<rustls::ClientConfig>>,
    /// Opportunistic TLS to MX hosts: encrypt when offered, never verify
    /// (like Postfix's `smtp_tls_security_level = may`).
    pub mx_tls: Arc<rustls::ClientConfig>,
    pub resolver: hickory_resolver::TokioResolver,
    pub tls: Option<TlsAcceptor>,
    pub signers: crate::dkim::Signers,
    /// HMAC key for pixel tokens, when tracking is enabled.
    pub tracking_key: Option<Vec<u8>>,
    pub shutdown: Shutdown,
    pub paused: AtomicBool,
    pub started: Instant,
    /// Message bytes held at once (end of DATA, delivery).
    pub memory: crate::budget::Budget,
    /// What each webhook endpoint last did.
    pub hooks: crate::webhooks::Hooks,
}

pub const META_PAUSED: &str = "paused";

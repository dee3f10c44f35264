//! The shared state of a running herald: what a session, a delivery attempt
//! or a control request needs, built once by `serve` and passed as an
//! `Arc<Services>`.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use crate::config::Config;
use crate::delivery::{Routes, Scheduler, Unsaved};
use crate::history::History;
use crate::live::Live;
use crate::queue::Store;
use crate::shutdown::Shutdown;

/// Everything a session or a delivery attempt needs, built once.
pub struct Services {
    /// The configuration in force and what is built from it; a reload
    /// swaps it. Read it through [`Services::live`] or [`Services::cfg`].
    pub current: RwLock<Arc<Live>>,
    pub store: Store,
    pub history: History,
    pub suppression: crate::suppression::Suppression,
    pub scheduler: Scheduler,
    pub routes: Routes,
    /// Delivery results not written yet (storage failure).
    pub unsaved: Unsaved,
    /// Opportunistic TLS to MX hosts: encrypt when offered, never verify
    /// (like Postfix's `smtp_tls_security_level = may`).
    pub mx_tls: Arc<rustls::ClientConfig>,
    pub shutdown: Shutdown,
    pub paused: AtomicBool,
    pub started: Instant,
    /// Message bytes held at once (end of DATA, delivery).
    pub memory: crate::budget::Budget,
    /// What each webhook endpoint last did.
    pub hooks: crate::webhooks::Hooks,
    /// Delivery attempts in flight (`delivery.concurrency`).
    pub attempts: crate::limit::Limit,
    /// SMTP connection slots (`listen.max_connections`, per client address).
    pub conns: crate::smtp_in::Slots,
    /// Slots of the `[bounces]` intake: a flood of reports does not keep
    /// the platform from submitting.
    pub report_conns: crate::smtp_in::Slots,
    /// `[bounces]`: return-path tokens and the report intake.
    pub bounces: Option<crate::bounces::Bounces>,
    /// Counts reloads; tasks that follow the config (webhook senders)
    /// watch it.
    pub reloads: tokio::sync::watch::Sender<u64>,
    /// One reload at a time.
    pub reload_lock: Mutex<()>,
    /// The pixel server was started (tracking was enabled at start-up).
    pub tracking_served: bool,
}

impl Services {
    /// The configuration in force now, with its signers and TLS configs:
    /// take it once per transaction or attempt, so that one message sees
    /// one configuration.
    pub fn live(&self) -> Arc<Live> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The `Config` in force now.
    pub fn cfg(&self) -> Arc<Config> {
        self.live().cfg.clone()
    }

    /// Puts a new configuration in force (see [`crate::live::reload`]).
    pub fn set_live(&self, live: Arc<Live>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = live;
    }
}

pub const META_PAUSED: &str = "paused";

//! The state layer: what every stage shares, built once by `serve` and
//! passed as an `Arc<Services>`. Nothing here imports a stage.
//!
//! - `spool`: the queue (envelopes and bodies), durable before `250`;
//! - `history`: events, their index and the webhook outbox;
//! - `ledger`: the only writer of a recipient's state (with its event and
//!   the suppression it implies);
//! - `suppression`, `reports` (the bounce intake's records), `outbox` (what
//!   each webhook endpoint did), `pacing` (route health, destination limits,
//!   paused routes), `schedule` (the scheduler's inbox), `envelope` (an SMTP
//!   transaction being received).

pub mod aggregates;
pub mod cluster;
pub mod envelope;
pub mod history;
pub mod ledger;
pub mod outbox;
pub mod pacing;
pub mod ports;
pub mod reports;
pub mod schedule;
pub mod spool;
pub mod suppression;

use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use crate::config::Config;
use crate::limit::Slots;
use crate::live::Live;
use crate::shutdown::Shutdown;
use history::History;
use ledger::{Ledger, Unsaved};
use pacing::Pacing;
use schedule::Scheduler;
use spool::Store;

/// Everything a session or a delivery attempt needs, built once.
pub struct Services {
    /// The configuration in force and what is built from it; a reload
    /// swaps it. Read it through [`Services::live`] or [`Services::cfg`].
    pub current: RwLock<Arc<Live>>,
    pub store: Store,
    pub history: History,
    pub suppression: suppression::Suppression,
    pub scheduler: Scheduler,
    /// Route health, destination limits and paused routes.
    pub pacing: Pacing,
    /// Delivery results not written yet (storage failure).
    pub unsaved: Unsaved,
    /// Pixels fetched lately (one `opened` per message and window).
    pub opens: ledger::Opens,
    /// Opportunistic TLS to MX hosts: encrypt when offered, never verify
    /// (like Postfix's `smtp_tls_security_level = may`).
    pub mx_tls: Arc<rustls::ClientConfig>,
    pub shutdown: Shutdown,
    /// `herald pause`: all delivery, and routes.
    pub pauses: Box<dyn ports::PauseFlags>,
    pub started: Instant,
    /// Message bytes held at once (end of DATA, delivery).
    pub memory: crate::budget::Budget,
    /// What each webhook endpoint last did.
    pub hooks: outbox::Hooks,
    /// Delivery attempts in flight (`delivery.concurrency`).
    pub attempts: crate::limit::Limit,
    /// SMTP connection slots (`listen.max_connections`, per client address).
    pub conns: Slots,
    /// Slots of the `[bounces]` intake: a flood of reports does not keep
    /// the platform from submitting.
    pub report_conns: Slots,
    /// `[bounces]`: return-path tokens and the report intake.
    pub bounces: Option<reports::Bounces>,
    /// Counts reloads; tasks that follow the config (webhook senders)
    /// watch it.
    pub reloads: tokio::sync::watch::Sender<u64>,
    /// One reload at a time.
    pub reload_lock: Mutex<()>,
    /// The pixel server was started (tracking was enabled at start-up).
    pub tracking_served: bool,
    /// `[cluster]`: this node of it.
    pub cluster: Option<Arc<cluster::Cluster>>,
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

    /// The ledger, with the configuration in force now: take it once per
    /// transaction, attempt or request.
    pub fn ledger(&self) -> Ledger<'_> {
        self.ledger_for(self.cfg())
    }

    /// The ledger with a configuration already taken (by an attempt).
    pub fn ledger_for(&self, cfg: Arc<Config>) -> Ledger<'_> {
        Ledger {
            store: &self.store,
            history: &self.history,
            suppression: &self.suppression,
            unsaved: &self.unsaved,
            cfg,
        }
    }

    /// What `systemctl status` shows of herald.
    pub fn status_line(&self) -> String {
        let (messages, _, deferred) = self.store.stats.get();
        let state = if self.store.health.is_failed() {
            "STORAGE FAILED"
        } else if self.pauses.delivery_paused() {
            "delivery paused"
        } else {
            "delivering"
        };
        format!("{messages} queued ({deferred} deferred recipients), {state}")
    }

    /// Puts a new configuration in force (see `control::reload`).
    pub fn set_live(&self, live: Arc<Live>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = live;
    }
}

//! `herald serve`: wires storage, listeners, delivery, reloads and shutdown
//! together.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::delivery;
use crate::live::Live;
use crate::shutdown::Shutdown;
use crate::smtp_in;
use crate::state::history::History;
use crate::state::schedule::Scheduler;
use crate::state::spool::Store;
use crate::state::Services;

/// How long running SMTP sessions may take to finish after SIGTERM.
const DRAIN_DEADLINE: Duration = Duration::from_secs(30);

pub async fn serve(cfg: Config) -> anyhow::Result<Exit> {
    let store = Store::open(&cfg.storage.path).with_context(|| {
        format!(
            "storage.path: cannot open {} (is another herald running on it?)",
            cfg.storage.path.display()
        )
    })?;
    let live = Live::build(cfg)?;
    live.warn_unsigned();
    let cfg = live.cfg.clone();

    // Signal handlers first: a SIGTERM that arrives while we start (the
    // listeners are already bound) must drain, not kill.
    let signals = Signals::install()?;
    let bound = Bound::bind(&cfg, &live).await?;
    let (bounces, reports_rx) = match &cfg.bounces {
        Some(b) => {
            let (b, rx) = crate::bounces::Bounces::open(&store.db, &cfg.storage.path, b)?;
            (Some(b), Some(rx))
        }
        None => (None, None),
    };
    let (shutdown_tx, shutdown_rx) = Shutdown::new();
    let (scheduler, sched_rx) = Scheduler::new();
    let parts = Parts {
        store: store.clone(),
        scheduler,
        shutdown: shutdown_rx,
        bounces,
        tracking_served: bound.tracking.is_some(),
    };
    let services = Arc::new(services(live, parts)?);
    let paused = services.pauses.delivery_paused();

    let mut tasks = Tasks::default();
    let sched = tokio::spawn(delivery::run(services.clone(), sched_rx));
    let (drain_tx, mut drain_rx) = mpsc::channel::<()>(1);
    tasks.start(&services, bound, reports_rx, drain_tx)?;
    tracing::info!(
        queue = store.len(),
        paused,
        hostname = %cfg.hostname,
        "herald started"
    );
    // Queue loaded, every listener bound: ready (Type=notify).
    crate::notify::notify(&format!("READY=1\nSTATUS={}", services.status_line()));
    let sd = tokio::spawn(supervise(services.clone(), sched.abort_handle()));

    let restart = run_until_stop(&services, signals).await;
    tracing::info!("shutting down: no new connections, finishing sessions in flight");
    crate::notify::notify("STOPPING=1\nSTATUS=draining: finishing sessions in flight");
    sd.abort();
    let _ = shutdown_tx.send(true);
    if tokio::time::timeout(DRAIN_DEADLINE, drain_rx.recv())
        .await
        .is_err()
    {
        tracing::warn!("sessions still open after {DRAIN_DEADLINE:?}; closing them");
    }
    let _ = sched.await;
    tasks.join().await;
    finish(&store, restart).await
}

/// How `serve` ended, for `main` to turn into an exit code.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// Stopped, everything flushed.
    Stopped,
    /// Stopped to reopen a database that failed: exit with
    /// [`EXIT_RESTART`] (systemd's Restart=on-failure starts herald again).
    Restart,
    /// Stopped without a final flush (acknowledged mail was synced before
    /// its 250): exit at once, since dropping the database would flush
    /// again and could hang on the same disk.
    Unflushed,
}

/// The final flush; a disk that does not answer must not keep herald
/// from stopping: everything acknowledged was synced already.
async fn finish(store: &Store, restart: bool) -> anyhow::Result<Exit> {
    let db = store.db.clone();
    let flushed = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::task::spawn_blocking(move || db.flush()),
    )
    .await;
    if restart {
        tracing::warn!(
            "stopped to reopen the database; exit code {EXIT_RESTART} (systemd's Restart=on-failure starts herald again)"
        );
        return Ok(Exit::Restart);
    }
    match flushed {
        Ok(Ok(Ok(_))) if !store.health.is_failed() => {
            tracing::info!("stopped");
            Ok(Exit::Stopped)
        }
        other => {
            let why = match other {
                Ok(Ok(Err(e))) => e.to_string(),
                Err(_) => "the final flush did not finish within 5s".into(),
                _ => "storage had failed".into(),
            };
            tracing::warn!(error = %why, "stopped without a final flush (acknowledged mail was synced before its 250)");
            Ok(Exit::Unflushed)
        }
    }
}

/// Waits for SIGTERM/SIGINT (false) or a storage failure that needs a
/// restart (true); SIGHUP reloads meanwhile.
async fn run_until_stop(services: &Arc<Services>, mut signals: Signals) -> bool {
    let storage_failed = storage_needs_restart(&services.store);
    tokio::pin!(storage_failed);
    loop {
        tokio::select! {
            sig = signals.next() => match sig {
                Signal::Stop => return false,
                // SIGHUP: the same reload as `herald reload`, logged.
                Signal::Reload => {
                    let s = services.clone();
                    let _ = tokio::task::spawn_blocking(move || crate::control::reload::reload(&s)).await;
                }
            },
            _ = &mut storage_failed => return true,
        }
    }
}

/// Every listener, bound before anything starts. The platform's SMTP
/// listeners last: once they take connections, every other listener is
/// bound too (tests and load balancers look at the SMTP port only).
struct Bound {
    control: tokio::net::UnixListener,
    tracking: Option<TcpListener>,
    metrics: Option<TcpListener>,
    api: Option<TcpListener>,
    /// (listener, implicit TLS, the `[bounces]` intake)
    smtp: Vec<(TcpListener, bool, bool)>,
}

impl Bound {
    async fn bind(cfg: &Config, live: &Live) -> anyhow::Result<Bound> {
        let control = crate::control::bind(&cfg.control.socket)?;
        let tracking = if live.tracking_key.is_some() {
            let l = tokio::net::TcpListener::bind(cfg.tracking.listen)
                .await
                .with_context(|| {
                    format!("tracking.listen: cannot listen on {}", cfg.tracking.listen)
                })?;
            Some(l)
        } else {
            None
        };
        let metrics = match cfg.control.metrics_listen {
            Some(a) => Some(crate::metrics::bind(a).await?),
            None => None,
        };
        let api = match (cfg.api.listen, &live.api_tokens) {
            (Some(a), Some(_)) => Some(crate::api::bind(a).await?),
            _ => None,
        };
        let mut smtp = Vec::new();
        if let Some(b) = &cfg.bounces {
            for a in &b.listen {
                let l = smtp_in::bind(*a)
                    .with_context(|| format!("bounces.listen: cannot listen on {a}"))?;
                smtp.push((l, false, true));
            }
        }
        for (addrs, implicit, key) in [
            (&cfg.listen.smtp, false, "listen.smtp"),
            (&cfg.listen.smtps, true, "listen.smtps"),
        ] {
            for a in addrs {
                let l =
                    smtp_in::bind(*a).with_context(|| format!("{key}: cannot listen on {a}"))?;
                smtp.push((l, implicit, false));
            }
        }
        Ok(Bound {
            control,
            tracking,
            metrics,
            api,
            smtp,
        })
    }
}

/// What `serve` opened or made before the shared state is built.
struct Parts {
    store: Store,
    scheduler: Scheduler,
    shutdown: Shutdown,
    bounces: Option<crate::state::reports::Bounces>,
    tracking_served: bool,
}

/// The shared state, over the open database.
fn services(live: Live, p: Parts) -> anyhow::Result<Services> {
    let cfg = live.cfg.clone();
    let db = &p.store.db;
    let ports = ports(&cfg, &p)?;
    let history = History::with_store(db, ports.events)?
        .with_webhooks(&cfg.webhooks)
        .with_node(cfg.cluster.as_ref().map(|c| c.node.clone()));
    history.load_hourly()?;
    let suppression = crate::state::suppression::Suppression::new(ports.suppression);
    Ok(Services {
        current: RwLock::new(Arc::new(live)),
        store: p.store,
        history,
        suppression,
        scheduler: p.scheduler,
        pacing: crate::state::pacing::Pacing {
            health: Default::default(),
            shaper: crate::state::pacing::Shaper::new(ports.pace),
        },
        unsaved: Default::default(),
        opens: Default::default(),
        memory: crate::budget::Budget::new(crate::budget::DEFAULT_BYTES),
        hooks: crate::state::outbox::Hooks::new(&cfg.webhooks),
        mx_tls: crate::tls::client_config(None, false)?,
        bounces: p.bounces,
        shutdown: p.shutdown,
        pauses: ports.pauses,
        started: Instant::now(),
        attempts: crate::limit::Limit::new(cfg.delivery.concurrency),
        conns: crate::limit::Slots::new(
            crate::limit::LISTEN_SLOTS,
            cfg.listen.max_connections,
            cfg.listen.max_connections_per_ip,
        ),
        report_conns: match &cfg.bounces {
            Some(b) => crate::limit::Slots::new(
                crate::limit::INTAKE_SLOTS,
                b.max_connections,
                b.max_connections_per_ip,
            ),
            None => crate::limit::Slots::new(crate::limit::INTAKE_SLOTS, 0, 0),
        },
        reloads: tokio::sync::watch::channel(0).0,
        reload_lock: Mutex::new(()),
        tracking_served: p.tracking_served,
        cluster: ports.cluster,
    })
}

/// The backends of the shared state: this node's sled, or with
/// `[cluster]` the mirror and Redis.
struct Ports {
    events: Arc<dyn crate::state::history::EventStore>,
    suppression: Arc<dyn crate::state::suppression::SuppressionStore>,
    pauses: Box<dyn crate::state::ports::PauseFlags>,
    pace: Arc<dyn crate::state::pacing::PaceStore>,
    cluster: Option<Arc<crate::state::cluster::Cluster>>,
}

fn ports(cfg: &Config, p: &Parts) -> anyhow::Result<Ports> {
    use crate::state::cluster as c;
    use crate::state::ports as local;
    let db = &p.store.db;
    let Some(cc) = &cfg.cluster else {
        return Ok(Ports {
            events: Arc::new(local::SledEvents::open(db)?),
            suppression: Arc::new(local::SledSuppression::open(db)?),
            pauses: Box::new(local::LocalPauses::open(&p.store)?),
            pace: Arc::new(crate::state::pacing::LocalPace::default()),
            cluster: None,
        });
    };
    let node = Arc::new(c::Cluster::open(cc, &p.store)?);
    if let Some(b) = &p.bounces {
        b.share_with(node.clone());
    }
    tracing::info!(node = %cc.node, "cluster: shared state through Redis");
    Ok(Ports {
        events: Arc::new(c::SharedEvents(node.clone())),
        suppression: Arc::new(c::SharedSuppression(node.clone())),
        pauses: Box::new(c::SharedPauses(node.clone())),
        pace: Arc::new(c::pace::SharedPace(c::pace::RedisPace::new(node.clone()))),
        cluster: Some(node),
    })
}

/// The tasks `serve` starts; each ends at shutdown and is joined.
#[derive(Default)]
struct Tasks(Vec<(&'static str, tokio::task::JoinHandle<()>)>);

impl Tasks {
    fn spawn(
        &mut self,
        what: &'static str,
        f: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        self.0.push((what, tokio::spawn(f)));
    }

    /// Starts the control socket, housekeeping, webhooks, the HTTP
    /// listeners and the SMTP listeners (the intake on its own thread);
    /// `drain` is held until every SMTP session has ended.
    fn start(
        &mut self,
        services: &Arc<Services>,
        bound: Bound,
        reports: Option<mpsc::UnboundedReceiver<String>>,
        drain: mpsc::Sender<()>,
    ) -> anyhow::Result<()> {
        let s = services;
        let socket = s.cfg().control.socket.clone();
        self.spawn(
            "control",
            crate::control::serve(s.clone(), bound.control, socket),
        );
        self.spawn("history purge", purge_history(s.clone()));
        if let Some(c) = &s.cluster {
            use crate::state::cluster::sync;
            self.spawn("cluster push", sync::push(s.clone(), c.clone()));
            self.spawn("cluster read", sync::read(s.clone(), c.clone()));
            self.spawn("cluster heartbeat", sync::heartbeat(s.clone(), c.clone()));
            if let Some(p) = c.shared_pace.get() {
                self.spawn("cluster leases", p.clone().keep_leases(s.shutdown.clone()));
            }
        }
        self.spawn("webhooks", crate::webhooks::supervise(s.clone()));
        if let Some(l) = bound.tracking {
            tracing::info!(addr = %l.local_addr()?, "tracking pixel listening");
            self.spawn("tracking", crate::tracking::serve(s.clone(), l));
        }
        if let Some(l) = bound.metrics {
            tracing::info!(addr = %l.local_addr()?, "metrics listening");
            self.spawn("metrics", crate::metrics::serve(s.clone(), l));
        }
        if let Some(l) = bound.api {
            tracing::info!(addr = %l.local_addr()?, "api listening");
            self.spawn("api", crate::api::serve(s.clone(), l));
        }
        let mut intake = Vec::new();
        for (l, implicit, is_intake) in bound.smtp {
            if is_intake {
                tracing::info!(addr = %l.local_addr()?, "bounce and complaint intake listening");
                intake.push(l.into_std()?);
                continue;
            }
            tracing::info!(addr = %l.local_addr()?, tls = implicit, "listening");
            let accept = smtp_in::accept_loop(s.clone(), l, implicit, false, drain.clone());
            self.spawn("smtp listener", accept);
        }
        if let Some(rx) = reports {
            start_intake(s.clone(), intake, rx, drain)?;
        }
        Ok(())
    }

    /// Waits for every task (they end at shutdown); one that does not end
    /// within the drain deadline is named and left behind.
    async fn join(self) {
        // One deadline for all: tasks end together at shutdown.
        let until = tokio::time::Instant::now() + DRAIN_DEADLINE;
        for (what, task) in self.0 {
            match tokio::time::timeout_at(until, task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(task = what, error = %e, "task failed"),
                Err(_) => tracing::warn!(task = what, "task still running at shutdown"),
            }
        }
    }
}

/// Keeps systemd informed: STATUS= every 10 s, and WATCHDOG=1 at half of
/// `WATCHDOG_USEC` while the delivery loop and the committer are alive (a
/// committer stuck in a sync for 10 s stops the pings, and systemd
/// restarts herald).
async fn supervise(s: Arc<Services>, delivery: tokio::task::AbortHandle) {
    let watchdog = crate::notify::watchdog_interval();
    let every = watchdog
        .map(|w| (w / 2).min(Duration::from_secs(10)))
        .unwrap_or(Duration::from_secs(10));
    let mut last_status = String::new();
    loop {
        tokio::time::sleep(every).await;
        let status = s.status_line();
        let mut msg = String::new();
        if status != last_status {
            msg.push_str(&format!("STATUS={status}\n"));
            last_status = status;
        }
        let beat = s
            .store
            .health
            .committer_beat
            .load(std::sync::atomic::Ordering::Relaxed);
        let alive =
            !delivery.is_finished() && crate::state::spool::now_ms().saturating_sub(beat) < 10_000;
        if watchdog.is_some() && alive {
            msg.push_str("WATCHDOG=1\n");
        }
        if !msg.is_empty() {
            crate::notify::notify(msg.trim_end());
        }
    }
}

/// Exit code when herald stops itself to reopen a database that failed
/// (EX_TEMPFAIL): a supervisor should start it again.
pub const EXIT_RESTART: i32 = 75;

/// Resolves once the storage can only recover by reopening the database.
async fn storage_needs_restart(store: &Store) {
    while !store.health.needs_restart() {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// SIGTERM, SIGINT and SIGHUP, caught from the start of `serve` (SIGHUP's
/// default action would end the process).
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

enum Signal {
    Stop,
    Reload,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("SIGHUP handler")?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop,
            _ = self.int.recv() => Signal::Stop,
            _ = self.hup.recv() => Signal::Reload,
        }
    }
}

/// Deletes events older than `history_retention`, at start and then
/// periodically (every minute, or every half retention if that is shorter).
/// The `[bounces]` intake runs on a runtime and thread of its own, at a
/// lower CPU priority (nice 10), with the applying of reports: whatever
/// the internet sends to the bounce domain's MX, the platform's listeners
/// and delivery keep their cores. `drain` is held until its sessions end.
fn start_intake(
    services: Arc<Services>,
    listeners: Vec<std::net::TcpListener>,
    reports: mpsc::UnboundedReceiver<String>,
    drain: mpsc::Sender<()>,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("herald-intake")
        .build()
        .context("cannot start the intake's runtime")?;
    std::thread::Builder::new()
        .name("herald-intake".into())
        .spawn(move || {
            // Threads it starts (the blocking pool) inherit this.
            lower_priority();
            rt.block_on(async move {
                let (local_tx, mut local_rx) = mpsc::channel::<()>(1);
                for l in listeners {
                    match TcpListener::from_std(l) {
                        Ok(l) => {
                            tokio::spawn(smtp_in::accept_loop(
                                services.clone(),
                                l,
                                false,
                                true,
                                local_tx.clone(),
                            ));
                        }
                        Err(e) => tracing::error!(error = %e, "intake listener lost"),
                    }
                }
                drop(local_tx);
                let applier = tokio::spawn(crate::bounces::run(services.clone(), reports));
                // Every accept loop and session has ended (shutdown).
                let _ = local_rx.recv().await;
                let _ = applier.await;
                drop(drain);
            });
        })
        .context("cannot start the intake's thread")?;
    Ok(())
}

/// nice 10 for the calling thread (Linux: a thread's own priority).
fn lower_priority() {
    // SAFETY: plain system calls on the calling thread's id.
    let r = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10)
    };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot lower the intake's priority");
    }
}

async fn purge_history(s: Arc<Services>) {
    let mut shutdown = s.shutdown.clone();
    loop {
        // Read each time: a reload may change it.
        let retention = s.cfg().storage.history_retention;
        let every = (retention / 2).clamp(Duration::from_millis(200), Duration::from_secs(60));
        let before = crate::state::spool::now_ms().saturating_sub(retention.as_millis() as u64);
        match s.history.purge_before(before) {
            Ok(0) => {}
            Ok(n) => tracing::info!(events = n, "history purged"),
            Err(e) => tracing::error!(error = %e, "history purge failed"),
        }
        if let Some(b) = &s.bounces {
            let n = b.purge(before);
            if n > 0 {
                tracing::info!(reports = n, "old reports purged");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait() => return,
        }
    }
}

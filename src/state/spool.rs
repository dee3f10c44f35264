//! The durable queue: message bodies and per-recipient state in sled.
//!
//! Only this module writes the spool trees (`bodies`, `envelopes`, `meta`).
//! A message is acknowledged with `250` only after [`Store::commit`] returned,
//! which means sled flushed it and the database file was fsynced. Commits are
//! batched by one committer thread (group commit): every session waiting at
//! the same moment shares one flush + fsync, so durability costs one disk
//! sync per batch rather than per message. One thread also sidesteps sled's
//! deadlock when many tasks call `flush_async` at once (see STACK.md).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("storage: {0}")]
    Sled(#[from] sled::Error),
    #[error("storage: {0}")]
    Io(#[from] std::io::Error),
    #[error("storage: corrupt record for {0}")]
    Corrupt(String),
    #[error("storage: committer stopped")]
    Stopped,
    #[error("storage: queue id {0} already exists")]
    Exists(String),
    #[error("storage: {0}")]
    Failed(String),
}

pub type Result<T> = std::result::Result<T, QueueError>;

/// Milliseconds since the Unix epoch: the one clock of the queue and history.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// Makes queue ids: 12 characters of Crockford base32 over 40 bits of
/// milliseconds (wraps after 34 years) and 20 bits of sequence. They sort by
/// arrival, are unique within a process (the sequence) and across restarts
/// (the sequence starts at a random point, and the clock moves on).
pub struct IdGen {
    seq: AtomicU64,
}

impl Default for IdGen {
    fn default() -> Self {
        Self::new()
    }
}

impl IdGen {
    pub fn new() -> Self {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64 ^ std::process::id() as u64)
            .unwrap_or(0);
        IdGen {
            seq: AtomicU64::new(seed),
        }
    }

    pub fn next(&self) -> String {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) & 0xF_FFFF;
        let v = ((now_ms() & 0xFF_FFFF_FFFF) << 20) | seq;
        (0..12)
            .rev()
            .map(|i| CROCKFORD[((v >> (i * 5)) & 31) as usize] as char)
            .collect()
    }
}

/// A queue or report id as a client gave it (CLI, API, control socket),
/// in its canonical form: 12 Crockford base32 characters, upper case. None
/// for anything else, so that nothing a client sends is ever looked up, let
/// alone joined to a path, unless it is of the form herald makes.
pub fn parse_id(text: &str) -> Option<String> {
    let t = text.trim();
    (t.len() == 12
        && t.bytes()
            .all(|c| CROCKFORD.contains(&c.to_ascii_uppercase())))
    .then(|| t.to_ascii_uppercase())
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RcptStatus {
    /// Waiting for its first attempt (possibly held by a send delay).
    #[default]
    Queued,
    /// Tried and refused temporarily; retried at `next_attempt`.
    Deferred,
    Delivered,
    Bounced,
    Expired,
    Cancelled,
    Suppressed,
}

impl RcptStatus {
    pub fn is_final(self) -> bool {
        !matches!(self, RcptStatus::Queued | RcptStatus::Deferred)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RcptStatus::Queued => "queued",
            RcptStatus::Deferred => "deferred",
            RcptStatus::Delivered => "delivered",
            RcptStatus::Bounced => "bounced",
            RcptStatus::Expired => "expired",
            RcptStatus::Cancelled => "cancelled",
            RcptStatus::Suppressed => "suppressed",
        }
    }
}

/// The version of the records this build writes. Fields added later carry
/// serde defaults, so a spool written by an older herald still reads.
pub const RECORD_VERSION: u32 = 3;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Rcpt {
    pub addr: String,
    pub status: RcptStatus,
    pub attempts: u32,
    /// When the next attempt is due (ms); meaningful while not final.
    pub next_attempt: u64,
    pub last_reply: Option<String>,
    pub last_host: Option<String>,
    pub updated: u64,
    /// The class of the last refusal (None until one, or once delivered).
    #[serde(default)]
    pub class: Option<crate::reply::Class>,
}

/// Everything about a queued message except its bytes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Envelope {
    /// [`RECORD_VERSION`] of the herald that wrote it (0: before versions).
    pub v: u32,
    pub id: String,
    pub received_at: u64,
    pub client_ip: String,
    pub helo: String,
    pub auth_user: Option<String>,
    /// MAIL FROM as the client gave it ("" for the null sender).
    pub original_sender: String,
    /// MAIL FROM we use outbound (the bounce address).
    pub mail_from: String,
    /// Name of the upstream this message goes to, or "mx".
    pub upstream: String,
    pub tag: Option<String>,
    pub subject: Option<String>,
    pub size: usize,
    pub rcpts: Vec<Rcpt>,
    /// The client said SMTPUTF8 (RFC 6531) with MAIL FROM (version 3).
    pub smtputf8: bool,
    /// The client said BODY=8BITMIME (version 3).
    pub body_8bit: bool,
    /// The `[[tenants]]` entry whose mail this is, decided at reception.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

impl Envelope {
    pub fn pending(&self) -> impl Iterator<Item = &Rcpt> {
        self.rcpts.iter().filter(|r| !r.status.is_final())
    }

    pub fn is_done(&self) -> bool {
        self.rcpts.iter().all(|r| r.status.is_final())
    }

    /// Earliest due time among recipients still pending.
    pub fn next_due(&self) -> Option<u64> {
        self.pending().map(|r| r.next_attempt).min()
    }
}

type Waiter = oneshot::Sender<std::result::Result<(), String>>;

/// Small bodies live in sled, in chunks of this size under `ID \0 INDEX`
/// (below sled's blob threshold, so they stay in its log).
const BODY_CHUNK: usize = 64 * 1024;

/// Bodies larger than this are files of their own under `bodies/`, synced
/// by the committer: sled keeps every value it holds in memory, so 20
/// queued messages of 20 MiB cost 400 MiB of heap there.
const BODY_FILE_MIN: usize = 256 * 1024;

fn chunk_prefix(id: &str) -> Vec<u8> {
    let mut k = id.as_bytes().to_vec();
    k.push(0);
    k
}

fn chunk_key(id: &str, i: u32) -> Vec<u8> {
    let mut k = chunk_prefix(id);
    k.extend_from_slice(&i.to_be_bytes());
    k
}

/// sled's page cache (its default is 1 GiB).
const SLED_CACHE_BYTES: u64 = 32 * 1024 * 1024;

/// How long a commit may take before herald stops waiting for the disk.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(15);

/// Whether the storage can be trusted with a `250`. Once a flush or fsync
/// fails (or hangs), nothing written before is known to be on disk
/// (fsyncgate): herald stops acknowledging until a probe (a write, flush and
/// fsync of its own) succeeds again.
#[derive(Default)]
pub struct Health {
    /// When the committer last went round its loop (ms): the watchdog
    /// pings systemd only while it is alive.
    pub committer_beat: AtomicU64,
    failed: AtomicBool,
    /// The disk works again but sled keeps its I/O error for good: only
    /// reopening the database (a restart) recovers.
    restart: AtomicBool,
    reason: Mutex<Option<(u64, String)>>,
}

impl Health {
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Since when (ms) and why the storage failed, while it is failed.
    pub fn failure(&self) -> Option<(u64, String)> {
        if self.is_failed() {
            self.reason
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        } else {
            None
        }
    }

    /// Marks the storage failed; logs only on the change of state.
    pub fn fail(&self, why: &str) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if !self.failed.swap(true, Ordering::SeqCst) {
            tracing::error!(
                error = why,
                "storage failed: new mail gets 451 and delivery is held until a probe write succeeds"
            );
            *r = Some((now_ms(), why.to_string()));
        }
    }

    /// True once the storage can only be recovered by a restart.
    pub fn needs_restart(&self) -> bool {
        self.restart.load(Ordering::SeqCst)
    }

    fn recover(&self) {
        let _r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if self.failed.swap(false, Ordering::SeqCst) {
            tracing::info!("storage works again: accepting and delivering");
        }
    }
}

/// Counts kept as the queue changes, so that `status` and `/metrics` never
/// decode the whole queue.
#[derive(Default)]
pub struct Stats {
    pub messages: AtomicI64,
    pub queued: AtomicI64,
    pub deferred: AtomicI64,
    /// The same three per tenant (messages, queued, deferred), for a
    /// tenant's `status`: counted, never scanned.
    tenants: Mutex<HashMap<String, [i64; 3]>>,
}

impl Stats {
    fn add(&self, env: &Envelope, sign: i64) {
        self.messages.fetch_add(sign, Ordering::Relaxed);
        let (mut queued, mut deferred) = (0, 0);
        for r in &env.rcpts {
            match r.status {
                RcptStatus::Queued => queued += sign,
                RcptStatus::Deferred => deferred += sign,
                _ => {}
            };
        }
        self.queued.fetch_add(queued, Ordering::Relaxed);
        self.deferred.fetch_add(deferred, Ordering::Relaxed);
        if let Some(t) = &env.tenant {
            let mut all = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
            // (The tenant's name is copied once, not at every change.)
            if !all.contains_key(t) {
                all.insert(t.clone(), [0; 3]);
            }
            let c = all.get_mut(t).expect("just inserted");
            c[0] += sign;
            c[1] += queued;
            c[2] += deferred;
        }
    }

    pub fn get(&self) -> (u64, u64, u64) {
        let g = |a: &AtomicI64| a.load(Ordering::Relaxed).max(0) as u64;
        (g(&self.messages), g(&self.queued), g(&self.deferred))
    }

    /// Messages, queued and deferred recipients of tenant `t`.
    pub fn of_tenant(&self, t: &str) -> (u64, u64, u64) {
        let all = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        let c = all.get(t).copied().unwrap_or_default();
        let g = |n: i64| n.max(0) as u64;
        (g(c[0]), g(c[1]), g(c[2]))
    }
}

/// A queued record that does not decode, set aside.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Quarantined {
    pub id: String,
    pub error: String,
    pub at_ms: u64,
}

/// The sled database and the committer that makes writes durable.
#[derive(Clone)]
pub struct Store {
    pub db: sled::Db,
    bodies: sled::Tree,
    envelopes: sled::Tree,
    meta: sled::Tree,
    quarantine: sled::Tree,
    commit_tx: mpsc::Sender<Waiter>,
    /// Serialises read-modify-write of envelopes (delivery results, cancel,
    /// retry) so that one never overwrites another's change.
    update_lock: Arc<std::sync::Mutex<()>>,
    pub ids: Arc<IdGen>,
    pub health: Arc<Health>,
    pub stats: Arc<Stats>,
    /// Where large bodies are files.
    body_dir: std::path::PathBuf,
    /// Body files written since the last commit, for the committer to sync.
    unsynced: Arc<Mutex<Vec<File>>>,
    /// Envelopes as last written, decoded (see [`EnvelopeCache`]).
    cache: Arc<EnvelopeCache>,
}

/// The envelopes this process wrote last, decoded: a message is read some
/// five times between reception and the end of its delivery (the
/// scheduler, the attempt, the check before sending, the ledger's update),
/// and decoding its JSON each time was a tenth of its CPU. Only writes fill
/// it (an insert of a new id, or a change under the update lock), in the
/// order of the writes to sled, so a read never puts back an older
/// version; bounded, emptied when full.
#[derive(Default)]
struct EnvelopeCache(Mutex<HashMap<String, Envelope>>);

/// Envelopes the cache holds at most (a few MB).
const ENVELOPE_CACHE_MAX: usize = 4096;

impl EnvelopeCache {
    fn get(&self, id: &str) -> Option<Envelope> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    fn put(&self, env: Envelope) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= ENVELOPE_CACHE_MAX && !m.contains_key(&env.id) {
            m.clear();
        }
        m.insert(env.id.clone(), env);
    }

    fn forget(&self, id: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }
}

impl Store {
    pub fn open(path: &Path) -> Result<Store> {
        std::fs::create_dir_all(path)?;
        let db = sled::Config::new()
            .path(path)
            .flush_every_ms(Some(500))
            // sled's default cache is 1 GiB: bodies of delivered mail would
            // stay in memory long after they left.
            .cache_capacity(SLED_CACHE_BYTES)
            .open()?;
        let db_file = File::open(path.join("db"))?;
        let blobs = path.join("blobs");
        let body_dir = path.join("bodies");
        std::fs::create_dir_all(&body_dir)?;
        let (commit_tx, commit_rx) = mpsc::channel::<Waiter>();
        let health: Arc<Health> = Arc::default();
        let meta = db.open_tree("meta")?;
        let unsynced: Arc<Mutex<Vec<File>>> = Arc::default();
        let c = Committer {
            db: db.clone(),
            file: db_file,
            blobs,
            synced: HashSet::new(),
            health: health.clone(),
            meta: meta.clone(),
            body_dir: body_dir.clone(),
            unsynced: unsynced.clone(),
        };
        std::thread::Builder::new()
            .name("herald-commit".into())
            .spawn(move || c.run(commit_rx))?;
        let store = Store {
            bodies: db.open_tree("bodies")?,
            envelopes: db.open_tree("envelopes")?,
            quarantine: db.open_tree("quarantine")?,
            meta,
            db,
            commit_tx,
            update_lock: Arc::default(),
            ids: Arc::new(IdGen::new()),
            health,
            stats: Arc::default(),
            body_dir,
            unsynced,
            cache: Arc::default(),
        };
        // One scan at start: counts, and the quarantine of what no longer
        // decodes.
        for env in store.all()? {
            store.stats.add(&env, 1);
        }
        store.remove_orphan_bodies()?;
        Ok(store)
    }

    /// Waits until everything written before this call is on disk. Fails at
    /// once while the storage is failed, and after [`COMMIT_TIMEOUT`] when
    /// the disk does not answer: a client gets `451`, never a hang.
    pub async fn commit(&self) -> Result<()> {
        if let Some((_, why)) = self.health.failure() {
            return Err(QueueError::Failed(why));
        }
        let (tx, rx) = oneshot::channel();
        self.commit_tx.send(tx).map_err(|_| QueueError::Stopped)?;
        match tokio::time::timeout(COMMIT_TIMEOUT, rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(QueueError::Failed(e)),
            Ok(Err(_)) => Err(QueueError::Stopped),
            Err(_) => {
                let why = format!(
                    "the disk did not complete a sync within {}s",
                    COMMIT_TIMEOUT.as_secs()
                );
                self.health.fail(&why);
                Err(QueueError::Failed(why))
            }
        }
    }

    /// Writes a new message (not yet durable: call [`Store::commit`]). A
    /// queue id that exists already is refused, never overwritten.
    pub fn insert(&self, env: &Envelope, body: &[u8]) -> Result<()> {
        let mut env = env.clone();
        env.v = RECORD_VERSION;
        self.insert_new(&env, body)?;
        self.cache.put(env);
        Ok(())
    }

    fn insert_new(&self, env: &Envelope, body: &[u8]) -> Result<()> {
        let v = serde_json::to_vec(env).map_err(|_| QueueError::Corrupt(env.id.clone()))?;
        let id = env.id.as_bytes();
        if self
            .envelopes
            .compare_and_swap(id, None as Option<&[u8]>, Some(v))?
            .is_err()
        {
            return Err(QueueError::Exists(env.id.clone()));
        }
        if body.len() > BODY_FILE_MIN {
            if let Err(e) = self.write_body_file(&env.id, body) {
                let _ = self.envelopes.remove(id);
                return Err(e.into());
            }
            self.stats.add(env, 1);
            return Ok(());
        }
        // The usual small body is one plain insert: sled's apply_batch takes
        // a lock that stops every other reader and writer of the database
        // (it halved throughput with many sessions).
        if body.len() <= BODY_CHUNK {
            if let Err(e) = self.bodies.insert(chunk_key(&env.id, 0), body) {
                let _ = self.envelopes.remove(id);
                return Err(e.into());
            }
            self.stats.add(env, 1);
            return Ok(());
        }
        // Several chunks: one atomic batch, never half written.
        let mut batch = sled::Batch::default();
        for (i, chunk) in body.chunks(BODY_CHUNK).enumerate() {
            batch.insert(chunk_key(&env.id, i as u32), chunk);
        }
        if body.is_empty() {
            batch.insert(chunk_key(&env.id, 0), &[][..]);
        }
        if let Err(e) = self.bodies.apply_batch(batch) {
            let _ = self.envelopes.remove(id);
            return Err(e.into());
        }
        self.stats.add(env, 1);
        Ok(())
    }

    /// Body files of messages that were never acknowledged (a crash between
    /// the file and the commit) are deleted at start-up.
    fn remove_orphan_bodies(&self) -> Result<()> {
        for entry in std::fs::read_dir(&self.body_dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let id = name.to_string_lossy();
            if !self.envelopes.contains_key(id.as_bytes())?
                && !self.quarantine.contains_key(id.as_bytes())?
            {
                tracing::info!(%id, "removing the body of a message that was never queued");
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    /// Writes a large body to its own file; the next commit syncs it.
    fn write_body_file(&self, id: &str, body: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(self.body_dir.join(id))?;
        f.write_all(body)?;
        self.unsynced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(f);
        Ok(())
    }

    /// Writes a changed envelope (the caller holds the update lock).
    fn put_envelope(&self, env: &Envelope) -> Result<()> {
        let mut env = env.clone();
        env.v = RECORD_VERSION;
        let v = serde_json::to_vec(&env).map_err(|_| QueueError::Corrupt(env.id.clone()))?;
        self.cache.forget(&env.id);
        self.envelopes.insert(env.id.as_bytes(), v)?;
        self.cache.put(env);
        Ok(())
    }

    /// The envelope of a queued message. One that does not decode is moved
    /// to the quarantine (and reads as absent) so that it cannot stop the
    /// rest of the queue.
    pub fn envelope(&self, id: &str) -> Result<Option<Envelope>> {
        if let Some(env) = self.cache.get(id) {
            return Ok(Some(env));
        }
        match self.envelopes.get(id.as_bytes())? {
            None => Ok(None),
            Some(v) => match serde_json::from_slice(&v) {
                Ok(env) => Ok(Some(env)),
                Err(e) => {
                    self.quarantine_record(id, &e.to_string())?;
                    Ok(None)
                }
            },
        }
    }

    fn quarantine_record(&self, id: &str, error: &str) -> Result<()> {
        tracing::error!(
            %id,
            error,
            "queued record does not decode: moved to quarantine (herald queue lists it, herald cancel removes it)"
        );
        let q = Quarantined {
            id: id.to_string(),
            error: error.to_string(),
            at_ms: now_ms(),
        };
        let v = serde_json::to_vec(&q).map_err(|_| QueueError::Corrupt(id.into()))?;
        self.quarantine.insert(id.as_bytes(), v)?;
        self.cache.forget(id);
        self.envelopes.remove(id.as_bytes())?;
        Ok(())
    }

    /// Records set aside because they do not decode.
    pub fn quarantined(&self) -> Result<Vec<Quarantined>> {
        let mut out = Vec::new();
        for item in self.quarantine.iter() {
            let (k, v) = item?;
            out.push(serde_json::from_slice(&v).unwrap_or_else(|_| Quarantined {
                id: String::from_utf8_lossy(&k).into_owned(),
                error: "unreadable".into(),
                at_ms: 0,
            }));
        }
        Ok(out)
    }

    /// Deletes a quarantined record and its body; true when there was one.
    pub fn drop_quarantined(&self, id: &str) -> Result<bool> {
        let had = self.quarantine.remove(id.as_bytes())?.is_some();
        if had {
            self.remove_body(id)?;
        }
        Ok(had)
    }

    /// The message bytes (from its chunks; a spool written before chunks
    /// has the whole body under the queue id).
    pub fn body(&self, id: &str) -> Result<Option<Vec<u8>>> {
        // Never a path from anything but an id of ours.
        if parse_id(id).as_deref() != Some(id) {
            return Ok(None);
        }
        let mut out: Option<Vec<u8>> = None;
        for item in self.bodies.scan_prefix(chunk_prefix(id)) {
            let (_, v) = item?;
            out.get_or_insert_with(Vec::new).extend_from_slice(&v);
        }
        if out.is_none() {
            out = self.bodies.get(id.as_bytes())?.map(|v| v.to_vec());
        }
        if out.is_none() {
            match std::fs::read(self.body_dir.join(id)) {
                Ok(b) => out = Some(b),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    fn remove_body(&self, id: &str) -> Result<()> {
        // Plain removes (see insert): the first chunk first, so a body is
        // never read back without its start.
        for item in self.bodies.scan_prefix(chunk_prefix(id)).keys() {
            self.bodies.remove(item?)?;
        }
        self.bodies.remove(id.as_bytes())?;
        match std::fs::remove_file(self.body_dir.join(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Reads, changes and writes back one envelope atomically with respect
    /// to other updates; removes the message when every recipient is final.
    /// Returns the envelope as changed (None when it is not queued).
    pub fn update(&self, id: &str, f: impl FnOnce(&mut Envelope)) -> Result<Option<Envelope>> {
        let _guard = self.update_lock.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mut env) = self.envelope(id)? else {
            return Ok(None);
        };
        let old = env.clone();
        f(&mut env);
        let res = if env.is_done() {
            self.remove_unlocked(id)
        } else {
            self.put_envelope(&env)
        };
        if let Err(e) = res {
            self.health.fail(&e.to_string());
            return Err(e);
        }
        self.stats.add(&old, -1);
        if !env.is_done() {
            self.stats.add(&env, 1);
        }
        Ok(Some(env))
    }

    /// Drops a message (its recipients are all final, or it was never
    /// acknowledged): only history remains.
    pub fn remove(&self, id: &str) -> Result<()> {
        let _guard = self.update_lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(Some(env)) = self.envelope(id) {
            self.remove_unlocked(id)?;
            self.stats.add(&env, -1);
            return Ok(());
        }
        self.remove_unlocked(id)
    }

    fn remove_unlocked(&self, id: &str) -> Result<()> {
        self.cache.forget(id);
        self.remove_body(id)?;
        self.envelopes.remove(id.as_bytes())?;
        Ok(())
    }

    /// Every queued envelope, oldest first. Records that do not decode are
    /// quarantined and left out.
    pub fn all(&self) -> Result<Vec<Envelope>> {
        let mut out = Vec::new();
        let mut bad = Vec::new();
        for item in self.envelopes.iter() {
            let (k, v) = item?;
            match serde_json::from_slice::<Envelope>(&v) {
                Ok(env) => out.push(env),
                Err(e) => bad.push((String::from_utf8_lossy(&k).into_owned(), e.to_string())),
            }
        }
        for (id, e) in bad {
            self.quarantine_record(&id, &e)?;
        }
        Ok(out)
    }

    /// Messages in the queue (kept as a count, not scanned).
    pub fn len(&self) -> usize {
        self.stats.get().0 as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Small persistent flags (e.g. "paused").
    pub fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.meta.get(key.as_bytes())?.map(|v| v.to_vec()))
    }

    pub fn meta_set(&self, key: &str, value: Option<&[u8]>) -> Result<()> {
        match value {
            Some(v) => self.meta.insert(key.as_bytes(), v)?,
            None => self.meta.remove(key.as_bytes())?,
        };
        Ok(())
    }
}

/// The group-commit thread: take every waiter that is queued, make the
/// database durable once, answer them all. While the storage is failed it
/// probes it every few seconds.
struct Committer {
    db: sled::Db,
    file: File,
    /// sled writes values larger than a quarter segment (large messages) to
    /// files of their own under `blobs/`, and never fsyncs them.
    blobs: std::path::PathBuf,
    /// Blob files already synced, by name (never by modification time:
    /// clocks and coarse timestamps cannot be trusted with durability).
    synced: HashSet<std::ffi::OsString>,
    health: Arc<Health>,
    meta: sled::Tree,
    body_dir: std::path::PathBuf,
    unsynced: Arc<Mutex<Vec<File>>>,
}

impl Committer {
    fn run(mut self, rx: mpsc::Receiver<Waiter>) {
        const PROBE_EVERY: Duration = Duration::from_secs(2);
        loop {
            self.health
                .committer_beat
                .store(now_ms(), Ordering::Relaxed);
            let first = match rx.recv_timeout(PROBE_EVERY) {
                Ok(w) => w,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if self.health.is_failed() && !self.health.needs_restart() {
                        match self.probe() {
                            Ok(()) => self.health.recover(),
                            // sled keeps an I/O error for good; when the
                            // filesystem itself works again, a restart
                            // (reopening the database) recovers.
                            Err(_) if self.filesystem_works() => {
                                tracing::error!("the disk works again but the database keeps its error: restarting herald to reopen it");
                                self.health.restart.store(true, Ordering::SeqCst);
                            }
                            Err(_) => {}
                        }
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            let mut waiters = vec![first];
            while let Ok(w) = rx.try_recv() {
                waiters.push(w);
            }
            let res = if let Some((_, why)) = self.health.failure() {
                Err(why)
            } else {
                let health = self.health.clone();
                self.sync().inspect_err(|e| health.fail(e))
            };
            if let Err(e) = &res {
                tracing::debug!(error = %e, waiters = waiters.len(), "storage commit failed");
            }
            for w in waiters {
                let _ = w.send(res.clone());
            }
        }
    }

    /// sled's flush() only does sync_file_range; the fsync makes it survive
    /// a power cut, not just a process crash.
    fn sync(&mut self) -> std::result::Result<(), String> {
        // Body files first (and the directory that names them), then the
        // database whose envelopes point at them.
        let files = std::mem::take(&mut *self.unsynced.lock().unwrap_or_else(|e| e.into_inner()));
        if !files.is_empty() {
            for f in &files {
                f.sync_all()
                    .map_err(|e| format!("fsync of a message body: {e}"))?;
            }
            File::open(&self.body_dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| format!("fsync of {}: {e}", self.body_dir.display()))?;
        }
        self.db.flush().map_err(|e| format!("flush: {e}"))?;
        self.sync_new_blobs()
            .map_err(|e| format!("fsync of {}: {e}", self.blobs.display()))?;
        self.file
            .sync_all()
            .map_err(|e| format!("fsync of the database: {e}"))
    }

    /// A write of our own, flushed and synced: the storage works again.
    fn probe(&mut self) -> std::result::Result<(), String> {
        self.meta
            .insert("probe", &now_ms().to_be_bytes())
            .map_err(|e| e.to_string())?;
        self.sync()
    }

    /// A small file of our own written and synced beside the database.
    fn filesystem_works(&self) -> bool {
        use std::io::Write;
        let Some(dir) = self.blobs.parent() else {
            return false;
        };
        let path = dir.join("probe.tmp");
        let ok = File::create(&path)
            .and_then(|mut f| {
                f.write_all(&[0u8; 65536])?;
                f.sync_all()
            })
            .is_ok();
        let _ = std::fs::remove_file(&path);
        ok
    }

    /// Syncs the blob files not synced yet, and the directory that names
    /// them.
    fn sync_new_blobs(&mut self) -> std::io::Result<()> {
        let entries = match std::fs::read_dir(&self.blobs) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
        let mut present = HashSet::new();
        let mut any = false;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            present.insert(name.clone());
            if self.synced.contains(&name) {
                continue;
            }
            // sled deletes blobs of delivered messages at any time: a file
            // that vanished needs no sync.
            match File::open(entry.path()).and_then(|f| f.sync_all()) {
                Ok(()) => {
                    any = true;
                    self.synced.insert(name);
                }
                Err(e) if gone(&e) => {}
                Err(e) => return Err(e),
            }
        }
        self.synced.retain(|n| present.contains(n));
        if any {
            File::open(&self.blobs)?.sync_all()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_sort_by_arrival() {
        let g = IdGen::new();
        let mut ids: Vec<String> = (0..1000).map(|_| g.next()).collect();
        assert!(ids.iter().all(|i| i.len() == 12));
        let sorted = {
            let mut s = ids.clone();
            s.sort();
            s
        };
        // Same millisecond ids may wrap the 20-bit sequence only after 1M ids.
        let mut dedup = ids.clone();
        dedup.dedup();
        assert_eq!(dedup.len(), 1000);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let later = g.next();
        assert!(sorted.iter().all(|i| *i < later));
        ids.push(later);
    }

    #[test]
    fn only_ids_of_herald_s_form_are_taken_from_clients() {
        let id = IdGen::new().next();
        assert_eq!(parse_id(&id).as_deref(), Some(id.as_str()));
        assert_eq!(
            parse_id(&id.to_ascii_lowercase()).as_deref(),
            Some(id.as_str())
        );
        for bad in [
            "",
            "/dev/zero",
            "/etc/passwd",
            "../../herald.toml",
            "..%2F..%2Fx",
            "01JH5Z8Q3M7",
            "01JH5Z8Q3M7KK",
            "01JH5Z8Q3M7U",
            "01JH5Z8Q/M7K",
        ] {
            assert_eq!(parse_id(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn insert_commit_reload() {
        let dir = tempfile::tempdir().unwrap();
        let env = Envelope {
            id: "01JH5Z8Q3M71".into(),
            received_at: 1,
            client_ip: "127.0.0.1".into(),
            helo: "x".into(),
            original_sender: "a@b.c".into(),
            mail_from: "n@example.com".into(),
            upstream: "mx".into(),
            size: 3,
            rcpts: vec![Rcpt {
                addr: "x@y.test".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        {
            let s = Store::open(dir.path()).unwrap();
            s.insert(&env, b"abc").unwrap();
            s.commit().await.unwrap();
        }
        // The committer thread lets go of the database lock when it sees
        // the channel close; give it a moment.
        let s = (0..100)
            .find_map(|_| {
                Store::open(dir.path()).ok().or_else(|| {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    None
                })
            })
            .expect("reopen");
        assert_eq!(s.body("01JH5Z8Q3M71").unwrap().unwrap(), b"abc");
        assert_eq!(s.all().unwrap().len(), 1);
        // A large body in chunks reads back whole, and goes away whole.
        let big: Vec<u8> = (0..(3 * BODY_CHUNK + 17))
            .map(|i| (i % 251) as u8)
            .collect();
        let env2 = Envelope {
            id: "01JH5Z8Q3M72".into(),
            rcpts: env.rcpts.clone(),
            ..Default::default()
        };
        s.insert(&env2, &big).unwrap();
        assert_eq!(s.body("01JH5Z8Q3M72").unwrap().unwrap(), big);
        s.remove("01JH5Z8Q3M72").unwrap();
        assert_eq!(s.body("01JH5Z8Q3M72").unwrap(), None);
        assert_eq!(
            s.bodies.scan_prefix(chunk_prefix("01JH5Z8Q3M72")).count(),
            0
        );
        // Larger still: a file of its own, synced by the next commit.
        let huge: Vec<u8> = (0..(BODY_FILE_MIN * 3)).map(|i| (i % 241) as u8).collect();
        let env3 = Envelope {
            id: "01JH5Z8Q3M73".into(),
            rcpts: env.rcpts.clone(),
            ..Default::default()
        };
        s.insert(&env3, &huge).unwrap();
        assert!(dir.path().join("bodies/01JH5Z8Q3M73").exists());
        s.commit().await.unwrap();
        assert!(s.unsynced.lock().unwrap().is_empty());
        assert_eq!(s.body("01JH5Z8Q3M73").unwrap().unwrap(), huge);
        s.remove("01JH5Z8Q3M73").unwrap();
        assert!(!dir.path().join("bodies/01JH5Z8Q3M73").exists());
        assert_eq!(s.stats.get(), (1, 1, 0));
        // The same id again is refused, never overwritten.
        assert!(matches!(
            s.insert(&env, b"other"),
            Err(QueueError::Exists(_))
        ));
        assert_eq!(s.body("01JH5Z8Q3M71").unwrap().unwrap(), b"abc");
        s.remove("01JH5Z8Q3M71").unwrap();
        assert!(s.is_empty());
        assert_eq!(s.stats.get(), (0, 0, 0));
    }

    #[test]
    fn an_older_record_still_reads() {
        // Written before versions, classes and tags existed.
        let old = r#"{"id":"OLD1","received_at":5,"client_ip":"::1","helo":"h","auth_user":null,
            "original_sender":"a@b.c","mail_from":"n@example.com","upstream":"up","size":9,
            "rcpts":[{"addr":"x@y.test","status":"deferred","attempts":2,"next_attempt":7,
            "last_reply":"451 later","last_host":"up","updated":6}]}"#;
        let env: Envelope = serde_json::from_str(old).unwrap();
        assert_eq!(env.v, 0);
        assert_eq!(env.tag, None);
        assert_eq!(env.rcpts[0].status, RcptStatus::Deferred);
        assert_eq!(env.rcpts[0].class, None);
    }
}

//! The durable queue: message bodies and per-recipient state in sled.
//!
//! Only this module writes the spool trees (`bodies`, `envelopes`, `meta`).
//! A message is acknowledged with `250` only after [`Store::commit`] returned,
//! which means sled flushed it and the database file was fsynced. Commits are
//! batched by one committer thread (group commit): every session waiting at
//! the same moment shares one flush + fsync, so durability costs one disk
//! sync per batch rather than per message. One thread also sidesteps sled's
//! deadlock when many tasks call `flush_async` at once (see STACK.md).

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{SystemTime, UNIX_EPOCH};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RcptStatus {
    /// Waiting for its first attempt (possibly held by a send delay).
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
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

/// The sled database and the committer that makes writes durable.
#[derive(Clone)]
pub struct Store {
    pub db: sled::Db,
    bodies: sled::Tree,
    envelopes: sled::Tree,
    meta: sled::Tree,
    commit_tx: mpsc::Sender<Waiter>,
    /// Serialises read-modify-write of envelopes (delivery results, cancel,
    /// retry) so that one never overwrites another's change.
    update_lock: Arc<std::sync::Mutex<()>>,
    pub ids: Arc<IdGen>,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store> {
        std::fs::create_dir_all(path)?;
        let db = sled::Config::new()
            .path(path)
            .flush_every_ms(Some(500))
            .open()?;
        let db_file = File::open(path.join("db"))?;
        let blobs = path.join("blobs");
        let (commit_tx, commit_rx) = mpsc::channel::<Waiter>();
        let committer_db = db.clone();
        std::thread::Builder::new()
            .name("herald-commit".into())
            .spawn(move || committer(committer_db, db_file, blobs, commit_rx))?;
        Ok(Store {
            bodies: db.open_tree("bodies")?,
            envelopes: db.open_tree("envelopes")?,
            meta: db.open_tree("meta")?,
            db,
            commit_tx,
            update_lock: Arc::default(),
            ids: Arc::new(IdGen::new()),
        })
    }

    /// Waits until everything written before this call is on disk.
    pub async fn commit(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.commit_tx.send(tx).map_err(|_| QueueError::Stopped)?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(QueueError::Io(std::io::Error::other(e))),
            Err(_) => Err(QueueError::Stopped),
        }
    }

    /// Writes a new message (not yet durable: call [`Store::commit`]).
    pub fn insert(&self, env: &Envelope, body: &[u8]) -> Result<()> {
        self.bodies.insert(env.id.as_bytes(), body)?;
        self.put_envelope(env)
    }

    pub fn put_envelope(&self, env: &Envelope) -> Result<()> {
        let v = serde_json::to_vec(env).map_err(|_| QueueError::Corrupt(env.id.clone()))?;
        self.envelopes.insert(env.id.as_bytes(), v)?;
        Ok(())
    }

    pub fn envelope(&self, id: &str) -> Result<Option<Envelope>> {
        match self.envelopes.get(id.as_bytes())? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|_| QueueError::Corrupt(id.to_string())),
        }
    }

    pub fn body(&self, id: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.bodies.get(id.as_bytes())?.map(|v| v.to_vec()))
    }

    /// Reads, changes and writes back one envelope atomically with respect
    /// to other updates; removes the message when every recipient is final.
    /// Returns the envelope as changed (None when it is not queued).
    pub fn update(&self, id: &str, f: impl FnOnce(&mut Envelope)) -> Result<Option<Envelope>> {
        let _guard = self.update_lock.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mut env) = self.envelope(id)? else {
            return Ok(None);
        };
        f(&mut env);
        if env.is_done() {
            self.remove(id)?;
        } else {
            self.put_envelope(&env)?;
        }
        Ok(Some(env))
    }

    /// Drops a message whose recipients are all final: only history remains.
    pub fn remove(&self, id: &str) -> Result<()> {
        self.bodies.remove(id.as_bytes())?;
        self.envelopes.remove(id.as_bytes())?;
        Ok(())
    }

    /// Every queued envelope, oldest first.
    pub fn all(&self) -> Result<Vec<Envelope>> {
        let mut out = Vec::new();
        for item in self.envelopes.iter() {
            let (k, v) = item?;
            let env: Envelope = serde_json::from_slice(&v)
                .map_err(|_| QueueError::Corrupt(String::from_utf8_lossy(&k).into_owned()))?;
            out.push(env);
        }
        Ok(out)
    }

    pub fn len(&self) -> usize {
        self.envelopes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.envelopes.is_empty()
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

/// sled writes values larger than a quarter segment (large messages) to
/// files of their own under `blobs/`, and never fsyncs them. This syncs
/// the blob files written since `since`, and the directory that names them.
fn sync_new_blobs(dir: &Path, since: SystemTime) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut any = false;
    let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    for entry in entries {
        // sled deletes blobs of delivered messages at any time: a file that
        // vanished needs no sync.
        let entry = entry?;
        let meta = match entry.metadata() {
            Ok(m) => m,
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(e),
        };
        if meta.is_file() && meta.modified()? >= since {
            match File::open(entry.path()).and_then(|f| f.sync_all()) {
                Ok(()) => any = true,
                Err(e) if gone(&e) => {}
                Err(e) => return Err(e),
            }
        }
    }
    if any {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The group-commit loop: take every waiter that is queued, make the
/// database durable once, answer them all.
fn committer(db: sled::Db, file: File, blobs: std::path::PathBuf, rx: mpsc::Receiver<Waiter>) {
    // Blob files are synced by modification time, with a margin for
    // clock granularity.
    let margin = std::time::Duration::from_secs(2);
    let mut last = SystemTime::now() - margin;
    while let Ok(first) = rx.recv() {
        let mut waiters = vec![first];
        while let Ok(w) = rx.try_recv() {
            waiters.push(w);
        }
        let started = SystemTime::now();
        // sled's flush() only does sync_file_range; the fsync makes it
        // survive a power cut, not just a process crash.
        let res = db
            .flush()
            .map_err(|e| e.to_string())
            .and_then(|_| sync_new_blobs(&blobs, last - margin).map_err(|e| e.to_string()))
            .and_then(|_| file.sync_all().map_err(|e| e.to_string()));
        last = started;
        if let Err(e) = &res {
            tracing::error!(error = %e, "storage commit failed");
        }
        for w in waiters {
            let _ = w.send(res.clone());
        }
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

    #[tokio::test]
    async fn insert_commit_reload() {
        let dir = tempfile::tempdir().unwrap();
        let env = Envelope {
            id: "ID1".into(),
            received_at: 1,
            client_ip: "127.0.0.1".into(),
            helo: "x".into(),
            auth_user: None,
            original_sender: "a@b.c".into(),
            mail_from: "n@example.com".into(),
            upstream: "mx".into(),
            tag: None,
            subject: None,
            size: 3,
            rcpts: vec![],
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
        assert_eq!(s.body("ID1").unwrap().unwrap(), b"abc");
        assert_eq!(s.all().unwrap().len(), 1);
        s.remove("ID1").unwrap();
        assert!(s.is_empty());
    }
}

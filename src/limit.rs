//! A number of slots that a reload may change while slots are held: the
//! outbound sessions in flight, each destination's `max_connections`, the
//! SMTP listener's `max_connections`.
//!
//! A tokio `Semaphore` can grow (`add_permits`) but can only shrink by the
//! permits that are free at that moment. What it could not take back is a
//! debt: the next slots given back are forgotten instead of freed, until
//! the debt is paid. So a limit lowered from 16 to 4 while 10 sessions run
//! lets no new session start until only 3 are left.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug)]
struct Inner {
    sem: Arc<Semaphore>,
    /// (size, debt): the limit, and slots to forget when they come back.
    state: Mutex<(usize, usize)>,
}

/// Slots up to a limit that can change.
#[derive(Debug, Clone)]
pub struct Limit(Arc<Inner>);

/// One slot of a [`Limit`], given back on drop.
#[derive(Debug)]
pub struct Permit {
    permit: Option<OwnedSemaphorePermit>,
    owner: Arc<Inner>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut st = self.owner.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.1 > 0 {
            st.1 -= 1;
            if let Some(p) = self.permit.take() {
                p.forget();
            }
        }
        // Otherwise the permit goes back to the semaphore as it drops,
        // still under the lock, so that a resize sees a settled count.
        drop(self.permit.take());
    }
}

impl Limit {
    pub fn new(size: usize) -> Limit {
        Limit(Arc::new(Inner {
            sem: Arc::new(Semaphore::new(size)),
            state: Mutex::new((size, 0)),
        }))
    }

    /// The limit now.
    pub fn size(&self) -> usize {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    /// Slots held now (may exceed `size` just after it was lowered).
    pub fn in_use(&self) -> usize {
        let st = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        (st.0 + st.1).saturating_sub(self.0.sem.available_permits())
    }

    fn permit(&self, p: OwnedSemaphorePermit) -> Permit {
        Permit {
            permit: Some(p),
            owner: self.0.clone(),
        }
    }

    /// A slot now, or None when every one is held.
    pub fn try_acquire(&self) -> Option<Permit> {
        let p = self.0.sem.clone().try_acquire_owned().ok()?;
        Some(self.permit(p))
    }

    /// Waits for a slot.
    pub async fn acquire(&self) -> Permit {
        let p = self
            .0
            .sem
            .clone()
            .acquire_owned()
            .await
            .expect("a limit's semaphore is never closed");
        self.permit(p)
    }

    /// Waits until no slot is held (shutdown: attempts in flight finish).
    pub async fn idle(&self) {
        loop {
            let size = self.size();
            drop(self.0.sem.acquire_many(size as u32).await);
            if self.in_use() == 0 {
                return;
            }
            // Slots held beyond a lowered limit: look again shortly.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Sets the limit: more slots at once, or fewer as held ones come back.
    pub fn resize(&self, size: usize) {
        let mut st = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        let (old, debt) = *st;
        if size > old {
            let grow = size - old;
            let paid = grow.min(debt);
            self.0.sem.add_permits(grow - paid);
            *st = (size, debt - paid);
        } else if size < old {
            let shrink = old - size;
            let taken = self.0.sem.forget_permits(shrink);
            *st = (size, debt + shrink - taken);
        }
    }
}

/// Connection slots, shared by the SMTP listeners of one kind (the
/// platform's, or the `[bounces]` intake's): `max_connections` in all, and
/// `max_connections_per_ip` for one client address, so that a few clients
/// cannot hold every slot. A reload may change both.
pub struct Slots {
    all: Limit,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max_per_ip: AtomicUsize,
    /// The config keys of the two limits, for the log line of a refusal.
    keys: SlotKeys,
}

/// The keys of a [`Slots`]' two limits: (all, per client address).
pub type SlotKeys = (&'static str, &'static str);

pub const LISTEN_SLOTS: SlotKeys = ("listen.max_connections", "listen.max_connections_per_ip");
pub const INTAKE_SLOTS: SlotKeys = ("bounces.max_connections", "bounces.max_connections_per_ip");

/// A session's hold on its slots, given back on drop.
pub struct Slot {
    _permit: Permit,
    ip: IpAddr,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self.per_ip.lock().unwrap();
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

impl Slots {
    pub fn new(keys: SlotKeys, max_connections: usize, max_per_ip: usize) -> Slots {
        Slots {
            all: Limit::new(max_connections),
            per_ip: Default::default(),
            max_per_ip: AtomicUsize::new(max_per_ip),
            keys,
        }
    }

    /// New limits (a reload): sessions open beyond them go on.
    pub fn resize(&self, max_connections: usize, max_per_ip: usize) {
        self.all.resize(max_connections);
        self.max_per_ip.store(max_per_ip, Ordering::Relaxed);
    }

    /// A slot for a client at `ip`, or the refusal to send it. An
    /// `exempt` client (the platform's own, in `allowed_networks`) is held
    /// to `max_connections` only, as Postfix exempts `$mynetworks` from its
    /// per-client limits: 50 PHP workers on one host are one platform.
    pub fn take(&self, ip: IpAddr, exempt: bool) -> Result<Slot, &'static str> {
        self.take_with(ip, None, exempt)
    }

    /// One of the `max_connections`, before the client's address is known:
    /// a balancer's connection holds it while its PROXY header is read.
    pub fn any(&self) -> Result<Permit, &'static str> {
        self.all.try_acquire().ok_or(self.keys.0)
    }

    /// [`Slots::take`], with the overall permit already held if given.
    pub fn take_with(
        &self,
        ip: IpAddr,
        permit: Option<Permit>,
        exempt: bool,
    ) -> Result<Slot, &'static str> {
        let ip = canonical_ip(ip);
        let mut m = self.per_ip.lock().unwrap();
        if !exempt && m.get(&ip).copied().unwrap_or(0) >= self.max_per_ip.load(Ordering::Relaxed) {
            return Err(self.keys.1);
        }
        let permit = match permit {
            Some(p) => p,
            None => self.any()?,
        };
        *m.entry(ip).or_insert(0) += 1;
        Ok(Slot {
            _permit: permit,
            ip,
            per_ip: self.per_ip.clone(),
        })
    }
}

/// An IPv4 client on an IPv6 socket is the IPv4 address.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_at_once_and_shrinks_as_slots_come_back() {
        let l = Limit::new(3);
        let a = l.try_acquire().unwrap();
        let b = l.try_acquire().unwrap();
        let c = l.try_acquire().unwrap();
        assert!(l.try_acquire().is_none());
        l.resize(4);
        let d = l.try_acquire().unwrap();
        assert_eq!((l.size(), l.in_use()), (4, 4));
        // Down to 2 with 4 held: two must come back before a new one goes.
        l.resize(2);
        assert_eq!(l.in_use(), 4);
        drop(a);
        assert!(l.try_acquire().is_none());
        drop(b);
        assert!(l.try_acquire().is_none());
        assert_eq!(l.in_use(), 2);
        drop(c);
        let e = l.try_acquire().unwrap();
        assert!(l.try_acquire().is_none());
        // Growing again first pays what is still owed.
        l.resize(1);
        l.resize(3);
        assert_eq!(l.in_use(), 2);
        let f = l.try_acquire().unwrap();
        assert!(l.try_acquire().is_none());
        drop((d, e, f));
        assert_eq!(l.in_use(), 0);
        assert_eq!(l.0.sem.available_permits(), 3);
    }

    #[tokio::test]
    async fn idle_waits_for_every_slot() {
        let l = Limit::new(2);
        let a = l.acquire().await;
        l.resize(1);
        let waiting = tokio::spawn({
            let l = l.clone();
            async move { l.idle().await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        drop(a);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap();
    }
}

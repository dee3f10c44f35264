//! One memory budget for the message bytes herald holds at once: messages
//! being prepared and signed at the end of DATA, and bodies being sent. A
//! message waits for its share instead of growing the heap without bound
//! (20 clients sending 20 MiB each at once would otherwise take gigabytes).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Message bytes in flight at once, for all sessions and attempts together.
pub const DEFAULT_BYTES: usize = 96 * 1024 * 1024;

/// Permits count KiB, so that the semaphore's u32 covers any budget.
const UNIT: usize = 1024;

#[derive(Clone)]
pub struct Budget {
    sem: Arc<Semaphore>,
    units: u32,
}

impl Budget {
    pub fn new(bytes: usize) -> Budget {
        let units = (bytes / UNIT).clamp(1, Semaphore::MAX_PERMITS) as u32;
        Budget {
            sem: Arc::new(Semaphore::new(units as usize)),
            units,
        }
    }

    /// Waits until `bytes` fit in the budget (a request larger than the
    /// whole budget waits until it has the budget to itself). The share is
    /// given back when the permit is dropped. Waiters are served in order.
    pub async fn reserve(&self, bytes: usize) -> OwnedSemaphorePermit {
        let want = bytes.div_ceil(UNIT).clamp(1, self.units as usize) as u32;
        self.sem
            .clone()
            .acquire_many_owned(want)
            .await
            .expect("the budget's semaphore is never closed")
    }

    /// Bytes not reserved now.
    pub fn available(&self) -> usize {
        self.sem.available_permits() * UNIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shares_wait_for_each_other_and_oversize_gets_all() {
        let b = Budget::new(10 * UNIT);
        let a = b.reserve(6 * UNIT).await;
        assert_eq!(b.available(), 4 * UNIT);
        // 6 KiB more does not fit until `a` is dropped.
        let b2 = b.clone();
        let waiting = tokio::spawn(async move { b2.reserve(6 * UNIT).await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(a);
        let c = waiting.await.unwrap();
        assert_eq!(b.available(), 4 * UNIT);
        drop(c);
        // Larger than the whole budget: granted alone.
        let big = b.reserve(100 * UNIT).await;
        assert_eq!(b.available(), 0);
        drop(big);
        assert_eq!(b.available(), 10 * UNIT);
    }
}

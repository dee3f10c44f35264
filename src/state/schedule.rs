//! The scheduler's inbox: how reception, control and delivery ask for a
//! message to be looked at (the loop itself is `delivery::run`).

use tokio::sync::mpsc;

pub enum SchedMsg {
    /// (Re)schedule a message at this time (ms).
    Due(String, u64),
    /// An attempt finished (the message may have been rescheduled first);
    /// its route, whose slot is free again.
    Done(String, String),
    /// Something changed (resume): look at the due list again.
    Wake,
}

/// The handle through which others ask for delivery.
#[derive(Clone)]
pub struct Scheduler {
    tx: mpsc::UnboundedSender<SchedMsg>,
}

impl Scheduler {
    pub fn new() -> (Scheduler, mpsc::UnboundedReceiver<SchedMsg>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Scheduler { tx }, rx)
    }

    pub fn schedule(&self, id: &str, due_ms: u64) {
        let _ = self.tx.send(SchedMsg::Due(id.to_string(), due_ms));
    }

    pub fn wake(&self) {
        let _ = self.tx.send(SchedMsg::Wake);
    }

    /// An attempt on `route` finished.
    pub fn done(&self, id: &str, route: &str) {
        let _ = self
            .tx
            .send(SchedMsg::Done(id.to_string(), route.to_string()));
    }
}

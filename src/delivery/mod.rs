//! Delivery: the scheduler that decides when a message is due, and the
//! attempt that takes it to its upstream and records what happened.
//!
//! The scheduler keeps due times in memory (rebuilt from the queue at
//! start-up) and starts at most `concurrency` attempts at once. An attempt
//! reads the envelope, connects (or reuses an idle connection to the same
//! upstream), runs one transaction, and writes each recipient's new state
//! and an event. A message whose recipients are all final leaves the queue.

pub mod attempt;
pub mod client;
pub mod mx;
pub mod pool;
pub mod probe;
pub mod scheduler;

pub use attempt::attempt;
pub use scheduler::run;

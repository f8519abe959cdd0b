//! What one client's `ModelStreamInfer` streams may hold in memory: requests read but not yet
//! answered, and answers not yet taken by the transport. Each is a byte budget per client
//! (credential with authentication on, address without: [`framecast_proto::client`]), shared
//! by all of that client's streams.
//!
//! A stream reads its next request only once the request budget has room for the one it
//! read (at least [`MIN_REQUEST`] each), and a request runs only once the reply budget has
//! room for its answer (bounded from the model's outputs and the request's batch before it
//! is validated, so a waiting request holds no tensor or region). An answer gives its room
//! back when the transport takes it. So a client that stops reading its answers fills its reply budget,
//! its requests then wait and fill the request budget, and the stream stops reading: HTTP/2
//! flow control pushes back on the client, and the server holds at most the two budgets for
//! it, however many requests it sends.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Budgets are counted in KiB (semaphore permits are u32).
const UNIT: u64 = 1024;

/// Bytes of requests and of answers a client's streams may hold, each, by default
/// (`--stream-buffer-mib`).
pub const DEFAULT_BYTES: u64 = 256 << 20;

/// The least a request counts against its client's budget: 64 KiB, so at most 4,096
/// requests of a client are in flight at the default budget (a compositor keeps a few
/// hundred at most).
pub const MIN_REQUEST: usize = 64 << 10;

/// The budgets of every client with a stream open.
pub struct StreamBudgets {
    bytes: u64,
    clients: Mutex<HashMap<String, Weak<ClientBudget>>>,
}

/// One client's two budgets.
pub struct ClientBudget {
    requests: Arc<Semaphore>,
    replies: Arc<Semaphore>,
    units: u32,
}

/// Room taken in a budget, given back when dropped.
pub type Room = OwnedSemaphorePermit;

impl StreamBudgets {
    /// `bytes` of requests and `bytes` of answers per client.
    pub fn new(bytes: u64) -> StreamBudgets {
        StreamBudgets {
            bytes: bytes.max(UNIT),
            clients: Mutex::default(),
        }
    }

    /// `client`'s budgets, shared with its other streams while any is open.
    pub fn of(&self, client: &str) -> Arc<ClientBudget> {
        let mut clients = self.clients.lock();
        if let Some(b) = clients.get(client).and_then(Weak::upgrade) {
            return b;
        }
        clients.retain(|_, b| b.strong_count() > 0);
        let units = (self.bytes / UNIT).min(u32::MAX as u64 / 2) as u32;
        let b = Arc::new(ClientBudget {
            requests: Arc::new(Semaphore::new(units as usize)),
            replies: Arc::new(Semaphore::new(units as usize)),
            units,
        });
        clients.insert(client.to_string(), Arc::downgrade(&b));
        b
    }
}

impl Default for StreamBudgets {
    fn default() -> Self {
        StreamBudgets::new(DEFAULT_BYTES)
    }
}

impl ClientBudget {
    fn units(&self, bytes: usize) -> u32 {
        // One request or answer larger than the whole budget still goes, alone.
        (bytes as u64).div_ceil(UNIT).clamp(1, self.units as u64) as u32
    }

    /// Room for a request of `bytes` read from a stream: waits while the client's unanswered
    /// requests fill the budget. Each counts at least [`MIN_REQUEST`]: what its task holds
    /// besides its bytes, so that tiny requests cannot pile up without bound either.
    pub async fn request(&self, bytes: usize) -> Room {
        let n = self.units(bytes.max(MIN_REQUEST));
        self.requests
            .clone()
            .acquire_many_owned(n)
            .await
            .expect("the semaphore is never closed")
    }

    /// Room for an answer of `bytes`: waits while the client's answers not yet taken by the
    /// transport fill the budget.
    pub async fn reply(&self, bytes: usize) -> Room {
        let n = self.units(bytes);
        self.replies
            .clone()
            .acquire_many_owned(n)
            .await
            .expect("the semaphore is never closed")
    }

    /// Bytes of answers held now (tests, metrics).
    pub fn replies_held(&self) -> u64 {
        (self.units as u64 - self.replies.available_permits() as u64) * UNIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_full_budget_makes_the_next_taker_wait_until_room_is_given_back() {
        let budgets = StreamBudgets::new(4 * UNIT);
        let a = budgets.of("a");
        let held = a.reply(3 * UNIT as usize).await;
        assert_eq!(a.replies_held(), 3 * UNIT);
        let again = budgets.of("a");
        let wait = tokio::time::timeout(Duration::from_millis(50), again.reply(2 * UNIT as usize));
        assert!(wait.await.is_err(), "a second answer fit past the budget");
        // Another client has its own budget.
        let _b = budgets.of("b").reply(4 * UNIT as usize).await;
        drop(held);
        let _ = again.reply(2 * UNIT as usize).await;
        // Larger than the whole budget: goes alone.
        drop(_b);
        let _huge = budgets.of("b").request(1 << 30).await;
    }
}

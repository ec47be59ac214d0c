//! What a listener remembers of each client address, across its connections: how many
//! connections it holds (`max_connections_per_ip`) and how many AUTH attempts it failed in the
//! last minute (`auth.max_failures_per_minute`). Postfix's anvil(8) keeps the same two counts.
//!
//! An address is forgotten once it holds no connection and its minute of failures is over, so
//! the table holds at most the open connections plus the addresses that failed recently.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The window failed AUTH attempts are counted in.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Past this many remembered addresses, those with nothing left to remember are dropped.
const PRUNE_ABOVE: usize = 4096;

#[derive(Default)]
pub struct Clients {
    table: Mutex<HashMap<IpAddr, Client>>,
}

#[derive(Default)]
struct Client {
    connections: usize,
    failures: usize,
    window_start: Option<Instant>,
    /// The address was named in the log for this window already.
    reported: bool,
}

impl Client {
    fn window_over(&self, now: Instant) -> bool {
        self.window_start.is_none_or(|start| now.duration_since(start) >= FAILURE_WINDOW)
    }

    fn forgettable(&self, now: Instant) -> bool {
        self.connections == 0 && self.window_over(now)
    }
}

/// What a failed AUTH did to its address's count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Still under the limit.
    Counted,
    /// This failure reached the limit: the address is blocked until its minute is over (and
    /// this is the one time to name it in the log).
    Blocked,
}

/// One connection counted against its address; dropping it gives the slot back.
pub struct Slot {
    clients: Arc<Clients>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut table = self.clients.lock();
        if let Some(c) = table.get_mut(&self.ip) {
            c.connections = c.connections.saturating_sub(1);
            if c.forgettable(Instant::now()) {
                table.remove(&self.ip);
            }
        }
    }
}

impl Clients {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Client>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection slot for `ip`, or `None` when it already holds `max`.
    pub fn connect(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<Slot> {
        let mut table = self.lock();
        let client = table.entry(ip).or_default();
        if client.connections >= max {
            return None;
        }
        client.connections += 1;
        Some(Slot { clients: self.clone(), ip })
    }

    /// Whether `ip` failed AUTH `limit` times within the current minute.
    pub fn blocked(&self, ip: IpAddr, limit: usize) -> bool {
        let table = self.lock();
        table.get(&ip).is_some_and(|c| !c.window_over(Instant::now()) && c.failures >= limit)
    }

    /// Counts a failed AUTH from `ip`.
    pub fn auth_failed(&self, ip: IpAddr, limit: usize) -> Failure {
        let now = Instant::now();
        let mut table = self.lock();
        if table.len() > PRUNE_ABOVE {
            table.retain(|_, c| !c.forgettable(now));
        }
        let client = table.entry(ip).or_default();
        if client.window_over(now) {
            *client = Client { connections: client.connections, window_start: Some(now), ..Client::default() };
        }
        client.failures += 1;
        if client.failures >= limit && !client.reported {
            client.reported = true;
            Failure::Blocked
        } else {
            Failure::Counted
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_limited_per_address_and_given_back() {
        let clients = Arc::new(Clients::default());
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = clients.connect(a, 2).unwrap();
        let _second = clients.connect(a, 2).unwrap();
        assert!(clients.connect(a, 2).is_none());
        assert!(clients.connect(b, 2).is_some(), "another address has its own count");
        drop(first);
        assert!(clients.connect(a, 2).is_some());
    }

    #[test]
    fn failures_block_once_at_the_limit() {
        let clients = Clients::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(clients.auth_failed(a, 3), Failure::Counted);
        assert_eq!(clients.auth_failed(a, 3), Failure::Counted);
        assert!(!clients.blocked(a, 3));
        assert_eq!(clients.auth_failed(a, 3), Failure::Blocked);
        assert!(clients.blocked(a, 3));
        assert_eq!(clients.auth_failed(a, 3), Failure::Counted, "named once per window");
        assert!(!clients.blocked("192.0.2.9".parse().unwrap(), 3));
    }
}

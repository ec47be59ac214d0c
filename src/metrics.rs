//! metrics: what `serve` counts and how healthy each part is, read by the admin endpoint
//! (`/metrics`, `/healthz`). Parts of `serve` write to it; nothing reads it back to decide.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// Health of one watched IMAP folder, written by its watcher.
#[derive(Debug)]
pub struct FolderHealth {
    pub account: String,
    pub folder: String,
    /// How often the folder is synced at the latest (its `poll` interval, or the IDLE re-issue
    /// period); `/healthz` calls it stale after twice this long without a sync.
    pub interval: Duration,
    connected: AtomicBool,
    reconnects: AtomicU64,
    fetched: AtomicU64,
    last_sync: Mutex<Option<SystemTime>>,
    last_error: Mutex<Option<String>>,
}

/// A copy of a folder's health at one moment.
#[derive(Debug, Clone)]
pub struct FolderStatus {
    pub account: String,
    pub folder: String,
    pub interval: Duration,
    pub connected: bool,
    pub reconnects: u64,
    pub fetched: u64,
    pub last_sync: Option<SystemTime>,
    pub last_error: Option<String>,
}

impl FolderHealth {
    pub fn new(account: &str, folder: &str, interval: Duration) -> FolderHealth {
        FolderHealth {
            account: account.to_string(),
            folder: folder.to_string(),
            interval,
            connected: AtomicBool::new(false),
            reconnects: AtomicU64::new(0),
            fetched: AtomicU64::new(0),
            last_sync: Mutex::new(None),
            last_error: Mutex::new(None),
        }
    }

    /// The connection is up (logged in, folder selected) or down.
    pub fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
    }

    /// A sync finished: everything the server had was spooled. Clears the last error.
    pub fn synced(&self) {
        *self.last_sync.lock().unwrap_or_else(|e| e.into_inner()) = Some(SystemTime::now());
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The connection failed with `error` (already free of secrets).
    pub fn failed(&self, error: &str) {
        self.set_connected(false);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.to_string());
    }

    /// A new connection is being made after a failure.
    pub fn reconnecting(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// `n` messages were fetched and spooled.
    pub fn fetched(&self, n: u64) {
        self.fetched.fetch_add(n, Ordering::Relaxed);
    }

    pub fn status(&self) -> FolderStatus {
        FolderStatus {
            account: self.account.clone(),
            folder: self.folder.clone(),
            interval: self.interval,
            connected: self.connected.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            fetched: self.fetched.load(Ordering::Relaxed),
            last_sync: *self.last_sync.lock().unwrap_or_else(|e| e.into_inner()),
            last_error: self.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }
}

/// Everything `serve` counts, shared by all its parts.
#[derive(Debug, Default)]
pub struct Metrics {
    folders: Mutex<Vec<Arc<FolderHealth>>>,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    /// Registers a watched folder; its watcher keeps the returned handle.
    pub fn folder(&self, account: &str, folder: &str, interval: Duration) -> Arc<FolderHealth> {
        let health = Arc::new(FolderHealth::new(account, folder, interval));
        self.folders.lock().unwrap_or_else(|e| e.into_inner()).push(health.clone());
        health
    }

    /// The health of every watched folder, in registration order.
    pub fn folders(&self) -> Vec<FolderStatus> {
        self.folders.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|f| f.status()).collect()
    }
}

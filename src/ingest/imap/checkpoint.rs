//! What a watched folder has already handed to the spool, kept under `<spool>/imap/`.
//!
//! Per folder, two files in `<spool>/imap/<account>/`:
//! - `<folder>.json`: `{"uidvalidity": V, "last_uid": U}`. Written (temp file, fsync, rename,
//!   directory fsync) only after every message up to `U` is durable in the spool, so a restart
//!   never fetches a message twice and never skips one.
//! - `<folder>.seen`: one line per spooled message, the SHA-256 of its raw bytes (which include
//!   its Message-ID), added the moment the message is durable in the spool. Consulted when the
//!   server changes UIDVALIDITY (the folder is then read again from the start) and at the first
//!   sync after a start (a message spooled just before a crash, past the checkpoint): a message
//!   already in this list is not sent again. The list keeps the newest [`SEEN_LIMIT`] entries.
//!
//! Folder names are percent-encoded into file names (`INBOX/Sub` → `INBOX%2FSub`).

use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// Fingerprints kept per folder; older ones are dropped when the list is compacted.
pub const SEEN_LIMIT: usize = 100_000;

/// Where a folder's sync stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub uidvalidity: u32,
    pub last_uid: u32,
}

/// The checkpoint files of one folder.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    dir: PathBuf,
    json: PathBuf,
    seen: PathBuf,
    fsync: bool,
}

/// A message's fingerprint: SHA-256 of its raw bytes, in hex.
pub fn fingerprint(raw: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, raw);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn encode(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') && !(out.is_empty() && b == b'.') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Checkpoint {
    pub fn new(spool_dir: &Path, account: &str, folder: &str, fsync: bool) -> Checkpoint {
        let dir = spool_dir.join("imap").join(encode(account));
        let base = encode(folder);
        Checkpoint { json: dir.join(format!("{base}.json")), seen: dir.join(format!("{base}.seen")), dir, fsync }
    }

    /// The stored position, `None` before the first sync. An unreadable file is an error (not
    /// a fresh start, which could send the whole folder again).
    pub fn load(&self) -> io::Result<Option<Position>> {
        match fs::read(&self.json) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", self.json.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", self.json.display()))),
        }
    }

    /// Stores `position` durably (atomic replace).
    pub fn store(&self, position: Position) -> io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        let tmp = self.json.with_extension("json.tmp");
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&serde_json::to_vec(&position).expect("position serialises"))?;
            if self.fsync {
                f.sync_data()?;
            }
        }
        fs::rename(&tmp, &self.json)?;
        self.sync_dir()
    }

    /// Adds fingerprints of messages now durable in the spool, flushed.
    pub fn remember(&self, fingerprints: &[String]) -> io::Result<()> {
        for fp in fingerprints {
            self.remember_now(fp)?;
        }
        self.settle()
    }

    /// Adds the fingerprint of one message the moment it is durable in the spool, without
    /// flushing: if the process dies before the folder's checkpoint moves past it, the next
    /// start still finds it (the kernel has it) and does not spool the message a second time.
    /// Safe to call from several tasks at once (each line is one append). [`Checkpoint::settle`]
    /// flushes the list.
    pub fn remember_now(&self, fingerprint: &str) -> io::Result<()> {
        let open = || OpenOptions::new().create(true).append(true).open(&self.seen);
        let mut f = match open() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Only the first message of a folder finds no directory yet.
                fs::create_dir_all(&self.dir)?;
                open()?
            }
            other => other?,
        };
        f.write_all(format!("{fingerprint}\n").as_bytes())
    }

    /// Flushes the fingerprints added so far, and keeps only the newest [`SEEN_LIMIT`] once the
    /// list has grown half as long again. Not to be called while [`Checkpoint::remember_now`]
    /// may run.
    pub fn settle(&self) -> io::Result<()> {
        let f = match OpenOptions::new().append(true).open(&self.seen) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if self.fsync {
            f.sync_data()?;
        }
        if f.metadata()?.len() > (SEEN_LIMIT as u64 * 65) * 3 / 2 {
            self.compact()?;
        }
        Ok(())
    }

    /// Every remembered fingerprint.
    pub fn seen(&self) -> io::Result<HashSet<String>> {
        match File::open(&self.seen) {
            Ok(f) => BufReader::new(f).lines().filter(|l| l.as_ref().map_or(true, |l| !l.is_empty())).collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(HashSet::new()),
            Err(e) => Err(e),
        }
    }

    /// Rewrites the fingerprint list with only its newest [`SEEN_LIMIT`] entries.
    fn compact(&self) -> io::Result<()> {
        let lines: Vec<String> = BufReader::new(File::open(&self.seen)?).lines().collect::<Result<_, _>>()?;
        let keep = &lines[lines.len().saturating_sub(SEEN_LIMIT)..];
        let tmp = self.seen.with_extension("seen.tmp");
        {
            let mut f = File::create(&tmp)?;
            f.write_all((keep.join("\n") + "\n").as_bytes())?;
            if self.fsync {
                f.sync_data()?;
            }
        }
        fs::rename(&tmp, &self.seen)?;
        self.sync_dir()
    }

    fn sync_dir(&self) -> io::Result<()> {
        if self.fsync {
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_names_become_safe_file_names() {
        assert_eq!(encode("INBOX"), "INBOX");
        assert_eq!(encode("INBOX/Sub dir"), "INBOX%2FSub%20dir");
        assert_eq!(encode(".."), "%2E.");
        assert_eq!(encode("Ünï"), "%C3%9Cn%C3%AF");
    }

    #[test]
    fn position_survives_a_reload_and_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoint::new(dir.path(), "alerts", "INBOX", true);
        assert_eq!(cp.load().unwrap(), None);
        cp.store(Position { uidvalidity: 7, last_uid: 42 }).unwrap();
        cp.store(Position { uidvalidity: 7, last_uid: 43 }).unwrap();
        let again = Checkpoint::new(dir.path(), "alerts", "INBOX", true);
        assert_eq!(again.load().unwrap(), Some(Position { uidvalidity: 7, last_uid: 43 }));
        assert!(dir.path().join("imap/alerts/INBOX.json").is_file());
    }

    #[test]
    fn a_damaged_checkpoint_is_an_error_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoint::new(dir.path(), "a", "INBOX", false);
        fs::create_dir_all(dir.path().join("imap/a")).unwrap();
        fs::write(dir.path().join("imap/a/INBOX.json"), b"{\"uidval").unwrap();
        let err = cp.load().unwrap_err();
        assert!(err.to_string().contains("INBOX.json"), "{err}");
    }

    #[test]
    fn a_fingerprint_remembered_now_is_seen_at_once_and_settled_later() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoint::new(dir.path(), "a", "INBOX", true);
        cp.settle().unwrap();
        let fps: Vec<String> = (0..64).map(|i| fingerprint(format!("message {i}").as_bytes())).collect();
        std::thread::scope(|s| {
            for chunk in fps.chunks(8) {
                let cp = cp.clone();
                s.spawn(move || chunk.iter().for_each(|fp| cp.remember_now(fp).unwrap()));
            }
        });
        // What a restart after a crash right now would read.
        let again = Checkpoint::new(dir.path(), "a", "INBOX", true);
        assert_eq!(again.seen().unwrap(), fps.iter().cloned().collect::<HashSet<_>>());
        cp.settle().unwrap();
        assert_eq!(cp.seen().unwrap().len(), 64);
    }

    #[test]
    fn fingerprints_are_remembered_and_compacted_to_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoint::new(dir.path(), "a", "INBOX", false);
        let a = fingerprint(b"Message-ID: <a@x>\r\n\r\nbody");
        let b = fingerprint(b"Message-ID: <b@x>\r\n\r\nbody");
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        cp.remember(std::slice::from_ref(&a)).unwrap();
        cp.remember(std::slice::from_ref(&b)).unwrap();
        let seen = cp.seen().unwrap();
        assert!(seen.contains(&a) && seen.contains(&b));

        let many: Vec<String> = (0..SEEN_LIMIT + SEEN_LIMIT / 2 + 1).map(|i| format!("{i:064x}")).collect();
        cp.remember(&many).unwrap();
        let seen = cp.seen().unwrap();
        assert_eq!(seen.len(), SEEN_LIMIT);
        assert!(seen.contains(many.last().unwrap()));
        assert!(!seen.contains(&a), "the oldest entries are dropped");
    }
}

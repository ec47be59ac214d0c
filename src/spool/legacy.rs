//! Spools written before the database: read at recovery, every entry moved into `spool.db`.
//!
//! ```text
//! SPOOL/
//!   incoming/ID.msg   accepted: the raw message followed by its first metadata (see `file.rs`)
//!   incoming/ID.json  newer metadata of a message in line again
//!   msg/ID.msg        the message file of a message whose metadata is in another state
//!   active/ID.json, deferred/ID.json, dead/ID.json   metadata in that state
//!   msg/ID.eml        the oldest format: a bare raw message beside STATE/ID.json
//! ```
//!
//! A message's state is the directory its `ID.json` is in, or `incoming` when it has none and
//! its `ID.msg` is there (a move out of `incoming/` cut short leaves both an `ID.json` elsewhere
//! and the `incoming/ID.msg`: the `ID.json` says where it is). Entries are inserted in batches
//! (one transaction each), and their files removed only once the batch is committed: after a
//! crash in between, the next recovery finds the ids already in the database and only removes
//! the files. Unreadable entries go to `corrupt/`; empty old directories are removed at the end.

use super::db::{Op, Raw};
use super::{Meta, Recovery, Spool, SpoolError, State, TMP_GRACE, file, is_id, older_than};
use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Entries inserted per transaction.
const BATCH: usize = 256;

/// An entry ready to go into the database, and the files to remove once it is there.
struct Entry {
    op: Op,
    files: Vec<PathBuf>,
}

/// Moves every entry of the old formats under the spool directory into the database.
pub(super) fn drain(spool: &Spool, now: SystemTime, report: &mut Recovery) -> Result<(), SpoolError> {
    let dir = spool.dir().to_path_buf();
    let msg = dir.join("msg");
    let incoming = dir.join(State::Incoming.dir_name());
    if !msg.is_dir() && !State::ALL.iter().any(|s| dir.join(s.dir_name()).is_dir()) {
        return Ok(());
    }
    let names = |d: &Path| -> Result<Vec<String>, SpoolError> {
        match fs::read_dir(d) {
            Ok(rd) => Ok(rd.flatten().filter_map(|e| e.file_name().into_string().ok()).collect()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(SpoolError::io(d, e)),
        }
    };

    let mut states: BTreeMap<String, State> = BTreeMap::new();
    for state in State::ALL {
        for name in names(&dir.join(state.dir_name()))? {
            if let Some(id) = name.strip_suffix(".json").filter(|id| is_id(id)) {
                states.entry(id.to_string()).or_insert(state);
            }
        }
    }
    for name in names(&incoming)? {
        if let Some(id) = name.strip_suffix(".msg").filter(|id| is_id(id)) {
            states.entry(id.to_string()).or_insert(State::Incoming);
        }
    }

    let mut batch = Vec::new();
    for (id, state) in states {
        let json = dir.join(state.dir_name()).join(format!("{id}.json"));
        // The raw bytes: a message file (raw bytes first, size in its footer) or a bare one.
        let raws = [
            (msg.join(format!("{id}.msg")), true),
            (incoming.join(format!("{id}.msg")), true),
            (msg.join(format!("{id}.eml")), false),
        ];
        let present: Vec<&(PathBuf, bool)> = raws.iter().filter(|(p, _)| p.is_file()).collect();
        let head = if json.exists() { json.clone() } else { incoming.join(format!("{id}.msg")) };
        let label = format!("{}/{}", state.dir_name(), head.file_name().unwrap_or_default().to_string_lossy());
        let meta: Result<Meta, SpoolError> = if json.exists() {
            fs::read(&json).map_err(|e| SpoolError::io(&json, e)).and_then(|b| {
                serde_json::from_slice(&b).map_err(|e| SpoolError::Corrupt { id: id.clone(), reason: e.into() })
            })
        } else {
            file::read(&head, &id, 0).map_err(|e| SpoolError::io(&head, e)).and_then(|r| r.map(|(m, _)| m))
        };
        let size = |(path, message_file): &(PathBuf, bool)| -> Result<u64, SpoolError> {
            if *message_file {
                file::raw_len(path)
                    .map_err(|e| SpoolError::io(path, e))?
                    .map_err(|reason| SpoolError::Corrupt { id: id.clone(), reason })
            } else {
                fs::metadata(path).map(|m| m.len()).map_err(|e| SpoolError::io(path, e))
            }
        };
        let found = match (meta, present.first()) {
            (Ok(meta), Some(raw)) => size(raw).map(|n| (meta, raw.0.clone(), n)),
            (Ok(_), None) => {
                quarantine(&dir, &head)?;
                report.corrupt.push(format!("{label}: its raw message is missing"));
                continue;
            }
            (Err(e), _) => Err(e),
        };
        match found {
            Ok((meta, path, size)) => {
                let mut files: Vec<PathBuf> = present.iter().map(|(p, _)| p.clone()).collect();
                if json.exists() {
                    files.push(json);
                }
                let op = Op::Insert {
                    id: id.clone(),
                    state,
                    meta: Spool::encode(&meta),
                    raw: Raw::File { path, size },
                    if_absent: true,
                };
                batch.push(Entry { op, files });
            }
            Err(SpoolError::Corrupt { reason, .. }) => {
                for p in std::iter::once(&head).chain(present.iter().map(|(p, _)| p)) {
                    if p.exists() {
                        quarantine(&dir, p)?;
                    }
                }
                report.corrupt.push(format!("{label}: {reason}"));
            }
            Err(e) => return Err(e),
        }
        if batch.len() >= BATCH {
            commit(spool, std::mem::take(&mut batch), report)?;
        }
    }
    commit(spool, batch, report)?;

    // What is left in msg/ has no metadata.
    let left = match fs::read_dir(&msg) {
        Ok(rd) => rd.flatten().collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(SpoolError::io(&msg, e)),
    };
    for entry in left {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let (id, bare) = match (name.strip_suffix(".msg"), name.strip_suffix(".eml")) {
            (Some(id), _) => (id, false),
            (None, Some(id)) => (id, true),
            (None, None) => continue,
        };
        if !bare || spool.find(id).is_some() {
            // A message file gets to msg/ only after its metadata is in place, and its metadata
            // goes first when it is removed: this is a removal cut short (or a drain cut short
            // after its commit).
            fs::remove_file(&path).map_err(|e| SpoolError::io(&path, e))?;
            report.removals_finished += 1;
        } else if older_than(&entry, now, TMP_GRACE) {
            // A young bare raw message may be an older `ingest` between its two renames.
            quarantine(&dir, &path)?;
            report.corrupt.push(format!("msg/{name}: no metadata"));
        }
    }
    for sub in ["incoming", "active", "deferred", "dead", "msg"] {
        let _ = fs::remove_dir(dir.join(sub)); // only when empty
    }
    Ok(())
}

/// Inserts a batch in one transaction, then removes the files of the entries now in the database.
fn commit(spool: &Spool, batch: Vec<Entry>, report: &mut Recovery) -> Result<(), SpoolError> {
    let (ops, files): (Vec<Op>, Vec<Vec<PathBuf>>) = batch.into_iter().map(|e| (e.op, e.files)).unzip();
    for (r, files) in spool.db()?.submit_all_blocking(ops).into_iter().zip(files) {
        r?;
        for f in files {
            match fs::remove_file(&f) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(SpoolError::io(&f, e)),
            }
        }
        report.drained += 1;
    }
    Ok(())
}

/// Moves `path` into `corrupt/`, durably.
fn quarantine(dir: &Path, path: &Path) -> Result<(), SpoolError> {
    let corrupt = dir.join("corrupt");
    let dest = corrupt.join(path.file_name().unwrap_or_default());
    fs::rename(path, &dest).map_err(|e| SpoolError::io(path, e))?;
    fs::File::open(&corrupt).and_then(|d| d.sync_all()).map_err(|e| SpoolError::io(&corrupt, e))
}

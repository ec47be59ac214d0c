//! The spool's single writer thread: group commit of every mutation (invariant 4).

use super::SpoolError;
use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use tokio::sync::oneshot;

/// Most requests applied in one batch.
const MAX_BATCH: usize = 512;

/// One mutation of the spool.
pub(super) enum Op {
    /// A new message: `draft` → `dest` (`incoming/ID.msg`). The file is already written by the
    /// producer and still open (`file`), so that flushing it needs no second open; the writer
    /// takes it to flush it.
    Commit { file: Option<File>, draft: PathBuf, dest: PathBuf },
    /// Rename a metadata file to another state, after writing new content in place if given.
    /// `body` is the message file in `incoming/` of a message leaving from there: when `from`
    /// does not exist its metadata is only in that file, and `write` becomes `to` directly.
    Move { write: Option<(PathBuf, Vec<u8>)>, from: PathBuf, to: PathBuf, body: Option<Body> },
    /// Delete a message: its metadata `meta` (or, when there is none, its message file `body`
    /// in `incoming/`), then the first of `raw` that exists.
    Remove { meta: PathBuf, body: Option<PathBuf>, raw: [PathBuf; 3] },
}

/// The message file of a message moving out of `incoming/`.
pub(super) struct Body {
    pub(super) at: PathBuf,
    /// Where it goes once the metadata is in its new state (`msg/`); `None`: it stays.
    pub(super) carry_to: Option<PathBuf>,
}

struct Job {
    op: Op,
    reply: oneshot::Sender<Result<(), SpoolError>>,
}

/// The writer threads: one for new messages and state changes, one for removals.
///
/// Removing a file can take far longer than creating one (the file system frees its blocks,
/// and with online discard tells the device so, before `unlink(2)` returns: about 100 µs on an
/// ext4 mounted with `discard`, where a flush takes 160 µs). On their own thread, removals of
/// delivered messages never hold up the commits that senders wait for. The two threads never
/// work on the same message at once: each caller waits for one operation on a message before it
/// asks for the next.
pub(super) struct Committer {
    tx: mpsc::Sender<Job>,
    removals: mpsc::Sender<Job>,
}

impl Committer {
    pub(super) fn start(fsync: bool) -> io::Result<Committer> {
        let flushers = if fsync { Some(std::sync::Arc::new(Flushers::start()?)) } else { None };
        let spawn = |name: &str| -> io::Result<mpsc::Sender<Job>> {
            let (tx, rx) = mpsc::channel::<Job>();
            let flushers = flushers.clone();
            std::thread::Builder::new().name(name.into()).spawn(move || run(rx, flushers.as_deref()))?;
            Ok(tx)
        };
        Ok(Committer { tx: spawn("spool-writer")?, removals: spawn("spool-remover")? })
    }

    fn send(&self, op: Op) -> Result<oneshot::Receiver<Result<(), SpoolError>>, SpoolError> {
        let (reply, rx) = oneshot::channel();
        let tx = if matches!(op, Op::Remove { .. }) { &self.removals } else { &self.tx };
        tx.send(Job { op, reply }).map_err(|_| SpoolError::Stopped)?;
        Ok(rx)
    }

    pub(super) async fn submit(&self, op: Op) -> Result<(), SpoolError> {
        self.send(op)?.await.map_err(|_| SpoolError::Stopped)?
    }

    pub(super) fn submit_blocking(&self, op: Op) -> Result<(), SpoolError> {
        self.send(op)?.blocking_recv().map_err(|_| SpoolError::Stopped)?
    }
}

fn run(rx: mpsc::Receiver<Job>, flushers: Option<&Flushers>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        apply(batch, flushers);
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> io::Result<File> {
    let mut f = super::private_file(path)?;
    f.write_all(bytes)?;
    Ok(f)
}

/// Flushing threads, kept for the life of the spool: flushes issued together are committed
/// together by the file system, and a pool spares a thread start per batch.
const FLUSH_THREADS: usize = 16;

/// A file to flush: its batch index, path (for errors) and handle.
type Flush = (usize, PathBuf, File);

/// A share of a batch's flushes, and where to report failures (`None` once a share is done).
struct FlushWork {
    files: Vec<Flush>,
    /// `fsync` (directories) rather than `fdatasync`.
    all: bool,
    done: mpsc::Sender<Option<(usize, SpoolError)>>,
}

fn flush(file: &File, all: bool) -> io::Result<()> {
    if all { file.sync_all() } else { file.sync_data() }
}

struct Flushers {
    tx: mpsc::Sender<FlushWork>,
}

impl Flushers {
    fn start() -> io::Result<Flushers> {
        let (tx, rx) = mpsc::channel::<FlushWork>();
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        for n in 0..FLUSH_THREADS {
            let rx = rx.clone();
            std::thread::Builder::new().name(format!("spool-flush-{n}")).spawn(move || {
                loop {
                    let work = match rx.lock() {
                        Ok(rx) => match rx.recv() {
                            Ok(work) => work,
                            Err(_) => return,
                        },
                        Err(_) => return,
                    };
                    for (i, path, file) in work.files {
                        if let Err(e) = flush(&file, work.all) {
                            let _ = work.done.send(Some((i, SpoolError::io(&path, e))));
                        }
                    }
                    let _ = work.done.send(None);
                }
            })?;
        }
        Ok(Flushers { tx })
    }

    /// `fdatasync`s the files, several at a time; returns the index and error of each failure.
    fn sync(&self, files: Vec<Flush>) -> Vec<(usize, SpoolError)> {
        self.flush(files, false)
    }

    /// [`sync`](Self::sync) with `fsync`, for directories.
    fn sync_all(&self, files: Vec<Flush>) -> Vec<(usize, SpoolError)> {
        self.flush(files, true)
    }

    fn flush(&self, files: Vec<Flush>, all: bool) -> Vec<(usize, SpoolError)> {
        let sync_here = |files: Vec<Flush>| {
            files
                .into_iter()
                .filter_map(|(i, path, f)| flush(&f, all).err().map(|e| (i, SpoolError::io(&path, e))))
                .collect()
        };
        if files.len() <= 1 {
            return sync_here(files);
        }
        let chunk = files.len().div_ceil(FLUSH_THREADS);
        let (done, results) = mpsc::channel();
        let mut shares = 0;
        let mut rest = files;
        while !rest.is_empty() {
            let tail = rest.split_off(chunk.min(rest.len()));
            let work = FlushWork { files: std::mem::replace(&mut rest, tail), all, done: done.clone() };
            if let Err(mpsc::SendError(work)) = self.tx.send(work) {
                // No flushing thread left: do it here.
                let mut failed: Vec<(usize, SpoolError)> = sync_here(work.files);
                failed.extend(sync_here(std::mem::take(&mut rest)));
                return failed;
            }
            shares += 1;
        }
        drop(done);
        let mut failed = Vec::new();
        while shares > 0 {
            match results.recv() {
                Ok(Some(f)) => failed.push(f),
                Ok(None) => shares -= 1,
                Err(_) => break,
            }
        }
        failed
    }
}

pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent(p: &Path) -> PathBuf {
    p.parent().map(Path::to_path_buf).unwrap_or_default()
}

fn apply(batch: Vec<Job>, flushers: Option<&Flushers>) {
    let fsync = flushers.is_some();
    let mut results: Vec<Result<(), SpoolError>> = Vec::with_capacity(batch.len());
    let mut to_flush: Vec<Flush> = Vec::new();

    // Phase 1: file contents.
    let mut batch = batch;
    for (i, job) in batch.iter_mut().enumerate() {
        let r = match &mut job.op {
            Op::Commit { file, draft, .. } => {
                if let Some(file) = file.take().filter(|_| fsync) {
                    to_flush.push((i, draft.clone(), file));
                }
                Ok(())
            }
            Op::Move { write: Some((tmp, meta)), .. } => write_file(tmp, meta)
                .map(|written| {
                    if fsync {
                        to_flush.push((i, tmp.clone(), written));
                    }
                })
                .map_err(|e| SpoolError::io(&*tmp, e)),
            Op::Move { write: None, .. } | Op::Remove { .. } => Ok(()),
        };
        results.push(r);
    }

    // Flush every file of the batch (drafts written by their producers included), all at
    // once: concurrent flushes are committed together by the file system's journal.
    if let Some(flushers) = flushers {
        for (i, e) in flushers.sync(to_flush) {
            if results[i].is_ok() {
                results[i] = Err(e);
            }
        }
    }
    // Phase 2: names. Metadata never appears before its message file (invariant 2).
    let mut dirs = BTreeSet::new();
    for (job, r) in batch.iter().zip(results.iter_mut()) {
        if r.is_err() {
            cleanup_tmp(&job.op);
            continue;
        }
        *r = match &job.op {
            Op::Commit { draft, dest, .. } => match fs::rename(draft, dest) {
                Ok(()) => {
                    dirs.insert(parent(dest));
                    Ok(())
                }
                Err(e) => {
                    let _ = fs::remove_file(draft);
                    Err(SpoolError::io(dest, e))
                }
            },
            Op::Move { write, from, to, body } => move_meta(write.as_ref(), from, to, body.as_ref(), &mut dirs),
            Op::Remove { meta, body, raw } => remove(meta, body.as_deref(), raw, &mut dirs),
        };
    }

    if let Some(flushers) = flushers {
        // The directories of the batch, flushed together too.
        let mut opened = Vec::new();
        let mut failed = None;
        for dir in &dirs {
            match File::open(dir) {
                Ok(f) => opened.push((0, dir.clone(), f)),
                Err(e) => failed = Some(SpoolError::io(dir, e)),
            }
        }
        let failed = failed.or_else(|| flushers.sync_all(opened).into_iter().next().map(|(_, e)| e));
        if let Some(SpoolError::Io { path, source }) = failed {
            for r in results.iter_mut() {
                if r.is_ok() {
                    *r = Err(SpoolError::io(&path, io::Error::new(source.kind(), source.to_string())));
                }
            }
        }
    }
    finish(batch, results);
}

/// Phase 2 of [`Op::Move`].
fn move_meta(
    write: Option<&(PathBuf, Vec<u8>)>,
    from: &Path,
    to: &Path,
    body: Option<&Body>,
    dirs: &mut BTreeSet<PathBuf>,
) -> Result<(), SpoolError> {
    let not_found = || SpoolError::NotFound(file_id(from));
    let rename = |a: &Path, b: &Path| {
        fs::rename(a, b).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => not_found(),
            _ => SpoolError::io(b, e),
        })
    };
    if from.exists() {
        if let Some((tmp, _)) = write {
            rename(tmp, from)?;
        }
        rename(from, to)?;
        dirs.insert(parent(from));
    } else {
        // Its only metadata is inside its message file in incoming/.
        let tmp = match (body, write) {
            (Some(body), Some((tmp, _))) if body.at.exists() => tmp,
            _ => {
                if let Some((tmp, _)) = write {
                    let _ = fs::remove_file(tmp);
                }
                return Err(not_found());
            }
        };
        rename(tmp, to)?;
    }
    dirs.insert(parent(to));
    if let Some(Body { at, carry_to: Some(dest) }) = body {
        match fs::rename(at, dest) {
            Ok(()) => {
                dirs.insert(parent(at));
                dirs.insert(parent(dest));
            }
            // Not there: it was in msg/ already (a message set back in line), or a bare raw one.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(SpoolError::io(dest, e)),
        }
    }
    Ok(())
}

/// Phase 2 of [`Op::Remove`].
fn remove(meta: &Path, body: Option<&Path>, raw: &[PathBuf], dirs: &mut BTreeSet<PathBuf>) -> Result<(), SpoolError> {
    let unlink = |p: &Path, dirs: &mut BTreeSet<PathBuf>| match fs::remove_file(p) {
        Ok(()) => {
            dirs.insert(parent(p));
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(SpoolError::io(p, e)),
    };
    if unlink(meta, dirs)? {
        for p in raw {
            if unlink(p, dirs)? {
                break;
            }
        }
        return Ok(());
    }
    match body {
        Some(body) if unlink(body, dirs)? => Ok(()),
        _ => Err(SpoolError::NotFound(file_id(meta))),
    }
}

fn cleanup_tmp(op: &Op) {
    match op {
        Op::Commit { draft, .. } => {
            let _ = fs::remove_file(draft);
        }
        Op::Move { write: Some((tmp, _)), .. } => {
            let _ = fs::remove_file(tmp);
        }
        _ => {}
    }
}

fn file_id(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

fn finish(batch: Vec<Job>, results: Vec<Result<(), SpoolError>>) {
    for (job, r) in batch.into_iter().zip(results) {
        let _ = job.reply.send(r);
    }
}

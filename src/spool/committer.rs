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
    /// A new message: `draft` → `raw`, `meta_tmp` → `meta_dest`. Both files are already
    /// written by the producer and still open (`files`: the draft's and the metadata's), so
    /// that flushing them needs no second open; the writer takes them to flush them.
    Commit { files: Option<(File, File)>, draft: PathBuf, raw: PathBuf, meta_tmp: PathBuf, meta_dest: PathBuf },
    /// Rename a metadata file to another state, after writing new content in place if given.
    Move { write: Option<(PathBuf, Vec<u8>)>, from: PathBuf, to: PathBuf },
    /// Delete a message.
    Remove { meta: PathBuf, raw: PathBuf },
}

struct Job {
    op: Op,
    reply: oneshot::Sender<Result<(), SpoolError>>,
}

pub(super) struct Committer {
    tx: mpsc::Sender<Job>,
}

impl Committer {
    pub(super) fn start(fsync: bool) -> io::Result<Committer> {
        let (tx, rx) = mpsc::channel::<Job>();
        let flushers = if fsync { Some(Flushers::start()?) } else { None };
        std::thread::Builder::new().name("spool-writer".into()).spawn(move || run(rx, flushers))?;
        Ok(Committer { tx })
    }

    fn send(&self, op: Op) -> Result<oneshot::Receiver<Result<(), SpoolError>>, SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Job { op, reply }).map_err(|_| SpoolError::Stopped)?;
        Ok(rx)
    }

    pub(super) async fn submit(&self, op: Op) -> Result<(), SpoolError> {
        self.send(op)?.await.map_err(|_| SpoolError::Stopped)?
    }

    pub(super) fn submit_blocking(&self, op: Op) -> Result<(), SpoolError> {
        self.send(op)?.blocking_recv().map_err(|_| SpoolError::Stopped)?
    }
}

fn run(rx: mpsc::Receiver<Job>, flushers: Option<Flushers>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        apply(batch, flushers.as_ref());
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> io::Result<File> {
    let mut f = File::create(path)?;
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
            Op::Commit { files, draft, meta_tmp, .. } => {
                if let Some((draft_file, meta_file)) = files.take().filter(|_| fsync) {
                    to_flush.push((i, draft.clone(), draft_file));
                    to_flush.push((i, meta_tmp.clone(), meta_file));
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
    // Phase 2: names. Each op's renames are ordered so that a crash never leaves metadata
    // without its raw message (invariant 2).
    let mut dirs = BTreeSet::new();
    for (job, r) in batch.iter().zip(results.iter_mut()) {
        if r.is_err() {
            cleanup_tmp(&job.op);
            continue;
        }
        *r = match &job.op {
            Op::Commit { draft, raw, meta_tmp, meta_dest, .. } => match fs::rename(draft, raw) {
                Err(e) => {
                    let _ = fs::remove_file(meta_tmp);
                    Err(SpoolError::io(draft, e))
                }
                Ok(()) => match fs::rename(meta_tmp, meta_dest) {
                    Ok(()) => {
                        dirs.insert(parent(raw));
                        dirs.insert(parent(meta_dest));
                        Ok(())
                    }
                    Err(e) => {
                        // Not acknowledged: take the message back out rather than leave an orphan.
                        let _ = fs::remove_file(meta_tmp);
                        let _ = fs::remove_file(raw);
                        Err(SpoolError::io(meta_dest, e))
                    }
                },
            },
            Op::Move { write, from, to } => {
                let written = match write {
                    Some((tmp, _)) if from.exists() => fs::rename(tmp, from).map_err(|e| SpoolError::io(from, e)),
                    Some((tmp, _)) => {
                        let _ = fs::remove_file(tmp);
                        Err(SpoolError::NotFound(file_id(from)))
                    }
                    None => Ok(()),
                };
                written
                    .and_then(|()| {
                        fs::rename(from, to).map_err(|e| match e.kind() {
                            io::ErrorKind::NotFound => SpoolError::NotFound(file_id(from)),
                            _ => SpoolError::io(to, e),
                        })
                    })
                    .map(|()| {
                        dirs.insert(parent(from));
                        dirs.insert(parent(to));
                    })
            }
            Op::Remove { meta, raw } => match fs::remove_file(meta) {
                Ok(()) => {
                    dirs.insert(parent(meta));
                    match fs::remove_file(raw) {
                        Ok(()) => {
                            dirs.insert(parent(raw));
                            Ok(())
                        }
                        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                        Err(e) => Err(SpoolError::io(raw, e)),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => Err(SpoolError::NotFound(file_id(meta))),
                Err(e) => Err(SpoolError::io(meta, e)),
            },
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

fn cleanup_tmp(op: &Op) {
    match op {
        Op::Commit { meta_tmp, .. } => {
            let _ = fs::remove_file(meta_tmp);
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

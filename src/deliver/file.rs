//! The `file` destination: one JSON object per line, appended and flushed to disk before the
//! attempt counts as done. Needs nothing outside the machine. A file it creates is `0600` and a
//! directory `0700`, like the spool: the events hold the mail.
//!
//! One writer thread per file takes every line waiting, appends them all, flushes once and
//! then answers them all (group commit), so a burst of deliveries costs one flush, not one
//! per line.

use super::Attempt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use tokio::sync::oneshot;

/// What a write of one batch of lines gave: every line of the batch shares it.
type Written = Result<(), std::sync::Arc<std::io::Error>>;
type Job = (Vec<u8>, oneshot::Sender<Written>);

/// The output file (or its directory) could not be opened, or its writer not started.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct OpenError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

pub struct FileDestination {
    path: PathBuf,
    tx: mpsc::Sender<Job>,
}

impl FileDestination {
    pub fn open(path: &Path) -> Result<FileDestination, OpenError> {
        let at = |path: &Path| {
            let path = path.to_path_buf();
            move |source| OpenError { path, source }
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(at(dir))?;
        }
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new().mode(0o600).create(true).read(true).append(true).open(path).map_err(at(path))?;
        drop_partial_line(&file).map_err(at(path))?;
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("file-destination".into())
            .spawn(move || write_lines(file, rx))
            .map_err(at(path))?;
        Ok(FileDestination { path: path.to_path_buf(), tx })
    }

    pub async fn send(&self, body: &[u8]) -> Attempt {
        let mut line = Vec::with_capacity(body.len() + 1);
        line.extend_from_slice(body);
        line.push(b'\n');
        let (reply, rx) = oneshot::channel();
        if self.tx.send((line, reply)).is_err() {
            return Attempt::Retry { after: None, reason: format!("{}: writer stopped", self.path.display()) };
        }
        match rx.await {
            Ok(Ok(())) => Attempt::Done,
            Ok(Err(e)) => Attempt::Retry { after: None, reason: format!("{}: {e}", self.path.display()) },
            Err(_) => Attempt::Retry { after: None, reason: format!("{}: writer stopped", self.path.display()) },
        }
    }
}

/// Cuts a line left unfinished by a crash or a failed write (it was never reported as
/// delivered, so it will be written again whole), so that the next line does not run into it.
fn drop_partial_line(file: &File) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let len = file.metadata()?.len();
    let mut end = len;
    let mut buf = [0u8; 4096];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        file.read_exact_at(chunk, start)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            end = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    if end != len {
        file.set_len(end)?;
        file.sync_data()?;
    }
    Ok(())
}

fn write_lines(mut file: File, rx: mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(job) = rx.try_recv() {
            batch.push(job);
            if batch.len() >= 1024 {
                break;
            }
        }
        let mut result: Written = Ok(());
        for (line, _) in &batch {
            if let Err(e) = file.write_all(line) {
                result = Err(std::sync::Arc::new(e));
                // Take back what part of the batch was written: it is sent again later.
                let _ = drop_partial_line(&file);
                break;
            }
        }
        if result.is_ok()
            && let Err(e) = file.sync_data()
        {
            result = Err(std::sync::Arc::new(e));
        }
        for (_, reply) in batch {
            let _ = reply.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_left_unfinished_by_a_crash_is_cut_before_new_lines_are_appended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let long = "x".repeat(10_000);
        std::fs::write(&path, format!("{{\"a\":1}}\n{{\"b\":\"{long}")).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dest = FileDestination::open(&path).unwrap();
        assert!(matches!(rt.block_on(dest.send(b"{\"c\":3}")), Attempt::Done));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"a\":1}\n{\"c\":3}\n");

        // No newline at all: the whole file was one unfinished line.
        std::fs::write(&path, "{\"unfinished").unwrap();
        drop(dest);
        let dest = FileDestination::open(&path).unwrap();
        assert!(matches!(rt.block_on(dest.send(b"{}")), Attempt::Done));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{}\n");
    }

    #[test]
    fn an_output_file_that_cannot_be_opened_names_its_path_and_keeps_the_cause() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("not-a-dir");
        std::fs::write(&blocker, "").unwrap();
        let e = FileDestination::open(&blocker.join("out.jsonl")).err().expect("parent is a file");
        assert_eq!(e.path, blocker);
        assert_eq!(e.source.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
        assert!(e.to_string().starts_with(&format!("{}: ", blocker.display())), "{e}");
    }
}

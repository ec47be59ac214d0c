//! The `file` destination: one JSON object per line, appended and flushed to disk before the
//! attempt counts as done. Needs nothing outside the machine.

use super::Attempt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub struct FileDestination {
    path: PathBuf,
    file: Arc<Mutex<File>>,
}

impl FileDestination {
    pub fn open(path: &Path) -> Result<FileDestination, String> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let file =
            OpenOptions::new().create(true).append(true).open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(FileDestination { path: path.to_path_buf(), file: Arc::new(Mutex::new(file)) })
    }

    pub async fn send(&self, body: &[u8]) -> Attempt {
        let mut line = Vec::with_capacity(body.len() + 1);
        line.extend_from_slice(body);
        line.push(b'\n');
        let file = self.file.clone();
        let result = tokio::task::spawn_blocking(move || {
            let mut f = file.lock().expect("file destination lock");
            f.write_all(&line)?;
            f.sync_data()
        })
        .await;
        match result {
            Ok(Ok(())) => Attempt::Done,
            Ok(Err(e)) => Attempt::Retry { after: None, reason: format!("{}: {e}", self.path.display()) },
            Err(e) => Attempt::Retry { after: None, reason: format!("{}: {e}", self.path.display()) },
        }
    }
}

//! A tmpfs mounted at a directory for the life of the value (lazily unmounted on drop), to turn
//! a spool's file system read-only and back under a running `mailhook`. Needs the right to
//! mount (root); [`Tmpfs::mount`] says why when it cannot.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`mount`'s syntax: `8m`, `512m`) at `at`, created if need be.
    pub fn mount(at: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(at).map_err(|e| format!("{}: {e}", at.display()))?;
        run_mount(&["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "tmpfs"], at)?;
        Ok(Tmpfs(at.to_path_buf()))
    }

    /// Remounts read-only or read-write. The kernel refuses (EBUSY) while a file on it is open
    /// for writing (a message being received): try again until a moment when none is, for up
    /// to 20 s. Returns the tries it took and when the one that worked started: the file system
    /// changed somewhere between that and the return (while `mount` ran and exited), and a
    /// process using it may see the change from then on.
    pub fn remount(&self, read_only: bool) -> Result<(usize, Instant), String> {
        let opts = if read_only { "remount,ro" } else { "remount,rw" };
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut tries = 0;
        loop {
            tries += 1;
            let started = Instant::now();
            match run_mount(&["-o", opts], &self.0) {
                Ok(()) => return Ok((tries, started)),
                Err(e) if Instant::now() > deadline => return Err(format!("{opts} failed {tries} times: {e}")),
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn run_mount(args: &[&str], at: &Path) -> Result<(), String> {
    let out = std::process::Command::new("mount").args(args).arg(at).output().map_err(|e| e.to_string())?;
    if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).trim().to_string()) }
}

//! A real `mailhook serve` for the end-to-end benchmarks, and reading its SMTP replies. Include it with
//! `#[path = "common/serve.rs"] mod serve;` beside `common/proc.rs` (as `mod proc`).

use super::proc::listening_port;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Serve {
    pub child: Child,
    /// Where its SMTP listener took a port.
    pub smtp: SocketAddr,
}

impl Serve {
    /// Starts `serve` in `dir` (which holds `mailhook.toml`, listening on `127.0.0.1:0`), from
    /// `MAILHOOK_BENCH_BIN` when set (to compare two builds), else `bin`. It logs warnings as
    /// JSON to `dir/serve.log`. Returns once its SMTP listener is up.
    #[allow(dead_code)]
    pub fn spawn(dir: &Path, bin: &str) -> Serve {
        Serve::spawn_with(dir, bin, &[])
    }

    /// [`spawn`](Self::spawn) with environment variables (`${VAR}`s of the config).
    #[allow(dead_code)]
    pub fn spawn_with(dir: &Path, bin: &str, env: &[(&str, &str)]) -> Serve {
        let log = std::fs::File::create(dir.join("serve.log")).unwrap();
        let child = Command::new(std::env::var("MAILHOOK_BENCH_BIN").unwrap_or_else(|_| bin.to_string()))
            .args(["serve", "--config", "mailhook.toml", "--log-format", "json"])
            .envs(env.iter().copied())
            .current_dir(dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn serve");
        // With RUST_LOG=warn the "listening" line is not logged: find the port from /proc.
        let deadline = Instant::now() + Duration::from_secs(10);
        let smtp = loop {
            if let Some(addr) = listening_port(child.id()) {
                break addr;
            }
            assert!(Instant::now() < deadline, "serve did not listen within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        };
        Serve { child, smtp }
    }

    /// SIGTERM, and waits for it to exit.
    pub fn stop(mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

/// The code of the next SMTP reply (its last line), 0 when the connection closed first.
pub fn reply(reader: &mut BufReader<TcpStream>) -> u16 {
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return 0;
        }
        if line.as_bytes().get(3) != Some(&b'-') {
            return line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
        }
    }
}

/// Writes `dir/mailhook.toml` and one catch-all rule for the end-to-end benches: SMTP on a free
/// loopback port, a `webhook` destination at `sink`, `[delivery] rate = "off"`,
/// `concurrency = 32`, a delivery `timeout`, the archive on or off; `extra` (more sections) is
/// appended.
pub fn write_webhook_config(dir: &Path, sink: SocketAddr, timeout: &str, archive: bool, extra: &str) {
    std::fs::create_dir_all(dir.join("rules")).unwrap();
    std::fs::write(
        dir.join("mailhook.toml"),
        format!(
            "[spool]\ndir = \"spool\"\n[rules]\ndir = \"rules\"\n\
             [smtp]\nlisten = [\"127.0.0.1:0\"]\nmax_size = \"30MB\"\nmax_connections = 200\nmax_connections_per_ip = 200\n\
             [destination.sink]\ntype = \"webhook\"\nurl = \"http://{sink}/hook\"\n\
             [delivery]\nrate = \"off\"\nconcurrency = 32\ntimeout = \"{timeout}\"\n\
             [archive]\nenabled = {archive}\n{extra}"
        ),
    )
    .unwrap();
    std::fs::write(dir.join("rules/10-all.toml"), "[[rule]]\nname = \"all\"\nto = [\"sink\"]\n").unwrap();
}

/// A load message of at least `size` bytes whose subject is `"{tag} {seq}"`, with DATA's final
/// dot.
#[allow(dead_code)]
pub fn load_message(tag: &str, seq: u64, size: usize) -> Vec<u8> {
    let mut m = format!(
        "From: Legacy ERP <erp@example.com>\r\nTo: hook@example.com\r\nSubject: {tag} {seq}\r\n\
         Message-ID: <{tag}-{seq}@example.com>\r\nDate: Tue, 01 Dec 2026 09:30:00 +0100\r\n\r\n"
    );
    while m.len() < size {
        m.push_str("Job NIGHTLY_EXPORT finished with warnings; see the attached log for details.\r\n");
    }
    m.push_str(".\r\n");
    m.into_bytes()
}

//! [`Gateway`]: a `mailhook` installation in a temporary directory — config, rules, spool —
//! driven through the real binary: `ingest` to spool mail, `serve` as a child process that a
//! test can stop with SIGTERM or kill with SIGKILL, `queue` and `replay` to act on the spool.
//! [`Gateway::listening`] finds the address an `[smtp]`/`[lmtp]` listener or the `[admin]`
//! endpoint bound (configure `listen = ["127.0.0.1:0"]` / `listen = "127.0.0.1:0"` and serve
//! picks a free port and logs it); [`Gateway::admin_get`] asks the admin endpoint;
//! [`Gateway::hup`], [`Gateway::term`] and [`Gateway::wait_log`] drive and watch a running serve.

use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_mailhook");

pub struct Gateway {
    pub dir: tempfile::TempDir,
    serve: Option<Child>,
    env: Vec<(String, String)>,
    runs: usize,
    /// `--log-format` of serve: `json` unless [`Gateway::text_logs`] was called.
    log_format: &'static str,
}

impl Gateway {
    /// A gateway whose `mailhook.toml` is `config` (spool `spool/`, rules `rules/` are added
    /// unless the config sets them) and whose `rules/10-test.toml` is `rules`.
    pub fn new(config: &str, rules: &str) -> Gateway {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("rules")).unwrap();
        std::fs::create_dir(dir.path().join("spool")).unwrap();
        let mut text = String::new();
        if !config.contains("[spool]") {
            text.push_str("[spool]\ndir = \"spool\"\n");
        }
        if !config.contains("[rules]") {
            text.push_str("[rules]\ndir = \"rules\"\n");
        }
        text.push_str(config);
        std::fs::write(dir.path().join("mailhook.toml"), text).unwrap();
        std::fs::write(dir.path().join("rules/10-test.toml"), rules).unwrap();
        Gateway { dir, serve: None, env: Vec::new(), runs: 0, log_format: "json" }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config(&self) -> PathBuf {
        self.path().join("mailhook.toml")
    }

    /// Sets an environment variable for every command this gateway runs.
    pub fn env(mut self, key: &str, value: &str) -> Gateway {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Serve writes text logs instead of JSON ([`Gateway::listening`] then cannot find
    /// listeners: give them fixed ports).
    pub fn text_logs(mut self) -> Gateway {
        self.log_format = "text";
        self
    }

    pub fn write_rules(&self, name: &str, rules: &str) {
        std::fs::write(self.path().join("rules").join(name), rules).unwrap();
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args).current_dir(self.path());
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// Runs a mailhook command to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).stdin(Stdio::null()).output().expect("run mailhook")
    }

    /// `mailhook ingest`: returns (exit code, stdout, stderr).
    pub fn ingest_raw(&self, raw: &[u8], to: &[&str]) -> (i32, String, String) {
        let mut args = vec!["ingest", "--config", "mailhook.toml", "--from", "sender@example.com"];
        for t in to {
            args.push("--to");
            args.push(t);
        }
        let mut child = self
            .command(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ingest");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            // ingest may refuse (and exit) before reading everything: a broken pipe is fine.
            let _ = stdin.write_all(raw);
        }
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Ingests `raw`; panics unless it is accepted; returns the spool id.
    pub fn ingest(&self, raw: &[u8]) -> String {
        let (code, id, err) = self.ingest_raw(raw, &["hook@example.com"]);
        assert_eq!(code, 0, "ingest failed: {err}");
        assert_eq!(id.len(), 26, "ingest printed {id:?}");
        id
    }

    /// Starts `mailhook serve` (logs as JSON to `serve-N.log`).
    pub fn start(&mut self) {
        assert!(self.serve.is_none(), "serve already running");
        self.runs += 1;
        let log = std::fs::File::create(self.path().join(format!("serve-{}.log", self.runs))).unwrap();
        let child = self
            .command(&["serve", "--config", "mailhook.toml", "--log-format", self.log_format])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn serve");
        self.serve = Some(child);
    }

    /// The process id of the running serve.
    pub fn serve_pid(&self) -> Option<u32> {
        self.serve.as_ref().map(Child::id)
    }

    /// SIGHUP: serve reloads its rules.
    pub fn hup(&self) {
        self.signal("-HUP");
    }

    /// SIGTERM without waiting (see [`Gateway::wait_exit`]).
    pub fn term(&self) {
        self.signal("-TERM");
    }

    /// Waits (up to `timeout`) for the running serve to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> i32 {
        let mut child = self.serve.take().expect("serve running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("serve did not exit within {timeout:?}; logs:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The JSON log lines of the current serve run.
    pub fn log_lines(&self) -> Vec<Value> {
        let log = self.path().join(format!("serve-{}.log", self.runs));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).collect()
    }

    /// Waits (up to `timeout`) until the current run has logged `count` lines that `pred`
    /// accepts; returns them. Panics with the logs otherwise.
    pub fn wait_log(&self, what: &str, count: usize, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let found: Vec<Value> = self.log_lines().into_iter().filter(|v| pred(v)).collect();
            if found.len() >= count {
                return found;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {count} log line(s): {what}; logs:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `GET path` from the admin endpoint at `addr`, with `Authorization: Bearer <token>` when
    /// given: (status, content type, body).
    pub fn admin_get(&self, addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String, String) {
        http_get(addr, path, token)
    }

    fn signal(&self, sig: &str) {
        let pid = self.serve.as_ref().expect("serve running").id();
        let status = Command::new("kill").args([sig, &pid.to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(&mut self) {
        self.signal("-KILL");
        self.serve.take().unwrap().wait().unwrap();
    }

    /// SIGTERM, then waits for the exit; returns the exit code.
    pub fn stop(&mut self) -> i32 {
        self.signal("-TERM");
        let mut child = self.serve.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "serve did not stop after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (up to 10 s) until the running serve logs that its `protocol` (`"smtp"`, `"lmtp"`)
    /// listener is listening, and returns the address it logged. Only the current run's log is
    /// read, so after a restart the new address is returned. Panics, with the logs, when serve
    /// exits first or nothing is logged in time.
    pub fn listening(&mut self, protocol: &str) -> SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(10);
        let log = self.path().join(format!("serve-{}.log", self.runs));
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let found = text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).find_map(|v| {
                let is_it = v["message"] == "listening" && v["protocol"] == protocol;
                if is_it { v["addr"].as_str().and_then(|a| a.parse::<SocketAddr>().ok()) } else { None }
            });
            if let Some(addr) = found {
                return addr;
            }
            let child = self.serve.as_mut().expect("serve running");
            if let Some(status) = child.try_wait().unwrap() {
                panic!("serve exited ({status}) before its {protocol} listener was up; logs:\n{}", self.logs());
            }
            if Instant::now() > deadline {
                panic!("serve did not log a {protocol} listener within 10 s; logs:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `mailhook queue show --json ID`.
    pub fn show(&self, id: &str) -> Value {
        let out = self.run(&["queue", "show", "--config", "mailhook.toml", "--json", id]);
        assert!(out.status.success(), "queue show {id}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The raw message `id` as the spool holds it, read from its database (`spool/spool.db`,
    /// table `raw`) as `sqlite3` would.
    pub fn raw_message(&self, id: &str) -> Vec<u8> {
        let db = self.path().join("spool").join("spool.db");
        let conn = rusqlite::Connection::open(&db).unwrap_or_else(|e| panic!("{}: {e}", db.display()));
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        conn.query_row("SELECT r.bytes FROM message m JOIN raw r ON r.seq = m.seq WHERE m.id = ?1", [id], |r| r.get(0))
            .unwrap_or_else(|e| panic!("no raw message for {id} in {}: {e}", db.display()))
    }

    /// Every log line of every serve run so far.
    pub fn logs(&self) -> String {
        (1..=self.runs)
            .map(|n| std::fs::read_to_string(self.path().join(format!("serve-{n}.log"))).unwrap_or_default())
            .collect()
    }

    /// `mailhook queue list --json`.
    pub fn queue(&self) -> Vec<Value> {
        let out = self.run(&["queue", "list", "--config", "mailhook.toml", "--json"]);
        assert!(out.status.success(), "queue list: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap().as_array().unwrap().clone()
    }

    /// Waits until the queue holds exactly the messages `pred` accepts (and nothing else).
    pub fn wait_queue(&self, timeout: Duration, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let q = self.queue();
            if pred(&q) {
                return q;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}; queue: {q:#?}\nlogs:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.serve.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A plain HTTP/1.1 GET over a fresh connection: (status, content type, body).
pub fn http_get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("GET {path}: no header end in {text:?}"));
    let status: u16 =
        head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("bad status line: {head}"));
    let header = |name: &str| {
        head.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
    };
    let body = if header("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, header("content-type").unwrap_or_default(), body)
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].strip_prefix("\r\n").unwrap_or(&after[n..]);
    }
    out
}

/// A small test message.
pub fn message(n: usize, subject: &str) -> Vec<u8> {
    format!(
        "From: Sender <sender@example.com>\r\nTo: hook@example.com\r\nSubject: {subject} {n}\r\n\
         Message-ID: <msg-{n}@example.com>\r\nDate: Tue, 01 Dec 2026 09:30:00 +0100\r\n\r\nbody of message {n}\r\n"
    )
    .into_bytes()
}

//! README.md's getting-started guide, run: so that it cannot rot.
//!
//! Every fenced block tagged `sh` is run, in order, with bash, in a temporary copy of the
//! repository's example files (`mailhook.toml`, `rules/`, `fixtures/`, `examples/`,
//! `contrib/`), one command at a time (a `\` continuation or a here-document belongs to its
//! command), each of which must exit 0. What the guide shows but cannot be run as such here:
//!
//! - `cargo run --release -- serve ARGS`: this test starts `mailhook serve ARGS` itself, in the
//!   background, and stops it with SIGTERM at the end (it must exit 0);
//! - `cargo test`: not run (this test is part of it); `.ci/run` must run it;
//! - `mailhook` is the binary cargo built for the tests, first on `PATH`;
//! - `127.0.0.1:2525` and `127.0.0.1:9025` become free ports, in the copied config and in
//!   every command;
//! - every command runs once, right after the one before it, with no pause and no second try:
//!   as a person pasting the guide would run it. A command that reads an output file (`cat`,
//!   `grep`) must print something: the guide itself waits where delivery is asynchronous
//!   (`ingest --wait`, `queue wait`), and serve reloads changed rules before it judges.
//!
//! Blocks tagged `sh outside` need what this machine does not have (Postfix, systemd as PID 1,
//! root on a server): they are checked with `bash -n`, every repository file they name must
//! exist, and the unit file they install is checked key by key and with
//! `systemd-analyze verify` (where it is installed).
//!
//! The results are then checked: the JSON lines each step should have produced, `/healthz`,
//! the received counts in `/metrics`.

mod support;

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::gateway::BIN;

const WAIT: Duration = Duration::from_secs(20);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fenced code block of the README.
struct Block {
    /// The info string: `sh`, `sh outside`, `toml`, ...
    info: String,
    /// 1-based line of the opening fence.
    line: usize,
    text: String,
}

fn blocks(readme: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut open: Option<Block> = None;
    for (i, line) in readme.lines().enumerate() {
        match (&mut open, line.strip_prefix("```")) {
            (None, Some(info)) => {
                open = Some(Block { info: info.trim().to_string(), line: i + 1, text: String::new() })
            }
            (Some(_), Some("")) => out.push(open.take().unwrap()),
            (Some(b), _) => {
                b.text.push_str(line);
                b.text.push('\n');
            }
            (None, None) => {}
        }
    }
    assert!(open.is_none(), "README.md: a code block is not closed");
    out
}

/// The commands of a block: continuation lines joined, a here-document kept with its command,
/// blank and comment-only lines dropped.
fn commands(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(first) = lines.next() {
        if first.trim().is_empty() || first.trim_start().starts_with('#') {
            continue;
        }
        let mut cmd = first.to_string();
        while cmd.ends_with('\\') {
            cmd.pop();
            cmd.push_str(lines.next().expect("a continuation line").trim_start());
        }
        if let Some(pos) = cmd.find("<<'") {
            let tag: String = cmd[pos + 3..].chars().take_while(|c| *c != '\'').collect();
            for l in lines.by_ref() {
                cmd.push('\n');
                cmd.push_str(l);
                if l == tag {
                    break;
                }
            }
        }
        out.push(cmd);
    }
    out
}

/// The command without a trailing `# comment` (outside quotes and here-documents: good enough
/// for the README's one-liners).
fn without_comment(cmd: &str) -> &str {
    if cmd.contains('\n') {
        return cmd;
    }
    cmd.find(" #").map_or(cmd, |i| cmd[..i].trim_end())
}

/// Two distinct free ports on 127.0.0.1.
fn free_ports() -> [u16; 2] {
    let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    [a.local_addr().unwrap().port(), b.local_addr().unwrap().port()]
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The guide's world: the copy, the ports, `mailhook` on PATH, and serve once started.
struct Guide {
    dir: tempfile::TempDir,
    bin: tempfile::TempDir,
    ports: [(String, String); 2],
    serve: Option<Child>,
    transcript: Vec<(String, String)>,
}

impl Guide {
    fn new() -> Guide {
        let dir = tempfile::tempdir().unwrap();
        let [smtp, admin] = free_ports();
        let ports = [
            ("127.0.0.1:2525".to_string(), format!("127.0.0.1:{smtp}")),
            ("127.0.0.1:9025".to_string(), format!("127.0.0.1:{admin}")),
        ];
        for d in ["rules", "fixtures", "examples", "contrib"] {
            copy_dir(&root().join(d), &dir.path().join(d));
        }
        let config = std::fs::read_to_string(root().join("mailhook.toml")).unwrap();
        for (from, _) in &ports {
            assert!(config.contains(from.as_str()), "mailhook.toml no longer listens on {from}: update this test");
        }
        std::fs::write(dir.path().join("mailhook.toml"), Guide::move_ports(&ports, &config)).unwrap();
        let bin = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(BIN, bin.path().join("mailhook")).unwrap();
        Guide { dir, bin, ports, serve: None, transcript: Vec::new() }
    }

    fn move_ports(ports: &[(String, String); 2], text: &str) -> String {
        ports.iter().fold(text.to_string(), |t, (from, to)| t.replace(from.as_str(), to))
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path().join("serve.log")).unwrap_or_default()
    }

    fn log_lines(&self) -> Vec<Value> {
        self.log().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// `cargo run --release -- serve ARGS`: starts serve in the background, waits until it
    /// listens on SMTP and the admin port.
    fn start_serve(&mut self, args: &str) {
        assert!(self.serve.is_none(), "serve started twice");
        let log = std::fs::File::create(self.path().join("serve.log")).unwrap();
        let mut argv: Vec<&str> = args.split_whitespace().collect();
        argv.extend(["--log-format", "json"]);
        let child = Command::new(BIN)
            .args(&argv)
            .current_dir(self.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.serve = Some(child);
        let deadline = Instant::now() + WAIT;
        loop {
            let up = |protocol: &str| {
                self.log_lines().iter().any(|v| v["message"] == "listening" && v["protocol"] == protocol)
            };
            if up("smtp") && up("admin") {
                return;
            }
            if let Some(status) = self.serve.as_mut().unwrap().try_wait().unwrap() {
                panic!("serve exited ({status}):\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "serve did not start listening:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs one command of an `sh` block; returns its stdout.
    fn run(&mut self, block: &Block, cmd: &str) {
        let bare = without_comment(cmd);
        if let Some(args) = bare.strip_prefix("cargo run --release -- ") {
            assert!(args.starts_with("serve "), "line {}: only `serve` is run through cargo run: {cmd}", block.line);
            self.start_serve(args);
            return;
        }
        if bare == "cargo test" {
            let ci = std::fs::read_to_string(root().join(".ci/run")).unwrap();
            assert!(ci.lines().any(|l| l.trim() == "cargo test"), ".ci/run does not run `cargo test`");
            return;
        }
        let script = Guide::move_ports(&self.ports, cmd);
        let reads_output = ["cat ", "grep "].iter().any(|p| bare.starts_with(p)) && !bare.contains('>');
        let path = format!("{}:{}", self.bin.path().display(), std::env::var("PATH").unwrap_or_default());
        let out = Command::new("bash")
            .args(["-c", &format!("set -euo pipefail\n{script}")])
            .current_dir(self.path())
            .env("PATH", path)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && !(reads_output && stdout.is_empty()),
            "README.md block at line {}: `{cmd}` failed ({})\nstdout:\n{stdout}\nstderr:\n{}\nserve log:\n{}",
            block.line,
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        self.transcript.push((bare.to_string(), stdout));
    }

    /// The stdout of the first command that starts with `prefix`.
    fn output(&self, prefix: &str) -> &str {
        self.transcript
            .iter()
            .find(|(cmd, _)| cmd.starts_with(prefix))
            .map(|(_, out)| out.as_str())
            .unwrap_or_else(|| panic!("the README no longer runs `{prefix}...`"))
    }

    fn jsonl(&self, file: &str) -> Vec<Value> {
        std::fs::read_to_string(self.path().join(file))
            .unwrap_or_else(|e| panic!("{file}: {e}"))
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn stop_serve(&mut self) -> i32 {
        let mut child = self.serve.take().expect("serve was started by the guide");
        let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "serve did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Guide {
    fn drop(&mut self) {
        if let Some(mut child) = self.serve.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn the_getting_started_guide_works() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let runnable: Vec<Block> = blocks(&readme).into_iter().filter(|b| b.info == "sh").collect();
    assert!(runnable.len() >= 6, "the guide's sh blocks are gone");
    let mut guide = Guide::new();
    for block in &runnable {
        for cmd in commands(&block.text) {
            guide.run(block, &cmd);
        }
    }

    // 2. The UPS mail sent over SMTP, the Nagios one through ingest.
    let orders = guide.jsonl("out/orders.jsonl");
    let ups = orders.iter().find(|v| v["rule"] == "ups-delivery-notice").expect("the UPS mail was delivered");
    assert_eq!(ups["source"], "smtp");
    assert_eq!(ups["fields"]["tracking_number"], "1Z999AA10123456784");
    assert!(guide.output("cat out/orders.jsonl").contains("ups-delivery-notice"));
    let alerts = guide.jsonl("out/alerts.jsonl");
    assert!(
        alerts.iter().any(|v| v["rule"] == "nagios-service-alert" && v["host"] == "web01.example.com"),
        "{alerts:?}"
    );

    // 5. The new rule: tried, pinned, served after the reload.
    let tried: Value = serde_json::from_str(guide.output("mailhook try --pretty")).unwrap();
    assert_eq!(tried["rule"], "acme-invoice");
    assert!(guide.path().join("fixtures/acme-invoice.json").exists(), "test --update wrote the golden");
    let acme =
        orders.iter().chain(guide.jsonl("out/orders.jsonl").iter()).find(|v| v["rule"] == "acme-invoice").cloned();
    let acme = acme.expect("the ACME mail was delivered by the reloaded rules");
    assert_eq!(acme["fields"]["invoice"], "2026-0815");
    assert_eq!(acme["fields"]["customer_id"], 4711);
    assert_eq!(acme["fields"]["amount"], 129.0);
    assert_eq!(acme["fields"]["currency"], "EUR");

    // 6. The Kustomer config routes the UPS mail to its web hook destination.
    let routed: Value = serde_json::from_str(guide.output("KUSTOMER_HOOK_TOKEN=")).unwrap();
    assert_eq!(routed["to"], serde_json::json!(["orders"]));

    // 8. Health and the received counts.
    let health: Value = serde_json::from_str(guide.output("curl -s http://127.0.0.1:9025/healthz")).unwrap();
    assert_eq!(health, serde_json::json!({"status": "ok"}));
    let metrics = guide.output("curl -s http://127.0.0.1:9025/metrics");
    assert!(metrics.contains("mailhook_messages_received_total{source=\"smtp\"} 2\n"), "{metrics}");
    assert!(metrics.contains("mailhook_messages_received_total{source=\"stdin\"} 1\n"), "{metrics}");

    assert_eq!(guide.stop_serve(), 0, "serve's exit code on SIGTERM:\n{}", guide.log());
}

/// Repository files a command names (relative paths; `target/` is built, not shipped).
fn named_files(cmd: &str) -> Vec<String> {
    cmd.split_whitespace()
        .map(|t| t.trim_matches(|c| c == '\'' || c == '"'))
        .filter(|t| t.contains('/') && !t.starts_with(['/', '-', '$']) && !t.contains(':'))
        .filter(|t| !t.starts_with("target/"))
        .map(str::to_string)
        .collect()
}

/// Whether `pattern` (a path, `*` allowed in its last part) names at least one file under `root`.
fn exists(root: &Path, pattern: &str) -> bool {
    let path = root.join(pattern);
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let Some((prefix, suffix)) = name.split_once('*') else {
        return path.exists();
    };
    std::fs::read_dir(path.parent().unwrap()).is_ok_and(|entries| {
        entries.filter_map(Result::ok).any(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with(prefix) && n.ends_with(suffix) && n.len() >= prefix.len() + suffix.len()
        })
    })
}

#[test]
fn outside_blocks_are_valid_shell_naming_files_that_exist() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let outside: Vec<Block> = blocks(&readme).into_iter().filter(|b| b.info == "sh outside").collect();
    assert!(outside.len() >= 2, "the Postfix and systemd blocks are gone");
    let mut installs_unit = false;
    for block in &outside {
        let out = Command::new("bash").args(["-n", "-c", &block.text]).output().unwrap();
        assert!(
            out.status.success(),
            "README.md block at line {}: {}",
            block.line,
            String::from_utf8_lossy(&out.stderr)
        );
        for cmd in commands(&block.text) {
            for file in named_files(&cmd) {
                assert!(exists(&root(), &file), "README.md block at line {}: {file} does not exist", block.line);
            }
            installs_unit |= cmd.contains("contrib/mailhook.service");
        }
    }
    assert!(installs_unit, "the systemd block no longer installs contrib/mailhook.service");
}

/// `contrib/mailhook.service` as sections of key → values.
fn unit() -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let text = std::fs::read_to_string(root().join("contrib/mailhook.service")).unwrap();
    let mut sections: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut current = None;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = Some(name.to_string());
            sections.entry(name.to_string()).or_default();
            continue;
        }
        let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("mailhook.service:{}: not KEY=VALUE", i + 1));
        let section = current.clone().unwrap_or_else(|| panic!("mailhook.service:{}: outside a section", i + 1));
        sections.entry(section).or_default().entry(key.trim().to_string()).or_default().push(value.trim().to_string());
    }
    sections
}

#[test]
fn the_systemd_unit_runs_serve_hardened_and_verifies() {
    let unit = unit();
    let service = &unit["Service"];
    let one = |key: &str| -> &str {
        let values = service.get(key).unwrap_or_else(|| panic!("[Service] has no {key}"));
        assert_eq!(values.len(), 1, "{key} is set {} times", values.len());
        &values[0]
    };
    assert_eq!(one("Type"), "simple");
    assert_eq!(one("ExecStart"), "/usr/local/bin/mailhook serve --config /etc/mailhook/mailhook.toml");
    assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(one("User"), "mailhook");
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(one("ProtectSystem"), "strict");
    assert_eq!(one("ReadWritePaths"), "/var/spool/mailhook");
    assert_eq!(one("NoNewPrivileges"), "yes");
    assert_eq!(one("KillSignal"), "SIGTERM");
    // Big messages' freed buffers go back to the system (docs/design.md, Memory under big mail).
    assert_eq!(one("Environment"), "MALLOC_MMAP_THRESHOLD_=1048576");
    // Long enough for serve's own grace period (and the admin endpoint's few seconds).
    let stop: u64 = one("TimeoutStopSec").parse().unwrap();
    assert!(Duration::from_secs(stop) >= mailhook::pipeline::SHUTDOWN_GRACE + Duration::from_secs(5), "{stop}");
    assert_eq!(unit["Install"]["WantedBy"], ["multi-user.target"]);

    // systemd's own check, with the binary where the unit expects it replaced by this build.
    let have = Command::new("systemd-analyze").arg("--version").output().is_ok_and(|o| o.status.success());
    if !have {
        eprintln!("skipping systemd-analyze verify: not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root().join("contrib/mailhook.service")).unwrap();
    let path = dir.path().join("mailhook.service");
    std::fs::write(&path, text.replace("/usr/local/bin/mailhook", BIN)).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify:\n{stderr}");
}

#[test]
fn shell_blocks_are_split_into_commands() {
    let text = "# comment\nexport A=1\nlong \\\n  line   # note\ncat > f <<'EOF'\nx \\\n# y\nEOF\nlast\n";
    assert_eq!(commands(text), ["export A=1", "long line   # note", "cat > f <<'EOF'\nx \\\n# y\nEOF", "last"]);
    assert_eq!(without_comment("long line   # note"), "long line");
    assert_eq!(named_files("install -m 0644 rules/*.toml /etc/x/ target/release/mailhook 'a:b/c'"), ["rules/*.toml"]);
    assert!(exists(&root(), "rules/*.toml") && !exists(&root(), "rules/*.nothing"));
}

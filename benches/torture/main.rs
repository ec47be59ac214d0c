//! The torture suites: crash and fault scenarios against the real `mailhook serve` (the
//! release binary), on loopback, each checking that nothing mailhook acknowledged is lost.
//!
//! ```text
//! scripts/torture [crash|faults|cluster|all|SCENARIO...] [--quick] [--seed N] [--keep-logs]
//! cargo bench --bench torture -- crash
//! ```
//!
//! - `crash` ([`crash`]): `kill -9` of serve five times during an SMTP load of 10,000 messages
//!   (`crash-smtp`), during 3,000 `mailhook ingest` runs some of which are killed too
//!   (`crash-ingest`), and during the drain of a 2,000-message IMAP backlog (`crash-imap`).
//! - `faults` ([`faults`]): under a paced SMTP load, the webhook down for 60 s
//!   (`webhook-down`), answering 429 (`webhook-429`), taking 5 s per request with the delivery
//!   timeout above and below that (`webhook-slow-10s`, `webhook-slow-3s`); an email hook relay
//!   that answers 451, 554 or drops connections (`relay-451`, `relay-554`, `relay-drop`); the
//!   spool's file system turning read-only (`spool-readonly`, needs root to mount a tmpfs).
//! - `cluster` ([`cluster`]): three instances sharing one private PostgreSQL, their queue in it:
//!   `kill -9` of one of them at random 6 times during an SMTP load of 10,000 messages sent
//!   round-robin (`cluster-kill`), PostgreSQL stopped for 15 s under load (`cluster-dbdown`),
//!   and `kill -9` of the lease holder while three instances drain one IMAP folder of 2,000
//!   messages (`cluster-imap`, each spooled exactly once). Needs Debian's `postgresql` (and
//!   `dovecot-imapd` for cluster-imap).
//!
//! Every scenario starts its own gateway (a temporary directory with `mailhook.toml`, a
//! catch-all rule and the spool; see `tests/support/gateway.rs`), its own receivers and its own
//! load. Each destination gets a secret (a header, or the email hook key) that must never show
//! in serve's logs. At the end a table gives, per scenario, the messages sent, acknowledged,
//! delivered, lost (must be 0), the duplicates and the drain time after recovery; every
//! violated invariant is listed and the process exits 1. `--quick` runs every scenario small
//! and short, to try the suites out. The serve logs of a failed scenario (of all, with
//! `--keep-logs`) are copied to `target/torture/<scenario>/`.

#[path = "../../tests/support/mod.rs"]
mod support;

mod cluster;
mod crash;
mod faults;
mod load;
mod report;
mod sink;

use report::Row;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use support::gateway::Gateway;

/// Every message goes to the one destination, named `hook`.
pub const RULE: &str = "[[rule]]\nname = \"all\"\nto = [\"hook\"]\n";

/// The value of `${HOOK_SECRET}`, which every destination carries; it must never be logged.
pub const SECRET: &str = "torture-secret-4f1c9a";

type Scenario = (&'static str, fn(&mut Ctx) -> Row);

const CRASH: &[Scenario] = &[("crash-smtp", crash::smtp), ("crash-ingest", crash::ingest), ("crash-imap", crash::imap)];

const CLUSTER: &[Scenario] =
    &[("cluster-kill", cluster::kill), ("cluster-dbdown", cluster::dbdown), ("cluster-imap", cluster::imap)];

const FAULTS: &[Scenario] = &[
    ("webhook-down", faults::webhook_down),
    ("webhook-429", faults::webhook_429),
    ("webhook-slow-10s", faults::webhook_slow_10s),
    ("webhook-slow-3s", faults::webhook_slow_3s),
    ("relay-451", faults::relay_451),
    ("relay-554", faults::relay_554),
    ("relay-drop", faults::relay_drop),
    ("spool-readonly", faults::spool_readonly),
];

/// What every scenario gets: the random source, the scale, where to keep logs.
pub struct Ctx {
    pub rng: fastrand::Rng,
    quick: bool,
    logs: PathBuf,
    /// Keep the serve logs of every scenario, not only of failed ones.
    keep_logs: bool,
}

impl Ctx {
    /// `full`, or `quick` with `--quick`.
    pub fn scale(&self, full: usize, quick: usize) -> usize {
        if self.quick { quick } else { full }
    }

    pub fn secs(&self, full: u64, quick: u64) -> Duration {
        Duration::from_secs(if self.quick { quick } else { full })
    }

    pub fn rate(&self, full: f64, quick: f64) -> f64 {
        if self.quick { quick } else { full }
    }

    /// A gateway with `config` and `rules`, `${HOOK_SECRET}` set.
    pub fn gateway(&self, config: &str, rules: &str) -> Gateway {
        Gateway::new(config, rules).env("HOOK_SECRET", SECRET)
    }

    /// Stops serve with SIGTERM: it must exit 0, and the secret must not be in its logs.
    pub fn finish_serve(&self, row: &mut Row, gw: &mut Gateway) {
        // A serve still starting up has no signal handler yet: let it get there first.
        gw.wait_log("serve up", 1, Duration::from_secs(60), |v| v["message"] == "mailhook serving");
        let code = gw.stop();
        row.check(code == 0, || format!("serve exited {code} after SIGTERM"));
        let logs = gw.logs();
        row.check(!logs.contains(SECRET), || "the destination's secret appears in serve's logs".into());
        let errors = logs.lines().filter(|l| l.contains("\"level\":\"ERROR\"")).count();
        if errors > 0 {
            row.note(format!("{errors} ERROR log lines"));
        }
    }

    /// Copies the serve logs of a failed scenario (of every one, with `--keep-logs`) to
    /// `target/torture/<scenario>/`.
    pub fn keep_logs_if_failed(&self, row: &Row, gw: &Gateway) {
        if row.violations.is_empty() && !self.keep_logs {
            return;
        }
        let dir = self.logs.join(&row.scenario);
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::create_dir_all(&dir);
        for entry in std::fs::read_dir(gw.path()).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".log") || name == "mailhook.toml" {
                let _ = std::fs::copy(entry.path(), dir.join(&name));
            }
        }
        let _ = std::fs::write(
            dir.join("spool-counts.txt"),
            format!("{:?}\n", report::spool_counts(&gw.path().join("spool"))),
        );
        eprintln!("    serve logs kept in {}", dir.display());
    }
}

/// A free port on 127.0.0.1 (bound, then released for serve to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// The `[destination.hook]` table of a webhook to `sink`, with the secret as a header.
pub fn webhook_destination(sink: &sink::Sink) -> String {
    format!(
        "[destination.hook]\ntype = \"webhook\"\nurl = \"{}\"\nheaders = {{ \"X-Api-Key\" = \"${{HOOK_SECRET}}\" }}\n",
        sink.url()
    )
}

/// The number at the end of a raw message's `Subject:` line.
pub fn subject_seq(raw: &[u8]) -> Option<u64> {
    let text = String::from_utf8_lossy(raw);
    let line = text.lines().find(|l| l.starts_with("Subject: "))?;
    line.rsplit(' ').next()?.parse().ok()
}

fn usage() -> ! {
    let names: Vec<&str> = CRASH.iter().chain(FAULTS).chain(CLUSTER).map(|(n, _)| *n).collect();
    eprintln!(
        "usage: torture [crash|faults|cluster|all|SCENARIO...] [--quick] [--seed N] [--keep-logs]\nscenarios: {}",
        names.join(", ")
    );
    std::process::exit(64);
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let tmp = std::env::temp_dir();
    let fs = std::process::Command::new("findmnt")
        .args(["-n", "-o", "FSTYPE", "--target"])
        .arg(&tmp)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split(' ').take(3).collect();
    format!("{cores} cores ({cpu}), spools under {} on {fs}, load average {}", tmp.display(), load.join(" "))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let mut quick = false;
    let mut keep_logs = false;
    let mut seed = None;
    let mut names = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--keep-logs" => keep_logs = true,
            "--seed" => seed = Some(it.next().and_then(|s| s.parse().ok()).unwrap_or_else(|| usage())),
            "-h" | "--help" => usage(),
            s if s.starts_with('-') => usage(),
            s => names.push(s.to_string()),
        }
    }
    if names.is_empty() {
        names.push("all".into());
    }
    let mut chosen: Vec<Scenario> = Vec::new();
    for name in &names {
        match name.as_str() {
            "crash" => chosen.extend(CRASH),
            "faults" => chosen.extend(FAULTS),
            "cluster" => chosen.extend(CLUSTER),
            "all" => chosen.extend(CRASH.iter().chain(FAULTS).chain(CLUSTER)),
            other => match CRASH.iter().chain(FAULTS).chain(CLUSTER).find(|(n, _)| *n == other) {
                Some(s) => chosen.push(*s),
                None => usage(),
            },
        }
    }
    let seed = seed.unwrap_or_else(|| fastrand::u64(..));
    let logs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/torture");
    let mut ctx = Ctx { rng: fastrand::Rng::with_seed(seed), quick, logs, keep_logs };
    let machine_before = machine();
    eprintln!("torture: seed {seed}{}; {machine_before}", if quick { ", quick" } else { "" });

    let started = Instant::now();
    let mut rows = Vec::new();
    for (name, run) in chosen {
        eprintln!("== {name}");
        let t = Instant::now();
        let row = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&mut ctx))).unwrap_or_else(|panic| {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let mut row = Row::new(name, "(stopped)");
            row.violation(format!("the scenario stopped: {}", why.lines().next().unwrap_or_default()));
            row
        });
        eprintln!(
            "   {name}: {} acknowledged, {} delivered, {} lost, {} + {} duplicates, {} violation(s), {:.0} s",
            row.acknowledged,
            row.delivered,
            row.lost,
            row.redelivered,
            row.resent,
            row.violations.len(),
            t.elapsed().as_secs_f64()
        );
        rows.push(row);
    }

    println!();
    print!("{}", report::table(&rows));
    println!();
    for r in &rows {
        println!("- `{}`: {}", r.scenario, r.what);
    }
    println!();
    println!("seed {seed}; {}; {:.0} s in all", machine(), started.elapsed().as_secs_f64());
    let failed: Vec<&Row> = rows.iter().filter(|r| !r.violations.is_empty()).collect();
    if failed.is_empty() {
        println!("every invariant held");
        return;
    }
    println!();
    for r in &failed {
        for v in &r.violations {
            println!("VIOLATION {}: {v}", r.scenario);
        }
    }
    std::process::exit(1);
}

//! The senders of the torture scenarios, each recording exactly what mailhook acknowledged.
//!
//! - [`SmtpLoad`]: several concurrent SMTP sessions over raw sockets (pipelined
//!   `MAIL`/`RCPT`/`DATA`), each message numbered (`Subject: <tag> <seq>`, `Message-ID:
//!   <tag-seq@torture.example>`). A message counts as acknowledged when its `DATA` got `250`. A
//!   message refused (4xx/5xx) or whose connection broke is sent again, on a new connection
//!   when it broke, like a real MTA keeps a message it has no `250` for; while the server is
//!   down, sessions keep reconnecting. When the whole message, final dot included, was written
//!   and the connection broke before the answer, the server may have kept it: such "lost
//!   answers" are counted per message, as they are the only way a resend can become a second
//!   copy.
//! - [`IngestLoad`]: `mailhook ingest` processes (several at once), the message on stdin, like a
//!   Postfix pipe transport. Exit 0 is the acknowledgement. A chosen share of them are killed
//!   with SIGKILL a few milliseconds after they start (before, while or after they write the
//!   spool); such a message is handed to a new `ingest` later, as Postfix would after a pipe
//!   died, and its kills are counted per message (a killed `ingest` may have committed first).
//!
//! Both can be paced (`per_second`: message `k` is first offered at `k / per_second`) or run
//! flat out.

use crate::support::gateway::BIN;
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// How long a session waits for any one reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// A numbered test message of about 2 KB.
pub fn message(tag: &str, seq: u64) -> Vec<u8> {
    let mut m = format!(
        "From: Torture <load@torture.example>\r\nTo: hook@example.com\r\nSubject: {tag} {seq}\r\n\
         Message-ID: <{tag}-{seq}@torture.example>\r\nDate: Tue, 01 Dec 2026 09:30:00 +0100\r\n\r\n"
    );
    while m.len() < 2048 {
        m.push_str("Service CHECK_DISK on host db-01 is CRITICAL: /var at 97% of 200 GB.\r\n");
    }
    m.into_bytes()
}

/// What a load has done so far; shared by its workers.
pub struct Tally {
    /// The sequence number of the first message (so that two loads into one destination never
    /// share a number).
    base: u64,
    total: usize,
    started: Instant,
    per_second: Option<f64>,
    acked: Vec<AtomicBool>,
    acked_count: AtomicUsize,
    /// Per message: attempts whose outcome is unknown (SMTP: answer lost after the final dot;
    /// ingest: process killed).
    unknown: Vec<AtomicU32>,
    retry: Mutex<VecDeque<u64>>,
    next_new: AtomicUsize,
    /// Refusals by reply (`"451 4.3.0"`) or exit code (`"exit 75"`), and when they happened.
    refusals: Mutex<Vec<(Instant, String)>>,
    attempts: AtomicUsize,
    connect_failures: AtomicUsize,
    stop: AtomicBool,
}

enum Next {
    Send(u64),
    Wait,
    Done,
}

impl Tally {
    fn new(base: u64, total: usize, per_second: Option<f64>) -> Tally {
        Tally {
            base,
            total,
            started: Instant::now(),
            per_second,
            acked: (0..total).map(|_| AtomicBool::new(false)).collect(),
            acked_count: AtomicUsize::new(0),
            unknown: (0..total).map(|_| AtomicU32::new(0)).collect(),
            retry: Mutex::new(VecDeque::new()),
            next_new: AtomicUsize::new(0),
            refusals: Mutex::new(Vec::new()),
            attempts: AtomicUsize::new(0),
            connect_failures: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        }
    }

    /// The next message to send and the moment it may go: a retry at once, else the next new one
    /// at its paced time.
    fn next(&self) -> (Next, Option<Instant>) {
        if self.stop.load(Ordering::SeqCst) {
            return (Next::Done, None);
        }
        if let Some(seq) = self.retry.lock().unwrap().pop_front() {
            return (Next::Send(seq), None);
        }
        let k = self.next_new.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |k| (k < self.total).then_some(k + 1));
        match k {
            Ok(k) => {
                let at = self.per_second.map(|r| self.started + Duration::from_secs_f64(k as f64 / r));
                (Next::Send(self.base + k as u64), at)
            }
            Err(_) if self.done() => (Next::Done, None),
            Err(_) => (Next::Wait, None),
        }
    }

    fn index(&self, seq: u64) -> usize {
        (seq - self.base) as usize
    }

    fn ack(&self, seq: u64) {
        if !self.acked[self.index(seq)].swap(true, Ordering::SeqCst) {
            self.acked_count.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn again(&self, seq: u64) {
        self.retry.lock().unwrap().push_back(seq);
    }

    fn refused(&self, what: String) {
        self.refusals.lock().unwrap().push((Instant::now(), what));
    }

    /// Every message acknowledged.
    pub fn done(&self) -> bool {
        self.acked_count.load(Ordering::SeqCst) == self.total
    }

    pub fn acked(&self) -> usize {
        self.acked_count.load(Ordering::SeqCst)
    }

    pub fn acked_set(&self) -> HashSet<u64> {
        (0..self.total).filter(|&i| self.acked[i].load(Ordering::SeqCst)).map(|i| self.base + i as u64).collect()
    }

    /// Distinct messages offered at least once.
    pub fn offered(&self) -> usize {
        self.next_new.load(Ordering::SeqCst)
    }

    /// Attempts of message `seq` whose outcome the sender could not know.
    pub fn unknown(&self, seq: u64) -> u32 {
        let i = seq.checked_sub(self.base).map_or(usize::MAX, |i| i as usize);
        self.unknown.get(i).map_or(0, |u| u.load(Ordering::SeqCst))
    }

    pub fn unknown_total(&self) -> u32 {
        self.unknown.iter().map(|u| u.load(Ordering::SeqCst)).sum()
    }

    /// Refusals with their time.
    pub fn refusals(&self) -> Vec<(Instant, String)> {
        self.refusals.lock().unwrap().clone()
    }

    /// Refusals counted by kind.
    pub fn refusal_counts(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for (_, r) in self.refusals.lock().unwrap().iter() {
            *out.entry(r.clone()).or_insert(0) += 1;
        }
        out
    }

    pub fn attempts(&self) -> usize {
        self.attempts.load(Ordering::SeqCst)
    }

    pub fn connect_failures(&self) -> usize {
        self.connect_failures.load(Ordering::SeqCst)
    }

    /// Waits until `acked() >= n`; fails when the load makes no progress for `stall`.
    pub fn wait_acked(&self, n: usize, stall: Duration) -> Result<(), String> {
        let (mut last, mut since) = (self.acked(), Instant::now());
        while self.acked() < n {
            let now = self.acked();
            if now != last {
                (last, since) = (now, Instant::now());
            } else if since.elapsed() > stall {
                return Err(format!(
                    "the load made no progress for {stall:?} at {now} of {} acknowledged; refusals {:?}",
                    self.total,
                    self.refusal_counts()
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    fn wait_done(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while !self.done() {
            if Instant::now() > deadline {
                self.stop.store(true, Ordering::SeqCst);
                return Err(format!(
                    "the load did not finish within {timeout:?}: {} of {} acknowledged; refusals {:?}",
                    self.acked(),
                    self.total,
                    self.refusal_counts()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// SMTP

pub struct SmtpLoadOptions {
    /// Where the sessions connect: session `n` to `addrs[n % addrs.len()]` (several instances
    /// of a cluster share the load round-robin).
    pub addrs: Vec<SocketAddr>,
    pub total: usize,
    pub sessions: usize,
    pub per_second: Option<f64>,
    pub tag: &'static str,
}

pub struct SmtpLoad {
    pub tally: Arc<Tally>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SmtpLoad {
    pub fn start(opts: SmtpLoadOptions) -> SmtpLoad {
        let tally = Arc::new(Tally::new(0, opts.total, opts.per_second));
        let t = tally.clone();
        let thread = std::thread::Builder::new()
            .name("smtp-load".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("load runtime");
                rt.block_on(async move {
                    let mut sessions = tokio::task::JoinSet::new();
                    for n in 0..opts.sessions {
                        sessions.spawn(session(n, opts.addrs[n % opts.addrs.len()], opts.tag, t.clone()));
                    }
                    while sessions.join_next().await.is_some() {}
                });
            })
            .expect("spawn the load thread");
        SmtpLoad { tally, thread: Some(thread) }
    }

    /// Waits until every message is acknowledged (or gives up after `timeout`).
    pub fn wait(&mut self, timeout: Duration) -> Result<(), String> {
        let result = self.tally.wait_done(timeout);
        self.tally.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        result
    }
}

impl Drop for SmtpLoad {
    fn drop(&mut self) {
        self.tally.stop.store(true, Ordering::SeqCst);
    }
}

struct Conn {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
}

impl Conn {
    /// One reply: its code and the text of its last line.
    async fn reply(&mut self) -> std::io::Result<(u16, String)> {
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(REPLY_TIMEOUT, self.r.read_line(&mut line))
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no reply"))??;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let code: u16 = line
                .get(..3)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| std::io::Error::other(format!("not a reply: {line:?}")))?;
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok((code, line.get(4..).unwrap_or("").trim_end().to_string()));
            }
        }
    }
}

/// `451 4.3.0`: the code and the enhanced status code of a reply.
fn refusal(code: u16, text: &str) -> String {
    match text.split(' ').next().filter(|w| w.split('.').count() == 3 && w.starts_with(|c: char| c.is_ascii_digit())) {
        Some(enhanced) => format!("{code} {enhanced}"),
        None => code.to_string(),
    }
}

enum Outcome {
    Acked,
    Refused(u16, String),
    /// The connection broke; `after_dot`: the whole message had been written.
    Broken {
        after_dot: bool,
    },
}

async fn send_one(conn: &mut Conn, tag: &str, seq: u64) -> Outcome {
    let broken = Outcome::Broken { after_dot: false };
    if conn.w.write_all(b"MAIL FROM:<load@torture.example>\r\nRCPT TO:<hook@example.com>\r\nDATA\r\n").await.is_err() {
        return broken;
    }
    let mut replies = Vec::new();
    for _ in 0..3 {
        match conn.reply().await {
            Ok(r) => replies.push(r),
            Err(_) => return broken,
        }
    }
    let (data_code, _) = replies[2];
    if replies[0].0 != 250 || replies[1].0 != 250 || data_code != 354 {
        if data_code == 354 && (conn.w.write_all(b".\r\n").await.is_err() || conn.reply().await.is_err()) {
            return broken;
        }
        let (code, text) = replies.into_iter().find(|(c, _)| *c >= 400).unwrap_or((0, "unexpected".into()));
        return Outcome::Refused(code, text);
    }
    let mut body = message(tag, seq);
    body.extend_from_slice(b".\r\n");
    if conn.w.write_all(&body).await.is_err() {
        return broken;
    }
    match conn.reply().await {
        Ok((250, _)) => Outcome::Acked,
        Ok((code, text)) => Outcome::Refused(code, text),
        Err(_) => Outcome::Broken { after_dot: true },
    }
}

async fn connect(addr: SocketAddr) -> Option<Conn> {
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await.ok()?.ok()?;
    let _ = stream.set_nodelay(true);
    let (r, w) = stream.into_split();
    let mut conn = Conn { r: BufReader::new(r), w };
    if conn.reply().await.ok()?.0 != 220 {
        return None;
    }
    conn.w.write_all(b"EHLO torture.example\r\n").await.ok()?;
    (conn.reply().await.ok()?.0 == 250).then_some(conn)
}

async fn session(n: usize, addr: SocketAddr, tag: &'static str, tally: Arc<Tally>) {
    // Spread reconnects so that sessions do not knock all at once.
    let pause = |base: u64| Duration::from_millis(base + fastrand::u64(0..base.max(1)) + n as u64);
    'connection: loop {
        let mut conn = loop {
            if tally.done() || tally.stop.load(Ordering::SeqCst) {
                return;
            }
            match connect(addr).await {
                Some(c) => break c,
                None => {
                    tally.connect_failures.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(pause(50)).await;
                }
            }
        };
        loop {
            let (next, at) = tally.next();
            let seq = match next {
                Next::Done => {
                    let _ = conn.w.write_all(b"QUIT\r\n").await;
                    return;
                }
                Next::Wait => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                Next::Send(seq) => seq,
            };
            if let Some(at) = at {
                tokio::time::sleep_until(at.into()).await;
            }
            tally.attempts.fetch_add(1, Ordering::SeqCst);
            match send_one(&mut conn, tag, seq).await {
                Outcome::Acked => tally.ack(seq),
                Outcome::Refused(code, text) => {
                    tally.refused(refusal(code, &text));
                    tally.again(seq);
                    if code == 421 {
                        continue 'connection;
                    }
                    tokio::time::sleep(pause(100)).await;
                }
                Outcome::Broken { after_dot } => {
                    if after_dot {
                        tally.unknown[tally.index(seq)].fetch_add(1, Ordering::SeqCst);
                    }
                    tally.again(seq);
                    tokio::time::sleep(pause(20)).await;
                    continue 'connection;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ingest

pub struct IngestLoadOptions {
    /// The gateway's `mailhook.toml` (absolute).
    pub config: PathBuf,
    /// Environment of every `ingest` (the variables the config refers to).
    pub env: Vec<(String, String)>,
    /// Sequence number of the first message.
    pub base: u64,
    pub total: usize,
    pub workers: usize,
    pub per_second: Option<f64>,
    /// Share of `ingest` processes killed with SIGKILL shortly after they start.
    pub kill_share: f64,
    pub tag: &'static str,
    pub seed: u64,
}

pub struct IngestLoad {
    pub tally: Arc<Tally>,
    /// `ingest` processes killed.
    pub killed: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl IngestLoad {
    pub fn start(opts: IngestLoadOptions) -> IngestLoad {
        let tally = Arc::new(Tally::new(opts.base, opts.total, opts.per_second));
        let killed = Arc::new(AtomicUsize::new(0));
        let opts = Arc::new(opts);
        let threads = (0..opts.workers)
            .map(|n| {
                let (tally, killed, opts) = (tally.clone(), killed.clone(), opts.clone());
                std::thread::Builder::new()
                    .name(format!("ingest-load-{n}"))
                    .spawn(move || {
                        ingest_worker(&opts, &tally, &killed, fastrand::Rng::with_seed(opts.seed + n as u64))
                    })
                    .expect("spawn an ingest worker")
            })
            .collect();
        IngestLoad { tally, killed, threads }
    }

    pub fn wait(&mut self, timeout: Duration) -> Result<(), String> {
        let result = self.tally.wait_done(timeout);
        self.tally.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        result
    }
}

impl Drop for IngestLoad {
    fn drop(&mut self) {
        self.tally.stop.store(true, Ordering::SeqCst);
    }
}

fn ingest_worker(opts: &IngestLoadOptions, tally: &Tally, killed: &AtomicUsize, mut rng: fastrand::Rng) {
    loop {
        let (next, at) = tally.next();
        let seq = match next {
            Next::Done => return,
            Next::Wait => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Next::Send(seq) => seq,
        };
        if let Some(at) = at {
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
        }
        tally.attempts.fetch_add(1, Ordering::SeqCst);
        let mut child = match Command::new(BIN)
            .args(["ingest", "--config"])
            .arg(&opts.config)
            .args(["--from", "load@torture.example", "--to", "hook@example.com"])
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                tally.refused(format!("spawn failed: {e}"));
                tally.again(seq);
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("piped stdin");
            // A killed or refusing ingest may not read it all: a broken pipe is expected then.
            let _ = stdin.write_all(&message(opts.tag, seq));
        }
        if rng.f64() < opts.kill_share {
            // Somewhere between before it opened the spool and after it exited.
            std::thread::sleep(Duration::from_micros(rng.u64(0..8_000)));
            let _ = child.kill();
        }
        let status = child.wait().expect("wait for ingest");
        match status.code() {
            Some(0) => tally.ack(seq),
            Some(code) => {
                tally.refused(format!("exit {code}"));
                tally.again(seq);
                std::thread::sleep(Duration::from_millis(20 + rng.u64(0..50)));
            }
            None => {
                killed.fetch_add(1, Ordering::SeqCst);
                tally.unknown[tally.index(seq)].fetch_add(1, Ordering::SeqCst);
                tally.again(seq);
            }
        }
    }
}

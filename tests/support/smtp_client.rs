//! [`SmtpClient`]: a raw-socket SMTP/LMTP client for scripted protocol dialogues, blocking, with a
//! timeout on every read. It writes exactly the bytes a test gives it (so a test can pipeline,
//! send bare LFs, over-long lines or garbage), reads complete (multi-line) replies, can switch to
//! TLS after `STARTTLS`, and keeps a transcript of the whole dialogue that every failed
//! expectation prints.
//!
//! ```ignore
//! let mut c = SmtpClient::connect(addr);
//! c.expect_reply(&["220"]);
//! c.expect("EHLO client.test", &["250"]);
//! c.expect("MAIL FROM:<a@b.example>", &["250 2.1.0"]);
//! c.expect("DATA", &["503 5.5.1", "554 5.5.1"]); // either is right
//! ```
//!
//! A pattern is a reply code (`"250"`) or a code and an enhanced status code (`"250 2.1.0"`).

use rustls::pki_types::{CertificateDer, ServerName};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a read waits for the server unless the test says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// A reply line longer than this is a server bug (or not SMTP at all).
const MAX_REPLY_LINE: usize = 64 * 1024;

/// One complete server reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// The text of each line, after `ddd-` / `ddd `.
    pub lines: Vec<String>,
}

impl Reply {
    /// The enhanced status code (`2.1.0`) at the start of the first line, if there is one.
    pub fn enhanced(&self) -> Option<&str> {
        let first = self.lines.first()?.split_whitespace().next()?;
        let parts: Vec<&str> = first.split('.').collect();
        let ok = parts.len() == 3
            && matches!(parts[0], "2" | "4" | "5")
            && parts[1..].iter().all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()));
        ok.then_some(first)
    }

    /// Every line's text, joined with spaces.
    pub fn text(&self) -> String {
        self.lines.join(" ")
    }

    /// Whether the reply matches `pattern`: `"250"` (code only) or `"250 2.1.0"` (code and
    /// enhanced status code).
    pub fn is(&self, pattern: &str) -> bool {
        let mut parts = pattern.split_whitespace();
        let code_ok = parts.next().and_then(|c| c.parse::<u16>().ok()) == Some(self.code);
        code_ok && parts.next().is_none_or(|enhanced| self.enhanced() == Some(enhanced))
    }

    /// The extension keywords of an EHLO/LHLO reply (every line but the first), as sent.
    pub fn keywords(&self) -> Vec<&str> {
        self.lines.iter().skip(1).map(String::as_str).collect()
    }

    /// The parameters of extension `keyword` (case-insensitive) in an EHLO/LHLO reply:
    /// `Some("")` for a keyword without parameters, `None` when it is not offered.
    pub fn extension(&self, keyword: &str) -> Option<String> {
        self.keywords().into_iter().find_map(|line| {
            let mut words = line.splitn(2, ' ');
            let word = words.next()?;
            word.eq_ignore_ascii_case(keyword).then(|| words.next().unwrap_or("").trim().to_string())
        })
    }

    pub fn has_extension(&self, keyword: &str) -> bool {
        self.extension(keyword).is_some()
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i + 1 == self.lines.len() { ' ' } else { '-' };
            if i > 0 {
                f.write_str(" / ")?;
            }
            write!(f, "{}{sep}{line}", self.code)?;
        }
        Ok(())
    }
}

enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
    /// Only while switching to TLS.
    Gone,
}

impl Conn {
    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => &s.sock,
            Conn::Gone => unreachable!("connection taken"),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
            Conn::Gone => unreachable!("connection taken"),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.write_all(buf).and_then(|_| s.flush()),
            Conn::Tls(s) => s.write_all(buf).and_then(|_| s.flush()),
            Conn::Gone => unreachable!("connection taken"),
        }
    }
}

/// Why a read gave no reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    TimedOut,
    Closed,
    Other(String),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::TimedOut => f.write_str("timed out waiting for the server"),
            ReadError::Closed => f.write_str("the server closed the connection"),
            ReadError::Other(e) => f.write_str(e),
        }
    }
}

pub struct SmtpClient {
    conn: Conn,
    buf: Vec<u8>,
    log: Vec<String>,
    started: Instant,
    /// How long each read waits.
    pub timeout: Duration,
}

impl SmtpClient {
    /// Connects to `addr`; does not read the greeting.
    #[track_caller]
    pub fn connect(addr: SocketAddr) -> SmtpClient {
        SmtpClient::try_connect(addr).unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"))
    }

    pub fn try_connect(addr: SocketAddr) -> io::Result<SmtpClient> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(Duration::from_secs(30)))?;
        Ok(SmtpClient {
            conn: Conn::Plain(stream),
            buf: Vec::new(),
            log: vec![format!("-- connected to {addr}")],
            started: Instant::now(),
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// The dialogue so far, one line per line sent (`C:`) or received (`S:`).
    pub fn transcript(&self) -> String {
        self.log.join("\n")
    }

    /// Panics with `message` and the whole dialogue.
    #[track_caller]
    pub fn fail(&self, message: &str) -> ! {
        panic!("{message}\n--- dialogue ---\n{}\n----------------", self.transcript())
    }

    /// Adds a note to the transcript.
    pub fn note(&mut self, note: &str) {
        let at = self.started.elapsed().as_secs_f32();
        self.log.push(format!("-- [{at:.2}s] {note}"));
    }

    fn log_sent(&mut self, bytes: &[u8]) {
        let lines = display_lines(bytes);
        if lines.len() > 24 {
            let skipped = lines.len() - 16;
            for l in &lines[..10] {
                self.log.push(format!("C: {l}"));
            }
            self.log.push(format!("C: ... {skipped} more lines ..."));
            for l in &lines[lines.len() - 6..] {
                self.log.push(format!("C: {l}"));
            }
        } else {
            for l in lines {
                self.log.push(format!("C: {l}"));
            }
        }
    }

    /// Writes `bytes` exactly as given.
    pub fn try_send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.log_sent(bytes);
        let result = self.conn.write_all(bytes);
        if let Err(e) = &result {
            self.log.push(format!("-- write failed: {e}"));
        }
        result
    }

    /// Writes `bytes` exactly as given; panics (with the dialogue) if the write fails.
    #[track_caller]
    pub fn send_raw(&mut self, bytes: &[u8]) {
        if let Err(e) = self.try_send_raw(bytes) {
            self.fail(&format!("write failed: {e}"));
        }
    }

    /// Writes `bytes` exactly as given, but shows them in the dialogue only as `what` and a size
    /// (for megabytes of filler).
    #[track_caller]
    pub fn send_bulk(&mut self, bytes: &[u8], what: &str) {
        self.log.push(format!("C: <{what}: {} bytes>", bytes.len()));
        if let Err(e) = self.conn.write_all(bytes) {
            self.fail(&format!("write failed: {e}"));
        }
    }

    /// Writes `line` and CRLF.
    #[track_caller]
    pub fn send(&mut self, line: &str) {
        self.send_raw(format!("{line}\r\n").as_bytes());
    }

    fn fill(&mut self, deadline: Instant) -> Result<(), ReadError> {
        let now = Instant::now();
        if now >= deadline {
            return Err(ReadError::TimedOut);
        }
        let wait = (deadline - now).max(Duration::from_millis(1));
        self.conn.tcp().set_read_timeout(Some(wait)).map_err(|e| ReadError::Other(e.to_string()))?;
        let mut chunk = [0u8; 16 * 1024];
        match self.conn.read(&mut chunk) {
            Ok(0) => Err(ReadError::Closed),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                Err(ReadError::TimedOut)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionAborted
                ) =>
            {
                Err(ReadError::Closed)
            }
            Err(e) => Err(ReadError::Other(format!("read failed: {e}"))),
        }
    }

    fn read_line(&mut self, deadline: Instant) -> Result<Vec<u8>, ReadError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                return Ok(self.buf.drain(..=pos).collect());
            }
            if self.buf.len() > MAX_REPLY_LINE {
                return Err(ReadError::Other(format!("a reply line longer than {MAX_REPLY_LINE} bytes")));
            }
            self.fill(deadline)?;
        }
    }

    /// Reads one complete reply, waiting at most `timeout`.
    pub fn read_reply(&mut self, timeout: Duration) -> Result<Reply, ReadError> {
        let deadline = Instant::now() + timeout;
        let mut code = None;
        let mut lines = Vec::new();
        loop {
            let raw = match self.read_line(deadline) {
                Ok(raw) => raw,
                Err(e) => {
                    if !self.buf.is_empty() {
                        let partial = String::from_utf8_lossy(&self.buf).into_owned();
                        self.log.push(format!("S: {} (incomplete line)", shorten(&partial)));
                    }
                    self.note(&format!("no (complete) reply: {e}"));
                    return Err(e);
                }
            };
            let text = String::from_utf8_lossy(&raw).into_owned();
            self.log.push(format!("S: {}", shorten(text.trim_end_matches(['\r', '\n']))));
            if !raw.ends_with(b"\r\n") {
                return Err(ReadError::Other("a reply line not ended by CRLF".into()));
            }
            let line = text.trim_end_matches(['\r', '\n']);
            let bytes = line.as_bytes();
            let this_code =
                line.get(..3).filter(|c| c.bytes().all(|b| b.is_ascii_digit())).and_then(|c| c.parse().ok());
            let Some(this_code) = this_code else {
                return Err(ReadError::Other(format!("not a reply line: {line:?}")));
            };
            if *code.get_or_insert(this_code) != this_code {
                return Err(ReadError::Other("the lines of one reply have different codes".into()));
            }
            match bytes.get(3) {
                Some(b'-') => lines.push(line[4..].to_string()),
                Some(b' ') | None => {
                    lines.push(line.get(4..).unwrap_or("").to_string());
                    return Ok(Reply { code: this_code, lines });
                }
                Some(_) => return Err(ReadError::Other(format!("not a reply line: {line:?}"))),
            }
        }
    }

    /// Reads one complete reply; panics (with the dialogue) if none comes within the timeout.
    #[track_caller]
    pub fn reply(&mut self) -> Reply {
        match self.read_reply(self.timeout) {
            Ok(r) => r,
            Err(e) => self.fail(&format!("expected a reply: {e}")),
        }
    }

    /// Reads one reply and checks it matches one of `want`.
    #[track_caller]
    pub fn expect_reply(&mut self, want: &[&str]) -> Reply {
        let reply = self.reply();
        if !want.iter().any(|p| reply.is(p)) {
            self.fail(&format!("expected {}, got: {reply}", want.join(" or ")));
        }
        reply
    }

    /// Sends a command line and reads its reply.
    #[track_caller]
    pub fn cmd(&mut self, line: &str) -> Reply {
        self.send(line);
        self.reply()
    }

    /// Sends a command line; its reply must match one of `want`.
    #[track_caller]
    pub fn expect(&mut self, line: &str, want: &[&str]) -> Reply {
        self.send(line);
        self.expect_reply(want)
    }

    /// Reads the greeting (220) and says EHLO (250); returns the EHLO reply.
    #[track_caller]
    pub fn hello(&mut self, verb: &str, name: &str) -> Reply {
        self.expect_reply(&["220"]);
        self.expect(&format!("{verb} {name}"), &["250"])
    }

    /// Whether the server closes the connection within `timeout` without sending anything more.
    pub fn is_closed(&mut self, timeout: Duration) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let deadline = Instant::now() + timeout;
        match self.fill(deadline) {
            Err(ReadError::Closed) => {
                self.note("closed by the server");
                true
            }
            Err(e) => {
                self.note(&format!("not closed: {e}"));
                false
            }
            Ok(()) => {
                let text = String::from_utf8_lossy(&self.buf).into_owned();
                self.log.push(format!("S: {} (unexpected)", shorten(&text)));
                false
            }
        }
    }

    /// Asserts the server closes the connection (within the timeout) without sending more.
    #[track_caller]
    pub fn expect_closed(&mut self) {
        if !self.is_closed(self.timeout) {
            self.fail("expected the server to close the connection");
        }
    }

    /// Sends `DATA` (354 expected), then `content` exactly as given, then `.` CRLF; returns the
    /// reply to the end of data. `content` must end with CRLF and be dot-stuffed already.
    #[track_caller]
    pub fn data(&mut self, content: &[u8]) -> Reply {
        self.expect("DATA", &["354"]);
        let mut all = content.to_vec();
        all.extend_from_slice(b".\r\n");
        self.send_raw(&all);
        self.reply()
    }

    /// Sends `STARTTLS` (220 expected) and completes a TLS handshake that trusts only `root`
    /// and checks the server's name is `server_name`.
    #[track_caller]
    pub fn starttls(&mut self, server_name: &str, root: CertificateDer<'static>) {
        self.expect("STARTTLS", &["220"]);
        if !self.buf.is_empty() {
            self.fail("the server sent data after its 220 to STARTTLS, before the TLS handshake");
        }
        if let Err(e) = self.tls_handshake(server_name, root) {
            self.fail(&format!("TLS handshake failed: {e}"));
        }
    }

    /// Switches to TLS now (after the test has had its `STARTTLS` answered) and completes the
    /// handshake, trusting only `root`. Bytes the server sent before the handshake that the
    /// test has not read are an error.
    pub fn tls_handshake(&mut self, server_name: &str, root: CertificateDer<'static>) -> Result<(), String> {
        if !self.buf.is_empty() {
            return Err("unread plaintext from the server before the handshake".into());
        }
        super::init_crypto();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root).map_err(|e| format!("root certificate: {e}"))?;
        let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
        let name = ServerName::try_from(server_name.to_string()).map_err(|e| format!("server name: {e}"))?;
        let tls = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| format!("TLS client: {e}"))?;
        let tcp = match std::mem::replace(&mut self.conn, Conn::Gone) {
            Conn::Plain(tcp) => tcp,
            other => {
                self.conn = other;
                return Err("the connection is already TLS".into());
            }
        };
        let _ = tcp.set_read_timeout(Some(self.timeout));
        let mut stream = rustls::StreamOwned::new(tls, tcp);
        let mut result = Ok(());
        while stream.conn.is_handshaking() {
            if let Err(e) = stream.conn.complete_io(&mut stream.sock) {
                result = Err(e.to_string());
                break;
            }
        }
        self.conn = Conn::Tls(Box::new(stream));
        match &result {
            Ok(()) => self.note("TLS established"),
            Err(e) => self.note(&format!("TLS handshake failed: {e}")),
        }
        result
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.conn, Conn::Tls(_))
    }

    /// Closes the sending side (the server sees end of stream).
    pub fn shutdown_write(&mut self) {
        self.note("client closes its sending side");
        let _ = self.conn.tcp().shutdown(Shutdown::Write);
    }
}

/// What a test sent, one display line per line: CRLF is implied, a bare LF is shown as `\n`,
/// other control bytes escaped, long lines shortened.
fn display_lines(bytes: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let (line, end) = match rest.iter().position(|&b| b == b'\n') {
            Some(pos) => {
                let piece = &rest[..pos];
                rest = &rest[pos + 1..];
                match piece.strip_suffix(b"\r") {
                    Some(line) => (line, ""),
                    None => (piece, "\\n (bare LF)"),
                }
            }
            None => {
                let piece = rest;
                rest = &[];
                (piece, " (no line end)")
            }
        };
        let text: String = line.escape_ascii().to_string();
        out.push(format!("{}{end}", shorten(&text)));
    }
    out
}

fn shorten(s: &str) -> String {
    const KEEP: usize = 100;
    if s.len() <= KEEP + 20 {
        return s.to_string();
    }
    let mut cut = KEEP;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}... [{} bytes in all]", &s[..cut], s.len())
}

/// Sends one message over SMTP from `sender@example.com` to `hook@example.com` on a connection
/// of its own; panics (with the dialogue) unless it is accepted. Returns the spool id of the
/// `250 ... queued as ID` reply.
pub fn send_message(addr: SocketAddr, raw: &[u8]) -> String {
    let mut c = SmtpClient::connect(addr);
    c.hello("EHLO", "client.example");
    c.expect("MAIL FROM:<sender@example.com>", &["250"]);
    c.expect("RCPT TO:<hook@example.com>", &["250"]);
    let reply = c.data(raw);
    assert_eq!(reply.code, 250, "{}", c.transcript());
    let _ = c.cmd("QUIT");
    reply.text().rsplit(' ').next().unwrap_or_default().to_string()
}

//! [`SmtpSink`]: a local plain-SMTP server (no TLS) that receives what an email-hook destination
//! sends, and [`json_ld`] to read the payload back out of the HTML body.
//!
//! It speaks enough RFC 5321 for lettre's async client: 220 greeting, EHLO (multi-line 250 with
//! `8BITMIME`, `SMTPUTF8`, `SIZE`, `PIPELINING`, and `AUTH PLAIN LOGIN` when credentials are
//! configured; never STARTTLS), HELO, MAIL FROM, RCPT TO, DATA (dot-unstuffed, ended by `.`),
//! RSET, NOOP, QUIT and AUTH. Anything else is answered 500. Pipelined commands work: each line
//! is answered in order.

use super::{Background, poll_until, poll_until_async};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::Value;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Longest command line accepted (RFC 5321 says 512; leave room for long parameters).
const MAX_LINE: usize = 8192;

#[derive(Debug, Clone)]
pub struct SmtpOptions {
    /// `(user, password)`: advertise `AUTH PLAIN LOGIN`, require AUTH before MAIL (530 otherwise).
    pub auth: Option<(String, String)>,
    /// Advertised in `SIZE`; a message over it is answered 552 at the end of DATA.
    pub max_size: usize,
}

impl Default for SmtpOptions {
    fn default() -> Self {
        SmtpOptions { auth: None, max_size: 50 * 1024 * 1024 }
    }
}

/// One message transaction that reached the end of DATA.
#[derive(Debug, Clone)]
pub struct Message {
    /// When the final `.` arrived.
    pub at: Instant,
    /// The reverse path from `MAIL FROM:<…>`, without angle brackets (empty for `<>`).
    pub mail_from: String,
    /// Every accepted `RCPT TO:<…>`, without angle brackets.
    pub rcpt: Vec<String>,
    /// The message as received, dot-unstuffed, with its line endings (normally CRLF).
    pub data: Vec<u8>,
    /// The user that authenticated on this connection, if any.
    pub auth_user: Option<String>,
    /// The reply code given at the end of DATA.
    pub reply: u16,
}

impl Message {
    /// The message parsed by mailhook's own parser.
    pub fn email(&self) -> mailhook::model::Email {
        mailhook::parse::parse(&self.data)
    }

    /// The `data-kustomer-key` and the JSON-LD payload in the HTML body (see [`json_ld`]).
    pub fn json_ld(&self) -> Option<(String, Value)> {
        json_ld(&self.data)
    }

    pub fn summary(&self) -> String {
        format!(
            "{} from <{}> to {:?}, {} bytes, auth {:?}",
            self.reply,
            self.mail_from,
            self.rcpt,
            self.data.len(),
            self.auth_user
        )
    }
}

struct Shared {
    opts: SmtpOptions,
    accepted: Mutex<Vec<Message>>,
    rejected: Mutex<Vec<Message>>,
    data_replies: Mutex<VecDeque<(u16, String)>>,
    /// Answer for every DATA while set (after the one-off replies queued).
    data_reply: Mutex<Option<(u16, String)>>,
    drop_connections: AtomicBool,
    connections: AtomicUsize,
}

/// A plain SMTP server on `127.0.0.1:<ephemeral port>`; stops when dropped.
pub struct SmtpSink {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _background: Background,
}

impl SmtpSink {
    pub fn start(opts: SmtpOptions) -> SmtpSink {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind SMTP sink on 127.0.0.1:0");
        let addr = listener.local_addr().expect("SMTP sink address");
        let shared = Arc::new(Shared {
            opts,
            accepted: Mutex::new(Vec::new()),
            rejected: Mutex::new(Vec::new()),
            data_replies: Mutex::new(VecDeque::new()),
            data_reply: Mutex::new(None),
            drop_connections: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
        });
        let state = shared.clone();
        let background = Background::spawn(format!("smtp-sink-{}", addr.port()), listener, move |l| async move {
            loop {
                let Ok((stream, _)) = l.accept().await else {
                    continue;
                };
                state.connections.fetch_add(1, Ordering::SeqCst);
                if state.drop_connections.load(Ordering::SeqCst) {
                    drop(stream);
                    continue;
                }
                let state = state.clone();
                tokio::spawn(async move {
                    let _ = session(stream, state).await;
                });
            }
        });
        SmtpSink { addr, shared, _background: background }
    }

    /// A sink that requires AUTH with these credentials.
    pub fn with_auth(user: &str, pass: &str) -> SmtpSink {
        SmtpSink::start(SmtpOptions { auth: Some((user.to_string(), pass.to_string())), ..SmtpOptions::default() })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `smtp://127.0.0.1:PORT`, the form mailhook's `relay` setting takes.
    pub fn relay_url(&self) -> String {
        format!("smtp://{}", self.addr)
    }

    /// Queues a one-off reply for the end of the next DATA (e.g. `451` temporary, `554` permanent).
    /// A message answered with a non-2xx code goes to [`SmtpSink::rejected`], not `messages`.
    pub fn push_data_reply(&self, code: u16, text: &str) {
        self.shared.data_replies.lock().unwrap().push_back((code, text.to_string()));
    }

    /// While set, every DATA is answered with `code` and `text` (once the one-off replies of
    /// [`SmtpSink::push_data_reply`] are used up), like a relay refusing mail for a while;
    /// `None` goes back to accepting.
    pub fn set_data_reply(&self, reply: Option<(u16, &str)>) {
        *self.shared.data_reply.lock().unwrap() = reply.map(|(code, text)| (code, text.to_string()));
    }

    /// While on, every new connection is closed right after it is accepted (no greeting), and
    /// every open session is closed when its next command line (or the end of its DATA) arrives,
    /// without an answer: a relay that crashes or drops its connections.
    pub fn set_drop_connections(&self, drop: bool) {
        self.shared.drop_connections.store(drop, Ordering::SeqCst);
    }

    /// How many TCP connections were accepted so far (dropped ones included).
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Messages accepted (2xx at the end of DATA), in order.
    pub fn messages(&self) -> Vec<Message> {
        self.shared.accepted.lock().unwrap().clone()
    }

    /// Messages that got a scripted non-2xx reply or were over `max_size`.
    pub fn rejected(&self) -> Vec<Message> {
        self.shared.rejected.lock().unwrap().clone()
    }

    /// Waits (blocking this thread) until at least `n` messages were accepted; returns them all.
    /// Panics after `timeout`, describing what did arrive.
    pub fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<Message> {
        poll_until(timeout, || self.messages_if(n)).unwrap_or_else(|| self.fail_wait(n, timeout))
    }

    /// Like [`SmtpSink::wait_for_messages`], but yields to the caller's tokio runtime while waiting.
    pub async fn wait_for_messages_async(&self, n: usize, timeout: Duration) -> Vec<Message> {
        match poll_until_async(timeout, || self.messages_if(n)).await {
            Some(v) => v,
            None => self.fail_wait(n, timeout),
        }
    }

    fn messages_if(&self, n: usize) -> Option<Vec<Message>> {
        let messages = self.messages();
        (messages.len() >= n).then_some(messages)
    }

    fn fail_wait(&self, n: usize, timeout: Duration) -> ! {
        let accepted = self.messages();
        let rejected = self.rejected();
        let mut msg = format!(
            "SMTP sink {}: expected {n} message(s) within {timeout:?}; {} accepted, {} rejected, {} connection(s)",
            self.addr,
            accepted.len(),
            rejected.len(),
            self.connections()
        );
        for (i, m) in accepted.iter().enumerate() {
            let _ = write!(msg, "\n  accepted #{i}: {}", m.summary());
        }
        for (i, m) in rejected.iter().enumerate() {
            let _ = write!(msg, "\n  rejected #{i}: {}", m.summary());
        }
        panic!("{msg}");
    }
}

/// Reads one line (up to and including `\n`); `None` at end of stream. Over-long lines are cut.
async fn read_line<R: AsyncRead + Unpin>(r: &mut BufReader<R>, limit: usize) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Ok(if line.is_empty() { None } else { Some(line) });
        }
        let (used, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        let room = limit.saturating_sub(line.len());
        line.extend_from_slice(&buf[..used.min(room)]);
        r.consume(used);
        if done {
            return Ok(Some(line));
        }
    }
}

fn trim_eol(line: &[u8]) -> String {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    String::from_utf8_lossy(line).into_owned()
}

/// `FROM:<a@b> PARAMS` / `TO:<a@b>` → `a@b`. `None` when the prefix or the brackets are missing.
fn path_arg(arg: &str, prefix: &str) -> Option<String> {
    let head = arg.get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(prefix) {
        return None;
    }
    let rest = arg[prefix.len()..].trim_start();
    let rest = rest.strip_prefix('<')?;
    let end = rest.find('>')?;
    Some(rest[..end].to_string())
}

fn decode_b64(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if s == "=" {
        return Some(Vec::new());
    }
    BASE64.decode(s).ok()
}

async fn session(stream: TcpStream, shared: Arc<Shared>) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    w.write_all(b"220 127.0.0.1 ESMTP mailhook test sink\r\n").await?;

    let mut auth_user: Option<String> = None;
    let mut mail_from: Option<String> = None;
    let mut rcpt: Vec<String> = Vec::new();

    loop {
        let Some(raw) = read_line(&mut r, MAX_LINE).await? else {
            return Ok(());
        };
        if shared.drop_connections.load(Ordering::SeqCst) {
            return Ok(());
        }
        let line = trim_eol(&raw);
        let (verb, arg) = match line.split_once(' ') {
            Some((v, a)) => (v.to_ascii_uppercase(), a.trim().to_string()),
            None => (line.trim().to_ascii_uppercase(), String::new()),
        };
        let reply: String = match verb.as_str() {
            "EHLO" => {
                mail_from = None;
                rcpt.clear();
                let mut s = String::from("250-127.0.0.1 greets you\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n");
                let _ = write!(s, "250-SIZE {}\r\n", shared.opts.max_size);
                if shared.opts.auth.is_some() {
                    s.push_str("250-AUTH PLAIN LOGIN\r\n");
                }
                s.push_str("250 PIPELINING\r\n");
                s
            }
            "HELO" => {
                mail_from = None;
                rcpt.clear();
                "250 127.0.0.1\r\n".into()
            }
            "AUTH" => auth(&shared, &arg, &mut auth_user, &mut r, &mut w).await?,
            "MAIL" => {
                if shared.opts.auth.is_some() && auth_user.is_none() {
                    "530 5.7.0 Authentication required\r\n".into()
                } else if mail_from.is_some() {
                    "503 5.5.1 Nested MAIL command\r\n".into()
                } else if let Some(from) = path_arg(&arg, "FROM:") {
                    mail_from = Some(from);
                    "250 2.1.0 OK\r\n".into()
                } else {
                    "501 5.5.4 Syntax: MAIL FROM:<address>\r\n".into()
                }
            }
            "RCPT" => {
                if mail_from.is_none() {
                    "503 5.5.1 Need MAIL before RCPT\r\n".into()
                } else if let Some(to) = path_arg(&arg, "TO:") {
                    rcpt.push(to);
                    "250 2.1.5 OK\r\n".into()
                } else {
                    "501 5.5.4 Syntax: RCPT TO:<address>\r\n".into()
                }
            }
            "DATA" => {
                if mail_from.is_none() || rcpt.is_empty() {
                    "503 5.5.1 Need MAIL and RCPT before DATA\r\n".into()
                } else {
                    w.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n").await?;
                    let Some((data, too_big)) = read_data(&mut r, shared.opts.max_size).await? else {
                        return Ok(());
                    };
                    if shared.drop_connections.load(Ordering::SeqCst) {
                        return Ok(());
                    }
                    let (code, text) = if too_big {
                        (552, "5.3.4 Message too big".to_string())
                    } else {
                        let scripted = shared.data_replies.lock().unwrap().pop_front();
                        let standing = || shared.data_reply.lock().unwrap().clone();
                        scripted.or_else(standing).unwrap_or_else(|| (250, "2.0.0 OK: queued".to_string()))
                    };
                    let message = Message {
                        at: Instant::now(),
                        mail_from: mail_from.take().unwrap_or_default(),
                        rcpt: std::mem::take(&mut rcpt),
                        data,
                        auth_user: auth_user.clone(),
                        reply: code,
                    };
                    if (200..300).contains(&code) {
                        shared.accepted.lock().unwrap().push(message);
                    } else {
                        shared.rejected.lock().unwrap().push(message);
                    }
                    format!("{code} {text}\r\n")
                }
            }
            "RSET" => {
                mail_from = None;
                rcpt.clear();
                "250 2.0.0 OK\r\n".into()
            }
            "NOOP" => "250 2.0.0 OK\r\n".into(),
            "QUIT" => {
                w.write_all(b"221 2.0.0 Bye\r\n").await?;
                let _ = w.shutdown().await;
                return Ok(());
            }
            _ => "500 5.5.2 Command not recognized\r\n".into(),
        };
        w.write_all(reply.as_bytes()).await?;
    }
}

/// Reads DATA lines up to the lone `.`, undoing dot-stuffing. `None` if the client went away.
/// The flag says the message went over `max_size` (its bytes past that are dropped).
async fn read_data<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
    max_size: usize,
) -> std::io::Result<Option<(Vec<u8>, bool)>> {
    let mut data = Vec::new();
    let mut too_big = false;
    loop {
        let Some(line) = read_line(r, usize::MAX).await? else {
            return Ok(None);
        };
        if line == b".\r\n" || line == b".\n" {
            return Ok(Some((data, too_big)));
        }
        let line = line.strip_prefix(b".").unwrap_or(&line);
        if data.len() + line.len() > max_size {
            too_big = true;
        } else {
            data.extend_from_slice(line);
        }
    }
}

async fn auth<R: AsyncRead + Unpin>(
    shared: &Shared,
    arg: &str,
    auth_user: &mut Option<String>,
    r: &mut BufReader<R>,
    w: &mut tokio::net::tcp::OwnedWriteHalf,
) -> std::io::Result<String> {
    let Some((user, pass)) = &shared.opts.auth else {
        return Ok("503 5.5.1 AUTH not available\r\n".into());
    };
    if auth_user.is_some() {
        return Ok("503 5.5.1 Already authenticated\r\n".into());
    }
    let (mechanism, initial) = match arg.split_once(' ') {
        Some((m, i)) => (m.to_ascii_uppercase(), Some(i.trim().to_string())),
        None => (arg.to_ascii_uppercase(), None),
    };

    // Sends a 334 challenge and reads the answer; `None` when the client cancels with `*`.
    async fn challenge<R: AsyncRead + Unpin>(
        prompt: &str,
        r: &mut BufReader<R>,
        w: &mut tokio::net::tcp::OwnedWriteHalf,
    ) -> std::io::Result<Option<String>> {
        w.write_all(format!("334 {prompt}\r\n").as_bytes()).await?;
        let line = read_line(r, MAX_LINE).await?.map(|l| trim_eol(&l)).unwrap_or_default();
        Ok((line.trim() != "*").then_some(line))
    }

    let given: Option<(String, String)> = match mechanism.as_str() {
        "PLAIN" => {
            let response = match initial {
                Some(i) => i,
                None => match challenge("", r, w).await? {
                    Some(l) => l,
                    None => return Ok("501 5.7.0 Authentication cancelled\r\n".into()),
                },
            };
            let Some(decoded) = decode_b64(&response) else {
                return Ok("501 5.5.2 Cannot decode response\r\n".into());
            };
            let parts: Vec<&[u8]> = decoded.split(|&b| b == 0).collect();
            match parts.as_slice() {
                [_authz, user, pass] => {
                    Some((String::from_utf8_lossy(user).into_owned(), String::from_utf8_lossy(pass).into_owned()))
                }
                _ => None,
            }
        }
        "LOGIN" => {
            let user_b64 = match initial {
                Some(i) => i,
                None => match challenge("VXNlcm5hbWU6", r, w).await? {
                    Some(l) => l,
                    None => return Ok("501 5.7.0 Authentication cancelled\r\n".into()),
                },
            };
            let Some(pass_b64) = challenge("UGFzc3dvcmQ6", r, w).await? else {
                return Ok("501 5.7.0 Authentication cancelled\r\n".into());
            };
            match (decode_b64(&user_b64), decode_b64(&pass_b64)) {
                (Some(u), Some(p)) => {
                    Some((String::from_utf8_lossy(&u).into_owned(), String::from_utf8_lossy(&p).into_owned()))
                }
                _ => return Ok("501 5.5.2 Cannot decode response\r\n".into()),
            }
        }
        _ => return Ok("504 5.5.4 Unrecognized authentication type\r\n".into()),
    };
    match given {
        Some((u, p)) if &u == user && &p == pass => {
            *auth_user = Some(u);
            Ok("235 2.7.0 Authentication successful\r\n".into())
        }
        _ => Ok("535 5.7.8 Authentication credentials invalid\r\n".into()),
    }
}

/// Finds `<script type="application/ld+json" data-kustomer-key="KEY">…</script>` in the decoded
/// HTML body of `raw` (parsed with `mailhook::parse::parse`) and returns the key and the JSON.
/// Attributes may come in any order and with either quote; the JSON may hold `<\/` escapes.
/// `None` when there is no such tag or its content is not JSON.
pub fn json_ld(raw: &[u8]) -> Option<(String, Value)> {
    json_ld_in_html(&mailhook::parse::parse(raw).html)
}

/// [`json_ld`] on an HTML document rather than a whole email.
pub fn json_ld_in_html(html: &str) -> Option<(String, Value)> {
    static SCRIPT: OnceLock<regex::Regex> = OnceLock::new();
    static ATTR: OnceLock<regex::Regex> = OnceLock::new();
    let script = SCRIPT
        .get_or_init(|| regex::Regex::new(r#"(?is)<script\b((?:[^>"']|"[^"]*"|'[^']*')*)>(.*?)</script\s*>"#).unwrap());
    let attr = ATTR
        .get_or_init(|| regex::Regex::new(r#"([^\s=/>"']+)(?:\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]+)))?"#).unwrap());
    for caps in script.captures_iter(html) {
        let mut kind = None;
        let mut key = None;
        for a in attr.captures_iter(&caps[1]) {
            let value = a.get(2).or(a.get(3)).or(a.get(4)).map_or("", |m| m.as_str());
            let name = a[1].to_ascii_lowercase();
            if name == "type" {
                kind = Some(unescape_attr(value));
            } else if name == "data-kustomer-key" {
                key = Some(unescape_attr(value));
            }
        }
        let is_ld = kind.is_some_and(|t| t.trim().eq_ignore_ascii_case("application/ld+json"));
        if let (true, Some(key)) = (is_ld, key)
            && let Ok(json) = serde_json::from_str::<Value>(caps[2].trim())
        {
            return Some((key, json));
        }
    }
    None
}

fn unescape_attr(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&apos;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

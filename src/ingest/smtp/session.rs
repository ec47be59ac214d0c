//! One SMTP or LMTP session: a state machine of our own over any `AsyncRead + AsyncWrite`
//! stream (a TCP socket, a TLS stream, or an in-memory duplex in tests), with `smtp-proto`
//! parsing the commands and un-stuffing the DATA stream.
//!
//! Replies are queued and written when the client has nothing more pipelined, so a whole
//! pipelined transaction gets its replies in one write. The message body streams into a spool
//! draft as it arrives (a big one is never held whole in memory: past 1 MiB the draft spills to
//! a file); `250` is sent only after the spool has committed it to disk.

use super::{Conn, SessionConfig};
use crate::model::{Envelope, Source};
use crate::spool::{Draft, Spool};
use crate::spool::{Fresh, Inbox};
use base64::Engine;
use smtp_proto::request::receiver::{BdatReceiver, DataReceiver};
use smtp_proto::{Error as ProtoError, Request};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

/// Longest command line, CRLF included (RFC 5321 4.5.3.1.4).
const MAX_COMMAND_LINE: usize = 1000;
/// Longest text line, CRLF included (RFC 5321 4.5.3.1.6).
const MAX_TEXT_LINE: usize = 1000;
/// Bad commands tolerated before the session is closed.
const MAX_ERRORS: usize = 20;
const READ_CHUNK: usize = 64 * 1024;
/// What a read reserves between commands: a command line and some pipelined ones. A body is
/// read in [`READ_CHUNK`]s; an idle session holds no more than this.
const COMMAND_CHUNK: usize = 4 * 1024;
/// Replies queued past this size are written out before more pipelined commands are handled,
/// so a client that sends commands without reading the replies cannot make them pile up.
const MAX_PENDING_REPLIES: usize = 16 * 1024;
/// Messages up to this size are also kept in memory and handed to the pipeline with their id.
const KEEP_COPY: usize = 64 * 1024;

/// How a session ended (for logs and tests).
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    Quit,
    Closed,
    Timeout,
    TooManyErrors,
    /// `auth.max_failures` failed AUTH attempts in this session.
    TooManyAuthFailures,
    /// The client's address failed AUTH too often in the last minute.
    AuthBlocked,
    Shutdown,
}

/// The transaction being built.
#[derive(Default)]
struct Transaction {
    mail_from: Option<String>,
    recipients: Vec<String>,
    /// A BDAT sequence in progress.
    bdat: Option<Body>,
}

/// A message body being received.
struct Body {
    draft: Option<Draft>,
    /// A copy of a small message, handed to the pipeline with it (no read back from disk).
    copy: Option<Vec<u8>>,
    size: usize,
    /// Length of the text line being received (DATA); `None` for BDAT, whose chunks are
    /// binary-clean: long lines are the client's business.
    line_len: Option<usize>,
    /// Why it will be refused at the end, if it will.
    refused: Option<&'static str>,
}

impl Body {
    /// A body for DATA (`text`: the line length limit applies) or BDAT.
    fn new(spool: &Spool, text: bool) -> Body {
        let line_len = text.then_some(0);
        match spool.draft() {
            Ok(draft) => Body { draft: Some(draft), copy: Some(Vec::new()), size: 0, line_len, refused: None },
            Err(e) => {
                error!(error = %e, "cannot start a spool draft; answering 451");
                Body { draft: None, copy: None, size: 0, line_len, refused: Some(REFUSE_SPOOL) }
            }
        }
    }

    /// Takes decoded body bytes: checks the limits, writes them to the draft.
    fn push(&mut self, bytes: &[u8], max_size: usize) {
        self.size += bytes.len();
        if self.refused.is_some() {
            return;
        }
        if self.size > max_size {
            self.refuse(REFUSE_SIZE);
            return;
        }
        if let Some(line_len) = &mut self.line_len {
            let mut too_long = false;
            for &b in bytes {
                if b == b'\n' {
                    *line_len = 0;
                } else {
                    *line_len += 1;
                    // 998 octets of text and the CR of the CRLF.
                    if *line_len > MAX_TEXT_LINE - 1 {
                        too_long = true;
                        break;
                    }
                }
            }
            if too_long {
                self.refuse(REFUSE_LINE);
                return;
            }
        }
        match &mut self.copy {
            Some(copy) if self.size <= KEEP_COPY => copy.extend_from_slice(bytes),
            _ => self.copy = None,
        }
        if let Some(d) = &mut self.draft
            && let Err(e) = d.write_all(bytes)
        {
            error!(error = %e, "cannot write to the spool; answering 451");
            self.refuse(REFUSE_SPOOL);
        }
    }

    fn refuse(&mut self, why: &'static str) {
        self.refused = Some(why);
        self.copy = None;
        self.draft = None; // dropping a draft deletes it: nothing half-written stays
    }
}

const REFUSE_SIZE: &str = "552 5.3.4 Message size exceeds the fixed maximum";
const REFUSE_LINE: &str = "500 5.5.2 Line too long";
const REFUSE_SPOOL: &str = "451 4.3.0 Cannot store the message now, try again later";

/// The metrics reason of a refusal at the end of a message.
fn refusal_reason(reply: &str) -> &'static str {
    match reply {
        REFUSE_SIZE => "too_big",
        REFUSE_LINE => "line_too_long",
        REFUSE_SPOOL => "spool_unavailable",
        _ => "bad_sequence",
    }
}

enum Phase {
    Command,
    /// AUTH continuation: the next line is a response, not a command.
    AuthPlain,
    AuthLoginUser,
    AuthLoginPass(String),
}

pub struct Session<S> {
    cfg: Arc<SessionConfig>,
    spool: Spool,
    inbox: Arc<Inbox>,
    shutdown: watch::Receiver<bool>,
    conn: Conn<S>,
    peer: SocketAddr,
    buf: Vec<u8>,
    out: Vec<u8>,
    helo: Option<String>,
    tls: bool,
    auth_user: Option<String>,
    tx: Transaction,
    phase: Phase,
    errors: usize,
    auth_failures: usize,
    /// How long to wait before answering the last failed AUTH.
    auth_delay: Option<Duration>,
    /// Discarding the rest of an over-long command line.
    skipping_line: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Session<S> {
    pub fn new(
        cfg: Arc<SessionConfig>,
        spool: Spool,
        inbox: Arc<Inbox>,
        shutdown: watch::Receiver<bool>,
        stream: S,
        peer: SocketAddr,
    ) -> Session<S> {
        Session {
            cfg,
            spool,
            inbox,
            shutdown,
            conn: Conn::Plain(stream),
            peer,
            buf: Vec::with_capacity(4096),
            out: Vec::with_capacity(1024),
            helo: None,
            tls: false,
            auth_user: None,
            tx: Transaction::default(),
            phase: Phase::Command,
            errors: 0,
            auth_failures: 0,
            auth_delay: None,
            skipping_line: false,
        }
    }

    fn reply(&mut self, line: &str) {
        self.out.extend_from_slice(line.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    /// Writes the queued replies. A client that does not take them within the command
    /// timeout is given up on (the replies are dropped, the connection is to be closed), so a
    /// client that never reads cannot hold a session open.
    async fn flush(&mut self) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let (conn, out) = (&mut self.conn, &self.out);
        let write = async {
            conn.write_all(out).await?;
            conn.flush().await
        };
        let result = match tokio::time::timeout(self.cfg.command_timeout, write).await {
            Ok(result) => result,
            Err(_) => {
                debug!(peer = %self.peer, "the client does not read its replies: closing");
                Err(std::io::ErrorKind::TimedOut.into())
            }
        };
        self.out.clear();
        result
    }

    /// Reads more bytes into `buf` (reserving `chunk`), unless `deadline` passes first;
    /// `Ok(0)` at end of stream. A deadline, not a timeout per read: a client that sends a byte
    /// now and then does not earn more time.
    async fn fill(&mut self, deadline: Instant, chunk: usize) -> Result<usize, End> {
        // Read straight into the spare capacity: no zeroing of a buffer per read.
        self.buf.reserve(chunk);
        match tokio::time::timeout_at(deadline, self.conn.read_buf(&mut self.buf)).await {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(_)) => Ok(0),
            Err(_) => Err(End::Timeout),
        }
    }

    /// The deadline of a body that started at `start` and has `received` bytes so far:
    /// `data_timeout`, plus a second per `min_data_rate` bytes.
    fn body_deadline(&self, start: Instant, received: usize) -> Instant {
        start + self.cfg.data_timeout + Duration::from_secs_f64(received as f64 / self.cfg.min_data_rate as f64)
    }

    /// Runs the session to its end.
    pub async fn run(mut self) -> End {
        let greeting =
            format!("220 {} {} mailhook ready", self.cfg.hostname, if self.cfg.lmtp { "LMTP" } else { "ESMTP" });
        self.reply(&greeting);
        let end = match self.serve().await {
            Ok(end) | Err(end) => end,
        };
        match end {
            End::Timeout => {
                self.cfg.rejected("timeout");
                self.reply("421 4.4.2 Timeout: closing connection")
            }
            End::TooManyErrors => {
                self.cfg.rejected("too_many_errors");
                self.reply("421 4.7.0 Too many errors: closing connection")
            }
            End::Shutdown => {
                self.cfg.rejected("shutting_down");
                self.reply("421 4.3.2 Service shutting down, try again later")
            }
            End::TooManyAuthFailures => {
                info!(peer = %self.peer, failures = self.auth_failures, "too many authentication failures: closing");
                self.reply("421 4.7.0 Too many authentication failures: closing connection")
            }
            End::AuthBlocked => {
                self.cfg.rejected("auth_blocked");
                self.reply("421 4.7.0 Too many authentication failures from your address, try again later")
            }
            End::Quit | End::Closed => {}
        }
        let _ = self.flush().await;
        // A TLS close writes too: bounded like every other write.
        let _ = tokio::time::timeout(self.cfg.command_timeout, self.conn.shutdown()).await;
        debug!(peer = %self.peer, end = ?end, "session ended");
        end
    }

    async fn serve(&mut self) -> Result<End, End> {
        // A command line must arrive whole by this time, however slowly it trickles in.
        let mut deadline = Instant::now() + self.cfg.command_timeout;
        loop {
            // Handle every complete line already buffered (pipelining), then flush and read.
            if self.out.len() >= MAX_PENDING_REPLIES {
                self.flush().await.map_err(|_| End::Closed)?;
            }
            let Some(pos) = self.buf.iter().position(|&b| b == b'\n') else {
                if self.skipping_line || self.buf.len() >= MAX_COMMAND_LINE {
                    // An over-long line: drop what we have, keep dropping up to its end.
                    self.skipping_line = true;
                    self.buf.clear();
                }
                self.flush().await.map_err(|_| End::Closed)?;
                if *self.shutdown.borrow() && self.tx.mail_from.is_none() {
                    return Err(End::Shutdown);
                }
                let mut shutdown = self.shutdown.clone();
                tokio::select! {
                    more = self.fill(deadline, COMMAND_CHUNK) => if more? == 0 { return Ok(End::Closed) },
                    _ = shutdown.changed(), if self.tx.mail_from.is_none() => return Err(End::Shutdown),
                }
                continue;
            };
            let line: Vec<u8> = self.buf.drain(..=pos).collect();
            if self.skipping_line {
                self.skipping_line = false;
                self.cfg.rejected("line_too_long");
                self.reply("500 5.5.2 Line too long");
                self.error()?;
                continue;
            }
            if line.len() > MAX_COMMAND_LINE {
                self.cfg.rejected("line_too_long");
                self.reply("500 5.5.2 Line too long");
                self.error()?;
                continue;
            }
            match std::mem::replace(&mut self.phase, Phase::Command) {
                Phase::Command => {
                    if let Some(end) = self.command(&line).await? {
                        return Ok(end);
                    }
                }
                Phase::AuthPlain => self.auth_plain(trim_line(&line)),
                Phase::AuthLoginUser => self.auth_login_user(trim_line(&line)),
                Phase::AuthLoginPass(user) => self.auth_login_pass(user, trim_line(&line)),
            }
            if let Some(delay) = self.auth_delay.take() {
                // Each failure costs the guesser more time (Postfix's smtpd_error_sleep_time).
                self.flush_after(delay).await?;
                if self.auth_failures >= self.cfg.auth_max_failures {
                    return Err(End::TooManyAuthFailures);
                }
                if self.cfg.clients.blocked(self.peer.ip(), self.cfg.auth_failures_per_minute) {
                    return Err(End::AuthBlocked);
                }
            }
            deadline = Instant::now() + self.cfg.command_timeout;
        }
    }

    /// Waits `delay`, then writes the replies queued (a failed AUTH's `535`).
    async fn flush_after(&mut self, delay: Duration) -> Result<(), End> {
        tokio::time::sleep(delay).await;
        self.flush().await.map_err(|_| End::Closed)
    }

    fn error(&mut self) -> Result<(), End> {
        self.errors += 1;
        if self.errors >= MAX_ERRORS { Err(End::TooManyErrors) } else { Ok(()) }
    }

    async fn command(&mut self, line: &[u8]) -> Result<Option<End>, End> {
        let request = match Request::parse(&mut line.iter()) {
            Ok(r) => r.into_owned(),
            Err(e) => {
                let reply = match e {
                    ProtoError::UnknownCommand => "500 5.5.1 Unrecognized command",
                    ProtoError::InvalidSenderAddress => "501 5.1.7 Bad sender address syntax",
                    ProtoError::InvalidRecipientAddress => "501 5.1.3 Bad recipient address syntax",
                    ProtoError::UnsupportedParameter { .. } => "555 5.5.4 Unsupported parameter",
                    ProtoError::InvalidParameter { .. } => "501 5.5.4 Invalid parameter",
                    ProtoError::ResponseTooLong => "500 5.5.2 Line too long",
                    _ => "501 5.5.2 Syntax error",
                };
                self.reply(reply);
                self.error()?;
                return Ok(None);
            }
        };
        match request {
            Request::Ehlo { host } if !self.cfg.lmtp => self.ehlo(host, true),
            Request::Lhlo { host } if self.cfg.lmtp => self.ehlo(host, true),
            Request::Helo { host } if !self.cfg.lmtp => self.ehlo(host, false),
            Request::Ehlo { .. } | Request::Helo { .. } | Request::Lhlo { .. } => {
                self.reply(if self.cfg.lmtp {
                    "500 5.5.1 This is an LMTP server: use LHLO"
                } else {
                    "500 5.5.1 Unrecognized command"
                });
                self.error()?;
            }
            Request::Mail { from } => self.mail(from.address, from.size)?,
            // The parser gives `<postmaster>` (RFC 5321 4.5.1: no domain) as an empty address.
            Request::Rcpt { to } if to.address.is_empty() && is_postmaster_rcpt(line) => {
                self.rcpt("postmaster".into())?
            }
            Request::Rcpt { to } => self.rcpt(quoted_path(line).unwrap_or(to.address))?,
            Request::Data => return self.data().await.map(|()| None),
            Request::Bdat { chunk_size, is_last } => return self.bdat(chunk_size, is_last).await.map(|()| None),
            Request::Rset => {
                self.tx = Transaction::default();
                self.reply("250 2.0.0 Ok");
            }
            Request::Noop { .. } => self.reply("250 2.0.0 Ok"),
            Request::Vrfy { .. } => {
                self.reply("252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery")
            }
            Request::Expn { .. } => self.reply("502 5.5.1 EXPN not available"),
            Request::Help { .. } => self.reply("214 2.0.0 mailhook: see https://www.rfc-editor.org/rfc/rfc5321"),
            Request::Quit => {
                self.reply("221 2.0.0 Bye");
                return Ok(Some(End::Quit));
            }
            Request::StartTls => return self.starttls().await.map(|()| None),
            Request::Auth { mechanism, initial_response } => self.auth(mechanism, initial_response)?,
            Request::Etrn { .. } | Request::Atrn { .. } | Request::Burl { .. } => {
                self.reply("502 5.5.1 Command not implemented");
            }
        }
        Ok(None)
    }

    fn auth_offered(&self) -> bool {
        self.cfg.auth_users.is_some() && (self.tls || self.peer.ip().is_loopback())
    }

    fn ehlo(&mut self, host: String, extended: bool) {
        self.helo = Some(host);
        self.tx = Transaction::default();
        if !extended {
            let line = format!("250 {}", self.cfg.hostname);
            self.reply(&line);
            return;
        }
        let mut lines = vec![
            self.cfg.hostname.clone(),
            "PIPELINING".into(),
            format!("SIZE {}", self.cfg.max_size),
            "8BITMIME".into(),
            "SMTPUTF8".into(),
            "ENHANCEDSTATUSCODES".into(),
            "CHUNKING".into(),
        ];
        if self.cfg.tls.is_some() && !self.tls {
            lines.push("STARTTLS".into());
        }
        if self.auth_offered() && self.auth_user.is_none() {
            lines.push("AUTH PLAIN LOGIN".into());
        }
        let last = lines.len() - 1;
        for (i, l) in lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            let text = format!("250{sep}{l}");
            self.reply(&text);
        }
    }

    fn mail(&mut self, address: String, size: usize) -> Result<(), End> {
        if self.helo.is_none() {
            self.reply(if self.cfg.lmtp { "503 5.5.1 Send LHLO first" } else { "503 5.5.1 Send EHLO or HELO first" });
            return self.error();
        }
        if self.tx.mail_from.is_some() {
            self.reply("503 5.5.1 Nested MAIL command");
            return self.error();
        }
        if self.cfg.auth_required && self.auth_user.is_none() {
            self.cfg.rejected("auth_required");
            self.reply("530 5.7.0 Authentication required");
            return self.error();
        }
        if size > self.cfg.max_size {
            self.cfg.rejected("too_big");
            self.reply("552 5.3.4 Message size exceeds the fixed maximum");
            return Ok(());
        }
        self.tx.mail_from = Some(address);
        self.reply("250 2.1.0 Ok");
        Ok(())
    }

    fn rcpt(&mut self, address: String) -> Result<(), End> {
        if self.tx.mail_from.is_none() {
            self.reply("503 5.5.1 Need MAIL before RCPT");
            return self.error();
        }
        if address.is_empty() {
            // The null path is a sender, never a recipient.
            self.reply("501 5.1.3 Bad recipient address syntax");
            return self.error();
        }
        // RFC 5321 4.5.1: mail for the postmaster is always taken.
        let postmaster = address.eq_ignore_ascii_case("postmaster");
        if !postmaster && !self.cfg.recipients.is_empty() && !self.cfg.recipients.iter().any(|r| r.is_match(&address)) {
            debug!(peer = %self.peer, recipient = %address, "recipient refused");
            self.cfg.rejected("unknown_recipient");
            self.reply("550 5.1.1 Recipient address rejected: not a hook address here");
            return self.error();
        }
        if self.tx.recipients.len() >= self.cfg.max_recipients {
            self.cfg.rejected("too_many_recipients");
            self.reply("452 4.5.3 Too many recipients");
            return Ok(());
        }
        self.tx.recipients.push(address);
        self.reply("250 2.1.5 Ok");
        Ok(())
    }

    fn transaction_ready(&mut self) -> Result<bool, End> {
        if self.tx.mail_from.is_none() {
            self.reply("503 5.5.1 Need MAIL command");
            self.error()?;
            return Ok(false);
        }
        if self.tx.recipients.is_empty() {
            self.reply("503 5.5.1 Need RCPT command");
            self.error()?;
            return Ok(false);
        }
        Ok(true)
    }

    async fn data(&mut self) -> Result<(), End> {
        if self.tx.bdat.is_some() {
            self.reply("503 5.5.1 DATA cannot follow BDAT");
            return self.error();
        }
        if !self.transaction_ready()? {
            return Ok(());
        }
        self.reply("354 2.0.0 Start mail input; end with <CRLF>.<CRLF>");
        self.flush().await.map_err(|_| End::Closed)?;

        let mut body = Body::new(&self.spool, true);
        let start = Instant::now();
        let mut received = 0;
        let mut receiver = DataReceiver::new();
        let mut decoded = Vec::with_capacity(READ_CHUNK);
        loop {
            let mut iter = self.buf.iter();
            let done = receiver.ingest(&mut iter, &mut decoded);
            // Decoded bytes go to the draft and are dropped from memory; once the message is
            // refused (too big, line too long) they are only counted. The receiver takes the CR
            // of the final CRLF.CRLF back out of `decoded` only when the LF comes: a CR that
            // ends this read waits there for the next one.
            let settled = if !done && decoded.last() == Some(&b'\r') { decoded.len() - 1 } else { decoded.len() };
            body.push(&decoded[..settled], self.cfg.max_size);
            decoded.drain(..settled);
            let consumed = self.buf.len() - iter.as_slice().len();
            self.buf.drain(..consumed);
            if done {
                break;
            }
            match self.fill(self.body_deadline(start, received), READ_CHUNK).await? {
                0 => return Err(End::Closed),
                n => received += n,
            }
        }
        // The body's buffer is not kept for the commands that follow.
        self.buf.shrink_to(COMMAND_CHUNK);
        self.finish(body).await;
        Ok(())
    }

    async fn bdat(&mut self, chunk_size: usize, is_last: bool) -> Result<(), End> {
        let ready = self.tx.mail_from.is_some() && !self.tx.recipients.is_empty();
        let mut body = match self.tx.bdat.take() {
            Some(b) => b,
            None if ready => Body::new(&self.spool, false),
            None => {
                // The chunk still has to be read (and thrown away) to stay in sync.
                let mut body = Body {
                    draft: None,
                    copy: None,
                    size: 0,
                    line_len: None,
                    refused: Some("503 5.5.1 Need MAIL and RCPT"),
                };
                self.read_chunk(&mut body, chunk_size).await?;
                let _ = self.transaction_ready()?;
                return Ok(());
            }
        };
        self.read_chunk(&mut body, chunk_size).await?;
        if is_last {
            self.finish(body).await;
        } else {
            let text = format!("250 2.0.0 {chunk_size} octets received");
            self.reply(&text);
            self.tx.bdat = Some(body);
        }
        Ok(())
    }

    async fn read_chunk(&mut self, body: &mut Body, chunk_size: usize) -> Result<(), End> {
        let mut receiver = BdatReceiver::new(chunk_size, false);
        let mut decoded = Vec::with_capacity(READ_CHUNK.min(chunk_size.max(1)));
        if chunk_size == 0 {
            return Ok(());
        }
        let (start, mut received) = (Instant::now(), 0);
        loop {
            let mut iter = self.buf.iter();
            decoded.clear();
            let done = receiver.ingest(&mut iter, &mut decoded);
            let consumed = self.buf.len() - iter.as_slice().len();
            self.buf.drain(..consumed);
            body.push(&decoded, self.cfg.max_size);
            if done {
                self.buf.shrink_to(COMMAND_CHUNK);
                return Ok(());
            }
            match self.fill(self.body_deadline(start, received), READ_CHUNK).await? {
                0 => return Err(End::Closed),
                n => received += n,
            }
        }
    }

    /// End of a message: store it (or refuse it) and answer.
    async fn finish(&mut self, body: Body) {
        let tx = std::mem::take(&mut self.tx);
        let recipients = tx.recipients;
        let reply_each = |s: &mut Self, line: &str| {
            if s.cfg.lmtp {
                for _ in &recipients {
                    s.reply(line);
                }
            } else {
                s.reply(line);
            }
        };
        if let Some(why) = body.refused {
            info!(peer = %self.peer, size = body.size, reason = why, "message refused");
            self.cfg.rejected(refusal_reason(why));
            reply_each(self, why);
            return;
        }
        let Some(draft) = body.draft else {
            self.cfg.rejected(refusal_reason(REFUSE_SPOOL));
            reply_each(self, REFUSE_SPOOL);
            return;
        };
        let mut envelope = Envelope::new(if self.cfg.lmtp { Source::Lmtp } else { Source::Smtp });
        envelope.mail_from = tx.mail_from.filter(|a| !a.is_empty());
        envelope.recipients = recipients.clone();
        envelope.client = Some(self.peer.ip().to_string());
        envelope.helo = self.helo.clone();
        envelope.tls = self.tls;
        envelope.auth_user = self.auth_user.clone();
        match draft.commit(envelope).await {
            Ok(meta) => {
                let id = meta.id.clone();
                info!(id = %id, peer = %self.peer, size = body.size, recipients = recipients.len(), "accepted");
                self.inbox.push(Fresh { meta, raw: body.copy });
                if self.cfg.lmtp {
                    for r in &recipients {
                        let line = format!("250 2.1.5 <{r}> Ok: queued as {id}");
                        self.reply(&line);
                    }
                } else {
                    let line = format!("250 2.0.0 Ok: queued as {id}");
                    self.reply(&line);
                }
            }
            Err(e) => {
                error!(peer = %self.peer, error = %e, "cannot store the message; answered 451");
                self.cfg.rejected(refusal_reason(REFUSE_SPOOL));
                reply_each(self, REFUSE_SPOOL);
            }
        }
    }

    async fn starttls(&mut self) -> Result<(), End> {
        let Some(acceptor) = self.cfg.tls.clone() else {
            self.reply("502 5.5.1 STARTTLS not available");
            return self.error();
        };
        if self.tls {
            self.reply("503 5.5.1 TLS already active");
            return self.error();
        }
        self.reply("220 2.0.0 Ready to start TLS");
        self.flush().await.map_err(|_| End::Closed)?;
        // Anything pipelined after STARTTLS was sent in the clear: it must not count.
        self.buf.clear();
        let plain = match std::mem::replace(&mut self.conn, Conn::Closed) {
            Conn::Plain(s) => s,
            other => {
                self.conn = other;
                return Err(End::Closed);
            }
        };
        let handshake = tokio::time::timeout(self.cfg.command_timeout, acceptor.accept(plain)).await;
        match handshake {
            Ok(Ok(tls)) => {
                self.conn = Conn::Tls(Box::new(tls));
                self.tls = true;
                self.helo = None;
                self.auth_user = None;
                self.tx = Transaction::default();
                Ok(())
            }
            Ok(Err(e)) => {
                debug!(peer = %self.peer, error = %e, "TLS handshake failed");
                Err(End::Closed)
            }
            Err(_) => Err(End::Timeout),
        }
    }

    fn auth(&mut self, mechanism: u64, initial: String) -> Result<(), End> {
        if !self.auth_offered() {
            self.reply(if self.cfg.auth_users.is_some() {
                "538 5.7.11 Encryption required for requested authentication mechanism"
            } else {
                "502 5.5.1 AUTH not available"
            });
            return self.error();
        }
        if self.auth_user.is_some() {
            self.reply("503 5.5.1 Already authenticated");
            return self.error();
        }
        if self.tx.mail_from.is_some() {
            self.reply("503 5.5.1 AUTH not allowed during a mail transaction");
            return self.error();
        }
        if self.cfg.clients.blocked(self.peer.ip(), self.cfg.auth_failures_per_minute) {
            return Err(End::AuthBlocked);
        }
        match mechanism {
            smtp_proto::AUTH_PLAIN if initial.is_empty() => {
                self.phase = Phase::AuthPlain;
                self.reply("334 ");
            }
            smtp_proto::AUTH_PLAIN => self.auth_plain(initial.as_bytes()),
            smtp_proto::AUTH_LOGIN if initial.is_empty() => {
                self.phase = Phase::AuthLoginUser;
                self.reply("334 VXNlcm5hbWU6");
            }
            smtp_proto::AUTH_LOGIN => self.auth_login_user(initial.as_bytes()),
            _ => {
                self.reply("504 5.5.4 Unrecognized authentication mechanism");
                self.error()?;
            }
        }
        Ok(())
    }

    fn decode(&mut self, response: &[u8]) -> Option<Vec<u8>> {
        if response == b"*" {
            self.reply("501 5.0.0 Authentication cancelled");
            return None;
        }
        match base64::engine::general_purpose::STANDARD.decode(response) {
            Ok(v) => Some(v),
            Err(_) => {
                self.reply("501 5.5.2 Invalid base64 data");
                None
            }
        }
    }

    fn auth_plain(&mut self, response: &[u8]) {
        let Some(decoded) = self.decode(response) else { return };
        let mut parts = decoded.split(|&b| b == 0);
        let (_authz, user, pass) = (parts.next(), parts.next(), parts.next());
        match (user, pass) {
            (Some(user), Some(pass)) => {
                let user = String::from_utf8_lossy(user).into_owned();
                self.check_credentials(user, pass);
            }
            _ => self.reply("501 5.5.2 Malformed PLAIN response"),
        }
    }

    fn auth_login_user(&mut self, response: &[u8]) {
        let Some(user) = self.decode(response) else { return };
        self.phase = Phase::AuthLoginPass(String::from_utf8_lossy(&user).into_owned());
        self.reply("334 UGFzc3dvcmQ6");
    }

    fn auth_login_pass(&mut self, user: String, response: &[u8]) {
        let Some(pass) = self.decode(response) else { return };
        self.check_credentials(user, &pass);
    }

    fn check_credentials(&mut self, user: String, pass: &[u8]) {
        let ok = self
            .cfg
            .auth_users
            .as_ref()
            .and_then(|users| users.get(&user))
            .is_some_and(|expected| constant_time_eq(expected.expose().as_bytes(), pass));
        if ok {
            info!(peer = %self.peer, user = %user, "authenticated");
            self.auth_user = Some(user);
            self.reply("235 2.7.0 Authentication successful");
        } else {
            // One line per failure only at debug: a guesser must not flood the log. The address
            // is named once, when it reaches the per-address limit.
            debug!(peer = %self.peer, user = %user, "authentication failed");
            self.cfg.rejected("auth_failed");
            self.reply("535 5.7.8 Authentication credentials invalid");
            self.errors += 1;
            self.auth_failures += 1;
            self.auth_delay = Some(self.cfg.auth_failure_delay * self.auth_failures as u32);
            let limit = self.cfg.auth_failures_per_minute;
            if self.cfg.clients.auth_failed(self.peer.ip(), limit) == super::clients::Failure::Blocked {
                warn!(client = %self.peer.ip(), failures = limit, "too many authentication failures from this address: AUTH refused for a minute");
                self.cfg.rejected("auth_client_blocked");
            }
        }
    }
}

/// The path of a `RCPT TO:<…>` line as the client wrote it, when its local part is quoted:
/// the parser drops the quotes, and `"x@evil.com"@hooks.example.com` must not be matched
/// against `recipients` as `x@evil.com@hooks.example.com`. A source route (`@a,@b:`) is left out.
fn quoted_path(line: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(line).ok()?;
    let rest = &text[text.find('<')? + 1..];
    let rest = if rest.starts_with('@') { &rest[rest.find(':')? + 1..] } else { rest };
    if !rest.starts_with('"') {
        return None;
    }
    let (mut quoted, mut escaped) = (false, false);
    for (i, c) in rest.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '>' if !quoted => return Some(rest[..i].to_string()),
            _ => {}
        }
    }
    None
}

/// `RCPT TO:<postmaster>` (any case, maybe a space after the colon, maybe parameters).
fn is_postmaster_rcpt(line: &[u8]) -> bool {
    let line = trim_line(line).to_ascii_lowercase();
    line.strip_prefix(b"rcpt to:")
        .map(|rest| rest.trim_ascii_start())
        .is_some_and(|rest| rest.starts_with(b"<postmaster>"))
}

fn trim_line(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

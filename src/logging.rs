//! Logs: human-readable lines on a terminal, JSON lines otherwise (journald, files), filtered
//! by `RUST_LOG` (default `info`). Secrets never reach a log line: config values holding them
//! are [`crate::config::Secret`]s and are not printed anywhere.
//!
//! Text lines carry bytes a client chose (an AUTH user name, a HELO name, an address): every
//! control character in them is written escaped (`\n`, `\x1b`, …), as Postfix does, so a
//! client can neither forge a log line nor send escape sequences to an operator's terminal.
//! JSON lines are escaped by JSON itself.

use std::io::IsTerminal;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Text on a terminal, JSON otherwise.
    Auto,
    Text,
    Json,
}

pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,lettre=warn,reqwest=warn,hyper=warn"));
    let json = match format {
        LogFormat::Auto => !std::io::stderr().is_terminal(),
        LogFormat::Text => false,
        LogFormat::Json => true,
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        // No colours: their escape sequences would be escaped like any other.
        builder.with_ansi(false).with_writer(|| EscapeControls(std::io::stderr())).try_init()
    };
}

/// A writer that escapes every control character but the newline that ends a record (the text
/// formatter writes one whole record per `write`).
pub struct EscapeControls<W>(pub W);

impl<W: std::io::Write> std::io::Write for EscapeControls<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let (body, end) = match buf.strip_suffix(b"\n") {
            Some(body) => (body, &b"\n"[..]),
            None => (buf, &b""[..]),
        };
        let mut out = Vec::with_capacity(buf.len() + 8);
        for &b in body {
            match b {
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.push(b'\t'),
                0..=0x1f | 0x7f => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
                _ => out.push(b),
            }
        }
        out.extend_from_slice(end);
        self.0.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::EscapeControls;
    use std::io::Write;

    #[test]
    fn control_characters_are_escaped_but_the_final_newline() {
        let mut w = EscapeControls(Vec::new());
        w.write_all(b"user=evil\n2026-01-01 INFO forged\x1b[2J\x7f\ttab\r\n").unwrap();
        assert_eq!(String::from_utf8(w.0).unwrap(), "user=evil\\n2026-01-01 INFO forged\\x1b[2J\\x7f\ttab\\r\n");
    }
}

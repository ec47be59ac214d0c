//! `mailhook ingest`: the command that spools one message from stdin (a Postfix pipe
//! transport, a sendmail alias) through [`crate::ingest::stdin`], for every recipient it is
//! given at once (Postfix's `${recipient}` expands to one argument per recipient).
//!
//! Exit codes are what an MTA acts on, so they say who can fix the trouble:
//! - 0 only once the message is durable;
//! - 75 (EX_TEMPFAIL) for anything the operator can fix — a config file that cannot be read
//!   or has an error, a spool that is missing or not writable, a disk full — so the MTA keeps
//!   the message and tries again later instead of bouncing it;
//! - 65 (EX_DATAERR) only for a message that can never be taken (no bytes at all).
//!
//! With `--wait`, it then waits until the running `serve` has judged and tried the message,
//! and prints the outcome: what a person at a shell wants, never what a pipe should do.

use super::Exit;
use crate::ingest::stdin;
use crate::model::{Envelope, Source};
use std::io::Read;
use std::path::Path;
use std::time::Duration;

pub struct IngestOptions<'a> {
    pub config: &'a Path,
    pub mail_from: Option<String>,
    pub recipients: Vec<String>,
    /// Wait up to this long for the outcome of the first delivery.
    pub wait: Option<Duration>,
}

pub fn run(opts: &IngestOptions<'_>, input: &mut dyn Read) -> Exit {
    let (_, spool) = match super::open_spool(opts.config) {
        Ok(x) => x,
        Err(Exit::Config) => {
            eprintln!("mailhook ingest: the config cannot be used; exit 75 so the message is kept and tried again");
            return Exit::TempFail;
        }
        Err(code) => return code,
    };
    let mut envelope = Envelope::new(Source::Stdin);
    envelope.mail_from = opts.mail_from.clone().filter(|a| !a.is_empty());
    envelope.recipients = opts.recipients.iter().filter(|r| !r.is_empty()).cloned().collect();
    match stdin::spool_one(&spool, envelope, input) {
        Ok(meta) => match opts.wait {
            None => {
                println!("{}", meta.id);
                Exit::Ok
            }
            Some(timeout) => super::queue::wait(&spool, std::slice::from_ref(&meta.id), timeout),
        },
        Err(e) => {
            eprintln!("mailhook ingest: {e}");
            if e.is_temporary() { Exit::TempFail } else { Exit::DataErr }
        }
    }
}

//! `mailhook ingest`: spool one message from stdin (a Postfix pipe transport, a sendmail
//! alias). Exit 0 only once the message is durable; 75 (EX_TEMPFAIL) when the spool cannot
//! take it, so the caller keeps the message and tries again later.

use super::Exit;
use crate::model::{Envelope, Source};
use std::io::Read;
use std::path::Path;

pub struct IngestOptions<'a> {
    pub config: &'a Path,
    pub mail_from: Option<String>,
    pub recipients: Vec<String>,
}

pub fn run(opts: &IngestOptions<'_>, input: &mut dyn Read) -> Exit {
    let (_, spool) = match super::open_spool(opts.config) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let mut draft = match spool.draft() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("mailhook ingest: cannot spool the message: {e}");
            return Exit::TempFail;
        }
    };
    if let Err(e) = std::io::copy(input, &mut draft) {
        eprintln!("mailhook ingest: cannot spool the message: {e}");
        return Exit::TempFail;
    }
    if draft.size() == 0 {
        eprintln!("mailhook ingest: no message on standard input");
        return Exit::DataErr;
    }
    let mut envelope = Envelope::new(Source::Stdin);
    envelope.mail_from = opts.mail_from.clone().filter(|a| !a.is_empty());
    envelope.recipients = opts.recipients.clone();
    match draft.commit_blocking(envelope) {
        Ok(meta) => {
            println!("{}", meta.id);
            Exit::Ok
        }
        Err(e) => {
            eprintln!("mailhook ingest: cannot spool the message: {e}");
            Exit::TempFail
        }
    }
}

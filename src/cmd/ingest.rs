//! `mailhook ingest`: spool one message from stdin (a Postfix pipe transport, a sendmail
//! alias). Exit 0 only once the message is durable; 75 (EX_TEMPFAIL) when the spool cannot
//! take it, so the caller keeps the message and tries again later.

use super::Exit;
use crate::config::Config;
use crate::model::{Envelope, Source};
use crate::spool::{Spool, SpoolOptions};
use std::io::Read;
use std::path::Path;

pub struct IngestOptions<'a> {
    pub config: &'a Path,
    pub mail_from: Option<String>,
    pub recipients: Vec<String>,
}

pub fn run(opts: &IngestOptions<'_>, input: &mut dyn Read) -> Exit {
    let config = match Config::load(opts.config) {
        Ok(c) => c,
        Err(errors) => {
            for e in errors {
                eprintln!("{e}");
            }
            return Exit::Config;
        }
    };
    let dir = config.resolve(&config.spool.dir);
    if !dir.is_dir() {
        eprintln!("mailhook ingest: spool directory {} does not exist (mailhook serve creates it)", dir.display());
        return Exit::TempFail;
    }
    let spool = match Spool::open(&dir, SpoolOptions { fsync: config.spool.fsync }) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mailhook ingest: cannot use the spool: {e}");
            return Exit::TempFail;
        }
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
        Ok(id) => {
            println!("{id}");
            Exit::Ok
        }
        Err(e) => {
            eprintln!("mailhook ingest: cannot spool the message: {e}");
            Exit::TempFail
        }
    }
}

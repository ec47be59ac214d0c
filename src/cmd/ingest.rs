//! `mailhook ingest`: the command that spools one message from stdin (a Postfix pipe
//! transport, a sendmail alias) through [`crate::ingest::stdin`]. Exit 0 only once the message
//! is durable; 75 (EX_TEMPFAIL) when the spool cannot take it, so the caller keeps the message
//! and tries again later.

use super::Exit;
use crate::ingest::stdin;
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
    let mut envelope = Envelope::new(Source::Stdin);
    envelope.mail_from = opts.mail_from.clone().filter(|a| !a.is_empty());
    envelope.recipients = opts.recipients.clone();
    match stdin::spool_one(&spool, envelope, input) {
        Ok(meta) => {
            println!("{}", meta.id);
            Exit::Ok
        }
        Err(e) => {
            eprintln!("mailhook ingest: {e}");
            if e.is_temporary() { Exit::TempFail } else { Exit::DataErr }
        }
    }
}

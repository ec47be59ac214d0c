//! stdin: one message from standard input (a Postfix pipe transport, a sendmail alias) into the
//! spool. The caller acknowledges (exit 0) only once [`spool_one`] has returned the durable
//! message.

use crate::model::Envelope;
use crate::spool::{Meta, Spool, SpoolError};
use std::io::Read;

/// Why a message from standard input was not spooled.
#[derive(Debug, thiserror::Error)]
pub enum StdinError {
    /// Standard input held no bytes: there is nothing to keep, and trying again will not help.
    #[error("no message on standard input")]
    Empty,
    /// Reading the input or writing the spool failed: the caller should try again later.
    #[error("cannot spool the message: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot spool the message: {0}")]
    Spool(#[from] SpoolError),
}

impl StdinError {
    /// Whether the sender should keep the message and try again (EX_TEMPFAIL).
    pub fn is_temporary(&self) -> bool {
        !matches!(self, StdinError::Empty)
    }
}

/// Copies `input` into the spool under `envelope` and commits it (fsync'd) before returning.
pub fn spool_one(spool: &Spool, envelope: Envelope, input: &mut dyn Read) -> Result<Meta, StdinError> {
    let mut draft = spool.draft()?;
    std::io::copy(input, &mut draft)?;
    if draft.size() == 0 {
        return Err(StdinError::Empty);
    }
    Ok(draft.commit_blocking(envelope)?)
}

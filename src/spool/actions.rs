//! What an operator does to one spooled message (`mailhook queue retry|drop`, the console):
//! each is one state change through [`Spool::transition_blocking`] or
//! [`Spool::remove_blocking`], never a file touched by hand.

use super::{DestState, Meta, Spool, SpoolError, State};

/// Why an action was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("{0}: not in the spool")]
    NotFound(String),
    #[error("{0}: being delivered right now; try again in a moment")]
    Busy(String),
    #[error("{0}: already waiting to be judged")]
    AlreadyQueued(String),
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

/// Where a message is and its metadata; refuses ids that are not spool ids and messages being
/// delivered right now.
pub fn locate(spool: &Spool, id: &str) -> Result<(State, Meta), ActionError> {
    let state = spool.lookup(id)?.ok_or_else(|| ActionError::NotFound(id.to_string()))?;
    if state == State::Active {
        return Err(ActionError::Busy(id.to_string()));
    }
    match spool.read_meta(state, id) {
        Ok(meta) => Ok((state, meta)),
        Err(SpoolError::NotFound(_)) => Err(ActionError::NotFound(id.to_string())),
        Err(e) => Err(e.into()),
    }
}

/// Makes `meta` due now, every destination not done pending again; returns where it goes:
/// `deferred/` when judged, `incoming/` to be judged when not.
pub fn requeue(meta: &mut Meta) -> State {
    meta.next_attempt = None;
    meta.dead_reason = None;
    meta.dead_rule = None;
    match &mut meta.decision {
        Some(d) => {
            for s in d.destinations.values_mut() {
                if s.state != DestState::Done {
                    s.state = DestState::Pending;
                    s.next_attempt = None;
                }
            }
            State::Deferred
        }
        None => State::Incoming,
    }
}

/// `queue retry` for one message: back in line now. Returns the state it went to.
pub fn retry(spool: &Spool, id: &str) -> Result<State, ActionError> {
    let (state, mut meta) = locate(spool, id)?;
    if state == State::Incoming {
        return Err(ActionError::AlreadyQueued(id.to_string()));
    }
    let to = requeue(&mut meta);
    spool.transition_blocking(id, state, to, Some(&meta))?;
    Ok(to)
}

/// `queue drop` for one message: removed from the spool. Returns the state it was in.
pub fn drop(spool: &Spool, id: &str) -> Result<State, ActionError> {
    let state = spool.lookup(id)?.ok_or_else(|| ActionError::NotFound(id.to_string()))?;
    if state == State::Active {
        return Err(ActionError::Busy(id.to_string()));
    }
    spool.remove_blocking(id, state)?;
    Ok(state)
}

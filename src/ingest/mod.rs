//! ingest: the ways mail comes in. Each one only accepts bytes and an envelope and hands them
//! to the spool; it acknowledges the sender only once the spool has them on disk.
//!
//! | source | where |
//! |---|---|
//! | SMTP and LMTP listeners | [`smtp`] |
//! | IMAP folders (IDLE or poll) | [`imap`] |
//! | stdin (`mailhook ingest`, a Postfix pipe) | [`stdin`] |

pub mod imap;
pub mod smtp;
pub mod stdin;

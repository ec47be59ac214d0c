//! `ID.msg`: the message file of the spools written before the database (see `legacy.rs`), the
//! raw bytes followed by the message's first metadata. Only read now, to drain such a spool.
//!
//! ```text
//! <raw message, exactly as received>\n
//! <metadata: one line of JSON>\n
//! mailhook-spool-1 00000000000000002048\n     footer: fixed length, the raw message's size
//! ```
//!
//! A new message is one file written once, flushed once and renamed once into `incoming/`, and
//! a message delivered from there is one file removed. The metadata is written after the raw
//! bytes because its `size` is only known once they have all arrived; the fixed-length footer
//! says where they end. `cat` shows the message as received, then the line of metadata.

use super::{Damage, Meta, SpoolError};
use std::fs::File;
#[cfg(test)]
use std::io::Write;
use std::io::{self, Read as _};
use std::os::unix::fs::FileExt;
use std::path::Path;

const MAGIC: &[u8] = b"mailhook-spool-1 ";
/// Digits of the size in the footer.
const DIGITS: usize = 20;
const FOOTER_LEN: usize = MAGIC.len() + DIGITS + 1;

/// Appends the metadata and footer after `size` bytes of raw message already written to `out`.
#[cfg(test)]
pub(super) fn write_tail(out: &mut impl Write, meta: &Meta, size: u64) -> io::Result<()> {
    let mut tail = Vec::with_capacity(512);
    tail.push(b'\n');
    serde_json::to_writer(&mut tail, meta).map_err(io::Error::other)?;
    tail.push(b'\n');
    tail.extend_from_slice(MAGIC);
    tail.extend_from_slice(format!("{size:0DIGITS$}\n").as_bytes());
    out.write_all(&tail)
}

/// The raw message's size, from a footer.
fn parse_footer(footer: &[u8]) -> Option<u64> {
    let digits = footer.strip_prefix(MAGIC)?.strip_suffix(b"\n")?;
    if digits.len() != DIGITS || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Where the raw message ends and where the metadata ends, in a file of `len` bytes.
fn layout(len: u64, footer: &[u8]) -> Result<(u64, u64), Damage> {
    let end = len.checked_sub(FOOTER_LEN as u64).ok_or(Damage::TooShort)?;
    let size = parse_footer(footer).ok_or(Damage::NoFooter)?;
    if size > end {
        return Err(Damage::SizePastEnd(size));
    }
    Ok((size, end))
}

fn corrupt(id: &str, reason: impl Into<Damage>) -> SpoolError {
    SpoolError::Corrupt { id: id.to_string(), reason: reason.into() }
}

fn decode_meta(id: &str, json: &[u8]) -> Result<Meta, SpoolError> {
    serde_json::from_slice(json).map_err(|e| corrupt(id, e))
}

/// What [`read`] found: the metadata, and the raw message when it was read too.
pub(super) type Read = (Meta, Option<Vec<u8>>);

/// Reads the metadata of the message file at `path`, and its raw message too when the whole
/// file is no larger than `raw_up_to` bytes (one read instead of two for a message about to be
/// judged); for a larger file only its end is read.
pub(super) fn read(path: &Path, id: &str, raw_up_to: u64) -> io::Result<Result<Read, SpoolError>> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    if len <= raw_up_to {
        let mut bytes = Vec::with_capacity(len as usize);
        file.read_to_end(&mut bytes)?;
        return Ok(split(bytes, id).map(|(raw, meta)| (meta, Some(raw))));
    }
    let mut footer = [0u8; FOOTER_LEN];
    if len < FOOTER_LEN as u64 {
        return Ok(Err(corrupt(id, Damage::TooShort)));
    }
    file.read_exact_at(&mut footer, len - FOOTER_LEN as u64)?;
    let (size, end) = match layout(len, &footer) {
        Ok(x) => x,
        Err(reason) => return Ok(Err(corrupt(id, reason))),
    };
    let mut json = vec![0u8; (end - size) as usize];
    file.read_exact_at(&mut json, size)?;
    Ok(decode_meta(id, &json).map(|meta| (meta, None)))
}

/// The size of the raw message at the start of the message file at `path`, from its footer.
pub(super) fn raw_len(path: &Path) -> io::Result<Result<u64, Damage>> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    if len < FOOTER_LEN as u64 {
        return Ok(Err(Damage::TooShort));
    }
    let mut footer = [0u8; FOOTER_LEN];
    file.read_exact_at(&mut footer, len - FOOTER_LEN as u64)?;
    Ok(layout(len, &footer).map(|(size, _)| size))
}

/// Splits the bytes of a message file into the raw message and its metadata.
pub(super) fn split(mut bytes: Vec<u8>, id: &str) -> Result<(Vec<u8>, Meta), SpoolError> {
    let len = bytes.len();
    let footer = &bytes[len.saturating_sub(FOOTER_LEN)..];
    let (size, end) = layout(len as u64, footer).map_err(|r| corrupt(id, r))?;
    let meta = decode_meta(id, &bytes[size as usize..end as usize])?;
    bytes.truncate(size as usize);
    Ok((bytes, meta))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Envelope, Source};

    fn meta(size: u64) -> Meta {
        let mut envelope = Envelope::new(Source::Stdin);
        envelope.id = "01TEST".into();
        Meta::new(envelope, size)
    }

    fn file(raw: &[u8]) -> Vec<u8> {
        let mut out = raw.to_vec();
        write_tail(&mut out, &meta(raw.len() as u64), raw.len() as u64).unwrap();
        out
    }

    #[test]
    fn raw_bytes_come_first_and_round_trip() {
        for raw in [&b""[..], b"Subject: x\r\n\r\nno final newline", b"line\n\nmailhook-spool-1 00000000000000000001\n"]
        {
            let bytes = file(raw);
            assert!(bytes.starts_with(raw));
            assert_eq!(
                bytes.len(),
                raw.len() + 1 + serde_json::to_vec(&meta(raw.len() as u64)).unwrap().len() + 1 + FOOTER_LEN
            );
            let (back, m) = split(bytes, "01TEST").unwrap();
            assert_eq!(back, raw);
            assert_eq!(m, meta(raw.len() as u64));
        }
    }

    #[test]
    fn metadata_is_read_from_the_end_and_a_small_message_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("01TEST.msg");
        std::fs::write(&path, file(b"Subject: hi\r\n\r\nbody\r\n")).unwrap();
        assert_eq!(read(&path, "01TEST", 0).unwrap().unwrap(), (meta(21), None));
        let whole = read(&path, "01TEST", u64::MAX).unwrap().unwrap();
        assert_eq!(whole, (meta(21), Some(b"Subject: hi\r\n\r\nbody\r\n".to_vec())));
    }

    #[test]
    fn damaged_files_are_corrupt_not_misread() {
        let good = file(b"Subject: hi\r\n\r\nbody\r\n");
        let mut cut = good.clone();
        cut.truncate(good.len() - 1);
        let mut past = good.clone();
        let at = past.len() - FOOTER_LEN + MAGIC.len();
        past[at] = b'9';
        let mut bad_json = good.clone();
        bad_json[22] = b'[';
        for (what, bytes) in [("cut", cut), ("size past the end", past), ("bad json", bad_json), ("empty", vec![])] {
            assert!(matches!(split(bytes, "01TEST"), Err(SpoolError::Corrupt { .. })), "{what}");
        }
        assert_eq!(parse_footer(b"mailhook-spool-1 0000000000000000002x\n"), None);
        assert_eq!(parse_footer(b"mailhook-spool-1 00000000000000000021\n"), Some(21));
    }
}

//! parse: raw message bytes → [`Email`]. A pure function; the only module that knows
//! `mail-parser` (and `html2text`).
//!
//! ```text
//! spool ─► raw bytes ─► parse ─► Email ─► rules
//! ```
//!
//! Parsing never fails and never panics: a malformed message yields whatever could be read,
//! and what could not is listed in [`Email::problems`]. Decoding follows `mail-parser`: RFC 2047
//! encoded words in headers, RFC 2231 parameters, quoted-printable and base64 bodies, and every
//! charset it knows; an unknown charset is read as UTF-8 (lossy) and reported.
//!
//! Real-world damage is repaired before and after mail-parser, each repair noted in `problems`:
//! a byte-order mark, blank lines or a stray line before the headers are skipped, and the
//! obsolete `Name  :` syntax is read; raw 8-bit header bytes outside encoded words are read as
//! Windows-1252 when they are not UTF-8; a body labelled ASCII or a legacy charset that is
//! valid non-ASCII UTF-8 is read as UTF-8. `text` and `html` get LF line endings and one final
//! line break here, the one place they are normalised, so every route gives the same payload.
//!
//! The plain-text body is the concatenation of the message's text parts. For HTML-only mail it
//! is the HTML rendered as text by `html2text` (tables keep their cells apart, scripts and
//! styles are dropped). `html` is only ever real HTML from the message; it is never made up
//! from a text part.

use crate::model::{Address, Attachment, Email, Header};
use mail_parser::decoders::base64::base64_decode;
use mail_parser::decoders::charsets::map::charset_decoder;
use mail_parser::decoders::quoted_printable::quoted_printable_decode;
use mail_parser::parsers::MessageStream;
use mail_parser::{Encoding, HeaderValue, Message, MessageParser, MessagePart, MimeHeaders, PartType};
use std::borrow::Cow;

/// How deep nested `message/rfc822` parts are followed.
const MAX_NESTING: usize = 8;

/// Width given to the HTML-to-text renderer. Wide, so that lines are not wrapped in the middle
/// of a value a rule wants to extract.
const HTML_TEXT_WIDTH: usize = 400;

/// HTML larger than this is not rendered to text (it is still kept in `html`).
const MAX_HTML_TO_TEXT: usize = 2 * 1024 * 1024;

/// Parses raw RFC 5322 bytes into an [`Email`].
///
/// ```
/// let email = mailhook::parse::parse(b"From: UPS <pkginfo@ups.com>\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n\r\nhello\r\n");
/// assert_eq!(email.subject, "Grüße");
/// assert_eq!(email.from[0].address, "pkginfo@ups.com");
/// assert_eq!(email.text, "hello\n");
/// ```
pub fn parse(raw: &[u8]) -> Email {
    let mut problems = Vec::new();
    let raw = skip_byte_order_mark(raw, &mut problems);
    let raw = skip_mbox_separator(raw);
    let Some(raw) = header_block(raw, &mut problems) else {
        let mut email = body_only(raw);
        email.problems.splice(0..0, problems);
        return email;
    };
    let repaired = repair_8bit_headers(raw);
    let bytes = repaired.as_deref().unwrap_or(raw);
    let parser = MessageParser::new().default_header_text();
    let mut email = match parser.parse(bytes) {
        Some(message) => convert(&message, 0),
        None => return body_only(raw),
    };
    if repaired.is_some() {
        problems.push("header bytes that are not UTF-8 were read as Windows-1252".to_string());
    }
    email.problems.splice(0..0, problems);
    email
}

/// Skips a UTF-8 byte-order mark, which some Windows tools write before the headers.
fn skip_byte_order_mark<'a>(raw: &'a [u8], problems: &mut Vec<String>) -> &'a [u8] {
    match raw.strip_prefix(b"\xEF\xBB\xBF") {
        Some(rest) => {
            problems.push("a byte-order mark before the headers was skipped".to_string());
            rest
        }
        None => raw,
    }
}

/// The decoded content of the `n`th of [`Email::attachments`] (top level), for download. The
/// message is read as [`parse`] reads it.
pub fn attachment_content(raw: &[u8], n: usize) -> Option<Vec<u8>> {
    let mut problems = Vec::new();
    let raw = skip_byte_order_mark(raw, &mut problems);
    let raw = skip_mbox_separator(raw);
    let raw = header_block(raw, &mut problems)?;
    let repaired = repair_8bit_headers(raw);
    let bytes = repaired.as_deref().unwrap_or(raw);
    let message = MessageParser::new().default_header_text().parse(bytes)?;
    // The same parts, in the same order, as `convert` lists them.
    let part = message.attachments().filter(|p| unterminated_multipart(p).is_none()).nth(n)?;
    Some(match &part.body {
        PartType::Text(t) | PartType::Html(t) => t.as_bytes().to_vec(),
        PartType::Binary(b) | PartType::InlineBinary(b) => b.to_vec(),
        PartType::Message(inner) => inner.raw_message().to_vec(),
        PartType::Multipart(_) => Vec::new(),
    })
}

/// Skips an mbox `From sender date` line, which a pipe from an MTA may put before the headers
/// (but not `From  : ...`, a From header in the obsolete syntax).
fn skip_mbox_separator(raw: &[u8]) -> &[u8] {
    let end = raw.iter().position(|&b| b == b'\n').map_or(raw.len(), |i| i + 1);
    if raw.starts_with(b"From ") && !is_header_field(&raw[..end]) { &raw[end..] } else { raw }
}

/// How many lines at the top may be something else than a header field before the header
/// block is taken to be missing (old gateways sometimes write one stray line first).
const MAX_STRAY_LINES: usize = 2;

/// Where the header block starts, or `None` when the input has none (it is all body).
///
/// Blank and whitespace-only lines before the first header field are skipped; up to
/// [`MAX_STRAY_LINES`] lines that are not header fields may precede it; they are dropped
/// (mail-parser would pass over a line without a colon, but make a header of one with). A header field is `Name:` or, in the obsolete syntax of RFC 5322 §4.5,
/// `Name  :` with white space before the colon.
fn header_block<'a>(raw: &'a [u8], problems: &mut Vec<String>) -> Option<&'a [u8]> {
    let mut start = 0;
    let mut blank = 0;
    for line in raw.split_inclusive(|&b| b == b'\n') {
        if !line.iter().all(u8::is_ascii_whitespace) {
            break;
        }
        start += line.len();
        blank += 1;
    }
    let rest = &raw[start..];
    let (mut stray, mut skipped) = (0, 0);
    for line in rest.split_inclusive(|&b| b == b'\n').take(MAX_STRAY_LINES + 1) {
        if is_header_field(line) {
            if blank > 0 {
                problems.push(format!("{blank} blank line(s) before the headers were skipped"));
            }
            if stray > 0 {
                problems.push(format!("{stray} line(s) before the headers are not header fields: skipped"));
            }
            return Some(&rest[skipped..]);
        }
        // A blank line ends the header block: what follows is body.
        if line.iter().all(u8::is_ascii_whitespace) {
            break;
        }
        stray += 1;
        skipped += line.len();
    }
    None
}

/// Whether a line opens a header field: a name of printable ASCII, white space allowed only
/// between the name and the colon (RFC 5322 §4.5's obsolete syntax).
fn is_header_field(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return false;
    };
    let name = &line[..colon];
    let end = name.iter().rposition(|b| !matches!(b, b' ' | b'\t')).map_or(0, |i| i + 1);
    end > 0 && name[..end].iter().all(|&b| (33..=126).contains(&b))
}

/// An input without a header block: all of it is the plain-text body.
fn body_only(raw: &[u8]) -> Email {
    let body = raw.strip_prefix(b"\r\n").or_else(|| raw.strip_prefix(b"\n")).unwrap_or(raw);
    let problem = if raw.is_empty() {
        "the input is empty"
    } else {
        "no header block: the whole input was read as a plain-text body"
    };
    Email { text: normalise_text(decode_lossy(body)), problems: vec![problem.to_string()], ..Email::default() }
}

/// UTF-8 if it is, else Windows-1252 (the usual charset of unlabelled 8-bit mail).
fn decode_lossy(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => match charset_decoder(b"windows-1252") {
            Some(decode) => decode(bytes),
            None => String::from_utf8_lossy(bytes).into_owned(),
        },
    }
}

/// Raw 8-bit bytes in headers are not allowed but common: UTF-8 ones are read as they are;
/// other bytes are re-encoded from Windows-1252. Bytes inside an RFC 2047 encoded word
/// (`=?charset?Q?...?=`) are left alone: mail-parser decodes them with the word's own charset,
/// and converting them first would decode them twice. Returns the repaired message, or `None`
/// when nothing needs repair (the usual case: no copy).
fn repair_8bit_headers(raw: &[u8]) -> Option<Vec<u8>> {
    let end = header_block_end(raw);
    if std::str::from_utf8(&raw[..end]).is_ok() {
        return None;
    }
    let mut out = Vec::with_capacity(raw.len() + 64);
    let mut repaired = false;
    for line in raw[..end].split_inclusive(|&b| b == b'\n') {
        if std::str::from_utf8(line).is_ok() {
            out.extend_from_slice(line);
            continue;
        }
        let mut rest = line;
        while !rest.is_empty() {
            let (plain, word) = split_at_encoded_word(rest);
            if std::str::from_utf8(plain).is_err() {
                repaired = true;
            }
            out.extend_from_slice(decode_lossy(plain).as_bytes());
            out.extend_from_slice(word);
            rest = &rest[plain.len() + word.len()..];
        }
    }
    if !repaired {
        return None;
    }
    out.extend_from_slice(&raw[end..]);
    Some(out)
}

/// Splits `bytes` into the text before the first encoded word and that word
/// (`=?charset?E?text?=`, empty when there is none).
fn split_at_encoded_word(bytes: &[u8]) -> (&[u8], &[u8]) {
    let mut from = 0;
    while let Some(at) = find(&bytes[from..], b"=?").map(|i| i + from) {
        if let Some(len) = encoded_word_len(&bytes[at..]) {
            return (&bytes[..at], &bytes[at..at + len]);
        }
        from = at + 2;
    }
    (bytes, &[])
}

/// The length of the encoded word `bytes` opens with: `=?`, a charset, `?`, one encoding
/// letter, `?`, text without white space, `?=`.
fn encoded_word_len(bytes: &[u8]) -> Option<usize> {
    let body = bytes.strip_prefix(b"=?")?;
    let charset = body.iter().position(|&b| b == b'?')?;
    if charset == 0 || body[..charset].iter().any(|b| b.is_ascii_whitespace()) {
        return None;
    }
    let after = &body[charset + 1..];
    if after.len() < 2 || !matches!(after[0], b'Q' | b'q' | b'B' | b'b') || after[1] != b'?' {
        return None;
    }
    let text = &after[2..];
    let end = find(text, b"?=")?;
    if text[..end].iter().any(|b| b.is_ascii_whitespace()) {
        return None;
    }
    Some(2 + charset + 1 + 2 + end + 2)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Offset just past the header block (the empty line included), or the input's length.
fn header_block_end(raw: &[u8]) -> usize {
    let mut start = 0;
    for line in raw.split_inclusive(|&b| b == b'\n') {
        start += line.len();
        if line == b"\n" || line == b"\r\n" {
            return start;
        }
    }
    raw.len()
}

/// Line endings as a person reads them, whatever the route the mail took: CRLF and lone CR
/// become LF, and the text ends with one line break (SMTP always ends a message with CRLF, a
/// file may end without one or with a blank line an SMTP client added). The one place line
/// endings are normalised, so one email gives one payload over SMTP, LMTP, a pipe or `try`.
fn normalise_text(text: String) -> String {
    let keep = text.trim_end_matches(['\r', '\n', ' ', '\t']).len();
    if keep == 0 {
        return String::new();
    }
    // Rewritten in place, as the text of a big message is most of its size: CR LF and a lone
    // CR become LF, so the text only shrinks; CR is a single byte in UTF-8, never part of
    // another character's bytes, so what is left is UTF-8 still.
    let mut bytes = text.into_bytes();
    bytes.truncate(keep);
    if bytes.contains(&b'\r') {
        let (mut read, mut write) = (0, 0);
        while read < bytes.len() {
            let b = bytes[read];
            read += 1;
            if b == b'\r' {
                if bytes.get(read) == Some(&b'\n') {
                    read += 1;
                }
                bytes[write] = b'\n';
            } else {
                bytes[write] = b;
            }
            write += 1;
        }
        bytes.truncate(write);
    }
    bytes.push(b'\n');
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn convert(message: &Message<'_>, depth: usize) -> Email {
    let mut email = Email {
        message_id: message.message_id().unwrap_or_default().to_string(),
        subject: message.subject().unwrap_or_default().to_string(),
        date: message.date().filter(|d| d.is_valid()).map(|d| d.to_rfc3339()).unwrap_or_default(),
        from: addresses(message.from()),
        to: addresses(message.to()),
        cc: addresses(message.cc()),
        reply_to: addresses(message.reply_to()),
        headers: headers(message),
        ..Email::default()
    };
    if message.headers().is_empty() {
        email.problems.push("the message has no header fields".to_string());
    }

    email.html = html_body(message, &mut email.problems);
    email.text = text_body(message, &mut email.problems);
    if email.text.trim().is_empty() && !email.html.trim().is_empty() {
        // An empty text/plain alternative beside a full HTML one: the HTML is the message.
        email.text = html_to_text(&email.html, &mut email.problems);
    }

    for (index, part) in message.parts.iter().enumerate() {
        if part.is_encoding_problem {
            email.problems.push(format!("part {index}: content could not be decoded cleanly"));
        } else if part.encoding == Encoding::Base64 && base64_is_truncated(message.raw_message(), part) {
            email.problems.push(format!("part {index}: base64 content is truncated; decoded what was there"));
        }
        if let Some(charset) = part.content_type().and_then(|ct| ct.attribute("charset"))
            && charset_decoder(charset.as_bytes()).is_none()
            && !is_utf8_alias(charset)
        {
            email.problems.push(format!("part {index}: unknown charset {charset:?}, read as UTF-8"));
        }
    }

    for part in message.attachments() {
        if let Some(body) = unterminated_multipart(part) {
            // The boundary never appears: the "multipart" is really one plain body.
            email.problems.push("multipart boundary never found: body read as plain text".to_string());
            if !email.text.is_empty() && !email.text.ends_with('\n') {
                email.text.push('\n');
            }
            email.text.push_str(&decode_lossy(body));
            continue;
        }
        let attachment = attachment(part, depth, &mut email.problems);
        email.attachments.push(attachment);
    }
    email.text = normalise_text(std::mem::take(&mut email.text));
    email.html = normalise_text(std::mem::take(&mut email.html));
    email
}

/// The raw content of a part declared `multipart/*` whose parts could not be found.
fn unterminated_multipart<'a>(part: &'a MessagePart<'_>) -> Option<&'a [u8]> {
    let is_multipart = part.content_type().is_some_and(|ct| ct.ctype().eq_ignore_ascii_case("multipart"));
    match &part.body {
        PartType::Binary(b) | PartType::InlineBinary(b) if is_multipart => Some(b),
        PartType::Text(t) if is_multipart => Some(t.as_bytes()),
        _ => None,
    }
}

/// Whether a base64 part's encoded text stops in the middle of a 4-character group.
fn base64_is_truncated(raw: &[u8], part: &MessagePart<'_>) -> bool {
    let start = (part.offset_body as usize).min(raw.len());
    let end = (part.offset_end as usize).clamp(start, raw.len());
    let symbols =
        raw[start..end].iter().filter(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=')).count();
    symbols % 4 != 0
}

fn is_utf8_alias(charset: &str) -> bool {
    let c = charset.trim().to_ascii_lowercase();
    matches!(c.as_str(), "utf-8" | "utf8" | "us-ascii" | "ascii")
}

fn addresses(value: Option<&mail_parser::Address<'_>>) -> Vec<Address> {
    let Some(value) = value else { return Vec::new() };
    value
        .iter()
        .filter_map(|addr| {
            let address = addr.address().unwrap_or_default().trim().to_string();
            let name = addr.name().unwrap_or_default().trim().to_string();
            (!address.is_empty() || !name.is_empty()).then_some(Address { address, name })
        })
        .collect()
}

/// Every header of the top-level part, value decoded from its raw bytes as unstructured text
/// (encoded words decoded, folding removed), so that `header.<Name>` sees what a person reads.
fn headers(message: &Message<'_>) -> Vec<Header> {
    let raw = message.raw_message();
    message
        .headers()
        .iter()
        .map(|h| {
            let start = (h.offset_start as usize).min(raw.len());
            let end = (h.offset_end as usize).clamp(start, raw.len());
            let value = match MessageStream::new(&raw[start..end]).parse_unstructured() {
                HeaderValue::Text(t) => t.trim().to_string(),
                HeaderValue::TextList(list) => list.join(" ").trim().to_string(),
                _ => String::new(),
            };
            Header { name: h.name.as_str().to_string(), value }
        })
        .collect()
}

fn text_body(message: &Message<'_>, problems: &mut Vec<String>) -> String {
    let mut text = String::new();
    for id in &message.text_body {
        let Some(part) = message.parts.get(*id as usize) else {
            continue;
        };
        let piece = match &part.body {
            PartType::Text(t) => part_text(message, *id, t, problems).into_owned(),
            PartType::Html(h) => html_to_text(&part_text(message, *id, h, problems), problems),
            _ => continue,
        };
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&piece);
    }
    text
}

fn html_body(message: &Message<'_>, problems: &mut Vec<String>) -> String {
    let mut html = String::new();
    for id in &message.html_body {
        if let Some(MessagePart { body: PartType::Html(h), .. }) = message.parts.get(*id as usize) {
            if !html.is_empty() {
                html.push('\n');
            }
            html.push_str(&part_text(message, *id, h, problems));
        }
    }
    html
}

/// The text of a text part, as mail-parser decoded it with the declared charset, unless that
/// charset is ASCII or a legacy one and the content is in fact valid UTF-8 with non-ASCII
/// characters: mislabelled mail (the tool writes UTF-8, the header says `us-ascii` or
/// `GB2312`) is read as the UTF-8 it is, and that is noted in `problems`. Valid UTF-8 with
/// non-ASCII bytes is next to never a legacy charset's text by chance.
fn part_text<'a>(message: &Message<'_>, id: u32, decoded: &'a str, problems: &mut Vec<String>) -> Cow<'a, str> {
    let Some(part) = message.parts.get(id as usize) else {
        return Cow::Borrowed(decoded);
    };
    let Some(charset) = part.content_type().and_then(|ct| ct.attribute("charset")) else {
        return Cow::Borrowed(decoded);
    };
    if !is_legacy_charset(charset) {
        return Cow::Borrowed(decoded);
    }
    let raw = message.raw_message();
    let start = (part.offset_body as usize).min(raw.len());
    let end = (part.offset_end as usize).clamp(start, raw.len());
    let content = &raw[start..end];
    let bytes = match part.encoding {
        Encoding::Base64 => base64_decode(content),
        Encoding::QuotedPrintable => quoted_printable_decode(content),
        Encoding::None => Some(content.to_vec()),
    };
    match bytes.map(String::from_utf8) {
        Some(Ok(text)) if !text.is_ascii() => {
            problems.push(format!("part {id}: declared charset {charset:?}, but the content is UTF-8: read as UTF-8"));
            Cow::Owned(text)
        }
        _ => Cow::Borrowed(decoded),
    }
}

/// A charset other than the Unicode ones (UTF-8, -16, -32, -7) that mail-parser decodes.
fn is_legacy_charset(charset: &str) -> bool {
    let c = charset.trim().to_ascii_lowercase();
    !c.starts_with("utf")
        && !c.starts_with("unicode")
        && !c.starts_with("ucs")
        && charset_decoder(c.as_bytes()).is_some()
}

/// Renders HTML as readable plain text: block structure kept, tables laid out with their cells
/// apart (padded columns, at least one space between cells), links as their text,
/// `<script>`/`<style>` dropped.
pub fn html_to_text(html: &str, problems: &mut Vec<String>) -> String {
    if html.len() > MAX_HTML_TO_TEXT {
        problems.push(format!("HTML body of {} bytes is too large to render as text", html.len()));
        return String::new();
    }
    let rendered = html2text::config::plain_no_decorate()
        .no_table_borders()
        .no_link_wrapping()
        .string_from_read(html.as_bytes(), HTML_TEXT_WIDTH);
    match rendered {
        Ok(text) => tidy_rendered_text(&text),
        Err(e) => {
            problems.push(format!("HTML body could not be rendered as text: {e}"));
            String::new()
        }
    }
}

/// Tidies html2text's output: the padding at the end of lines goes, runs of three or more
/// spaces (the gaps of a laid-out table stretched to the render width) fold to two, so cells
/// stay apart without pages of blanks, and runs of blank lines collapse to one.
fn tidy_rendered_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut blank_run = 0;
    for line in text.lines() {
        let line = line.trim_end();
        if line.is_empty() {
            blank_run += 1;
            if blank_run > 1 || out.is_empty() {
                continue;
            }
        } else {
            blank_run = 0;
        }
        let mut spaces = 0;
        for c in line.chars() {
            if c == ' ' {
                spaces += 1;
                if spaces <= 2 {
                    out.push(' ');
                }
            } else {
                spaces = 0;
                out.push(c);
            }
        }
        out.push('\n');
    }
    while out.ends_with("\n\n") {
        out.pop();
    }
    out
}

fn attachment(part: &MessagePart<'_>, depth: usize, problems: &mut Vec<String>) -> Attachment {
    let content_type = part
        .content_type()
        .map(|ct| match ct.subtype() {
            Some(sub) => format!("{}/{}", ct.ctype(), sub),
            None => ct.ctype().to_string(),
        })
        .unwrap_or_else(|| "application/octet-stream".to_string())
        .to_ascii_lowercase();
    let name = part.attachment_name().unwrap_or_default().trim().to_string();
    let (size, message) = match &part.body {
        PartType::Text(t) | PartType::Html(t) => (t.len(), None),
        PartType::Binary(b) | PartType::InlineBinary(b) => (b.len(), None),
        PartType::Message(inner) => {
            let nested = if depth + 1 < MAX_NESTING {
                Some(Box::new(convert(inner, depth + 1)))
            } else {
                problems.push(format!("message nesting deeper than {MAX_NESTING}: not followed"));
                None
            };
            (inner.raw_message().len(), nested)
        }
        PartType::Multipart(_) => (0, None),
    };
    Attachment { name, content_type, size, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crlf(s: &str) -> Vec<u8> {
        s.replace('\n', "\r\n").into_bytes()
    }

    #[test]
    fn simple_message_fields() {
        let raw = crlf(
            "From: \"Ops Team\" <ops@example.com>\n\
             To: a@example.net, B <b@example.net>\n\
             Cc: c@example.org\n\
             Reply-To: noreply@example.com\n\
             Subject: Disk full on db1\n\
             Date: Tue, 01 Dec 2026 09:30:00 +0100\n\
             Message-ID: <abc.123@example.com>\n\
             X-Custom: hello\n\
             \n\
             The disk is full.\n",
        );
        let email = parse(&raw);
        assert_eq!(email.subject, "Disk full on db1");
        assert_eq!(email.from, vec![Address { address: "ops@example.com".into(), name: "Ops Team".into() }]);
        assert_eq!(email.to.len(), 2);
        assert_eq!(email.to[1].name, "B");
        assert_eq!(email.to[1].address, "b@example.net");
        assert_eq!(email.cc[0].address, "c@example.org");
        assert_eq!(email.reply_to[0].address, "noreply@example.com");
        assert_eq!(email.date, "2026-12-01T09:30:00+01:00");
        assert_eq!(email.message_id, "abc.123@example.com");
        assert_eq!(email.header("x-custom"), Some("hello"));
        assert_eq!(email.text, "The disk is full.\n");
        assert_eq!(email.html, "");
        assert!(email.problems.is_empty(), "{:?}", email.problems);
    }

    #[test]
    fn encoded_words_in_headers_are_decoded() {
        let raw = crlf(
            "From: =?UTF-8?Q?J=C3=B6rg_M=C3=BCller?= <jm@example.com>\n\
             Subject: =?UTF-8?B?R3LDvMOfZQ==?= =?ISO-8859-1?Q?_aus_M=FCnchen?=\n\
             X-Note: =?utf-8?q?caf=C3=A9?=\n\
             \n\
             body\n",
        );
        let email = parse(&raw);
        assert_eq!(email.subject, "Grüße aus München");
        assert_eq!(email.from[0].name, "Jörg Müller");
        assert_eq!(email.header("X-Note"), Some("café"));
        assert_eq!(email.header("From"), Some("Jörg Müller <jm@example.com>"));
    }

    #[test]
    fn html_only_mail_gets_text_from_html() {
        let raw = crlf(
            "From: shop@example.com\n\
             Subject: Order\n\
             Content-Type: text/html; charset=utf-8\n\
             \n\
             <html><head><style>td { color: red; }</style><script>var secret = 1;</script></head>\
             <body><p>Thanks for your order</p><table><tr><td>Widget</td><td>2</td><td>9.99</td></tr></table></body></html>\n",
        );
        let email = parse(&raw);
        assert!(email.text.contains("Thanks for your order"), "{}", email.text);
        assert!(email.text.contains("Widget"));
        assert!(!email.text.contains("<td"));
        assert!(!email.text.contains("color: red"));
        assert!(!email.text.contains("secret"));
        // The cells stay apart: no "Widget29.99".
        assert!(!email.text.contains("Widget2"), "{}", email.text);
        assert!(!email.text.contains("   "), "runs of spaces are folded: {:?}", email.text);
        assert!(email.html.contains("<table>"));
    }

    #[test]
    fn text_part_is_never_invented_as_html() {
        let email = parse(b"Subject: x\r\n\r\nplain only\r\n");
        assert_eq!(email.html, "");
        assert_eq!(email.text, "plain only\n");
    }

    #[test]
    fn unknown_charset_is_reported_and_read() {
        let raw = crlf(
            "Subject: x\n\
             Content-Type: text/plain; charset=\"x-no-such-charset\"\n\
             \n\
             still readable\n",
        );
        let email = parse(&raw);
        assert!(email.text.contains("still readable"));
        assert!(email.problems.iter().any(|p| p.contains("x-no-such-charset")), "{:?}", email.problems);
    }

    #[test]
    fn empty_and_garbage_input_do_not_panic() {
        for input in [&b""[..], b"\r\n", b"\x00\xff\xfe", b"Subject", b":\r\n\r\n", b"--\r\n--"] {
            let _ = parse(input);
        }
    }

    #[test]
    fn nested_message_is_reachable() {
        let raw = crlf(
            "From: a@example.com\n\
             Subject: Fwd: alert\n\
             Content-Type: multipart/mixed; boundary=\"b1\"\n\
             \n\
             --b1\n\
             Content-Type: text/plain\n\
             \n\
             see below\n\
             --b1\n\
             Content-Type: message/rfc822\n\
             \n\
             From: inner@example.org\n\
             Subject: Original alert\n\
             \n\
             inner body\n\
             --b1--\n",
        );
        let email = parse(&raw);
        assert_eq!(email.attachments.len(), 1);
        let inner = email.attachments[0].message.as_ref().expect("nested message");
        assert_eq!(email.attachments[0].content_type, "message/rfc822");
        assert_eq!(inner.subject, "Original alert");
        assert_eq!(inner.from[0].address, "inner@example.org");
        assert!(inner.text.contains("inner body"));
    }

    #[test]
    fn input_without_headers_is_all_body() {
        let email = parse(b"disk is full\nplease clean up: now\n");
        assert_eq!(email.text, "disk is full\nplease clean up: now\n");
        assert_eq!(email.subject, "");
        assert_eq!(email.problems, vec!["no header block: the whole input was read as a plain-text body"]);
        let email = parse(b"\r\nbody after an empty header block\r\n");
        assert_eq!(email.text, "body after an empty header block\n");
    }

    #[test]
    fn mbox_separator_line_is_skipped() {
        let email = parse(b"From MAILER-DAEMON Tue Dec  1 09:30:00 2026\nSubject: hi\n\nbody\n");
        assert_eq!(email.subject, "hi");
        assert_eq!(email.text, "body\n");
    }

    #[test]
    fn latin1_header_bytes_are_repaired_and_utf8_kept() {
        let mut raw = b"Subject: Gr\xc3\xbc\xc3\x9fe\r\nFrom: J\xf6rg <j@example.de>\r\n\r\nbody \xc3\xa9\r\n".to_vec();
        let email = parse(&raw);
        assert_eq!(email.subject, "Grüße");
        assert_eq!(email.from[0].name, "Jörg");
        assert_eq!(email.text, "body é\n");
        // Valid UTF-8 headers are parsed in place, with no problem reported.
        raw = b"Subject: Gr\xc3\xbc\xc3\x9fe\r\n\r\nx".to_vec();
        let email = parse(&raw);
        assert_eq!(email.subject, "Grüße");
        assert!(email.problems.is_empty(), "{:?}", email.problems);
    }

    #[test]
    fn encoded_word_with_raw_8bit_bytes_is_decoded_once() {
        let raw = b"Subject: =?iso-8859-1?Q?Die_Hasen_und_die_Fr\xf6sche?=\r\n\
                    To: =?iso-8859-7?Q?\xc1\xe8\xe7\xed\xe1?= <a@example.gr>\r\n\
                    From: J\xf6rg <j@example.de>\r\n\r\nx\r\n";
        let email = parse(raw);
        assert_eq!(email.subject, "Die Hasen und die Frösche");
        assert_eq!(email.to[0].name, "Αθηνα");
        assert_eq!(email.from[0].name, "Jörg");
        assert_eq!(email.problems, vec!["header bytes that are not UTF-8 were read as Windows-1252"]);
        // Raw bytes only inside encoded words: nothing to repair, nothing reported.
        let email = parse(b"Subject: =?iso-8859-1?Q?Fr\xf6sche?=\r\n\r\nx\r\n");
        assert_eq!(email.subject, "Frösche");
        assert!(email.problems.is_empty(), "{:?}", email.problems);
    }

    #[test]
    fn encoded_words_are_found_in_a_line() {
        assert_eq!(split_at_encoded_word(b"a =?x?Q?b?= c"), (&b"a "[..], &b"=?x?Q?b?="[..]));
        assert_eq!(split_at_encoded_word(b"=? no ?= word"), (&b"=? no ?= word"[..], &b""[..]));
        assert_eq!(split_at_encoded_word(b"=?x?Z?b?= =?y?b?Yg==?="), (&b"=?x?Z?b?= "[..], &b"=?y?b?Yg==?="[..]));
        assert_eq!(split_at_encoded_word(b"=?x?Q?unterminated"), (&b"=?x?Q?unterminated"[..], &b""[..]));
    }

    #[test]
    fn headers_survive_what_old_systems_put_before_them() {
        let cases: [(&[u8], &str); 5] = [
            (b" \r\nSubject: blank line first\r\n\r\nbody\r\n", "1 blank line(s) before the headers were skipped"),
            (b"\n\t\nSubject: blank line first\n\nbody\n", "2 blank line(s) before the headers were skipped"),
            (
                b"\xef\xbb\xbfSubject: blank line first\r\n\r\nbody\r\n",
                "a byte-order mark before the headers was skipped",
            ),
            (
                b">From a@example.com Tue Dec  1 09:30:00 2026\r\nSubject: blank line first\r\n\r\nbody\r\n",
                "1 line(s) before the headers are not header fields: skipped",
            ),
            (b"Subject    : blank line first\r\n\r\nbody\r\n", ""),
        ];
        for (raw, problem) in cases {
            let email = parse(raw);
            assert_eq!(email.subject, "blank line first", "{:?}", String::from_utf8_lossy(raw));
            assert_eq!(email.text, "body\n");
            let expected: Vec<&str> = if problem.is_empty() { vec![] } else { vec![problem] };
            assert_eq!(email.problems, expected);
        }
        let email = parse(b"From  : John Doe <jdoe@machine.example>\r\nTo    : mary@example.net\r\n\r\nhi\r\n");
        assert_eq!(email.from[0].address, "jdoe@machine.example");
        assert_eq!(email.from[0].name, "John Doe");
        assert_eq!(email.to[0].address, "mary@example.net");
        assert_eq!(email.header("From"), Some("John Doe <jdoe@machine.example>"));
    }

    #[test]
    fn more_stray_lines_than_allowed_are_a_body() {
        let email = parse(b"one\r\ntwo\r\nthree\r\nSubject: late\r\n\r\nx");
        assert_eq!(email.subject, "");
        assert!(email.text.starts_with("one\n"), "{:?}", email.text);
    }

    #[test]
    fn mislabelled_utf8_is_read_as_utf8_and_noted() {
        let raw = "Subject: x\r\nContent-Type: text/plain; charset=GB2312\r\n\r\n您好，订单已发货。\r\n";
        let email = parse(raw.as_bytes());
        assert_eq!(email.text, "您好，订单已发货。\n");
        assert_eq!(
            email.problems,
            vec!["part 0: declared charset \"GB2312\", but the content is UTF-8: read as UTF-8"]
        );
        let raw = b"Subject: x\r\nContent-Type: text/plain; charset=us-ascii\r\n\
                    Content-Transfer-Encoding: base64\r\n\r\nR3LDvMOfZQ==\r\n";
        assert_eq!(parse(raw).text, "Grüße\n");
        // A real legacy body stays as the charset says.
        let email = parse(b"Subject: x\r\nContent-Type: text/plain; charset=iso-8859-1\r\n\r\nGr\xfc\xdfe\r\n");
        assert_eq!(email.text, "Grüße\n");
        assert!(email.problems.is_empty(), "{:?}", email.problems);
        // Plain ASCII under any label: nothing to note.
        let email = parse(b"Subject: x\r\nContent-Type: text/plain; charset=GB2312\r\n\r\nhello\r\n");
        assert!(email.problems.is_empty(), "{:?}", email.problems);
    }

    #[test]
    fn an_empty_plain_alternative_does_not_hide_the_html() {
        let raw = crlf(
            "Subject: x\n\
             Content-Type: multipart/alternative; boundary=\"a\"\n\
             \n\
             --a\n\
             Content-Type: text/plain\n\
             \n\
             \x20 \n\
             --a\n\
             Content-Type: text/html\n\
             \n\
             <p>Order <b>4711</b> shipped</p>\n\
             --a--\n",
        );
        let email = parse(&raw);
        assert_eq!(email.text, "Order 4711 shipped\n");
        assert_eq!(email.html, "<p>Order <b>4711</b> shipped</p>\n");
    }

    #[test]
    fn line_endings_are_the_same_whatever_the_route() {
        let lf = b"Subject: x\n\nline one\nline two\n".to_vec();
        let crlf_bytes = b"Subject: x\r\n\r\nline one\r\nline two\r\n".to_vec();
        // A bare-LF file sent over SMTP: the client's CRLF before the final dot stays.
        let smtp_of_lf = b"Subject: x\n\nline one\nline two\n\r\n".to_vec();
        let no_final_newline = b"Subject: x\n\nline one\nline two".to_vec();
        for raw in [lf, crlf_bytes, smtp_of_lf, no_final_newline] {
            assert_eq!(parse(&raw).text, "line one\nline two\n", "{:?}", String::from_utf8_lossy(&raw));
        }
        assert_eq!(normalise_text("a\r\nb\rc\n\n \r\n".into()), "a\nb\nc\n");
        assert_eq!(normalise_text(" \r\n".into()), "");
        // Characters of several bytes around the line endings are kept whole.
        assert_eq!(normalise_text("é\r\n\r€\r\n😀".into()), "é\n\n€\n😀\n");
        assert_eq!(normalise_text("no line end".into()), "no line end\n");
    }
}

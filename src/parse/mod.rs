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
//! The plain-text body is the concatenation of the message's text parts. For HTML-only mail it
//! is the HTML rendered as text by `html2text` (tables keep their cells apart, scripts and
//! styles are dropped). `html` is only ever real HTML from the message; it is never made up
//! from a text part.

use crate::model::{Address, Attachment, Email, Header};
use mail_parser::decoders::charsets::map::charset_decoder;
use mail_parser::parsers::MessageStream;
use mail_parser::{HeaderValue, Message, MessageParser, MessagePart, MimeHeaders, PartType};

/// How deep nested `message/rfc822` parts are followed.
const MAX_NESTING: usize = 8;

/// Width given to the HTML-to-text renderer. Wide, so that lines are not wrapped in the middle
/// of a value a rule wants to extract.
const HTML_TEXT_WIDTH: usize = 400;

/// HTML larger than this is not rendered to text (it is still kept in `html`).
const MAX_HTML_TO_TEXT: usize = 4 * 1024 * 1024;

/// Parses raw RFC 5322 bytes into an [`Email`].
pub fn parse(raw: &[u8]) -> Email {
    let parser = MessageParser::new().default_header_text();
    match parser.parse(raw) {
        Some(message) => convert(&message, 0),
        None => Email {
            problems: vec!["no message could be read from the input".to_string()],
            ..Email::default()
        },
    }
}

fn convert(message: &Message<'_>, depth: usize) -> Email {
    let mut email = Email {
        message_id: message.message_id().unwrap_or_default().to_string(),
        subject: message.subject().unwrap_or_default().to_string(),
        date: message
            .date()
            .filter(|d| d.is_valid())
            .map(|d| d.to_rfc3339())
            .unwrap_or_default(),
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

    email.text = text_body(message, &mut email.problems);
    email.html = html_body(message);

    for (index, part) in message.parts.iter().enumerate() {
        if part.is_encoding_problem {
            email
                .problems
                .push(format!("part {index}: content could not be decoded cleanly"));
        }
        if let Some(charset) = part.content_type().and_then(|ct| ct.attribute("charset"))
            && charset_decoder(charset.as_bytes()).is_none()
            && !is_utf8_alias(charset)
        {
            email
                .problems
                .push(format!("part {index}: unknown charset {charset:?}, read as UTF-8"));
        }
    }

    email.attachments = message
        .attachments()
        .map(|part| attachment(part, depth, &mut email.problems))
        .collect();
    email
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
            Header {
                name: h.name.as_str().to_string(),
                value,
            }
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
            PartType::Text(t) => t.to_string(),
            PartType::Html(h) => html_to_text(h, problems),
            _ => continue,
        };
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&piece);
    }
    text
}

fn html_body(message: &Message<'_>) -> String {
    let mut html = String::new();
    for id in &message.html_body {
        if let Some(MessagePart {
            body: PartType::Html(h),
            ..
        }) = message.parts.get(*id as usize)
        {
            if !html.is_empty() {
                html.push('\n');
            }
            html.push_str(h);
        }
    }
    html
}

/// Renders HTML as readable plain text: block structure kept, tables laid out with their cells
/// apart (padded columns, at least one space between cells), links as their text,
/// `<script>`/`<style>` dropped.
pub fn html_to_text(html: &str, problems: &mut Vec<String>) -> String {
    if html.len() > MAX_HTML_TO_TEXT {
        problems.push(format!(
            "HTML body of {} bytes is too large to render as text",
            html.len()
        ));
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

/// Strips the padding html2text puts at the end of lines and collapses runs of blank lines.
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
        out.push_str(line);
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
    Attachment {
        name,
        content_type,
        size,
        message,
    }
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
        assert_eq!(
            email.from,
            vec![Address {
                address: "ops@example.com".into(),
                name: "Ops Team".into()
            }]
        );
        assert_eq!(email.to.len(), 2);
        assert_eq!(email.to[1].name, "B");
        assert_eq!(email.to[1].address, "b@example.net");
        assert_eq!(email.cc[0].address, "c@example.org");
        assert_eq!(email.reply_to[0].address, "noreply@example.com");
        assert_eq!(email.date, "2026-12-01T09:30:00+01:00");
        assert_eq!(email.message_id, "abc.123@example.com");
        assert_eq!(email.header("x-custom"), Some("hello"));
        assert_eq!(email.text, "The disk is full.\r\n");
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
        assert!(email.html.contains("<table>"));
    }

    #[test]
    fn text_part_is_never_invented_as_html() {
        let email = parse(b"Subject: x\r\n\r\nplain only\r\n");
        assert_eq!(email.html, "");
        assert_eq!(email.text, "plain only\r\n");
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
        assert!(
            email.problems.iter().any(|p| p.contains("x-no-such-charset")),
            "{:?}",
            email.problems
        );
    }

    #[test]
    fn empty_and_garbage_input_do_not_panic() {
        for input in [
            &b""[..],
            b"\r\n",
            b"\x00\xff\xfe",
            b"Subject",
            b":\r\n\r\n",
            b"--\r\n--",
        ] {
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
}

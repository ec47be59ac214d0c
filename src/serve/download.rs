//! What the console and the public pages share when they hand out a stored email's parts.

use axum::http::header;
use axum::response::{IntoResponse, Response};

/// Runs blocking archive, spool or parsing work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("a blocking task does not panic")
}

/// The `n`th attachment of the raw message as a download, or `None` when it has no such
/// attachment. Always `application/octet-stream` with `Content-Disposition: attachment`, so
/// that nothing an email carries is ever shown in our origin, whatever type it claims; the file
/// name keeps only letters, digits, `.`, `-`, `_` and spaces.
pub(crate) async fn attachment(raw: Vec<u8>, n: usize) -> Option<Response> {
    let (name, bytes) = blocking(move || {
        let email = crate::parse::parse(&raw);
        let name = email.attachments.get(n).map(|a| a.name.clone())?;
        crate::parse::attachment_content(&raw, n).map(|bytes| (name, bytes))
    })
    .await?;
    let safe: String =
        name.chars().filter(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '-' | '_' | ' ')).take(100).collect();
    let safe = if safe.trim().is_empty() { format!("attachment-{n}") } else { safe };
    let headers = [
        (header::CONTENT_TYPE, "application/octet-stream".to_string()),
        (header::CONTENT_DISPOSITION, format!("attachment; filename=\"{safe}\"")),
    ];
    Some((headers, bytes).into_response())
}

//! An email's HTML made safe to show: sanitised by `ammonia` (no script, no event handler, no
//! `javascript:` URL, no `<base>`, `<meta>`, `<style>`, `<form>` or frame), links opened in a
//! new tab with `rel="noopener noreferrer"`, remote images removed unless asked for. It is then
//! served from its own path with a CSP that forbids scripts and every load but inline images
//! ([`super::auth::EMAIL_CSP`]), and framed by the console in `<iframe sandbox>`: three
//! independent locks.

use std::borrow::Cow;

/// `html` sanitised; remote images kept only when `remote_images`.
pub fn sanitise(html: &str, remote_images: bool) -> String {
    let mut builder = ammonia::Builder::default();
    builder
        .add_generic_attributes(["style", "align", "bgcolor", "width", "height", "valign"])
        .add_url_schemes(["data"])
        .url_relative(ammonia::UrlRelative::Deny)
        .link_rel(Some("noopener noreferrer"))
        .set_tag_attribute_value("a", "target", "_blank");
    if remote_images {
        builder.attribute_filter(|element, attribute, value| filter(element, attribute, value, true));
    } else {
        builder.attribute_filter(|element, attribute, value| filter(element, attribute, value, false));
    }
    let body = builder.clean(html).to_string();
    format!("<!doctype html><html><head><meta charset=\"utf-8\"></head><body>{body}</body></html>")
}

fn filter<'u>(element: &str, attribute: &str, value: &'u str, remote_images: bool) -> Option<Cow<'u, str>> {
    let lower = value.trim_start().to_ascii_lowercase();
    match (element, attribute) {
        // Inline images always; remote ones only when asked for.
        ("img", "src") if lower.starts_with("data:image/") => Some(value.into()),
        ("img", "src") if remote_images && (lower.starts_with("https:") || lower.starts_with("http:")) => {
            Some(value.into())
        }
        ("img", "src") => None,
        // `data:` is for images only: no data: document behind a link.
        (_, "href") if lower.starts_with("data:") => None,
        // CSS that loads something (url(), @import, expression()) goes; the CSP would stop it
        // anyway.
        (_, "style") if lower.contains("url(") || lower.contains("expression(") || lower.contains("@import") => None,
        _ => Some(value.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOSTILE: &str = r#"<base href="http://127.0.0.1:1/"><meta http-equiv="refresh" content="0;url=http://127.0.0.1:1/">
<script>parent.document.title='pwned'</script><img src=x onerror="alert(1)">
<a href="javascript:alert(1)">js</a><a href="https://example.com/ok">ok</a>
<div style="background:url(http://127.0.0.1:1/css)">css</div><img src="http://127.0.0.1:1/pixel.gif">
<img src="data:image/png;base64,iVBORw0KGgo="><style>body{background:url(http://127.0.0.1:1/s)}</style>
<iframe src="http://127.0.0.1:1/"></iframe><form action="http://127.0.0.1:1/"><input></form>"#;

    #[test]
    fn nothing_active_survives() {
        let out = sanitise(HOSTILE, false).to_ascii_lowercase();
        for gone in [
            "<script",
            "onerror",
            "javascript:",
            "<base",
            "http-equiv",
            "url(",
            "127.0.0.1",
            "<iframe",
            "<form",
            "<style",
        ] {
            assert!(!out.contains(gone), "{gone} survived: {out}");
        }
        assert!(out.contains("data:image/png"), "inline images stay: {out}");
        assert!(out.contains(r#"href="https://example.com/ok""#), "{out}");
        assert!(out.contains(r#"rel="noopener noreferrer""#) && out.contains(r#"target="_blank""#), "{out}");
    }

    #[test]
    fn remote_images_only_when_asked() {
        let html = r#"<img src="https://images.example.com/a.png">"#;
        assert!(!sanitise(html, false).contains("images.example.com"));
        assert!(sanitise(html, true).contains("https://images.example.com/a.png"));
    }
}

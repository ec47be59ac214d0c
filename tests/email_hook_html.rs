//! The email hook's HTML body read by a real HTML5 tokenizer (html5ever's, the one browsers'
//! specification describes), over hostile payloads: whatever the payload holds, the document
//! has exactly one JSON-LD script element, its text is the payload's JSON unchanged, and
//! nothing after it is swallowed.
//!
//! The tokenizer is driven as the HTML5 tree builder drives it: a `<script>` start tag switches
//! it to the script data state, where `<!--`, `<script` and `</script` change its state the
//! way a browser's does. That is where a payload could hide the end of the element.

use html5ever::tendril::StrTendril;
use html5ever::tokenizer::states::RawKind;
use html5ever::tokenizer::{
    BufferQueue, CharacterTokens, EndTag, StartTag, TagToken, Token, TokenSink, TokenSinkResult, Tokenizer,
    TokenizerOpts,
};
use mailhook::deliver::email::html_body;
use serde_json::{Value, json};
use std::cell::RefCell;

/// A script element as the tokenizer delimited it.
#[derive(Debug, Default, Clone)]
struct Script {
    attrs: Vec<(String, String)>,
    text: String,
}

#[derive(Default)]
struct Sink {
    scripts: RefCell<Vec<Script>>,
    in_script: RefCell<bool>,
    /// Start tags seen after the last script element ended (the document's tail).
    tags_after: RefCell<Vec<String>>,
}

impl TokenSink for Sink {
    type Handle = ();

    fn process_token(&self, token: Token, _line: u64) -> TokenSinkResult<()> {
        match token {
            TagToken(tag) if tag.kind == StartTag && &*tag.name == "script" => {
                let attrs = tag.attrs.iter().map(|a| (a.name.local.to_string(), a.value.to_string())).collect();
                self.scripts.borrow_mut().push(Script { attrs, text: String::new() });
                *self.in_script.borrow_mut() = true;
                self.tags_after.borrow_mut().clear();
                return TokenSinkResult::RawData(RawKind::ScriptData);
            }
            TagToken(tag) if tag.kind == EndTag && &*tag.name == "script" => *self.in_script.borrow_mut() = false,
            TagToken(tag) => {
                let name = if tag.kind == EndTag { format!("/{}", tag.name) } else { tag.name.to_string() };
                self.tags_after.borrow_mut().push(name);
            }
            CharacterTokens(text) if *self.in_script.borrow() => {
                self.scripts.borrow_mut().last_mut().expect("in a script").text.push_str(&text);
            }
            _ => {}
        }
        TokenSinkResult::Continue
    }
}

/// Tokenizes `html`: the script elements, whether the last one was closed, and the tags after it.
fn tokenize(html: &str) -> (Vec<Script>, bool, Vec<String>) {
    let tokenizer = Tokenizer::new(Sink::default(), TokenizerOpts::default());
    let input = BufferQueue::default();
    input.push_back(StrTendril::from_slice(html));
    let _ = tokenizer.feed(&input);
    tokenizer.end();
    let sink = &tokenizer.sink;
    let closed = !*sink.in_script.borrow();
    (sink.scripts.borrow().clone(), closed, sink.tags_after.borrow().clone())
}

const HOSTILE: &[&str] = &[
    "<!--<script>",
    "<!--<script>x</script>-->",
    "</script><script>alert(1)</script>",
    "</SCRIPT >",
    "<!-- -->",
    "<!--",
    "-->",
    "<script",
    "</script",
    "<\u{0}script>",
    "&lt;script&gt; &amp; &#x3c;",
    "]]></script><![CDATA[",
    "<!--<script></script><script>",
    "\u{2028}\u{2029} \u{feff}",
    "</style></title><plaintext>",
];

#[test]
fn hostile_payloads_stay_inside_their_script_element() {
    for text in HOSTILE {
        let payload = json!({"id": "01JD4Z6W8Q2M3N4P5R6S7T8V9X", "text": text, "subject": format!("a{text}b"), "n": 1});
        let html = html_body("k\"<ey>&", &payload.to_string());
        let (scripts, closed, after) = tokenize(&html);
        assert_eq!(scripts.len(), 1, "{text:?}: one script element in\n{html}");
        assert!(closed, "{text:?}: the script element was never closed in\n{html}");
        assert_eq!(after, ["/body", "/html"], "{text:?}: the rest of the document is there");
        let script = &scripts[0];
        let attr = |n: &str| script.attrs.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(attr("type"), Some("application/ld+json"));
        assert_eq!(attr("data-kustomer-key"), Some("k\"<ey>&"));
        let back: Value = serde_json::from_str(&script.text)
            .unwrap_or_else(|e| panic!("{text:?}: the script text is not JSON ({e}): {:?}", script.text));
        assert_eq!(back, payload, "{text:?}");
    }
}

#[test]
fn no_markup_character_reaches_the_script_text() {
    let payload = json!({"text": "<a href='x'>&amp;</a>"});
    let html = html_body("k", &payload.to_string());
    let (scripts, _, _) = tokenize(&html);
    assert!(!scripts[0].text.contains(['<', '>', '&']), "{}", scripts[0].text);
    assert!(scripts[0].text.contains("\\u003ca href='x'\\u003e\\u0026amp;\\u003c/a\\u003e"), "{}", scripts[0].text);
}

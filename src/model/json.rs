//! JSON text written straight into a `String`, byte for byte as `serde_json` writes it.
//!
//! The payload of every message is written here: its strings (the whole text body among them)
//! are escaped eight bytes at a time, and the text is never checked for UTF-8 again, as it
//! would be when written through `serde_json`'s byte writer.

use serde_json::Value as Json;

/// A JSON object being written into a buffer: `{`, then `"key":value` pairs, then `}` by
/// [`Object::end`].
pub(crate) struct Object<'o> {
    out: &'o mut String,
    empty: bool,
}

impl<'o> Object<'o> {
    pub(crate) fn new(out: &'o mut String) -> Object<'o> {
        out.push('{');
        Object { out, empty: true }
    }

    /// Writes `"key":` and gives the buffer to write the value into.
    pub(crate) fn key(&mut self, key: &str) -> &mut String {
        self.comma();
        push_str(self.out, key);
        self.out.push(':');
        self.out
    }

    /// [`Object::key`] for a key known to have nothing to escape (the payload's own names,
    /// field names, which are letters, digits and `_`).
    pub(crate) fn name(&mut self, name: &str) -> &mut String {
        debug_assert_eq!(next_escape(name.as_bytes(), 0), name.len(), "{name:?}");
        self.comma();
        self.out.reserve(name.len() + 3);
        self.out.push('"');
        self.out.push_str(name);
        self.out.push_str("\":");
        self.out
    }

    fn comma(&mut self) {
        if !self.empty {
            self.out.push(',');
        }
        self.empty = false;
    }

    /// `"name":"value"`, `name` having nothing to escape (see [`Object::name`]).
    pub(crate) fn str(&mut self, name: &str, value: &str) {
        push_str(self.name(name), value);
    }

    pub(crate) fn end(self) {
        self.out.push('}');
    }
}

/// Appends `value` as serde_json writes it (compact).
pub(crate) fn push_value(out: &mut String, value: &Json) {
    match value {
        Json::Null => out.push_str("null"),
        Json::Bool(true) => out.push_str("true"),
        Json::Bool(false) => out.push_str("false"),
        // A Number displays as it serialises (itoa for integers, ryu for the finite floats a
        // Number can hold).
        Json::Number(n) => {
            use std::fmt::Write;
            let _ = write!(out, "{n}");
        }
        Json::String(s) => push_str(out, s),
        Json::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                push_value(out, item);
            }
            out.push(']');
        }
        Json::Object(map) => {
            let mut object = Object::new(out);
            for (k, v) in map {
                push_value(object.key(k), v);
            }
            object.end();
        }
    }
}

/// Appends `s` as a JSON string, quoted and escaped.
pub(crate) fn push_str(out: &mut String, s: &str) {
    out.push('"');
    push_escaped(out, s);
    out.push('"');
}

/// Appends the items separated by `", "` as one JSON string (what `items.join(", ")` would
/// give, without making it first).
pub(crate) fn push_joined<'a>(out: &mut String, items: impl Iterator<Item = &'a str>) {
    out.push('"');
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        push_escaped(out, item);
    }
    out.push('"');
}

/// Appends `s` escaped as the inside of a JSON string: `"` and `\` get a backslash, control
/// characters their short escape or `\u00XX`; everything else (non-ASCII included) as it is.
pub(crate) fn push_escaped(out: &mut String, s: &str) {
    let bytes = s.as_bytes();
    let mut start = 0;
    loop {
        let at = next_escape(bytes, start);
        // `at` is the length or an ASCII byte: a character boundary either way.
        out.push_str(&s[start..at]);
        let Some(&byte) = bytes.get(at) else { return };
        match byte {
            // Line ends come in pairs in mail text: one step for both.
            b'\r' if bytes.get(at + 1) == Some(&b'\n') => {
                out.push_str("\\r\\n");
                start = at + 2;
                continue;
            }
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            0x08 => out.push_str("\\b"),
            0x0c => out.push_str("\\f"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.push_str("\\u00");
                out.push(char::from(HEX[usize::from(byte >> 4)]));
                out.push(char::from(HEX[usize::from(byte & 0xf)]));
            }
        }
        start = at + 1;
    }
}

/// The index of the first byte at or after `from` that JSON needs escaped, or `bytes.len()`.
fn next_escape(bytes: &[u8], from: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut i = from;
    while let Some(chunk) = bytes.get(i..i + 8) {
        let word = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        // The high bit of each byte that is below 0x20, '"' or '\\'. A bit can be wrong only
        // above a byte rightly flagged (a borrow runs upwards), so the lowest one set is right.
        let below = |x: u64, n: u64| x.wrapping_sub(ONES * n) & !x & HIGH;
        let hits = below(word, 0x20) | below(word ^ (ONES * 0x22), 1) | below(word ^ (ONES * 0x5c), 1);
        if hits != 0 {
            return i + (hits.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    let rest = bytes.get(i..).unwrap_or_default();
    rest.iter().position(|&b| b < 0x20 || b == b'"' || b == b'\\').map_or(bytes.len(), |p| i + p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn escaped(s: &str) -> String {
        let mut out = String::new();
        push_str(&mut out, s);
        out
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        let every_ascii: String = (0u8..0x80).map(char::from).collect();
        for s in [
            "",
            "plain",
            "\"",
            "\\",
            "a\"b\\c\nd\re\tf\u{8}g\u{c}h\u{0}i\u{1f}j\u{7f}",
            "12345678\"12345678\\1234567\n",
            "Grüße, 東京 – \u{2028}</script>",
            every_ascii.as_str(),
        ] {
            assert_eq!(escaped(s), serde_json::to_string(s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn a_byte_to_escape_is_found_at_every_place_of_an_eight_byte_word() {
        for len in 0..20 {
            for at in 0..len {
                for special in ['"', '\\', '\n', '\u{0}', '\u{1f}'] {
                    let s: String = (0..len).map(|i| if i == at { special } else { 'é' }).collect();
                    assert_eq!(escaped(&s), serde_json::to_string(&s).unwrap(), "{s:?}");
                }
            }
        }
    }

    #[test]
    fn joined_items_are_one_string() {
        let mut out = String::new();
        push_joined(&mut out, ["a@x", "b\"@y", ""].into_iter());
        assert_eq!(out, serde_json::to_string("a@x, b\"@y, ").unwrap());
        out.clear();
        push_joined(&mut out, std::iter::empty());
        assert_eq!(out, "\"\"");
    }

    /// Any text, with the characters JSON escapes (and neighbours of theirs) made common.
    fn text() -> impl Strategy<Value = String> {
        let c = prop_oneof![
            any::<char>(),
            (0u8..0x21).prop_map(char::from),
            prop::sample::select(vec!['"', '\\', '\u{7f}', 'é', '€', '😀']),
        ];
        prop::collection::vec(c, 0..40).prop_map(|chars| chars.into_iter().collect())
    }

    fn json() -> impl Strategy<Value = Json> {
        let leaf = prop_oneof![
            Just(Json::Null),
            any::<bool>().prop_map(Json::from),
            any::<i64>().prop_map(Json::from),
            any::<u64>().prop_map(Json::from),
            any::<f64>().prop_map(Json::from), // NaN and infinities become null
            text().prop_map(Json::from),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Json::Array),
                prop::collection::vec((text(), inner), 0..6)
                    .prop_map(|pairs| Json::Object(pairs.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_string_is_escaped_as_serde_json_escapes_it(s in text()) {
            prop_assert_eq!(escaped(&s), serde_json::to_string(&s).unwrap());
        }

        #[test]
        fn any_value_is_written_as_serde_json_writes_it(value in json()) {
            let mut out = String::new();
            push_value(&mut out, &value);
            prop_assert_eq!(out, serde_json::to_string(&value).unwrap());
        }
    }
}

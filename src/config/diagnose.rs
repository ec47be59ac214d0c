//! Where a config error is and what to say about it: key paths, line numbers from the TOML
//! spans, and the nearest valid key for a misspelt one.

use std::borrow::Cow;
use std::fmt;
use toml::de::{DeTable, DeValue};

/// One step of a key path: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Step {
    Key(String),
    Index(usize),
}

/// A dotted key path such as `imap[0].password`, as steps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct KeyPath(pub(super) Vec<Step>);

impl KeyPath {
    pub(super) fn key(&self, key: &str) -> KeyPath {
        let mut steps = self.0.clone();
        steps.push(Step::Key(key.to_string()));
        KeyPath(steps)
    }

    pub(super) fn index(&self, i: usize) -> KeyPath {
        let mut steps = self.0.clone();
        steps.push(Step::Index(i));
        KeyPath(steps)
    }

    /// The path serde_path_to_error followed to an error.
    pub(super) fn from_serde(path: &serde_path_to_error::Path) -> KeyPath {
        use serde_path_to_error::Segment;
        KeyPath(
            path.iter()
                .filter_map(|s| match s {
                    Segment::Seq { index } => Some(Step::Index(*index)),
                    Segment::Map { key } => Some(Step::Key(key.clone())),
                    Segment::Enum { .. } | Segment::Unknown => None,
                })
                .collect(),
        )
    }

    /// Parses what [`Display`](fmt::Display) writes (`destination.ops.url`, `smtp.listen[1]`).
    pub(super) fn parse(s: &str) -> KeyPath {
        let mut steps = Vec::new();
        for part in s.split('.').filter(|p| !p.is_empty()) {
            let (key, mut rest) = part.split_once('[').map_or((part, ""), |(k, r)| (k, r));
            if !key.is_empty() {
                steps.push(Step::Key(key.to_string()));
            }
            while let Some((n, tail)) = rest.split_once(']') {
                if let Ok(i) = n.parse() {
                    steps.push(Step::Index(i));
                }
                rest = tail.strip_prefix('[').unwrap_or(tail);
            }
        }
        KeyPath(steps)
    }

    pub(super) fn starts_with(&self, other: &KeyPath) -> bool {
        self.0.starts_with(&other.0)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, step) in self.0.iter().enumerate() {
            match step {
                Step::Key(k) if i == 0 => write!(f, "{k}")?,
                Step::Key(k) => write!(f, ".{k}")?,
                Step::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// The byte offset where `path` is written in `table`: the key itself when it is there, else
/// the nearest enclosing key or array element that is (a missing key is reported at its table).
pub(super) fn offset_of(table: &DeTable<'_>, path: &KeyPath) -> Option<usize> {
    let mut best = None;
    let mut here: Option<&DeValue<'_>> = None;
    for step in &path.0 {
        let next = match (step, here) {
            (Step::Key(k), None) => table.get_key_value(k.as_str()),
            (Step::Key(k), Some(DeValue::Table(t))) => t.get_key_value(k.as_str()),
            (Step::Index(i), Some(DeValue::Array(a))) => {
                let Some(item) = a.get(*i) else { break };
                best = Some(item.span().start);
                here = Some(item.get_ref());
                continue;
            }
            _ => None,
        };
        let Some((key, value)) = next else { break };
        best = Some(key.span().start);
        here = Some(value.get_ref());
    }
    best
}

/// Removes what `path` names from `table` (an array element takes its whole array with it, so
/// that the indexes of the others stay as written). Returns whether anything was removed.
pub(super) fn remove(table: &mut DeTable<'_>, path: &KeyPath) -> bool {
    let Some(end) = path.0.iter().rposition(|s| matches!(s, Step::Key(_))) else { return false };
    let Step::Key(last) = &path.0[end] else { return false };
    let mut here = table;
    let mut i = 0;
    while i < end {
        let Step::Key(k) = &path.0[i] else { return false };
        let Some(value) = here.get_mut(k.as_str()) else { return false };
        let mut value = value.get_mut();
        while let Some(Step::Index(n)) = path.0.get(i + 1) {
            let DeValue::Array(items) = value else { return false };
            let Some(item) = items.get_mut(*n) else { return false };
            value = item.get_mut();
            i += 1;
        }
        let DeValue::Table(t) = value else { return false };
        here = t;
        i += 1;
    }
    here.remove(last.as_str()).is_some()
}

/// 1-based line of a byte offset.
pub(super) fn line_at(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1
}

/// Applies `f` to every string value, with its key path.
pub(super) fn each_string(
    table: &mut DeTable<'_>,
    at: &KeyPath,
    f: &mut dyn FnMut(&KeyPath, &mut Cow<'_, str>, usize),
) {
    for (key, value) in table.iter_mut() {
        let path = at.key(key.get_ref());
        let start = value.span().start;
        each_value(value.get_mut(), &path, start, f);
    }
}

fn each_value(
    value: &mut DeValue<'_>,
    at: &KeyPath,
    start: usize,
    f: &mut dyn FnMut(&KeyPath, &mut Cow<'_, str>, usize),
) {
    match value {
        DeValue::String(s) => f(at, s, start),
        DeValue::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let start = item.span().start;
                each_value(item.get_mut(), &at.index(i), start, f);
            }
        }
        DeValue::Table(t) => each_string(t, at, f),
        _ => {}
    }
}

/// What serde said about a key it does not know (`unknown field` / `unknown variant`): the
/// name given and the names it expected.
pub(super) fn unknown(message: &str) -> Option<(&'static str, String, Vec<String>)> {
    let (what, rest) = if let Some(r) = message.strip_prefix("unknown field `") {
        ("key", r)
    } else if let Some(r) = message.strip_prefix("unknown variant `") {
        ("value", r)
    } else {
        return None;
    };
    let (name, rest) = rest.split_once('`')?;
    let expected = rest.split_once("expected").map_or("", |(_, e)| e);
    let names = expected.split('`').skip(1).step_by(2).map(str::to_string).collect();
    Some((what, name.to_string(), names))
}

/// The valid name nearest to `given`, when it is near enough to be a slip of the keyboard.
pub(super) fn nearest<'a>(given: &str, valid: &'a [String]) -> Option<&'a str> {
    let (distance, best) = valid.iter().map(|v| (edit_distance(given, v), v.as_str())).min()?;
    let len = given.chars().count();
    (distance < len && (distance <= 2 || distance * 3 <= len)).then_some(best)
}

/// Levenshtein distance, in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != cb)).min(row[j] + 1).min(above + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_insertions_deletions_and_substitutions() {
        assert_eq!(edit_distance("max_sise", "max_size"), 1);
        assert_eq!(edit_distance("lisen", "listen"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn only_a_near_key_is_suggested() {
        let valid: Vec<String> = ["listen", "hostname", "max_size"].iter().map(|s| s.to_string()).collect();
        assert_eq!(nearest("max_sise", &valid), Some("max_size"));
        assert_eq!(nearest("hostnmae", &valid), Some("hostname"));
        assert_eq!(nearest("colour", &valid), None);
        assert_eq!(nearest("ab", &valid), None);
    }

    #[test]
    fn key_paths_read_and_write_the_same() {
        for s in ["smtp.listen[1]", "destination.ops.url", "imap[0].password", "a[1][2].b"] {
            assert_eq!(KeyPath::parse(s).to_string(), s);
        }
    }
}

//! Capture searches for extraction regexes that start with a literal.
//!
//! `regex`'s capture search scans a value forward with a DFA to find where the first match
//! ends, backward to find where it starts, then resolves the groups on that match. Most
//! extraction regexes start with a label (`Tracking Number:\s*(?P<n>...)`): every match
//! begins with one of a few literals. Here those literals are found with `memmem`, and an
//! anchored capture search runs at each place one is found, first place first; the first that
//! matches is the match `regex` finds (no match can start anywhere else, and leftmost-first
//! picks the earliest start). After a few places that do not match, the search goes on
//! unanchored from the next one, so a value full of near misses costs no more than a scan.
//! Tests compare the groups with `regex`'s over many patterns and values.

use super::prefilter::prefix_literals;
use memchr::memmem::Finder;
use regex_automata::{Anchored, Input};
use regex_syntax::hir::Hir;
use regex_syntax::hir::literal::Extractor;

/// More literals than this and the places to try are better found by the regex itself.
const MAX_LITERALS: usize = 4;

/// Anchored attempts that did not match, after which the search goes on unanchored.
const MAX_MISSES: usize = 4;

/// The literals one of which starts every match of a regex.
#[derive(Debug)]
pub(crate) struct Anchor {
    /// None is empty, none starts with another.
    literals: Vec<Finder<'static>>,
}

impl Anchor {
    /// The anchor of a regex, from its parsed form, or `None` when not every match starts
    /// with one of a few literals.
    pub(crate) fn new(hir: &Hir) -> Option<Anchor> {
        let literals = prefix_literals(hir, Extractor::new(), true)?;
        (literals.len() <= MAX_LITERALS)
            .then(|| Anchor { literals: literals.iter().map(|l| Finder::new(l).into_owned()).collect() })
    }

    /// Searches `value` for the first match of the regex this anchor was made from: `search`
    /// runs that regex on each input it is given, and says whether it found a match there,
    /// which this returns.
    pub(crate) fn search(&self, value: &str, search: &mut dyn FnMut(&Input<'_>) -> bool) -> bool {
        let hay = value.as_bytes();
        // Where each literal is found next.
        let mut next = [None; MAX_LITERALS];
        for (n, finder) in next.iter_mut().zip(&self.literals) {
            *n = finder.find(hay);
        }
        let mut from = 0;
        for _ in 0..MAX_MISSES {
            let Some(at) = next.iter().flatten().min().copied() else { return false };
            if search(&Input::new(hay).span(at..hay.len()).anchored(Anchored::Yes)) {
                return true;
            }
            from = at + 1;
            for (n, finder) in next.iter_mut().zip(&self.literals) {
                if *n == Some(at) {
                    *n = finder.find(&hay[from..]).map(|i| from + i);
                }
            }
        }
        // Near misses: the rest unanchored (no match starts before `from`).
        search(&Input::new(hay).span(from..hay.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::load::REGEX_SIZE_LIMIT;
    use super::super::{Pattern, Slots};
    use super::*;
    use proptest::prelude::*;
    use regex::Regex;
    use std::sync::LazyLock;

    /// The anchor of `pattern`, parsed as the rules parse it.
    fn anchor(pattern: &str) -> Option<Anchor> {
        Anchor::new(&regex_automata::util::syntax::parse(pattern).ok()?)
    }

    /// Extraction patterns of the kinds rules use.
    const PATTERNS: &[&str] = &[
        r"Tracking Number:\s*(?P<tracking_number>1Z[0-9A-Z]{16})",
        r"Ship To:\s*(?P<city>[^,\r\n]+),\s*(?P<state>[A-Z]{2}),\s*(?P<country>[A-Z]{2})",
        r"(?m)^Started:\s*(?P<started>[^\r\n]+)",
        r"\bexit (?:code|status) (?P<exit_code>\d+)",
        r"\bOrder (?P<order_id>\d+)",
        r"mailto:(?P<email>[^?<>\s]+)",
        r"(?:Total|Summe):?\s*(?P<amount>\d+(?:[.,]\d{2})?)",
        r"ab(?P<x>a*)b",
        r"aa(?P<x>a)",
        r"a(?P<x>b)?",
        r"(?P<x>a)|(?P<y>ab)c",
        r"x\b(?P<w>\w+)",
        r"Ä(?P<u>.)",
        r"(?m)^(?P<first>[^\r\n]*?\b(?:ERROR|FATAL)\b[^\r\n]*)",
        r"(?i)order (?P<n>\d+)",
        r"(?P<n>\d+)",
    ];

    /// Each pattern as the `regex` crate compiles it, as the rules do, and its anchor.
    static COMPILED: LazyLock<Vec<(Regex, Pattern, Option<Anchor>)>> = LazyLock::new(|| {
        PATTERNS
            .iter()
            .map(|p| (Regex::new(p).unwrap(), Pattern::new(p, REGEX_SIZE_LIMIT).unwrap().0, anchor(p)))
            .collect()
    });

    fn check(value: &str) {
        for (regex, pattern, anchor) in COMPILED.iter() {
            let Some(anchor) = anchor else { continue };
            let expected = regex.captures(value).map(|c| c.iter().map(|m| m.map(|m| m.range())).collect::<Vec<_>>());
            let mut slots = Slots::of(pattern);
            let groups = pattern.regex.group_info().group_len(regex_automata::PatternID::ZERO);
            let got = anchor
                .search(value, &mut |input| pattern.search(input, &mut slots))
                .then(|| (0..groups).map(|i| slots.group(i)).collect::<Vec<_>>());
            assert_eq!(got, expected, "{regex} on {value:?}");
        }
    }

    #[test]
    fn anchors_only_patterns_that_start_with_few_literals() {
        let anchored: Vec<bool> = COMPILED.iter().map(|(_, _, a)| a.is_some()).collect();
        assert!(anchored[..13].iter().all(|&a| a), "{anchored:?}");
        for pattern in [r"(?m)^(?P<first>[^\r\n]*?\bERROR)", r"(?P<n>\d+)", r"(?i)order (?P<n>\d+)", r".(?P<a>y)", ""] {
            assert!(anchor(pattern).is_none(), "{pattern}");
        }
        // `Total` and `Summe`, not their longer forms with `:`.
        assert_eq!(anchor(r"(?:Total|Summe):?\s*(?P<a>\d+)").unwrap().literals.len(), 2);
    }

    #[test]
    fn same_groups_as_the_regex() {
        for value in [
            "",
            "Tracking Number: 1Z999AA10123456784\r\n",
            "Tracking Number: none\r\nTracking Number:\r\n 1Z999AA10123456784",
            "Ship To: Springfield, IL, US\r\nShip To: x, y",
            "Ship To: Springfield, IL\r\nShip To: Portland, OR, US",
            "Started: 2026-12-01 02:00\r\nStarted: later",
            "xStarted: no\nStarted: yes",
            "exit code 3; exit status 4",
            "exitcode 3 and exit status 44",
            "Order 1, Order 22, Orders 3",
            "BigOrder 1 Order 2",
            "mailto:a@example.com?subject=x mailto:b@example.com",
            "Summe: 12,50 Total: 7",
            "Total Summe: 3",
            "abaab abab aab",
            "aaa aa",
            "a ab",
            "abc ac",
            "xé xwörd x_1",
            "ÄÖ Äx Ä",
            "ok\r\nERROR one\r\nFATAL two",
            "a b c d e f g h i j k l m n o p Order x Order y Order z Order w Order v Order 5",
        ] {
            check(value);
        }
    }

    /// A value made of pieces of the patterns' literals and groups, with noise between.
    fn value() -> impl Strategy<Value = String> {
        let pieces = prop::sample::select(vec![
            "Tracking Number:",
            " ",
            "1Z999AA10123456784",
            "Ship To:",
            "Springfield",
            ", ",
            "IL",
            "\r\n",
            "\n",
            "Started:",
            "exit ",
            "code ",
            "status ",
            "42",
            "Order ",
            "mailto:",
            "a@b.c",
            "?",
            "Total",
            "Summe",
            ":",
            "a",
            "b",
            "c",
            "x",
            "é",
            "Ä",
            "ERROR",
            "FATAL",
        ]);
        prop::collection::vec(pieces, 0..12).prop_map(|parts| parts.concat())
    }

    proptest! {
        #[test]
        fn groups_agree_with_the_regex(value in value(), noise in "\\PC{0,4}") {
            check(&value);
            check(&format!("{noise}{value}"));
            check(&format!("{value}{noise}"));
        }
    }
}

//! A cheap necessary condition for a `when` regex on short values (addresses, subject,
//! headers), checked before the regex itself.
//!
//! Most rules of a large rules directory fail on their first `when` key, and a failing regex
//! search on a 50-byte subject still costs a few hundred instructions (more when the regex
//! crate's own prefilter runs a vector search for many case variants of a word). Here the
//! regex's prefix literals are extracted once, at load time, from the pattern with every ASCII
//! letter lower-cased (so `(?i)alert` yields the one literal `alert` instead of 32 case
//! variants): every match of the regex starts with one of those literals, ASCII case ignored.
//! A value that holds none of them cannot match, and the regex is not run.
//!
//! The check is only ever a filter: when it passes, the regex decides. It never rejects a value
//! the regex matches (tests compare both over many patterns and values).

use regex_syntax::hir::literal::{ExtractKind, Extractor};
use regex_syntax::hir::{
    Capture, Class, ClassBytes, ClassBytesRange, ClassUnicode, ClassUnicodeRange, Hir, HirKind, Look, Repetition,
};

/// More needles than this and the regex crate's own search is as good.
const MAX_NEEDLES: usize = 16;

/// Literals one of which every match starts with, ASCII letters lower-cased.
#[derive(Debug)]
pub(crate) struct Prefilter {
    /// The regex can only match at the start of a value (`^` / `\A`, not `(?m)^`).
    anchored: bool,
    /// The length of the shortest needle.
    min_len: usize,
    /// The first bytes of the needles, both cases of a letter: bit `b % 64` of word `b / 64`.
    first: [u64; 4],
    /// The first two bytes of each needle (lower-cased), hashed by `pair`: most places that
    /// start with a needle's first byte are ruled out here, before the needles are read. All
    /// bits are set when a needle is one byte long.
    pairs: [u64; 4],
    /// Lower-cased (ASCII) literals, none empty and none containing another, one after the
    /// other in one block (read in one sweep), each preceded by its length.
    needles: Box<[u8]>,
}

impl Prefilter {
    /// The prefilter of a regex, from its parsed form, or `None` when there is no useful one
    /// (no finite literal set, an empty literal, too many literals).
    pub(crate) fn new(hir: &Hir) -> Option<Prefilter> {
        let anchored = hir.properties().look_set_prefix().contains(Look::Start);
        let folded = fold_ascii(hir);
        // `(?i)` letters such as `s` and `k` stay classes of two after folding (`[sſ]`, `[kK]`),
        // so a few of them multiply the literals past the limit. Cutting each literal at its
        // first class instead keeps a shorter, still selective one (`@pre` of `@prestige`).
        let mut cut_at_classes = Extractor::new();
        cut_at_classes.limit_class(1);
        let kept = prefix_literals(&folded, Extractor::new(), anchored)
            .or_else(|| prefix_literals(&folded, cut_at_classes, anchored))?;
        let mut first = [0u64; 4];
        let mut pairs = [0u64; 4];
        let mut packed = Vec::new();
        for n in &kept {
            for b in [n[0], n[0].to_ascii_uppercase()] {
                set_bit(&mut first, b);
            }
            match n[..] {
                [a, b, ..] => set_bit(&mut pairs, pair(a, b)),
                _ => pairs = [u64::MAX; 4],
            }
            // A literal's prefix is one too: a needle longer than a length byte holds is cut.
            let n = &n[..n.len().min(usize::from(u8::MAX))];
            packed.push(n.len() as u8);
            packed.extend_from_slice(n);
        }
        let min_len = kept.iter().map(|n| n.len().min(usize::from(u8::MAX))).min().unwrap_or(0);
        Some(Prefilter { anchored, min_len, first, pairs, needles: packed.into_boxed_slice() })
    }

    /// The needles, in order.
    fn needles(&self) -> impl Iterator<Item = &[u8]> {
        let mut rest = &self.needles[..];
        std::iter::from_fn(move || {
            let (&len, tail) = rest.split_first()?;
            let (needle, after) = tail.split_at(usize::from(len));
            rest = after;
            Some(needle)
        })
    }

    /// The pairs of bytes its needles start with (see [`add_pairs`]); `None` when a needle
    /// is one byte long, which any value of one byte or more may hold.
    pub(crate) fn pairs(&self) -> Option<&[u64; 4]> {
        (self.pairs != [u64::MAX; 4]).then_some(&self.pairs)
    }

    /// False only if no value whose pairs of bytes are `pairs` (see [`add_pairs`]) can
    /// match: a needle starts with a pair the value holds.
    pub(crate) fn may_meet(&self, pairs: &[u64; 4]) -> bool {
        // All bits: a one-byte needle, which any value of one byte or more may hold.
        self.pairs == [u64::MAX; 4] || share_a_pair(&self.pairs, pairs)
    }

    fn is_first(&self, b: u8) -> bool {
        has_bit(&self.first, b)
    }

    /// Whether a needle starts at `hay[at..]`.
    fn needle_at(&self, hay: &[u8], at: usize) -> bool {
        let rest = &hay[at..];
        let b = rest[0].to_ascii_lowercase();
        if let [_, second, ..] = rest
            && !has_bit(&self.pairs, pair(b, second.to_ascii_lowercase()))
        {
            return false;
        }
        self.needles().any(|n| {
            n[0] == b
                && rest.len() >= n.len()
                // The second byte alone rules out most places before the whole comparison.
                && (n.len() == 1 || n[1] == rest[1].to_ascii_lowercase())
                && rest[..n.len()].eq_ignore_ascii_case(n)
        })
    }

    /// False only if the regex cannot match `value`.
    pub(crate) fn may_match(&self, value: &str) -> bool {
        let hay = value.as_bytes();
        if hay.len() < self.min_len {
            return false;
        }
        if self.anchored {
            return self.is_first(hay[0]) && self.needle_at(hay, 0);
        }
        (0..=hay.len() - self.min_len).any(|at| self.is_first(hay[at]) && self.needle_at(hay, at))
    }
}

/// The prefix literals of `hir` as `extractor` finds them (one of them starts every match),
/// without the ones another implies, or `None` when there is no finite set of at most
/// `MAX_NEEDLES` non-empty ones. `anchored`: each is looked for at one place only (the start
/// of a value, or of a match), so one that starts with a kept one is implied; otherwise one
/// that holds a kept one anywhere is.
pub(super) fn prefix_literals(hir: &Hir, mut extractor: Extractor, anchored: bool) -> Option<Vec<Box<[u8]>>> {
    let seq = extractor.kind(ExtractKind::Prefix).extract(hir);
    let mut needles: Vec<Vec<u8>> = seq.literals()?.iter().map(|l| l.as_bytes().to_vec()).collect();
    if needles.is_empty() || needles.iter().any(Vec::is_empty) {
        return None;
    }
    // Shortest first, so that a needle is only kept when no shorter kept one is in it
    // (any value holding the longer one holds the shorter one too).
    needles.sort_by(|a, b| a.len().cmp(&b.len()).then_with(|| a.cmp(b)));
    needles.dedup();
    let mut kept: Vec<Box<[u8]>> = Vec::new();
    for n in needles {
        let implied = kept.iter().any(|k| if anchored { n.starts_with(k) } else { contains(&n, k) });
        if !implied {
            kept.push(n.into_boxed_slice());
        }
    }
    (kept.len() <= MAX_NEEDLES).then_some(kept)
}

/// Adds the pairs of neighbouring bytes of `value` (ASCII letters lower-cased) to `pairs`, as
/// the prefilters' `pairs` keep those their needles start with. Made once per message for a
/// target, the set rules out most prefilters without their scanning the values.
pub(crate) fn add_pairs(pairs: &mut [u64; 4], value: &str) {
    let mut bytes = value.bytes().map(|b| b.to_ascii_lowercase());
    if let Some(mut previous) = bytes.next() {
        for b in bytes {
            set_bit(pairs, pair(previous, b));
            previous = b;
        }
    }
}

/// Whether two sets of pairs (see [`add_pairs`]) have one in common.
pub(crate) fn share_a_pair(a: &[u64; 4], b: &[u64; 4]) -> bool {
    a.iter().zip(b).any(|(a, b)| a & b != 0)
}

/// Where the two bytes `a`, `b` are in a 256-bit set of pairs.
fn pair(a: u8, b: u8) -> u8 {
    a.wrapping_mul(31) ^ b
}

fn set_bit(bits: &mut [u64; 4], b: u8) {
    bits[usize::from(b / 64)] |= 1 << (b % 64);
}

fn has_bit(bits: &[u64; 4], b: u8) -> bool {
    bits[usize::from(b / 64)] & (1 << (b % 64)) != 0
}

/// Whether `hay` contains `needle` exactly.
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// `hir` with every ASCII upper-case letter replaced by its lower-case one, in literals and
/// classes. It matches the lower-cased form of every value `hir` matches, at the same places.
fn fold_ascii(hir: &Hir) -> Hir {
    match hir.kind() {
        HirKind::Empty => Hir::empty(),
        HirKind::Literal(lit) => Hir::literal(lit.0.to_ascii_lowercase()),
        HirKind::Class(Class::Unicode(class)) => Hir::class(Class::Unicode(fold_unicode_class(class))),
        HirKind::Class(Class::Bytes(class)) => Hir::class(Class::Bytes(fold_bytes_class(class))),
        HirKind::Look(look) => Hir::look(*look),
        HirKind::Repetition(rep) => Hir::repetition(Repetition { sub: Box::new(fold_ascii(&rep.sub)), ..rep.clone() }),
        HirKind::Capture(cap) => Hir::capture(Capture { sub: Box::new(fold_ascii(&cap.sub)), ..cap.clone() }),
        HirKind::Concat(subs) => Hir::concat(subs.iter().map(fold_ascii).collect()),
        HirKind::Alternation(subs) => Hir::alternation(subs.iter().map(fold_ascii).collect()),
    }
}

/// Splits `[start, end]` around `A-Z`: the parts outside it as they are, the part inside it
/// moved to `a-z`.
fn fold_range(start: u32, end: u32, mut push: impl FnMut(u32, u32)) {
    let (upper_a, upper_z) = (u32::from(b'A'), u32::from(b'Z'));
    let to_lower = u32::from(b'a' - b'A');
    if start < upper_a {
        push(start, end.min(upper_a - 1));
    }
    if start <= upper_z && end >= upper_a {
        push(start.max(upper_a) + to_lower, end.min(upper_z) + to_lower);
    }
    if end > upper_z {
        push(start.max(upper_z + 1), end);
    }
}

fn fold_unicode_class(class: &ClassUnicode) -> ClassUnicode {
    let mut ranges = Vec::new();
    for r in class.ranges() {
        fold_range(u32::from(r.start()), u32::from(r.end()), |s, e| {
            // Both ends are chars of the original range or ASCII letters: valid chars.
            if let (Some(s), Some(e)) = (char::from_u32(s), char::from_u32(e)) {
                ranges.push(ClassUnicodeRange::new(s, e));
            }
        });
    }
    ClassUnicode::new(ranges)
}

fn fold_bytes_class(class: &ClassBytes) -> ClassBytes {
    let mut ranges = Vec::new();
    for r in class.ranges() {
        fold_range(u32::from(r.start()), u32::from(r.end()), |s, e| {
            if let (Ok(s), Ok(e)) = (u8::try_from(s), u8::try_from(e)) {
                ranges.push(ClassBytesRange::new(s, e));
            }
        });
    }
    ClassBytes::new(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use regex::Regex;
    use std::sync::LazyLock;

    /// The prefilter of `pattern`, parsed as the rules parse it.
    fn prefilter(pattern: &str) -> Option<Prefilter> {
        Prefilter::new(&regex_automata::util::syntax::parse(pattern).ok()?)
    }

    /// Patterns of the kinds rules use on short values.
    const PATTERNS: &[&str] = &[
        r"(?i)\b(?:alert|warning|threshold|quota)\b",
        r"(?i)^(?:Invoice|Rechnung|Facture|Factura)\s+(?:No\.?|Nr\.?|#)\s*[A-Z]{0,3}-?\d{4,}",
        r"^\[(?:ACME|Acme)(?:-| )(?:Ticket|Case|Incident)\s*#?\d+\]\s*(?:New|Updated|Resolved|Closed)\b",
        r"^\[ACME-CI\] (?:Build|Pipeline|Deploy) #?\d+ (?:failed|errored|timed out)\b",
        r"(?i)@acme(?:-logistics)?\.example\.(?:com|de|fr)$",
        r"(?i)@prestige(?:-logistics)?\.example\.(?:com|de|fr)$",
        r"(?i)^(?:alerts|notifications|no-?reply)@stark\.example\.io$",
        r"(?i)(?:risk|kiosk|task)s? (?:ask|desk)",
        r"(?i)@(?:billing\.|mail\.|noreply\.)?acme\.example\.(?:com|net|de)$",
        r"(?i)^(?:alerts|notifications|no-?reply)@acme\.example\.io$",
        r"(?i)^[a-z0-9._-]+@(?:[a-z0-9-]+\.)*example\.(?:com|de|net|org)$",
        r"^v1=[0-9a-f]{64}$",
        r"(?i)@ups\.com$",
        r"@ups\.com$",
        r"(?i)^UPS Update:.* Order \d+",
        r"^(nagios|icinga)@monitor\.example\.com$",
        r"(?i)oscommerce",
        r"^Cron <[^>]+> ",
        r"(?i)thresholds",
        r"(?i)kelvin|straße",
        r"(?i)[Ä-Öx]yz",
        r"(?i:A)B[C-Fa]",
        r"(?m)^Status: FAILED$",
        r"\Aexact\z",
        r"(?i)^",
        r"x*",
        r"",
        r"[^\s\S]",
        r"\bJob\b|(?i)job-\d+",
        r"@|\.example",
    ];

    const VALUES: &[&str] = &[
        "",
        "** PROBLEM Service Alert: web01.example.com/HTTP is CRITICAL **",
        "Disk QUOTA exceeded",
        "quotas",
        "Invoice No. ABC-12345",
        "INVOICE nr 123456",
        "invoice",
        "[ACME Ticket #12] Updated",
        "[Acme-Case 7] Closed now",
        "[ACME-CI] Build #88 failed",
        "ops@ACME-LOGISTICS.example.DE",
        "billing@mail.acme.example.com",
        "No-Reply@Acme.Example.IO",
        "ops@PRESTIGE-logistics.example.fr",
        "ops@pre\u{17F}tige-logi\u{17F}tic\u{17F}.example.com",
        "ALERT\u{17F}@\u{17F}tar\u{212A}.example.io",
        "notifications@STARK.example.io",
        "KIOSKS DESK",
        "ri\u{17F}\u{212A} a\u{17F}\u{212A}",
        "root@batch01.example.com",
        "v1=0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "pkginfo@UPS.com",
        "pkginfo@ups.com",
        "ups update: something Order 4711",
        "nagios@monitor.example.com",
        "X-Mailer: osCommerce 2.2",
        "Cron <root@batch01> /usr/local/bin/x",
        "THRESHOLDS and thre\u{17F}holds",
        "\u{212A}ELVIN scale",
        "STRASSE or STRAẞE or straße",
        "CAFé",
        "äYZ öyz ÖYZ",
        "aBc ABf",
        "line\nStatus: FAILED\n",
        "exact",
        "a Job here",
        "JOB-42",
        "@",
    ];

    /// Every pattern compiled, with its prefilter.
    static COMPILED: LazyLock<Vec<(Regex, Option<Prefilter>)>> =
        LazyLock::new(|| PATTERNS.iter().map(|p| (Regex::new(p).expect("pattern compiles"), prefilter(p))).collect());

    fn check(value: &str) {
        for (regex, pre) in COMPILED.iter() {
            if let Some(pre) = pre
                && regex.is_match(value)
            {
                assert!(pre.may_match(value), "prefilter {pre:?} of {regex} rejects {value:?}, which matches");
                for values in [&[value][..], &[value, "other"]] {
                    let mut pairs = [0; 4];
                    values.iter().for_each(|v| add_pairs(&mut pairs, v));
                    assert!(pre.may_meet(&pairs), "pairs of {regex}'s prefilter reject {value:?}, which matches");
                }
            }
        }
    }

    #[test]
    fn never_rejects_a_matching_value() {
        for value in VALUES {
            check(value);
        }
        assert!(COMPILED.iter().filter(|(_, pre)| pre.is_some()).count() > PATTERNS.len() / 2);
    }

    #[test]
    fn rejects_values_without_the_literals() {
        let pre = prefilter(r"(?i)\b(?:alert|warning|threshold|quota)\b").expect("a prefilter");
        // alert, quota, warning, threshold and its long-s variant (`(?i)s` also matches `ſ`).
        assert_eq!(pre.needles().count(), 5, "{pre:?}");
        assert!(pre.may_match("Service ALERT"));
        assert!(!pre.may_match("Your statement for November 2026 is ready"));
        let pre = prefilter(r"^\[ACME-CI\] (?:Build|Pipeline) #?\d+").expect("a prefilter");
        assert!(pre.anchored);
        assert!(!pre.may_match("Re: [ACME-CI] Build #1"), "anchored at the start");
        assert!(pre.may_match("[acme-ci] build 1"), "case is ignored: the regex decides");
        let pre = prefilter(r"(?i)@acme(?:-logistics)?\.example\.(?:com|de|fr)$").expect("a prefilter");
        assert!(!pre.may_match("orders@globex.example.com"));
        // Each `s` may be `ſ` too: the literals are cut at the first one rather than multiplied.
        let pre = prefilter(r"(?i)@prestige(?:-logistics)?\.example\.(?:com|de|fr)$").expect("a prefilter");
        assert_eq!(pre.needles().collect::<Vec<_>>(), vec![b"@pre"]);
        assert!(!pre.may_match("orders@globex.example.com"));
        assert!(pre.may_match("ops@pre\u{17F}tige.example.com"));
        // Nothing to filter on: every value may match.
        for pattern in [r"x*", r"", r"(?i)^[a-z0-9._-]+@example\.com$", r"(?m)^", r"."] {
            assert!(prefilter(pattern).is_none(), "{pattern}");
        }
    }

    #[test]
    fn needles_are_found_anywhere_in_any_case() {
        let pre = prefilter(r"(?i)alert|\[x").expect("a prefilter");
        for value in ["xxALErt", "alert", "[X", "a[x", "aaALERT"] {
            assert!(pre.may_match(value), "{value}");
        }
        for value in ["", "aler", "alerAlerAler", "x[", "[", "a"] {
            assert!(!pre.may_match(value), "{value}");
        }
        let pre = prefilter("\u{212A}").expect("a prefilter");
        assert!(pre.may_match("x\u{212A}y"));
        assert!(!pre.may_match("xky"));
    }

    /// A value built from pieces of the patterns' literals, in any case, with noise between.
    fn value() -> impl Strategy<Value = String> {
        let pieces = prop::sample::select(vec![
            "alert",
            "quota",
            "Invoice",
            "No. ",
            "ABC-",
            "1234",
            "[ACME",
            "-CI] ",
            "Build ",
            "#",
            "@",
            "acme",
            ".example.",
            "com",
            "de",
            "ups",
            "UPS Update:",
            " Order ",
            "oscommerce",
            "Cron <",
            "> ",
            "\u{212A}",
            "ſ",
            "prestige",
            "-logistics",
            "stark",
            "kiosk",
            "desk",
            "é",
            "Ä",
            " ",
            "\n",
            "v1=",
            "Job",
            "job-",
            "straße",
        ]);
        prop::collection::vec((pieces, any::<bool>()), 0..8).prop_map(|parts| {
            parts.into_iter().map(|(p, upper)| if upper { p.to_uppercase() } else { p.to_string() }).collect()
        })
    }

    proptest! {
        #[test]
        fn prefilter_agrees_with_the_regex(value in value(), noise in "\\PC{0,6}") {
            check(&value);
            check(&format!("{noise}{value}"));
            check(&format!("{value}{noise}"));
        }
    }
}

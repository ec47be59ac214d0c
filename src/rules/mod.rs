//! rules: `rules/*.toml` → a compiled [`RuleSet`]; `(&Email, &Envelope) → Outcome`.
//!
//! ```text
//! parse ─► Email + Envelope ─► rules ─► Outcome { rule, action, payload } ─► deliver
//! ```
//!
//! Loading ([`RuleSet::load_dir`]) reads every `*.toml` file of a directory in name order and
//! compiles every regex and template once. It reports *all* errors of all files together, each
//! naming the file, the line, the rule and the key. Evaluation ([`RuleSet::evaluate`]) is pure:
//!
//! 1. rules run in file order, then in order within a file; the first whose every `when` key
//!    matches (regex search; multi-valued keys such as `to` hold when any value matches) wins;
//! 2. `[rule.extract]` regexes run in order; named groups become fields, the first value found
//!    for a name wins;
//! 3. required fields that extraction alone provides are checked; then `[rule.fields]` are
//!    computed in order (each sees the ones before it, and may replace an extracted field);
//!    then the remaining required fields are checked. A missing field (absent, null or empty)
//!    or a failing template makes the message a dead letter with the reason;
//! 4. the payload is `[rule.payload]` if the rule has one, else the default payload.
//!
//! Templates are minijinja, sandboxed: no loader (no file access), no network, a fuel limit
//! on every evaluation.
//!
//! Shortcuts that never change a result: a `when` regex on a short value is preceded by a
//! literal check (`prefilter`); identical patterns are compiled once and a `when` condition
//! shared by several rules is evaluated once per message; a rule whose first check on the
//! sender, recipients or subject cannot hold is passed over on its byte pairs (`Screen`); an
//! extraction regex that starts with a literal is searched from where the literal is found
//! (`anchor`); a group that is the whole match, or ends the regex, is found with DFAs instead
//! of a capture search (`Shape`, `Split`); simple templates and expressions are computed
//! without the template engine (`fast`), which still decides whenever a value is not plain.

mod anchor;
mod context;
mod fast;
mod load;
mod payload;
mod prefilter;

use crate::model::{Action, Email, Envelope, Outcome, Payload};
use regex_automata::util::pool::Pool;
use regex_automata::util::primitives::NonMaxUsize;
use regex_automata::{Input as Haystack, PatternID};
use regex_automata::{hybrid, meta};
use regex_syntax::hir::Hir;
use serde_json::Value as Json;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use load::RULE_FILE_EXTENSION;
use payload::default_payload;

/// What happens to a message that no rule matches (`[rules] unmatched`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unmatched {
    /// Keep it as a dead letter, for replay once a rule exists.
    Dead,
    /// Discard it.
    Drop,
    /// Deliver the default payload (with `"rule": null`) to this destination.
    Deliver(String),
}

impl Unmatched {
    /// Parses the config value: `dead`, `drop`, or a destination name.
    pub fn from_config(value: &str) -> Unmatched {
        match value {
            "dead" => Unmatched::Dead,
            "drop" => Unmatched::Drop,
            other => Unmatched::Deliver(other.to_string()),
        }
    }
}

/// One problem found while loading rules: where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// The rule's name, or `#N` (1-based position in its file) when it has no valid name.
    pub rule: Option<String>,
    /// The key inside the rule (`when.subject`, `extract.body[1]`, `fields.total`).
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(rule) = &self.rule {
            if rule.starts_with('#') {
                write!(f, ": rule {rule}")?;
            } else {
                write!(f, ": rule {rule:?}")?;
            }
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// What a `when` or `extract` key looks at.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Target {
    From,
    To,
    Cc,
    Recipient,
    Source,
    Subject,
    Body,
    Html,
    Attachment,
    Header(String),
}

impl Target {
    pub(crate) fn parse(key: &str) -> Option<Target> {
        Some(match key {
            "from" => Target::From,
            "to" => Target::To,
            "cc" => Target::Cc,
            "recipient" => Target::Recipient,
            "source" => Target::Source,
            "subject" => Target::Subject,
            "body" => Target::Body,
            "html" => Target::Html,
            "attachment" => Target::Attachment,
            _ => {
                let name = key.strip_prefix("header.")?;
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
                    return None;
                }
                Target::Header(name.to_ascii_lowercase())
            }
        })
    }

    /// Relative cost of matching: short values first, whole bodies last.
    fn cost(&self) -> u8 {
        match self {
            Target::Source | Target::Subject => 0,
            Target::From | Target::To | Target::Cc | Target::Recipient => 1,
            Target::Header(_) => 2,
            Target::Attachment => 3,
            Target::Body => 4,
            Target::Html => 5,
        }
    }

    /// Whether values of this target are short (addresses, subject, headers, names): worth a
    /// literal check before the regex.
    fn is_short(&self) -> bool {
        !matches!(self, Target::Body | Target::Html)
    }

    /// Calls `f` on each value of this target until it returns true; true if one did.
    fn any<'s>(&self, input: &'s Input<'_>, mut f: impl FnMut(&'s str) -> bool) -> bool {
        let email = input.email;
        match self {
            Target::From => email.from.iter().any(|a| f(&a.address)),
            Target::To => email.to.iter().any(|a| f(&a.address)),
            Target::Cc => email.cc.iter().any(|a| f(&a.address)),
            Target::Recipient => input.envelope.recipients.iter().any(|r| f(r)),
            Target::Source => f(input.source.get_or_init(|| input.envelope.source.to_string())),
            Target::Subject => f(&email.subject),
            Target::Body => f(&email.text),
            Target::Html => f(&email.html),
            Target::Attachment => email.attachments.iter().any(|a| f(&a.name)),
            Target::Header(name) => email.headers.iter().any(|h| h.name.eq_ignore_ascii_case(name) && f(&h.value)),
        }
    }
}

/// The message under evaluation, with values derived once.
struct Input<'a> {
    email: &'a Email,
    envelope: &'a Envelope,
    /// `envelope.source` as rules see it, made when a rule first asks.
    source: std::cell::OnceCell<String>,
    /// The pairs of neighbouring bytes in the sender, recipient and subject values, made when
    /// a prefilter first asks (see `prefilter::add_pairs`).
    pairs: [std::cell::OnceCell<[u64; 4]>; 4],
}

impl Input<'_> {
    /// The pairs of bytes in the values of the target of `slot` (see [`pairs_slot`]).
    fn pairs(&self, slot: usize) -> &[u64; 4] {
        self.pairs[slot].get_or_init(|| {
            let mut pairs = [0; 4];
            PAIRS_TARGETS[slot].any(self, |value| {
                prefilter::add_pairs(&mut pairs, value);
                false // every value
            });
            pairs
        })
    }
}

/// The targets whose byte pairs a message gathers when a prefilter first asks (the targets
/// most rules look at first), in the order of `Input::pairs`.
const PAIRS_TARGETS: [Target; 4] = [Target::From, Target::To, Target::Cc, Target::Subject];

/// Where the byte pairs of `target`'s values are kept in `Input::pairs`, if they are.
fn pairs_slot(target: &Target) -> Option<usize> {
    PAIRS_TARGETS.iter().position(|t| t == target)
}

/// A regex of the rules, compiled once (the engine behind the `regex` crate's `Regex`, used
/// directly so that extraction can also search it anchored), with its text.
#[derive(Debug)]
pub(crate) struct Pattern {
    text: String,
    regex: meta::Regex,
}

impl Pattern {
    /// Compiles `text` as `regex::Regex` would, within `size_limit` bytes of automata, and
    /// gives its parsed form too: the literal checks (`prefilter`, `anchor`) are made from it
    /// without parsing the pattern again. The error is worded as the `regex` crate words it.
    fn new(text: &str, size_limit: usize) -> Result<(Pattern, Hir), String> {
        let hir = regex_automata::util::syntax::parse(text).map_err(|e| e.to_string())?;
        let regex = meta::Builder::new()
            .configure(meta::Config::new().nfa_size_limit(Some(size_limit)))
            .build_from_hir(&hir)
            .map_err(|e| match e.size_limit() {
                Some(limit) => format!("Compiled regex exceeds size limit of {limit} bytes."),
                None => e.to_string(),
            })?;
        Ok((Pattern { text: text.to_string(), regex }, hir))
    }

    fn as_str(&self) -> &str {
        &self.text
    }

    fn is_match(&self, value: &str) -> bool {
        self.regex.is_match(value)
    }

    /// Its named groups: `(group index, name)`, in group order.
    fn names(&self) -> impl Iterator<Item = (usize, &str)> {
        self.regex.group_info().pattern_names(PatternID::ZERO).enumerate().filter_map(|(i, n)| Some((i, n?)))
    }

    /// Searches `input` for the first match, its groups going into `slots`; true if found.
    fn search(&self, input: &Haystack<'_>, slots: &mut Slots) -> bool {
        self.regex.search_slots(input, slots.as_mut()).is_some()
    }
}

/// Where a capture search puts the groups it finds: a start and an end for each group (group
/// `i` in slots `2i` and `2i + 1`). On the stack for the regexes of every rule but those with
/// very many groups: no allocation per search.
struct Slots {
    small: [Option<NonMaxUsize>; Slots::SMALL],
    large: Vec<Option<NonMaxUsize>>,
    len: usize,
}

impl Slots {
    const SMALL: usize = 32;

    /// Room for the groups of `pattern`.
    fn of(pattern: &Pattern) -> Slots {
        let len = pattern.regex.group_info().slot_len();
        let large = if len > Slots::SMALL { vec![None; len] } else { Vec::new() };
        Slots { small: [None; Slots::SMALL], large, len }
    }

    fn as_mut(&mut self) -> &mut [Option<NonMaxUsize>] {
        if self.len > Slots::SMALL { &mut self.large } else { &mut self.small[..self.len] }
    }

    /// Where group `i` of the last match found is, if it took part in the match.
    fn group(&self, i: usize) -> Option<std::ops::Range<usize>> {
        let slots = if self.len > Slots::SMALL { &self.large[..] } else { &self.small[..self.len] };
        Some(slots.get(2 * i)?.as_ref()?.get()..slots.get(2 * i + 1)?.as_ref()?.get())
    }
}

#[derive(Debug)]
struct Matcher {
    target: Target,
    /// `pairs_slot(&target)`.
    pairs_slot: Option<usize>,
    regex: Arc<Pattern>,
    /// A necessary condition checked before the regex (short targets only).
    prefilter: Option<prefilter::Prefilter>,
    /// The slot of the message's memo that keeps the result, when other rules have the same
    /// condition.
    memo: Option<usize>,
}

impl Matcher {
    /// The condition that `regex` (parsed as `hir`) matches a value of `target`.
    fn new(target: Target, regex: Arc<Pattern>, hir: &Hir) -> Matcher {
        let prefilter = if target.is_short() { prefilter::Prefilter::new(hir) } else { None };
        Matcher { pairs_slot: pairs_slot(&target), target, regex, prefilter, memo: None }
    }

    /// Whether the regex matches one of the target's values.
    fn matches(&self, input: &Input<'_>, memo: &mut Memo) -> bool {
        if let Some(known) = self.memo.and_then(|slot| memo.get(slot)) {
            return known;
        }
        let matched = match &self.prefilter {
            Some(pre) if self.pairs_slot.is_some_and(|slot| !pre.may_meet(input.pairs(slot))) => false,
            Some(pre) => self.target.any(input, |v| pre.may_match(v) && self.regex.is_match(v)),
            None => self.target.any(input, |v| self.regex.is_match(v)),
        };
        if let Some(slot) = self.memo {
            memo.set(slot, matched);
        }
        matched
    }
}

/// The `when` conditions of every rule, rule after rule in one block: a message looking for
/// its rule reads them in order, instead of following a pointer from each rule to a list of
/// its own.
#[derive(Debug, Default)]
struct Conditions {
    all: Vec<Matcher>,
    /// For each rule, where its conditions end in `all` (they start where the previous rule's
    /// end), and its screen.
    rules: Vec<(usize, Option<Screen>)>,
}

impl Conditions {
    /// Adds the conditions of the next rule.
    fn push(&mut self, when: Vec<Matcher>) {
        let screen = when.iter().find_map(Screen::of);
        self.all.extend(when);
        self.rules.push((self.all.len(), screen));
    }
}

/// The first check of a rule: the pairs of neighbouring bytes one of which a value of a target
/// must hold for one of its conditions to hold (see `prefilter::add_pairs`). Most rules are
/// passed over on these few words alone, without reading their conditions.
#[derive(Debug, Clone, Copy)]
struct Screen {
    /// Of the target, in `Input::pairs`.
    slot: usize,
    pairs: [u64; 4],
}

impl Screen {
    fn of(m: &Matcher) -> Option<Screen> {
        Some(Screen { slot: m.pairs_slot?, pairs: *m.prefilter.as_ref()?.pairs()? })
    }

    /// False only if the condition it was made from cannot hold for the message.
    fn passes(&self, input: &Input<'_>) -> bool {
        prefilter::share_a_pair(&self.pairs, input.pairs(self.slot))
    }
}

/// The results of the `when` conditions that several rules share, for one message.
enum Memo {
    /// Up to 64 slots, in two words: no allocation for every message.
    Bits {
        known: u64,
        matched: u64,
    },
    Slots(Vec<Option<bool>>),
}

impl Memo {
    fn new(slots: usize) -> Memo {
        if slots <= 64 { Memo::Bits { known: 0, matched: 0 } } else { Memo::Slots(vec![None; slots]) }
    }

    fn get(&self, slot: usize) -> Option<bool> {
        match self {
            Memo::Bits { known, matched } => (known >> slot & 1 == 1).then_some(matched >> slot & 1 == 1),
            Memo::Slots(slots) => slots[slot],
        }
    }

    fn set(&mut self, slot: usize, value: bool) {
        match self {
            Memo::Bits { known, matched } => {
                *known |= 1 << slot;
                *matched = *matched & !(1 << slot) | u64::from(value) << slot;
            }
            Memo::Slots(slots) => slots[slot] = Some(value),
        }
    }
}

#[derive(Debug)]
struct Extractor {
    target: Target,
    regexes: Vec<Extraction>,
}

/// One extraction regex and its named groups: `(group index, name)`, in group order.
#[derive(Debug)]
struct Extraction {
    regex: Arc<Pattern>,
    /// The literals every match starts with, when there are a few (see `anchor`).
    anchor: Option<anchor::Anchor>,
    groups: Vec<(usize, String)>,
    shape: Shape,
}

/// How an extraction finds its groups once it has found the match.
#[derive(Debug)]
enum Shape {
    /// A capture search (onepass DFA, backtracker or PikeVM, as the regex engine picks).
    Groups,
    /// The regex's one group is the whole match (see [`is_whole_match_group`]): the match
    /// alone gives its text.
    Whole,
    /// The regex's one group ends it (`Label:\s*(?P<value>[^\r\n]+)`, see [`last_group`]): the split that finds
    /// the group (see [`Split`]), made when the regex first matches. Most rules of a large
    /// rules directory match rarely; their splits would take memory and load time for nothing.
    Suffix(std::sync::OnceLock<Option<Split>>),
}

/// A regex cut where its one group begins: what comes before the group (the head), and the
/// group with the zero-width assertions after it (the tail), each a lazy DFA of its own.
///
/// A backtracking search takes the first complete way through the regex in priority order;
/// every way starts with a way through the head, so the first complete way through the head
/// (the head's own match from the match's start) comes first, and if the tail matches where
/// it ends, that is where the group begins, and the tail's own match ends it. Two DFA scans
/// replace the backtracker, which costs much more per byte. When the tail does not match
/// there (the head has to give some text back), or a DFA gives up (a Unicode `\b` next to
/// non-ASCII text), the groups are resolved as usual.
struct Split {
    head: Forward,
    tail: Forward,
}

impl fmt::Debug for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Split")
    }
}

/// A lazy DFA searched forward, anchored, for where its match ends; with a cache per thread.
struct Forward {
    dfa: Arc<hybrid::dfa::DFA>,
    caches: Pool<hybrid::dfa::Cache, Box<dyn Fn() -> hybrid::dfa::Cache + Send + Sync>>,
}

impl Forward {
    fn new(hir: &Hir) -> Option<Forward> {
        use regex_automata::nfa::thompson;
        let nfa = thompson::Compiler::new()
            .configure(
                thompson::Config::new()
                    .nfa_size_limit(Some(load::REGEX_SIZE_LIMIT))
                    .which_captures(thompson::WhichCaptures::None),
            )
            .build_from_hir(hir)
            .ok()?;
        let config = hybrid::dfa::Config::new().unicode_word_boundary(true);
        let dfa = Arc::new(hybrid::dfa::DFA::builder().configure(config).build_from_nfa(nfa).ok()?);
        let for_caches = Arc::clone(&dfa);
        let caches = Pool::new(Box::new(move || for_caches.create_cache()) as Box<dyn Fn() -> _ + Send + Sync>);
        Some(Forward { dfa, caches })
    }

    /// Where the first match starting at `at` ends, if there is one and the DFA can tell.
    fn end(&self, value: &str, at: usize) -> Option<usize> {
        let input = Haystack::new(value).span(at..value.len()).anchored(regex_automata::Anchored::Yes);
        let found = self.dfa.try_search_fwd(&mut self.caches.get(), &input);
        Some(found.ok()??.offset())
    }
}

impl Split {
    /// The split of `pattern` (a regex whose one group ends it, see [`last_group`]), unless
    /// the regex engine resolves its groups with a onepass DFA, which takes one scan of the
    /// match as the split does.
    fn new(pattern: &str) -> Option<Split> {
        let hir = regex_automata::util::syntax::parse(pattern).ok()?;
        let (head, group, after) = last_group(&hir)?;
        if is_onepass(&hir) {
            return None;
        }
        let tail = std::iter::once((*group.sub).clone()).chain(after.iter().cloned()).collect();
        Some(Split { head: Forward::new(&Hir::concat(head.to_vec()))?, tail: Forward::new(&Hir::concat(tail))? })
    }

    /// Where the group of the match `m` in `value` is, if the cut finds it.
    fn group(&self, value: &str, m: regex_automata::Match) -> Option<std::ops::Range<usize>> {
        let start = self.head.end(value, m.start())?;
        (self.tail.end(value, start)? == m.end()).then_some(start..m.end())
    }
}

impl Extraction {
    /// The extraction of `regex`'s named groups (`regex` parsed as `hir`).
    fn new(regex: Arc<Pattern>, hir: &Hir) -> Extraction {
        let groups: Vec<(usize, String)> = regex.names().map(|(i, name)| (i, name.to_string())).collect();
        let anchor = anchor::Anchor::new(hir);
        let shape = match last_group(hir) {
            Some(_) if groups.len() != 1 => Shape::Groups, // its one group has no name
            Some(_) if is_whole_match_group(hir) => Shape::Whole,
            Some(_) => Shape::Suffix(std::sync::OnceLock::new()),
            None => Shape::Groups,
        };
        Extraction { regex, anchor, groups, shape }
    }

    /// The split of a regex whose one group ends it, made the first time it is asked for.
    fn split(&self) -> Option<&Split> {
        match &self.shape {
            Shape::Suffix(split) => split.get_or_init(|| Split::new(self.regex.as_str())).as_ref(),
            _ => None,
        }
    }

    /// Calls `f` with the name and text of each group of the first match in `value`.
    fn each_group<'s, 'v>(&'s self, value: &'v str, mut f: impl FnMut(&'s str, &'v str)) {
        let search = |search: &mut dyn FnMut(&Haystack<'_>) -> bool| match &self.anchor {
            Some(anchor) => anchor.search(value, search),
            None => search(&Haystack::new(value)),
        };
        if let Shape::Groups = self.shape {
            return self.captures(value, search, &mut f);
        }
        let mut found = None;
        search(&mut |input| {
            found = self.regex.regex.search(input);
            found.is_some()
        });
        let Some(m) = found else { return };
        let group = match &self.shape {
            Shape::Suffix(_) => self.split().and_then(|split| split.group(value, m)),
            _ => Some(m.range()),
        };
        match (group, &self.groups[..]) {
            (Some(range), [(_, name)]) => f(name, &value[range]),
            // The split cannot tell (the head gives text back, or a DFA gave up): resolve the
            // groups on the match found.
            _ => {
                let at = Haystack::new(value).span(m.start()..value.len()).anchored(regex_automata::Anchored::Yes);
                self.captures(value, |search| search(&at), &mut f);
            }
        }
    }

    /// A capture search of `value`, run by `search` on the inputs it picks; `f` gets the
    /// name and text of each group of the match found.
    fn captures<'s, 'v>(
        &'s self,
        value: &'v str,
        search: impl FnOnce(&mut dyn FnMut(&Haystack<'_>) -> bool) -> bool,
        f: &mut impl FnMut(&'s str, &'v str),
    ) {
        let mut slots = Slots::of(&self.regex);
        if search(&mut |input| self.regex.search(input, &mut slots)) {
            for (i, name) in &self.groups {
                if let Some(range) = slots.group(*i) {
                    f(name, &value[range]);
                }
            }
        }
    }
}

/// Whether a onepass DFA (one scan, one way through the regex at each byte) can be built for
/// `hir`, as the regex engine builds one to resolve groups when it can.
fn is_onepass(hir: &Hir) -> bool {
    use regex_automata::nfa::thompson;
    let config = thompson::Config::new().nfa_size_limit(Some(load::REGEX_SIZE_LIMIT));
    thompson::Compiler::new()
        .configure(config)
        .build_from_hir(hir)
        .is_ok_and(|nfa| regex_automata::dfa::onepass::DFA::new_from_nfa(nfa).is_ok())
}

/// `hir` cut around its one capture group, when that group holds no other and only
/// zero-width assertions follow it: what comes before the group, the group, and the assertions
/// after it (`(?m)^Started:\s*(?P<at>[^\r\n]+)$` gives `(?m)^Started:\s*`, the group, `$`).
fn last_group(hir: &Hir) -> Option<(&[Hir], &regex_syntax::hir::Capture, &[Hir])> {
    use regex_syntax::hir::HirKind;
    let parts = match hir.kind() {
        HirKind::Concat(parts) => &parts[..],
        _ => std::slice::from_ref(hir),
    };
    let at = parts.iter().rposition(|h| !is_look(h))?;
    let HirKind::Capture(group) = parts[at].kind() else { return None };
    let head = &parts[..at];
    let lone = group.sub.properties().explicit_captures_len() == 0
        && head.iter().all(|h| h.properties().explicit_captures_len() == 0);
    lone.then_some((head, group, &parts[at + 1..]))
}

/// Whether `hir` is one capture group with no group inside it, alone or between zero-width
/// assertions (`(?m)^(?P<line>.*ERROR.*)$`, `\b(?P<word>\w+)`): the group then matches
/// exactly the text of the whole match.
fn is_whole_match_group(hir: &Hir) -> bool {
    last_group(hir).is_some_and(|(head, _, _)| head.iter().all(is_look))
}

/// Whether `hir` is a zero-width assertion (`^`, `$`, `\b`, ...).
fn is_look(hir: &Hir) -> bool {
    matches!(hir.kind(), regex_syntax::hir::HirKind::Look(_))
}

/// A computed value: `[rule.fields]` and `[rule.payload]` entries.
#[derive(Debug)]
pub(crate) enum Spec {
    /// Name of a compiled template in the environment; renders to a string.
    Template(String),
    /// `{{ name }}` alone: the text of the field or built-in name when it is one, else the
    /// template.
    Field {
        name: String,
        template: String,
    },
    /// Text and `{{ ... }}` pieces simple enough to be rendered directly (see `fast`) when
    /// every value they refer to is text, else by the template `template`.
    Simple {
        parts: Vec<fast::Part>,
        template: String,
    },
    /// Name of a compiled `{% set %}` template holding an expression; a typed result.
    Expr(String),
    /// An expression simple enough to be computed directly (see `fast`) when its values are
    /// plain, else by the expression template `template`.
    FastExpr {
        expr: fast::Expr,
        template: String,
    },
    Literal(Json),
    Array(Vec<Spec>),
    Object(Vec<(String, Spec)>),
}

/// One compiled rule.
#[derive(Debug)]
pub struct Rule {
    pub name: String,
    pub file: PathBuf,
    pub line: usize,
    /// Destination names; empty means matching mail is dropped.
    pub to: Vec<String>,
    pub require: Vec<String>,
    extract: Vec<Extractor>,
    fields: Vec<(String, Spec)>,
    payload: Option<Vec<(String, Spec)>>,
}

/// Every rule of a rules directory, compiled, plus what to do with unmatched mail.
pub struct RuleSet {
    rules: Vec<Rule>,
    /// Their `when` conditions.
    conditions: Conditions,
    unmatched: Unmatched,
    templates: context::Templates,
    files: Vec<PathBuf>,
    /// Number of `when` conditions shared by several rules (see `Matcher::memo`).
    memo_slots: usize,
    /// Signed links added to payloads and offered to templates (`[web] public_url`).
    links: Option<std::sync::Arc<crate::links::Links>>,
}

impl fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuleSet").field("rules", &self.rules.len()).field("files", &self.files).finish()
    }
}

impl RuleSet {
    /// Loads and compiles every `*.toml` file in `dir` (name order; hidden files skipped).
    pub fn load_dir(dir: &Path, unmatched: Unmatched) -> Result<RuleSet, Vec<RuleError>> {
        let sources = load::read_dir(dir)?;
        RuleSet::from_sources(&sources, unmatched)
    }

    /// Compiles rules from `(file name, TOML text)` pairs, in the given order.
    ///
    /// ```
    /// use mailhook::model::{Envelope, Source};
    /// use mailhook::rules::{RuleSet, Unmatched};
    ///
    /// let rules = RuleSet::from_sources(
    ///     &[("rules/10-ups.toml".into(), r#"
    ///         [[rule]]
    ///         name = "ups"
    ///         to = ["orders"]
    ///         [rule.extract]
    ///         subject = 'Order (?P<order_id>\d+)'
    ///         [rule.fields]
    ///         order_id = { expr = "order_id | int" }
    ///     "#.to_string())],
    ///     Unmatched::Dead,
    /// ).unwrap();
    /// let email = mailhook::parse::parse(b"Subject: Order 4711 shipped\r\n\r\n");
    /// let outcome = rules.evaluate(&email, &Envelope::new(Source::Stdin));
    /// assert_eq!(outcome.rule.as_deref(), Some("ups"));
    /// assert_eq!(outcome.payload.to_json()["fields"]["order_id"], 4711);
    /// ```
    pub fn from_sources(sources: &[(PathBuf, String)], unmatched: Unmatched) -> Result<RuleSet, Vec<RuleError>> {
        load::compile(sources, unmatched)
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    pub fn unmatched(&self) -> &Unmatched {
        &self.unmatched
    }

    /// Every destination name a rule sends to, with an error for each that `exists` rejects.
    pub fn check_destinations(&self, exists: impl Fn(&str) -> bool) -> Vec<RuleError> {
        let mut errors = Vec::new();
        for rule in &self.rules {
            for (i, dest) in rule.to.iter().enumerate() {
                if !exists(dest) {
                    errors.push(RuleError {
                        file: rule.file.clone(),
                        line: Some(rule.line),
                        rule: Some(rule.name.clone()),
                        key: Some(format!("to[{i}]")),
                        message: format!("unknown destination {dest:?} (not a [destination.*] in the config)"),
                    });
                }
            }
        }
        errors
    }

    /// Adds signed links to every payload and offers them to templates (see [`crate::links`]).
    pub fn set_links(&mut self, links: Option<std::sync::Arc<crate::links::Links>>) {
        self.links = links;
    }

    /// Judges one message. Pure: the same inputs give the same outcome.
    pub fn evaluate(&self, email: &Email, envelope: &Envelope) -> Outcome {
        let outcome = self.judge(email, envelope);
        let Some(links) = &self.links else { return outcome };
        if matches!(outcome.action, Action::Drop) {
            return outcome;
        }
        let default = outcome
            .rule
            .as_deref()
            .and_then(|r| self.rules.iter().find(|x| x.name == r))
            .is_none_or(|r| r.payload.is_none() || matches!(outcome.action, Action::Dead { .. }));
        let payload = links.augment(outcome.payload, &envelope.id, email, default);
        Outcome { payload, ..outcome }
    }

    fn judge(&self, email: &Email, envelope: &Envelope) -> Outcome {
        let input = Input { email, envelope, source: std::cell::OnceCell::new(), pairs: Default::default() };
        let mut memo = Memo::new(self.memo_slots);
        let mut start = 0;
        for (rule, &(end, screen)) in self.rules.iter().zip(&self.conditions.rules) {
            if screen.is_none_or(|s| s.passes(&input))
                && self.conditions.all[start..end].iter().all(|m| m.matches(&input, &mut memo))
            {
                return self.apply(rule, &input);
            }
            start = end;
        }
        let action = match &self.unmatched {
            Unmatched::Dead => Action::Dead { reason: "no rule matched".to_string() },
            Unmatched::Drop => Action::Drop,
            Unmatched::Deliver(dest) => Action::Deliver { to: vec![dest.clone()] },
        };
        let payload = match action {
            Action::Drop => Payload::empty(),
            _ => default_payload(email, envelope, None, &context::Fields::default()),
        };
        Outcome { rule: None, action, payload }
    }

    fn apply(&self, rule: &Rule, input: &Input<'_>) -> Outcome {
        // (name, value) in the order found; the first value of a name wins.
        let mut found: Vec<(&str, &str)> =
            Vec::with_capacity(rule.extract.iter().flat_map(|ex| &ex.regexes).map(|r| r.groups.len()).sum());
        for ex in &rule.extract {
            for extraction in &ex.regexes {
                if extraction.groups.iter().all(|(_, name)| found.iter().any(|(f, _)| f == name)) {
                    continue; // nothing left for this regex to find
                }
                ex.target.any(input, |value| {
                    extraction.each_group(value, |name, text| {
                        if !found.iter().any(|(f, _)| *f == name) {
                            found.push((name, text));
                        }
                    });
                    false // keep looking: a later value may hold other groups
                });
            }
        }
        let mut fields = context::Fields::with_capacity(found.len() + rule.fields.len());
        for (name, value) in found {
            fields.insert(name, Json::from(value));
        }

        let dead = |reason: String, fields: context::Fields| Outcome {
            rule: Some(rule.name.clone()),
            action: Action::Dead { reason },
            payload: default_payload(input.email, input.envelope, Some(&rule.name), &fields),
        };

        let computed = |name: &str| rule.fields.iter().any(|(k, _)| k == name);
        let missing: Vec<&str> = rule
            .require
            .iter()
            .filter(|name| !computed(name) && is_missing(fields.get(name.as_str())))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            return dead(missing_reason(&rule.name, &missing), fields);
        }
        if rule.to.is_empty() {
            // A rule that drops what it matches: nothing will be sent, nothing to build.
            return Outcome { rule: Some(rule.name.clone()), action: Action::Drop, payload: Payload::empty() };
        }

        let mut ctx =
            context::Context::new(input.email, input.envelope, &rule.name, fields).with_links(self.links.as_deref());
        for (key, spec) in &rule.fields {
            match self.templates.eval(spec, &ctx) {
                Ok(value) => ctx.set(key, value),
                Err(e) => return dead(format!("rule {:?}: fields.{key}: {e}", rule.name), ctx.into_fields()),
            }
        }
        let missing: Vec<&str> = rule
            .require
            .iter()
            .filter(|name| is_missing(ctx.fields().get(name.as_str())))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            let reason = missing_reason(&rule.name, &missing);
            return dead(reason, ctx.into_fields());
        }

        let payload = match &rule.payload {
            None => default_payload(input.email, input.envelope, Some(&rule.name), ctx.fields()),
            Some(specs) => {
                let mut payload = context::Fields::with_capacity(specs.len());
                for (key, spec) in specs {
                    match self.templates.eval(spec, &ctx) {
                        Ok(value) => payload.insert(key, value),
                        Err(e) => {
                            return dead(format!("rule {:?}: payload.{key}: {e}", rule.name), ctx.into_fields());
                        }
                    }
                }
                let mut text = String::with_capacity(128);
                payload.write(&mut text, false);
                Payload::from_object_text(text)
            }
        };
        Outcome { rule: Some(rule.name.clone()), action: Action::Deliver { to: rule.to.clone() }, payload }
    }
}

fn is_missing(value: Option<&Json>) -> bool {
    match value {
        None | Some(Json::Null) => true,
        Some(Json::String(s)) => s.trim().is_empty(),
        Some(_) => false,
    }
}

fn missing_reason(rule: &str, missing: &[&str]) -> String {
    format!("rule {rule:?}: missing required field{} {}", if missing.len() == 1 { "" } else { "s" }, missing.join(", "))
}

#[cfg(test)]
mod tests;

//! Throughput of the parse and rules stages over every `fixtures/*.eml`.
//!
//! Three benchmarks in the `pipeline` group, each iteration handling every fixture once:
//!
//! | bench         | work per fixture                                   |
//! |---------------|----------------------------------------------------|
//! | `parse`       | `parse::parse(raw)`                                |
//! | `parse+rules` | `parse::parse(raw)` then `RuleSet::evaluate`       |
//! | `rules`       | `RuleSet::evaluate` on a pre-parsed `Email`        |
//!
//! The rule set holds 50 rules: 45 generated rules that match none of the fixtures, followed
//! by the real rules of `rules/*.toml`. Every message therefore runs through 45 non-matching
//! rules (some of which get past their first condition) before reaching its own rule or
//! falling through to `unmatched`: the worst realistic case for a rules directory that has
//! grown over time.
//!
//! Throughput is reported in bytes of raw fixture data; `scripts/bench-core` turns the
//! estimates into emails/s and MB/s.
//!
//! ```text
//! cargo bench --bench pipeline
//! scripts/bench-core
//! ```
//!
//! With `PIPELINE_ROUNDS=<n>` in the environment the binary skips criterion and runs the
//! fixtures through `parse` then `evaluate` n times (as `parse+rules` does), so that a run
//! under callgrind counts a known number of calls:
//!
//! ```text
//! cargo bench --bench pipeline --no-run
//! PIPELINE_ROUNDS=100 valgrind --tool=callgrind --toggle-collect='mailhook::rules::RuleSet::evaluate' \
//!     target/release/deps/pipeline-<hash>
//! ```
//!
//! gives the instructions of `evaluate` for 100 × 22 emails (`--toggle-collect='mailhook::parse::parse'`
//! those of parsing). `PIPELINE_STAGE` (`parse`, `rules`, `split`), `PIPELINE_FIXTURE` and
//! `PIPELINE_RULES` pick other work (see `count_rounds`); each run ends with the mean time per
//! email.

use criterion::{Criterion, Throughput, criterion_group};
use mailhook::model::{Email, Envelope, Outcome, Source};
use mailhook::parse::parse;
use mailhook::rules::{RuleSet, Unmatched};
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Number of generated rules placed before the real ones.
const GENERATED_RULES: usize = 45;

/// Vendors the generated rules are about; none of them sends any fixture.
const VENDORS: &[&str] = &[
    "acme",
    "globex",
    "initech",
    "umbrella",
    "hooli",
    "vandelay",
    "wonka",
    "stark",
    "wayne",
    "tyrell",
    "cyberdyne",
    "soylent",
    "oscorp",
    "massive",
    "aperture",
    "blackmesa",
    "zorg",
    "veridian",
    "nakatomi",
    "gringotts",
    "monarch",
    "dunder",
    "piedpiper",
    "prestige",
    "sterling",
    "virtucon",
    "yoyodyne",
    "krusty",
    "duff",
    "gekko",
    "buynlarge",
    "rekall",
    "weyland",
    "ollivander",
    "bluth",
    "cogswell",
    "spacely",
    "tessier",
    "omni",
    "encom",
    "dinoco",
    "gadgetron",
    "kwikemart",
    "contoso",
    "fabrikam",
];

/// Tracking-number prefixes for the carrier rules.
const PREFIXES: &[&str] = &["JJD", "GM", "LX", "CV", "RR", "UQ", "ZT", "KP", "WB"];

/// Invoices: a vendor's domain, then a subject with alternations.
const INVOICE_RULE: &str = r#"
[[rule]]
name = "%V%-invoice"
description = "Invoices mailed by %C%"
to = ["billing"]
require = ["invoice_no", "amount"]

[rule.when]
from = '(?i)@(?:billing\.|mail\.|noreply\.)?%V%\.example\.(?:com|net|de)$'
subject = '(?i)^(?:Invoice|Rechnung|Facture|Factura)\s+(?:No\.?|Nr\.?|#)\s*[A-Z]{0,3}-?\d{4,}'

[rule.extract]
subject = '(?i)(?:No\.?|Nr\.?|#)\s*(?P<invoice_no>[A-Z]{0,3}-?\d{4,})'
body = [
    '(?i)(?:Total|Summe|Montant)\s*:?\s*(?P<amount>\d{1,3}(?:[.,]\d{3})*[.,]\d{2})',
    '(?i)(?:Due date|Fällig am|Échéance)\s*:?\s*(?P<due_date>\d{1,2}[./]\d{1,2}[./]\d{2,4})',
    '(?i)customer (?:no|number)\.?\s*:?\s*(?P<customer_no>\d+)',
]

[rule.fields]
invoice_no = "{{ invoice_no | upper }}"
amount = { expr = "amount | replace('.', '') | replace(',', '.') | float" }
vendor = "%C%"
summary = "Invoice {{ invoice_no }} from {{ from.name }} over {{ amount }}"
"#;

/// Helpdesk tickets: a tagged subject first, then a vendor header.
const TICKET_RULE: &str = r#"
[[rule]]
name = "%V%-ticket-update"
to = ["support"]
require = ["ticket_id"]

[rule.when]
subject = '^\[(?:%U%|%C%)(?:-| )(?:Ticket|Case|Incident)\s*#?\d+\]\s*(?:New|Updated|Resolved|Closed|Reopened)\b'
"header.X-%C%-Event" = '^(?:ticket\.(?:created|updated|closed)|case\.\w+)$'

[rule.extract]
subject = '#?(?P<ticket_id>\d+)\]\s*(?P<ticket_state>\w+)'
"header.X-%C%-Event" = '^(?P<event>[a-z.]+)$'
body = [
    '(?m)^Priority:\s*(?P<priority>\w+)',
    '(?m)^Assignee:\s*(?P<assignee>[^\r\n]+)',
]

[rule.fields]
ticket_id = { expr = "ticket_id | int" }
state = "{{ ticket_state | lower }}"
urgent = { expr = "priority in ['High', 'Urgent', 'P1']" }
link = "https://support.%V%.example.com/tickets/{{ ticket_id }}"
"#;

/// Metric alerts: a signature header first, then sender and subject.
const ALERT_RULE: &str = r#"
[[rule]]
name = "%V%-metric-alert"
to = ["alerts"]
require = ["metric", "value"]

[rule.when]
"header.X-%C%-Signature" = '^v1=[0-9a-f]{64}$'
from = '(?i)^(?:alerts|notifications|no-?reply)@%V%\.example\.io$'
subject = '(?i)\b(?:alert|warning|threshold|quota)\b'

[rule.extract]
subject = '(?i)\[(?P<severity>critical|warning|info)\]'
body = [
    '(?m)^Metric:\s*(?P<metric>\S+)',
    '(?m)^Value:\s*(?P<value>-?\d+(?:\.\d+)?)',
    '(?m)^Threshold:\s*(?P<threshold>-?\d+(?:\.\d+)?)',
]

[rule.fields]
value = { expr = "value | float" }
threshold = { expr = "threshold | float" }
exceeded = { expr = "value > threshold if threshold is not none else false" }
title = "{{ metric }} at {{ value }} (threshold {{ threshold }}, {{ severity | default('info') }})"
"#;

/// Carrier notices: a body regex first (the whole text is scanned), then the sender.
const CARRIER_RULE: &str = r#"
[[rule]]
name = "%V%-shipment"
to = ["orders"]
require = ["tracking_number"]

[rule.when]
body = '(?i)(?:Sendungsnummer|Tracking (?:number|ID)|Numéro de suivi)\s*:?\s*%P%[0-9]{10,14}\b'
from = '(?i)@%V%(?:-logistics)?\.example\.(?:com|de|fr)$'

[rule.extract]
subject = '(?i)(?:Bestellung|Order|Commande)\s*(?:Nr\.?|#|no\.?)?\s*(?P<order_id>\d{4,})'
body = [
    '(?P<tracking_number>%P%[0-9]{10,14})',
    '(?i)(?:Zustellung|Delivery|Livraison)\s*(?:am|on|le)?\s*:?\s*(?P<delivery_date>\d{1,2}[./]\d{1,2}[./]\d{4})',
    '(?i)(?:Bestellung|Order|Commande)\s*(?:Nr\.?|#|no\.?)?\s*(?P<order_ref>\d{4,})',
]

[rule.fields]
carrier = "%C%"
order_id = { expr = "order_id | int if order_id is defined else none" }
tracking_url = "https://track.%V%.example.com/?id={{ tracking_number | urlencode }}"
"#;

/// Build failures: a broad sender pattern that many real senders pass, then a tagged subject.
const BUILD_RULE: &str = r#"
[[rule]]
name = "%V%-build-failure"
to = ["ops"]
require = ["build_id", "project"]

[rule.when]
from = '(?i)^[a-z0-9._-]+@(?:[a-z0-9-]+\.)*example\.(?:com|de|net|org)$'
subject = '^\[%U%-CI\] (?:Build|Pipeline|Deploy) #?\d+ (?:failed|errored|timed out)\b'
body = '(?m)^(?:Status|Result):\s*(?:FAILED|ERROR|TIMEOUT)\s*$'

[rule.extract]
subject = '^\[%U%-CI\] (?:Build|Pipeline|Deploy) #?(?P<build_id>\d+)'
body = [
    '(?m)^Project:\s*(?P<project>[\w./-]+)',
    '(?m)^Branch:\s*(?P<branch>[\w./-]+)',
    '(?m)^Commit:\s*(?P<commit>[0-9a-f]{7,40})',
    '(?m)^Duration:\s*(?P<duration_s>\d+)\s*s',
]

[rule.fields]
build_id = { expr = "build_id | int" }
duration_s = { expr = "duration_s | int if duration_s is defined else none" }
short_commit = "{{ commit[:7] if commit else '' }}"
summary = "{{ project }}@{{ branch | default('main') }}: build {{ build_id }} failed"
"#;

const KINDS: &[&str] = &[INVOICE_RULE, TICKET_RULE, ALERT_RULE, CARRIER_RULE, BUILD_RULE];

fn capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
        None => String::new(),
    }
}

/// The generated rules, split over three rules files.
fn generated_sources() -> Vec<(PathBuf, String)> {
    assert!(VENDORS.len() >= GENERATED_RULES);
    let files = ["01-vendors.toml", "02-helpdesk.toml", "03-ci.toml"];
    let per_file = GENERATED_RULES.div_ceil(files.len());
    let mut sources: Vec<(PathBuf, String)> =
        files.iter().map(|f| (PathBuf::from("generated").join(f), String::new())).collect();
    for (i, vendor) in VENDORS.iter().take(GENERATED_RULES).enumerate() {
        let text = KINDS[i % KINDS.len()]
            .replace("%V%", vendor)
            .replace("%U%", &vendor.to_ascii_uppercase())
            .replace("%C%", &capitalize(vendor))
            .replace("%P%", PREFIXES[i % PREFIXES.len()]);
        sources[i / per_file].1.push_str(&text);
    }
    sources
}

/// The real rules of `rules/*.toml`, in file-name order.
fn real_sources(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("rules directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("read rules file");
            (p, text)
        })
        .collect()
}

fn compile(sources: &[(PathBuf, String)]) -> RuleSet {
    match RuleSet::from_sources(sources, Unmatched::Dead) {
        Ok(set) => set,
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            panic!("{} rule error(s)", errors.len());
        }
    }
}

/// Every `fixtures/*.eml`, in file-name order.
fn fixtures(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(root.join("fixtures"))
        .expect("read fixtures/")
        .map(|e| e.expect("fixtures/ entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "eml"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).expect("read fixture"))
        })
        .collect()
}

/// The rule set of the benchmark: the generated rules, then those of `rules/`.
fn bench_rules(root: &Path) -> (RuleSet, Vec<(PathBuf, String)>) {
    let real = real_sources(&root.join("rules"));
    let mut sources = generated_sources();
    sources.extend(real.iter().cloned());
    (compile(&sources), real)
}

/// `PIPELINE_ROUNDS` mode: parse and evaluate every fixture `rounds` times, nothing else, and
/// print the mean time per email. `PIPELINE_STAGE` picks the work:
///
/// - unset: parse, then evaluate (as the `parse+rules` bench does);
/// - `parse`: parse only;
/// - `rules`: evaluate emails parsed once beforehand (as the `rules` bench does);
/// - `split`: parse a fixture, then evaluate its email parsed beforehand, timing each side
///   apart: how much each stage slows the other down when they take turns.
///
/// `PIPELINE_FIXTURE=<part of a name>` keeps only the fixtures whose file name contains it;
/// `PIPELINE_RULES=real` loads only the rules of `rules/` (without the generated ones),
/// `PIPELINE_RULES=<dir>` only those of `<dir>/*.toml` (to time one rule, or a variant of it).
fn count_rounds(rounds: usize) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut raw = fixtures(root);
    if let Ok(only) = std::env::var("PIPELINE_FIXTURE") {
        raw.retain(|(name, _)| name.contains(&only));
    }
    let (mut rules, real) = bench_rules(root);
    match std::env::var("PIPELINE_RULES").as_deref() {
        Ok("real") => rules = compile(&real),
        Ok(dir) if !dir.is_empty() => rules = compile(&real_sources(Path::new(dir))),
        _ => {}
    }
    let envelope = Envelope::new(Source::Smtp);
    // Parsed beforehand only for the stages that use them (a callgrind run of the others counts
    // no extra parse).
    let parsed = || raw.iter().map(|(_, b)| parse(b)).collect::<Vec<Email>>();
    let n = rounds * raw.len();
    match std::env::var("PIPELINE_STAGE").unwrap_or_default().as_str() {
        "parse" => {
            let start = Instant::now();
            for _ in 0..rounds {
                for (_, bytes) in &raw {
                    black_box(parse(black_box(bytes)));
                }
            }
            report("parse", n, start.elapsed());
        }
        "rules" => {
            let emails = parsed();
            let start = Instant::now();
            for _ in 0..rounds {
                for email in &emails {
                    black_box(rules.evaluate(black_box(email), &envelope));
                }
            }
            report("rules", n, start.elapsed());
        }
        "split" => {
            let emails = parsed();
            let (mut parsing, mut judging) = (Duration::ZERO, Duration::ZERO);
            for _ in 0..rounds {
                for ((_, bytes), email) in raw.iter().zip(&emails) {
                    let start = Instant::now();
                    black_box(parse(black_box(bytes)));
                    let parsed = Instant::now();
                    black_box(rules.evaluate(black_box(email), &envelope));
                    parsing += parsed - start;
                    judging += parsed.elapsed();
                }
            }
            report("parse, taking turns with rules", n, parsing);
            report("rules, taking turns with parse", n, judging);
        }
        _ => {
            let start = Instant::now();
            for _ in 0..rounds {
                for (_, bytes) in &raw {
                    let email = parse(black_box(bytes));
                    black_box(rules.evaluate(&email, &envelope));
                }
            }
            report("parse+rules", n, start.elapsed());
        }
    }
}

/// One line of a `PIPELINE_ROUNDS` run: the work, and its mean time per email.
fn report(what: &str, emails: usize, elapsed: Duration) {
    let per_email = elapsed.as_secs_f64() * 1e6 / emails.max(1) as f64;
    eprintln!("pipeline: {what}: {per_email:.2} µs per email ({emails} emails)");
}

fn pipeline(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let raw = fixtures(root);
    assert!(!raw.is_empty(), "no fixtures/*.eml");
    let total_bytes: usize = raw.iter().map(|(_, b)| b.len()).sum();

    let (rules, real) = bench_rules(root);
    let real_only = compile(&real);
    let generated = rules.rules().len() - real_only.rules().len();
    assert_eq!(generated, GENERATED_RULES, "generated rule count");

    let envelope = Envelope::new(Source::Smtp);
    let emails: Vec<Email> = raw.iter().map(|(_, b)| parse(b)).collect();

    // The generated rules must not change any outcome: each message still reaches its real
    // rule (or none) after paying for all the generated ones.
    let mut matched = 0;
    for ((name, _), email) in raw.iter().zip(&emails) {
        let with_generated: Outcome = rules.evaluate(email, &envelope);
        let alone = real_only.evaluate(email, &envelope);
        assert_eq!(with_generated, alone, "a generated rule changed the outcome of {name}");
        matched += usize::from(alone.rule.is_some());
    }
    eprintln!(
        "pipeline: {} fixtures, {} bytes; {} rules ({} generated, then {} from rules/); {} fixtures match a real rule",
        raw.len(),
        total_bytes,
        rules.rules().len(),
        generated,
        real_only.rules().len(),
        matched,
    );

    let mut group = c.benchmark_group("pipeline");
    group
        .throughput(Throughput::Bytes(total_bytes as u64))
        .sample_size(30)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(5));

    group.bench_function("parse", |b| {
        b.iter(|| {
            for (_, bytes) in &raw {
                black_box(parse(black_box(bytes)));
            }
        })
    });

    group.bench_function("parse+rules", |b| {
        b.iter(|| {
            for (_, bytes) in &raw {
                let email = parse(black_box(bytes));
                black_box(rules.evaluate(&email, &envelope));
            }
        })
    });

    group.bench_function("rules", |b| {
        b.iter(|| {
            for email in &emails {
                black_box(rules.evaluate(black_box(email), &envelope));
            }
        })
    });

    group.finish();
}

criterion_group!(benches, pipeline);

fn main() {
    if let Some(rounds) = std::env::var("PIPELINE_ROUNDS").ok().and_then(|n| n.parse().ok()) {
        count_rounds(rounds);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}

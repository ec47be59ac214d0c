//! `mailhook test`: golden tests for rules. Every `NAME.eml` in a directory is run through the
//! rules and compared with `NAME.json` beside it, which holds the expected `rule`, `to`,
//! `payload` (and `dead` or `dropped`), as `try` prints them without `file`.
//!
//! Keys that change on every run — the payload's `id` and `receivedAt` — are left out of the
//! comparison and out of the files `--update` writes. A mismatch prints a unified diff of the
//! two objects with their keys sorted, so only real differences show.

use super::{EnvelopeSpec, Exit, RulesSource, outcome_json};
use crate::parse::parse;
use serde_json::{Map, Value as Json};
use std::path::{Path, PathBuf};

/// Payload keys ignored by the comparison.
pub const VOLATILE_KEYS: &[&str] = &["id", "receivedAt"];

#[derive(Debug, Clone, Default)]
pub struct TestOptions {
    pub rules: RulesSource,
    pub dir: PathBuf,
    /// Rewrite every golden file with what the rules produce now.
    pub update: bool,
}

/// What happened to one case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaseResult {
    Pass,
    /// Expected and actual, pretty-printed with sorted keys.
    Mismatch {
        expected: String,
        actual: String,
    },
    Missing,
    Updated,
    Unreadable(String),
}

/// Runs every case of `opts.dir`; prints a line per case, diffs, and a summary.
pub fn run(opts: &TestOptions) -> Exit {
    let rules = match opts.rules.load() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let cases = match cases(&opts.dir) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: cannot read directory: {e}", opts.dir.display());
            return Exit::DataErr;
        }
    };
    if cases.is_empty() {
        eprintln!("{}: no *.eml files to test", opts.dir.display());
        return Exit::DataErr;
    }
    let (mut passed, mut failed, mut updated) = (0usize, 0usize, 0usize);
    let mut exit = Exit::Ok;
    for eml in &cases {
        let golden = eml.with_extension("json");
        let name = eml.display();
        match run_case(&rules, eml, &golden, opts.update) {
            CaseResult::Pass => {
                passed += 1;
                println!("ok      {name}");
            }
            CaseResult::Updated => {
                updated += 1;
                println!("updated {}", golden.display());
            }
            CaseResult::Missing => {
                failed += 1;
                exit = exit.max(Exit::Failed);
                println!("MISSING {name}: no {} (run `mailhook test --update` to create it)", golden.display());
            }
            CaseResult::Unreadable(e) => {
                failed += 1;
                exit = exit.max(Exit::DataErr);
                println!("ERROR   {name}: {e}");
            }
            CaseResult::Mismatch { expected, actual } => {
                failed += 1;
                exit = exit.max(Exit::Failed);
                println!("FAIL    {name}");
                print!("{}", diff(&expected, &actual, &golden));
            }
        }
    }
    // A golden whose mail is gone tests nothing any more: say so rather than pass quietly.
    for golden in orphans(&opts.dir) {
        failed += 1;
        exit = exit.max(Exit::Failed);
        let eml = golden.with_extension("eml");
        println!(
            "ORPHAN  {}: no {} beside it (restore the mail, or delete the golden)",
            golden.display(),
            eml.display()
        );
    }
    if opts.update {
        println!("{updated} updated, {passed} unchanged");
    } else {
        println!("{passed} passed, {failed} failed");
    }
    exit
}

/// The `*.eml` files of `dir`, sorted by name.
pub fn cases(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "eml") && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// The `*.json` files of `dir` with no `*.eml` of the same name, sorted by name.
pub fn orphans(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json") && p.is_file())
        .filter(|p| !p.with_extension("eml").exists())
        .collect();
    files.sort();
    files
}

/// Runs one case: `eml` against `golden`, or rewrites `golden` when `update` is set.
pub fn run_case(rules: &crate::rules::RuleSet, eml: &Path, golden: &Path, update: bool) -> CaseResult {
    let raw = match std::fs::read(eml) {
        Ok(raw) => raw,
        Err(e) => return CaseResult::Unreadable(format!("cannot read: {e}")),
    };
    let email = parse(&raw);
    let spec = match EnvelopeSpec::sidecar(eml) {
        Ok(s) => s.unwrap_or_default(),
        Err(e) => return CaseResult::Unreadable(e.to_string()),
    };
    let envelope = match spec.envelope(&email) {
        Ok(env) => env,
        Err(e) => return CaseResult::Unreadable(e.to_string()),
    };
    let actual = stable(outcome_json(&email, &rules.evaluate(&email, &envelope)));

    if update {
        let mut text = serde_json::to_string_pretty(&Json::Object(actual)).expect("JSON serialises");
        text.push('\n');
        let unchanged = std::fs::read_to_string(golden).is_ok_and(|old| old == text);
        if unchanged {
            return CaseResult::Pass;
        }
        return match std::fs::write(golden, text) {
            Ok(()) => CaseResult::Updated,
            Err(e) => CaseResult::Unreadable(format!("cannot write {}: {e}", golden.display())),
        };
    }

    let expected = match std::fs::read_to_string(golden) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return CaseResult::Missing,
        Err(e) => return CaseResult::Unreadable(format!("cannot read {}: {e}", golden.display())),
    };
    let expected: Json = match serde_json::from_str(&expected) {
        Ok(Json::Object(m)) => Json::Object(stable(m)),
        Ok(_) => return CaseResult::Unreadable(format!("{}: must hold a JSON object", golden.display())),
        Err(e) => return CaseResult::Unreadable(format!("{}: invalid JSON: {e}", golden.display())),
    };
    let actual = Json::Object(actual);
    if expected == actual {
        CaseResult::Pass
    } else {
        CaseResult::Mismatch { expected: sorted_pretty(&expected), actual: sorted_pretty(&actual) }
    }
}

/// Removes the volatile payload keys.
fn stable(mut outcome: Map<String, Json>) -> Map<String, Json> {
    if let Some(Json::Object(payload)) = outcome.get_mut("payload") {
        for key in VOLATILE_KEYS {
            payload.shift_remove(*key);
        }
    }
    outcome
}

/// Pretty JSON with object keys sorted, so that key order never shows as a difference.
fn sorted_pretty(value: &Json) -> String {
    fn sort(value: &Json) -> Json {
        match value {
            Json::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                Json::Object(keys.into_iter().map(|k| (k.clone(), sort(&m[k]))).collect())
            }
            Json::Array(items) => Json::Array(items.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    let mut s = serde_json::to_string_pretty(&sort(value)).expect("JSON serialises");
    s.push('\n');
    s
}

/// A unified diff from the expected to the actual object, indented under the case's line.
pub fn diff(expected: &str, actual: &str, golden: &Path) -> String {
    let expected_label = format!("{} (expected)", golden.display());
    similar::TextDiff::from_lines(expected, actual)
        .unified_diff()
        .context_radius(3)
        .header(&expected_label, "actual")
        .to_string()
        .lines()
        .map(|l| format!("    {l}\n"))
        .collect()
}

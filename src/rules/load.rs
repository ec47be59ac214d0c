//! Loading and compiling rules files. Walks the spanned TOML tree by hand (rather than through
//! serde) so that every problem is found in one pass and reported with its line, rule and key.

use super::context::{RESERVED, Templates};
use super::{Extractor, Matcher, Rule, RuleError, RuleSet, Spec, Target, Unmatched};
use crate::config::Config;
use regex::{Regex, RegexBuilder};
use serde_json::Value as Json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// Rules files are the `*.toml` files of the rules directory.
pub const RULE_FILE_EXTENSION: &str = "toml";

/// Compiled size limit for one regex (the `regex` crate's `size_limit`).
const REGEX_SIZE_LIMIT: usize = 8 * 1024 * 1024;

const RULE_KEYS: &[&str] = &["name", "description", "to", "require", "when", "extract", "fields", "payload"];

/// Loads the rules directory of `config` and checks that every destination a rule names is
/// one of its `[destination.*]` tables.
pub fn load_rules(config: &Config) -> Result<RuleSet, Vec<RuleError>> {
    let mut rules =
        RuleSet::load_dir(&config.resolve(&config.rules.dir), Unmatched::from_config(&config.rules.unmatched))?;
    rules.set_links(config.web.as_ref().and_then(crate::links::Links::from_config).map(std::sync::Arc::new));
    let errors = rules.check_destinations(|d| config.destination.contains_key(d));
    if errors.is_empty() { Ok(rules) } else { Err(errors) }
}

/// Reads every rules file of `dir`, sorted by file name. Hidden files are skipped.
pub(super) fn read_dir(dir: &Path) -> Result<Vec<(PathBuf, String)>, Vec<RuleError>> {
    let whole =
        |message: String| vec![RuleError { file: dir.to_path_buf(), line: None, rule: None, key: None, message }];
    let entries = std::fs::read_dir(dir).map_err(|e| whole(format!("cannot read rules directory: {e}")))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == RULE_FILE_EXTENSION)
                && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| !n.starts_with('.'))
                && p.is_file()
        })
        .collect();
    paths.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    let mut sources = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        match std::fs::read(&path) {
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(text) => sources.push((path, text)),
                Err(_) => errors.push(RuleError {
                    file: path,
                    line: None,
                    rule: None,
                    key: None,
                    message: "is not valid UTF-8".into(),
                }),
            },
            Err(e) => errors.push(RuleError {
                file: path,
                line: None,
                rule: None,
                key: None,
                message: format!("cannot read: {e}"),
            }),
        }
    }
    if errors.is_empty() { Ok(sources) } else { Err(errors) }
}

pub(super) fn compile(sources: &[(PathBuf, String)], unmatched: Unmatched) -> Result<RuleSet, Vec<RuleError>> {
    let mut templates = Templates::new();
    let mut rules = Vec::new();
    let mut errors = Vec::new();
    let mut names = Vec::new();
    let mut regexes = HashMap::new();
    for (file, text) in sources {
        let mut c = FileCompiler {
            file,
            text,
            templates: &mut templates,
            errors: &mut errors,
            names: &mut names,
            regexes: &mut regexes,
            rule: None,
        };
        c.compile_file(&mut rules);
    }
    // Names are checked over every rule, including those with other errors.
    let mut seen: HashMap<&str, &(String, PathBuf, usize)> = HashMap::new();
    for entry in &names {
        let (name, file, line) = entry;
        if let Some((_, first_file, first_line)) = seen.insert(name.as_str(), entry) {
            errors.push(RuleError {
                file: file.clone(),
                line: Some(*line),
                rule: Some(name.clone()),
                key: Some("name".into()),
                message: format!("duplicate rule name, first defined at {}:{}", first_file.display(), first_line),
            });
        }
    }
    if !errors.is_empty() {
        // Report in reading order: by file, then by line.
        let file_index = |f: &Path| sources.iter().position(|(p, _)| p == f);
        errors.sort_by_key(|e| (file_index(&e.file), e.line));
        return Err(errors);
    }
    let files = sources.iter().map(|(f, _)| f.clone()).collect();
    let judge_peak = RuleSet::peak_of(&rules);
    Ok(RuleSet { rules, unmatched, templates, files, links: None, judge_peak })
}

struct FileCompiler<'a> {
    file: &'a Path,
    text: &'a str,
    templates: &'a mut Templates,
    errors: &'a mut Vec<RuleError>,
    /// `(name, file, line)` of every named rule, for the duplicate check.
    names: &'a mut Vec<(String, PathBuf, usize)>,
    /// Every regex compiled so far, by pattern: rules that use the same pattern share it (and
    /// its search caches).
    regexes: &'a mut HashMap<String, Arc<Regex>>,
    /// Label of the rule being compiled.
    rule: Option<String>,
}

impl FileCompiler<'_> {
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
    }

    fn error(&mut self, offset: usize, key: Option<String>, message: impl Into<String>) {
        self.errors.push(RuleError {
            file: self.file.to_path_buf(),
            line: Some(self.line(offset)),
            rule: self.rule.clone(),
            key,
            message: message.into(),
        });
    }

    fn compile_file(&mut self, rules: &mut Vec<Rule>) {
        let (table, parse_errors) = DeTable::parse_recoverable(self.text);
        if !parse_errors.is_empty() {
            for e in parse_errors {
                let offset = e.span().map(|s| s.start).unwrap_or(0);
                self.error(offset, None, format!("TOML syntax: {}", e.message().trim()));
            }
            return;
        }
        for (key, value) in table.get_ref() {
            if key.get_ref() != "rule" {
                self.error(
                    key.span().start,
                    None,
                    format!("unknown top-level key {:?}: a rules file holds [[rule]] tables only", key.get_ref()),
                );
                continue;
            }
            let DeValue::Array(array) = value.get_ref() else {
                self.error(value.span().start, None, "`rule` must be written as [[rule]] tables");
                continue;
            };
            for (i, item) in array.iter().enumerate() {
                self.rule = Some(format!("#{}", i + 1));
                match item.get_ref() {
                    DeValue::Table(t) => {
                        if let Some(rule) = self.compile_rule(t, item.span().start) {
                            rules.push(rule);
                        }
                    }
                    _ => self.error(item.span().start, None, "each rule must be a table ([[rule]])"),
                }
                self.rule = None;
            }
        }
    }

    /// The rule; `None` after reporting its errors.
    fn compile_rule(&mut self, t: &DeTable<'_>, offset: usize) -> Option<Rule> {
        let before = self.errors.len();
        let name = match t.get("name").map(|v| (v.get_ref(), v.span().start)) {
            Some((DeValue::String(s), at)) => {
                let s = s.to_string();
                if s.trim().is_empty() || s.trim() != s || s.chars().any(char::is_control) {
                    self.error(
                        at,
                        Some("name".into()),
                        "must be non-empty, without surrounding spaces or control characters",
                    );
                } else {
                    self.rule = Some(s.clone());
                    self.names.push((s.clone(), self.file.to_path_buf(), self.line(offset)));
                }
                s
            }
            Some((_, at)) => {
                self.error(at, Some("name".into()), "must be a string");
                String::new()
            }
            None => {
                self.error(offset, Some("name".into()), "is required");
                String::new()
            }
        };
        let line = self.line(offset);

        for (key, _) in t {
            let k: &str = key.get_ref();
            if !RULE_KEYS.contains(&k) {
                self.error(
                    key.span().start,
                    Some(k.to_string()),
                    format!("unknown key (a rule takes {})", RULE_KEYS.join(", ")),
                );
            }
        }
        if let Some(v) = t.get("description")
            && !matches!(v.get_ref(), DeValue::String(_))
        {
            self.error(v.span().start, Some("description".into()), "must be a string");
        }

        let to = match t.get("to") {
            Some(v) => self.string_list(v, "to"),
            None => {
                self.error(
                    offset,
                    Some("to".into()),
                    "is required: a list of destination names (to = [] drops matching mail)",
                );
                Vec::new()
            }
        };
        let require = t.get("require").map(|v| self.string_list(v, "require")).unwrap_or_default();

        let mut when = Vec::new();
        if let Some(v) = t.get("when") {
            for (key, value) in self.table(v, "when") {
                let k = format!("when.{}", key.get_ref());
                let Some(target) = self.target(&key, &k) else { continue };
                match value.get_ref() {
                    DeValue::String(s) => {
                        if let Some(regex) = self.regex(s, value.span().start, &k) {
                            when.push(Matcher { target, regex });
                        }
                    }
                    _ => self.error(value.span().start, Some(k), "must be a regex string"),
                }
            }
        }

        // Every key must hold, so their order does not change the result: check the cheap
        // ones (addresses, subject, headers) before the long ones (body, html).
        when.sort_by_key(|m: &Matcher| m.target.cost());

        let mut extract = Vec::new();
        let mut extracted_names: Vec<String> = Vec::new();
        if let Some(v) = t.get("extract") {
            for (key, value) in self.table(v, "extract") {
                let k = format!("extract.{}", key.get_ref());
                let Some(target) = self.target(&key, &k) else { continue };
                let patterns: Vec<(String, usize, String)> = match value.get_ref() {
                    DeValue::String(s) => vec![(s.to_string(), value.span().start, k.clone())],
                    DeValue::Array(items) => items
                        .iter()
                        .enumerate()
                        .filter_map(|(i, item)| match item.get_ref() {
                            DeValue::String(s) => Some((s.to_string(), item.span().start, format!("{k}[{i}]"))),
                            _ => {
                                self.error(item.span().start, Some(format!("{k}[{i}]")), "must be a regex string");
                                None
                            }
                        })
                        .collect(),
                    _ => {
                        self.error(value.span().start, Some(k.clone()), "must be a regex string or a list of them");
                        Vec::new()
                    }
                };
                let mut regexes = Vec::new();
                for (pattern, at, key) in patterns {
                    let Some(regex) = self.regex(&pattern, at, &key) else {
                        continue;
                    };
                    let names: Vec<&str> = regex.capture_names().flatten().collect();
                    if names.is_empty() {
                        self.error(at, Some(key.clone()), "has no named group (?P<name>...), so it extracts nothing");
                    }
                    for name in names {
                        if let Some(problem) = field_name_problem(name) {
                            self.error(at, Some(key.clone()), format!("group {name:?} {problem}"));
                        } else if !extracted_names.iter().any(|n| n == name) {
                            extracted_names.push(name.to_string());
                        }
                    }
                    regexes.push(regex);
                }
                extract.push(Extractor { target, regexes });
            }
        }

        let mut fields = Vec::new();
        if let Some(v) = t.get("fields") {
            for (key, value) in self.table(v, "fields") {
                let name = key.get_ref().to_string();
                let k = format!("fields.{name}");
                if let Some(problem) = field_name_problem(&name) {
                    self.error(key.span().start, Some(k.clone()), format!("field name {problem}"));
                }
                if let Some(spec) = self.spec(value, &k) {
                    fields.push((name, spec));
                }
            }
        }

        let payload = t.get("payload").map(|v| {
            let mut entries = Vec::new();
            for (key, value) in self.table(v, "payload") {
                let k = format!("payload.{}", key.get_ref());
                if let Some(spec) = self.spec(value, &k) {
                    entries.push((key.get_ref().to_string(), spec));
                }
            }
            entries
        });

        if let Some(v) = t.get("require") {
            for (i, name) in require.iter().enumerate() {
                if !extracted_names.contains(name) && !fields.iter().any(|(k, _)| k == name) {
                    self.error(
                        v.span().start,
                        Some(format!("require[{i}]")),
                        format!("{name:?} is neither extracted nor computed by this rule"),
                    );
                }
            }
        }

        (self.errors.len() == before).then(|| Rule {
            name,
            file: self.file.to_path_buf(),
            line,
            to,
            require,
            when,
            extract,
            fields,
            payload,
        })
    }

    /// The entries of a sub-table, in file order (empty, with an error, if it is not a table).
    fn table<'v, 'i>(
        &mut self,
        v: &'v Spanned<DeValue<'i>>,
        key: &str,
    ) -> Vec<(Spanned<String>, &'v Spanned<DeValue<'i>>)> {
        match v.get_ref() {
            DeValue::Table(t) => t.iter().map(|(k, v)| (Spanned::new(k.span(), k.get_ref().to_string()), v)).collect(),
            _ => {
                self.error(v.span().start, Some(key.into()), "must be a table");
                Vec::new()
            }
        }
    }

    fn string_list(&mut self, v: &Spanned<DeValue<'_>>, key: &str) -> Vec<String> {
        match v.get_ref() {
            DeValue::String(s) => vec![s.to_string()],
            DeValue::Array(items) => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match item.get_ref() {
                        DeValue::String(s) if !s.trim().is_empty() => out.push(s.to_string()),
                        _ => self.error(item.span().start, Some(format!("{key}[{i}]")), "must be a non-empty string"),
                    }
                }
                out
            }
            _ => {
                self.error(v.span().start, Some(key.into()), "must be a list of strings");
                Vec::new()
            }
        }
    }

    fn target(&mut self, key: &Spanned<String>, full_key: &str) -> Option<Target> {
        let target = Target::parse(key.get_ref());
        if target.is_none() {
            // Unquoted, `header.X-Mailer = '...'` is TOML for a table `header`: the dot must be
            // inside one quoted key.
            let message = if key.get_ref() == "header" {
                "a header key is one key with a dot in it: write it quoted: \"header.X-Mailer\" = '...'"
            } else {
                "unknown key (use from, to, cc, recipient, source, subject, body, html, attachment or \"header.<Name>\")"
            };
            self.error(key.span().start, Some(full_key.to_string()), message);
        }
        target
    }

    /// The compiled `pattern` (each distinct pattern is compiled once per load).
    fn regex(&mut self, pattern: &str, at: usize, key: &str) -> Option<Arc<Regex>> {
        if let Some(regex) = self.regexes.get(pattern) {
            return Some(regex.clone());
        }
        match RegexBuilder::new(pattern).size_limit(REGEX_SIZE_LIMIT).build() {
            Ok(regex) => {
                let regex = Arc::new(regex);
                self.regexes.insert(pattern.to_string(), regex.clone());
                Some(regex)
            }
            Err(e) => {
                let reason = regex_error_reason(&e.to_string());
                self.error(at, Some(key.to_string()), format!("invalid regex {pattern:?}: {reason}"));
                None
            }
        }
    }

    fn spec(&mut self, v: &Spanned<DeValue<'_>>, key: &str) -> Option<Spec> {
        let at = v.span().start;
        let name = format!("{}#{}/{key}", self.file.display(), self.rule.as_deref().unwrap_or(""));
        match v.get_ref() {
            DeValue::String(s) => {
                if !(s.contains("{{") || s.contains("{%") || s.contains("{#")) {
                    return Some(Spec::Literal(Json::String(s.to_string())));
                }
                match self.templates.add_template(&name, s) {
                    Ok(()) => Some(Spec::Template(name)),
                    Err(e) => {
                        self.error(at, Some(key.into()), format!("invalid template: {e}"));
                        None
                    }
                }
            }
            DeValue::Integer(i) => {
                let digits = i.as_str().replace('_', "");
                match i64::from_str_radix(&digits, i.radix()) {
                    Ok(n) => Some(Spec::Literal(Json::from(n))),
                    Err(_) => {
                        self.error(at, Some(key.into()), "integer out of range");
                        None
                    }
                }
            }
            DeValue::Float(f) => {
                match f.as_str().replace('_', "").parse::<f64>().ok().and_then(serde_json::Number::from_f64) {
                    Some(n) => Some(Spec::Literal(Json::Number(n))),
                    None => {
                        self.error(at, Some(key.into()), "float must be finite (JSON has no inf or nan)");
                        None
                    }
                }
            }
            DeValue::Boolean(b) => Some(Spec::Literal(Json::Bool(*b))),
            DeValue::Datetime(d) => Some(Spec::Literal(Json::String(d.to_string()))),
            DeValue::Array(items) => {
                let specs: Vec<Option<Spec>> =
                    items.iter().enumerate().map(|(i, item)| self.spec(item, &format!("{key}[{i}]"))).collect();
                specs.into_iter().collect::<Option<Vec<_>>>().map(Spec::Array)
            }
            DeValue::Table(t) => {
                if let Some(expr) = t.get("expr") {
                    if t.len() != 1 {
                        self.error(at, Some(key.into()), "an { expr = \"...\" } table takes no other keys");
                        return None;
                    }
                    let DeValue::String(source) = expr.get_ref() else {
                        self.error(expr.span().start, Some(format!("{key}.expr")), "must be a string");
                        return None;
                    };
                    return match self.templates.add_expr(&name, source) {
                        Ok(()) => Some(Spec::Expr(name)),
                        Err(e) => {
                            self.error(expr.span().start, Some(key.into()), format!("invalid expression: {e}"));
                            None
                        }
                    };
                }
                let mut entries = Vec::new();
                let mut ok = true;
                for (k, item) in t {
                    match self.spec(item, &format!("{key}.{}", k.get_ref())) {
                        Some(s) => entries.push((k.get_ref().to_string(), s)),
                        None => ok = false,
                    }
                }
                ok.then_some(Spec::Object(entries))
            }
        }
    }
}

/// Why `name` cannot be a field name, if it cannot.
fn field_name_problem(name: &str) -> Option<String> {
    let mut chars = name.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Some("must be letters, digits and _ (not starting with a digit)".into());
    }
    if RESERVED.contains(&name) {
        return Some(format!("is a built-in name ({}); choose another", RESERVED.join(", ")));
    }
    None
}

/// The one-line reason of a regex error (the crate's message is a multi-line diagram).
fn regex_error_reason(text: &str) -> String {
    text.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("error:").map(|r| r.trim().to_string()))
        .unwrap_or_else(|| crate::config::one_line(text))
}

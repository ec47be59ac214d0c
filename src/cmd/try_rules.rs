//! `mailhook try`: run email files through the rules and print what would be sent.

use super::{EnvelopeSpec, Exit, RulesSource, outcome_json};
use crate::parse::parse;
use serde_json::Value as Json;
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, Clone, Default)]
pub struct TryOptions {
    pub rules: RulesSource,
    pub files: Vec<PathBuf>,
    /// Overrides the envelope (else a sidecar `NAME.envelope.toml`, else defaults).
    pub envelope: EnvelopeSpec,
    pub pretty: bool,
}

/// Prints one JSON object per file on stdout: `{"file", "rule", "to", "payload"}` (plus
/// `dead` or `dropped`). Unreadable files are reported on stderr and give exit 65. A file
/// named `-` is read from standard input.
pub fn run(opts: &TryOptions) -> Exit {
    let rules = match opts.rules.load() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let mut exit = Exit::Ok;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for file in &opts.files {
        let stdin = file.as_os_str() == "-";
        let read = if stdin {
            let mut raw = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut raw).map(|_| raw)
        } else {
            std::fs::read(file)
        };
        let raw = match read {
            Ok(raw) => raw,
            Err(e) => {
                eprintln!("{}: cannot read: {e}", file.display());
                exit = exit.max(Exit::DataErr);
                continue;
            }
        };
        let email = parse(&raw);
        let sidecar = if stdin { Ok(None) } else { EnvelopeSpec::sidecar(file) };
        let spec = match sidecar {
            Ok(Some(sidecar)) => merge(&opts.envelope, sidecar),
            Ok(None) => opts.envelope.clone(),
            Err(e) => {
                eprintln!("{e}");
                exit = exit.max(Exit::DataErr);
                continue;
            }
        };
        let envelope = match spec.envelope(&email) {
            Ok(env) => env,
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                return Exit::Usage;
            }
        };
        let outcome = rules.evaluate(&email, &envelope);
        let mut line = serde_json::Map::new();
        line.insert("file".into(), Json::String(file.display().to_string()));
        line.extend(outcome_json(&email, &outcome));
        let line = Json::Object(line);
        let text = if opts.pretty { serde_json::to_string_pretty(&line) } else { serde_json::to_string(&line) };
        if writeln!(out, "{}", text.expect("a JSON value always serialises")).is_err() {
            return exit; // stdout closed (e.g. piped into head): nothing more to say
        }
    }
    exit
}

/// Command-line values win over the sidecar's.
fn merge(cli: &EnvelopeSpec, sidecar: EnvelopeSpec) -> EnvelopeSpec {
    EnvelopeSpec {
        source: cli.source.clone().or(sidecar.source),
        mail_from: cli.mail_from.clone().or(sidecar.mail_from),
        recipients: cli.recipients.clone().or(sidecar.recipients),
    }
}

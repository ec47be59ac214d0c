//! `mailhook check`: validate the config and the rules it points at, offline. Prints every
//! problem (file, line, rule, key) and exits 78, or a one-paragraph summary and exits 0.
//!
//! The rules are checked even when the config has errors, as long as the config says where
//! they are without an error in `[rules]`: a rule naming an unknown destination is reported
//! together with the config's own problems (a destination declared with errors still counts
//! as declared).
//!
//! With `[cluster]`, `check` also connects to the database and checks that `synchronous_commit`
//! is not `off` and that the schema is at this binary's version: an unreachable database exits
//! 75 (try again later), anything else 78.

use super::{Exit, print_rule_errors};
use crate::config::{Config, RulesSite};
use crate::rules::{RuleError, RuleSet, Unmatched};
use std::path::Path;

pub fn run(config_path: &Path) -> Exit {
    let checked = Config::check(config_path);
    for e in &checked.errors {
        eprintln!("{e}");
    }
    if !checked.errors.is_empty() {
        let n = checked.errors.len();
        eprintln!("{n} error{} in config", if n == 1 { "" } else { "s" });
    }
    let rules = match &checked.rules {
        Some(site) => load_rules(site),
        None => Err(Vec::new()),
    };
    if let Err(errors) = &rules
        && !errors.is_empty()
    {
        print_rule_errors(errors);
    }
    let (Some(config), Ok(rules)) = (checked.config, rules) else {
        return Exit::Config;
    };
    let rules_dir = config.resolve(&config.rules.dir);

    for (key, message) in config.warnings() {
        eprintln!("warning: {}: {key}: {message}", config_path.display());
    }

    // Trial rules must load as live rules do: they are promoted by moving the file.
    let trial = match &config.rules.trial_dir {
        Some(dir) => {
            let dir = config.resolve(dir);
            let loaded =
                crate::rules::RuleSet::load_dir(&dir, crate::rules::Unmatched::from_config(&config.rules.unmatched))
                    .and_then(|set| {
                        let errors = set.check_destinations(|d| config.destination.contains_key(d));
                        if errors.is_empty() { Ok(set) } else { Err(errors) }
                    });
            match loaded {
                Ok(set) => Some((dir, set.rules().len())),
                Err(errors) => {
                    print_rule_errors(&errors);
                    return Exit::Config;
                }
            }
        }
        None => None,
    };

    println!("{}: ok", config_path.display());
    println!(
        "  rules: {} in {} file{} from {} (unmatched: {})",
        rules.rules().len(),
        rules.files().len(),
        if rules.files().len() == 1 { "" } else { "s" },
        rules_dir.display(),
        config.rules.unmatched
    );
    if let Some((dir, n)) = trial {
        println!("  trial rules: {n} from {}", dir.display());
    }
    for (name, d) in &config.destination {
        println!("  destination {name}: {}", d.type_name());
    }
    if let Some(smtp) = &config.smtp {
        println!("  smtp: {}", smtp.listen.join(", "));
    }
    if let Some(lmtp) = &config.lmtp {
        println!("  lmtp: {}", lmtp.listen.join(", "));
    }
    for imap in &config.imap {
        println!("  imap {}: {}@{} {}", imap.name, imap.user, imap.host, imap.folders.join(", "));
    }
    println!("  spool: {}", config.resolve(&config.spool.dir).display());
    if let Some(cluster) = &config.cluster {
        match crate::store::postgres::verify(cluster, &|p| config.resolve(p)) {
            Ok(version) => {
                println!("  cluster: {}, schema version {version}, lease {:?}", cluster.postgres, cluster.lease)
            }
            Err(e) => {
                eprintln!("{}: cluster.postgres: {e}", config_path.display());
                return if e.is_unreachable() { Exit::TempFail } else { Exit::Config };
            }
        }
    }
    Exit::Ok
}

/// Loads the rules at `site` and checks the destinations they name.
fn load_rules(site: &RulesSite) -> Result<RuleSet, Vec<RuleError>> {
    let rules = RuleSet::load_dir(&site.dir, Unmatched::from_config(&site.unmatched))?;
    let errors = rules.check_destinations(|d| site.destinations.contains(d));
    if errors.is_empty() { Ok(rules) } else { Err(errors) }
}

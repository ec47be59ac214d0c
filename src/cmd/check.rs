//! `mailhook check`: validate the config and the rules it points at, offline. Prints every
//! problem (file, line, rule, key) and exits 78, or a one-paragraph summary and exits 0.

use super::{Exit, print_rule_errors};
use crate::config::Config;
use std::path::Path;

pub fn run(config_path: &Path) -> Exit {
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            eprintln!("{} error{} in config", errors.len(), if errors.len() == 1 { "" } else { "s" });
            return Exit::Config;
        }
    };
    let rules_dir = config.resolve(&config.rules.dir);
    let rules = match crate::serve::load_rules(&config) {
        Ok(r) => r,
        Err(errors) => {
            print_rule_errors(&errors);
            return Exit::Config;
        }
    };

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
        println!("  destination {name}: {}", d.kind.name());
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
    Exit::Ok
}

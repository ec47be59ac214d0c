//! `mailhook shadow`: judge archived messages with the live rules and with another rules
//! directory, and report what would change. Exit 0 when nothing would, 1 when something would
//! (so a CI job on a rules repository fails on a change nobody looked at).

use super::{Exit, RulesSource};
use crate::config::Config;
use crate::lifecycle::shadow::{self, Scope};
use crate::spool::SpoolOptions;
use crate::store::StoreError;
use crate::store::postgres::PostgresArchive;
use crate::store::sqlite::SqliteArchive;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

#[derive(Debug, Clone)]
pub struct ShadowOptions {
    pub config: PathBuf,
    /// The rules to compare with the live ones.
    pub rules: PathBuf,
    /// Messages received within this long (`--since 7d`).
    pub since: Option<Duration>,
    /// The newest this many (`--last N`); neither: the newest `[rules] shadow_last`.
    pub last: Option<usize>,
    pub json: bool,
}

pub fn run(opts: &ShadowOptions) -> Exit {
    let config = match Config::load(&opts.config) {
        Ok(c) => c,
        Err(errors) => {
            for e in errors {
                eprintln!("{e}");
            }
            return Exit::Config;
        }
    };
    let Some(path) = config.archive_path() else {
        eprintln!("the archive is off ([archive] enabled = false): there are no messages to judge");
        return Exit::Config;
    };
    if config.cluster.is_none() && !path.is_file() {
        eprintln!("no archive at {} (mailhook serve creates it)", path.display());
        return Exit::TempFail;
    }
    let live = match (RulesSource { rules_dir: None, config: Some(opts.config.clone()) }).load() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let other = match (RulesSource { rules_dir: Some(opts.rules.clone()), config: Some(opts.config.clone()) }).load() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let scope = match (opts.since, opts.last) {
        (None, None) => Scope { since: None, last: Some(config.rules.shadow_last.max(1)) },
        (since, last) => {
            Scope { since: since.map(|d| SystemTime::now().checked_sub(d).unwrap_or(SystemTime::UNIX_EPOCH)), last }
        }
    };
    // With [cluster], the archive every instance writes is in PostgreSQL.
    let report = match &config.cluster {
        Some(cluster) => PostgresArchive::open(cluster, &|p| config.resolve(p))
            .map_err(StoreError::from)
            .and_then(|archive| shadow::run(&archive, &live, &other, scope, usize::MAX)),
        // The raw messages are kept by the spool, which the archive reads them from.
        None => crate::spool::Spool::open(&config.resolve(&config.spool.dir), SpoolOptions::of(&config))
            .map_err(StoreError::from)
            .and_then(|spool| Ok(SqliteArchive::open(&path)?.with_keeper(Arc::new(spool))))
            .and_then(|archive| shadow::run(&archive, &live, &other, scope, usize::MAX)),
    };
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return Exit::TempFail;
        }
    };
    let text = if opts.json {
        format!("{}\n", serde_json::to_string_pretty(&report).expect("a report serialises"))
    } else {
        report.text()
    };
    // A closed stdout (piped into head) changes nothing about the verdict.
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    if report.counts.changed() == 0 { Exit::Ok } else { Exit::Failed }
}

//! reload: keeps the rules `mailhook serve` judges with in step with the rules directory.
//!
//! ```text
//! rules/*.toml changed ─┐
//!                       ├─► wait for quiet (debounce) ─► load + compile the whole set ─► valid? swap it in
//! SIGHUP ───────────────┘                                                              └─ else keep the old set, log every error
//! ```
//!
//! The directory is watched with inotify (the `notify` crate); an editor's save is often a burst
//! of events (write a temporary file, rename it over the old one), so a reload waits until no
//! event came for [`DEBOUNCE`]. The new set is loaded with [`crate::serve::load_rules`], which
//! also checks that every destination a rule names exists, and replaces the shared set in one
//! step: a message being judged keeps the set it started with.
//!
//! With the archive on, a valid new set is first judged against the old one over the newest
//! `[rules] shadow_last` archived messages ([`crate::lifecycle::shadow`]); the summary is logged
//! and the report kept for the console's "Rule changes" page. When a message that a rule had
//! matched would now be unmatched or a dead letter, `[rules] guard = "refuse"` keeps the old set
//! (and logs why); the default `"warn"` swaps the new set in and warns. The trial rules
//! (`[rules] trial_dir`) are loaded again at every reload.

use crate::config::Config;
use crate::lifecycle::shadow::{self, Scope};
use crate::lifecycle::{Observer, ReloadReport, SharedReport};
use crate::metrics::Metrics;
use crate::pipeline::SharedRules;
use crate::serve::load_rules;
use crate::store::Archive;
use notify::{EventKind, RecursiveMode, Watcher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

/// Quiet time after the last change before the rules are reloaded.
pub const DEBOUNCE: Duration = Duration::from_millis(300);

/// A burst of changes longer than this still gives a reload at this point.
const MAX_DELAY: Duration = Duration::from_secs(3);

/// Watches the rules directory and SIGHUP; reloads the rules on either.
pub struct Reloader {
    config: Arc<Config>,
    dir: PathBuf,
    rules: SharedRules,
    metrics: Arc<Metrics>,
    changes: mpsc::UnboundedReceiver<()>,
    hangup: Signal,
    /// Kept alive for as long as the directory is to be watched.
    _watcher: Option<notify::RecommendedWatcher>,
    /// Where shadow runs read messages, and where their last report goes.
    archive: Option<Arc<dyn Archive>>,
    report: SharedReport,
    observer: Option<Arc<Observer>>,
}

/// Differences a reload's report keeps (all are counted).
pub const REPORT_KEEP: usize = 200;

/// Why a reload happened (for the log).
#[derive(Debug, Clone, Copy)]
enum Trigger {
    Change,
    Hangup,
}

impl Reloader {
    /// Takes over SIGHUP and starts watching the rules directory. A directory that cannot be
    /// watched (inotify limits) is logged; SIGHUP still reloads.
    pub fn start(config: &Config, rules: SharedRules, metrics: Arc<Metrics>) -> std::io::Result<Reloader> {
        let hangup = signal(SignalKind::hangup())?;
        let dir = config.resolve(&config.rules.dir);
        let (tx, changes) = mpsc::unbounded_channel();
        let watcher = match watch_dir(&dir, tx) {
            Ok(w) => {
                info!(dir = %dir.display(), "watching the rules directory");
                Some(w)
            }
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "cannot watch the rules directory; reload with SIGHUP");
                None
            }
        };
        Ok(Reloader {
            config: Arc::new(config.clone()),
            dir,
            rules,
            metrics,
            changes,
            hangup,
            _watcher: watcher,
            archive: None,
            report: SharedReport::default(),
            observer: None,
        })
    }

    /// Shadow-runs each new set over `archive` (the report goes to `report`), and reloads the
    /// observer's trial rules with the live ones.
    pub fn with_lifecycle(
        mut self,
        archive: Option<Arc<dyn Archive>>,
        report: SharedReport,
        observer: Option<Arc<Observer>>,
    ) -> Reloader {
        self.archive = archive;
        self.report = report;
        self.observer = observer;
        self
    }

    /// Reloads on every change and SIGHUP until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        loop {
            let trigger = tokio::select! {
                _ = stopped(&mut shutdown) => return,
                Some(()) = self.changes.recv() => {
                    self.settle().await;
                    Trigger::Change
                }
                _ = self.hangup.recv() => Trigger::Hangup,
            };
            if *shutdown.borrow() {
                return;
            }
            self.reload(trigger).await;
        }
    }

    /// Waits until no change came for [`DEBOUNCE`] (at most [`MAX_DELAY`]).
    async fn settle(&mut self) {
        let deadline = tokio::time::Instant::now() + MAX_DELAY;
        loop {
            let quiet = tokio::time::sleep(DEBOUNCE);
            tokio::select! {
                more = self.changes.recv() => if more.is_none() { return },
                _ = quiet => return,
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    /// Loads and compiles the whole rules directory; swaps it in when valid.
    async fn reload(&self, trigger: Trigger) {
        let config = self.config.clone();
        let loaded = match tokio::task::spawn_blocking(move || load_rules(&config)).await {
            Ok(loaded) => loaded,
            Err(e) => {
                error!(error = %e, "rules reload did not finish; the previous rules keep serving");
                self.metrics.reloaded(false);
                return;
            }
        };
        self.reload_trial().await;
        match loaded {
            Ok(set) => {
                let (count, files) = (set.rules().len(), set.files().len());
                let set = Arc::new(set);
                if !self.shadow(&set).await {
                    self.metrics.reloaded(false);
                    return;
                }
                self.metrics.rules_loaded(set.rules().iter().map(|r| r.name.as_str()));
                *self.rules.write().unwrap_or_else(|e| e.into_inner()) = set;
                self.metrics.reloaded(true);
                info!(rules = count, files, trigger = ?trigger, dir = %self.dir.display(), "rules reloaded");
            }
            Err(errors) => {
                for e in &errors {
                    error!(
                        file = %e.file.display(),
                        line = e.line,
                        rule = e.rule.as_deref(),
                        key = e.key.as_deref(),
                        error = %e.message,
                        "rules error: {e}"
                    );
                }
                error!(
                    errors = errors.len(),
                    trigger = ?trigger,
                    dir = %self.dir.display(),
                    "rules reload refused: {} error(s); the previous rules keep serving",
                    errors.len()
                );
                self.metrics.reloaded(false);
            }
        }
    }
}

impl Reloader {
    /// Judges the newest archived messages with the serving rules and `new`; logs and keeps
    /// the report. Returns whether `new` may serve (`false`: the guard refuses it).
    async fn shadow(&self, new: &Arc<crate::rules::RuleSet>) -> bool {
        let last = self.config.rules.shadow_last;
        let Some(archive) = self.archive.clone().filter(|_| last > 0) else { return true };
        let old = self.rules.read().unwrap_or_else(|e| e.into_inner()).clone();
        let other = new.clone();
        let scope = Scope { since: None, last: Some(last) };
        let run = tokio::task::spawn_blocking(move || shadow::run(&*archive, &old, &other, scope, REPORT_KEEP)).await;
        let report = match run {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                warn!(error = %e, "shadow run of the new rules failed; they apply without one");
                return true;
            }
            Err(e) => {
                warn!(error = %e, "shadow run of the new rules failed; they apply without one");
                return true;
            }
        };
        let c = &report.counts;
        info!(
            judged = c.judged,
            unchanged = c.unchanged,
            changed_rule = c.changed_rule,
            newly_matched = c.newly_matched,
            newly_unmatched = c.newly_unmatched,
            newly_dead = c.newly_dead,
            changed_fields = c.changed_fields,
            took_ms = report.took_ms,
            "shadow run of the new rules: {}",
            c.line()
        );
        let refuse = report.breaking > 0 && self.config.rules.guard == "refuse";
        if report.breaking > 0 {
            if refuse {
                error!(
                    breaking = report.breaking,
                    dir = %self.dir.display(),
                    "rules reload refused by [rules] guard = \"refuse\": {}; the previous rules keep serving",
                    report.breaking_summary()
                );
            } else {
                warn!(
                    breaking = report.breaking,
                    "the new rules break mail that worked: {}",
                    report.breaking_summary()
                );
            }
        }
        *self.report.write().unwrap_or_else(|e| e.into_inner()) = Some(ReloadReport { report, applied: !refuse });
        !refuse
    }

    /// Loads the trial rules again, if there are any.
    async fn reload_trial(&self) {
        let Some(observer) = self.observer.clone().filter(|o| o.trial.is_some()) else { return };
        let loaded =
            tokio::task::spawn_blocking(move || observer.trial.as_ref().map(|t| (t.dir().to_path_buf(), t.reload())))
                .await;
        match loaded {
            Ok(Some((dir, Ok(n)))) => info!(rules = n, dir = %dir.display(), "trial rules loaded"),
            Ok(Some((dir, Err(errors)))) => {
                for e in &errors {
                    error!(error = %e, "trial rules error");
                }
                error!(dir = %dir.display(), errors = errors.len(), "trial rules not loaded; no trial until they load");
            }
            Ok(None) => {}
            Err(e) => error!(error = %e, "trial rules reload did not finish"),
        }
    }
}

/// Returns once `shutdown` turns true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Watches `dir` (not its subdirectories) and sends `()` for each change to a rules file.
fn watch_dir(dir: &Path, tx: mpsc::UnboundedSender<()>) -> notify::Result<notify::RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let relevant = match &event {
            Ok(e) => {
                e.need_rescan() || (!matches!(e.kind, EventKind::Access(_)) && e.paths.iter().any(|p| is_rules_file(p)))
            }
            // Lost events (queue overflow): reload to be sure.
            Err(_) => true,
        };
        if relevant {
            let _ = tx.send(());
        }
    })?;
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

/// A file the rules loader reads: `*.toml`, not hidden.
fn is_rules_file(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    !name.starts_with('.') && name.ends_with(".toml")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_visible_toml_files_count() {
        assert!(is_rules_file(Path::new("/etc/mailhook/rules/10-a.toml")));
        assert!(!is_rules_file(Path::new("/etc/mailhook/rules/.10-a.toml.swp")));
        assert!(!is_rules_file(Path::new("/etc/mailhook/rules/.hidden.toml")));
        assert!(!is_rules_file(Path::new("/etc/mailhook/rules/4913")));
        assert!(!is_rules_file(Path::new("/etc/mailhook/rules/10-a.toml~")));
    }
}

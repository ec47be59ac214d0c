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
//! event came for [`DEBOUNCE`]. The new set is loaded with [`crate::rules::load_rules`], which
//! also checks that every destination a rule names exists, and replaces the shared set in one
//! step: a message being judged keeps the set it started with.
//!
//! A reload is also ordered before new judgements: before a new message is judged,
//! [`RulesOnDisk::refresh`] compares the rules directory (its files' names, sizes, inodes and
//! modification times) with what the loaded set was read from, and loads the set again at once
//! when they differ. So a mail sent right after a rules file was saved is judged by the new
//! rules, without waiting for the debounce. (Two saves of the same size within one tick of the
//! file system's clock look alike; the watcher's reload still catches the second.)
//!
//! With the archive on, a valid new set is first judged against the old one over the newest
//! `[rules] shadow_last` archived messages ([`crate::lifecycle::shadow`]); the summary is logged
//! and the report kept for the console's "Rule changes" page. When a message that a rule had
//! matched would now be unmatched or a dead letter, `[rules] guard = "refuse"` keeps the old set
//! (and logs why); the default `"warn"` swaps the new set in and warns. The trial rules
//! (`[rules] trial_dir`) are loaded again at every reload, and a change in their directory is a
//! reason for one, seen before the next message is judged as a change of the live rules is.

use crate::config::Config;
use crate::lifecycle::shadow::{self, Scope};
use crate::lifecycle::{Observer, ReloadReport, SharedReport};
use crate::metrics::Metrics;
use crate::pipeline::SharedRules;
use crate::rules::load_rules;
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

/// What the rules directory looked like: each rules file's name, size, inode and modification
/// time, in name order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot(Vec<(std::ffi::OsString, u64, u64, Option<std::time::SystemTime>)>);

impl Snapshot {
    /// The rules directory of `config` and its trial rules directory, if it has one: a change
    /// in either is a reason to load the rules again before judging.
    pub fn of_config(config: &Config) -> Snapshot {
        let mut all = Snapshot::of(&config.resolve(&config.rules.dir));
        if let Some(trial) = &config.rules.trial_dir {
            all.0.push(("--trial--".into(), 0, 0, None));
            all.0.extend(Snapshot::of(&config.resolve(trial)).0);
        }
        all
    }

    /// Reads the directory (a few `stat`s; no file is opened).
    pub fn of(dir: &Path) -> Snapshot {
        use std::os::unix::fs::MetadataExt;
        let Ok(entries) = std::fs::read_dir(dir) else { return Snapshot::default() };
        let mut files: Vec<_> = entries
            .filter_map(Result::ok)
            .filter(|e| is_rules_file(&e.path()))
            .filter_map(|e| {
                let m = std::fs::metadata(e.path()).ok()?;
                Some((e.file_name(), m.len(), m.ino(), m.modified().ok()))
            })
            .collect();
        files.sort();
        Snapshot(files)
    }
}

/// The rules in force and the directory they were read from: one reload at a time, whoever
/// asks for it (the watcher, SIGHUP, or the pipeline before judging).
pub struct RulesOnDisk {
    config: Arc<Config>,
    dir: PathBuf,
    rules: SharedRules,
    metrics: Arc<Metrics>,
    /// The directory as it was just before the set in force (or the last refused one) was read.
    seen: std::sync::Mutex<Snapshot>,
    /// Where a new set is shadow-run before it serves, and where its report goes.
    archive: Option<Arc<dyn Archive>>,
    report: SharedReport,
    /// Holds the trial rules, loaded again with the live ones.
    observer: Option<Arc<Observer>>,
}

impl RulesOnDisk {
    /// `seen`: the directory as it was before `rules` were loaded.
    pub fn new(config: &Config, rules: SharedRules, metrics: Arc<Metrics>, seen: Snapshot) -> RulesOnDisk {
        RulesOnDisk {
            config: Arc::new(config.clone()),
            dir: config.resolve(&config.rules.dir),
            rules,
            metrics,
            seen: std::sync::Mutex::new(seen),
            archive: None,
            report: SharedReport::default(),
            observer: None,
        }
    }

    /// Reloads now when the directory changed since the rules were read; returns whether it did.
    /// Blocking (a few `stat`s; a load when something changed).
    pub fn refresh(&self) -> bool {
        self.refresh_as(Trigger::Judging)
    }

    fn refresh_as(&self, trigger: Trigger) -> bool {
        let now = Snapshot::of_config(&self.config);
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if *seen == now {
            return false;
        }
        // Taken before the load: a change made while loading is seen next time.
        *seen = now;
        self.load(trigger);
        true
    }

    /// Loads the whole set again whatever the directory looks like (SIGHUP).
    fn reload(&self, trigger: Trigger) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        *seen = Snapshot::of_config(&self.config);
        self.load(trigger);
    }

    /// Loads and compiles the whole rules directory; swaps it in when valid.
    fn load(&self, trigger: Trigger) {
        let loaded = load_rules(&self.config);
        self.reload_trial();
        match loaded {
            Ok(set) => {
                let (count, files) = (set.rules().len(), set.files().len());
                let set = Arc::new(set);
                if !self.shadow(&set) {
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

/// Watches the rules directory and SIGHUP; reloads the rules on either.
pub struct Reloader {
    on_disk: Arc<RulesOnDisk>,
    changes: mpsc::UnboundedReceiver<()>,
    hangup: Signal,
    /// Kept alive for as long as the directory is to be watched.
    _watcher: Option<notify::RecommendedWatcher>,
}

/// Differences a reload's report keeps (all are counted).
pub const REPORT_KEEP: usize = 200;

/// Why a reload happened (for the log).
#[derive(Debug, Clone, Copy)]
enum Trigger {
    Change,
    Hangup,
    /// A new message was about to be judged and the directory had changed.
    Judging,
}

impl Reloader {
    /// Takes over SIGHUP and starts watching the rules directory. A directory that cannot be
    /// watched (inotify limits) is logged; SIGHUP still reloads.
    pub fn start(on_disk: Arc<RulesOnDisk>) -> std::io::Result<Reloader> {
        let hangup = signal(SignalKind::hangup())?;
        let dir = on_disk.dir.clone();
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
        Ok(Reloader { on_disk, changes, hangup, _watcher: watcher })
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

    /// Reloads off the async threads: on a change only if the directory differs from what the
    /// rules in force were read from (the pipeline may have reloaded already), on SIGHUP always.
    async fn reload(&self, trigger: Trigger) {
        let on_disk = self.on_disk.clone();
        let done = tokio::task::spawn_blocking(move || match trigger {
            Trigger::Hangup => on_disk.reload(trigger),
            _ => {
                on_disk.refresh_as(trigger);
            }
        })
        .await;
        if let Err(e) = done {
            error!(error = %e, "rules reload did not finish; the previous rules keep serving");
            self.on_disk.metrics.reloaded(false);
        }
    }
}

impl RulesOnDisk {
    /// Shadow-runs each new set over `archive` (the report goes to `report`), and reloads the
    /// observer's trial rules with the live ones.
    pub fn with_lifecycle(
        mut self,
        archive: Option<Arc<dyn Archive>>,
        report: SharedReport,
        observer: Option<Arc<Observer>>,
    ) -> RulesOnDisk {
        self.archive = archive;
        self.report = report;
        self.observer = observer;
        self
    }

    /// Judges the newest archived messages with the serving rules and `new`; logs and keeps
    /// the report. Returns whether `new` may serve (`false`: the guard refuses it).
    fn shadow(&self, new: &Arc<crate::rules::RuleSet>) -> bool {
        let last = self.config.rules.shadow_last;
        let Some(archive) = self.archive.clone().filter(|_| last > 0) else { return true };
        let old = self.rules.read().unwrap_or_else(|e| e.into_inner()).clone();
        let other = new.clone();
        let scope = Scope { since: None, last: Some(last) };
        let report = match shadow::run(&*archive, &old, &other, scope, REPORT_KEEP) {
            Ok(r) => r,
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
    fn reload_trial(&self) {
        let Some(trial) = self.observer.as_ref().and_then(|o| o.trial.as_ref()) else { return };
        match trial.reload() {
            Ok(n) => info!(rules = n, dir = %trial.dir().display(), "trial rules loaded"),
            Err(errors) => {
                for e in &errors {
                    error!(error = %e, "trial rules error");
                }
                error!(dir = %trial.dir().display(), errors = errors.len(), "trial rules not loaded; no trial until they load");
            }
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

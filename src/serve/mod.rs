//! serve: builds every stage from the config, runs them under one tokio runtime, and owns
//! shutdown. The only module that knows all the others.
//!
//! Start-up order: rules and destinations are built first (any error refuses to start), then
//! the spool is locked and recovered, the listeners, the admin endpoint and the public listener
//! ([`public`], `[web] listen`) bind (a port in use refuses to start), and only then does work
//! begin. SIGHUP or a change in the rules directory
//! reloads the rules ([`reload`]). SIGTERM or SIGINT stops claiming new work, closes the
//! listeners, the admin endpoint and the rules watcher, and lets rounds in flight finish within
//! a grace period.

pub mod admin;
pub mod console;
mod download;
mod headers;
pub mod public;
pub mod reload;

use crate::config::Config;
use crate::ingest::smtp::{Listener, ListenerError};
use crate::lifecycle::drift::{Drift, Settings as DriftSettings};
use crate::lifecycle::trial::Trial;
use crate::lifecycle::{Observer, SharedReport};
use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, SHUTDOWN_GRACE, SharedRules};
use crate::rules::{RuleError, load_rules};
use crate::spool::{Spool, SpoolError, SpoolOptions};
use crate::store::postgres::PostgresArchive;
use crate::store::sqlite::SqliteArchive;
use crate::store::{Archive, ArchiveWriter};
use admin::{Admin, AdminError};
use reload::{Reloader, RulesOnDisk};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tracing::{error, info, warn};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{} error(s) in rules", .0.len())]
    Rules(Vec<RuleError>),
    #[error(transparent)]
    Destination(#[from] crate::deliver::BuildError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(transparent)]
    Listener(#[from] ListenerError),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error(transparent)]
    Imap(#[from] crate::ingest::imap::WatchersError),
    #[error(transparent)]
    Archive(#[from] crate::store::StoreError),
    #[error(transparent)]
    Public(#[from] public::PublicError),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Runs `mailhook serve` until SIGTERM/SIGINT.
pub async fn serve(config: Config) -> Result<(), ServeError> {
    // Taken first: a SIGTERM that comes while the spool is still being recovered is kept, and
    // ends the run cleanly once it has started, instead of killing it by the default action.
    let signals = Signals::new()?;
    for (key, message) in config.warnings() {
        warn!(key = %key, "{message}");
    }
    let metrics = Metrics::new();
    let before_load = reload::Snapshot::of_config(&config);
    let rules = load_rules(&config).map_err(ServeError::Rules)?;
    info!(rules = rules.rules().len(), files = rules.files().len(), "rules loaded");
    metrics.rules_loaded(rules.rules().iter().map(|r| r.name.as_str()));
    let rules: SharedRules = Arc::new(RwLock::new(Arc::new(rules)));

    let spool_dir = config.resolve(&config.spool.dir);
    let node = match &config.cluster {
        Some(cluster) => {
            let node = crate::cluster::Node::open(cluster, &|p| config.resolve(p))?;
            info!(instance = %node.id(), host = %node.host(), "cluster instance");
            Some(node)
        }
        None => None,
    };
    let spool = match (&config.cluster, &node) {
        // The queue is in the shared database: every instance can deliver every message.
        (Some(cluster), Some(node)) => {
            Spool::open_cluster(cluster, &|p| config.resolve(p), Some(node.id().to_string()), &spool_dir)?
        }
        _ => Spool::open(&spool_dir, SpoolOptions::of(&config))?,
    };
    let _lock = spool.lock()?;
    let spool_for_recovery = spool.clone();
    let recovery = tokio::task::spawn_blocking(move || spool_for_recovery.recover())
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??;
    for item in &recovery.corrupt {
        error!(entry = %item, "moved to corrupt/: unreadable, needs a look");
    }
    info!(
        spool = %spool_dir.display(),
        requeued = recovery.requeued,
        tmp_removed = recovery.tmp_removed,
        removals_finished = recovery.removals_finished,
        corrupt = recovery.corrupt.len(),
        "spool recovered"
    );

    let archive: Option<Arc<dyn Archive>> = match (&config.cluster, config.archive_path()) {
        (Some(cluster), Some(_)) => {
            let (cluster, for_paths) = (cluster.clone(), config.clone());
            let opened =
                tokio::task::spawn_blocking(move || PostgresArchive::open(&cluster, &|p| for_paths.resolve(p)))
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))?
                    .map_err(crate::store::StoreError::from)?;
            info!(archive = %opened.host(), "archive in PostgreSQL");
            Some(Arc::new(opened))
        }
        (None, Some(path)) => {
            let keeper = spool.clone();
            let opened = tokio::task::spawn_blocking(move || {
                let archive = SqliteArchive::open(&path)?.with_keeper(Arc::new(keeper));
                // Nothing has been handed to the archive yet: every raw message the spool keeps
                // that no entry refers to can go.
                let released = archive.sweep_kept()?;
                Ok::<_, crate::store::StoreError>((archive, released))
            })
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?;
            let (opened, released) = opened?;
            info!(archive = %opened.path().display(), released, "archive open");
            Some(Arc::new(opened))
        }
        (None, None) => {
            // Raw messages kept for an archive since turned off have no reader left.
            let local = spool.clone();
            let released = tokio::task::spawn_blocking(move || local.release_all_kept())
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))??;
            if released > 0 {
                info!(released, "archive off: the raw messages the spool kept for it are given up");
            }
            None
        }
        (Some(_), None) => None,
    };
    let writer = archive.clone().map(ArchiveWriter::start);
    let lifecycle = Lifecycle::start(&config, &spool_dir, &metrics)?;
    let on_disk = Arc::new(RulesOnDisk::new(&config, rules.clone(), metrics.clone(), before_load).with_lifecycle(
        archive.clone(),
        lifecycle.report.clone(),
        Some(lifecycle.observer.clone()),
    ));
    let refresh = on_disk.clone();
    let mut pipeline =
        Pipeline::new(&config, spool.clone(), rules.clone(), metrics.clone())?.before_judging(Arc::new(move || {
            refresh.refresh();
        }));
    if let Some(w) = &writer {
        pipeline = pipeline.with_archive(w.clone());
    }
    if let Some(node) = &node {
        pipeline = pipeline.with_cluster(node);
    }
    if !lifecycle.observer.is_empty() {
        pipeline = pipeline.with_observer(lifecycle.observer.clone());
    }
    let pipeline = Arc::new(pipeline);
    let (stop_tx, stop_rx) = watch::channel(false);

    // Listeners and the admin endpoint bind before anything runs, so a port in use refuses to start.
    let mut listeners = Vec::new();
    if let Some(smtp) = &config.smtp {
        listeners.push(Listener::bind(smtp, false, &config, &metrics).await?);
    }
    if let Some(lmtp) = &config.lmtp {
        listeners.push(Listener::bind(lmtp, true, &config, &metrics).await?);
    }
    let admin = match &config.admin {
        Some(admin) => {
            let console = admin.console.then(|| {
                console::Console::new(
                    &config,
                    archive.clone(),
                    writer.clone(),
                    spool.clone(),
                    rules.clone(),
                    metrics.clone(),
                )
                .with_lifecycle(lifecycle.report.clone(), lifecycle.observer.clone())
            });
            let has_console = console.is_some();
            let bound = Admin::bind(admin, metrics.clone(), spool.clone(), console, node.clone()).await?;
            if let (true, Some(d)) = (has_console, &lifecycle.observer.drift) {
                d.default_links(format!("http://{}/messages/", bound.addr()));
            }
            Some(bound)
        }
        None => None,
    };
    let web = match (config.web.as_ref().and_then(|w| w.listen.as_ref()), &archive) {
        (Some(_), Some(archive)) => {
            Some(public::PublicListener::bind(public::Public::new(&config, archive.clone())?).await?)
        }
        (Some(_), None) => return Err(public::PublicError::Config("listen needs [archive] enabled").into()),
        (None, _) => None,
    };
    let reloader = Reloader::start(on_disk)?;
    let watchers = crate::ingest::imap::watchers(
        &config,
        &spool,
        &pipeline.inbox(),
        &metrics,
        &recovery.fingerprints,
        node.as_ref(),
    )?;
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(node) = &node {
        tasks.spawn(heartbeat(node.clone(), stop_rx.clone()));
    }
    for watcher in watchers {
        tasks.spawn(watcher.run(stop_rx.clone()));
    }
    for listener in listeners {
        tasks.spawn(listener.run(spool.clone(), pipeline.inbox(), stop_rx.clone(), SHUTDOWN_GRACE));
    }
    if let Some(admin) = admin {
        tasks.spawn(admin.run(stop_rx.clone()));
    }
    if let Some(web) = web {
        tasks.spawn(web.run(stop_rx.clone()));
    }
    tasks.spawn(reloader.run(stop_rx.clone()));
    if let Some(drift) = &lifecycle.observer.drift {
        tasks.spawn(crate::lifecycle::drift::keep_saved(drift.clone(), stop_rx.clone()));
        if let Some((name, destination)) = lifecycle.notify {
            tasks.spawn(crate::lifecycle::drift::notify(drift.events(), name, destination, stop_rx.clone()));
        }
    }
    if let Some(archive) = &archive {
        tasks.spawn(retention(archive.clone(), config.archive.keep, config.archive.max_size.as_u64(), stop_rx.clone()));
    }
    let workers = tokio::spawn(pipeline.clone().run(stop_rx));
    info!(destinations = config.destination.len(), "mailhook serving");

    signals.wait().await;
    info!("shutting down");
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    // Rounds in flight finish (or their grace ends) before the claims are given up.
    let _ = workers.await;
    if let Some(node) = &node {
        // Peers take this instance's folders at once rather than when the leases lapse.
        match tokio::time::timeout(Duration::from_secs(5), node.leave()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "cannot leave the cluster; its folder leases lapse"),
            Err(_) => warn!("cannot leave the cluster in time; its folder leases lapse"),
        }
    }
    if let Some(drift) = &lifecycle.observer.drift {
        // What the last rounds counted, after the saver's last pass.
        if let Err(e) = drift.save() {
            warn!(error = %e, "cannot save the drift state");
        }
    }
    if let Some(w) = writer {
        // Everything the rounds handed over is committed before the process ends; a database
        // that is away gets a while to come back, not forever.
        if tokio::time::timeout(SHUTDOWN_ARCHIVE_WAIT, w.flush()).await.is_err() {
            error!(
                waited_s = SHUTDOWN_ARCHIVE_WAIT.as_secs(),
                "the archive database is unreachable: the archive entries of the last messages are not kept (the messages themselves were delivered or are in the spool)"
            );
        }
    }
    info!("stopped");
    Ok(())
}

/// The lifecycle parts `serve` wires in: what the pipeline tells of each message (trial rules,
/// drift alarms), the last reload's shadow report, and where drift notifications go.
struct Lifecycle {
    observer: Arc<Observer>,
    report: SharedReport,
    notify: Option<(String, crate::deliver::Destination)>,
}

impl Lifecycle {
    fn start(config: &Config, spool_dir: &std::path::Path, metrics: &Arc<Metrics>) -> Result<Lifecycle, ServeError> {
        let trial = Trial::new(config, metrics.clone());
        if let Some(t) = &trial {
            match t.reload() {
                Ok(n) => info!(rules = n, dir = %t.dir().display(), "trial rules loaded"),
                Err(errors) => {
                    for e in &errors {
                        error!(error = %e, "trial rules error");
                    }
                    error!(dir = %t.dir().display(), "trial rules not loaded; no trial until a reload loads them");
                }
            }
        }
        let drift = config.drift.enabled.then(|| {
            let path = spool_dir.join("lifecycle").join("drift.json");
            Arc::new(Drift::new(DriftSettings::from_config(config), Some(path)))
        });
        if let Some(d) = &drift {
            let d = d.clone();
            metrics.set_drift_source(move || d.gauges());
        }
        let notify = match (&drift, &config.drift.notify) {
            (Some(_), Some(name)) => {
                let d = config.destination.get(name).ok_or_else(|| crate::deliver::BuildError {
                    name: name.clone(),
                    problem: crate::deliver::BuildProblem::Undeclared,
                })?;
                Some((name.clone(), crate::deliver::Destination::build(name, d, config)?))
            }
            _ => None,
        };
        Ok(Lifecycle { observer: Arc::new(Observer { trial, drift }), report: SharedReport::default(), notify })
    }
}

/// Records this instance as alive and refreshes its list of peers every `lease / 3`, until
/// shutdown.
async fn heartbeat(node: Arc<crate::cluster::Node>, mut stop: watch::Receiver<bool>) {
    let mut failing = false;
    loop {
        match node.heartbeat().await {
            Ok(()) if failing => {
                info!("cluster heartbeat back");
                failing = false;
            }
            Ok(()) => {}
            Err(e) if !failing => {
                warn!(error = %e, "cluster heartbeat failed; peers will not see this instance");
                failing = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(node.renew_every()) => {}
            _ = stop.changed() => return,
        }
    }
}

/// How long `serve` waits at shutdown for the archive to commit what it was handed.
const SHUTDOWN_ARCHIVE_WAIT: Duration = Duration::from_secs(15);

/// How often retention runs while `serve` runs (and once at start).
const RETENTION_INTERVAL: Duration = Duration::from_secs(600);

/// Removes what `[archive] keep` and `max_size` say must go, now and every
/// [`RETENTION_INTERVAL`], until shutdown.
async fn retention(archive: Arc<dyn Archive>, keep: Duration, max_size: u64, mut stop: watch::Receiver<bool>) {
    loop {
        let a = archive.clone();
        match tokio::task::spawn_blocking(move || a.enforce_retention(keep, max_size, SystemTime::now())).await {
            Ok(Ok(r)) if r.removed > 0 => info!(removed = r.removed, size = r.size, "archive retention"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(error = %e, "archive retention failed; tried again later"),
            Err(e) => warn!(error = %e, "archive retention failed; tried again later"),
        }
        tokio::select! {
            _ = tokio::time::sleep(RETENTION_INTERVAL) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` turns true, then lets requests in flight
/// finish, for [`HTTP_GRACE`] at most: keep-alive clients must not hold shutdown up. `what`
/// names the listener in the log line of a failure.
pub(crate) async fn serve_http(
    what: &'static str,
    listener: tokio::net::TcpListener,
    router: axum::Router,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut stopping = shutdown.clone();
    let signal = async move {
        let _ = stopping.wait_for(|stop| *stop).await;
    };
    let server = axum::serve(listener, router).with_graceful_shutdown(signal);
    tokio::select! {
        result = server => {
            if let Err(e) = result {
                warn!(error = %e, listener = what, "stopped serving");
            }
        }
        _ = async {
            let _ = shutdown.wait_for(|stop| *stop).await;
            tokio::time::sleep(HTTP_GRACE).await;
        } => {}
    }
}

/// How long HTTP requests in flight may take to finish once shutdown begins.
const HTTP_GRACE: Duration = Duration::from_secs(5);

/// SIGTERM and SIGINT, caught from the moment this exists.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    /// Waits for either (returns at once for one that came meanwhile).
    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

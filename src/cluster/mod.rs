//! cluster: what instances sharing one PostgreSQL (`[cluster]`) need of it before any stage
//! runs: the connection (settings, TLS, pool), the schema migrations, and the coordination of
//! the instances ([`node`]: who is alive, which instance watches which IMAP folder, the
//! permanent dedupe ledger of IMAP messages and the IMAP checkpoints).
//!
//! It sits before `ingest` in the flow so that the IMAP watchers may use it; it knows only the
//! config. The archive in PostgreSQL (`store::postgres`) opens its connections with the same
//! [`Target`].
//!
//! The schema is versioned with `refinery` migrations (`migrations/*.sql`, embedded in the
//! binary), run under `pg_advisory_lock` so that instances starting together do not race. The
//! same run checks `synchronous_commit`: `off` (a commit acknowledged before it is on disk)
//! refuses to start; `on`, `remote_apply`, `remote_write` and `local` are accepted. A database
//! whose schema is newer than this binary's refuses too.

pub mod node;

pub use node::{FolderKey, Node, Peer};

use crate::config::{ClusterConfig, PgTls, UrlError};
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod};
use std::time::Duration;
use tracing::info;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// The key of the advisory lock migrations run under (any constant shared by every instance).
const MIGRATION_LOCK: i64 = 0x6d61_696c_686f_6f6b; // "mailhook"

/// Connections the archive keeps open at most.
const POOL_SIZE: usize = 4;

/// How long a call waits for a connection from the pool.
const POOL_WAIT: Duration = Duration::from_secs(10);

/// What can go wrong with the database.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster.postgres: {0}")]
    Url(#[from] UrlError),
    #[error("cluster.{0}")]
    CaFile(#[from] crate::tls::CaFileError),
    #[error("database {host} is unreachable: {}", describe(source))]
    Unreachable {
        host: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("database {host}: {}", describe(source))]
    Query {
        host: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("database {host} is unreachable: no connection within {}s ({reason})", POOL_WAIT.as_secs())]
    Pool { host: String, reason: String },
    #[error(
        "database {host} has synchronous_commit = {value}: a commit would be acknowledged before it is \
         durable; set it to on (ALTER DATABASE ... SET synchronous_commit = on) and start again"
    )]
    SynchronousCommit { host: String, value: String },
    #[error("database {host}: schema migration failed: {reason}")]
    Migration { host: String, reason: String },
    #[error("database {host} has schema version {found}, newer than this mailhook's ({known}): run the newer mailhook")]
    Newer { host: String, found: u32, known: u32 },
    #[error(
        "database {host} has schema version {found}, this mailhook needs {known}: start mailhook serve once to migrate it"
    )]
    Behind { host: String, found: u32, known: u32 },
    #[error("cannot start the database runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

impl ClusterError {
    /// Whether the database could not be reached (tried again later), as opposed to a problem
    /// that waiting does not cure.
    pub fn is_unreachable(&self) -> bool {
        match self {
            ClusterError::Unreachable { .. } | ClusterError::Pool { .. } => true,
            ClusterError::Query { source, .. } => is_connection_error(source),
            _ => false,
        }
    }
}

/// What went wrong, in words: the server's message (tokio-postgres says only "db error"), or
/// the error and its cause.
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    match std::error::Error::source(e) {
        Some(cause) if !e.to_string().contains(&cause.to_string()) => format!("{e}: {cause}"),
        _ => e.to_string(),
    }
}

/// Whether `e` says the connection is gone or the server is not taking queries.
pub(crate) fn is_connection_error(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(code) = e.code() {
        // 08: connection exception; 57P: the server is shutting down or starting.
        return code.code().starts_with("08") || code.code().starts_with("57P");
    }
    // An I/O error is the network's, except a TLS certificate or protocol refused (InvalidData):
    // waiting does not cure that.
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .is_some_and(|io| !matches!(io.kind(), std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput))
}

/// The schema version this binary brings (its newest migration).
pub fn schema_version() -> u32 {
    embedded::migrations::runner().get_migrations().iter().map(|m| m.version()).max().unwrap_or(0)
}

/// How to reach the database: connection settings and TLS.
#[derive(Clone)]
pub struct Target {
    config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    pub(crate) host: String,
}

impl Target {
    pub fn of(
        cluster: &ClusterConfig,
        base: &dyn Fn(&std::path::Path) -> std::path::PathBuf,
    ) -> Result<Target, ClusterError> {
        let (config, tls) = cluster.postgres.connect_config()?;
        let tls = match tls {
            PgTls::Disable => None,
            PgTls::Require => {
                let ca = cluster.ca_file.as_deref().map(base);
                let client = crate::tls::tls_config(ca.as_deref())?;
                Some(tokio_postgres_rustls::MakeRustlsConnect::new(client))
            }
        };
        Ok(Target { config, tls, host: cluster.postgres.host() })
    }

    /// One connection of its own (not from the pool), its connection task spawned.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, ClusterError> {
        // A refused password or an unknown database is no reason to wait; a server that is not
        // there, or is starting or stopping, is.
        let unreachable = |source: tokio_postgres::Error| {
            if is_connection_error(&source) {
                ClusterError::Unreachable { host: self.host.clone(), source }
            } else {
                ClusterError::Query { host: self.host.clone(), source }
            }
        };
        match &self.tls {
            None => {
                let (client, conn) = self.config.connect(tokio_postgres::NoTls).await.map_err(unreachable)?;
                tokio::spawn(conn);
                Ok(client)
            }
            Some(tls) => {
                let (client, conn) = self.config.connect(tls.clone()).await.map_err(unreachable)?;
                tokio::spawn(conn);
                Ok(client)
            }
        }
    }

    pub fn pool(&self) -> Result<Pool, ClusterError> {
        self.pool_of(POOL_SIZE)
    }

    /// A pool of at most `size` connections.
    pub fn pool_of(&self, size: usize) -> Result<Pool, ClusterError> {
        let manager_config = ManagerConfig { recycling_method: RecyclingMethod::Fast };
        let manager = match &self.tls {
            None => Manager::from_config(self.config.clone(), tokio_postgres::NoTls, manager_config),
            Some(tls) => Manager::from_config(self.config.clone(), tls.clone(), manager_config),
        };
        Pool::builder(manager)
            .max_size(size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(POOL_WAIT))
            .recycle_timeout(Some(POOL_WAIT))
            .build()
            .map_err(|e| ClusterError::Pool { host: self.host.clone(), reason: e.to_string() })
    }

    /// A connection the pool could not give, as a [`ClusterError`].
    pub fn pool_error(&self, e: PoolError) -> ClusterError {
        match e {
            PoolError::Backend(source) if is_connection_error(&source) => {
                ClusterError::Unreachable { host: self.host.clone(), source }
            }
            PoolError::Backend(source) => self.query_error(source),
            other => ClusterError::Pool { host: self.host.clone(), reason: other.to_string() },
        }
    }

    pub fn query_error(&self, source: tokio_postgres::Error) -> ClusterError {
        ClusterError::Query { host: self.host.clone(), source }
    }

    /// Checks `synchronous_commit` and brings the schema up to date, under the advisory lock.
    pub async fn set_up(&self) -> Result<(), ClusterError> {
        let mut client = self.connect().await?;
        check_synchronous_commit(&client, &self.host).await?;
        client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await.map_err(|e| self.query_error(e))?;
        let result = self.migrate(&mut client).await;
        // The lock goes with the session anyway; unlock to be tidy when the session lives on.
        let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await;
        result
    }

    async fn migrate(&self, client: &mut tokio_postgres::Client) -> Result<(), ClusterError> {
        let known = schema_version();
        let found = self.version_of(client).await?;
        if found > known {
            return Err(ClusterError::Newer { host: self.host.clone(), found, known });
        }
        let report = embedded::migrations::runner().run_async(client).await.map_err(|e| self.migration_error(e))?;
        for m in report.applied_migrations() {
            info!(database = %self.host, version = m.version(), name = m.name(), "schema migrated");
        }
        Ok(())
    }

    fn migration_error(&self, e: refinery::Error) -> ClusterError {
        // refinery's message alone ("db error") hides the cause; its Debug keeps it.
        ClusterError::Migration { host: self.host.clone(), reason: format!("{e:?}") }
    }

    /// The schema version the database has (0: none yet): the newest migration refinery
    /// recorded.
    async fn version_of(&self, client: &tokio_postgres::Client) -> Result<u32, ClusterError> {
        let query = |e| self.query_error(e);
        let exists =
            client.query_one("SELECT to_regclass('refinery_schema_history') IS NOT NULL", &[]).await.map_err(query)?;
        if !exists.get::<_, bool>(0) {
            return Ok(0);
        }
        let row =
            client.query_one("SELECT max(version)::bigint FROM refinery_schema_history", &[]).await.map_err(query)?;
        Ok(row.get::<_, Option<i64>>(0).and_then(|v| u32::try_from(v).ok()).unwrap_or(0))
    }
}

async fn check_synchronous_commit(client: &tokio_postgres::Client, host: &str) -> Result<(), ClusterError> {
    let row = client
        .query_one("SHOW synchronous_commit", &[])
        .await
        .map_err(|source| ClusterError::Query { host: host.to_string(), source })?;
    let value: String = row.get(0);
    if value == "off" {
        return Err(ClusterError::SynchronousCommit { host: host.to_string(), value });
    }
    Ok(())
}

/// What `mailhook check` learns of the database: reachable, `synchronous_commit` on, schema
/// version as this binary expects. Returns the version.
pub fn verify(
    cluster: &ClusterConfig,
    base: &dyn Fn(&std::path::Path) -> std::path::PathBuf,
) -> Result<u32, ClusterError> {
    let target = Target::of(cluster, base)?;
    let rt = runtime()?;
    let result = rt.block_on(async {
        let client = target.connect().await?;
        check_synchronous_commit(&client, &target.host).await?;
        let found = target.version_of(&client).await?;
        let known = schema_version();
        if found < known {
            return Err(ClusterError::Behind { host: target.host.clone(), found, known });
        }
        if found > known {
            return Err(ClusterError::Newer { host: target.host.clone(), found, known });
        }
        Ok(found)
    });
    rt.shutdown_background();
    result
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, ClusterError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("postgres")
        .enable_all()
        .build()
        .map_err(ClusterError::Runtime)
}

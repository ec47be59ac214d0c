//! [`Postgres`]: a private, throwaway PostgreSQL cluster on 127.0.0.1 for tests.
//!
//! Each cluster has its own temporary directory (data directory, unix socket, log) and its own
//! free loopback port. `initdb` and `pg_ctl` come from Debian's `postgresql` package
//! (`/usr/lib/postgresql/15/bin`, not on PATH); `initdb` refuses to run as root, so as root they
//! run as the `postgres` user (`runuser -u postgres`) on a directory that user owns; as an
//! ordinary user they run as that user.
//!
//! TCP connections on 127.0.0.1 need the password ([`USER`]/[`PASSWORD`], SCRAM), as a
//! production server would; the unix socket in the temporary directory trusts its owner, and is
//! what [`Postgres::sql`] uses (through `psql`) to set up and inspect databases.
//!
//! Starting a cluster takes about two seconds, so a test binary shares one ([`Postgres::shared`])
//! and gives each test a database of its own ([`Postgres::database`]). A test that stops and
//! starts the server starts a cluster of its own ([`Postgres::start`]). The cluster runs with
//! `fsync = off` (the tests never crash the machine; `synchronous_commit` stays `on`, as mailhook
//! requires).
//!
//! Requires PostgreSQL 15 (`apt-get install -y postgresql`). Without it every test that starts a
//! cluster panics with that instruction; nothing is skipped. [`Postgres`] stops its server
//! (`pg_ctl stop -m fast`) and removes its directory when dropped; the shared cluster, which is
//! never dropped, is stopped and removed by a small watcher process once the test binary exits.

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The superuser that TCP clients log in as.
pub const USER: &str = "postgres";
/// [`USER`]'s password.
pub const PASSWORD: &str = "pg-test-password";

/// Where Debian's `postgresql-15` keeps its binaries.
const BIN: &str = "/usr/lib/postgresql/15/bin";
/// What a test run without PostgreSQL is told.
const INSTALL_HINT: &str = "PostgreSQL 15 not installed: apt-get install -y postgresql";

/// A private PostgreSQL cluster (see the module documentation).
pub struct Postgres {
    /// `data/`, the unix socket, `postgres.log`, `pwfile`.
    root: PathBuf,
    port: u16,
    /// Run the binaries as the `postgres` user (we are root).
    as_postgres: bool,
    /// Whether this value owns the cluster (stops and removes it when dropped).
    owned: bool,
    /// With TLS: the CA that issued the server's certificate (for `localhost` and 127.0.0.1).
    ca_file: Option<PathBuf>,
    /// Flush commits to disk (`fsync = on`), as a production server does: for benchmarks.
    durable: bool,
}

impl Postgres {
    /// Starts a cluster of this test's own; returns once it accepts connections.
    #[track_caller]
    pub fn start() -> Postgres {
        let pg = Postgres::init();
        pg.start_server();
        pg
    }

    /// Starts a cluster that flushes its commits to disk (`fsync = on`, PostgreSQL's default), so
    /// that a benchmark measures what a production server does.
    #[track_caller]
    pub fn start_durable() -> Postgres {
        let mut pg = Postgres::init();
        pg.durable = true;
        pg.start_server();
        pg
    }

    /// The server's process id (the postmaster), from its `postmaster.pid`.
    pub fn pid(&self) -> Option<u32> {
        fs::read_to_string(self.root.join("data/postmaster.pid")).ok()?.lines().next()?.trim().parse().ok()
    }

    /// Starts a cluster of this test's own that also offers TLS (`ssl = on`), with a
    /// certificate for `localhost` and `127.0.0.1` issued by a throwaway CA
    /// ([`ca_file`](Self::ca_file)).
    #[track_caller]
    pub fn start_tls() -> Postgres {
        let mut pg = Postgres::init();
        pg.ca_file = Some(pg.write_tls_files());
        pg.start_server();
        pg
    }

    /// The PEM file of the CA that issued the server's certificate (a TLS cluster only).
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca_file.as_deref()
    }

    /// The cluster this test binary shares (started on first use), stopped and removed after the
    /// binary exits. Give each test its own [`database`](Self::database).
    pub fn shared() -> &'static Postgres {
        static SHARED: OnceLock<Postgres> = OnceLock::new();
        SHARED.get_or_init(|| {
            let mut pg = Postgres::start();
            pg.owned = false;
            pg.reap_after_exit();
            pg
        })
    }

    /// The loopback port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The temporary directory: `data/`, the unix socket, `postgres.log`.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// Creates a new, empty database and returns its name.
    #[track_caller]
    pub fn database(&self) -> String {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!("t{}_{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
        self.sql("postgres", &format!("CREATE DATABASE {name}"));
        name
    }

    /// The URL of `database` over TCP, with `password` in place of the password (write
    /// `"${PGPASS}"` to have a config read it from the environment).
    pub fn url_with(&self, database: &str, password: &str) -> String {
        format!("postgres://{USER}:{password}@127.0.0.1:{}/{database}", self.port)
    }

    /// The URL of `database` over TCP, with the real password.
    pub fn url(&self, database: &str) -> String {
        self.url_with(database, PASSWORD)
    }

    /// Runs `sql` in `database` over the unix socket with `psql`; returns what it printed
    /// (unaligned, tuples only: one row a line, columns separated by `|`). Panics on an error.
    #[track_caller]
    pub fn sql(&self, database: &str, sql: &str) -> String {
        self.try_sql(database, sql).unwrap_or_else(|e| panic!("psql {sql:?} in {database}: {e}"))
    }

    /// [`sql`](Self::sql), returning psql's error instead of panicking.
    pub fn try_sql(&self, database: &str, sql: &str) -> Result<String, String> {
        let port = self.port.to_string();
        let socket = self.root.to_string_lossy().into_owned();
        let out = self
            .command("psql", &["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", &socket, "-p", &port, "-U", USER])
            .args(["-d", database, "-c", sql])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim_end().to_string())
        }
    }

    /// Whether the server is running.
    pub fn is_running(&self) -> bool {
        self.command("pg_ctl", &["status", "-D"]).arg(self.root.join("data")).output().is_ok_and(|o| o.status.success())
    }

    /// Stops the server (`pg_ctl stop -m fast`: open connections are closed at once). The data
    /// is kept. Does nothing when already stopped.
    #[track_caller]
    pub fn stop(&self) {
        if !self.is_running() {
            return;
        }
        let out = self
            .command("pg_ctl", &["stop", "-m", "fast", "-w", "-t", "30", "-D"])
            .arg(self.root.join("data"))
            .output()
            .expect("run pg_ctl stop");
        if !out.status.success() {
            self.fail(&format!("pg_ctl stop failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
    }

    /// Starts the server again on the same port with the same data; returns once it accepts
    /// connections.
    #[track_caller]
    pub fn restart(&self) {
        self.stop();
        self.start_server();
    }

    /// The last lines of the server log.
    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.root.join("postgres.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Creates the directory and the cluster (`initdb`), without starting it.
    fn init() -> Postgres {
        if !Path::new(BIN).join("initdb").exists() {
            panic!("{INSTALL_HINT}");
        }
        let as_postgres = fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
        let dir = tempfile::Builder::new().prefix("mailhook-postgres-").tempdir().expect("create postgres temp dir");
        let root = dir.keep();
        if as_postgres {
            let (uid, gid) = postgres_ids();
            std::os::unix::fs::chown(&root, Some(uid), Some(gid)).expect("chown postgres temp dir");
        }
        let port = TcpListener::bind("127.0.0.1:0").expect("bind a free port").local_addr().expect("addr").port();
        let pg = Postgres { root, port, as_postgres, owned: true, ca_file: None, durable: false };
        let pwfile = pg.root.join("pwfile");
        fs::write(&pwfile, PASSWORD).expect("write pwfile");
        if as_postgres {
            let (uid, gid) = postgres_ids();
            std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid)).expect("chown pwfile");
        }
        let out = pg
            .command("initdb", &["-N", "--no-instructions", "-E", "UTF8", "--locale=C", "-U", USER])
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .arg("-D")
            .arg(pg.root.join("data"))
            .output()
            .expect("run initdb");
        if !out.status.success() {
            pg.fail(&format!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        pg
    }

    /// `pg_ctl start`, waiting until the server accepts connections.
    #[track_caller]
    fn start_server(&self) {
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync={} -c max_connections=200",
            self.port,
            self.root.display(),
            if self.durable { "on" } else { "off" }
        );
        if self.ca_file.is_some() {
            let tls = self.root.join("tls");
            options.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                tls.join("server.pem").display(),
                tls.join("server.key").display()
            ));
        }
        let out = self
            .command("pg_ctl", &["start", "-w", "-t", "30", "-o", &options, "-l"])
            .arg(self.root.join("postgres.log"))
            .arg("-D")
            .arg(self.root.join("data"))
            .stdin(Stdio::null())
            // pg_ctl leaves the server running with these open: a pipe would never close.
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: a Ctrl-C meant for the tests does not reach the server.
            .process_group(0)
            .status()
            .expect("run pg_ctl start");
        if !out.success() {
            self.fail("pg_ctl start failed");
        }
    }

    /// Writes a CA, and a server certificate and key it issued, under `tls/`; returns the CA's
    /// file. The key is the server user's alone, as PostgreSQL requires.
    fn write_tls_files(&self) -> PathBuf {
        let files = super::tls::write_test_certificates(&self.root);
        if self.as_postgres {
            let (uid, gid) = postgres_ids();
            let dir = files.ca.parent().expect("tls dir").to_path_buf();
            for f in [&dir, &files.ca, &files.cert, &files.key] {
                std::os::unix::fs::chown(f, Some(uid), Some(gid)).expect("chown tls file");
            }
        }
        files.ca
    }

    /// A command running `program` from [`BIN`] (as the `postgres` user when we are root).
    fn command(&self, program: &str, args: &[&str]) -> Command {
        let path = Path::new(BIN).join(program);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        cmd.args(args);
        cmd
    }

    /// Starts a watcher that stops the server and removes the directory once this process has
    /// exited (a `static` is never dropped).
    fn reap_after_exit(&self) {
        let data = self.root.join("data");
        let stop = if self.as_postgres {
            format!("runuser -u postgres -- {BIN}/pg_ctl stop -m immediate -D '{}'", data.display())
        } else {
            format!("{BIN}/pg_ctl stop -m immediate -D '{}'", data.display())
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.2; done; {stop} >/dev/null 2>&1; rm -rf '{root}'",
            pid = std::process::id(),
            root = self.root.display()
        );
        // `( … ) &`: the shell starts the watcher in the background and exits at once, so the
        // watcher outlives this process (it is reparented to init).
        Command::new("sh")
            .args(["-c", &format!("( {script} ) &")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .status()
            .expect("start the postgres watcher");
    }

    #[track_caller]
    fn fail(&self, message: &str) -> ! {
        panic!("postgres: {message}\n--- {} ---\n{}\n----------------", self.root.display(), self.log_tail())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let _ = self.command("pg_ctl", &["stop", "-m", "fast", "-w", "-D"]).arg(self.root.join("data")).output();
        if std::thread::panicking() {
            eprintln!("postgres test files kept in {}", self.root.display());
        } else {
            let _ = fs::remove_dir_all(&self.root);
        }
    }
}

/// The `postgres` user's uid and gid.
fn postgres_ids() -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let out = Command::new("id").args([flag, "postgres"]).output().expect("run id");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("no postgres user: {INSTALL_HINT}"))
    };
    (id("-u"), id("-g"))
}

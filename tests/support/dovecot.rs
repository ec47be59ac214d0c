//! [`Dovecot`]: a private, throwaway Dovecot IMAP server on 127.0.0.1 for one test, and
//! [`ImapClient`], a small raw IMAP client to set up and inspect its mailboxes.
//!
//! Each instance has its own temporary directory (configuration, `base_dir`, `state_dir`, log,
//! maildirs), its own ports and its own process group, so tests can run in parallel. It knows two
//! users, [`USER`]/[`PASSWORD`] and [`OTHER_USER`]/[`OTHER_PASSWORD`], whose mail is kept as
//! maildirs (`LAYOUT=fs`) under the temporary directory. Folders are separated by `/`
//! (`Archive/2024`); names are sent in modified UTF-7, so any Unicode name works.
//!
//! The server offers what Dovecot 2.3 offers by default after login (IDLE, UIDPLUS, MOVE,
//! LITERAL+, CONDSTORE, …), takes `LOGIN` and `AUTHENTICATE PLAIN`/`LOGIN` without TLS, answers a
//! wrong password at once (no failure delay, no anvil penalty) and, with [`DovecotOptions`], also:
//!
//! - `tls`: implicit TLS on a second port ([`Dovecot::tls_port`]) and STARTTLS on the plain one,
//!   with a certificate for `localhost` and `127.0.0.1` issued by a throwaway CA
//!   ([`Dovecot::ca_file`]);
//! - `idle: false`: no IDLE in CAPABILITY (before and after login), so a client has to poll;
//! - `xoauth2`: `AUTHENTICATE XOAUTH2` and `OAUTHBEARER`, with tokens checked by Dovecot's oauth2
//!   passdb against a local introspection endpoint that knows [`OAUTH_TOKEN`] for [`USER`]
//!   (see [`Dovecot::grant_token`] and [`Dovecot::revoke_token`]).
//!
//! Requires Dovecot 2.3 (`apt-get install -y dovecot-imapd`). Without it every test that starts
//! an instance panics with that instruction; nothing is skipped. As root the server runs as usual
//! and keeps the mail as the `mail` user; as an ordinary user everything runs as that user.
//!
//! Every call is blocking and short: use them from sync tests, or from async tests directly or
//! through `spawn_blocking`. Failures panic with the IMAP dialogue and the tail of the server log.
//! [`Dovecot`] kills its server and every process the server started when dropped; if the test is
//! panicking, the temporary directory is kept and its path printed.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as BASE64, STANDARD_NO_PAD as BASE64_NO_PAD};
use std::collections::{HashMap, VecDeque};
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The main test user.
pub const USER: &str = "alice";
/// [`USER`]'s password.
pub const PASSWORD: &str = "secret";
/// A second user, for tests that need two independent accounts.
pub const OTHER_USER: &str = "bob";
/// [`OTHER_USER`]'s password.
pub const OTHER_PASSWORD: &str = "hunter2";
/// An OAuth 2 access token that the introspection endpoint of an `xoauth2` instance accepts for
/// [`USER`] (and for nobody else).
pub const OAUTH_TOKEN: &str = "test-access-token";

/// What a test run without Dovecot is told.
const INSTALL_HINT: &str = "dovecot not installed: apt-get install -y dovecot-imapd";
/// How long a start or restart may take before the test fails.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long any single read or write of [`ImapClient`] may block.
const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// How many times [`Dovecot::start_with`] picks new ports when one was taken in the meantime.
const START_ATTEMPTS: usize = 5;
/// Dovecot 2.3's post-login capabilities without IDLE, for `idle: false`.
const CAPABILITY_WITHOUT_IDLE: &str = "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE SORT SORT=DISPLAY \
    THREAD=REFERENCES THREAD=REFS THREAD=ORDEREDSUBJECT MULTIAPPEND URL-PARTIAL CATENATE UNSELECT CHILDREN NAMESPACE \
    UIDPLUS LIST-EXTENDED I18NLEVEL=1 CONDSTORE QRESYNC ESEARCH ESORT SEARCHRES WITHIN CONTEXT=SEARCH LIST-STATUS \
    BINARY MOVE SNIPPET=FUZZY PREVIEW=FUZZY PREVIEW STATUS=SIZE SAVEDATE LITERAL+ NOTIFY";

/// What to turn on besides plain IMAP. `Default` is plain IMAP with IDLE, no TLS, no XOAUTH2.
#[derive(Debug, Clone)]
pub struct DovecotOptions {
    /// Also listen with implicit TLS on [`Dovecot::tls_port`] and offer STARTTLS on the plain
    /// port, with a certificate issued by the CA in [`Dovecot::ca_file`].
    pub tls: bool,
    /// Offer IDLE. With `false`, IDLE is left out of every CAPABILITY list.
    pub idle: bool,
    /// Offer `AUTHENTICATE XOAUTH2` and `OAUTHBEARER`, checked against a local token
    /// introspection endpoint that accepts [`OAUTH_TOKEN`] for [`USER`].
    pub xoauth2: bool,
}

impl Default for DovecotOptions {
    fn default() -> Self {
        DovecotOptions { tls: false, idle: true, xoauth2: false }
    }
}

/// A private Dovecot IMAP server for one test (see the module documentation).
pub struct Dovecot {
    /// Owns the temporary directory; `None` once it has been kept for a failing test.
    dir: Option<tempfile::TempDir>,
    /// The temporary directory: `dovecot.conf`, `run/` (base_dir), `state/`, `mail/<user>/`,
    /// `dovecot.log`, `dovecot.stderr`, `tls/`.
    root: PathBuf,
    options: DovecotOptions,
    identity: Identity,
    port: u16,
    tls_port: Option<u16>,
    ca_file: Option<PathBuf>,
    /// The Dovecot master process (the leader of its own process group) while running.
    server: Option<Child>,
    oauth: Option<OAuthServer>,
}

impl Dovecot {
    /// Starts a plain-IMAP instance with IDLE and the users [`USER`] and [`OTHER_USER`].
    #[track_caller]
    pub fn start() -> Dovecot {
        Dovecot::start_with(DovecotOptions::default())
    }

    /// Starts an instance with `options`; returns once it has sent its greeting.
    #[track_caller]
    pub fn start_with(options: DovecotOptions) -> Dovecot {
        let binary = dovecot_binary();
        let dir = tempfile::Builder::new().prefix("mailhook-dovecot-").tempdir().expect("create dovecot temp dir");
        let root = dir.path().to_path_buf();
        // Dovecot's mail and auth processes run as other users and must reach the files below.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).expect("chmod dovecot temp dir");
        let identity = Identity::detect(&root);
        for sub in ["run", "state", "mail"] {
            fs::create_dir(root.join(sub)).expect("create dovecot dir");
        }
        identity.give_mail(&root.join("mail"));
        let users = format!("{USER}:{{PLAIN}}{PASSWORD}::::::\n{OTHER_USER}:{{PLAIN}}{OTHER_PASSWORD}::::::\n");
        write_public(&root.join("users"), users.as_bytes());
        let ca_file = options.tls.then(|| super::tls::write_test_certificates(&root).ca);
        let oauth = options.xoauth2.then(OAuthServer::start);
        if let Some(oauth) = &oauth {
            let conf = format!(
                "introspection_mode = post\nintrospection_url = http://127.0.0.1:{}/introspect\n\
                 force_introspection = yes\nusername_attribute = username\nactive_attribute = active\n\
                 active_value = true\ntimeout_msecs = 5000\n",
                oauth.port
            );
            write_public(&root.join("oauth2.conf"), conf.as_bytes());
        }

        let mut dovecot =
            Dovecot { dir: Some(dir), root, options, identity, port: 0, tls_port: None, ca_file, server: None, oauth };
        for attempt in 1..=START_ATTEMPTS {
            // Ports are found by binding port 0 and released just before Dovecot binds them; if
            // another test took one in between, Dovecot cannot bind and this tries new ports.
            let (port, tls_port) = free_ports(dovecot.options.tls);
            dovecot.port = port;
            dovecot.tls_port = tls_port;
            dovecot.write_config();
            dovecot.spawn(&binary);
            match dovecot.wait_ready() {
                Ok(()) => return dovecot,
                Err(e) if attempt < START_ATTEMPTS && dovecot.log_tail().contains("Address already in use") => {
                    dovecot.stop();
                    eprintln!("dovecot could not bind port {port} ({e}), trying other ports");
                    for log in ["dovecot.log", "dovecot.stderr"] {
                        let _ = fs::remove_file(dovecot.root.join(log));
                    }
                }
                Err(e) => dovecot.fail(&format!("dovecot did not start: {e}")),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// The plain IMAP port on 127.0.0.1 (STARTTLS is offered there when `tls` is on).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The implicit-TLS IMAP port on 127.0.0.1, when started with `tls`.
    pub fn tls_port(&self) -> Option<u16> {
        self.tls_port
    }

    /// `127.0.0.1:`[`port`](Self::port).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The PEM file of the CA that issued the server certificate, when started with `tls`.
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.ca_file.clone()
    }

    /// The temporary directory of this instance (configuration, log, `mail/<user>/` maildirs).
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// Whether the server is running (between [`stop`](Self::stop) and
    /// [`restart`](Self::restart) it is not).
    pub fn is_running(&self) -> bool {
        self.server.is_some()
    }

    /// Kills the server and every process it started; open connections drop at once. The
    /// maildirs are kept. Does nothing when already stopped.
    #[track_caller]
    pub fn stop(&mut self) {
        let Some(mut child) = self.server.take() else { return };
        if let Err(left) = kill_process_group(&mut child)
            && !std::thread::panicking()
        {
            self.fail(&format!("dovecot processes {left:?} still alive after being killed"));
        }
    }

    /// Starts the server again (stopping it first if it is running) on the same ports, with the
    /// same users and maildirs; returns once it has sent its greeting.
    #[track_caller]
    pub fn restart(&mut self) {
        self.stop();
        // The pid file of the killed master would only produce a warning; remove it anyway.
        let _ = fs::remove_file(self.root.join("run/master.pid"));
        self.spawn(&dovecot_binary());
        if let Err(e) = self.wait_ready() {
            self.fail(&format!("dovecot did not restart on port {}: {e}", self.port));
        }
    }

    /// Gives `user`'s `folder` a new UIDVALIDITY, different from the one it had, while keeping
    /// its messages (and their flags); Dovecot then numbers the messages again from UID 1. A
    /// running server is stopped for this and started again; a stopped one stays stopped.
    #[track_caller]
    pub fn reset_uidvalidity(&mut self, user: &str, folder: &str) {
        let was_running = self.is_running();
        self.stop();
        let user_root = self.root.join("mail").join(user);
        let dir = self.folder_dir(user, folder);
        if !dir.join("cur").is_dir() {
            self.fail(&format!("no maildir for {user}'s folder {folder:?} at {}", dir.display()));
        }
        let uidlist = dir.join("dovecot-uidlist");
        let old = fs::read_to_string(&uidlist).ok().and_then(|text| {
            let header = text.lines().next()?.to_string();
            header.split_whitespace().find_map(|field| field.strip_prefix('V')?.parse::<u32>().ok())
        });
        // The uidlist assigns UIDs to the maildir files and holds UIDVALIDITY; the indexes cache
        // both, and the mailbox list index caches STATUS answers.
        let remove_indexes = |dir: &Path, prefixes: &[&str]| {
            for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if prefixes.iter().any(|p| name.starts_with(p)) {
                    fs::remove_file(entry.path()).expect("remove dovecot index file");
                }
            }
        };
        remove_indexes(&dir, &["dovecot-uidlist", "dovecot.index"]);
        remove_indexes(&user_root, &["dovecot.list.index"]);
        if let Some(old) = old {
            // An explicit header makes the new value certain; without one Dovecot would take the
            // next value from its counter, which is also new but less obviously so.
            let new = if old == u32::MAX { 1 } else { old + 1 };
            fs::write(&uidlist, format!("3 V{new} N1\n")).expect("write dovecot-uidlist");
            self.identity.give_mail(&uidlist);
        }
        if was_running {
            self.restart();
        }
    }

    /// A client logged in as `user`.
    #[track_caller]
    pub fn client(&self, user: &str, password: &str) -> ImapClient {
        self.try_client(user, password).unwrap_or_else(|e| self.fail(&format!("login as {user} failed: {e}")))
    }

    /// A client logged in as `user` with `LOGIN`, or why the connection or login failed (the
    /// server's tagged answer for a refused login, e.g. `NO [AUTHENTICATIONFAILED] …`).
    pub fn try_client(&self, user: &str, password: &str) -> Result<ImapClient, String> {
        let mut client = ImapClient::connect(self.port, &self.root)?;
        client.login(user, password)?;
        Ok(client)
    }

    /// A client logged in as `user` with `AUTHENTICATE XOAUTH2` and `token`, or why it failed.
    /// Needs an instance started with `xoauth2`.
    pub fn try_client_xoauth2(&self, user: &str, token: &str) -> Result<ImapClient, String> {
        let mut client = ImapClient::connect(self.port, &self.root)?;
        client.authenticate_xoauth2(user, token)?;
        Ok(client)
    }

    /// Makes the introspection endpoint accept `token` for `user` (an `xoauth2` instance starts
    /// with [`OAUTH_TOKEN`] for [`USER`]).
    #[track_caller]
    pub fn grant_token(&self, token: &str, user: &str) {
        let oauth = self.oauth.as_ref().expect("grant_token needs DovecotOptions { xoauth2: true }");
        oauth.tokens.lock().unwrap().insert(token.to_string(), user.to_string());
    }

    /// Makes the introspection endpoint answer `{"active": false}` for `token` from now on.
    #[track_caller]
    pub fn revoke_token(&self, token: &str) {
        let oauth = self.oauth.as_ref().expect("revoke_token needs DovecotOptions { xoauth2: true }");
        oauth.tokens.lock().unwrap().remove(token);
    }

    /// How many token introspection requests Dovecot has made (each XOAUTH2/OAUTHBEARER
    /// attempt makes one; nothing is cached).
    pub fn oauth_requests(&self) -> usize {
        self.oauth.as_ref().map_or(0, |oauth| oauth.requests.load(Ordering::SeqCst))
    }

    /// The last lines of the server log and of anything Dovecot printed on stderr.
    pub fn log_tail(&self) -> String {
        log_tail(&self.root)
    }

    /// Panics with `message`, the temporary directory and the server log tail.
    #[track_caller]
    fn fail(&self, message: &str) -> ! {
        panic!("{message}\n--- dovecot in {} ---\n{}\n----------------", self.root.display(), self.log_tail())
    }

    /// Where the maildir of `user`'s `folder` is (`LAYOUT=fs`: INBOX at the user's root, other
    /// folders in subdirectories named by the modified UTF-7 form of each level).
    fn folder_dir(&self, user: &str, folder: &str) -> PathBuf {
        let user_root = self.root.join("mail").join(user);
        if folder.eq_ignore_ascii_case("INBOX") {
            return user_root;
        }
        mutf7(folder).split('/').fold(user_root, |path, level| path.join(level))
    }

    /// Writes `dovecot.conf` for the current ports and options.
    fn write_config(&self) {
        let root = self.root.display();
        let Identity { mail_user, mail_group, .. } = &self.identity;
        let mut conf = format!(
            "# Private test instance, see tests/support/dovecot.rs.\n\
             base_dir = {root}/run\n\
             state_dir = {root}/state\n\
             log_path = {root}/dovecot.log\n\
             login_greeting = {greeting}\n\
             protocols = imap\n\
             listen = 127.0.0.1\n\
             disable_plaintext_auth = no\n\
             auth_verbose = yes\n\
             auth_failure_delay = 0\n\
             auth_mechanisms = plain login{oauth_mechanisms}\n\
             mail_location = maildir:{root}/mail/%u:LAYOUT=fs\n\
             mail_uid = {mail_user}\n\
             mail_gid = {mail_group}\n\
             first_valid_uid = 1\n\
             first_valid_gid = 1\n\
             mail_fsync = never\n\
             namespace inbox {{\n  inbox = yes\n  separator = /\n}}\n\
             # Only sets nodelay (answer a failed login at once, not on the next 0.5 s tick).\n\
             passdb {{\n  driver = static\n  args = noauthenticate=y nodelay=y\n  result_success = continue\n}}\n\
             passdb {{\n  driver = passwd-file\n{password_mechanisms}  args = scheme=PLAIN {root}/users\n}}\n",
            greeting = self.greeting(),
            oauth_mechanisms = if self.options.xoauth2 { " xoauth2 oauthbearer" } else { "" },
            password_mechanisms = if self.options.xoauth2 { "  mechanisms = plain login\n" } else { "" },
        );
        if self.options.xoauth2 {
            conf += &format!(
                "passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n  args = {root}/oauth2.conf\n}}\n"
            );
        }
        conf += &format!("userdb {{\n  driver = static\n  args = uid={mail_user} gid={mail_group}\n}}\n");
        if !self.options.idle {
            conf += &format!("imap_capability = {CAPABILITY_WITHOUT_IDLE}\n");
        }
        if self.options.tls {
            conf += &format!(
                "ssl = yes\nssl_cert = <{root}/tls/server.pem\nssl_key = <{root}/tls/server.key\n\
                 ssl_min_protocol = TLSv1.2\n"
            );
        } else {
            conf += "ssl = no\n";
        }
        let chroot = if self.identity.root { "" } else { "  chroot =\n" };
        conf += &format!(
            "service imap-login {{\n{chroot}  inet_listener imap {{\n    port = {port}\n  }}\n  \
             inet_listener imaps {{\n    port = {tls_port}\n    ssl = yes\n  }}\n}}\n\
             service anvil {{\n{chroot}  unix_listener anvil-auth-penalty {{\n    mode = 0\n  }}\n}}\n",
            port = self.port,
            tls_port = self.tls_port.unwrap_or(0),
        );
        if !self.identity.root {
            let Identity { user, group, .. } = &self.identity;
            conf += &format!(
                "default_internal_user = {user}\ndefault_internal_group = {group}\ndefault_login_user = {user}\n"
            );
        }
        write_public(&self.root.join("dovecot.conf"), conf.as_bytes());
    }

    /// The greeting this instance sends; unique, so a readiness check cannot be fooled by another
    /// instance that got hold of the port.
    fn greeting(&self) -> String {
        format!("mailhook test dovecot {} ready.", self.root.file_name().unwrap_or_default().to_string_lossy())
    }

    /// Starts the master process in the foreground, in a process group of its own.
    fn spawn(&mut self, binary: &Path) {
        let stderr = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("dovecot.stderr"))
            .expect("open dovecot.stderr");
        let child = Command::new(binary)
            .arg("-F")
            .arg("-c")
            .arg(self.root.join("dovecot.conf"))
            .stdin(Stdio::null())
            .stdout(stderr.try_clone().expect("clone dovecot.stderr"))
            .stderr(stderr)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
        self.server = Some(child);
    }

    /// Waits until the plain port answers with this instance's greeting.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let greeting = self.greeting();
        loop {
            let child = self.server.as_mut().expect("server spawned");
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                self.server = None;
                return Err(format!("dovecot exited with {status}"));
            }
            let last_error = match read_greeting(self.port, deadline) {
                Ok(line) if line.starts_with("* OK") && line.contains(&greeting) => return Ok(()),
                Ok(line) => format!("unexpected greeting {line:?}"),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(format!("no greeting on port {} within {READY_TIMEOUT:?}: {last_error}", self.port));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            eprintln!("dovecot test files kept in {}", dir.keep().display());
        }
    }
}

/// Connects to the plain port and reads one line.
fn read_greeting(port: u16, deadline: Instant) -> io::Result<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    let wait = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
    stream.set_read_timeout(Some(wait))?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let _ = (&stream).write_all(b"x LOGOUT\r\n");
    Ok(line.trim_end().to_string())
}

/// Two free ports on 127.0.0.1 (the second only when `tls`), released on return.
fn free_ports(tls: bool) -> (u16, Option<u16>) {
    let plain = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let secure = tls.then(|| TcpListener::bind("127.0.0.1:0").expect("bind a free port"));
    let port = |l: &TcpListener| l.local_addr().expect("local addr").port();
    (port(&plain), secure.as_ref().map(port))
}

/// Writes `contents` readable by everybody (Dovecot's unprivileged processes read these files).
fn write_public(path: &Path, contents: &[u8]) {
    fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).expect("chmod dovecot file");
}

/// The last lines of `dovecot.log` and `dovecot.stderr` in `root`.
fn log_tail(root: &Path) -> String {
    let mut out = String::new();
    for name in ["dovecot.log", "dovecot.stderr"] {
        let text = fs::read_to_string(root.join(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        if lines.is_empty() {
            continue;
        }
        out += &format!("[{name}, last {} of {} lines]\n", lines.len().min(40), lines.len());
        for line in &lines[lines.len().saturating_sub(40)..] {
            out += line;
            out.push('\n');
        }
    }
    if out.is_empty() { "(dovecot wrote nothing)".to_string() } else { out }
}

/// Finds the `dovecot` binary (in `PATH` or the usual sbin directories) and checks that it is
/// Dovecot 2.3, whose configuration syntax this module writes. Panics otherwise.
#[track_caller]
fn dovecot_binary() -> PathBuf {
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = FOUND.get_or_init(|| {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let dirs = std::env::split_paths(&path).chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from));
        let binary = dirs.map(|dir| dir.join("dovecot")).find(|p| p.is_file()).ok_or(INSTALL_HINT.to_string())?;
        let output = Command::new(&binary)
            .arg("--version")
            .output()
            .map_err(|e| format!("cannot run {}: {e} ({INSTALL_HINT})", binary.display()))?;
        let version = String::from_utf8_lossy(&output.stdout).trim().to_string();
        if !version.starts_with("2.3.") {
            return Err(format!(
                "{} is Dovecot {version:?}; the test harness configures Dovecot 2.3 (Debian 12: {})",
                binary.display(),
                INSTALL_HINT.trim_start_matches("dovecot not installed: ")
            ));
        }
        Ok(binary)
    });
    found.clone().unwrap_or_else(|e| panic!("{e}"))
}

/// Which system users the server runs as.
#[derive(Debug, Clone)]
struct Identity {
    /// Whether the tests run as root.
    root: bool,
    /// The user and group the mail processes run as and own the maildirs with.
    mail_user: String,
    mail_group: String,
    /// Numeric ids of `mail_user`/`mail_group`, for chown.
    mail_uid: u32,
    mail_gid: u32,
    /// For a non-root run: the current user and group, used for every Dovecot process.
    user: String,
    group: String,
}

impl Identity {
    /// Root runs mail as the `mail` user (Dovecot refuses uid 0 for mail); anyone else runs
    /// everything as themselves. `probe` is a directory this process just created.
    fn detect(probe: &Path) -> Identity {
        let meta = fs::metadata(probe).expect("stat dovecot temp dir");
        if meta.uid() == 0 {
            let (mail_uid, mail_gid) =
                passwd_entry(|name, _| name == "mail").map_or((8, 8), |(_, uid, gid)| (uid, gid));
            let group = group_name(mail_gid).unwrap_or_else(|| "mail".to_string());
            Identity {
                root: true,
                mail_user: "mail".to_string(),
                mail_group: group.clone(),
                mail_uid,
                mail_gid,
                user: "root".to_string(),
                group,
            }
        } else {
            let (uid, gid) = (meta.uid(), meta.gid());
            let user = passwd_entry(|_, id| id == uid)
                .map(|(name, _, _)| name)
                .unwrap_or_else(|| panic!("uid {uid} has no name in /etc/passwd; dovecot needs one"));
            let group = group_name(gid).unwrap_or_else(|| panic!("gid {gid} has no name in /etc/group"));
            Identity {
                root: false,
                mail_user: user.clone(),
                mail_group: group.clone(),
                mail_uid: uid,
                mail_gid: gid,
                user,
                group,
            }
        }
    }

    /// Makes `path` owned by the mail user (as root; otherwise it already is).
    fn give_mail(&self, path: &Path) {
        if self.root {
            std::os::unix::fs::chown(path, Some(self.mail_uid), Some(self.mail_gid))
                .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
        }
    }
}

/// The first `/etc/passwd` entry matching `(name, uid)`, as `(name, uid, gid)`.
fn passwd_entry(matches: impl Fn(&str, u32) -> bool) -> Option<(String, u32, u32)> {
    let text = fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        let (name, uid, gid) = (fields.first()?, fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?);
        matches(name, uid).then(|| (name.to_string(), uid, gid))
    })
}

/// The name of group `gid` in `/etc/group`.
fn group_name(gid: u32) -> Option<String> {
    let text = fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.get(2)?.parse::<u32>().ok()? == gid).then(|| fields[0].to_string())
    })
}

/// Processes in process group `pgid` as `(pid, state)`, read from `/proc`.
fn group_members(pgid: u32) -> Vec<(u32, char)> {
    let mut members = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else { continue };
        // "pid (comm) state ppid pgrp …"; comm may contain anything, so split after the last ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.get(2).and_then(|f| f.parse::<u32>().ok()) == Some(pgid) {
            members.push((pid, fields[0].chars().next().unwrap_or('?')));
        }
    }
    members
}

/// Sends `signal` (`TERM`, `KILL`) to `pids` through the shell's `kill` (no extra crate needed).
fn signal(signal: &str, pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!(r#"kill -{signal} "$@" 2>/dev/null"#))
        .arg("sh")
        .args(pids.iter().map(u32::to_string))
        .status();
}

/// Kills the Dovecot master `child` and every process in its process group, quickly and without
/// leaving zombies: SIGTERM tells the master to shut down (so it restarts nothing), SIGKILL ends
/// its children at once, and the master reaps them and exits (about 0.1 s). A master that has not
/// exited after 2 s is killed too. Returns the pids still alive after all that, if any.
fn kill_process_group(child: &mut Child) -> Result<(), Vec<u32>> {
    let pgid = child.id();
    let others = || -> Vec<u32> {
        group_members(pgid)
            .into_iter()
            .filter(|&(pid, state)| pid != pgid && state != 'Z')
            .map(|(pid, _)| pid)
            .collect()
    };
    signal("TERM", &[pgid]);
    signal("KILL", &others());
    let exited = super::poll_until(Duration::from_secs(2), || child.try_wait().ok().flatten());
    if exited.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    // Anything the master started while going down (normally nothing).
    signal("KILL", &others());
    match super::poll_until(Duration::from_secs(2), || others().is_empty().then_some(())) {
        Some(()) => Ok(()),
        None => Err(others()),
    }
}

/// The OAuth 2 token introspection endpoint (RFC 7662 style) that Dovecot's oauth2 passdb asks:
/// `POST /introspect` with `token=…` is answered `{"active": true, "username": …}` for a known
/// token and `{"active": false}` otherwise. One connection at a time, closed after each answer.
struct OAuthServer {
    port: u16,
    /// Accepted token → user name.
    tokens: Arc<Mutex<HashMap<String, String>>>,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl OAuthServer {
    fn start() -> OAuthServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind introspection endpoint");
        let port = listener.local_addr().expect("local addr").port();
        let tokens = Arc::new(Mutex::new(HashMap::from([(OAUTH_TOKEN.to_string(), USER.to_string())])));
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (tokens, requests, stop) = (tokens.clone(), requests.clone(), stop.clone());
            std::thread::Builder::new()
                .name("oauth-introspection".to_string())
                .spawn(move || {
                    for stream in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        if let Ok(stream) = stream {
                            let _ = answer_introspection(stream, &tokens, &requests);
                        }
                    }
                })
                .expect("spawn introspection thread")
        };
        OAuthServer { port, tokens, requests, stop, thread: Some(thread) }
    }
}

impl Drop for OAuthServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads one HTTP request from `stream` and answers it (see [`OAuthServer`]).
fn answer_introspection(
    stream: TcpStream,
    tokens: &Mutex<HashMap<String, String>>,
    requests: &AtomicUsize,
) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(&stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line)? == 0 {
        return Ok(());
    }
    let mut content_length = 0;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header)?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            content_length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; content_length];
    reader.read_exact(&mut body)?;
    requests.fetch_add(1, Ordering::SeqCst);
    let token = String::from_utf8_lossy(&body)
        .split('&')
        .find_map(|pair| pair.strip_prefix("token=").map(percent_decode))
        .unwrap_or_default();
    let user = tokens.lock().unwrap().get(&token).cloned();
    let json = match user {
        Some(user) => serde_json::json!({"active": true, "username": user}),
        None => serde_json::json!({"active": false}),
    }
    .to_string();
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
        json.len()
    );
    (&stream).write_all(response.as_bytes())?;
    let _ = stream.shutdown(Shutdown::Both);
    Ok(())
}

/// Decodes `application/x-www-form-urlencoded` (`+` and `%XX`).
fn percent_decode(value: &str) -> String {
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0;
    while i < value.len() {
        let byte = value.as_bytes()[i];
        let escaped = value.get(i + 1..i + 3).filter(|_| byte == b'%').and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (byte, escaped) {
            (_, Some(decoded)) => {
                out.push(decoded);
                i += 2;
            }
            (b'+', None) => out.push(b' '),
            (other, None) => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A mailbox name as IMAP wants it: modified UTF-7 (RFC 3501 §5.1.3).
pub fn mutf7(name: &str) -> String {
    fn flush(out: &mut String, pending: &mut Vec<u16>) {
        if pending.is_empty() {
            return;
        }
        let bytes: Vec<u8> = pending.iter().flat_map(|unit| unit.to_be_bytes()).collect();
        out.push('&');
        out.push_str(&BASE64_NO_PAD.encode(bytes).replace('/', ","));
        out.push('-');
        pending.clear();
    }
    let mut out = String::new();
    let mut pending = Vec::new();
    for ch in name.chars() {
        if (' '..='~').contains(&ch) {
            flush(&mut out, &mut pending);
            if ch == '&' { out.push_str("&-") } else { out.push(ch) }
        } else {
            pending.extend_from_slice(ch.encode_utf16(&mut [0; 2]));
        }
    }
    flush(&mut out, &mut pending);
    out
}

/// `s` as an IMAP quoted string.
fn quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A mailbox argument: modified UTF-7, quoted.
fn mailbox(folder: &str) -> String {
    quoted(&mutf7(folder))
}

/// One response line from the server, with the literals it carried.
#[derive(Debug, Clone)]
struct Line {
    /// The line without CRLF; each literal appears as its `{n}` marker, its bytes are in
    /// `literals`.
    text: String,
    /// The literals in the line, in order.
    literals: Vec<Vec<u8>>,
}

/// The answer to one command.
#[derive(Debug, Clone)]
struct Reply {
    /// Untagged (`* …`) lines.
    untagged: Vec<Line>,
    /// The tagged status line, without the tag (`OK …`, `NO …`, `BAD …`).
    status: String,
}

impl Reply {
    fn ok(&self) -> bool {
        self.status.starts_with("OK")
    }
}

/// A raw IMAP client over plain TCP for setting up and inspecting mailboxes. Each method is one
/// short blocking exchange; a NO, BAD, timeout or dropped connection panics with the dialogue
/// and the server log. Read-only methods use `EXAMINE`, `STATUS` and `BODY.PEEK`, so they change
/// no flags; [`flags`](Self::flags) leaves out `\Recent`, which depends on which session saw a
/// message first. Dropping the client closes the connection.
pub struct ImapClient {
    reader: BufReader<TcpStream>,
    next_tag: u32,
    capabilities: Vec<String>,
    /// Whether a mailbox is selected (Dovecot drops a connection whose selected mailbox is
    /// deleted, so [`delete`](Self::delete) unselects first).
    selected: bool,
    /// The last lines sent (`C:`) and received (`S:`).
    transcript: VecDeque<String>,
    /// The Dovecot instance directory, for the log tail in failures.
    server_root: PathBuf,
}

impl ImapClient {
    /// Connects to the plain port and reads the greeting.
    fn connect(port: u16, server_root: &Path) -> Result<ImapClient, String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let stream =
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| format!("connect {addr}: {e}"))?;
        let setup = |stream: &TcpStream| -> io::Result<()> {
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(IO_TIMEOUT))?;
            stream.set_write_timeout(Some(IO_TIMEOUT))
        };
        setup(&stream).map_err(|e| format!("set up {addr}: {e}"))?;
        let mut client = ImapClient {
            reader: BufReader::with_capacity(64 * 1024, stream),
            next_tag: 1,
            capabilities: Vec::new(),
            selected: false,
            transcript: VecDeque::new(),
            server_root: server_root.to_path_buf(),
        };
        let greeting = client.read_line().map_err(|e| format!("no greeting from {addr}: {e}"))?;
        if !greeting.text.starts_with("* OK") {
            return Err(format!("unexpected greeting from {addr}: {}", greeting.text));
        }
        client.capabilities = capability_code(&greeting.text).unwrap_or_default();
        Ok(client)
    }

    /// `LOGIN`; on success the capabilities are those Dovecot lists after login.
    fn login(&mut self, user: &str, password: &str) -> Result<(), String> {
        let command = format!("LOGIN {} {}", quoted(user), quoted(password));
        let reply = self.exchange(&command, false).map_err(|e| format!("LOGIN: {e}"))?;
        self.after_login(reply)
    }

    /// `AUTHENTICATE XOAUTH2` with the initial response (SASL-IR).
    fn authenticate_xoauth2(&mut self, user: &str, token: &str) -> Result<(), String> {
        let sasl = BASE64.encode(format!("user={user}\x01auth=Bearer {token}\x01\x01"));
        let reply =
            self.exchange(&format!("AUTHENTICATE XOAUTH2 {sasl}"), true).map_err(|e| format!("XOAUTH2: {e}"))?;
        self.after_login(reply)
    }

    fn after_login(&mut self, reply: Reply) -> Result<(), String> {
        if !reply.ok() {
            return Err(reply.status);
        }
        self.capabilities = match capability_code(&reply.status) {
            Some(capabilities) => capabilities,
            None => {
                self.command("CAPABILITY").untagged.iter().find_map(|l| capability_line(&l.text)).unwrap_or_default()
            }
        };
        Ok(())
    }

    /// The capabilities the server announced after login (`IDLE`, `UIDPLUS`, `MOVE`, …).
    pub fn capabilities(&self) -> Vec<String> {
        self.capabilities.clone()
    }

    /// Whether the server announced `capability` (case-insensitive).
    pub fn has_capability(&self, capability: &str) -> bool {
        self.capabilities.iter().any(|c| c.eq_ignore_ascii_case(capability))
    }

    /// Creates `folder` (and its parents).
    #[track_caller]
    pub fn create(&mut self, folder: &str) {
        self.command(&format!("CREATE {}", mailbox(folder)));
    }

    /// Deletes `folder` and its messages.
    #[track_caller]
    pub fn delete(&mut self, folder: &str) {
        if self.selected {
            self.command("UNSELECT");
            self.selected = false;
        }
        self.command(&format!("DELETE {}", mailbox(folder)));
    }

    /// Appends `message` to `folder` without flags; returns its UID (from UIDPLUS's APPENDUID).
    #[track_caller]
    pub fn append(&mut self, folder: &str, message: &[u8]) -> u32 {
        self.append_with_flags(folder, "", message)
    }

    /// Appends `message` to `folder` with `flags` (`"\\Seen \\Flagged"`, with or without the
    /// parentheses); returns its UID. The message is sent as one literal (non-synchronizing when
    /// the server offers LITERAL+), so multi-megabyte messages are cheap.
    #[track_caller]
    pub fn append_with_flags(&mut self, folder: &str, flags: &str, message: &[u8]) -> u32 {
        let flags = flags.trim();
        let flags = match flags {
            "" => String::new(),
            f if f.starts_with('(') => format!("{f} "),
            f => format!("({f}) "),
        };
        let literal_plus = self.has_capability("LITERAL+");
        let tag = self.tag();
        let plus = if literal_plus { "+" } else { "" };
        let command = format!("APPEND {} {flags}{{{}{plus}}}", mailbox(folder), message.len());
        self.note(format!("C: {tag} {command} <{} bytes>", message.len()));
        let result = (|| -> io::Result<Reply> {
            self.write(format!("{tag} {command}\r\n").as_bytes())?;
            if !literal_plus {
                let line = self.read_line()?;
                if !line.text.starts_with('+') {
                    return self.finish_reply(&tag, line, false);
                }
            }
            self.write(message)?;
            self.write(b"\r\n")?;
            self.read_reply(&tag, false)
        })();
        let reply = self.checked(&command, result);
        let uid = reply.status.split("[APPENDUID ").nth(1).and_then(|rest| {
            let mut fields = rest.split([' ', ']']);
            fields.next()?;
            fields.next()?.parse().ok()
        });
        uid.unwrap_or_else(|| self.fail(&format!("no APPENDUID in {:?}", reply.status)))
    }

    /// The UIDs in `folder`, ascending (`UID SEARCH ALL`).
    #[track_caller]
    pub fn uids(&mut self, folder: &str) -> Vec<u32> {
        self.search(folder, "ALL")
    }

    /// The UIDs of messages in `folder` without `\Seen`, ascending (`UID SEARCH UNSEEN`).
    #[track_caller]
    pub fn unseen(&mut self, folder: &str) -> Vec<u32> {
        self.search(folder, "UNSEEN")
    }

    /// `folder`'s UIDVALIDITY (`STATUS`).
    #[track_caller]
    pub fn uidvalidity(&mut self, folder: &str) -> u32 {
        self.status(folder, "UIDVALIDITY") as u32
    }

    /// How many messages `folder` holds (`STATUS … (MESSAGES)`).
    #[track_caller]
    pub fn count(&mut self, folder: &str) -> usize {
        self.status(folder, "MESSAGES") as usize
    }

    /// The flags of message `uid` in `folder`, e.g. `["\\Seen"]` (without `\Recent`).
    #[track_caller]
    pub fn flags(&mut self, folder: &str, uid: u32) -> Vec<String> {
        let line = self.fetch_line(folder, uid, "FLAGS");
        let flags = line.text.split("FLAGS (").nth(1).and_then(|rest| rest.split(')').next());
        let flags = flags.unwrap_or_else(|| self.fail(&format!("no FLAGS in {:?}", line.text)));
        flags.split_whitespace().filter(|f| !f.eq_ignore_ascii_case("\\Recent")).map(str::to_string).collect()
    }

    /// The raw bytes of message `uid` in `folder` (`BODY.PEEK[]`, so `\Seen` is not set).
    #[track_caller]
    pub fn fetch(&mut self, folder: &str, uid: u32) -> Vec<u8> {
        let mut line = self.fetch_line(folder, uid, "BODY.PEEK[]");
        if line.literals.is_empty() {
            self.fail(&format!("no literal in {:?}", line.text));
        }
        line.literals.swap_remove(0)
    }

    /// Whether `folder` exists as a selectable mailbox (`LIST`).
    #[track_caller]
    pub fn exists(&mut self, folder: &str) -> bool {
        let wanted = mutf7(folder);
        let reply = self.command(&format!("LIST \"\" {}", quoted(&wanted)));
        reply.untagged.iter().any(|line| {
            let Some(rest) = line.text.strip_prefix("* LIST (") else { return false };
            let Some((attributes, rest)) = rest.split_once(')') else { return false };
            let name = match line.literals.first() {
                Some(literal) => String::from_utf8_lossy(literal).into_owned(),
                None => list_name(rest),
            };
            let unselectable = attributes
                .split_whitespace()
                .any(|a| a.eq_ignore_ascii_case("\\Noselect") || a.eq_ignore_ascii_case("\\NonExistent"));
            let same = name == wanted || (name.eq_ignore_ascii_case("INBOX") && wanted.eq_ignore_ascii_case("INBOX"));
            same && !unselectable
        })
    }

    /// Changes the flags of message `uid` in `folder`: `item` is a STORE data item such as
    /// `"+FLAGS (\\Seen)"` or `"-FLAGS (\\Flagged)"`.
    #[track_caller]
    pub fn store(&mut self, folder: &str, uid: u32, item: &str) {
        self.command(&format!("SELECT {}", mailbox(folder)));
        self.command(&format!("UID STORE {uid} {item}"));
    }

    /// Removes message `uid` from `folder` (`\Deleted` + `UID EXPUNGE`).
    #[track_caller]
    pub fn expunge(&mut self, folder: &str, uid: u32) {
        self.command(&format!("SELECT {}", mailbox(folder)));
        self.command(&format!("UID STORE {uid} +FLAGS.SILENT (\\Deleted)"));
        self.command(&format!("UID EXPUNGE {uid}"));
    }

    /// Sends any command (without tag) and returns the text of the untagged answer lines;
    /// panics unless the answer is OK.
    #[track_caller]
    pub fn run(&mut self, command: &str) -> Vec<String> {
        self.command(command).untagged.into_iter().map(|line| line.text).collect()
    }

    /// Like [`run`](Self::run), but returns the tagged NO/BAD answer or the I/O error (a
    /// dropped connection, say) instead of panicking.
    pub fn try_run(&mut self, command: &str) -> Result<Vec<String>, String> {
        match self.exchange(command, false) {
            Ok(reply) if reply.ok() => Ok(reply.untagged.into_iter().map(|line| line.text).collect()),
            Ok(reply) => Err(reply.status),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Logs out and closes the connection.
    #[track_caller]
    pub fn logout(mut self) {
        self.command("LOGOUT");
    }

    /// The last lines of the dialogue.
    pub fn transcript(&self) -> String {
        self.transcript.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    fn search(&mut self, folder: &str, criteria: &str) -> Vec<u32> {
        self.command(&format!("EXAMINE {}", mailbox(folder)));
        let reply = self.command(&format!("UID SEARCH {criteria}"));
        let mut uids: Vec<u32> = reply
            .untagged
            .iter()
            .filter_map(|line| line.text.strip_prefix("* SEARCH"))
            .flat_map(|numbers| numbers.split_whitespace().filter_map(|n| n.parse().ok()))
            .collect();
        uids.sort_unstable();
        uids
    }

    fn status(&mut self, folder: &str, item: &str) -> u64 {
        let reply = self.command(&format!("STATUS {} ({item})", mailbox(folder)));
        let value = reply.untagged.iter().filter(|l| l.text.starts_with("* STATUS")).find_map(|line| {
            let inner = line.text.rsplit_once('(')?.1;
            let mut words = inner.trim_end_matches(')').split_whitespace();
            words.by_ref().find(|w| w.eq_ignore_ascii_case(item))?;
            words.next()?.parse().ok()
        });
        value.unwrap_or_else(|| self.fail(&format!("no {item} in the STATUS answer")))
    }

    /// `UID FETCH uid (items)` in `folder`; the FETCH line for that UID.
    fn fetch_line(&mut self, folder: &str, uid: u32, items: &str) -> Line {
        self.command(&format!("EXAMINE {}", mailbox(folder)));
        let reply = self.command(&format!("UID FETCH {uid} ({items})"));
        let needle = format!("UID {uid}");
        let found = reply.untagged.into_iter().find(|line| {
            line.text.contains(" FETCH (")
                && line
                    .text
                    .match_indices(&needle)
                    .any(|(at, _)| !line.text[at + needle.len()..].starts_with(|c: char| c.is_ascii_digit()))
        });
        found.unwrap_or_else(|| self.fail(&format!("no message with UID {uid} in {folder}")))
    }

    /// Sends `command` and panics unless it is answered OK.
    #[track_caller]
    fn command(&mut self, command: &str) -> Reply {
        let result = self.exchange(command, false);
        self.checked(command, result)
    }

    #[track_caller]
    fn checked(&self, command: &str, result: io::Result<Reply>) -> Reply {
        match result {
            Ok(reply) if reply.ok() => reply,
            Ok(reply) => self.fail(&format!("{command} was answered {}", reply.status)),
            Err(e) => self.fail(&format!("{command} failed: {e}")),
        }
    }

    /// Sends a tagged `command` and reads the answer. `cancel_continuations` answers a `+`
    /// request with an empty line (how a failed SASL exchange is ended).
    fn exchange(&mut self, command: &str, cancel_continuations: bool) -> io::Result<Reply> {
        let tag = self.tag();
        self.note(format!("C: {tag} {command}"));
        self.write(format!("{tag} {command}\r\n").as_bytes())?;
        let reply = self.read_reply(&tag, cancel_continuations)?;
        let verb = command.split(' ').next().unwrap_or_default().to_ascii_uppercase();
        match verb.as_str() {
            "SELECT" | "EXAMINE" => self.selected = reply.ok(),
            "UNSELECT" | "CLOSE" if reply.ok() => self.selected = false,
            _ => {}
        }
        Ok(reply)
    }

    fn read_reply(&mut self, tag: &str, cancel_continuations: bool) -> io::Result<Reply> {
        let line = self.read_line()?;
        self.finish_reply(tag, line, cancel_continuations)
    }

    /// Reads lines (starting with `line`) up to the tagged one.
    fn finish_reply(&mut self, tag: &str, mut line: Line, cancel_continuations: bool) -> io::Result<Reply> {
        let mut untagged = Vec::new();
        loop {
            if let Some(status) = line.text.strip_prefix(tag).and_then(|rest| rest.strip_prefix(' ')) {
                return Ok(Reply { untagged, status: status.to_string() });
            }
            if line.text.starts_with('+') {
                if !cancel_continuations {
                    return Err(io::Error::other(format!("unexpected continuation {:?}", line.text)));
                }
                self.note("C: (empty line)".to_string());
                self.write(b"\r\n")?;
            } else {
                untagged.push(line);
            }
            line = self.read_line()?;
        }
    }

    /// Reads one response line, with any literals it contains.
    fn read_line(&mut self) -> io::Result<Line> {
        let mut text = Vec::new();
        let mut literals = Vec::new();
        loop {
            let mut chunk = Vec::new();
            self.reader.read_until(b'\n', &mut chunk)?;
            if !chunk.ends_with(b"\n") {
                let partial = String::from_utf8_lossy(&chunk).into_owned();
                self.note(format!("S: {partial} <connection closed>"));
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the server closed the connection"));
            }
            let end = chunk.len() - if chunk.ends_with(b"\r\n") { 2 } else { 1 };
            chunk.truncate(end);
            let literal = literal_len(&chunk);
            text.extend_from_slice(&chunk);
            match literal {
                Some(len) => {
                    let mut bytes = vec![0; len];
                    self.reader.read_exact(&mut bytes)?;
                    literals.push(bytes);
                }
                None => break,
            }
        }
        let line = Line { text: String::from_utf8_lossy(&text).into_owned(), literals };
        let sizes: Vec<String> = line.literals.iter().map(|l| format!("{} bytes", l.len())).collect();
        let suffix = if sizes.is_empty() { String::new() } else { format!(" <literals: {}>", sizes.join(", ")) };
        self.note(format!("S: {}{suffix}", line.text));
        Ok(line)
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut stream = self.reader.get_ref();
        stream.write_all(bytes)?;
        stream.flush()
    }

    fn tag(&mut self) -> String {
        let tag = format!("t{}", self.next_tag);
        self.next_tag += 1;
        tag
    }

    /// Adds a line to the transcript (long lines shortened, at most 200 lines kept).
    fn note(&mut self, mut line: String) {
        if line.len() > 300 {
            let mut cut = 300;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
            line.push_str(" …");
        }
        if self.transcript.len() == 200 {
            self.transcript.pop_front();
        }
        self.transcript.push_back(line);
    }

    /// Panics with `message`, the dialogue and the server log tail.
    #[track_caller]
    fn fail(&self, message: &str) -> ! {
        panic!(
            "IMAP: {message}\n--- dialogue ---\n{}\n--- dovecot in {} ---\n{}\n----------------",
            self.transcript(),
            self.server_root.display(),
            log_tail(&self.server_root)
        )
    }
}

/// The length of the literal announced at the end of `line` (`{n}` or `{n+}`), if any.
fn literal_len(line: &[u8]) -> Option<usize> {
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&b| b == b'{')?;
    let digits = &inner[open + 1..];
    let digits = digits.strip_suffix(b"+").unwrap_or(digits);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The capabilities in a `[CAPABILITY …]` response code.
fn capability_code(text: &str) -> Option<Vec<String>> {
    let list = text.split("[CAPABILITY ").nth(1)?.split(']').next()?;
    Some(list.split_whitespace().map(str::to_string).collect())
}

/// The capabilities in a `* CAPABILITY …` line.
fn capability_line(text: &str) -> Option<Vec<String>> {
    Some(text.strip_prefix("* CAPABILITY ")?.split_whitespace().map(str::to_string).collect())
}

/// The mailbox name at the end of a LIST line, after the attributes: `"/" name` or
/// `"/" "name"` (a name sent as a literal is handled by the caller).
fn list_name(rest: &str) -> String {
    let mut words = Vec::new();
    let mut chars = rest.trim().chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' => {}
            '"' => {
                let mut word = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => word.extend(chars.next()),
                        '"' => break,
                        c => word.push(c),
                    }
                }
                words.push(word);
            }
            c => {
                let mut word = String::from(c);
                word.extend(chars.by_ref().take_while(|&c| c != ' '));
                words.push(word);
            }
        }
    }
    words.pop().unwrap_or_default()
}

#![forbid(unsafe_code)]
//! The `mailhook` command line: parses arguments and calls the library. Nothing else.

use clap::{Args, Parser, Subcommand};
use mailhook::cmd::{self, EnvelopeSpec, Exit, RulesSource};
use mailhook::config::Config;
use mailhook::logging::LogFormat;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "mailhook",
    version,
    about = "Turn email into Kustomer hook events",
    long_about = "mailhook receives email (SMTP, LMTP, stdin, IMAP), parses it, extracts fields \
                  with the regex rules in rules/*.toml and delivers one JSON object per email \
                  to Kustomer hooks or any webhook.",
    after_help = "Exit codes: 0 ok, 1 golden test failed, 64 usage, 65 unreadable input, \
                  75 temporary failure, 78 bad config or rules.\n\n\
                  Start here:\n  mailhook try --rules rules fixtures/*.eml\n  mailhook test --rules rules fixtures\n  mailhook check --config mailhook.toml"
)]
struct Cli {
    /// Log format: text on a terminal, JSON lines otherwise (auto)
    #[arg(long, global = true, value_enum, default_value = "auto")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the delivery workers (and every configured listener) until SIGTERM or SIGINT
    #[command(after_help = "Checks the config and the rules first and refuses to start, listing every problem,\n\
        when anything is wrong. Then it locks and recovers the spool and delivers what is in it;\n\
        mail spooled by `mailhook ingest` is picked up within a second. A change in the rules\n\
        directory or SIGHUP reloads the rules (a set with errors is refused and the last good one\n\
        keeps serving). [admin] listen serves /healthz and /metrics. SIGTERM/SIGINT stop claiming\n\
        work, close the listeners and let deliveries in flight finish; exit 0.\n\n\
        Example:\n  mailhook serve --config /etc/mailhook/mailhook.toml")]
    Serve {
        /// The config file
        #[arg(long, short, default_value = "mailhook.toml", value_name = "FILE")]
        config: PathBuf,
    },
    /// Spool one message read from standard input (for a Postfix pipe or a sendmail alias)
    #[command(after_help = "Exits 0 only once the message is on disk (fsync'd) and prints its spool id. Exits 75\n\
        (EX_TEMPFAIL) for anything the operator can fix: the config cannot be read or has an error,\n\
        the spool is missing or not writable, the disk is full; the MTA keeps the message and\n\
        tries again. Exits 65 only for a message that can never be taken (empty input).\n\
        --to takes every recipient that follows it (Postfix's ${recipient} gives one argument\n\
        each); the message is spooled once for all of them.\n\n\
        --wait (for a shell, not a pipe): then waits until serve has judged and tried the message,\n\
        prints `ID delivered`, `ID dead: reason` or `ID deferred: error`, and exits 0 when\n\
        delivered, 1 when dead or deferred, 75 when serve did not get to it in time.\n\n\
        Examples:\n  mailhook ingest --config /etc/mailhook/mailhook.toml --from \"$SENDER\" --to \"$RECIPIENT\" < message.eml\n  \
        mailhook ingest --wait --to hook@example.com < message.eml\n  \
        Postfix master.cf:  mailhook unix - n n - - pipe\n    \
        flags=Rq user=mailhook argv=/usr/local/bin/mailhook ingest --config /etc/mailhook/mailhook.toml --from ${sender} --to ${recipient}")]
    Ingest {
        /// The config file
        #[arg(long, short, default_value = "mailhook.toml", value_name = "FILE")]
        config: PathBuf,
        /// Envelope sender
        #[arg(long, value_name = "ADDR")]
        from: Option<String>,
        /// Envelope recipients: every address after --to (or --to repeated)
        #[arg(long = "to", value_name = "ADDR", num_args = 1.., action = clap::ArgAction::Append)]
        to: Vec<String>,
        /// Then wait (up to DURATION, default 30s) for serve's first delivery, and print the outcome
        #[arg(long, value_name = "DURATION", num_args = 0..=1, default_missing_value = "30s", value_parser = humantime::parse_duration)]
        wait: Option<std::time::Duration>,
    },
    /// Inspect the spool and act on it: list, show, retry, drop
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Run stored messages through the current rules again and queue them accordingly
    #[command(after_help = "The fix-a-rule-then-replay loop: a message that was a dead letter because no rule\n\
        matched (or a field was missing) is judged again by the rules as they are now; the new\n\
        decision replaces the old one and every destination of it gets the message. Prints, per\n\
        message, the rule and destinations, or why it is still dead.\n\n\
        Examples:\n  mailhook replay --config mailhook.toml --dead\n  mailhook replay --config mailhook.toml 01JD4Z6W8Q2M3N4P5R6S7T8V9X")]
    Replay {
        /// The config file
        #[arg(long, short, default_value = "mailhook.toml", value_name = "FILE")]
        config: PathBuf,
        /// Replay every dead letter
        #[arg(long)]
        dead: bool,
        /// Spool ids
        #[arg(value_name = "ID", required_unless_present = "dead")]
        ids: Vec<String>,
    },
    /// Show, per email file, the rule that matches and the payload it would send (sends nothing)
    #[command(after_help = "Prints one JSON object per file on stdout:\n  \
        {\"file\": \"...\", \"rule\": \"name\" | null, \"to\": [\"dest\", ...], \"payload\": {...}}\n\
        plus \"dead\": \"reason\" when the message would be a dead letter (no rule matched, a required\n\
        field is missing) or \"dropped\": true when it would be discarded.\n\n\
        The envelope is source \"stdin\" with the message's To and Cc as recipients, unless a\n\
        NAME.envelope.toml beside the file or the options below say otherwise.\n\n\
        Examples:\n  mailhook try --rules rules fixtures/shipping-ups.eml\n  \
        mailhook try --pretty --source imap:alerts/INBOX --recipient alerts@example.com alert.eml\n  \
        mailhook try --config mailhook.toml ~/Maildir/new/*")]
    Try {
        #[command(flatten)]
        rules: RulesArgs,
        /// Pretty-print each JSON object over several lines
        #[arg(long)]
        pretty: bool,
        /// Envelope source: smtp, lmtp, stdin or imap:ACCOUNT/FOLDER
        #[arg(long, value_name = "SOURCE")]
        source: Option<String>,
        /// Envelope sender (MAIL FROM)
        #[arg(long, value_name = "ADDR")]
        mail_from: Option<String>,
        /// Envelope recipient (RCPT TO); repeat for several
        #[arg(long = "recipient", value_name = "ADDR")]
        recipients: Vec<String>,
        /// Raw email files (.eml); `-` reads one from standard input
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Golden tests: run every NAME.eml in DIR through the rules and compare with NAME.json
    #[command(after_help = "NAME.json holds what `mailhook try` prints for NAME.eml, without \"file\":\n  \
        {\"rule\": ..., \"to\": [...], \"payload\": {...}}\n\
        The payload's \"id\" and \"receivedAt\" change on every run and are ignored. A mismatch\n\
        prints a diff; --update rewrites the JSON files from the current rules (review the diff\n\
        before committing). A NAME.envelope.toml (source, mail_from, recipients) sets the envelope.\n\n\
        Exit: 0 all passed, 1 a case failed or has no NAME.json, 65 unreadable, 78 bad rules.\n\n\
        Examples:\n  mailhook test --rules rules fixtures\n  mailhook test --rules rules --update fixtures")]
    Test {
        #[command(flatten)]
        rules: RulesArgs,
        /// Rewrite NAME.json files with the current results instead of comparing
        #[arg(long)]
        update: bool,
        /// Directory of NAME.eml / NAME.json pairs
        #[arg(default_value = "fixtures", value_name = "DIR")]
        dir: PathBuf,
    },
    /// Judge archived messages with the live rules and with NEW_DIR's, and report what would change
    #[command(after_help = "Each archived message (raw bytes and envelope) is judged with the rules the config\n\
        points at and with the rules in --rules, exactly as `mailhook try` judges a file. Prints\n\
        how many messages are unchanged, changed rule, newly matched, newly unmatched, newly dead\n\
        or changed fields, then each difference with a field-level diff:\n  \
        rule: ups-delivery-notice → (none)\n  \
        fields.order_id: 4711 → (missing)\n\
        Without --since or --last: the newest [rules] shadow_last messages (1000).\n\n\
        Exit: 0 nothing would change, 1 something would, 64 usage, 75 no archive yet, 78 bad config or rules.\n\n\
        Examples:\n  mailhook shadow --config mailhook.toml --rules rules.new\n  \
        mailhook shadow --config mailhook.toml --rules rules.new --since 7d --json")]
    Shadow {
        /// The config file (its archive, and its rules as the live rules)
        #[arg(long, short, default_value = "mailhook.toml", value_name = "FILE")]
        config: PathBuf,
        /// The rules directory to compare with the live rules
        #[arg(long, value_name = "NEW_DIR")]
        rules: PathBuf,
        /// Messages received within this long (e.g. 7d, 12h)
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, conflicts_with = "last")]
        since: Option<std::time::Duration>,
        /// The newest N messages
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        last: Option<u64>,
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
    },
    /// Validate the config file and the rules it points at; every error names file, line, rule and key
    #[command(after_help = "Checks the whole mailhook.toml (unknown keys, ${VAR}s that are not set, bad\n\
        durations, sizes, addresses, regexes, destinations missing a url or token, ...) and every\n\
        rules file, including that each destination a rule names exists. Exits 0 when all is\n\
        well, 78 with every problem listed otherwise.\n\n\
        Example:\n  mailhook check --config /etc/mailhook/mailhook.toml")]
    Check {
        /// The config file
        #[arg(long, short, default_value = "mailhook.toml", value_name = "FILE")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum QueueCommand {
    /// List every message: state, age, attempts, rule, destinations, last error
    #[command(
        after_help = "Examples:\n  mailhook queue list --config mailhook.toml\n  mailhook queue list --json | jq '.[] | select(.state == \"dead\")'"
    )]
    List {
        #[arg(long, short, default_value = "mailhook.toml", value_name = "FILE")]
        config: PathBuf,
        /// Print a JSON array instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Show one message: metadata, the payload that would be sent, its headers
    #[command(after_help = "Example:\n  mailhook queue show --config mailhook.toml 01JD4Z6W8Q2M3N4P5R6S7T8V9X")]
    Show {
        #[arg(long, short, default_value = "mailhook.toml", value_name = "FILE")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
        #[arg(value_name = "ID")]
        id: String,
    },
    /// Queue a dead or deferred message for delivery now (destinations that took it are skipped)
    #[command(after_help = "A message that died when it was judged (no rule matched, a required field missing) is\n\
            judged with the current rules first; when they still reject it, it stays dead and the\n\
            reason is printed (edit the rule, then `mailhook replay ID`; or --force to queue it anyway).\n\n\
            Examples:\n  mailhook queue retry --config mailhook.toml 01JD4Z6W8Q2M3N4P5R6S7T8V9X\n  mailhook queue retry --config mailhook.toml --all-dead")]
    Retry {
        #[arg(long, short, default_value = "mailhook.toml", value_name = "FILE")]
        config: PathBuf,
        /// Every dead letter
        #[arg(long)]
        all_dead: bool,
        /// Queue a message the current rules still reject (it will die again)
        #[arg(long)]
        force: bool,
        #[arg(value_name = "ID", required_unless_present = "all_dead")]
        ids: Vec<String>,
    },
    /// Wait until messages have been judged and tried once by the running serve
    #[command(after_help = "Without ids: every message waiting for its first judgement or being delivered\n\
        right now. Prints `ID delivered`, `ID dead: reason` or `ID deferred: error` per message;\n\
        exits 0 when all were delivered, 1 when one is dead or deferred, 75 when serve did not\n\
        get to one within --timeout.\n\n\
        Example:\n  curl -s smtp://127.0.0.1:2525 --mail-rcpt hook@example.com -T mail.eml && mailhook queue wait")]
    Wait {
        #[arg(long, short, default_value = "mailhook.toml", value_name = "FILE")]
        config: PathBuf,
        /// How long to wait at most
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        #[arg(value_name = "ID")]
        ids: Vec<String>,
    },
    /// Delete messages from the spool for good
    #[command(after_help = "Example:\n  mailhook queue drop --config mailhook.toml 01JD4Z6W8Q2M3N4P5R6S7T8V9X")]
    Drop {
        #[arg(long, short, default_value = "mailhook.toml", value_name = "FILE")]
        config: PathBuf,
        #[arg(value_name = "ID", required = true)]
        ids: Vec<String>,
    },
}

#[derive(Args)]
struct RulesArgs {
    /// Rules directory [default: the config's rules.dir, else ./rules]
    #[arg(long, value_name = "DIR")]
    rules: Option<PathBuf>,
    /// Take the rules directory, `unmatched` policy and destination names from this config
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
}

impl RulesArgs {
    fn source(self) -> RulesSource {
        RulesSource { rules_dir: self.rules, config: self.config }
    }
}

/// Threads for blocking work (judging, spool reads, archive reads), beside one worker thread per
/// core. Each thread that allocates gets a malloc arena of its own that keeps what it once held,
/// so their number bounds memory; judging is CPU work, and a few per core keep the cores busy.
const BLOCKING_THREADS: usize = 8;

fn serve(config_path: &std::path::Path, log_format: LogFormat) -> Exit {
    mailhook::logging::init(log_format);
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            eprintln!("mailhook serve: not starting: {} error(s) in config", errors.len());
            return Exit::Config;
        }
    };
    let runtime =
        match tokio::runtime::Builder::new_multi_thread().max_blocking_threads(BLOCKING_THREADS).enable_all().build() {
            Ok(r) => r,
            Err(e) => {
                eprintln!("mailhook serve: cannot start the runtime: {e}");
                return Exit::TempFail;
            }
        };
    match runtime.block_on(mailhook::serve::serve(config)) {
        Ok(()) => Exit::Ok,
        Err(mailhook::serve::ServeError::Rules(errors)) => {
            cmd::print_rule_errors(&errors);
            eprintln!("mailhook serve: not starting");
            Exit::Config
        }
        Err(mailhook::serve::ServeError::Listener(e)) => {
            eprintln!("mailhook serve: not starting: {e}");
            if e.is_temporary() { Exit::TempFail } else { Exit::Config }
        }
        Err(mailhook::serve::ServeError::Admin(e)) => {
            eprintln!("mailhook serve: not starting: {e}");
            Exit::TempFail
        }
        Err(mailhook::serve::ServeError::Destination(e)) => {
            eprintln!("mailhook serve: not starting: {e}");
            Exit::Config
        }
        Err(e) => {
            eprintln!("mailhook serve: {e}");
            Exit::TempFail
        }
    }
}

fn main() -> ExitCode {
    // One TLS crypto provider for every client (reqwest, lettre): ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let usage_error = e.use_stderr();
            let _ = e.print();
            return ExitCode::from(if usage_error { Exit::Usage as u8 } else { Exit::Ok as u8 });
        }
    };
    let exit = match cli.command {
        Command::Try { rules, pretty, source, mail_from, recipients, files } => {
            cmd::try_rules::run(&cmd::try_rules::TryOptions {
                rules: rules.source(),
                files,
                envelope: EnvelopeSpec {
                    source,
                    mail_from,
                    recipients: (!recipients.is_empty()).then_some(recipients),
                },
                pretty,
            })
        }
        Command::Test { rules, update, dir } => {
            cmd::golden::run(&cmd::golden::TestOptions { rules: rules.source(), dir, update })
        }
        Command::Check { config } => cmd::check::run(&config),
        Command::Shadow { config, rules, since, last, json } => cmd::shadow::run(&cmd::shadow::ShadowOptions {
            config,
            rules,
            since,
            last: last.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            json,
        }),
        Command::Serve { config } => serve(&config, cli.log_format),
        Command::Ingest { config, from, to, wait } => cmd::ingest::run(
            &cmd::ingest::IngestOptions { config: &config, mail_from: from, recipients: to, wait },
            &mut std::io::stdin().lock(),
        ),
        Command::Queue(QueueCommand::List { config, json }) => cmd::queue::list(&config, json),
        Command::Queue(QueueCommand::Show { config, json, id }) => cmd::queue::show(&config, &id, json),
        Command::Queue(QueueCommand::Retry { config, all_dead, force, ids }) => {
            cmd::queue::retry(&config, &ids, all_dead, force)
        }
        Command::Queue(QueueCommand::Wait { config, timeout, ids }) => cmd::queue::wait_command(&config, &ids, timeout),
        Command::Queue(QueueCommand::Drop { config, ids }) => cmd::queue::drop(&config, &ids),
        Command::Replay { config, dead, ids } => cmd::queue::replay(&config, &ids, dead),
    };
    ExitCode::from(exit as u8)
}

#![forbid(unsafe_code)]
//! The `mailhook` command line: parses arguments and calls the library. Nothing else.

use clap::{Args, Parser, Subcommand};
use mailhook::cmd::{self, EnvelopeSpec, Exit, RulesSource};
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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
        /// Raw email files (.eml)
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Golden tests: run every NAME.eml in DIR through the rules and compare with NAME.json
    #[command(
        after_help = "NAME.json holds what `mailhook try` prints for NAME.eml, without \"file\":\n  \
        {\"rule\": ..., \"to\": [...], \"payload\": {...}}\n\
        The payload's \"id\" and \"receivedAt\" change on every run and are ignored. A mismatch\n\
        prints a diff; --update rewrites the JSON files from the current rules (review the diff\n\
        before committing). A NAME.envelope.toml (source, mail_from, recipients) sets the envelope.\n\n\
        Exit: 0 all passed, 1 a case failed or has no NAME.json, 65 unreadable, 78 bad rules.\n\n\
        Examples:\n  mailhook test --rules rules fixtures\n  mailhook test --rules rules --update fixtures"
    )]
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
    /// Validate the config file and the rules it points at; every error names file, line, rule and key
    #[command(
        after_help = "Checks the whole mailhook.toml (unknown keys, ${VAR}s that are not set, bad\n\
        durations, sizes, addresses, regexes, destinations missing a url or token, ...) and every\n\
        rules file, including that each destination a rule names exists. Exits 0 when all is\n\
        well, 78 with every problem listed otherwise.\n\n\
        Example:\n  mailhook check --config /etc/mailhook/mailhook.toml"
    )]
    Check {
        /// The config file
        #[arg(long, short, default_value = "mailhook.toml", value_name = "FILE")]
        config: PathBuf,
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
        RulesSource {
            rules_dir: self.rules,
            config: self.config,
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let usage_error = e.use_stderr();
            let _ = e.print();
            return ExitCode::from(if usage_error { Exit::Usage as u8 } else { Exit::Ok as u8 });
        }
    };
    let exit = match cli.command {
        Command::Try {
            rules,
            pretty,
            source,
            mail_from,
            recipients,
            files,
        } => cmd::try_rules::run(&cmd::try_rules::TryOptions {
            rules: rules.source(),
            files,
            envelope: EnvelopeSpec {
                source,
                mail_from,
                recipients: (!recipients.is_empty()).then_some(recipients),
            },
            pretty,
        }),
        Command::Test { rules, update, dir } => cmd::golden::run(&cmd::golden::TestOptions {
            rules: rules.source(),
            dir,
            update,
        }),
        Command::Check { config } => cmd::check::run(&config),
    };
    ExitCode::from(exit as u8)
}

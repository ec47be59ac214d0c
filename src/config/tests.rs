use super::*;

fn parse_with(text: &str, vars: &[(&str, &str)]) -> Result<Config, Vec<ConfigError>> {
    let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let env = move |name: &str| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    Config::parse(text, Path::new("mailhook.toml"), Path::new("/etc/mailhook"), &env)
}

fn messages(r: Result<Config, Vec<ConfigError>>) -> Vec<String> {
    r.expect_err("config should be refused").iter().map(ToString::to_string).collect()
}

const FULL: &str = r#"
[spool]
dir = "./spool"

[rules]
dir = "./rules"
unmatched = "dead"

[smtp]
listen = ["127.0.0.1:2525"]
hostname = "mailhook.example.com"
max_size = "25MB"
allow = ["127.0.0.0/8", "10.0.0.0/8"]
recipients = ['(?i)@hooks\.example\.com$']

[lmtp]
listen = ["127.0.0.1:2424"]

[[imap]]
name = "alerts"
host = "imap.example.com"
port = 993
tls = "implicit"
user = "alerts@example.com"
password = "${IMAP_PASSWORD}"
folders = ["INBOX"]
after = "move:Processed"
idle = true
poll = "60s"

[destination.kustomer-orders]
type = "kustomer-web-hook"
url = "https://acme.api.kustomerapp.com/v1/hooks/web/HASH"
token = "${KUSTOMER_HOOK_TOKEN}"

[destination.kustomer-form]
type = "kustomer-form-hook"
url = "https://acme.api.kustomerapp.com/v1/hooks/form/ORG/HASH"

[destination.kustomer-email]
type = "kustomer-email-hook"
address = "HASH@hooks.kustomerapp.com"
key = "${KUSTOMER_EMAIL_HOOK_KEY}"
relay = "smtp://smtp.example.com:587"
from = "mailhook@example.com"

[destination.ops]
type = "webhook"
url = "https://ops.example.com/hook"
headers = { "X-Api-Key" = "${OPS_KEY}" }

[destination.audit]
type = "file"
path = "./out/events.jsonl"

[delivery]
timeout = "10s"
retry_for = "3d"
backoff = { initial = "5s", max = "15m" }
max_body = "400KB"
rate = "1000/min"
concurrency = 8

[admin]
listen = "127.0.0.1:9025"
"#;

const VARS: &[(&str, &str)] = &[
    ("IMAP_PASSWORD", "imap-secret"),
    ("KUSTOMER_HOOK_TOKEN", "tok-secret"),
    ("KUSTOMER_EMAIL_HOOK_KEY", "key-secret"),
    ("OPS_KEY", "ops-secret"),
];

#[test]
fn the_design_example_parses() {
    let c = parse_with(FULL, VARS).unwrap();
    assert_eq!(c.smtp.as_ref().unwrap().max_size, bytesize::ByteSize::mb(25));
    assert_eq!(c.imap[0].after, After::Move("Processed".into()));
    assert_eq!(c.imap[0].password.as_ref().unwrap().expose(), "imap-secret");
    let DestinationConfig::KustomerWebHook(orders) = &c.destination["kustomer-orders"] else { panic!("type") };
    assert_eq!(orders.token.expose(), "tok-secret");
    let DestinationConfig::Webhook(ops) = &c.destination["ops"] else { panic!("type") };
    assert_eq!(ops.headers["X-Api-Key"].expose(), "ops-secret");
    assert!(matches!(c.destination["audit"], DestinationConfig::File(_)));
    assert_eq!(c.delivery.retry_for, Duration::from_secs(3 * 86400));
    assert_eq!(c.delivery.max_body, bytesize::ByteSize::kb(400));
    assert_eq!(c.delivery.rate.per_second(), Some(1000.0 / 60.0));
    assert_eq!(c.resolve(&c.spool.dir), PathBuf::from("/etc/mailhook/./spool"));
}

#[test]
fn secrets_do_not_show_in_debug() {
    let c = parse_with(FULL, VARS).unwrap();
    let dump = format!("{c:?}");
    for (_, secret) in VARS {
        assert!(!dump.contains(secret), "{secret} leaked in Debug output");
    }
}

#[test]
fn every_unset_variable_is_named() {
    let errs = messages(parse_with(FULL, &[("OPS_KEY", "x")]));
    assert_eq!(errs.len(), 3, "{errs:#?}");
    assert_eq!(errs[0], "mailhook.toml:25: imap[0].password: environment variable IMAP_PASSWORD is not set");
    assert!(errs.iter().any(|e| e.contains("imap[0].password") && e.contains("IMAP_PASSWORD is not set")));
    assert!(errs.iter().any(|e| e.contains("destination.kustomer-orders.token") && e.contains("KUSTOMER_HOOK_TOKEN")));
    assert!(errs.iter().any(|e| e.contains("destination.kustomer-email.key")));
}

#[test]
fn empty_variable_is_kept_and_dollar_escapes() {
    assert_eq!(expand_env("a${X}b", &|_| Some(String::new())).unwrap(), "ab");
    assert_eq!(expand_env("$${X} costs $5", &|_| None).unwrap(), "${X} costs $5");
    assert!(expand_env("${X", &|_| None).is_err());
    assert!(expand_env("${}", &|_| None).is_err());
}

#[test]
fn unknown_key_is_named() {
    let errs = messages(parse_with("[smtp]\nlisten = [\"127.0.0.1:25\"]\nmax_sise = \"1MB\"\n", &[]));
    assert_eq!(errs.len(), 1);
    assert!(errs[0].contains("smtp") && errs[0].contains("max_sise"), "{}", errs[0]);
}

#[test]
fn bad_value_names_its_key() {
    let errs = messages(parse_with("[delivery]\ntimeout = \"ten seconds\"\n", &[]));
    assert!(errs[0].contains("delivery.timeout"), "{}", errs[0]);
    let errs = messages(parse_with("[delivery]\nrate = \"10/fortnight\"\n", &[]));
    assert!(errs[0].contains("delivery.rate") && errs[0].contains("fortnight"), "{}", errs[0]);
}

#[test]
fn syntax_error_has_a_line() {
    let errs = messages(parse_with("[spool]\ndir = \"unclosed\n", &[]));
    assert_eq!(errs, ["mailhook.toml:2: invalid basic string, expected `\"`"]);
}

#[test]
fn every_syntax_error_is_reported_on_one_line_each() {
    let errs = messages(parse_with("[spool]\ndir = \"unclosed\n[smtp]\nlisten = [1,\n", &[]));
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(errs[0].starts_with("mailhook.toml:2: ") && errs[1].starts_with("mailhook.toml:4: "), "{errs:#?}");
    assert!(errs.iter().all(|e| !e.contains('\n')), "{errs:#?}");
}

#[test]
fn an_unknown_key_gives_file_line_key_and_the_nearest_valid_key() {
    let errs = messages(parse_with("[smtp]\nlisten = [\"127.0.0.1:25\"]\nmax_sise = \"1MB\"\n", &[]));
    assert_eq!(errs, ["mailhook.toml:3: smtp.max_sise: unknown key `max_sise` \u{2014} did you mean `max_size`?"]);
}

#[test]
fn an_unknown_key_like_no_valid_one_lists_them() {
    let errs = messages(parse_with("[admin]\ncolour = \"blue\"\n", &[]));
    assert_eq!(errs, ["mailhook.toml:2: admin.colour: unknown key `colour` (expected one of: listen, token, console)"]);
}

#[test]
fn an_unknown_value_suggests_the_nearest_valid_one() {
    let errs =
        messages(parse_with("[destination.hook]\ntype = \"kustomer-webhook\"\nurl = \"https://x.example/h\"\n", &[]));
    assert_eq!(
        errs,
        [
            "mailhook.toml:2: destination.hook.type: unknown value `kustomer-webhook` \u{2014} did you mean `kustomer-web-hook`?"
        ]
    );
}

#[test]
fn a_misspelt_required_key_is_reported_once() {
    let text = "[[imap]]\nname = \"a\"\nhst = \"localhost\"\nuser = \"u\"\npassword = \"p\"\n";
    let errs = messages(parse_with(text, &[]));
    assert_eq!(errs, ["mailhook.toml:3: imap[0].hst: unknown key `hst` \u{2014} did you mean `host`?"]);
}

#[test]
fn every_key_in_error_is_reported_at_once_with_its_line() {
    let text = r#"
[smtp]
listen = ["127.0.0.1:2525"]
max_sise = "1MB"

[destination.hook]
type = "kustomer-web-hook"
url = "https://x.example/hooks/web/1"
token = "${HOOK_TOKEN}"

[delivery]
timeout = "ten seconds"
concurrency = 0

[rules]
unmatched = "hook"
"#;
    let errs = messages(parse_with(text, &[]));
    assert_eq!(
        errs,
        [
            "mailhook.toml:4: smtp.max_sise: unknown key `max_sise` \u{2014} did you mean `max_size`?",
            "mailhook.toml:9: destination.hook.token: environment variable HOOK_TOKEN is not set",
            "mailhook.toml:12: delivery.timeout: invalid value: string \"ten seconds\", expected a duration",
            "mailhook.toml:13: delivery.concurrency: must be at least 1",
        ]
    );
}

#[test]
fn a_key_missing_from_its_table_is_reported_at_the_table() {
    let errs = messages(parse_with("\n[destination.hook]\ntype = \"webhook\"\n", &[]));
    assert_eq!(errs, ["mailhook.toml:2: destination.hook.url: is required for type \"webhook\""]);
}

#[test]
fn the_rules_are_located_despite_errors_elsewhere() {
    let text = "[rules]\ndir = \"r\"\n[destination.hook]\ntype = \"kustomer-webhook\"\n[smtp]\nlisten = 1\n";
    let env = |_: &str| None;
    let checked = Config::check_text(text, Path::new("m.toml"), Path::new("/etc/mailhook"), &env);
    assert_eq!(checked.errors.len(), 2, "{:#?}", checked.errors);
    let site = checked.rules.expect("rules located");
    assert_eq!(site.dir, Path::new("/etc/mailhook/r"));
    assert!(site.destinations.contains("hook"), "a destination in error is still declared");

    let text = "[rules]\ndir = \"r\"\nunmatched = \"nowhere\"\n";
    let checked = Config::check_text(text, Path::new("m.toml"), Path::new("/etc/mailhook"), &env);
    assert_eq!(checked.errors.len(), 1, "{:#?}", checked.errors);
    assert_eq!(checked.rules.expect("an unknown unmatched leaves the dir known").dir, Path::new("/etc/mailhook/r"));

    let text = "[rules]\ndri = \"r\"\n";
    let checked = Config::check_text(text, Path::new("m.toml"), Path::new("/etc/mailhook"), &env);
    assert!(checked.rules.is_none(), "a [rules] in error says nothing of where the rules are");
}

#[test]
fn semantic_errors_are_all_reported() {
    let text = r#"
[rules]
unmatched = "nowhere"
[smtp]
listen = ["not-an-address", "0.0.0.0:25"]
recipients = ['(unclosed']
auth = { users = { legacy = "pw" } }
[[imap]]
name = "a"
host = "imap.example.com"
tls = "none"
user = "u"
[destination.hook]
type = "kustomer-web-hook"
url = "https://x.example/hook"
path = "./x"
[destination.mail]
type = "kustomer-email-hook"
address = "not-an-address"
key = "k"
relay = "http://relay"
from = "a@b.example"
"#;
    let errs = messages(parse_with(text, &[]));
    let expect = [
        "rules.unmatched",
        "smtp.listen[0]",
        "smtp.recipients[0]: invalid regex",
        "smtp.auth: AUTH is only offered over TLS",
        "imap[0].tls",
        "imap[0].password",
        "destination.hook.path: is not used by type \"kustomer-web-hook\"",
        "destination.mail.relay",
        "destination.mail.address",
    ];
    for e in expect {
        assert!(errs.iter().any(|m| m.contains(e)), "missing {e:?} in {errs:#?}");
    }
    assert_eq!(errs.len(), expect.len(), "{errs:#?}");
}

#[test]
fn empty_config_has_defaults() {
    let c = parse_with("", &[]).unwrap();
    assert_eq!(c.rules.unmatched, "dead");
    assert_eq!(c.delivery.concurrency, 8);
    assert!(c.smtp.is_none());
}

#[test]
fn values_from_the_environment_are_masked_in_errors() {
    let errs = messages(parse_with(
        "[delivery]\nconcurrency = \"${SECRET}\"\n[admin]\nlisten = \"${SECRET2}\"\n",
        &[("SECRET", "hunter2-secret"), ("SECRET2", "pw-9876")],
    ));
    assert!(errs[0].contains("delivery.concurrency"), "{errs:?}");
    for e in &errs {
        assert!(!e.contains("hunter2-secret") && !e.contains("pw-9876"), "secret leaked: {e}");
    }
    let errs = messages(parse_with("[admin]\nlisten = \"${SECRET2}\"\n", &[("SECRET2", "pw-9876")]));
    assert!(errs[0].contains("admin.listen") && errs[0].contains("***"), "{errs:?}");
    let errs = messages(parse_with("[destination.d]\ntype = \"${T}\"\n", &[("T", "kustomer-secret")]));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].contains("destination.d.type: unknown value `***`") && !errs[0].contains("kustomer-secret"),
        "{errs:?}"
    );
}

#[test]
fn an_empty_admin_token_is_refused() {
    let errs = messages(parse_with("[admin]\ntoken = \"${ADMIN_TOKEN}\"\n", &[("ADMIN_TOKEN", "")]));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].contains("admin.token") && errs[0].contains("is empty"), "{errs:?}");
    assert!(parse_with("[admin]\ntoken = \"${ADMIN_TOKEN}\"\n", &[("ADMIN_TOKEN", "t0ken")]).is_ok());
}

#[test]
fn a_missing_key_is_named_with_its_type() {
    let errs = messages(parse_with(
        "[destination.hook]\ntype = \"kustomer-web-hook\"\nurl = \"https://x.example/hook\"\n",
        &[],
    ));
    assert_eq!(errs, ["mailhook.toml:1: destination.hook.token: is required for type \"kustomer-web-hook\""]);
    let errs = messages(parse_with("[destination.hook]\ntype = \"carrier-pigeon\"\n", &[]));
    assert!(errs[0].starts_with("mailhook.toml:2: destination.hook.type: unknown value `carrier-pigeon`"), "{errs:?}");
    let errs = messages(parse_with("[destination.out]\ntype = \"file\"\npath = \"x\"\ntimeout = \"soon\"\n", &[]));
    assert!(errs[0].contains("destination.out.timeout"), "{errs:?}");
}

fn email_hook(relay: &str, tls: Option<&str>) -> Result<Config, Vec<ConfigError>> {
    let tls = tls.map(|t| format!("tls = \"{t}\"\n")).unwrap_or_default();
    parse_with(
        &format!(
            "[destination.mail]\ntype = \"kustomer-email-hook\"\naddress = \"a@hooks.example\"\nkey = \"k\"\n\
             relay = \"{relay}\"\nfrom = \"m@example.com\"\n{tls}"
        ),
        &[],
    )
}

fn relay_tls(relay: &str, tls: Option<&str>) -> RelayTls {
    let c = email_hook(relay, tls).unwrap();
    let DestinationConfig::KustomerEmailHook(e) = &c.destination["mail"] else { panic!("type") };
    e.relay_tls().unwrap()
}

#[test]
fn relays_need_tls_unless_on_loopback_or_told_otherwise() {
    assert_eq!(relay_tls("smtp://smtp.example.com:587", None), RelayTls::Required);
    assert_eq!(relay_tls("smtp://192.0.2.1:587", None), RelayTls::Required);
    assert_eq!(relay_tls("smtps://smtp.example.com", None), RelayTls::Implicit);
    assert_eq!(relay_tls("smtp://smtp.example.com:465", Some("implicit")), RelayTls::Implicit);
    assert_eq!(relay_tls("smtp://127.0.0.1:25", None), RelayTls::Opportunistic);
    assert_eq!(relay_tls("smtp://localhost:25", None), RelayTls::Opportunistic);
    assert_eq!(relay_tls("smtp://[::1]:25", None), RelayTls::Opportunistic);
    assert_eq!(relay_tls("smtp://127.0.0.1:25", Some("starttls")), RelayTls::Required);
    assert_eq!(relay_tls("smtp://smtp.example.com:25", Some("none")), RelayTls::None);
    let errs = messages(email_hook("smtps://smtp.example.com", Some("none")));
    assert!(errs[0].contains("destination.mail.tls"), "{errs:?}");
}

#[test]
fn plaintext_choices_are_warned_about() {
    let c = email_hook("smtp://smtp.example.com:25", Some("none")).unwrap();
    assert_eq!(c.warnings().len(), 1);
    assert_eq!(c.warnings()[0].0, "destination.mail.tls");
    assert!(email_hook("smtp://127.0.0.1:25", Some("none")).unwrap().warnings().is_empty());
    assert!(email_hook("smtp://smtp.example.com:25", None).unwrap().warnings().is_empty());
    let open = parse_with("[smtp]\nlisten = [\"0.0.0.0:25\"]\nrecipients = ['.*']\n", &[]).unwrap();
    assert_eq!(open.warnings(), [("smtp.recipients".to_string(), open.warnings()[0].1.clone())]);
}

#[test]
fn tokens_over_http_are_refused_beyond_loopback() {
    let web = |url: &str| {
        parse_with(&format!("[destination.w]\ntype = \"kustomer-web-hook\"\nurl = \"{url}\"\ntoken = \"t\"\n"), &[])
    };
    assert!(messages(web("http://hooks.example.com/x"))[0].contains("destination.w.url: http:// would send the token"));
    assert!(web("http://127.0.0.1:8080/x").is_ok());
    assert!(web("http://localhost/x").is_ok());
    assert!(web("https://hooks.example.com/x").is_ok());
    let headers = "[destination.w]\ntype = \"webhook\"\nurl = \"http://ops.example.com/x\"\nheaders = { K = \"v\" }\n";
    assert!(messages(parse_with(headers, &[]))[0].contains("destination.w.url"));
    let form = "[destination.f]\ntype = \"kustomer-form-hook\"\nurl = \"http://ops.example.com/x\"\n";
    assert!(parse_with(form, &[]).is_ok(), "no secret, no refusal");
}

#[test]
fn an_open_listener_needs_recipients_written() {
    let errs = messages(parse_with("[smtp]\nlisten = [\"0.0.0.0:25\"]\n", &[]));
    assert!(errs[0].contains("smtp.recipients: is empty"), "{errs:?}");
    assert!(parse_with("[smtp]\nlisten = [\"127.0.0.1:25\"]\n", &[]).is_ok());
}

#[test]
fn the_spool_commands_need_only_spool_and_rules_variables() {
    let text = "[spool]\ndir = \"${SPOOL}\"\n[destination.w]\ntype = \"kustomer-web-hook\"\n\
                url = \"${URL}\"\ntoken = \"${TOKEN}\"\n";
    let env = |name: &str| (name == "SPOOL").then(|| "/var/spool/mh".to_string());
    let c = Config::check_text_with(text, Path::new("m.toml"), Path::new("/"), &env, &["spool", "rules"])
        .into_result()
        .unwrap();
    assert_eq!(c.spool.dir, PathBuf::from("/var/spool/mh"));
    assert!(c.destination.contains_key("w"));
    let none = |_: &str| None;
    let errs = Config::check_text_with(text, Path::new("m.toml"), Path::new("/"), &none, &["spool", "rules"])
        .into_result()
        .unwrap_err();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].key, "spool.dir");
}

#[test]
fn cluster_reads_the_url_and_lease_and_hides_the_password() {
    let text = "[cluster]\npostgres = \"postgres://hook:${PGPASS}@127.0.0.1:5432/mailhook\"\nlease = \"45s\"\n";
    let config = parse_with(text, &[("PGPASS", "pa:ss@word")]).unwrap();
    let cluster = config.cluster.as_ref().unwrap();
    assert_eq!(cluster.lease, Duration::from_secs(45));
    assert_eq!(cluster.postgres.password(), Some("pa:ss@word"));
    assert_eq!(cluster.postgres.to_string(), "postgres://hook:***@127.0.0.1:5432/mailhook");
    assert!(!format!("{config:?}").contains("pa:ss@word"), "Debug shows the password");
    assert!(config.secrets().iter().any(|s| s.expose() == "pa:ss@word"), "the password is redacted from logs");
    let defaults = parse_with("[cluster]\npostgres = \"postgres://hook@127.0.0.1/mailhook\"\n", &[]).unwrap();
    assert_eq!(defaults.cluster.unwrap().lease, Duration::from_secs(30));
    assert!(parse_with("", &[]).unwrap().cluster.is_none(), "no [cluster], no database");
}

#[test]
fn cluster_refuses_a_password_written_in_the_file() {
    let text = "[spool]\ndir = \"./spool\"\n\n[cluster]\npostgres = \"postgres://hook:hunter22@127.0.0.1/mailhook\"\n";
    let errors = messages(parse_with(text, &[]));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].starts_with("mailhook.toml:5: cluster.postgres: writes the password in the file"), "{errors:?}");
    assert!(!errors[0].contains("hunter22"), "{errors:?}");
}

#[test]
fn cluster_to_a_remote_host_needs_tls_or_says_plaintext() {
    let text = "[cluster]\npostgres = \"postgres://hook:${PGPASS}@db.example.com/mailhook\"\nlease = \"1s\"\n";
    let errors = messages(parse_with(text, &[("PGPASS", "sekrit-pass")]));
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].starts_with(
            "mailhook.toml:2: cluster.postgres: would send the password to \"db.example.com\" without TLS"
        ),
        "{errors:?}"
    );
    assert!(errors[1].starts_with("mailhook.toml:3: cluster.lease: must be at least 2s"), "{errors:?}");
    assert!(!errors.join(" ").contains("sekrit-pass"));
    let tls = "[cluster]\npostgres = \"postgres://hook:${PGPASS}@db.example.com/mailhook?sslmode=require\"\n";
    let config = parse_with(tls, &[("PGPASS", "x")]).unwrap();
    assert!(config.warnings().is_empty());
    let plain = "[cluster]\npostgres = \"postgres://hook:${PGPASS}@db.example.com/mailhook?sslmode=disable\"\n";
    let config = parse_with(plain, &[("PGPASS", "x")]).unwrap();
    let warnings = config.warnings();
    assert_eq!(warnings.len(), 1);
    assert_eq!(warnings[0].0, "cluster.postgres");
    let typo = "[cluster]\npostgres = \"postgres://hook@127.0.0.1/m\"\nleese = \"30s\"\n";
    let errors = messages(parse_with(typo, &[]));
    assert!(errors[0].contains("cluster.leese") && errors[0].contains("lease"), "{errors:?}");
}

//! `mailhook queue` and `mailhook replay`: look at the spool and act on it. They work on the
//! files directly, so they can be used while `serve` runs (which picks changes up within a
//! second) or while it is stopped.

use super::Exit;
use crate::config::Config;
use crate::model::Action;
use crate::parse::parse;
use crate::pipeline::Replayed;
use crate::rules::{RuleSet, load_rules};
use crate::spool::{Meta, Spool, SpoolError, State, check_id};
use serde_json::{Value as Json, json};
use std::path::Path;
use std::time::SystemTime;

fn rules(config: &Config) -> Result<RuleSet, Exit> {
    load_rules(config).map_err(|errors| {
        super::print_rule_errors(&errors);
        Exit::Config
    })
}

/// Refuses any id that is not a ULID before anything is opened: an id is made into a path.
fn check_ids<S: AsRef<str>>(ids: &[S]) -> Result<(), Exit> {
    let mut exit = Ok(());
    for id in ids {
        if let Err(e) = check_id(id.as_ref()) {
            eprintln!("{e}");
            exit = Err(Exit::Usage);
        }
    }
    exit
}

/// One line of `queue list`.
fn summary(state: State, meta: &Meta, now: SystemTime) -> Json {
    let (rule, destinations) = match &meta.decision {
        Some(d) => (
            d.rule.clone(),
            d.destinations
                .iter()
                .map(|(n, s)| format!("{n}:{}", format!("{:?}", s.state).to_lowercase()))
                .collect::<Vec<_>>()
                .join(","),
        ),
        // Dead when judged: the rule that matched but could not build its payload, if any.
        None => (meta.dead_rule.clone(), String::new()),
    };
    json!({
        "id": meta.id,
        "state": state.dir_name(),
        "age_seconds": meta.age(now).as_secs(),
        "received_at": meta.envelope.received_at,
        "source": meta.envelope.source.to_string(),
        "attempts": meta.attempts,
        "rule": rule,
        "destinations": destinations,
        "next_attempt": meta.next_attempt,
        "last_error": meta.dead_reason.clone().or(meta.last_error.clone()),
    })
}

fn age(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

pub fn list(config_path: &Path, as_json: bool) -> Exit {
    let (_, spool) = match super::open_spool(config_path) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let now = SystemTime::now();
    let mut rows = Vec::new();
    for state in State::ALL {
        let ids = match spool.list(state) {
            Ok(ids) => ids,
            Err(e) => {
                eprintln!("{e}");
                return Exit::TempFail;
            }
        };
        for id in ids {
            match spool.read_meta(state, &id) {
                Ok(meta) => rows.push(summary(state, &meta, now)),
                Err(SpoolError::NotFound(_)) => {}
                Err(e) => eprintln!("{id}: {e}"),
            }
        }
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&rows).expect("JSON serialises"));
        return Exit::Ok;
    }
    if rows.is_empty() {
        println!("the spool is empty");
        return Exit::Ok;
    }
    println!(
        "{:<26}  {:<8}  {:>6}  {:>3}  {:<24}  {:<28}  LAST ERROR",
        "ID", "STATE", "AGE", "TRY", "RULE", "DESTINATIONS"
    );
    for r in &rows {
        let s = |k: &str| r[k].as_str().unwrap_or("-").to_string();
        let mut err = s("last_error");
        if err.chars().count() > 80 {
            err = err.chars().take(79).collect::<String>() + "…";
        }
        println!(
            "{:<26}  {:<8}  {:>6}  {:>3}  {:<24}  {:<28}  {}",
            s("id"),
            s("state"),
            age(r["age_seconds"].as_u64().unwrap_or(0)),
            r["attempts"],
            s("rule"),
            if s("destinations").is_empty() { "-".into() } else { s("destinations") },
            err
        );
    }
    println!("{} message{}", rows.len(), if rows.len() == 1 { "" } else { "s" });
    Exit::Ok
}

fn find(spool: &Spool, id: &str) -> Result<(State, Meta), Exit> {
    let state = match spool.lookup(id) {
        Ok(Some(state)) => state,
        Ok(None) => {
            eprintln!("{id}: not in the spool");
            return Err(Exit::DataErr);
        }
        Err(e) => {
            eprintln!("{id}: {e}");
            return Err(Exit::TempFail);
        }
    };
    spool.read_meta(state, id).map(|m| (state, m)).map_err(|e| {
        eprintln!("{id}: {e}");
        Exit::DataErr
    })
}

pub fn show(config_path: &Path, id: &str, as_json: bool) -> Exit {
    if let Err(code) = check_ids(&[id]) {
        return code;
    }
    let (config, spool) = match super::open_spool(config_path) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let (state, meta) = match find(&spool, id) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let raw = spool.read_raw(id).unwrap_or_default();
    let header_end =
        raw.windows(4).position(|w| w == b"\r\n\r\n").or_else(|| raw.windows(2).position(|w| w == b"\n\n"));
    let headers = String::from_utf8_lossy(&raw[..header_end.unwrap_or(raw.len())]).replace("\r\n", "\n");

    // The payload that would be sent: the stored decision's, or what the current rules say.
    let (payload, judged_now) = match &meta.decision {
        Some(d) => (Some(d.payload.clone()), false),
        None => match rules(&config) {
            Ok(rules) => (Some(rules.evaluate(&parse(&raw), &meta.envelope).payload), true),
            Err(_) => (None, true),
        },
    };
    if as_json {
        let out = json!({"state": state.dir_name(), "meta": meta, "payload": payload, "headers": headers});
        println!("{}", serde_json::to_string_pretty(&out).expect("JSON serialises"));
        return Exit::Ok;
    }
    let now = SystemTime::now();
    println!("id:          {id}");
    println!("state:       {state}");
    println!(
        "received:    {} ({} ago) via {}",
        meta.envelope.received_at,
        age(meta.age(now).as_secs()),
        meta.envelope.source
    );
    println!(
        "envelope:    from <{}> to {}",
        meta.envelope.mail_from.as_deref().unwrap_or(""),
        meta.envelope.recipients.join(", ")
    );
    println!("size:        {} bytes", meta.size);
    println!("attempts:    {}", meta.attempts);
    if let Some(next) = &meta.next_attempt {
        println!("next try:    {next}");
    }
    if let Some(d) = &meta.decision {
        println!("rule:        {} (decided {})", d.rule.as_deref().unwrap_or("(none: unmatched)"), d.decided_at);
        for (name, s) in &d.destinations {
            println!(
                "  {name}: {}, {} attempt{}{}",
                format!("{:?}", s.state).to_lowercase(),
                s.attempts,
                if s.attempts == 1 { "" } else { "s" },
                s.last_error.as_deref().map(|e| format!(", last error: {e}")).unwrap_or_default()
            );
        }
    }
    if let Some(e) = &meta.last_error {
        println!("last error:  {e}");
    }
    if let Some(r) = &meta.dead_reason {
        println!("dead:        {r}");
    }
    if let Some(p) = payload {
        println!(
            "\npayload ({}):\n{}",
            if judged_now { "as the current rules would build it" } else { "as decided" },
            serde_json::to_string_pretty(&p.to_json()).expect("JSON serialises")
        );
    }
    println!("\nheaders:\n{}", headers.trim_end());
    Exit::Ok
}

/// `queue retry`: a dead letter goes back in line (destinations that failed are tried again;
/// one never judged is judged again); a deferred message becomes due now.
///
/// A message that died when it was judged (no rule matched, a required field missing) would
/// die again for the same reason: unless `force`, it is judged with the current rules first,
/// and left where it is, with the reason, when they still reject it.
pub fn retry(config_path: &Path, ids: &[String], all_dead: bool, force: bool) -> Exit {
    if let Err(code) = check_ids(ids) {
        return code;
    }
    let (config, spool) = match super::open_spool(config_path) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let ids = match targets(&spool, ids, all_dead) {
        Ok(ids) => ids,
        Err(code) => return code,
    };
    let mut current_rules = None;
    each_message(&spool, ids, |id, state, mut meta| {
        if state == State::Incoming {
            println!("{id}: already waiting to be judged");
            return Step::Skip(Exit::Ok);
        }
        if meta.decision.is_none() && !force {
            if current_rules.is_none() {
                match rules(&config) {
                    Ok(r) => current_rules = Some(r),
                    Err(code) => return Step::Skip(code),
                }
            }
            let rules = current_rules.as_ref().expect("loaded above");
            let raw = match spool.read_raw(id) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("{id}: {e}");
                    return Step::Skip(Exit::DataErr);
                }
            };
            if let Action::Dead { reason } = rules.evaluate(&parse(&raw), &meta.envelope).action {
                eprintln!(
                    "{id}: not queued: the rules still reject it ({reason}); edit the rule, then \
                     `mailhook replay {id}`, or queue it as it is with `queue retry --force`"
                );
                return Step::Skip(Exit::Failed);
            }
        }
        let to = crate::spool::actions::requeue(&mut meta);
        Step::Move(to, Box::new(meta), format!("{id}: queued for delivery now"))
    })
}

/// What `retry` or `replay` does with one message.
enum Step {
    Move(State, Box<Meta>, String),
    Remove(String),
    Skip(Exit),
}

/// Runs `decide` on each message (refusing those being delivered right now) and carries out
/// what it says; returns the worst exit code.
fn each_message(spool: &Spool, ids: Vec<String>, mut decide: impl FnMut(&str, State, Meta) -> Step) -> Exit {
    let mut exit = Exit::Ok;
    for id in ids {
        let (state, meta) = match find(spool, &id) {
            Ok(x) => x,
            Err(code) => {
                exit = exit.max(code);
                continue;
            }
        };
        if state == State::Active {
            eprintln!("{id}: being delivered right now; try again in a moment");
            exit = exit.max(Exit::Failed);
            continue;
        }
        let (result, line) = match decide(&id, state, meta) {
            Step::Move(to, meta, line) => (spool.transition_blocking(&id, state, to, Some(meta.as_ref())), line),
            Step::Remove(line) => (spool.remove_blocking(&id, state), line),
            Step::Skip(code) => {
                exit = exit.max(code);
                continue;
            }
        };
        match result {
            Ok(()) => println!("{line}"),
            Err(e) => {
                eprintln!("{id}: {e}");
                exit = exit.max(Exit::TempFail);
            }
        }
    }
    exit
}

pub fn drop(config_path: &Path, ids: &[String]) -> Exit {
    if let Err(code) = check_ids(ids) {
        return code;
    }
    let (_, spool) = match super::open_spool(config_path) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let mut exit = Exit::Ok;
    for id in ids {
        let state = match spool.lookup(id) {
            Ok(Some(State::Active)) => {
                eprintln!("{id}: being delivered right now; try again in a moment");
                exit = exit.max(Exit::Failed);
                continue;
            }
            Ok(Some(s)) => s,
            Ok(None) => {
                eprintln!("{id}: not in the spool");
                exit = exit.max(Exit::DataErr);
                continue;
            }
            Err(e) => {
                eprintln!("{id}: {e}");
                exit = exit.max(Exit::TempFail);
                continue;
            }
        };
        match spool.remove_blocking(id, state) {
            Ok(()) => println!("{id}: dropped from {state}"),
            Err(e) => {
                eprintln!("{id}: {e}");
                exit = exit.max(Exit::TempFail);
            }
        }
    }
    exit
}

fn targets(spool: &Spool, ids: &[String], all_dead: bool) -> Result<Vec<String>, Exit> {
    if all_dead {
        spool.list(State::Dead).map_err(|e| {
            eprintln!("{e}");
            Exit::TempFail
        })
    } else if ids.is_empty() {
        eprintln!("name message ids, or --all-dead / --dead");
        Err(Exit::Usage)
    } else {
        Ok(ids.to_vec())
    }
}

/// `replay`: judge stored messages again with the current rules, and queue them accordingly:
/// the new decision replaces the old one (every destination of it is pending again).
pub fn replay(config_path: &Path, ids: &[String], dead: bool) -> Exit {
    if let Err(code) = check_ids(ids) {
        return code;
    }
    let (config, spool) = match super::open_spool(config_path) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let rules = match rules(&config) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let ids = match targets(&spool, ids, dead) {
        Ok(ids) => ids,
        Err(code) => return code,
    };
    each_message(&spool, ids, |id, _state, mut meta| {
        let raw = match spool.read_raw(id) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("{id}: {e}");
                return Step::Skip(Exit::DataErr);
            }
        };
        let name = |rule: &Option<String>| rule.clone().unwrap_or_else(|| "(no rule)".into());
        match crate::pipeline::rejudge(&rules, &raw, &mut meta) {
            (Some(to), Replayed::Queued { rule, to: dests }) => {
                Step::Move(to, Box::new(meta), format!("{id}: rule {} → {}", name(&rule), dests.join(", ")))
            }
            (Some(to), Replayed::StillDead(reason)) => {
                Step::Move(to, Box::new(meta), format!("{id}: still a dead letter: {reason}"))
            }
            (_, Replayed::Dropped(rule)) => Step::Remove(format!("{id}: rule {} drops it; removed", name(&rule))),
            (None, _) => Step::Remove(format!("{id}: removed")),
        }
    })
}

/// How a message left the first stage of its delivery, as [`wait`] saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// Gone from the spool: every destination took it (or a rule dropped it).
    Delivered,
    /// Some destination is to be tried again later.
    Deferred(String),
    /// A dead letter, with the reason.
    Dead(String),
    /// Still waiting to be judged or sent when the time was up.
    Pending(State),
}

/// Waits until each of `ids` has been judged and tried once by the running `serve` (it is
/// gone, deferred or dead), or `timeout` has passed; prints one line per message
/// (`ID delivered`, `ID dead: reason`, ...). Exit 0 when every one was delivered, 1 when one
/// is deferred or dead, 75 when the time ran out first (is `serve` running?).
pub fn wait(spool: &Spool, ids: &[String], timeout: std::time::Duration) -> Exit {
    let deadline = std::time::Instant::now() + timeout;
    let mut exit = Exit::Ok;
    for id in ids {
        let settled = loop {
            // A spool that cannot be read now (the cluster's database away) says nothing yet.
            let state = spool.lookup(id).unwrap_or(Some(State::Incoming));
            let settled = match state {
                None => Some(Settled::Delivered),
                Some(State::Dead) => Some(Settled::Dead(
                    spool.read_meta(State::Dead, id).ok().and_then(|m| m.dead_reason).unwrap_or_default(),
                )),
                Some(State::Deferred) => Some(Settled::Deferred(
                    spool
                        .read_meta(State::Deferred, id)
                        .ok()
                        .and_then(|m| m.last_error.or(m.next_attempt.map(|t| format!("next attempt at {t}"))))
                        .unwrap_or_default(),
                )),
                Some(s) => (std::time::Instant::now() >= deadline).then_some(Settled::Pending(s)),
            };
            match settled {
                Some(s) => break s,
                None => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        };
        match settled {
            Settled::Delivered => println!("{id} delivered"),
            Settled::Deferred(why) => {
                println!("{id} deferred: {why}");
                exit = exit.max(Exit::Failed);
            }
            Settled::Dead(why) => {
                println!("{id} dead: {why}");
                exit = exit.max(Exit::Failed);
            }
            Settled::Pending(state) => {
                println!("{id} still {state} after {}s: is `mailhook serve` running?", timeout.as_secs());
                exit = exit.max(Exit::TempFail);
            }
        }
    }
    exit
}

/// `queue wait`: waits for the named messages, or for every message that is waiting for its
/// first judgement or being delivered right now (`incoming`, `active`).
pub fn wait_command(config_path: &Path, ids: &[String], timeout: std::time::Duration) -> Exit {
    let (_, spool) = match super::open_spool(config_path) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let ids = if ids.is_empty() {
        let mut all = Vec::new();
        for state in [State::Incoming, State::Active] {
            match spool.list(state) {
                Ok(ids) => all.extend(ids),
                Err(e) => {
                    eprintln!("{e}");
                    return Exit::TempFail;
                }
            }
        }
        all
    } else {
        ids.to_vec()
    };
    wait(&spool, &ids, timeout)
}

//! Arbitrary client input to one SMTP or LMTP session: the real state machine
//! (`mailhook::ingest::smtp::Session`) over an in-memory duplex stream, with a real spool in a
//! temporary directory.
//!
//! Input layout: byte 0 chooses the configuration (bit 0 LMTP, bit 1 AUTH users configured,
//! bit 2 AUTH required, bit 3 a 200-octet `max_size`, bit 4 a remote (non-loopback) peer, bit 5
//! any recipient accepted); byte 1 seeds how the rest is cut into writes (0: one write), so that
//! commands, DATA and BDAT also arrive split at every possible place; the rest is what the
//! client sends, after which it closes its side.
//!
//! Checked after every session: it ended (on its own, within seconds of the client closing), and
//! not by a timeout or a shutdown nobody asked for; everything the server wrote is a sequence of
//! well-formed replies (`ddd-text` / `ddd text` lines ending in CRLF, one code per reply, the
//! first one `220`, a `221` last after QUIT, `421` last after too many errors); every message
//! acknowledged with "queued as ID" is in the spool, nothing else is, and nothing half-written
//! is left in `tmp/`. Input cut into several writes is also run as one write: the end, the
//! reply codes and the messages stored must be the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailhook::config::Secret;
use mailhook::ingest::smtp::{End, Session, SessionConfig};
use mailhook::spool::Inbox;
use mailhook::spool::{Spool, SpoolOptions, State};
use regex::Regex;
use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;
use tokio::sync::watch;

struct World {
    runtime: Runtime,
    spool: Spool,
    _dir: tempfile::TempDir,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let spool =
            Spool::open(&dir.path().join("spool"), SpoolOptions { fsync: false, keep_raw: false }).expect("spool");
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        World { runtime, spool, _dir: dir }
    })
}

fn config(flags: u8) -> SessionConfig {
    SessionConfig {
        lmtp: flags & 1 != 0,
        hostname: "mx.test".into(),
        max_size: if flags & 8 != 0 { 200 } else { 10_000 },
        recipients: if flags & 32 != 0 { Vec::new() } else { vec![Regex::new(r"@hooks\.example$").unwrap()] },
        allow: vec!["0.0.0.0/0".parse().unwrap()],
        tls: None,
        auth_users: (flags & 2 != 0).then(|| [("legacy".to_string(), Secret::new("pa55word"))].into_iter().collect()),
        auth_required: flags & 4 != 0,
        max_connections: 10,
        max_recipients: 3,
        max_connections_per_ip: 10,
        command_timeout: Duration::from_secs(10),
        data_timeout: Duration::from_secs(10),
        min_data_rate: 500,
        auth_max_failures: 3,
        // No wait between failed AUTHs: the fuzzer runs sessions back to back.
        auth_failure_delay: Duration::ZERO,
        auth_failures_per_minute: usize::MAX,
        clients: Default::default(),
        metrics: mailhook::metrics::Metrics::new(),
    }
}

/// Cuts `input` into writes of 1 to 97 octets, following a small generator seeded by `seed`.
fn chunks(input: &[u8], seed: u8) -> Vec<&[u8]> {
    if seed == 0 {
        return vec![input];
    }
    let mut state = u32::from(seed);
    let mut out = Vec::new();
    let mut rest = input;
    while !rest.is_empty() {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let n = (1 + (state >> 16) as usize % 97).min(rest.len());
        let (head, tail) = rest.split_at(n);
        out.push(head);
        rest = tail;
    }
    out
}

/// Checks the server's output is a sequence of well-formed replies; returns their codes and
/// the spool ids named in them.
fn replies(out: &[u8]) -> (Vec<u16>, Vec<String>) {
    assert!(out.ends_with(b"\r\n"), "the output ends with CRLF: {:?}", String::from_utf8_lossy(out));
    let mut codes = Vec::new();
    let mut ids: Vec<String> = Vec::new();
    let mut open: Option<u16> = None;
    for line in out.split_inclusive(|&b| b == b'\n') {
        let line = line
            .strip_suffix(b"\r\n")
            .unwrap_or_else(|| panic!("a bare LF in a reply: {:?}", String::from_utf8_lossy(out)));
        let text = std::str::from_utf8(line).unwrap_or_else(|_| panic!("a reply that is not UTF-8: {line:?}"));
        assert!(!text.contains('\r'), "a bare CR in a reply: {text:?}");
        let code: u16 = text.get(..3).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no reply code: {text:?}"));
        assert!((200..600).contains(&code), "reply code {code} in {text:?}");
        if let Some(previous) = open {
            assert_eq!(previous, code, "one code per multi-line reply: {text:?}");
        }
        match text.as_bytes().get(3) {
            Some(b'-') => open = Some(code),
            Some(b' ') => {
                open = None;
                codes.push(code);
            }
            _ => panic!("a reply line is `ddd text` or `ddd-text`: {text:?}"),
        }
        // LMTP names the same id once per recipient.
        if let Some((_, id)) = text.split_once("queued as ")
            && ids.last().is_none_or(|last| last != id)
        {
            ids.push(id.to_string());
        }
    }
    assert!(open.is_none(), "the last reply is complete: {:?}", String::from_utf8_lossy(out));
    (codes, ids)
}

/// What one session did: how it ended, the reply codes, and the messages stored, in the order
/// they were acknowledged.
struct Run {
    end: End,
    codes: Vec<u16>,
    stored: Vec<Vec<u8>>,
}

/// Runs one session on `input` cut by `seed` (0: one write through a pipe large enough for all
/// of it, so the session reads it at once), checks what can be checked of it alone, and
/// empties the spool again.
fn session(flags: u8, seed: u8, input: &[u8]) -> Run {
    let world = world();
    let cfg = Arc::new(config(flags));
    let peer = if flags & 16 != 0 { "192.0.2.7:5000" } else { "127.0.0.1:40000" };
    let (end, out) = world.runtime.block_on(async {
        // Cut input goes through a small pipe, so that reads on the server side are partial too.
        let pipe = if seed == 0 { 1 << 20 } else { 64 + usize::from(seed) };
        let (client, server) = tokio::io::duplex(pipe);
        let (_shutdown, rx) = watch::channel(false);
        let session =
            Session::new(cfg, world.spool.clone(), Arc::new(Inbox::default()), rx, server, peer.parse().unwrap());
        let server = tokio::spawn(session.run());
        let (mut read, mut write) = tokio::io::split(client);
        let reader = tokio::spawn(async move {
            let mut out = Vec::new();
            let _ = read.read_to_end(&mut out).await;
            out
        });
        for chunk in chunks(input, seed) {
            if write.write_all(chunk).await.is_err() {
                break; // the server has closed: the rest is not read
            }
            tokio::task::yield_now().await;
        }
        let _ = write.shutdown().await;
        let end = tokio::time::timeout(Duration::from_secs(30), server)
            .await
            .expect("the session ends once the client has closed")
            .expect("the session task completes");
        drop(write);
        (end, reader.await.expect("reader"))
    });

    assert!(matches!(end, End::Quit | End::Closed | End::TooManyErrors), "ended by {end:?}");
    let (codes, ids) = replies(&out);
    assert_eq!(codes.first(), Some(&220), "the greeting comes first");
    match end {
        End::Quit => assert_eq!(codes.last(), Some(&221), "QUIT is answered last"),
        End::TooManyErrors => assert_eq!(codes.last(), Some(&421), "too many errors: 421 last"),
        _ => {}
    }

    let spool = &world.spool;
    let listed: BTreeSet<String> = spool.list(State::Incoming).expect("list").into_iter().collect();
    assert_eq!(listed, ids.iter().cloned().collect(), "the messages acknowledged are exactly those in the spool");
    let tmp = std::fs::read_dir(spool.dir().join("tmp")).expect("tmp").count();
    assert_eq!(tmp, 0, "nothing half-written is left in tmp/");
    let stored = ids.iter().map(|id| spool.read_raw(id).expect("stored message")).collect();
    for id in &ids {
        spool.remove_blocking(id, State::Incoming).expect("clean up");
    }
    Run { end, codes, stored }
}

fuzz_target!(|data: &[u8]| {
    let (flags, seed, input) = match data {
        [flags, seed, rest @ ..] => (*flags, *seed, rest),
        _ => return,
    };
    let cut = session(flags, seed, input);
    if seed != 0 {
        // However the input is cut into reads, the session must do the same.
        let whole = session(flags, 0, input);
        assert_eq!(cut.end, whole.end, "the same end however the input is cut");
        assert_eq!(cut.codes, whole.codes, "the same replies however the input is cut");
        assert_eq!(cut.stored, whole.stored, "the same messages stored however the input is cut");
    }
});

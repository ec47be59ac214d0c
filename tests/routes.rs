//! One email, one payload, whatever the route: every fixture is sent over SMTP and LMTP the
//! way `curl -T` and Postfix's lmtp client send a file (its bytes as they are, dot-stuffed,
//! then `<CRLF>.<CRLF>`), piped to `mailhook ingest`, and run through `mailhook try`; the four
//! payloads must be identical apart from `source`, `id` and `receivedAt`.

mod support;

use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use support::gateway::{BIN, Gateway};

const CONFIG: &str = "[smtp]\nlisten = [\"127.0.0.1:0\"]\nrecipients = ['@example\\.com$']\n\n\
                      [lmtp]\nlisten = [\"127.0.0.1:0\"]\nrecipients = ['@example\\.com$']\n\n\
                      [rules]\ndir = \"rules\"\nunmatched = \"all\"\n\n\
                      [destination.all]\ntype = \"file\"\npath = \"out/all.jsonl\"\n";

/// Every mail goes to `all`: the payload is the default one, built from the parsed email.
const RULES: &str = "[[rule]]\nname = \"everything\"\nto = [\"all\"]\n\n[rule.when]\nsubject = '(?s).*'\n";

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "eml"))
        .collect();
    files.sort();
    files
}

/// A reply: its code and its last line.
fn reply(reader: &mut BufReader<TcpStream>) -> (u16, String) {
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.len() >= 4, "short reply {line:?}");
        if line.as_bytes()[3] == b' ' {
            return (line[..3].parse().unwrap(), line.trim_end().to_string());
        }
    }
}

/// Sends `raw` as `curl -T` does over SMTP (`lmtp`: over LMTP); returns the spool id.
fn send(addr: SocketAddr, lmtp: bool, raw: &[u8]) -> String {
    let stream = TcpStream::connect(addr).unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    let say = |w: &mut TcpStream, r: &mut BufReader<TcpStream>, line: &str, want: u16| {
        w.write_all(line.as_bytes()).unwrap();
        let (code, text) = reply(r);
        assert_eq!(code, want, "{line:?} → {text}");
        text
    };
    assert_eq!(reply(&mut r).0, 220);
    say(&mut w, &mut r, if lmtp { "LHLO client.test\r\n" } else { "EHLO client.test\r\n" }, 250);
    say(&mut w, &mut r, "MAIL FROM:<sender@example.org>\r\n", 250);
    say(&mut w, &mut r, "RCPT TO:<hook@example.com>\r\n", 250);
    say(&mut w, &mut r, "DATA\r\n", 354);
    // The file's bytes as they are (bare LF stays bare LF), a dot at the start of a line doubled.
    let mut data = Vec::with_capacity(raw.len() + 8);
    let mut line_start = true;
    for &b in raw {
        if line_start && b == b'.' {
            data.push(b'.');
        }
        data.push(b);
        line_start = b == b'\n';
    }
    data.extend_from_slice(b"\r\n.\r\n");
    w.write_all(&data).unwrap();
    let (code, text) = reply(&mut r);
    assert_eq!(code, 250, "{text}");
    let _ = w.write_all(b"QUIT\r\n");
    text.rsplit(' ').next().unwrap().to_string()
}

fn run(gw: &Gateway, args: &[&str], input: &[u8]) -> String {
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(gw.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The payload without what differs by route and by run.
fn comparable(mut payload: Value) -> Value {
    let object = payload.as_object_mut().expect("a payload object");
    for key in ["source", "id", "receivedAt"] {
        object.remove(key);
    }
    payload
}

#[test]
fn every_fixture_gives_one_payload_over_smtp_lmtp_ingest_and_try() {
    let mut gw = Gateway::new(CONFIG, RULES);
    gw.start();
    let smtp = gw.listening("smtp");
    let lmtp = gw.listening("lmtp");
    let files = fixtures();
    assert!(files.len() >= 30, "the fixtures are gone");
    let mut ids: Vec<[String; 3]> = Vec::new();
    for file in &files {
        let raw = std::fs::read(file).unwrap();
        let by_smtp = send(smtp, false, &raw);
        let by_lmtp = send(lmtp, true, &raw);
        let by_pipe = run(&gw, &["ingest", "--config", "mailhook.toml", "--to", "hook@example.com"], &raw);
        ids.push([by_smtp, by_lmtp, by_pipe.trim().to_string()]);
    }
    let all: Vec<&str> = ids.iter().flatten().map(String::as_str).collect();
    let waited = Command::new(BIN)
        .args(["queue", "wait", "--config", "mailhook.toml"])
        .args(&all)
        .current_dir(gw.path())
        .output()
        .unwrap();
    assert!(waited.status.success(), "{}", String::from_utf8_lossy(&waited.stdout));
    let delivered: std::collections::HashMap<String, Value> = std::fs::read_to_string(gw.path().join("out/all.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|v| (v["id"].as_str().unwrap().to_string(), v))
        .collect();
    for (file, [by_smtp, by_lmtp, by_pipe]) in files.iter().zip(&ids) {
        let name = file.display().to_string();
        let tried: Value = serde_json::from_str(&run(&gw, &["try", "--config", "mailhook.toml", &name], b"")).unwrap();
        let expected = comparable(tried["payload"].clone());
        assert_eq!(delivered[by_smtp]["source"], "smtp");
        assert_eq!(delivered[by_lmtp]["source"], "lmtp");
        assert_eq!(delivered[by_pipe]["source"], "stdin");
        for (route, id) in [("SMTP", by_smtp), ("LMTP", by_lmtp), ("ingest", by_pipe)] {
            assert_eq!(comparable(delivered[id].clone()), expected, "{name}: {route} and try disagree");
        }
    }
    assert_eq!(gw.stop(), 0);
}

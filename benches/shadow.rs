//! How long a shadow run takes over a large archive: `SHADOW_MESSAGES` (default 100,000)
//! messages, the `fixtures/*.eml` in turn, are written to a fresh SQLite archive through the
//! store's API; then `lifecycle::shadow::run` (what `mailhook shadow` and a reload run) judges
//! every one of them with `rules/` and with a copy of `rules/` in which one rule is edited
//! (the UPS rule's tracking number pattern), and the time is printed as one table row.
//!
//! ```text
//! cargo bench --bench shadow          # or scripts/bench-shadow, which adds the machine line
//! SHADOW_MESSAGES=10000 cargo bench --bench shadow
//! ```

use mailhook::lifecycle::shadow::{self, Scope};
use mailhook::model::{Envelope, Source};
use mailhook::rules::{RuleSet, Unmatched};
use mailhook::store::sqlite::SqliteArchive;
use mailhook::store::{Archive, ArchiveState, ArchivedMessage, Entry};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

fn main() {
    // `cargo bench` passes `--bench`; nothing else is read from the command line.
    let n: usize = std::env::var("SHADOW_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut fixtures: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(root.join("fixtures"))
        .expect("fixtures/")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "eml"))
        .map(|p| {
            let raw = std::fs::read(&p).expect("read a fixture");
            (p, raw)
        })
        .collect();
    fixtures.sort();
    assert!(!fixtures.is_empty(), "no fixtures/*.eml");

    let dir = tempfile::tempdir().expect("temp dir");
    let archive = SqliteArchive::open(&dir.path().join("archive.db")).expect("open the archive");
    let started = Instant::now();
    let base = SystemTime::now() - Duration::from_secs(3600);
    let mut batch = Vec::with_capacity(1000);
    let mut bytes = 0u64;
    for i in 0..n {
        let (_, raw) = &fixtures[i % fixtures.len()];
        let at = base + Duration::from_millis(i as u64);
        let ms = at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as u64;
        let mut envelope = Envelope::new(Source::Smtp);
        envelope.id = ulid::Ulid::from_parts(ms, i as u128).to_string();
        envelope.recipients = vec!["shipping@shop.example.com".into()];
        bytes += raw.len() as u64;
        let m = ArchivedMessage::build(ArchiveState::Delivered, envelope, raw.clone(), None, None, vec![], None, at);
        batch.push(Entry::Message(Box::new(m)));
        if batch.len() == 1000 {
            archive.write_batch(&batch).expect("write the archive");
            batch.clear();
        }
    }
    archive.write_batch(&batch).expect("write the archive");
    let filled = started.elapsed();

    let live = RuleSet::load_dir(&root.join("rules"), Unmatched::Dead).expect("rules/ loads");
    let edited_dir = dir.path().join("rules.new");
    copy_edited(&root.join("rules"), &edited_dir);
    let edited = RuleSet::load_dir(&edited_dir, Unmatched::Dead).expect("the edited rules load");

    let started = Instant::now();
    let report = shadow::run(&archive, &live, &edited, Scope { since: None, last: Some(n) }, 1000).expect("shadow run");
    let took = started.elapsed();
    assert_eq!(report.counts.judged as usize, n);

    let size = archive.size().unwrap_or(0);
    println!(
        "archive: {n} messages, {:.1} MB raw, {:.1} MB on disk, written in {:.1} s",
        mb(bytes),
        mb(size),
        filled.as_secs_f64()
    );
    println!();
    println!("| messages | changed | shadow run | per message | messages/s |");
    println!("|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {} | {:.1} s | {:.0} µs | {:.0} |",
        n,
        report.counts.changed(),
        took.as_secs_f64(),
        took.as_secs_f64() * 1e6 / n as f64,
        n as f64 / took.as_secs_f64()
    );
}

fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

/// `rules/` with the UPS tracking number pattern made stricter (a realistic edit that changes
/// some messages' fields and leaves the others alone).
fn copy_edited(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().filter_map(Result::ok) {
        let text = std::fs::read_to_string(e.path()).unwrap();
        let text = text.replace("1Z[0-9A-Z]{16}", "1Z[0-9]{16}");
        std::fs::write(to.join(e.file_name()), text).unwrap();
    }
}

use super::*;

fn options(dir: &Path, max: u64) -> AuditOptions {
    AuditOptions {
        path: dir.join("audit.jsonl"),
        fsync: FsyncPolicy::Always,
        max_file_bytes: max,
        data_plane: DataPlane::Each,
    }
}

fn rec(i: u64) -> Record {
    Record {
        operation: "admin.rotate".into(),
        outcome: "ok".into(),
        principal: Some(format!("admin-{i}")),
        tenant: Some("acme".into()),
        key_version: Some(i as u32),
        ..Record::default()
    }
}

fn write(dir: &Path, n: u64, max: u64) -> Vec<PathBuf> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let audit = Audit::open(options(dir, max)).unwrap();
    for i in 0..n {
        rt.block_on(audit.admin(rec(i))).unwrap();
    }
    let path = dir.join("audit.jsonl");
    let mut files = rotated_files(&path).unwrap();
    files.push(path);
    files
}

#[test]
fn rfc3339_formats_known_instants() {
    assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
    assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.005Z");
    assert_eq!(rfc3339(1_795_404_194, 999), "2026-11-23T03:23:14.999Z");
}

#[test]
fn a_written_log_verifies_and_continues_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let files = write(dir.path(), 5, u64::MAX);
    let v = verify(&files).unwrap();
    assert_eq!((v.records, v.first_seq, v.last_seq), (5, 1, 5));
    let files = write(dir.path(), 3, u64::MAX);
    let v = verify(&files).unwrap();
    assert_eq!((v.records, v.last_seq), (8, 8));
    let text = std::fs::read_to_string(&files[0]).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["prev"], GENESIS);
    assert_eq!(first["principal"], "admin-0");
    assert!(first["time"].as_str().unwrap().ends_with('Z'));
}

fn tamper(edit: impl Fn(&mut Vec<String>)) -> String {
    let dir = tempfile::tempdir().unwrap();
    let files = write(dir.path(), 6, u64::MAX);
    let text = std::fs::read_to_string(&files[0]).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    edit(&mut lines);
    std::fs::write(&files[0], lines.join("\n") + "\n").unwrap();
    verify(&files).unwrap_err()
}

#[test]
fn one_edited_byte_is_found() {
    let e = tamper(|l| l[2] = l[2].replace("admin-2", "admin-9"));
    assert!(e.contains(":3:") && e.contains("edited"), "{e}");
}

#[test]
fn a_removed_line_is_found() {
    let e = tamper(|l| {
        l.remove(3);
    });
    assert!(
        e.contains(":4:") && e.contains("expected record 4, found 5"),
        "{e}"
    );
}

#[test]
fn swapped_lines_are_found() {
    let e = tamper(|l| l.swap(1, 2));
    assert!(
        e.contains(":2:") && e.contains("expected record 2, found 3"),
        "{e}"
    );
}

#[test]
fn a_file_truncated_mid_line_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let files = write(dir.path(), 4, u64::MAX);
    let bytes = std::fs::read(&files[0]).unwrap();
    std::fs::write(&files[0], &bytes[..bytes.len() - 20]).unwrap();
    let e = verify(&files).unwrap_err();
    assert!(e.contains("truncated"), "{e}");
}

#[test]
fn rotation_keeps_the_chain_across_files() {
    let dir = tempfile::tempdir().unwrap();
    let files = write(dir.path(), 20, 1000);
    assert!(files.len() > 2, "{files:?}");
    let v = verify(&files).unwrap();
    assert_eq!((v.records, v.first_seq, v.last_seq), (20, 1, 20));
    // Leaving out a middle file breaks the chain.
    let mut missing = files.clone();
    missing.remove(1);
    assert!(
        verify(&missing)
            .unwrap_err()
            .contains("removed or reordered")
    );
    // A later file alone verifies from where it starts.
    assert!(verify(&files[1..]).is_ok());
}

#[test]
fn two_writers_extend_one_chain() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let a = Audit::open(options(dir.path(), 4096)).unwrap();
    let b = Audit::open(options(dir.path(), 4096)).unwrap();
    for i in 0..30 {
        let w = if i % 3 == 0 { &b } else { &a };
        rt.block_on(w.admin(rec(i))).unwrap();
    }
    let path = dir.path().join("audit.jsonl");
    let mut files = rotated_files(&path).unwrap();
    files.push(path);
    let v = verify(&files).unwrap();
    assert_eq!((v.records, v.last_seq), (30, 30));
}

#[test]
fn aggregated_data_plane_records_carry_counts() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let audit = Audit::open(AuditOptions {
        data_plane: DataPlane::Aggregate,
        ..options(dir.path(), u64::MAX)
    })
    .unwrap();
    for _ in 0..1000 {
        audit.data(Record {
            operation: "seal".into(),
            outcome: "ok".into(),
            principal: Some("svc".into()),
            tenant: Some("acme".into()),
            ..Record::default()
        });
    }
    audit.flush_aggregate();
    rt.block_on(audit.flush()).unwrap();
    let text = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["count"], 1000);
    assert_eq!(lines[0]["operation"], "seal");
}

#[test]
fn the_backlog_counts_queued_records_and_drops_are_totalled() {
    let dir = tempfile::tempdir().unwrap();
    let audit = Audit::open(options(dir.path(), u64::MAX)).unwrap();
    // Holding the log's lock stalls the writer, so records pile up until the queue is full.
    let held = Flock::lock(
        open_append(&dir.path().join("audit.jsonl")).unwrap(),
        FlockArg::LockExclusive,
    )
    .unwrap();
    let sent = QUEUE as u64 + 10_000;
    for i in 0..sent {
        audit.event(rec(i));
    }
    let (backlog, dropped) = (audit.backlog(), audit.dropped_total());
    assert_eq!(backlog + dropped, sent);
    // The writer holds at most one batch of 4096 out of the queue while it waits.
    assert!(
        (QUEUE as u64..=QUEUE as u64 + 4096).contains(&backlog),
        "backlog {backlog}"
    );
    drop(held);
    let start = std::time::Instant::now();
    while audit.backlog() > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "backlog never drained"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(audit.dropped_total(), dropped);
    let text = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert_eq!(text.lines().count() as u64, backlog);
}

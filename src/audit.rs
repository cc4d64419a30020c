//! The audit log: append-only JSON lines, one per admin operation, reveal, failed
//! authentication and (per request, or aggregated per second) data-plane operation. Each line
//! carries its sequence number, the SHA-256 of the previous line and its own SHA-256, so
//! `verify` finds the first edited, removed, reordered or truncated record. Never holds values
//! or keys. Appends take an exclusive `flock`, so several processes (the server and an offline
//! `roots rewrap`) extend one chain; rotation carries the chain across files.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// `prev` of the first record of a chain.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const QUEUE: usize = 65_536;

/// When appended records reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FsyncPolicy {
    /// fsync after every batch of records (admin operations are acknowledged after it).
    Always,
    /// Leave it to the OS.
    Never,
}

/// How data-plane operations (seal, open, datakey, rewrap) are recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataPlane {
    /// One record per request, with its request id and peer.
    Each,
    /// One record per (principal, tenant, operation, outcome) per second, with a count.
    Aggregate,
    Off,
}

/// Audit settings.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    pub path: PathBuf,
    pub fsync: FsyncPolicy,
    /// Rotate the file once it reaches this size.
    pub max_file_bytes: u64,
    pub data_plane: DataPlane,
}

/// One audit record, before the chain fields are added. Holds names, ids and counts only.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    pub operation: String,
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_version: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A line as written: the chain fields around a record.
#[derive(Serialize, Deserialize)]
struct Line {
    seq: u64,
    time: String,
    #[serde(flatten)]
    record: Record,
    prev: String,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AuditError {
    #[error("audit log unavailable: {0}")]
    Unavailable(String),
}

enum Msg {
    /// Boxed: the queue is preallocated, and most of its slots are usually empty.
    Record(Box<Record>),
    /// Acknowledged once everything before it is written (and synced, by policy).
    Flush(tokio::sync::oneshot::Sender<Result<(), AuditError>>),
}

type AggKey = (String, String, Cow<'static, str>, Cow<'static, str>);

/// A handle to the audit log; cheap to clone.
#[derive(Clone)]
pub struct Audit {
    tx: SyncSender<Msg>,
    data_plane: DataPlane,
    aggregate: Arc<Mutex<HashMap<AggKey, u64>>>,
    /// Dropped since last reported in the log.
    dropped: Arc<AtomicU64>,
    /// Dropped since start, for metrics.
    dropped_total: Arc<AtomicU64>,
    /// Records queued and not yet written (or failed) by the writer.
    backlog: Arc<AtomicU64>,
}

impl Audit {
    /// Opens (creating, mode 0600) the log and starts its writer thread. Fails if the file
    /// cannot be opened or its tail cannot be read, so a sidecar never runs unaudited.
    pub fn open(options: AuditOptions) -> Result<Audit, AuditError> {
        let mut writer = Writer::open(options.clone())?;
        let (tx, rx) = sync_channel(QUEUE);
        let backlog = Arc::<AtomicU64>::default();
        let written = backlog.clone();
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(rx, &written))
            .map_err(|e| AuditError::Unavailable(format!("cannot start the writer: {e}")))?;
        Ok(Audit {
            tx,
            data_plane: options.data_plane,
            aggregate: Arc::default(),
            dropped: Arc::default(),
            dropped_total: Arc::default(),
            backlog,
        })
    }

    /// Records queued but not yet written.
    pub fn backlog(&self) -> u64 {
        self.backlog.load(Ordering::Relaxed)
    }

    /// Records dropped since start because the queue was full (or the writer gone).
    pub fn dropped_total(&self) -> u64 {
        self.dropped_total.load(Ordering::Relaxed)
    }

    /// Hands a record to the writer; false if the queue is full or the writer gone.
    fn enqueue(&self, record: Record) -> bool {
        // Counted before sending, so the writer never subtracts what was not yet added.
        self.backlog.fetch_add(1, Ordering::Relaxed);
        let sent = self.tx.try_send(Msg::Record(Box::new(record))).is_ok();
        if !sent {
            self.backlog.fetch_sub(1, Ordering::Relaxed);
        }
        sent
    }

    /// Records an admin operation and waits until it is on disk. An error means the operation
    /// must not proceed (fail closed).
    pub async fn admin(&self, record: Record) -> Result<(), AuditError> {
        if !self.enqueue(record) {
            return Err(AuditError::Unavailable("audit queue full or closed".into()));
        }
        self.flush().await
    }

    /// Waits until every record sent so far is written.
    pub async fn flush(&self) -> Result<(), AuditError> {
        let (ack, done) = tokio::sync::oneshot::channel();
        self.tx
            .try_send(Msg::Flush(ack))
            .map_err(|_| AuditError::Unavailable("audit queue full or closed".into()))?;
        done.await
            .map_err(|_| AuditError::Unavailable("audit writer stopped".into()))?
    }

    /// Records an event without waiting (failed authentication, reveals' companions). If the
    /// queue is full the record is counted as dropped, and the count is logged in the next
    /// aggregate record.
    pub fn event(&self, record: Record) {
        if !self.enqueue(record) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            self.dropped_total.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records a data-plane operation per the configured mode.
    pub fn data(&self, record: Record) {
        match self.data_plane {
            DataPlane::Off => {}
            DataPlane::Each => self.event(record),
            DataPlane::Aggregate => self.add(
                (
                    record.principal.unwrap_or_default(),
                    record.tenant.unwrap_or_default(),
                    Cow::Owned(record.operation),
                    Cow::Owned(record.outcome),
                ),
                record.count.unwrap_or(1),
            ),
        }
    }

    /// Whether data-plane operations are recorded one by one (so callers must build a record).
    pub fn records_each(&self) -> bool {
        self.data_plane == DataPlane::Each
    }

    /// Counts `count` data-plane operations when the mode aggregates them (nothing when it is
    /// off), without building a record: the request path's cheap form of `data`.
    pub fn count_data(
        &self,
        principal: Option<String>,
        tenant: Option<String>,
        operation: &'static str,
        outcome: &'static str,
        count: u64,
    ) {
        if self.data_plane == DataPlane::Aggregate {
            self.add(
                (
                    principal.unwrap_or_default(),
                    tenant.unwrap_or_default(),
                    Cow::Borrowed(operation),
                    Cow::Borrowed(outcome),
                ),
                count,
            );
        }
    }

    fn add(&self, key: AggKey, count: u64) {
        if let Ok(mut agg) = self.aggregate.lock() {
            *agg.entry(key).or_insert(0) += count;
        }
    }

    /// Writes the aggregated data-plane counts as records; the server calls it every second.
    pub fn flush_aggregate(&self) {
        let drained: Vec<(AggKey, u64)> = match self.aggregate.lock() {
            Ok(mut agg) => agg.drain().collect(),
            Err(_) => return,
        };
        for ((principal, tenant, operation, outcome), count) in drained {
            self.event(Record {
                operation: operation.into_owned(),
                outcome: outcome.into_owned(),
                principal: Some(principal),
                tenant: Some(tenant).filter(|t| !t.is_empty()),
                count: Some(count),
                detail: Some("aggregated over 1 s".into()),
                ..Record::default()
            });
        }
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            self.event(Record {
                operation: "audit.dropped".into(),
                outcome: "error".into(),
                count: Some(dropped),
                ..Record::default()
            });
        }
    }
}

struct Writer {
    options: AuditOptions,
    file: Option<File>,
    seq: u64,
    last_hash: String,
    /// Where this writer believes the file ends; differs when another process appended.
    end: u64,
    inode: u64,
}

impl Writer {
    fn open(options: AuditOptions) -> Result<Writer, AuditError> {
        let mut w = Writer {
            options,
            file: None,
            seq: 0,
            last_hash: GENESIS.into(),
            end: 0,
            inode: 0,
        };
        let locked = w.acquire()?;
        w.release(locked)?;
        Ok(w)
    }

    /// Writes what arrives until every sender is gone, taking each batch off `backlog` once
    /// written (or failed).
    fn run(&mut self, rx: Receiver<Msg>, backlog: &AtomicU64) {
        while let Ok(first) = rx.recv() {
            let mut records = Vec::new();
            let mut acks = Vec::new();
            let mut next = Some(first);
            while let Some(m) = next {
                match m {
                    Msg::Record(r) => records.push(*r),
                    Msg::Flush(ack) => acks.push(ack),
                }
                next = if records.len() < 4096 {
                    rx.try_recv().ok()
                } else {
                    None
                };
            }
            let result = if records.is_empty() {
                Ok(())
            } else {
                self.append(&records)
            };
            backlog.fetch_sub(records.len() as u64, Ordering::Relaxed);
            if let Err(e) = &result {
                tracing::error!(error = %e, "audit write failed");
            }
            for ack in acks {
                let _ = ack.send(result.clone());
            }
        }
    }

    fn append(&mut self, records: &[Record]) -> Result<(), AuditError> {
        let locked = self.acquire()?;
        let (seq, last_hash) = (self.seq, self.last_hash.clone());
        let result = (|| {
            let mut buf = Vec::new();
            for r in records {
                self.seq += 1;
                let line = encode_line(self.seq, &now_rfc3339(), r, &self.last_hash)?;
                self.last_hash = line_hash(&line);
                buf.extend_from_slice(line.as_bytes());
                buf.push(b'\n');
            }
            (&*locked).write_all(&buf).map_err(io)?;
            if self.options.fsync == FsyncPolicy::Always {
                locked.sync_data().map_err(io)?;
            }
            self.end += buf.len() as u64;
            Ok(())
        })();
        if result.is_err() {
            // Whatever reached the file is re-read from it on the next append.
            self.seq = seq;
            self.last_hash = last_hash;
            self.inode = 0;
        }
        let locked = if result.is_ok() && self.end >= self.options.max_file_bytes {
            self.rotate(locked)?
        } else {
            locked
        };
        self.release(locked)?;
        result
    }

    /// Opens the current file if needed and locks it; re-reads the tail if the file is not the
    /// one this writer last wrote (rotated elsewhere) or grew behind its back.
    fn acquire(&mut self) -> Result<Flock<File>, AuditError> {
        loop {
            let file = match self.file.take() {
                Some(f) => f,
                None => open_append(&self.options.path)?,
            };
            let locked = Flock::lock(file, FlockArg::LockExclusive)
                .map_err(|(_, e)| AuditError::Unavailable(format!("flock: {e}")))?;
            let meta = locked.metadata().map_err(io)?;
            let on_path = std::fs::metadata(&self.options.path).ok().map(|m| m.ino());
            if on_path != Some(meta.ino()) {
                // Rotated by another process: let go of the old file and open the new one.
                drop(locked);
                self.inode = 0;
                continue;
            }
            if self.inode != meta.ino() || self.end != meta.len() {
                self.resync(&locked, meta.len())?;
                self.inode = meta.ino();
                self.end = meta.len();
            }
            return Ok(locked);
        }
    }

    fn release(&mut self, locked: Flock<File>) -> Result<(), AuditError> {
        let file = locked
            .unlock()
            .map_err(|(_, e)| AuditError::Unavailable(format!("flock: {e}")))?;
        self.file = Some(file);
        Ok(())
    }

    /// Reads the chain position from the end of the current file, or of the newest rotated file
    /// when the current one is empty.
    fn resync(&mut self, file: &File, len: u64) -> Result<(), AuditError> {
        let tail = if len > 0 {
            Some(read_last_line(file, len)?)
        } else {
            match newest_rotated(&self.options.path)? {
                Some(p) => {
                    let f = File::open(&p).map_err(io)?;
                    let l = f.metadata().map_err(io)?.len();
                    Some(read_last_line(&f, l)?)
                }
                None => None,
            }
        };
        match tail {
            None => {
                self.seq = 0;
                self.last_hash = GENESIS.into();
            }
            Some(line) => {
                let (seq, _) = check_line(&line).map_err(|e| {
                    AuditError::Unavailable(format!("cannot continue the chain: {e}"))
                })?;
                self.seq = seq;
                self.last_hash = line_hash(&line);
            }
        }
        Ok(())
    }

    /// Renames the full file to `<path>.<last seq, 20 digits>` and starts a new one; the next
    /// record's `prev` is the last hash of the old file, so the chain continues.
    fn rotate(&mut self, locked: Flock<File>) -> Result<Flock<File>, AuditError> {
        std::fs::rename(
            &self.options.path,
            rotated_name(&self.options.path, self.seq),
        )
        .map_err(io)?;
        drop(locked);
        let new = Flock::lock(open_append(&self.options.path)?, FlockArg::LockExclusive)
            .map_err(|(_, e)| AuditError::Unavailable(format!("flock: {e}")))?;
        self.inode = new.metadata().map_err(io)?.ino();
        self.end = 0;
        Ok(new)
    }
}

fn io(e: std::io::Error) -> AuditError {
    AuditError::Unavailable(e.to_string())
}

fn open_append(path: &Path) -> Result<File, AuditError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| AuditError::Unavailable(format!("{}: {e}", path.display())))
}

fn rotated_name(path: &Path, last_seq: u64) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{last_seq:020}"));
    PathBuf::from(name)
}

/// Rotated files of `path`, oldest first (by the last sequence number in their names).
pub fn rotated_files(path: &Path) -> Result<Vec<PathBuf>, AuditError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let base = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(rest) = name.strip_prefix(&format!("{base}."))
            && rest.len() == 20
            && rest.bytes().all(|b| b.is_ascii_digit())
        {
            found.push(entry.path());
        }
    }
    found.sort();
    Ok(found)
}

fn newest_rotated(path: &Path) -> Result<Option<PathBuf>, AuditError> {
    Ok(rotated_files(path)?.pop())
}

fn read_last_line(file: &File, len: u64) -> Result<String, AuditError> {
    let take = len.min(1 << 20);
    let mut f = file;
    f.seek(SeekFrom::Start(len - take)).map_err(io)?;
    let mut buf = Vec::with_capacity(take as usize);
    f.take(take).read_to_end(&mut buf).map_err(io)?;
    let text = String::from_utf8(buf)
        .map_err(|_| AuditError::Unavailable("audit tail is not UTF-8".into()))?;
    let Some(body) = text.strip_suffix('\n') else {
        return Err(AuditError::Unavailable(
            "audit file does not end with a complete line (truncated?)".into(),
        ));
    };
    Ok(body.rsplit('\n').next().unwrap_or(body).to_owned())
}

fn encode_line(seq: u64, time: &str, record: &Record, prev: &str) -> Result<String, AuditError> {
    let body = serde_json::to_string(&Line {
        seq,
        time: time.to_owned(),
        record: record.clone(),
        prev: prev.to_owned(),
    })
    .map_err(|e| AuditError::Unavailable(e.to_string()))?;
    let hash = hex::encode(Sha256::digest(body.as_bytes()));
    // `body` ends with '}': splice the hash in as the last field.
    let mut line = body;
    line.pop();
    line.push_str(&format!(",\"hash\":\"{hash}\"}}"));
    Ok(line)
}

/// The hash a line carries (and the next line's `prev`).
fn line_hash(line: &str) -> String {
    line.rsplit_once(",\"hash\":\"")
        .map(|(_, h)| h.trim_end_matches("\"}").to_owned())
        .unwrap_or_default()
}

/// Checks one line's own hash; returns its seq and prev. Total: any input gives `Ok` or `Err`.
pub fn check_line(line: &str) -> Result<(u64, String), String> {
    let (body, tail) = line
        .rsplit_once(",\"hash\":\"")
        .ok_or("no hash field at the end of the line")?;
    let hash = tail.strip_suffix("\"}").ok_or("malformed hash field")?;
    let body = format!("{body}}}");
    if hex::encode(Sha256::digest(body.as_bytes())) != hash {
        return Err("record does not match its hash (edited)".into());
    }
    let parsed: Line = serde_json::from_str(&body).map_err(|e| format!("not a record: {e}"))?;
    Ok((parsed.seq, parsed.prev))
}

/// The result of verifying a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub records: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub last_hash: String,
}

/// Verifies the files in order as one chain. The first file may start mid-chain (its
/// predecessors were not given); everything after must link. Reports the first broken,
/// reordered, missing or truncated record as `file:line: reason`.
pub fn verify(files: &[PathBuf]) -> Result<Verified, String> {
    let mut expected: Option<(u64, String)> = None;
    let mut out = Verified {
        records: 0,
        first_seq: 0,
        last_seq: 0,
        last_hash: GENESIS.into(),
    };
    for path in files {
        let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let text = String::from_utf8(text).map_err(|_| format!("{}: not UTF-8", path.display()))?;
        if !text.is_empty() && !text.ends_with('\n') {
            let n = text.lines().count();
            return Err(format!(
                "{}:{n}: the last line is incomplete (truncated)",
                path.display()
            ));
        }
        for (i, line) in text.lines().enumerate() {
            let at = || format!("{}:{}", path.display(), i + 1);
            let (seq, prev) = check_line(line).map_err(|e| format!("{}: {e}", at()))?;
            match &expected {
                None => {
                    if seq == 1 && prev != GENESIS {
                        return Err(format!("{}: the first record must start the chain", at()));
                    }
                    out.first_seq = seq;
                }
                Some((want_seq, want_prev)) => {
                    if seq != *want_seq {
                        return Err(format!(
                            "{}: expected record {want_seq}, found {seq} (removed or reordered)",
                            at()
                        ));
                    }
                    if prev != *want_prev {
                        return Err(format!("{}: does not link to the previous record", at()));
                    }
                }
            }
            let hash = line_hash(line);
            expected = Some((seq + 1, hash.clone()));
            out.records += 1;
            out.last_seq = seq;
            out.last_hash = hash;
        }
    }
    if out.records == 0 {
        return Err("no records".into());
    }
    Ok(out)
}

/// RFC 3339 UTC time with milliseconds.
pub fn now_rfc3339() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    rfc3339(d.as_secs() as i64, d.subsec_millis())
}

fn rfc3339(secs: i64, millis: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
#[path = "audit_tests.rs"]
mod tests;

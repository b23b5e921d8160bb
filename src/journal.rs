//! The reservation journal: a charge is on disk before the request it pays for is forwarded, so a
//! crash at any moment (SIGKILL, OOM, a panic that aborts) loses no charged call.
//!
//! The usage channel lives in memory: what it holds when the process dies never reaches the
//! ledger, while the quota store (Redis) has already counted it. So every reservation is written
//! here first, as the ledger row it would leave if the process died right then (the reserved
//! units, status 0), and stays *outstanding* until its real row is safe (in the ledger, or in the
//! disk spool). At the next start, whatever is still outstanding is recovered into the ledger:
//! a charge the store made and the ledger lacks gets its row, with the request's own id, so the
//! recovery is idempotent (an id the ledger already has is a no-op).
//!
//! Records, one JSON line each, appended with one `write` per call (the page cache survives a
//! killed process; there is no `fsync`, so a power cut can still lose the last seconds):
//! - `g` *granted*: the embedded store (or the fail-open fallback) charged this reservation.
//! - `s` *sent*: a Redis batch is about to run, with its batch key and its requests in order.
//!   Redis may run it and the process die before the answer arrives, so recovery asks Redis: the
//!   batch key holds which requests it granted (`reserve.lua`), and a batch that has not run is
//!   stopped for good (its key is claimed first). Only the requests it granted are recovered.
//! - `f` *final*: a settlement that changed the charge (a refund, an exact cost): recovered
//!   instead of the reserved units.
//! - `x` *cancelled*: a grant taken back before the request went anywhere (no row is due).
//!
//! The file is split in segments (`<n>.log`); a closed segment whose reservations are all
//! resolved is deleted. One process per directory.
//!
//! Owns: the file format, the outstanding set, segment rotation and deletion, reading what a
//! previous process left. Must not touch: the quota store or the ledger (the stores append, the
//! usage pipeline reports what is safe, the flusher writes what is recovered).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ledger::UsageEvent;

/// A segment is closed and a new one started past this size or age, so resolved ones can go.
const SEGMENT_MAX_BYTES: u64 = 8 * 1024 * 1024;
/// (The age also bounds what a recovery re-reads after a crash: at most this much of traffic.)
const SEGMENT_MAX_AGE: Duration = Duration::from_secs(10);

/// One reservation's journal entry: its id and the ledger row it leaves if the process dies now
/// (serialized once, by the request, off the store's critical section).
#[derive(Debug, Clone)]
pub struct Line {
    id: Uuid,
    json: Box<[u8]>,
}

impl Line {
    /// The row a reservation of `units` leaves: the request's own event id, status 0 (no answer
    /// was sent), no latency.
    pub fn new(
        id: Uuid,
        ts: chrono::DateTime<chrono::Utc>,
        customer: &str,
        meter: &str,
        units: u64,
        route: &str,
        request_id: &str,
    ) -> Line {
        let row = RowRef {
            id,
            ts,
            customer,
            meter,
            units: i64::try_from(units).unwrap_or(i64::MAX),
            route,
            status: 0,
            latency_us: 0,
            request_id,
        };
        let mut json =
            Vec::with_capacity(160 + customer.len() + meter.len() + route.len() + request_id.len());
        if write_row(&mut json, &row).is_none() {
            // A year past 9999 or a leap second (no system clock says so): the general
            // serializer writes it. Serializing plain strings and numbers cannot fail.
            json = serde_json::to_vec(&row).unwrap_or_default();
        }
        Line {
            id,
            json: json.into_boxed_slice(),
        }
    }

    pub fn id(&self) -> Uuid {
        self.id
    }
}

/// [`UsageEvent`]'s wire form, borrowed (no copies of the request's strings).
#[derive(Serialize)]
struct RowRef<'a> {
    id: Uuid,
    ts: chrono::DateTime<chrono::Utc>,
    customer: &'a str,
    meter: &'a str,
    units: i64,
    route: &'a str,
    status: u16,
    latency_us: i64,
    request_id: &'a str,
}

/// `row` as JSON, written directly (the request path builds one per reservation): the object
/// `serde_json` writes for it, with the timestamp in RFC 3339 with nanoseconds and `Z`. `None`
/// (nothing written) for a year outside 0–9999 and for a leap second.
fn write_row(out: &mut Vec<u8>, row: &RowRef<'_>) -> Option<()> {
    use chrono::{Datelike, Timelike};
    let ts = row.ts;
    let year = u32::try_from(ts.year()).ok().filter(|y| *y <= 9999)?;
    if ts.nanosecond() >= 1_000_000_000 {
        return None; // a leap second (never from the system clock)
    }
    let mut digits = itoa::Buffer::new();
    let mut uuid = Uuid::encode_buffer();
    out.extend_from_slice(br#"{"id":""#);
    out.extend_from_slice(row.id.hyphenated().encode_lower(&mut uuid).as_bytes());
    out.extend_from_slice(br#"","ts":""#);
    // Each field zero-padded to its width, then the character that follows it.
    for (n, width, then) in [
        (year, 4, b'-'),
        (ts.month(), 2, b'-'),
        (ts.day(), 2, b'T'),
        (ts.hour(), 2, b':'),
        (ts.minute(), 2, b':'),
        (ts.second(), 2, b'.'),
        (ts.nanosecond(), 9, b'Z'),
    ] {
        let n = digits.format(n);
        out.extend(std::iter::repeat_n(b'0', width - n.len().min(width)));
        out.extend_from_slice(n.as_bytes());
        out.push(then);
    }
    out.extend_from_slice(br#"","customer":"#);
    str_json(out, row.customer);
    out.extend_from_slice(br#","meter":"#);
    str_json(out, row.meter);
    out.extend_from_slice(br#","units":"#);
    out.extend_from_slice(digits.format(row.units).as_bytes());
    out.extend_from_slice(br#","route":"#);
    str_json(out, row.route);
    out.extend_from_slice(br#","status":"#);
    out.extend_from_slice(digits.format(row.status).as_bytes());
    out.extend_from_slice(br#","latency_us":"#);
    out.extend_from_slice(digits.format(row.latency_us).as_bytes());
    out.extend_from_slice(br#","request_id":"#);
    str_json(out, row.request_id);
    out.push(b'}');
    Some(())
}

/// A JSON string (quoted and escaped by `serde_json`; writing to a `Vec` cannot fail).
fn str_json(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).ok();
}

/// One journal line as read back.
#[derive(Deserialize)]
#[serde(tag = "k")]
enum Record {
    #[serde(rename = "g")]
    Granted { e: UsageEvent },
    #[serde(rename = "s")]
    Sent {
        b: String,
        e: Vec<Option<UsageEvent>>,
    },
    #[serde(rename = "f")]
    Final { e: UsageEvent },
    /// Without `b`: every earlier grant of `id`; with `b` and `i`: that batch's request only.
    #[serde(rename = "x")]
    Cancelled {
        id: Uuid,
        #[serde(default)]
        b: Option<String>,
        #[serde(default)]
        i: Option<usize>,
    },
}

/// A reservation a previous process journaled, and whether it was taken back later.
#[derive(Debug)]
struct Entry {
    row: UsageEvent,
    cancelled: bool,
}

impl Entry {
    fn new(row: UsageEvent) -> Entry {
        Entry {
            row,
            cancelled: false,
        }
    }
}

/// What a previous process left, in journal order, for [`crate::usage::Flusher::recover`].
#[derive(Debug, Default)]
pub struct Leftover {
    /// Charged by a local store: each is owed a row.
    granted: Vec<Entry>,
    /// Redis batches: the batch key and its requests, in the batch's order. What each granted
    /// is known only to Redis (`reserve.lua` wrote it under the batch key).
    sent: Vec<(String, Vec<Option<Entry>>)>,
    /// Settled rows that differ from the reservation, by id: they replace it.
    finals: HashMap<Uuid, UsageEvent>,
    /// Lines that could not be read (a torn last line after a crash).
    pub unreadable: usize,
}

impl Leftover {
    pub fn is_empty(&self) -> bool {
        self.granted.is_empty() && self.sent.is_empty()
    }

    /// The batch keys whose outcome recovery must ask Redis for.
    pub fn batch_keys(&self) -> impl Iterator<Item = &str> {
        self.sent.iter().map(|(k, _)| k.as_str())
    }

    fn push(&mut self, record: Record) {
        match record {
            Record::Granted { e } => self.granted.push(Entry::new(e)),
            Record::Sent { b, e } => self
                .sent
                .push((b, e.into_iter().map(|row| row.map(Entry::new)).collect())),
            Record::Final { e } => {
                // Owed by itself too: its grant's segment may be gone (the reservation moved
                // to the final's segment, and the older one was deleted once resolved).
                self.finals.insert(e.id, e.clone());
                self.granted.push(Entry::new(e));
            }
            Record::Cancelled {
                id,
                b: Some(b),
                i: Some(i),
            } => {
                if let Some(entry) = self
                    .sent
                    .iter_mut()
                    .rev()
                    .find(|(k, _)| *k == b)
                    .and_then(|(_, entries)| entries.get_mut(i))
                    .and_then(Option::as_mut)
                    .filter(|e| e.row.id == id)
                {
                    entry.cancelled = true;
                }
            }
            Record::Cancelled { id, .. } => {
                let earlier = self.granted.iter_mut().chain(
                    self.sent
                        .iter_mut()
                        .flat_map(|(_, e)| e.iter_mut().flatten()),
                );
                for entry in earlier.filter(|e| e.row.id == id) {
                    entry.cancelled = true;
                }
            }
        }
    }

    /// The rows owed, given what Redis says each sent batch granted (`granted_in`, by batch
    /// key: the batch's per-request `1`/`0` string, or `None` for a batch that never ran). A
    /// final row replaces the reservation's; a request charged twice under one id (the store,
    /// then the fallback) is owed one row.
    pub fn owed(&self, granted_in: &HashMap<String, Option<String>>) -> Vec<UsageEvent> {
        let mut seen = HashSet::new();
        let mut owed = Vec::new();
        let mut take = |e: &Entry| {
            if !e.cancelled && seen.insert(e.row.id) {
                owed.push(self.finals.get(&e.row.id).unwrap_or(&e.row).clone());
            }
        };
        self.granted.iter().for_each(&mut take);
        for (key, entries) in &self.sent {
            let Some(Some(bits)) = granted_in.get(key) else {
                continue;
            };
            for (e, bit) in entries.iter().zip(bits.bytes()) {
                if let (Some(e), b'1') = (e, bit) {
                    take(e);
                }
            }
        }
        owed
    }
}

/// The journal: appends, the outstanding set, segments.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    active: Option<Segment>,
    next_segment: u64,
    /// Outstanding reservation → the segment that holds its latest record.
    outstanding: HashMap<Uuid, u64>,
    /// Outstanding reservations per segment; a closed segment at 0 is deleted.
    per_segment: BTreeMap<u64, usize>,
    /// Segments a previous process left, deleted once recovered ([`Journal::recovered`]).
    leftover_files: Vec<PathBuf>,
}

#[derive(Debug)]
struct Segment {
    n: u64,
    file: File,
    bytes: u64,
    opened: Instant,
}

// === impl Journal ===

impl Journal {
    /// Opens the journal in `dir` (created), and reads what a previous process left there.
    pub fn open(dir: &Path) -> std::io::Result<(Journal, Leftover)> {
        std::fs::create_dir_all(dir)?;
        let mut files: Vec<(u64, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let n = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".log"))
                .and_then(|n| n.parse::<u64>().ok());
            if let Some(n) = n {
                files.push((n, path));
            }
        }
        files.sort();
        let mut leftover = Leftover::default();
        for (_, path) in &files {
            read_segment(path, &mut leftover)?;
        }
        let next_segment = files.last().map_or(0, |(n, _)| n + 1);
        let journal = Journal {
            dir: dir.to_path_buf(),
            inner: Mutex::new(Inner {
                active: None,
                next_segment,
                outstanding: HashMap::new(),
                per_segment: BTreeMap::new(),
                leftover_files: files.into_iter().map(|(_, p)| p).collect(),
            }),
        };
        Ok((journal, leftover))
    }

    /// The directory (for log lines).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The embedded store charged `line`'s reservation.
    pub fn granted(&self, line: &Line) {
        let mut buf = Vec::with_capacity(line.json.len() + 16);
        buf.extend_from_slice(br#"{"k":"g","e":"#);
        buf.extend_from_slice(&line.json);
        buf.extend_from_slice(b"}\n");
        self.append(&buf, std::iter::once(line.id));
    }

    /// A Redis batch with key `batch_key` is about to be sent with these reservations, in the
    /// batch's order (`None`: a request with no line, kept for its place).
    pub fn sent<'l>(&self, batch_key: &str, lines: impl Iterator<Item = Option<&'l Line>> + Clone) {
        let mut buf = Vec::with_capacity(512);
        buf.extend_from_slice(br#"{"k":"s","b":"#);
        // A batch key is ASCII made by the store; serializing a string cannot fail.
        serde_json::to_writer(&mut buf, batch_key).ok();
        buf.extend_from_slice(br#","e":["#);
        for (i, line) in lines.clone().enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            match line {
                Some(line) => buf.extend_from_slice(&line.json),
                None => buf.extend_from_slice(b"null"),
            }
        }
        buf.extend_from_slice(b"]}\n");
        self.append(&buf, lines.flatten().map(|l| l.id));
    }

    /// A settlement changed what `event` is charged: recover this row instead.
    pub fn settled_differently(&self, event: &UsageEvent) {
        if !self.is_outstanding(event.id) {
            return;
        }
        let mut buf = Vec::with_capacity(300);
        buf.extend_from_slice(br#"{"k":"f","e":"#);
        if serde_json::to_writer(&mut buf, event).is_err() {
            return;
        }
        buf.extend_from_slice(b"}\n");
        self.append(&buf, std::iter::once(event.id));
    }

    /// A grant was taken back before its request went anywhere: no row is owed for it (a later
    /// grant under the same id, the shadow mode's charge anyway, still is).
    pub fn cancelled(&self, id: Uuid) {
        let buf = format!("{{\"k\":\"x\",\"id\":\"{id}\"}}\n");
        self.append(buf.as_bytes(), std::iter::empty());
        self.resolve(std::iter::once(id));
    }

    /// Request `index` of batch `batch_key` was granted after its caller stopped waiting, and
    /// refunded: that grant owes no row (the caller's fallback grant, if any, still does).
    pub fn cancelled_in_batch(&self, batch_key: &str, index: usize, id: Uuid) {
        let mut buf = Vec::with_capacity(120);
        buf.extend_from_slice(br#"{"k":"x","b":"#);
        serde_json::to_writer(&mut buf, batch_key).ok();
        buf.extend_from_slice(format!(",\"i\":{index},\"id\":\"{id}\"}}\n").as_bytes());
        self.append(&buf, std::iter::empty());
    }

    /// These reservations need nothing more from the journal: refused (nothing was charged), or
    /// their row is safe (in the ledger or the spool). Ids it does not hold are ignored.
    pub fn resolve(&self, ids: impl IntoIterator<Item = Uuid>) {
        let mut doomed = Vec::new();
        {
            let mut inner = self.lock();
            let active = inner.active.as_ref().map(|s| s.n);
            for id in ids {
                if let Some(seg) = inner.outstanding.remove(&id) {
                    if inner.release(seg) && Some(seg) != active {
                        doomed.push(seg);
                    }
                }
            }
        }
        self.delete(doomed);
    }

    /// The previous process's leftovers are recovered: their files go.
    pub fn recovered(&self) {
        let files = std::mem::take(&mut self.lock().leftover_files);
        for path in files {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(error = %e, file = %path.display(), "cannot delete a recovered journal segment");
            }
        }
    }

    /// A clean stop: the active segment goes too when nothing in it is outstanding (what is,
    /// a batch Redis never answered, is recovered at the next start).
    pub fn close(&self) {
        let mut inner = self.lock();
        let Some(active) = inner.active.take() else {
            return;
        };
        let resolved = !inner.per_segment.contains_key(&active.n);
        drop(inner);
        if resolved {
            self.delete(vec![active.n]);
        }
    }

    /// Reservations still waiting for their row (for tests and metrics).
    pub fn outstanding(&self) -> usize {
        self.lock().outstanding.len()
    }

    fn is_outstanding(&self, id: Uuid) -> bool {
        self.lock().outstanding.contains_key(&id)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One write of `buf` to the active segment (rotated first when due), then `ids` are
    /// outstanding there. A failed write is logged: the request goes ahead (refusing paid calls
    /// because a disk is full would be worse), unprotected against a crash.
    fn append(&self, buf: &[u8], ids: impl Iterator<Item = Uuid>) {
        let mut doomed = Vec::new();
        let mut inner = self.lock();
        let due = inner
            .active
            .as_ref()
            .is_none_or(|s| s.bytes >= SEGMENT_MAX_BYTES || s.opened.elapsed() >= SEGMENT_MAX_AGE);
        if due {
            if let Some(old) = inner.active.take() {
                if inner.per_segment.get(&old.n).copied().unwrap_or(0) == 0 {
                    inner.per_segment.remove(&old.n);
                    doomed.push(old.n);
                }
            }
            match self.create(inner.next_segment) {
                Ok(seg) => {
                    inner.next_segment += 1;
                    inner.active = Some(seg);
                }
                Err(e) => {
                    tracing::error!(error = %e, dir = %self.dir.display(), "cannot start a journal segment; charges are not protected against a crash");
                    return;
                }
            }
        }
        let Some(seg) = inner.active.as_mut() else {
            return;
        };
        if let Err(e) = seg.file.write_all(buf) {
            tracing::error!(error = %e, dir = %self.dir.display(), "journal write failed; charges are not protected against a crash");
            inner.active = None; // start a fresh segment rather than append after a partial line
            return;
        }
        seg.bytes += buf.len() as u64;
        let n = seg.n;
        for id in ids {
            if let Some(old) = inner.outstanding.insert(id, n) {
                // A second record for the same reservation (a seeded retry, a final row): the
                // older segment no longer holds it, and may be done.
                if inner.release(old) && old != n {
                    doomed.push(old);
                }
            }
            *inner.per_segment.entry(n).or_default() += 1;
        }
        drop(inner);
        self.delete(doomed);
    }

    fn create(&self, n: u64) -> std::io::Result<Segment> {
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(self.segment_path(n))?;
        Ok(Segment {
            n,
            file,
            bytes: 0,
            opened: Instant::now(),
        })
    }

    fn segment_path(&self, n: u64) -> PathBuf {
        self.dir.join(format!("{n:020}.log"))
    }

    fn delete(&self, segments: Vec<u64>) {
        for n in segments {
            let path = self.segment_path(n);
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(error = %e, file = %path.display(), "cannot delete a resolved journal segment");
            }
        }
    }
}

impl Inner {
    /// One reservation in `seg` is resolved; true when that was the segment's last.
    fn release(&mut self, seg: u64) -> bool {
        match self.per_segment.get_mut(&seg) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                self.per_segment.remove(&seg);
                true
            }
            None => false,
        }
    }
}

fn read_segment(path: &Path, into: &mut Leftover) -> std::io::Result<()> {
    let file = std::io::BufReader::new(File::open(path)?);
    for line in file.split(b'\n') {
        let line = line?;
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice::<Record>(&line) {
            Ok(record) => into.push(record),
            Err(_) => into.unreadable += 1,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::test_support::TempDir;

    fn line(customer: &str, units: u64) -> Line {
        Line::new(
            Uuid::now_v7(),
            chrono::Utc::now(),
            customer,
            "api_calls",
            units,
            "signals",
            "req-1",
        )
    }

    fn segments(dir: &Path) -> usize {
        std::fs::read_dir(dir).map_or(0, |d| d.count())
    }

    /// The directly written line is the row `serde_json` would write: read back as a
    /// [`UsageEvent`], every field is equal, also for strings that need escaping and for the
    /// timestamps the fast path leaves to `serde_json`.
    #[test]
    fn a_line_reads_back_as_its_row() {
        use chrono::TimeZone;
        let ts = [
            chrono::Utc::now(),
            chrono::Utc.timestamp_opt(0, 0).single().expect("epoch"),
            chrono::Utc
                .timestamp_opt(1_800_000_000, 7)
                .single()
                .expect("ts"),
            chrono::Utc
                .with_ymd_and_hms(9999, 12, 31, 23, 59, 59)
                .single()
                .expect("ts"),
            chrono::Utc
                .with_ymd_and_hms(10000, 1, 1, 0, 0, 0)
                .single()
                .expect("ts"),
            chrono::Utc
                .timestamp_opt(1_483_228_799, 1_500_000_000)
                .single()
                .expect("leap"),
        ];
        for (i, ts) in ts.into_iter().enumerate() {
            let id = Uuid::now_v7();
            let customer = ["cus_1", "a\"b\\c\n\u{1}é", ""][i % 3];
            let units = [0, 7, u64::MAX][i % 3];
            let line = Line::new(id, ts, customer, "api_calls", units, "r\"oute", "req-1");
            let row: UsageEvent = serde_json::from_slice(&line.json).expect("a row");
            let want = RowRef {
                id,
                ts,
                customer,
                meter: "api_calls",
                units: i64::try_from(units).unwrap_or(i64::MAX),
                route: "r\"oute",
                status: 0,
                latency_us: 0,
                request_id: "req-1",
            };
            let want: UsageEvent =
                serde_json::from_slice(&serde_json::to_vec(&want).expect("json")).expect("row");
            assert_eq!(row, want, "line {}", String::from_utf8_lossy(&line.json));
            assert_eq!(row.ts, ts);
        }
    }

    /// Granted and sent records come back as the rows they describe; a final replaces the
    /// reservation, a cancelled one and a batch that did not grant it owe nothing.
    #[test]
    fn leftovers_are_the_rows_owed() {
        let dir = TempDir::new();
        let (a, b, c, d) = (line("a", 2), line("b", 3), line("c", 4), line("d", 5));
        {
            let (journal, left) = Journal::open(dir.path()).expect("open");
            assert!(left.is_empty());
            journal.granted(&a);
            journal.granted(&d);
            journal.sent("tg:{b}:b:1", [Some(&b), None, Some(&c)].into_iter());
            let mut settled: UsageEvent = serde_json::from_slice(&a.json).expect("row");
            settled.units = 0;
            settled.status = 502;
            journal.settled_differently(&settled);
            journal.cancelled(d.id());
            journal.cancelled_in_batch("tg:{b}:b:1", 0, b.id());
            // Taken back, then charged anyway (shadow mode): owed once.
            let e = line("e", 6);
            journal.granted(&e);
            journal.cancelled(e.id());
            journal.granted(&e);
            assert_eq!(journal.outstanding(), 4);
        } // the process dies
        let (_journal, left) = Journal::open(dir.path()).expect("reopen");
        assert_eq!(left.unreadable, 0);
        let granted = HashMap::from([("tg:{b}:b:1".to_string(), Some("111".to_string()))]);
        let owed = left.owed(&granted);
        let got: Vec<(String, i64, u16)> = owed
            .iter()
            .map(|e| (e.customer.clone(), e.units, e.status))
            .collect();
        assert_eq!(
            got,
            [("a".into(), 0, 502), ("e".into(), 6, 0), ("c".into(), 4, 0)]
        );
        assert_eq!(owed[2].id, c.id());
        assert_eq!(owed[2].route, "signals");
        // A batch that never ran owes nothing.
        assert_eq!(
            left.owed(&HashMap::from([("tg:{b}:b:1".to_string(), None)]))
                .len(),
            2
        );
    }

    /// Resolved reservations free their segment once it is closed; outstanding ones keep it.
    #[test]
    fn resolved_segments_are_deleted() {
        let dir = TempDir::new();
        let (journal, _) = Journal::open(dir.path()).expect("open");
        let first = line("a", 1);
        journal.granted(&first);
        assert_eq!(segments(dir.path()), 1);
        // Force the next append into a new segment.
        journal.lock().active.as_mut().expect("active").bytes = SEGMENT_MAX_BYTES;
        let second = line("a", 1);
        journal.granted(&second);
        assert_eq!(
            segments(dir.path()),
            2,
            "the first still holds an outstanding one"
        );
        journal.resolve([first.id()]);
        assert_eq!(segments(dir.path()), 1, "closed and resolved: deleted");
        journal.resolve([second.id()]);
        assert_eq!(segments(dir.path()), 1, "the active segment stays");
        assert_eq!(journal.outstanding(), 0);
    }

    /// A final row is recovered even when the segment with its grant was deleted meanwhile.
    #[test]
    fn a_final_row_outlives_its_grants_segment() {
        let dir = TempDir::new();
        let granted = line("a", 5);
        {
            let (journal, _) = Journal::open(dir.path()).expect("open");
            journal.granted(&granted);
            journal.lock().active.as_mut().expect("active").bytes = SEGMENT_MAX_BYTES;
            let mut settled: UsageEvent = serde_json::from_slice(&granted.json).expect("row");
            settled.units = 3;
            settled.status = 200;
            journal.settled_differently(&settled);
            assert_eq!(
                segments(dir.path()),
                1,
                "the grant's segment is resolved and gone"
            );
        } // the process dies before the row is safe
        let (_, left) = Journal::open(dir.path()).expect("reopen");
        let owed = left.owed(&HashMap::new());
        assert_eq!(owed.len(), 1);
        assert_eq!(
            (owed[0].id, owed[0].units, owed[0].status),
            (granted.id(), 3, 200)
        );
    }

    /// A torn last line (the process died mid-write) is counted and skipped.
    #[test]
    fn a_torn_line_is_skipped() {
        let dir = TempDir::new();
        {
            let (journal, _) = Journal::open(dir.path()).expect("open");
            journal.granted(&line("a", 1));
        }
        let path = std::fs::read_dir(dir.path())
            .expect("dir")
            .next()
            .expect("segment")
            .expect("entry")
            .path();
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(br#"{"k":"g","e":{"id":"#).expect("write");
        let (_, left) = Journal::open(dir.path()).expect("reopen");
        assert_eq!(left.granted.len(), 1);
        assert_eq!(left.unreadable, 1);
    }
}

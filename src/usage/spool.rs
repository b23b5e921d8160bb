//! The disk spool: where usage events wait when the channel is full or the ledger is down.
//!
//! A directory of JSON-lines files (`spool-<uuidv7>.jsonl`, one `UsageEvent` per line). One file
//! at a time is open for appends; a file past [`SPOOL_FILE_MAX_BYTES`] is closed and another
//! started, and `rotate` closes the open one so that it can be replayed. One process per spool
//! directory.
//!
//! Owns: the file format, naming, rotation, listing closed files and reading them back. Must not
//! touch: the ledger or the counters (callers insert what [`SpoolFile`] reads and account for it),
//! and it never deletes a file (the flusher does, once the ledger has its events).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use tokio::io::AsyncBufReadExt;

use crate::ledger::UsageEvent;

/// A spool file is closed and a new one started past this size, so one replay never has to
/// re-read a huge file after a partial failure.
const SPOOL_FILE_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// The overflow spool: one open append-only file at a time, closed files waiting for replay.
#[derive(Debug)]
pub(super) struct Spool {
    dir: PathBuf,
    active: Mutex<Option<ActiveFile>>,
    /// Set by every append: tells the flusher there is something to replay.
    pending: AtomicBool,
}

#[derive(Debug)]
struct ActiveFile {
    path: PathBuf,
    out: BufWriter<File>,
    bytes: u64,
}

// === impl Spool ===

impl Spool {
    /// A spool in `dir`; nothing is created until the first append.
    pub(super) fn new(dir: PathBuf) -> Spool {
        Spool {
            dir,
            active: Mutex::new(None),
            pending: AtomicBool::new(false),
        }
    }

    /// The spool directory (for log lines).
    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends events as JSON lines and flushes them to the OS before returning. Serializes
    /// outside the lock so contending request threads wait only for the write.
    pub(super) fn append(&self, events: &[UsageEvent]) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(256 * events.len());
        for ev in events {
            serde_json::to_writer(&mut buf, ev)?;
            buf.push(b'\n');
        }
        // A panic while holding the lock leaves at worst a torn line, which replay skips.
        let mut active = self.active.lock().unwrap_or_else(PoisonError::into_inner);
        if active
            .as_ref()
            .is_some_and(|f| f.bytes >= SPOOL_FILE_MAX_BYTES)
        {
            *active = None; // BufWriter was flushed after the last write; drop closes it
        }
        let file = match &mut *active {
            Some(file) => file,
            empty => empty.insert(self.create_file()?),
        };
        let written = file.out.write_all(&buf).and_then(|()| file.out.flush());
        match written {
            Ok(()) => {
                file.bytes += buf.len() as u64;
                self.pending.store(true, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                // Start a fresh file next time rather than append after a partial write.
                *active = None;
                Err(e)
            }
        }
    }

    fn create_file(&self) -> std::io::Result<ActiveFile> {
        std::fs::create_dir_all(&self.dir)?;
        // UUIDv7 names sort by creation time: replay goes oldest first.
        let path = self
            .dir
            .join(format!("spool-{}.jsonl", uuid::Uuid::now_v7().simple()));
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        Ok(ActiveFile {
            path,
            out: BufWriter::new(file),
            bytes: 0,
        })
    }

    /// Closes the open file (if any) so that it can be replayed; the next append starts another.
    pub(super) fn rotate(&self) {
        let mut active = self.active.lock().unwrap_or_else(PoisonError::into_inner);
        *active = None;
    }

    /// Clears and returns the "something was spooled" flag.
    pub(super) fn take_pending(&self) -> bool {
        self.pending.swap(false, Ordering::Acquire)
    }

    /// Total size of the spool's files, the open one included (0 when the directory is absent
    /// or unreadable: a metric, not a decision).
    pub(super) async fn bytes_on_disk(&self) -> u64 {
        let Ok(mut dir) = tokio::fs::read_dir(&self.dir).await else {
            return 0;
        };
        let mut total = 0;
        while let Ok(Some(entry)) = dir.next_entry().await {
            if entry.path().extension().is_some_and(|ext| ext == "jsonl") {
                total += entry.metadata().await.map_or(0, |m| m.len());
            }
        }
        total
    }

    /// Spool files not currently open for appends, oldest first.
    pub(super) async fn closed_files(&self) -> std::io::Result<Vec<PathBuf>> {
        let mut files = Vec::new();
        let mut dir = match tokio::fs::read_dir(&self.dir).await {
            Ok(dir) => dir,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(files),
            Err(e) => return Err(e),
        };
        while let Some(entry) = dir.next_entry().await? {
            let path = entry.path();
            if path.extension().is_some_and(|ext| ext == "jsonl") {
                files.push(path);
            }
        }
        // Read after listing: a file a sink opened meanwhile is either unlisted or excluded here.
        let open = self
            .active
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|f| f.path.clone());
        files.retain(|p| Some(p) != open.as_ref());
        files.sort();
        Ok(files)
    }
}

/// A closed spool file read back in chunks (files may be large), skipping lines that are not an
/// event: a torn last line from a crash mid-append, or garbage.
#[derive(Debug)]
pub(super) struct SpoolFile {
    reader: tokio::io::BufReader<tokio::fs::File>,
    line: Vec<u8>,
    unreadable: usize,
}

// === impl SpoolFile ===

impl SpoolFile {
    pub(super) async fn open(path: &Path) -> std::io::Result<SpoolFile> {
        let file = tokio::fs::File::open(path).await?;
        Ok(SpoolFile {
            reader: tokio::io::BufReader::new(file),
            line: Vec::new(),
            unreadable: 0,
        })
    }

    /// Appends events to `chunk` until it holds `max` or the file ends; `chunk` is left short
    /// (empty once everything was read) only at the end of the file.
    pub(super) async fn read_chunk(
        &mut self,
        chunk: &mut Vec<UsageEvent>,
        max: usize,
    ) -> std::io::Result<()> {
        while chunk.len() < max {
            self.line.clear();
            // Bytes, not `lines()`: a torn last line (crash mid-append) must not stop the file.
            if self.reader.read_until(b'\n', &mut self.line).await? == 0 {
                break;
            }
            if self.line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<UsageEvent>(&self.line) {
                Ok(ev) => chunk.push(ev),
                Err(_) => self.unreadable += 1,
            }
        }
        Ok(())
    }

    /// Lines read so far that were neither blank nor an event.
    pub(super) fn unreadable(&self) -> usize {
        self.unreadable
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::ledger::open;
    use crate::ledger::test_support::{events, TempDir};
    use crate::usage::pipeline;
    use crate::usage::tests::rows;

    /// The open file is not offered for replay until it is rotated; what was appended reads back
    /// in order, in chunks of the size asked for.
    #[tokio::test]
    async fn appended_events_read_back_after_rotation() {
        let dir = TempDir::new();
        let spool = Spool::new(dir.path().join("spool"));
        assert!(!spool.take_pending());
        assert!(spool.closed_files().await.expect("list").is_empty());
        let evs = events(5, "acme", "api_calls");
        spool.append(&evs[..2]).expect("append");
        spool.append(&evs[2..]).expect("append");
        assert!(spool.take_pending());
        assert!(!spool.take_pending(), "the flag is cleared when taken");
        assert!(spool.closed_files().await.expect("list").is_empty());

        spool.rotate();
        let files = spool.closed_files().await.expect("list");
        assert_eq!(files.len(), 1);
        let mut file = SpoolFile::open(&files[0]).await.expect("open");
        let mut chunk = Vec::new();
        let mut ids = Vec::new();
        let mut sizes = Vec::new();
        loop {
            file.read_chunk(&mut chunk, 2).await.expect("read");
            if chunk.is_empty() {
                break;
            }
            sizes.push(chunk.len());
            ids.extend(chunk.drain(..).map(|ev| ev.id));
        }
        assert_eq!(sizes, [2, 2, 1]);
        assert_eq!(ids, evs.iter().map(|ev| ev.id).collect::<Vec<_>>());
        assert_eq!(file.unreadable(), 0);

        // The next append opens a new file, again not offered while open.
        spool.append(&evs[..1]).expect("append");
        assert_eq!(spool.closed_files().await.expect("list"), files);
    }

    /// Replay skips torn or garbage lines (counted as lost), inserts the rest, deletes the file.
    #[tokio::test]
    async fn replay_survives_torn_and_garbage_lines() {
        let dir = TempDir::new();
        let ledger = open(&dir.sqlite_url(), None).await.expect("open");
        let spool = dir.path().join("spool");
        std::fs::create_dir_all(&spool).expect("mkdir");
        let evs = events(3, "acme", "api_calls");
        let mut text = String::new();
        for ev in &evs {
            text.push_str(&serde_json::to_string(ev).expect("json"));
            text.push('\n');
        }
        text.push_str("not json\n\n");
        let torn = serde_json::to_string(&events(1, "acme", "api_calls")[0]).expect("json");
        text.push_str(&torn[..torn.len() / 2]);
        let mut bytes = text.into_bytes();
        bytes.extend_from_slice(b"\n\xff\xfe\n");
        std::fs::write(spool.join("spool-0.jsonl"), bytes).expect("write");
        // Not ours: left alone.
        std::fs::write(spool.join("README"), b"keep").expect("write");

        let (_sink, flusher) = pipeline(
            ledger.clone(),
            4,
            spool.clone(),
            2,
            Duration::from_millis(5),
            None,
        );
        let stats = flusher.run(async {}).await;
        assert_eq!((stats.inserted, stats.lost), (3, 3));
        assert_eq!(rows(&ledger, "acme").await, 3);
        assert!(!spool.join("spool-0.jsonl").exists());
        assert!(spool.join("README").exists());
    }
}

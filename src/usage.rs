//! The asynchronous usage pipeline (DESIGN §1 "usage flusher", STYLE 6): the request path hands
//! each charged request to a [`UsageSink`], a background [`Flusher`] writes them to the ledger in
//! batches.
//!
//! Owns the bounded channel, the disk spool and the [`UsageCounters`]. It must never make the
//! request path await: [`UsageSink::record`] is a synchronous `try_send`, and when the channel is
//! full (or the flusher is gone) the event is appended to the spool instead, so nothing is dropped
//! silently. Whatever reaches the spool — overflow, batches the ledger refused, files a crashed
//! process left — is replayed into the ledger by the flusher and then deleted. Replays are
//! idempotent because event ids are the ledger's primary key.
//!
//! The spool is a directory of JSON-lines files (`spool-<uuidv7>.jsonl`, one [`UsageEvent`] per
//! line). One file at a time is open for appends; the flusher only replays closed files. One
//! process per spool directory.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use crate::ledger::{Ledger, LedgerError, UsageEvent};

/// A spool file is closed and a new one started past this size, so one replay never has to
/// re-read a huge file after a partial failure.
const SPOOL_FILE_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// First retry after the ledger fails; doubles up to [`BACKOFF_MAX`] while it stays down.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Longest one ledger insert may take before the flusher treats the ledger as down. A batch
/// normally takes milliseconds; a half-open connection could otherwise stall the flusher for
/// minutes. If the insert did commit after all, the spool replay finds duplicates: harmless.
const INSERT_TIMEOUT: Duration = Duration::from_secs(10);

/// What [`UsageSink::record`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// In the channel; the flusher will write it.
    Queued,
    /// The channel was full or closed: appended to the disk spool, replayed later.
    Spooled,
    /// The spool write failed too (logged, counted). The only way an event is lost.
    Lost,
}

/// Event counters shared by the sink and the flusher, for metrics
/// (`tollgate_usage_events_total{outcome}`, DESIGN §6). Monotonic; read them any time.
#[derive(Debug)]
pub struct UsageCounters {
    queued: AtomicU64,
    inserted: AtomicU64,
    duplicates: AtomicU64,
    spooled: AtomicU64,
    failed: AtomicU64,
    lost: AtomicU64,
    /// Unix milliseconds when the flusher last had everything it had taken in the ledger
    /// (for `tollgate_ledger_lag_seconds`).
    caught_up_ms: AtomicI64,
}

impl Default for UsageCounters {
    fn default() -> Self {
        UsageCounters {
            queued: AtomicU64::new(0),
            inserted: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            spooled: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            caught_up_ms: AtomicI64::new(chrono::Utc::now().timestamp_millis()),
        }
    }
}

/// A snapshot of [`UsageCounters`]; also what [`Flusher::run`] returns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushStats {
    /// Events accepted into the channel.
    pub queued: u64,
    /// Ledger rows created (direct batches and spool replays).
    pub inserted: u64,
    /// Events the ledger already had (a replay of something already written): not errors.
    pub duplicates: u64,
    /// Events written to the spool: channel overflow plus batches the ledger could not take.
    pub spooled: u64,
    /// Events the flusher could not insert because the ledger was failing (they were spooled;
    /// each is also counted in `spooled`, unless the spool failed too and it is in `lost`).
    pub failed: u64,
    /// Events gone for good: the spool write failed, or a spool line was unreadable.
    pub lost: u64,
}

// === impl UsageCounters ===

impl UsageCounters {
    /// Events accepted into the channel.
    pub fn queued(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }
    /// Ledger rows created (direct batches and spool replays).
    pub fn inserted(&self) -> u64 {
        self.inserted.load(Ordering::Relaxed)
    }
    /// Events the ledger already had when written (replays).
    pub fn duplicates(&self) -> u64 {
        self.duplicates.load(Ordering::Relaxed)
    }
    /// Events written to the spool (overflow and failed batches).
    pub fn spooled(&self) -> u64 {
        self.spooled.load(Ordering::Relaxed)
    }
    /// Events the flusher could not insert because the ledger was failing.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
    /// Events gone for good (spool write failed, or an unreadable spool line).
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    /// All counters at once (each read individually; they may be a few events apart).
    pub fn snapshot(&self) -> FlushStats {
        FlushStats {
            queued: self.queued(),
            inserted: self.inserted(),
            duplicates: self.duplicates(),
            spooled: self.spooled(),
            failed: self.failed(),
            lost: self.lost(),
        }
    }

    /// How far the ledger is behind, in milliseconds: the time since the flusher last had
    /// written everything it had taken (it checks every flush interval). It grows while the
    /// ledger is down and events wait in the spool.
    pub fn ledger_lag_ms(&self, now_ms: i64) -> i64 {
        (now_ms - self.caught_up_ms.load(Ordering::Relaxed)).max(0)
    }

    fn caught_up(&self) {
        self.caught_up_ms
            .store(chrono::Utc::now().timestamp_millis(), Ordering::Relaxed);
    }

    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Accounts for a successful insert of `attempted` events that created `inserted` rows.
    fn inserted_of(&self, attempted: usize, inserted: u64) {
        self.inserted.fetch_add(inserted, Ordering::Relaxed);
        self.duplicates.fetch_add(
            (attempted as u64).saturating_sub(inserted),
            Ordering::Relaxed,
        );
    }
}

/// The request path's handle: cheap to clone, never awaits.
#[derive(Debug, Clone)]
pub struct UsageSink {
    tx: mpsc::Sender<UsageEvent>,
    spool: Arc<Spool>,
    counters: Arc<UsageCounters>,
    /// Wakes the flusher early when the queue is half full (it otherwise drains on its tick).
    wake: Arc<tokio::sync::Notify>,
}

/// The background writer. Run it once with [`Flusher::run`].
pub struct Flusher {
    rx: mpsc::Receiver<UsageEvent>,
    wake: Arc<tokio::sync::Notify>,
    ledger: Arc<dyn Ledger>,
    spool: Arc<Spool>,
    counters: Arc<UsageCounters>,
    batch_max: usize,
    flush_every: Duration,
}

/// Creates the pair. `capacity` = channel bound, `spool_dir` = where overflow and failed batches
/// go (created on first use), `batch_max` = most events per ledger insert, `flush_every` = longest
/// an event waits in a partial batch. Zero values are raised to the smallest workable ones.
pub fn pipeline(
    ledger: Arc<dyn Ledger>,
    capacity: usize,
    spool_dir: PathBuf,
    batch_max: usize,
    flush_every: Duration,
) -> (UsageSink, Flusher) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let spool = Arc::new(Spool::new(spool_dir));
    let counters = Arc::new(UsageCounters::default());
    let wake = Arc::new(tokio::sync::Notify::new());
    let sink = UsageSink {
        tx,
        spool: spool.clone(),
        counters: counters.clone(),
        wake: wake.clone(),
    };
    let flusher = Flusher {
        rx,
        wake,
        ledger,
        spool,
        counters,
        batch_max: batch_max.max(1),
        flush_every: flush_every.max(Duration::from_millis(1)),
    };
    (sink, flusher)
}

// === impl UsageSink ===

impl UsageSink {
    /// `try_send` into the bounded channel; when it is full (or the flusher has stopped), appends
    /// the event to the disk spool. Never awaits. Returns which happened; [`Recorded::Lost`] only
    /// if the spool write itself failed (logged at error level).
    pub fn record(&self, ev: UsageEvent) -> Recorded {
        match self.tx.try_send(ev) {
            Ok(()) => {
                UsageCounters::add(&self.counters.queued, 1);
                if self.tx.capacity() * 2 < self.tx.max_capacity() {
                    self.wake.notify_one();
                }
                Recorded::Queued
            }
            Err(mpsc::error::TrySendError::Full(ev) | mpsc::error::TrySendError::Closed(ev)) => {
                match self.spool.append(std::slice::from_ref(&ev)) {
                    Ok(()) => {
                        UsageCounters::add(&self.counters.spooled, 1);
                        Recorded::Spooled
                    }
                    Err(e) => {
                        UsageCounters::add(&self.counters.lost, 1);
                        tracing::error!(
                            error = %e, spool = %self.spool.dir.display(), event = %ev.id,
                            "usage event lost: channel full and the spool write failed"
                        );
                        Recorded::Lost
                    }
                }
            }
        }
    }

    /// Events waiting in the channel (for `tollgate_usage_queue_depth`).
    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// The counters this pipeline updates.
    pub fn counters(&self) -> Arc<UsageCounters> {
        self.counters.clone()
    }
}

/// Ledger health as the flusher sees it: while unhealthy, new batches go straight to the spool
/// and only the backoff timer probes the ledger (by replaying the spool), so an outage costs one
/// failed call per backoff step rather than one per batch.
#[derive(Debug)]
struct Health {
    healthy: bool,
    backoff: Duration,
    retry_at: Option<Instant>,
}

impl Health {
    fn new() -> Health {
        Health {
            healthy: true,
            backoff: BACKOFF_MIN,
            retry_at: None,
        }
    }

    fn failed(&mut self) {
        self.backoff = if self.healthy {
            BACKOFF_MIN
        } else {
            (self.backoff * 2).min(BACKOFF_MAX)
        };
        self.healthy = false;
        self.retry_at = Some(Instant::now() + self.backoff);
    }

    fn recovered(&mut self) {
        if !self.healthy {
            tracing::info!("usage ledger writes recovered");
        }
        *self = Health::new();
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

// === impl Flusher ===

impl std::fmt::Debug for Flusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The ledger is a trait object without Debug.
        f.debug_struct("Flusher")
            .field("spool", &self.spool.dir)
            .field("batch_max", &self.batch_max)
            .field("flush_every", &self.flush_every)
            .finish_non_exhaustive()
    }
}

impl Flusher {
    /// The counters this pipeline updates.
    pub fn counters(&self) -> Arc<UsageCounters> {
        self.counters.clone()
    }

    /// Runs until `shutdown` resolves (or every sink is dropped): batches (up to `batch_max`, or
    /// whatever is waiting every `flush_every`) → `ledger.insert_usage`.
    ///
    /// A failed insert writes the batch to the spool and retries the spool with backoff
    /// (200 ms doubling to 30 s). Spooled files (from overflow, failures, or a previous crash)
    /// are replayed into the ledger at start and whenever the ledger works again, then deleted.
    ///
    /// On shutdown: closes intake (later `record`s go to the spool, kept for the next start),
    /// drains the channel completely, flushes, replays the spool once, returns the counts. With
    /// the ledger down this costs at most one failed ledger call; bound the whole with the
    /// shutdown grace.
    /// Moves everything queued into `batch`, flushing each full batch. True when every sink is gone.
    async fn take_queued(&mut self, batch: &mut Vec<UsageEvent>, health: &mut Health) -> bool {
        loop {
            match self.rx.try_recv() {
                Ok(ev) => {
                    batch.push(ev);
                    if batch.len() >= self.batch_max {
                        self.flush(batch, health).await;
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => return false,
                Err(mpsc::error::TryRecvError::Disconnected) => return true,
            }
        }
    }

    pub async fn run(mut self, shutdown: impl Future<Output = ()> + Send) -> FlushStats {
        let mut health = Health::new();
        let mut batch = Vec::with_capacity(self.batch_max);
        // Whatever a previous run (or crash) left.
        self.replay_or_back_off(&mut health).await;

        // The first tick one interval from now: `interval`'s immediate first tick would flush
        // whatever the first requests queued at an arbitrary moment after start.
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + self.flush_every,
            self.flush_every,
        );
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            // The queue is drained on the tick (or when a sink finds it half full), not on every
            // event: waking this task once per request cost more CPU than the inserts themselves.
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                () = sleep_until(health.retry_at) => {
                    self.replay_or_back_off(&mut health).await;
                    continue;
                }
                _ = tick.tick() => {}
                () = self.wake.notified() => {}
            }
            let closed = self.take_queued(&mut batch, &mut health).await;
            if !batch.is_empty() {
                self.flush(&mut batch, &mut health).await;
            }
            // Overflow while the ledger is fine: bring it in now, not at the next start.
            if health.healthy && self.spool.take_pending() {
                self.replay_or_back_off(&mut health).await;
            }
            if health.healthy {
                self.counters.caught_up();
            }
            if closed {
                break; // every sink is gone: nothing more can arrive
            }
        }

        // Shutdown. A ledger known to be down gets one probe (the replay) instead of one failed
        // insert per remaining batch.
        self.rx.close();
        if !health.healthy {
            self.replay_or_back_off(&mut health).await;
        }
        loop {
            let limit = self.batch_max - batch.len();
            if self.rx.recv_many(&mut batch, limit).await == 0 {
                break;
            }
            if batch.len() >= self.batch_max {
                self.flush(&mut batch, &mut health).await;
            }
        }
        if !batch.is_empty() {
            self.flush(&mut batch, &mut health).await;
        }
        if health.healthy {
            self.replay_or_back_off(&mut health).await;
        }
        let stats = self.counters.snapshot();
        tracing::info!(?stats, "usage flusher stopped");
        stats
    }

    /// Writes `batch` to the ledger, or to the spool if the ledger is down or fails now; leaves
    /// `batch` empty.
    async fn flush(&self, batch: &mut Vec<UsageEvent>, health: &mut Health) {
        if health.healthy {
            match self.insert(batch).await {
                Ok(inserted) => {
                    self.counters.inserted_of(batch.len(), inserted);
                    batch.clear();
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, events = batch.len(), "usage insert failed; spooling");
                    health.failed();
                }
            }
        }
        UsageCounters::add(&self.counters.failed, batch.len());
        // A synchronous append from the flusher task: only while the ledger is down, one
        // buffered write per batch.
        match self.spool.append(batch) {
            Ok(()) => UsageCounters::add(&self.counters.spooled, batch.len()),
            Err(e) => {
                UsageCounters::add(&self.counters.lost, batch.len());
                tracing::error!(
                    error = %e, spool = %self.spool.dir.display(), events = batch.len(),
                    "usage events lost: the ledger failed and so did the spool write"
                );
            }
        }
        batch.clear();
    }

    /// `insert_usage` bounded by [`INSERT_TIMEOUT`].
    async fn insert(&self, events: &[UsageEvent]) -> Result<u64, LedgerError> {
        tokio::time::timeout(INSERT_TIMEOUT, self.ledger.insert_usage(events))
            .await
            .unwrap_or(Err(LedgerError::Timeout {
                op: "insert_usage",
                after: INSERT_TIMEOUT,
            }))
    }

    async fn replay_or_back_off(&self, health: &mut Health) {
        match self.replay().await {
            Ok(()) => health.recovered(),
            Err(e) => {
                tracing::warn!(error = %e, "usage spool replay failed; will retry");
                health.failed();
            }
        }
    }

    /// Replays every closed spool file, oldest first, deleting each once it is in the ledger.
    /// Stops at the first ledger error (the rest waits for the next try). A file that cannot be
    /// read is logged and left in place; it does not count as a ledger failure.
    async fn replay(&self) -> Result<(), LedgerError> {
        self.spool.rotate();
        let files = match self.spool.closed_files().await {
            Ok(files) => files,
            Err(e) => {
                tracing::error!(error = %e, spool = %self.spool.dir.display(), "cannot list the usage spool");
                return Ok(());
            }
        };
        for path in files {
            match self.replay_file(&path).await {
                Ok(ReplayedFile { events, unreadable }) => {
                    UsageCounters::add(&self.counters.lost, unreadable);
                    if unreadable > 0 {
                        tracing::error!(file = %path.display(), lines = unreadable, "unreadable usage spool lines dropped");
                    }
                    tracing::info!(file = %path.display(), events, "usage spool file replayed");
                    if let Err(e) = tokio::fs::remove_file(&path).await {
                        // It will be replayed again: harmless (ids), but say why it stays.
                        tracing::warn!(error = %e, file = %path.display(), "cannot delete replayed spool file");
                    }
                }
                Err(ReplayError::Ledger(e)) => return Err(e),
                Err(ReplayError::Io(e)) => {
                    tracing::error!(error = %e, file = %path.display(), "cannot read usage spool file; left in place");
                }
            }
        }
        Ok(())
    }

    /// Streams one spool file into the ledger in `batch_max` chunks (files may be large).
    async fn replay_file(&self, path: &Path) -> Result<ReplayedFile, ReplayError> {
        let file = tokio::fs::File::open(path).await.map_err(ReplayError::Io)?;
        let mut reader = tokio::io::BufReader::new(file);
        let mut line = Vec::new();
        let mut chunk = Vec::with_capacity(self.batch_max);
        let mut done = ReplayedFile::default();
        loop {
            line.clear();
            // Bytes, not `lines()`: a torn last line (crash mid-append) must not stop the file.
            let n = reader
                .read_until(b'\n', &mut line)
                .await
                .map_err(ReplayError::Io)?;
            if n == 0 {
                break;
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<UsageEvent>(&line) {
                Ok(ev) => chunk.push(ev),
                Err(_) => done.unreadable += 1,
            }
            if chunk.len() >= self.batch_max {
                self.insert_replayed(&chunk).await?;
                done.events += chunk.len();
                chunk.clear();
            }
        }
        if !chunk.is_empty() {
            self.insert_replayed(&chunk).await?;
            done.events += chunk.len();
        }
        Ok(done)
    }

    async fn insert_replayed(&self, chunk: &[UsageEvent]) -> Result<(), ReplayError> {
        let inserted = self.insert(chunk).await.map_err(ReplayError::Ledger)?;
        self.counters.inserted_of(chunk.len(), inserted);
        Ok(())
    }
}

#[derive(Debug, Default)]
struct ReplayedFile {
    events: usize,
    unreadable: usize,
}

#[derive(Debug)]
enum ReplayError {
    Ledger(LedgerError),
    Io(std::io::Error),
}

/// The overflow spool: one open append-only file at a time, closed files waiting for replay.
#[derive(Debug)]
struct Spool {
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
    fn new(dir: PathBuf) -> Spool {
        Spool {
            dir,
            active: Mutex::new(None),
            pending: AtomicBool::new(false),
        }
    }

    /// Appends events as JSON lines and flushes them to the OS before returning. Serializes
    /// outside the lock so contending request threads wait only for the write.
    fn append(&self, events: &[UsageEvent]) -> std::io::Result<()> {
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
    fn rotate(&self) {
        let mut active = self.active.lock().unwrap_or_else(PoisonError::into_inner);
        *active = None;
    }

    /// Clears and returns the "something was spooled" flag.
    fn take_pending(&self) -> bool {
        self.pending.swap(false, Ordering::Acquire)
    }

    /// Spool files not currently open for appends, oldest first.
    async fn closed_files(&self) -> std::io::Result<Vec<PathBuf>> {
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

#[cfg(test)]
mod tests {
    use std::time::Instant as StdInstant;

    use chrono::Duration as ChronoDuration;
    use tokio::sync::oneshot;

    use super::*;
    use crate::ledger::open;
    use crate::ledger::test_support::{events, t0, PgSchema, TempDir};

    /// Rows for `customer`/`api_calls` in the day after `t0`.
    async fn rows(ledger: &Arc<dyn Ledger>, customer: &str) -> i64 {
        ledger
            .usage_totals(customer, "api_calls", t0(), t0() + ChronoDuration::days(1))
            .await
            .expect("totals")
            .1
    }

    /// Spool files present in `dir`.
    fn spool_files(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .map(|d| d.filter(|e| e.is_ok()).count())
            .unwrap_or(0)
    }

    /// Polls `cond` every 10 ms until it holds or `secs` pass.
    async fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = StdInstant::now() + std::time::Duration::from_secs(secs);
        while !cond() {
            assert!(StdInstant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Starts the flusher on its own task; returns the trigger and the join handle.
    fn spawn(flusher: Flusher) -> (oneshot::Sender<()>, tokio::task::JoinHandle<FlushStats>) {
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(flusher.run(async {
            let _ = stopped.await;
        }));
        (stop, handle)
    }

    async fn check_ten_thousand_through_small_channel(ledger: Arc<dyn Ledger>) {
        let dir = TempDir::new();
        let spool = dir.path().join("spool");
        let (sink, flusher) = pipeline(
            ledger.clone(),
            16,
            spool.clone(),
            64,
            Duration::from_millis(5),
        );
        let counters = sink.counters();
        let (stop, handle) = spawn(flusher);
        let (mut queued, mut spooled) = (0u64, 0u64);
        for ev in events(10_000, "acme", "api_calls") {
            match sink.record(ev) {
                Recorded::Queued => queued += 1,
                Recorded::Spooled => spooled += 1,
                Recorded::Lost => panic!("lost an event"),
            }
        }
        assert!(spooled > 0, "a 16-slot channel must overflow");
        assert_eq!(queued + spooled, 10_000);
        // Overflow comes in while running (not only at shutdown).
        wait_for(60, "all rows inserted", || counters.inserted() == 10_000).await;
        let _ = stop.send(());
        let stats = handle.await.expect("flusher task");
        assert_eq!(rows(&ledger, "acme").await, 10_000);
        assert_eq!(
            stats,
            FlushStats {
                queued,
                inserted: 10_000,
                duplicates: 0,
                spooled,
                failed: 0,
                lost: 0
            }
        );
        assert_eq!(spool_files(&spool), 0, "replayed files are deleted");
    }

    async fn check_shutdown_drains(ledger: Arc<dyn Ledger>) {
        let dir = TempDir::new();
        // Nothing would flush before shutdown on its own: big batches, an hour between ticks.
        let (sink, flusher) = pipeline(
            ledger.clone(),
            4096,
            dir.path().join("spool"),
            10_000,
            Duration::from_secs(3600),
        );
        let (stop, handle) = spawn(flusher);
        for ev in events(3000, "acme", "api_calls") {
            assert_eq!(sink.record(ev), Recorded::Queued);
        }
        let _ = stop.send(());
        let stats = handle.await.expect("flusher task");
        assert_eq!(stats.inserted, 3000);
        assert_eq!(rows(&ledger, "acme").await, 3000);
    }

    /// Postgres: 10k events through a 16-slot channel end as exactly 10k rows (overflow via spool).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pg_ten_thousand_events_through_small_channel() {
        let s = PgSchema::new();
        check_ten_thousand_through_small_channel(s.open().await).await;
    }

    /// SQLite: 10k events through a 16-slot channel end as exactly 10k rows (overflow via spool).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_ten_thousand_events_through_small_channel() {
        let dir = TempDir::new();
        check_ten_thousand_through_small_channel(
            open(&dir.sqlite_url(), None).await.expect("open"),
        )
        .await;
    }

    /// Postgres: events still in the channel at shutdown are all written before `run` returns.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pg_shutdown_drains_the_channel() {
        let s = PgSchema::new();
        check_shutdown_drains(s.open().await).await;
    }

    /// SQLite: events still in the channel at shutdown are all written before `run` returns.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_shutdown_drains_the_channel() {
        let dir = TempDir::new();
        check_shutdown_drains(open(&dir.sqlite_url(), None).await.expect("open")).await;
    }

    /// Ledger down (its schema dropped) → every event is spooled; once it is back, the flusher
    /// replays the spool on its own and the ledger ends with exactly the events recorded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ledger_down_spools_then_replays_on_recovery() {
        let s = PgSchema::new();
        let ledger = s.open().await;
        s.drop_schema().await;
        let dir = TempDir::new();
        let spool = dir.path().join("spool");
        let (sink, flusher) = pipeline(
            ledger.clone(),
            32,
            spool.clone(),
            50,
            Duration::from_millis(5),
        );
        let counters = sink.counters();
        let (stop, handle) = spawn(flusher);
        for ev in events(1000, "acme", "api_calls") {
            assert_ne!(sink.record(ev), Recorded::Lost);
        }
        wait_for(30, "all events spooled", || counters.spooled() == 1000).await;
        assert_eq!(counters.inserted(), 0);
        assert!(counters.failed() > 0);
        assert!(spool_files(&spool) > 0);

        // Bring the ledger back: recreate the schema and tables under the same pool.
        let _again = s.open().await;
        wait_for(30, "replay after recovery", || counters.inserted() == 1000).await;
        let _ = stop.send(());
        let stats = handle.await.expect("flusher task");
        assert_eq!(rows(&ledger, "acme").await, 1000);
        assert_eq!((stats.inserted, stats.lost), (1000, 0));
        assert_eq!(spool_files(&spool), 0);
    }

    /// A run whose ledger stayed down leaves its events in the spool; the next run replays them
    /// at start into a working ledger, exactly once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spool_left_by_a_failed_run_is_replayed_at_next_start() {
        let s = PgSchema::new();
        let down = s.open().await;
        s.drop_schema().await;
        let dir = TempDir::new();
        let spool = dir.path().join("spool");

        let (sink, flusher) = pipeline(down, 8, spool.clone(), 20, Duration::from_millis(5));
        let (stop, handle) = spawn(flusher);
        for ev in events(500, "acme", "api_calls") {
            assert_ne!(sink.record(ev), Recorded::Lost);
        }
        let _ = stop.send(());
        let first = handle.await.expect("flusher task");
        assert_eq!((first.inserted, first.spooled, first.lost), (0, 500, 0));
        assert!(spool_files(&spool) > 0);

        let up = s.open().await;
        let (_sink, flusher) = pipeline(up.clone(), 8, spool.clone(), 20, Duration::from_millis(5));
        let second = flusher.run(async {}).await;
        assert_eq!((second.inserted, second.duplicates), (500, 0));
        assert_eq!(rows(&up, "acme").await, 500);
        assert_eq!(spool_files(&spool), 0);
    }

    /// A full channel spools (and reports it); a sink whose flusher is gone still spools; all of it
    /// reaches the ledger once a flusher runs.
    #[tokio::test]
    async fn record_reports_queued_and_spooled() {
        let dir = TempDir::new();
        let ledger = open(&dir.sqlite_url(), None).await.expect("open");
        let spool = dir.path().join("spool");
        let (sink, flusher) = pipeline(
            ledger.clone(),
            1,
            spool.clone(),
            10,
            Duration::from_millis(5),
        );
        let evs = events(3, "acme", "api_calls");
        assert_eq!(sink.record(evs[0].clone()), Recorded::Queued);
        assert_eq!(sink.queue_depth(), 1);
        assert_eq!(sink.record(evs[1].clone()), Recorded::Spooled);
        let stats = flusher.run(async {}).await;
        assert_eq!(stats.inserted, 2);
        // The flusher is gone: the channel is closed, the spool still takes events.
        assert_eq!(sink.record(evs[2].clone()), Recorded::Spooled);
        let (_sink2, flusher2) = pipeline(ledger.clone(), 1, spool, 10, Duration::from_millis(5));
        assert_eq!(flusher2.run(async {}).await.inserted, 1);
        assert_eq!(rows(&ledger, "acme").await, 3);
    }

    /// An unwritable spool is the only way to lose an event, and it is reported and counted.
    #[tokio::test]
    async fn record_reports_lost_when_the_spool_cannot_be_written() {
        let dir = TempDir::new();
        let ledger = open(&dir.sqlite_url(), None).await.expect("open");
        // A directory under a regular file cannot exist, even for root.
        let blocker = dir.path().join("not-a-dir");
        std::fs::write(&blocker, b"x").expect("write blocker");
        let (sink, _flusher) = pipeline(
            ledger,
            1,
            blocker.join("spool"),
            10,
            Duration::from_millis(5),
        );
        let evs = events(2, "acme", "api_calls");
        assert_eq!(sink.record(evs[0].clone()), Recorded::Queued);
        assert_eq!(sink.record(evs[1].clone()), Recorded::Lost);
        assert_eq!(sink.counters().lost(), 1);
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
        );
        let stats = flusher.run(async {}).await;
        assert_eq!((stats.inserted, stats.lost), (3, 3));
        assert_eq!(rows(&ledger, "acme").await, 3);
        assert!(!spool.join("spool-0.jsonl").exists());
        assert!(spool.join("README").exists());
    }
}

//! The background writer: takes events from the channel in batches, writes them to the ledger,
//! and replays the spool into it.
//!
//! Owns: batching, the ledger's health as seen from here (the backoff while it is down), the
//! insert timeout, the replay loop (list → read → insert → delete) and the shutdown drain. Must
//! not touch: the request path (it only holds the channel's receiving end; sinks never wait for
//! it) and the spool's file format (`spool` reads and writes the files; only deleting a replayed
//! file is done here).

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio::time::{Instant, MissedTickBehavior};

use super::spool::{Spool, SpoolFile};
use super::{FlushStats, UsageCounters, UsageSink};
use crate::ledger::{Ledger, LedgerError, UsageEvent};

/// First retry after the ledger fails; doubles per further failure up to [`BACKOFF_MAX`] while it
/// stays down (`crate::backoff::wait`).
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Longest one ledger insert may take before the flusher treats the ledger as down. A batch
/// normally takes milliseconds; a half-open connection could otherwise stall the flusher for
/// minutes. If the insert did commit after all, the spool replay finds duplicates: harmless.
const INSERT_TIMEOUT: Duration = Duration::from_secs(10);

/// The background writer. Run it once with [`Flusher::run`].
pub struct Flusher {
    rx: mpsc::Receiver<UsageEvent>,
    wake: Arc<Notify>,
    ledger: Arc<dyn Ledger>,
    spool: Arc<Spool>,
    counters: Arc<UsageCounters>,
    journal: Option<Arc<crate::journal::Journal>>,
    batch_max: usize,
    flush_every: Duration,
}

/// Ledger health as the flusher sees it: while unhealthy, new batches go straight to the spool
/// and only the backoff timer probes the ledger (by replaying the spool), so an outage costs one
/// failed call per backoff step rather than one per batch.
#[derive(Debug)]
struct Health {
    /// Ledger calls failed in a row; 0 = healthy. The backoff is computed from it.
    failures: u32,
    /// When the backoff timer probes the ledger next; `None` while healthy.
    retry_at: Option<Instant>,
}

impl Health {
    fn new() -> Health {
        Health {
            failures: 0,
            retry_at: None,
        }
    }

    fn healthy(&self) -> bool {
        self.failures == 0
    }

    /// The wait before the next probe: 200 ms after the first failure, doubling, at most 30 s.
    fn backoff(&self) -> Duration {
        crate::backoff::wait(BACKOFF_FIRST, self.failures, BACKOFF_MAX)
    }

    fn failed(&mut self) {
        self.failures = self.failures.saturating_add(1);
        self.retry_at = Some(Instant::now() + self.backoff());
    }

    fn recovered(&mut self) {
        if !self.healthy() {
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
            .field("spool", &self.spool.dir())
            .field("batch_max", &self.batch_max)
            .field("flush_every", &self.flush_every)
            .finish_non_exhaustive()
    }
}

impl Flusher {
    /// The flusher half of [`super::pipeline`], sharing `sink`'s spool, counters and wake-up.
    /// Raises a zero `batch_max` to 1 (the shutdown drain stops at an empty receive of up to
    /// `batch_max` events) and a zero `flush_every` to 1 ms.
    pub(super) fn new(
        rx: mpsc::Receiver<UsageEvent>,
        sink: &UsageSink,
        ledger: Arc<dyn Ledger>,
        batch_max: usize,
        flush_every: Duration,
    ) -> Flusher {
        Flusher {
            rx,
            wake: sink.wake.clone(),
            ledger,
            spool: sink.spool.clone(),
            counters: sink.counters.clone(),
            journal: sink.journal.clone(),
            batch_max: batch_max.max(1),
            flush_every: flush_every.max(Duration::from_millis(1)),
        }
    }

    /// Runs until `shutdown` resolves (or every sink is dropped): batches (up to `batch_max`, or
    /// whatever is waiting every `flush_every`) → `ledger.insert_usage`.
    ///
    /// A failed insert writes the batch to the spool and retries the spool with backoff
    /// (200 ms doubling to 30 s). Spooled files (from overflow, failures, or a previous crash)
    /// are replayed into the ledger at start and whenever the ledger works again, then deleted.
    ///
    /// On shutdown: closes intake (later `record`s go to the spool, kept for the next start),
    /// probes a ledger known to be down once (a replay), drains the channel completely, flushes,
    /// replays the spool once more if the ledger works, returns the counts. With the ledger down
    /// this costs at most one failed ledger call; with it up, the final replay takes as long as
    /// the spool is big. Bound the whole with the shutdown grace.
    pub async fn run(mut self, shutdown: impl Future<Output = ()> + Send) -> FlushStats {
        let mut health = Health::new();
        let mut batch = Vec::with_capacity(self.batch_max);
        // Whatever a previous run (or crash) left.
        self.replay_or_back_off(&mut health).await;

        // The first tick one interval from now: `interval`'s immediate first tick would flush
        // whatever the first requests queued at an arbitrary moment after start.
        let mut tick =
            tokio::time::interval_at(Instant::now() + self.flush_every, self.flush_every);
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
            if health.healthy() && self.spool.take_pending() {
                self.replay_or_back_off(&mut health).await;
            }
            if health.healthy() {
                self.counters.caught_up();
            }
            if closed {
                break; // every sink is gone: nothing more can arrive
            }
        }

        // Shutdown. A ledger known to be down gets one probe (the replay) instead of one failed
        // insert per remaining batch.
        self.rx.close();
        if !health.healthy() {
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
        if health.healthy() {
            self.replay_or_back_off(&mut health).await;
        }
        let stats = self.counters.snapshot();
        tracing::info!(
            queued = stats.queued,
            inserted = stats.inserted,
            duplicates = stats.duplicates,
            spooled = stats.spooled,
            failed = stats.failed,
            lost = stats.lost,
            "usage flusher stopped"
        );
        stats
    }

    /// Moves everything queued into `batch`, flushing each full batch. True when every sink is
    /// gone.
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

    /// Writes `batch` to the ledger, or to the spool if the ledger is down or fails now; leaves
    /// `batch` empty.
    async fn flush(&self, batch: &mut Vec<UsageEvent>, health: &mut Health) {
        if health.healthy() {
            match self.insert(batch).await {
                Ok(inserted) => {
                    self.counters.inserted_of(batch.len(), inserted);
                    super::mark_safe(self.journal.as_deref(), batch);
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
            Ok(()) => {
                UsageCounters::add(&self.counters.spooled, batch.len());
                super::mark_safe(self.journal.as_deref(), batch);
            }
            Err(e) => {
                UsageCounters::add(&self.counters.lost, batch.len());
                tracing::error!(
                    error = %e, spool = %self.spool.dir().display(), events = batch.len(),
                    "usage events lost: the ledger failed and so did the spool write"
                );
            }
        }
        batch.clear();
    }

    /// Rows a crashed process owed (from its journal, [`crate::journal::Leftover::owed`]):
    /// into the ledger now, or the spool when the ledger fails. Runs before anything is served,
    /// so an embedded counter rebuilt from the ledger includes them. True when every row is
    /// safe (the journal's leftovers may then be deleted).
    pub async fn recover(&self, rows: Vec<UsageEvent>) -> bool {
        let lost_before = self
            .counters
            .lost
            .load(std::sync::atomic::Ordering::Relaxed);
        let mut health = Health::new();
        let total = rows.len();
        for chunk in rows.chunks(self.batch_max) {
            self.flush(&mut chunk.to_vec(), &mut health).await;
        }
        if total > 0 {
            tracing::info!(
                rows = total,
                "charges a crashed process had not recorded were recovered from its journal"
            );
        }
        self.counters
            .lost
            .load(std::sync::atomic::Ordering::Relaxed)
            == lost_before
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

    /// Replays the spool; a ledger error starts (or lengthens) the backoff, success ends it.
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
                tracing::error!(error = %e, spool = %self.spool.dir().display(), "cannot list the usage spool");
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
        let mut file = SpoolFile::open(path).await.map_err(ReplayError::Io)?;
        let mut chunk = Vec::with_capacity(self.batch_max);
        let mut events = 0;
        loop {
            file.read_chunk(&mut chunk, self.batch_max)
                .await
                .map_err(ReplayError::Io)?;
            if chunk.is_empty() {
                break;
            }
            let inserted = self.insert(&chunk).await.map_err(ReplayError::Ledger)?;
            self.counters.inserted_of(chunk.len(), inserted);
            events += chunk.len();
            chunk.clear();
        }
        Ok(ReplayedFile {
            events,
            unreadable: file.unreadable(),
        })
    }
}

/// What one replayed spool file held.
#[derive(Debug)]
struct ReplayedFile {
    events: usize,
    unreadable: usize,
}

#[derive(Debug)]
enum ReplayError {
    Ledger(LedgerError),
    Io(std::io::Error),
}

#[cfg(test)]
mod tests {
    use std::time::Instant as StdInstant;

    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    use super::*;
    use crate::ledger::open;
    use crate::ledger::test_support::{events, PgSchema, TempDir};
    use crate::usage::tests::rows;
    use crate::usage::{pipeline, Recorded};

    /// A pipeline on `ledger` spooling to `spool`, its flusher running on its own task: the
    /// sink, the trigger that stops the flusher, and the flusher's join handle.
    fn start(
        ledger: &Arc<dyn Ledger>,
        spool: &Path,
        capacity: usize,
        batch_max: usize,
        flush_every: Duration,
    ) -> (UsageSink, oneshot::Sender<()>, JoinHandle<FlushStats>) {
        let (sink, flusher) = pipeline(
            ledger.clone(),
            capacity,
            spool.to_path_buf(),
            batch_max,
            flush_every,
            None,
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(flusher.run(async {
            let _ = stopped.await;
        }));
        (sink, stop, handle)
    }

    /// Spool files present in `dir`.
    fn spool_files(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .map(|d| d.filter(|e| e.is_ok()).count())
            .unwrap_or(0)
    }

    /// Polls `cond` every 10 ms until it holds or `secs` pass.
    async fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = StdInstant::now() + Duration::from_secs(secs);
        while !cond() {
            assert!(StdInstant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The ledger is probed 200 ms after the first failure, then at double the wait each time up
    /// to 30 s; a success resets it.
    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut health = Health::new();
        assert!(health.healthy());
        assert_eq!(health.retry_at, None);
        let mut waits = Vec::new();
        for _ in 0..10 {
            health.failed();
            assert!(!health.healthy());
            assert!(health.retry_at.is_some());
            waits.push(health.backoff().as_millis());
        }
        assert_eq!(
            waits,
            [200, 400, 800, 1600, 3200, 6400, 12_800, 25_600, 30_000, 30_000]
        );
        health.recovered();
        assert!(health.healthy());
        assert_eq!(health.retry_at, None);
        health.failed();
        assert_eq!(health.backoff(), BACKOFF_FIRST);
    }

    async fn check_ten_thousand_through_small_channel(ledger: Arc<dyn Ledger>) {
        let dir = TempDir::new();
        let spool = dir.path().join("spool");
        let (sink, stop, handle) = start(&ledger, &spool, 16, 64, Duration::from_millis(5));
        let counters = sink.counters();
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
        wait_for(60, "all rows inserted", || {
            counters.snapshot().inserted == 10_000
        })
        .await;
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
        let spool = dir.path().join("spool");
        let (sink, stop, handle) = start(&ledger, &spool, 4096, 10_000, Duration::from_secs(3600));
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
        let (sink, stop, handle) = start(&ledger, &spool, 32, 50, Duration::from_millis(5));
        let counters = sink.counters();
        for ev in events(1000, "acme", "api_calls") {
            assert_ne!(sink.record(ev), Recorded::Lost);
        }
        wait_for(30, "all events spooled", || {
            counters.snapshot().spooled == 1000
        })
        .await;
        assert_eq!(counters.snapshot().inserted, 0);
        assert!(counters.snapshot().failed > 0);
        assert!(spool_files(&spool) > 0);

        // Bring the ledger back: recreate the schema and tables under the same pool.
        let _again = s.open().await;
        wait_for(30, "replay after recovery", || {
            counters.snapshot().inserted == 1000
        })
        .await;
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

        let (sink, stop, handle) = start(&down, &spool, 8, 20, Duration::from_millis(5));
        for ev in events(500, "acme", "api_calls") {
            assert_ne!(sink.record(ev), Recorded::Lost);
        }
        let _ = stop.send(());
        let first = handle.await.expect("flusher task");
        assert_eq!((first.inserted, first.spooled, first.lost), (0, 500, 0));
        assert!(spool_files(&spool) > 0);

        let up = s.open().await;
        let (_sink, flusher) = pipeline(
            up.clone(),
            8,
            spool.clone(),
            20,
            Duration::from_millis(5),
            None,
        );
        let second = flusher.run(async {}).await;
        assert_eq!((second.inserted, second.duplicates), (500, 0));
        assert_eq!(rows(&up, "acme").await, 500);
        assert_eq!(spool_files(&spool), 0);
    }
}

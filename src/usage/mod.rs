//! The asynchronous usage pipeline (DESIGN §1 "usage flusher", STYLE 6): the request path hands
//! each charged request to a [`UsageSink`], a background [`Flusher`] writes them to the ledger in
//! batches.
//!
//! The pipeline owns the bounded channel, the disk spool and the [`UsageCounters`]. It must never
//! make the request path await: [`UsageSink::record`] is a synchronous `try_send`, and when the
//! channel is full (or the flusher is gone) the event is appended to the spool instead, so nothing
//! is dropped silently. Whatever reaches the spool — overflow, batches the ledger refused, files a
//! crashed process left — is replayed into the ledger by the flusher and then deleted. Replays are
//! idempotent because event ids are the ledger's primary key.
//!
//! This file owns the request path's half: the sink, the counters, [`Recorded`] and [`pipeline`],
//! which wires the two halves together. A row that is safe (in the ledger or the spool) is
//! reported to the [`Journal`], which then forgets its reservation. It must not touch the
//! ledger (only the flusher writes to it) or the spool's files (only through `spool`'s
//! methods).
//!
//! - `flusher`: the background writer: batching, ledger health and backoff, the replay loop.
//! - `spool`: the disk spool: file format, rotation, listing and reading closed files.

mod flusher;
mod spool;

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};

use crate::journal::Journal;
use crate::ledger::{Ledger, UsageEvent};
use spool::Spool;

pub use flusher::Flusher;

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

/// Event counters shared by the sink and the flusher: the ledger lag behind
/// `tollgate_ledger_lag_seconds` (DESIGN §6) and the [`FlushStats`] that [`Flusher::run`] returns.
/// (`tollgate_usage_events_total{outcome}` is brought up to `queued`, `spooled` and `lost` at
/// scrape time.)
/// Monotonic; each count is one [`FlushStats`] field, which says what it counts.
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
            // Not 0: the lag is measured from start until the flusher's first check.
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
    /// All counters at once (each read individually; they may be a few events apart).
    pub(crate) fn snapshot(&self) -> FlushStats {
        let n = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        FlushStats {
            queued: n(&self.queued),
            inserted: n(&self.inserted),
            duplicates: n(&self.duplicates),
            spooled: n(&self.spooled),
            failed: n(&self.failed),
            lost: n(&self.lost),
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
    wake: Arc<Notify>,
    /// Told when an event's row is safe (in the ledger or the spool): its reservation's journal
    /// line is then no longer needed.
    journal: Option<Arc<Journal>>,
}

/// Creates the pair. `capacity` = channel bound, `spool_dir` = where overflow and failed batches
/// go (created on first use), `batch_max` = most events per ledger insert, `flush_every` = longest
/// an event waits in a partial batch, `journal` = told which rows are safe. Zero values are
/// raised to the smallest workable ones.
pub fn pipeline(
    ledger: Arc<dyn Ledger>,
    capacity: usize,
    spool_dir: PathBuf,
    batch_max: usize,
    flush_every: Duration,
    journal: Option<Arc<Journal>>,
) -> (UsageSink, Flusher) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let sink = UsageSink {
        tx,
        spool: Arc::new(Spool::new(spool_dir)),
        counters: Arc::default(),
        wake: Arc::default(),
        journal,
    };
    let flusher = Flusher::new(rx, &sink, ledger, batch_max, flush_every);
    (sink, flusher)
}

/// These events' rows are in the ledger or the spool: their reservations' journal lines may go
/// (the sink's spool appends and the flusher's inserts and spool appends all end here).
fn mark_safe(journal: Option<&Journal>, events: &[UsageEvent]) {
    if let Some(journal) = journal {
        journal.resolve(events.iter().map(|e| e.id));
    }
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
                        mark_safe(self.journal.as_deref(), std::slice::from_ref(&ev));
                        Recorded::Spooled
                    }
                    Err(e) => {
                        UsageCounters::add(&self.counters.lost, 1);
                        tracing::error!(
                            error = %e, spool = %self.spool.dir().display(), event = %ev.id,
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

    /// Bytes waiting in the spool's files (for `tollgate_usage_spool_bytes`).
    pub async fn spool_bytes(&self) -> u64 {
        self.spool.bytes_on_disk().await
    }

    /// The counters this pipeline updates.
    pub fn counters(&self) -> Arc<UsageCounters> {
        self.counters.clone()
    }
}

#[cfg(test)]
mod tests {
    //! The sink's tests, and `rows`, which the flusher's and the spool's tests use too.

    use chrono::Duration as ChronoDuration;

    use super::*;
    use crate::ledger::open;
    use crate::ledger::test_support::{events, t0, TempDir};

    /// Rows for `customer`/`api_calls` in the day after `t0`.
    pub(super) async fn rows(ledger: &Arc<dyn Ledger>, customer: &str) -> i64 {
        ledger
            .usage_totals(customer, "api_calls", t0(), t0() + ChronoDuration::days(1))
            .await
            .expect("totals")
            .1
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
            None,
        );
        let evs = events(3, "acme", "api_calls");
        assert_eq!(sink.record(evs[0].clone()), Recorded::Queued);
        assert_eq!(sink.queue_depth(), 1);
        assert_eq!(sink.record(evs[1].clone()), Recorded::Spooled);
        let stats = flusher.run(async {}).await;
        assert_eq!(stats.inserted, 2);
        // The flusher is gone: the channel is closed, the spool still takes events.
        assert_eq!(sink.record(evs[2].clone()), Recorded::Spooled);
        let (_sink2, flusher2) =
            pipeline(ledger.clone(), 1, spool, 10, Duration::from_millis(5), None);
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
            None,
        );
        let evs = events(2, "acme", "api_calls");
        assert_eq!(sink.record(evs[0].clone()), Recorded::Queued);
        assert_eq!(sink.record(evs[1].clone()), Recorded::Lost);
        assert_eq!(sink.counters().snapshot().lost, 1);
    }
}

//! The single-server batcher: the queue reservations wait in, the batches on the connection,
//! and what happens to a batch nobody waits for any more (cancelled by `cancel.lua`, or a late
//! grant refunded). See the parent module for why batching leaves exactness unchanged.
//!
//! Owns: forming, journaling, sending and answering batches. Must not touch: keys and
//! arguments (the store builds each [`Job`]), seeding.

use super::{Conn, QuotaError, ADJUST, BATCH_KEY_TTL_MS, CANCEL, RESERVE};
use crate::journal::{Journal, Line};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Most reservations in one `EVALSHA` (bounds one call's time inside Redis).
const BATCH_MAX: usize = 64;

/// Most batches waiting for Redis at once: while one is on its way, the next gathers and is sent
/// too, instead of waiting for the first's answer. (More would only make batches smaller, and
/// Redis's cost per request larger, for no shorter wait.)
const BATCHES_IN_FLIGHT: usize = 4;

/// One reservation waiting for the batcher: two keys, six arguments (see `reserve.lua`).
pub(super) struct Job {
    pub keys: [String; 2],
    pub args: [i64; 6],
    /// Its journal line (written with the batch before it is sent).
    pub line: Option<Arc<Line>>,
    pub reply: oneshot::Sender<Result<(i64, i64), QuotaError>>,
}

/// A failed call that Redis may still execute (or may have executed): it timed out, or the
/// connection broke. A script error or a malformed answer means it ran to its end or not at all.
pub(super) fn may_run_late(e: &QuotaError) -> bool {
    match e {
        QuotaError::Timeout => true,
        QuotaError::Redis(e) => e.is_io_error() || e.is_timeout() || e.is_connection_dropped(),
        _ => false,
    }
}

/// Cancels a batch nobody waits for any more (`cancel.lua`), retrying while Redis is down, for
/// most of the batch key's lifetime.
pub(super) fn spawn_cancel(
    mut conn: Conn,
    batch_key: String,
    counters: Vec<String>,
    costs: Vec<i64>,
) {
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        let give_up = Duration::from_millis(BATCH_KEY_TTL_MS as u64 * 4 / 5);
        let mut failures = 0;
        loop {
            let mut inv = CANCEL.prepare_invoke();
            inv.key(&batch_key);
            for k in &counters {
                inv.key(k);
            }
            inv.arg(BATCH_KEY_TTL_MS);
            for c in &costs {
                inv.arg(*c);
            }
            match tokio::time::timeout(Duration::from_secs(5), conn.invoke::<i64>(&inv)).await {
                Ok(Ok(refunded)) => {
                    if refunded > 0 {
                        tracing::info!(refunded, "a reservation batch ran after its callers stopped waiting; its charges were refunded");
                    }
                    return;
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "cancelling a timed-out reservation batch")
                }
                Err(_) => tracing::debug!("cancelling a timed-out reservation batch: no answer"),
            }
            failures += 1;
            if started.elapsed() > give_up {
                tracing::warn!(batch = %batch_key, "could not cancel a timed-out reservation batch; if it ran, its charges stay counted");
                return;
            }
            let wait =
                crate::backoff::wait(Duration::from_millis(100), failures, Duration::from_secs(5));
            tokio::time::sleep(wait).await;
        }
    });
}

/// Refunds a charge whose caller stopped waiting before the answer came (`adjust.lua`, an
/// absent counter left alone: the next reservation seeds it from the ledger, which has no row
/// for this request).
fn spawn_refund(mut conn: Conn, counter: String, cost: i64, expiry: i64) {
    tokio::spawn(async move {
        let mut inv = ADJUST.prepare_invoke();
        inv.key(&counter).arg(-cost).arg(expiry).arg(1);
        match tokio::time::timeout(Duration::from_secs(5), conn.invoke::<i64>(&inv)).await {
            Ok(Ok(_)) => tracing::info!(
                cost,
                "refunded a reservation its caller stopped waiting for"
            ),
            _ => tracing::warn!(
                cost,
                "could not refund a reservation its caller stopped waiting for"
            ),
        }
    });
}

/// The batcher: sends whatever reservations are waiting (up to [`BATCH_MAX`]) as one `EVALSHA`,
/// under the store's deadline, and hands each request its answer. Up to [`BATCHES_IN_FLIGHT`]
/// batches are on the (multiplexed) connection at once, so a request waits for one round trip,
/// not for the batch before it too. They are sent in the order they were formed, and Redis runs
/// one connection's commands in order, so each customer's requests are still decided in order.
/// Ends when the store is dropped and the last batch has its answer.
pub(super) async fn batch_reservations(
    conn: Conn,
    mut rx: mpsc::Receiver<Job>,
    timeout: Duration,
    prefix: String,
    journal: Option<Arc<Journal>>,
) {
    use futures_util::stream::{FuturesUnordered, StreamExt};
    let mut in_flight = FuturesUnordered::new();
    let mut open = true;
    loop {
        let mut batch: Vec<Job> = Vec::with_capacity(BATCH_MAX);
        tokio::select! {
            // Answers first; and a batch just formed is polled (so sent) before the next forms.
            biased;
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            n = rx.recv_many(&mut batch, BATCH_MAX), if open && in_flight.len() < BATCHES_IN_FLIGHT => {
                if n == 0 {
                    open = false;
                    continue;
                }
                // A caller that gave up while its job waited here has its answer already (the
                // fallback's or a 503): the job must never run.
                batch.retain(|j| !j.reply.is_closed());
                if !batch.is_empty() {
                    let batch_key = format!("{prefix}:b:{}", uuid::Uuid::now_v7().simple());
                    in_flight.push(run_batch(conn.clone(), batch, batch_key, timeout, journal.clone()));
                }
            }
            else => return,
        }
    }
}

/// One batch: journaled, sent, answered (or cancelled when it may still run late).
async fn run_batch(
    mut conn: Conn,
    mut batch: Vec<Job>,
    batch_key: String,
    timeout: Duration,
    journal: Option<Arc<Journal>>,
) {
    let mut inv = RESERVE.prepare_invoke();
    for job in &batch {
        inv.key(&job.keys[0]).key(&job.keys[1]);
    }
    inv.key(&batch_key);
    for job in &batch {
        for a in job.args {
            inv.arg(a);
        }
    }
    inv.arg(BATCH_KEY_TTL_MS);
    // On disk before Redis can count it: if the process dies before the answer, recovery
    // asks Redis what this batch granted.
    if let Some(journal) = &journal {
        if batch.iter().any(|j| j.line.is_some()) {
            journal.sent(&batch_key, batch.iter().map(|j| j.line.as_deref()));
        }
    }
    let answer: Result<Vec<i64>, QuotaError> =
        match tokio::time::timeout(timeout, conn.invoke::<Vec<i64>>(&inv)).await {
            Ok(Ok(v)) if v.len() == 2 * batch.len() => Ok(v),
            Ok(Ok(v)) => Err(QuotaError::Protocol(format!(
                "reserve returned {} values for {} requests",
                v.len(),
                batch.len()
            ))),
            Ok(Err(e)) => Err(QuotaError::Redis(e)),
            Err(_) => Err(QuotaError::Timeout),
        };
    match answer {
        Ok(v) => {
            for (i, (job, pair)) in batch.drain(..).zip(v.chunks_exact(2)).enumerate() {
                let (code, value) = (pair[0], pair[1]);
                let id = job.line.as_ref().map(|line| line.id());
                let journal = journal.as_ref().zip(id);
                if let (Some((journal, id)), true) = (journal, code != 0) {
                    journal.resolve([id]); // nothing was charged (before the caller hears it)
                }
                let late = job.reply.send(Ok((code, value))).is_err();
                if let (Some((journal, id)), true) = (journal, code == 0 && late) {
                    journal.cancelled_in_batch(&batch_key, i, id);
                }
                if late && code == 0 {
                    let [counter, _] = job.keys;
                    spawn_refund(conn.clone(), counter, job.args[0], job.args[2]);
                }
            }
        }
        Err(e) => {
            if may_run_late(&e) {
                let counters = batch.iter().map(|j| j.keys[0].clone()).collect();
                let costs = batch.iter().map(|j| j.args[0]).collect();
                spawn_cancel(conn.clone(), batch_key, counters, costs);
            }
            let shared = e.to_string();
            let timed_out = matches!(e, QuotaError::Timeout);
            for job in batch.drain(..) {
                let _ = job.reply.send(Err(if timed_out {
                    QuotaError::Timeout
                } else {
                    QuotaError::Batch(shared.clone())
                }));
            }
        }
    }
}

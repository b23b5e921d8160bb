//! Units held for work in progress (`reservations`, issue 14): held, then settled once:
//! committed (with its usage row, in the same transaction), released, or expired. Each
//! transition is a conditional update of a `held` row, so of two settlements (two instances, a
//! retry, the expiry sweep) exactly one happens.
//!
//! Must not touch: quota counters (the caller gives back or adds the difference after the
//! commit).

use chrono::{DateTime, Utc};

use super::dialect::{Backend, ReadRow, Time};
use super::{LedgerError, SqlLedger};

/// A reservation as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// UUIDv7; also the id of the usage row a commit writes.
    pub id: uuid::Uuid,
    pub customer: String,
    pub meter: String,
    /// The quota period the units are held in (unix seconds).
    pub period_start: i64,
    pub period_end: i64,
    pub units: i64,
    /// `held`, `committed`, `released` or `expired`.
    pub state: String,
    pub expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    /// The units committed (commit only).
    pub settled_units: Option<i64>,
    pub settled_at: Option<DateTime<Utc>>,
}

/// What a settlement found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// Done by this call: the reservation as it was held.
    Done(Reservation),
    /// No such reservation.
    Unknown,
    /// Settled before (its state says how).
    AlreadySettled(Reservation),
    /// Past its expiry: expired now by this call (`true`: give its units back) or before.
    Expired(Reservation, bool),
}

const COLUMNS: &str = "id, customer, meter, period_start, period_end, units, state, expires_at, \
     created_at, settled_units, settled_at";

const HOLD: &str = "INSERT INTO reservations (id, customer, meter, period_start, period_end, \
       units, state, expires_at, created_at) VALUES ($1, $2, $3, $4, $5, $6, 'held', $7, $8)";

const SETTLE: &str = "UPDATE reservations SET state = $2, settled_units = $3, settled_at = $4 \
     WHERE id = $1 AND state = 'held'";

const USAGE_ROW: &str = "INSERT INTO usage_events \
       (id, ts, customer, meter, units, route, status, latency_us, request_id) \
     VALUES ($1, $2, $3, $4, $5, $6, 200, 0, $7)";

/// The route label of committed reservations' usage rows.
pub const ROUTE: &str = "_tollgate/reservations";

fn from_row<R: ReadRow>(r: &R) -> Result<Reservation, sqlx::Error> {
    Ok(Reservation {
        id: r.col("id")?,
        customer: r.col("customer")?,
        meter: r.col("meter")?,
        period_start: r.col("period_start")?,
        period_end: r.col("period_end")?,
        units: r.col("units")?,
        state: r.col("state")?,
        expires_at: r.time("expires_at")?,
        created_at: r.time("created_at")?,
        settled_units: r.col("settled_units")?,
        settled_at: r.opt_time("settled_at")?,
    })
}

/// Reservations of work in progress.
#[async_trait::async_trait]
pub trait ReservationLedger: Send + Sync {
    /// Stores a new `held` reservation.
    async fn hold_reservation(&self, r: &Reservation) -> Result<(), LedgerError>;
    async fn reservation(&self, id: uuid::Uuid) -> Result<Option<Reservation>, LedgerError>;
    /// Commits a held, unexpired reservation with `units` and writes its usage row (`ts` =
    /// `now`, route [`ROUTE`]) in one transaction. A held one past its expiry is expired instead.
    async fn commit_reservation(
        &self,
        id: uuid::Uuid,
        units: i64,
        now: DateTime<Utc>,
    ) -> Result<Settled, LedgerError>;
    /// Releases a held reservation (expired if past its expiry).
    async fn release_reservation(
        &self,
        id: uuid::Uuid,
        now: DateTime<Utc>,
    ) -> Result<Settled, LedgerError>;
    /// Expires up to `limit` held reservations past their expiry, each once across instances:
    /// the ones this call expired (give their units back).
    async fn expire_reservations(
        &self,
        now: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<Reservation>, LedgerError>;
}

/// Settles `id` to `state` if it is held and unexpired, in one transaction (with the usage row
/// of a commit).
async fn settle<DB: Backend>(
    ledger: &SqlLedger<DB>,
    id: uuid::Uuid,
    state: &str,
    units: Option<i64>,
    now: DateTime<Utc>,
) -> Result<Settled, LedgerError> {
    let op = "settle_reservation";
    let mut tx = DB::begin_write(ledger.pool())
        .await
        .map_err(LedgerError::query(op))?;
    let sql = format!(
        "SELECT {COLUMNS} FROM reservations WHERE id = $1{}",
        DB::FOR_UPDATE
    );
    let Some(row) = DB::sql(&sql)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(LedgerError::query(op))?
    else {
        return Ok(Settled::Unknown);
    };
    let r = from_row(&row).map_err(LedgerError::query(op))?;
    if r.state == "expired" {
        return Ok(Settled::Expired(r, false));
    }
    if r.state != "held" {
        return Ok(Settled::AlreadySettled(r));
    }
    let expired = now >= r.expires_at;
    let (to, settled_units) = if expired {
        ("expired", None)
    } else {
        (state, units)
    };
    DB::sql(SETTLE)
        .bind(id)
        .bind(to)
        .bind(settled_units)
        .bind(Time(now))
        .execute(&mut *tx)
        .await
        .map_err(LedgerError::query(op))?;
    if let (false, Some(units)) = (expired, settled_units) {
        DB::sql(USAGE_ROW)
            .bind(id)
            .bind(Time(now))
            .bind(r.customer.as_str())
            .bind(r.meter.as_str())
            .bind(units)
            .bind(ROUTE)
            .bind(id.to_string().as_str())
            .execute(&mut *tx)
            .await
            .map_err(LedgerError::query(op))?;
    }
    tx.commit().await.map_err(LedgerError::query(op))?;
    Ok(if expired {
        Settled::Expired(r, true)
    } else {
        Settled::Done(r)
    })
}

#[async_trait::async_trait]
impl<DB: Backend> ReservationLedger for SqlLedger<DB> {
    async fn hold_reservation(&self, r: &Reservation) -> Result<(), LedgerError> {
        DB::sql(HOLD)
            .bind(r.id)
            .bind(r.customer.as_str())
            .bind(r.meter.as_str())
            .bind(r.period_start)
            .bind(r.period_end)
            .bind(r.units)
            .bind(Time(r.expires_at))
            .bind(Time(r.created_at))
            .execute(self.pool())
            .await
            .map_err(LedgerError::query("hold_reservation"))?;
        Ok(())
    }

    async fn reservation(&self, id: uuid::Uuid) -> Result<Option<Reservation>, LedgerError> {
        let op = "reservation";
        let sql = format!("SELECT {COLUMNS} FROM reservations WHERE id = $1");
        let row = DB::sql(&sql)
            .bind(id)
            .fetch_optional(self.pool())
            .await
            .map_err(LedgerError::query(op))?;
        row.map(|r| from_row(&r))
            .transpose()
            .map_err(LedgerError::query(op))
    }

    async fn commit_reservation(
        &self,
        id: uuid::Uuid,
        units: i64,
        now: DateTime<Utc>,
    ) -> Result<Settled, LedgerError> {
        settle(self, id, "committed", Some(units), now).await
    }

    async fn release_reservation(
        &self,
        id: uuid::Uuid,
        now: DateTime<Utc>,
    ) -> Result<Settled, LedgerError> {
        settle(self, id, "released", None, now).await
    }

    async fn expire_reservations(
        &self,
        now: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<Reservation>, LedgerError> {
        let op = "expire_reservations";
        let sql = format!(
            "UPDATE reservations SET state = 'expired', settled_at = $1 \
             WHERE id IN (SELECT id FROM reservations WHERE state = 'held' AND expires_at <= $1 \
               LIMIT $2) AND state = 'held' \
             RETURNING {COLUMNS}"
        );
        let rows = DB::sql(&sql)
            .bind(Time(now))
            .bind(limit)
            .fetch_all(self.pool())
            .await
            .map_err(LedgerError::query(op))?;
        rows.iter()
            .map(from_row)
            .collect::<Result<_, sqlx::Error>>()
            .map_err(LedgerError::query(op))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::Duration;

    use super::*;
    use crate::ledger::test_support::{contract, t0};
    use crate::ledger::Ledger;

    fn held(units: i64, expires_at: DateTime<Utc>) -> Reservation {
        Reservation {
            id: uuid::Uuid::now_v7(),
            customer: "acme".into(),
            meter: "minutes".into(),
            period_start: 0,
            period_end: 100,
            units,
            state: "held".into(),
            expires_at,
            created_at: t0(),
            settled_units: None,
            settled_at: None,
        }
    }

    async fn check_reservations(ledger: Arc<dyn Ledger>) {
        let t = t0();
        let call = held(10, t + Duration::minutes(10));
        ledger.hold_reservation(&call).await.expect("hold");
        assert_eq!(
            ledger.reservation(call.id).await.expect("read"),
            Some(call.clone())
        );
        let done = ledger
            .commit_reservation(call.id, 7, t + Duration::minutes(3))
            .await
            .expect("commit");
        assert_eq!(done, Settled::Done(call.clone()));
        // Once: a second commit or a release finds it committed, with its usage row of 7.
        for again in [
            ledger
                .commit_reservation(call.id, 7, t + Duration::minutes(4))
                .await,
            ledger
                .release_reservation(call.id, t + Duration::minutes(4))
                .await,
        ] {
            match again.expect("again") {
                Settled::AlreadySettled(r) => {
                    assert_eq!((r.state.as_str(), r.settled_units), ("committed", Some(7)))
                }
                other => panic!("{other:?}"),
            }
        }
        let day = Duration::days(1);
        let totals = ledger
            .usage_totals("acme", "minutes", t - day, t + day)
            .await
            .expect("totals");
        assert_eq!(totals, (7, 1));
        assert_eq!(
            ledger
                .commit_reservation(uuid::Uuid::now_v7(), 1, t)
                .await
                .expect("unknown"),
            Settled::Unknown
        );

        // Expiry: the sweep takes each expired reservation once; a late commit finds it expired.
        let late = held(5, t + Duration::minutes(1));
        let live = held(5, t + Duration::hours(1));
        ledger.hold_reservation(&late).await.expect("late");
        ledger.hold_reservation(&live).await.expect("live");
        let swept = ledger
            .expire_reservations(t + Duration::minutes(2), 100)
            .await
            .expect("sweep");
        assert_eq!(swept.iter().map(|r| r.id).collect::<Vec<_>>(), [late.id]);
        assert!(ledger
            .expire_reservations(t + Duration::minutes(2), 100)
            .await
            .expect("again")
            .is_empty());
        match ledger
            .commit_reservation(late.id, 5, t + Duration::minutes(3))
            .await
            .expect("late commit")
        {
            Settled::Expired(_, false) => {}
            other => panic!("{other:?}"),
        }
        // A held one past its expiry that the sweep has not seen is expired by the commit.
        match ledger
            .commit_reservation(live.id, 5, t + Duration::hours(2))
            .await
            .expect("past expiry")
        {
            Settled::Expired(r, true) => assert_eq!(r.id, live.id),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            ledger
                .usage_totals("acme", "minutes", t - day, t + day)
                .await
                .expect("totals"),
            (7, 1),
            "nothing charged for expired reservations"
        );
    }

    contract!(
        "a reservation is settled once: committed with its usage row, released, or expired.",
        check_reservations,
        pg_reservations,
        sqlite_reservations
    );
}

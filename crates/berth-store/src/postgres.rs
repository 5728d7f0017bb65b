//! The PostgreSQL backend, for several control-plane replicas on one
//! database. Same schema and the same code (`reads`, `writes`) as SQLite;
//! what differs is concurrency: writers are concurrent here, so every read
//! a write decision depends on takes a row lock (`FOR UPDATE`), and the
//! admission commit locks the affected node rows in id order before
//! re-checking their reservation rows, so two committers can never both fit
//! the same memory. Reads run in a repeatable-read, read-only transaction.
//! Migrations run under an advisory lock so replicas starting together do
//! not race. Transactions contain queries and pure calls only.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row, Transaction};

use crate::exec::{Arg, Exec, Row as ExecRow, Val};
use crate::store::{Backend, StoreOn, Work, WriteWork};
use crate::{StoreError, WriteStats};

const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/postgres/0001_init.sql")),
    (2, include_str!("../migrations/postgres/0002_cluster.sql")),
    (3, include_str!("../migrations/postgres/0003_fencing_billing.sql")),
    (4, include_str!("../migrations/postgres/0004_operations.sql")),
    (5, include_str!("../migrations/postgres/0005_volumes.sql")),
    (6, include_str!("../migrations/postgres/0006_reservations_key.sql")),
    (7, include_str!("../migrations/postgres/0007_servers_indexes.sql")),
];

pub struct PostgresBackend {
    pool: PgPool,
}

pub type PostgresStore = StoreOn<PostgresBackend>;

impl StoreOn<PostgresBackend> {
    /// Connects to `url` and migrates the database. Acquiring a connection
    /// gives up after a few seconds, so requests fail fast (503) while the
    /// database is away instead of piling up.
    pub async fn open(url: &str) -> Result<PostgresStore, StoreError> {
        // Safety nets: a session left idle inside a transaction is ended, and
        // no statement waits for a lock forever.
        let opts = sqlx::postgres::PgConnectOptions::from_str(url)?.options([("idle_in_transaction_session_timeout", "10000"), ("lock_timeout", "10000")]);
        let pool = PgPoolOptions::new().max_connections(16).acquire_timeout(Duration::from_secs(3)).connect_with(opts).await?;
        migrate(&pool).await?;
        Ok(StoreOn::new(PostgresBackend { pool }))
    }
}

#[async_trait]
impl Backend for PostgresBackend {
    async fn read<T: Send + 'static, F: Work<T>>(&self, work: F) -> Result<T, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY").execute(&mut *tx).await?;
        let out = work(&mut TxExec(&mut tx)).await?;
        tx.commit().await?;
        Ok(out)
    }

    /// One write in a transaction of its own; concurrent writers serialize
    /// on the row locks the write takes (`Exec::lock`).
    async fn write<I: Send + Sync + 'static, T: Send + 'static, F: WriteWork<I, T>>(&self, input: I, work: F) -> Result<T, StoreError> {
        let mut tx = self.pool.begin().await?;
        let out = work(&mut TxExec(&mut tx), &input).await?;
        tx.commit().await?;
        Ok(out)
    }

    fn write_stats(&self) -> Option<WriteStats> {
        None
    }

    fn one_writer(&self) -> bool {
        false
    }
}

/// `Exec` over a PostgreSQL transaction: `?` placeholders numbered, rows
/// read into owned values.
struct TxExec<'a>(&'a mut Transaction<'static, Postgres>);

type PgQuery<'q> = sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>;

fn bind(q: PgQuery<'_>, a: Arg) -> PgQuery<'_> {
    match a {
        Arg::Int(i) => q.bind(i),
        Arg::Text(s) => q.bind(s),
        Arg::Bool(b) => q.bind(b),
        Arg::NullInt => q.bind(None::<i64>),
        Arg::NullText => q.bind(None::<String>),
    }
}

fn owned_row(r: &PgRow) -> Result<ExecRow, StoreError> {
    use sqlx::{Column, TypeInfo, ValueRef};
    let names: crate::exec::Names = r.columns().iter().map(|c| Box::from(c.name())).collect();
    let mut vals = Vec::with_capacity(r.len());
    for (i, c) in r.columns().iter().enumerate() {
        let raw = r.try_get_raw(i)?;
        let v = if raw.is_null() {
            Val::Null
        } else {
            match c.type_info().name() {
                "INT8" => Val::Int(r.try_get::<i64, _>(i)?),
                "INT4" => Val::Int(r.try_get::<i32, _>(i)? as i64),
                "INT2" => Val::Int(r.try_get::<i16, _>(i)? as i64),
                "BOOL" => Val::Int(r.try_get::<bool, _>(i)? as i64),
                "FLOAT8" => Val::Real(r.try_get::<f64, _>(i)?),
                "FLOAT4" => Val::Real(r.try_get::<f32, _>(i)? as f64),
                _ => Val::Text(r.try_get::<String, _>(i)?),
            }
        };
        vals.push(v);
    }
    Ok(ExecRow::new(names, vals))
}

#[async_trait]
impl Exec for TxExec<'_> {
    fn lock(&self) -> &'static str {
        " FOR UPDATE"
    }

    fn string_agg(&self, col: &str) -> String {
        format!("STRING_AGG({col}::text, ',')")
    }

    async fn exec(&mut self, sql: &str, args: Vec<Arg>) -> Result<u64, StoreError> {
        let sql = numbered(sql);
        let q = args.into_iter().fold(sqlx::query(&sql), bind);
        Ok(q.execute(&mut **self.0).await?.rows_affected())
    }

    async fn rows(&mut self, sql: &str, args: Vec<Arg>) -> Result<Vec<ExecRow>, StoreError> {
        let sql = numbered(sql);
        let q = args.into_iter().fold(sqlx::query(&sql), bind);
        q.fetch_all(&mut **self.0).await?.iter().map(owned_row).collect()
    }
}

/// Key of the advisory lock that serializes migrations between replicas.
const MIGRATION_LOCK: i64 = 0x6265_7274_685f_6d67;

async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    let mut conn = pool.acquire().await?;
    sqlx::query("SELECT pg_advisory_lock($1)").bind(MIGRATION_LOCK).execute(&mut *conn).await?;
    let result = migrate_locked(&mut conn).await;
    sqlx::query("SELECT pg_advisory_unlock($1)").bind(MIGRATION_LOCK).execute(&mut *conn).await?;
    result
}

async fn migrate_locked(conn: &mut sqlx::PgConnection) -> Result<(), StoreError> {
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY)").execute(&mut *conn).await?;
    // Every missing version is applied, not only those above the highest:
    // migrations developed side by side may land out of order.
    let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations").fetch_all(&mut *conn).await?;
    let current = applied.iter().copied().max().unwrap_or(0);
    if let Some((latest, _)) = MIGRATIONS.last() {
        if current > *latest {
            return Err(StoreError::Corrupt(format!("database schema version {current} is newer than this berth ({latest}); refusing to run")));
        }
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| !applied.contains(v)) {
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        sqlx::raw_sql(sql).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO schema_migrations (version) VALUES ($1)").bind(version).execute(&mut *tx).await?;
        tx.commit().await?;
        tracing::info!(version, "applied migration");
    }
    Ok(())
}

/// Rewrites `?` placeholders as `$1`, `$2`, … (the SQL of `reads` and
/// `writes` has no `?` inside a literal).
fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

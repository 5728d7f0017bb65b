//! The one seam every write goes through: `Exec`, a transaction that runs
//! SQL with `?` placeholders and returns owned rows.
//!
//! The write logic (`writes`) is written once against it. PostgreSQL runs
//! it over a sqlx transaction (placeholders numbered, `FOR UPDATE` where
//! writers are concurrent); SQLite runs it over a rusqlite connection owned
//! by the one writer thread, where a statement is a function call rather
//! than a message to another thread: sqlx's SQLite driver hands every
//! statement and every row to a worker thread and back, which made the
//! writer, not the disk, the limit of how many writes a second it commits.
//! Nothing here decides anything; it only carries SQL and values.

use async_trait::async_trait;

use crate::StoreError;

/// A bound value. Nulls carry their type: PostgreSQL types every
/// parameter, and an untyped null would not fit a text column.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Arg {
    Int(i64),
    Text(String),
    Bool(bool),
    NullInt,
    NullText,
}

impl From<i64> for Arg {
    fn from(v: i64) -> Arg {
        Arg::Int(v)
    }
}
impl From<bool> for Arg {
    fn from(v: bool) -> Arg {
        Arg::Bool(v)
    }
}
impl From<&str> for Arg {
    fn from(v: &str) -> Arg {
        Arg::Text(v.to_string())
    }
}
impl From<String> for Arg {
    fn from(v: String) -> Arg {
        Arg::Text(v)
    }
}
impl From<&String> for Arg {
    fn from(v: &String) -> Arg {
        Arg::Text(v.clone())
    }
}
impl From<Option<i64>> for Arg {
    fn from(v: Option<i64>) -> Arg {
        v.map(Arg::Int).unwrap_or(Arg::NullInt)
    }
}
impl From<Option<&str>> for Arg {
    fn from(v: Option<&str>) -> Arg {
        v.map(|s| Arg::Text(s.to_string())).unwrap_or(Arg::NullText)
    }
}
impl From<Option<String>> for Arg {
    fn from(v: Option<String>) -> Arg {
        v.map(Arg::Text).unwrap_or(Arg::NullText)
    }
}
impl From<&Option<String>> for Arg {
    fn from(v: &Option<String>) -> Arg {
        v.clone().into()
    }
}

/// Binds values: `args![a, b]`.
macro_rules! args {
    ($($a:expr),* $(,)?) => { vec![$($crate::exec::Arg::from($a)),*] };
}

/// A column value of an owned row.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Val {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
}

/// The column names of one result, shared by all its rows: a many-row read
/// allocates them once, not once per row.
pub(crate) type Names = std::sync::Arc<[Box<str>]>;

/// A row as `Exec` returns it: column names and values, owned.
#[derive(Debug)]
pub(crate) struct Row {
    pub(crate) names: Names,
    pub(crate) vals: Vec<Val>,
    /// Where the next lookup by name starts: one past the last column
    /// found. Decoders read columns mostly in the order they are selected,
    /// so a lookup usually compares one name, not half of a 24-column row.
    next: std::sync::atomic::AtomicUsize,
}

impl Clone for Row {
    fn clone(&self) -> Row {
        Row::new(self.names.clone(), self.vals.clone())
    }
}

impl PartialEq for Row {
    fn eq(&self, other: &Row) -> bool {
        self.names == other.names && self.vals == other.vals
    }
}

impl Row {
    pub(crate) fn new(names: Names, vals: Vec<Val>) -> Row {
        Row { names, vals, next: std::sync::atomic::AtomicUsize::new(0) }
    }

    fn get(&self, col: &str) -> Option<&Val> {
        use std::sync::atomic::Ordering::Relaxed;
        let n = self.names.len();
        let start = self.next.load(Relaxed).min(n);
        let i = (start..n).chain(0..start).find(|&i| &*self.names[i] == col)?;
        self.next.store(i + 1, Relaxed);
        self.vals.get(i)
    }

    /// The first column as an integer (a `COUNT(*)`, a `MAX(seq)`).
    pub(crate) fn first_int(&self) -> Result<i64, StoreError> {
        match self.vals.first() {
            Some(Val::Int(i)) => Ok(*i),
            other => Err(StoreError::Corrupt(format!("expected an integer, got {other:?}"))),
        }
    }

    pub(crate) fn first_opt_int(&self) -> Result<Option<i64>, StoreError> {
        match self.vals.first() {
            None | Some(Val::Null) => Ok(None),
            Some(Val::Int(i)) => Ok(Some(*i)),
            other => Err(StoreError::Corrupt(format!("expected an integer, got {other:?}"))),
        }
    }
}

fn wrong(col: &str, v: Option<&Val>) -> StoreError {
    StoreError::Corrupt(format!("column {col}: unexpected {v:?}"))
}

/// Columns by name; a decoder (`rows`) refuses what it cannot read as a
/// corrupt row.
impl Row {
    pub(crate) fn text(&self, col: &str) -> Result<String, StoreError> {
        self.opt_text(col)?.ok_or_else(|| wrong(col, None))
    }
    pub(crate) fn opt_text(&self, col: &str) -> Result<Option<String>, StoreError> {
        match self.get(col) {
            Some(Val::Null) => Ok(None),
            Some(Val::Text(s)) => Ok(Some(s.clone())),
            other => Err(wrong(col, other)),
        }
    }
    pub(crate) fn int(&self, col: &str) -> Result<i64, StoreError> {
        self.opt_int(col)?.ok_or_else(|| wrong(col, None))
    }
    pub(crate) fn opt_int(&self, col: &str) -> Result<Option<i64>, StoreError> {
        match self.get(col) {
            Some(Val::Null) => Ok(None),
            Some(Val::Int(i)) => Ok(Some(*i)),
            other => Err(wrong(col, other)),
        }
    }
    /// A boolean, stored as an integer (SQLite) or a boolean (PostgreSQL,
    /// read as 0 or 1).
    pub(crate) fn flag(&self, col: &str) -> Result<bool, StoreError> {
        Ok(self.int(col)? != 0)
    }
}

/// A transaction to write in.
#[async_trait]
pub(crate) trait Exec: Send {
    /// ` FOR UPDATE` where writers run concurrently (PostgreSQL), so a
    /// read that a write depends on locks its row; empty where one writer
    /// runs at a time (SQLite).
    fn lock(&self) -> &'static str;
    /// The values of `col` of a group as one comma-separated text.
    fn string_agg(&self, col: &str) -> String {
        format!("GROUP_CONCAT({col})")
    }
    /// Runs a statement; returns the rows it changed.
    async fn exec(&mut self, sql: &str, args: Vec<Arg>) -> Result<u64, StoreError>;
    async fn rows(&mut self, sql: &str, args: Vec<Arg>) -> Result<Vec<Row>, StoreError>;
    async fn row(&mut self, sql: &str, args: Vec<Arg>) -> Result<Option<Row>, StoreError> {
        Ok(self.rows(sql, args).await?.into_iter().next())
    }
    async fn one(&mut self, sql: &str, args: Vec<Arg>) -> Result<Row, StoreError> {
        self.row(sql, args).await?.ok_or_else(|| StoreError::Corrupt("a query that returns a row returned none".into()))
    }
    /// Runs an INSERT of at most one row into a table whose integer
    /// primary key is `key`; returns the new row's key, `None` if it
    /// inserted nothing (an `INSERT … SELECT` that found no row). Here
    /// with `RETURNING key`.
    async fn insert_key(&mut self, sql: &str, key: &str, args: Vec<Arg>) -> Result<Option<i64>, StoreError> {
        self.row(&format!("{sql} RETURNING {key}"), args).await?.map(|r| r.int(key)).transpose()
    }
}

/// `Exec` over a rusqlite connection, inside a transaction its owner
/// opened. Every call completes before it returns.
pub(crate) struct LiteExec<'a> {
    pub(crate) conn: &'a mut rusqlite::Connection,
}

fn lite_err(e: rusqlite::Error) -> StoreError {
    StoreError::from(e)
}

/// Binds by reference: a text value is not copied again to be bound.
impl rusqlite::ToSql for Arg {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput as O, Value as V, ValueRef as R};
        Ok(match self {
            Arg::Int(i) => O::Owned(V::Integer(*i)),
            Arg::Text(s) => O::Borrowed(R::Text(s.as_bytes())),
            Arg::Bool(b) => O::Owned(V::Integer(*b as i64)),
            Arg::NullInt | Arg::NullText => O::Owned(V::Null),
        })
    }
}

impl LiteExec<'_> {
    fn run_rows(&mut self, sql: &str, args: &[Arg]) -> Result<Vec<Row>, StoreError> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(lite_err)?;
        let count = stmt.column_count();
        // The names are allocated only once a row comes: most statements a
        // write runs return none.
        let mut names: Option<Names> = None;
        let mut rows = stmt.query(rusqlite::params_from_iter(args.iter())).map_err(lite_err)?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().map_err(lite_err)? {
            let names = names.get_or_insert_with(|| r.as_ref().column_names().iter().map(|n| Box::from(*n)).collect());
            let mut vals = Vec::with_capacity(count);
            for i in 0..count {
                use rusqlite::types::ValueRef as R;
                let v = match r.get_ref(i).map_err(lite_err)? {
                    R::Null => Val::Null,
                    R::Integer(i) => Val::Int(i),
                    R::Real(f) => Val::Real(f),
                    R::Text(t) => Val::Text(String::from_utf8_lossy(t).into_owned()),
                    R::Blob(b) => Val::Text(String::from_utf8_lossy(b).into_owned()),
                };
                vals.push(v);
            }
            out.push(Row::new(names.clone(), vals));
        }
        Ok(out)
    }
}

#[async_trait]
impl Exec for LiteExec<'_> {
    fn lock(&self) -> &'static str {
        ""
    }

    async fn exec(&mut self, sql: &str, args: Vec<Arg>) -> Result<u64, StoreError> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(lite_err)?;
        // A statement with RETURNING yields rows; `execute` refuses those.
        if stmt.column_count() > 0 {
            drop(stmt);
            return Ok(self.run_rows(sql, &args)?.len() as u64);
        }
        Ok(stmt.execute(rusqlite::params_from_iter(args.iter())).map_err(lite_err)? as u64)
    }

    async fn rows(&mut self, sql: &str, args: Vec<Arg>) -> Result<Vec<Row>, StoreError> {
        self.run_rows(sql, &args)
    }

    /// SQLite keeps the rows of a RETURNING clause in a temporary table
    /// until the statement ends: 8–10 µs a statement on the writer, timed
    /// (an operation's insert 22.8 µs with it, 13.1 without). The key of
    /// an integer primary key is the rowid, read from the connection
    /// instead.
    async fn insert_key(&mut self, sql: &str, _key: &str, args: Vec<Arg>) -> Result<Option<i64>, StoreError> {
        match self.exec(sql, args).await? {
            0 => Ok(None),
            1 => Ok(Some(self.conn.last_insert_rowid())),
            n => Err(StoreError::Corrupt(format!("an insert of one row inserted {n}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lite_exec_binds_and_returns_owned_rows() {
        let mut conn = rusqlite::Connection::open_in_memory().unwrap();
        let mut e = LiteExec { conn: &mut conn };
        e.exec("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, n INTEGER)", args![]).await.unwrap();
        assert_eq!(e.exec("INSERT INTO t (name, n) VALUES (?, ?)", args!["a", 1i64]).await.unwrap(), 1);
        assert_eq!(e.exec("INSERT INTO t (name, n) VALUES (?, ?)", args![None::<String>, true]).await.unwrap(), 1);
        let rows = e.rows("SELECT id, name, n FROM t ORDER BY id", args![]).await.unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].text("name").unwrap(), rows[0].int("n").unwrap()), ("a".to_string(), 1));
        assert_eq!((rows[1].opt_text("name").unwrap(), rows[1].int("n").unwrap()), (None, 1));
        let seq = e.one("INSERT INTO t (name, n) VALUES (?, ?) RETURNING id", args!["c", 3i64]).await.unwrap();
        assert_eq!(seq.first_int().unwrap(), 3);
        assert_eq!(e.exec("UPDATE t SET n = n + 1 WHERE n = ? RETURNING id", args![1i64]).await.unwrap(), 2);
        assert!(e.row("SELECT id FROM t WHERE name = ?", args!["zz"]).await.unwrap().is_none());
        assert!(rows[0].int("name").is_err(), "a text column is not an integer");
    }

    #[tokio::test]
    async fn insert_key_answers_the_new_rows_key_or_none() {
        let mut conn = rusqlite::Connection::open_in_memory().unwrap();
        let mut e = LiteExec { conn: &mut conn };
        e.exec("CREATE TABLE src (id TEXT PRIMARY KEY, n INTEGER)", args![]).await.unwrap();
        e.exec("CREATE TABLE t (seq INTEGER PRIMARY KEY AUTOINCREMENT, n INTEGER NOT NULL)", args![]).await.unwrap();
        e.exec("INSERT INTO src (id, n) VALUES ('a', 7), ('b', 8)", args![]).await.unwrap();
        // Another table's insert in between: the key is this statement's.
        e.exec("INSERT INTO t (n) VALUES (1), (2)", args![]).await.unwrap();
        let copy = "INSERT INTO t (n) SELECT n FROM src WHERE id = ?";
        assert_eq!(e.insert_key(copy, "seq", args!["b"]).await.unwrap(), Some(3));
        assert_eq!(e.insert_key(copy, "seq", args!["missing"]).await.unwrap(), None, "nothing inserted: no key, not the last one");
        // AUTOINCREMENT never reuses a key: the rowid is the key it gave.
        e.exec("DELETE FROM t WHERE seq = 3", args![]).await.unwrap();
        assert_eq!(e.insert_key("INSERT INTO t (n) VALUES (?)", "seq", args![9i64]).await.unwrap(), Some(4));
        let n = e.one("SELECT n FROM t WHERE seq = 4", args![]).await.unwrap();
        assert_eq!(n.int("n").unwrap(), 9);
        assert!(e.insert_key("INSERT INTO t (n) SELECT n FROM src", "seq", args![]).await.is_err(), "two rows are not one insert");
    }

    #[tokio::test]
    async fn columns_are_found_by_name_in_any_order_and_again() {
        let mut conn = rusqlite::Connection::open_in_memory().unwrap();
        let mut e = LiteExec { conn: &mut conn };
        let row = e.one("SELECT 1 AS a, 'two' AS b, 3 AS c, NULL AS d", args![]).await.unwrap();
        // Backwards, forwards, the same twice, and a name it lacks: the
        // lookup's starting point never hides a column.
        assert_eq!(row.opt_int("d").unwrap(), None);
        assert_eq!(row.int("c").unwrap(), 3);
        assert_eq!(row.text("b").unwrap(), "two");
        assert_eq!(row.int("a").unwrap(), 1);
        assert_eq!(row.int("a").unwrap(), 1);
        assert_eq!(row.int("c").unwrap(), 3);
        assert!(row.int("e").is_err());
        assert_eq!(row.text("b").unwrap(), "two");
        assert_eq!(row.clone(), row, "a clone is equal whatever lookups ran");
    }
}

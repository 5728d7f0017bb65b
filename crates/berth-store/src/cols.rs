//! Reading a row's columns by name, the same way from a database row and
//! from a row that SQLite handed over as JSON.
//!
//! sqlx passes SQLite rows from its connection thread one message at a
//! time, so a query of many rows costs a thread hand-over per row; on a
//! busy machine that dominated the syncs of hundreds of nodes. The SQLite
//! backend therefore reads its many-row queries as one row holding a JSON
//! array of objects. The row decoders are written once against `Cols` and
//! serve both shapes.

use serde_json::{Map, Value};

use crate::StoreError;

pub(crate) trait Cols {
    fn text(&self, col: &str) -> Result<String, StoreError>;
    fn opt_text(&self, col: &str) -> Result<Option<String>, StoreError>;
    fn int(&self, col: &str) -> Result<i64, StoreError>;
    fn opt_int(&self, col: &str) -> Result<Option<i64>, StoreError>;
    /// A boolean, stored as an integer (SQLite) or a boolean (PostgreSQL).
    fn flag(&self, col: &str) -> Result<bool, StoreError> {
        Ok(self.int(col)? != 0)
    }
}

fn missing(col: &str) -> StoreError {
    StoreError::Corrupt(format!("column {col} is missing or has the wrong type"))
}

/// A row as `json_object(...)` made it.
impl Cols for Map<String, Value> {
    fn text(&self, col: &str) -> Result<String, StoreError> {
        self.opt_text(col)?.ok_or_else(|| missing(col))
    }

    fn opt_text(&self, col: &str) -> Result<Option<String>, StoreError> {
        match self.get(col) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            // A JSON column embedded with json() arrives parsed.
            Some(v @ (Value::Object(_) | Value::Array(_))) => Ok(Some(v.to_string())),
            Some(_) => Err(missing(col)),
        }
    }

    fn int(&self, col: &str) -> Result<i64, StoreError> {
        self.opt_int(col)?.ok_or_else(|| missing(col))
    }

    fn opt_int(&self, col: &str) -> Result<Option<i64>, StoreError> {
        match self.get(col) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n.as_i64().map(Some).ok_or_else(|| missing(col)),
            Some(Value::Bool(b)) => Ok(Some(*b as i64)),
            Some(_) => Err(missing(col)),
        }
    }
}

/// Parses what `json_group_array(json_object(...))` returned.
pub(crate) fn json_rows(text: &str) -> Result<Vec<Map<String, Value>>, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("rows as json: {e}")))
}

/// `SELECT json_object('a', a, 'b', b) FROM ...` for a column list.
pub(crate) fn json_object(cols: &str) -> String {
    let pairs: Vec<String> = cols.split(',').map(str::trim).map(|c| format!("'{c}', {c}")).collect();
    format!("json_object({})", pairs.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_rows_read_like_database_rows() {
        let rows = json_rows(r#"[{"a": "x", "b": 7, "c": null, "d": {"k": 1}}]"#).unwrap();
        let r = &rows[0];
        assert_eq!(r.text("a").unwrap(), "x");
        assert_eq!(r.int("b").unwrap(), 7);
        assert_eq!(r.opt_int("c").unwrap(), None);
        assert_eq!(r.opt_text("c").unwrap(), None);
        assert_eq!(r.text("d").unwrap(), r#"{"k":1}"#);
        assert!(r.int("a").is_err() && r.text("b").is_err() && r.int("zz").is_err());
        assert_eq!(json_object("a, b"), "json_object('a', a, 'b', b)");
    }
}

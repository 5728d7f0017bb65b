//! Reading a row's columns by name. The row decoders (`rows`) are written
//! once against `Cols`, whatever backend produced the row.

use crate::StoreError;

pub(crate) trait Cols {
    fn text(&self, col: &str) -> Result<String, StoreError>;
    fn opt_text(&self, col: &str) -> Result<Option<String>, StoreError>;
    fn int(&self, col: &str) -> Result<i64, StoreError>;
    fn opt_int(&self, col: &str) -> Result<Option<i64>, StoreError>;
    /// A boolean, stored as an integer (SQLite) or a boolean (PostgreSQL,
    /// read as 0 or 1).
    fn flag(&self, col: &str) -> Result<bool, StoreError> {
        Ok(self.int(col)? != 0)
    }
}

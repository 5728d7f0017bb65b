//! The read side both backends share, written once.
//!
//! `store_common!` expands inside `sqlite.rs` and `postgres.rs` into the
//! `Cols` access of their rows and the queue read. Every write lives in
//! `writes` (over `exec::Exec`); column lists and decoders in `rows`.

macro_rules! store_common {
    ($Db:ty, $DbRow:ty) => {
        impl crate::cols::Cols for $DbRow {
            fn text(&self, col: &str) -> Result<String, StoreError> {
                Ok(self.try_get(col)?)
            }
            fn opt_text(&self, col: &str) -> Result<Option<String>, StoreError> {
                Ok(self.try_get(col)?)
            }
            fn int(&self, col: &str) -> Result<i64, StoreError> {
                Ok(self.try_get(col)?)
            }
            fn opt_int(&self, col: &str) -> Result<Option<i64>, StoreError> {
                Ok(self.try_get(col)?)
            }
            fn flag(&self, col: &str) -> Result<bool, StoreError> {
                match self.try_get::<bool, _>(col) {
                    Ok(b) => Ok(b),
                    Err(_) => Ok(self.try_get::<i64, _>(col)? != 0),
                }
            }
        }

    };
}

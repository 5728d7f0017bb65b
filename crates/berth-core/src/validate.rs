//! Edge validation of names and sizes (L7): pure checks that return a typed
//! error naming what was wrong, so the API can refuse before writing.

use crate::model::{MemMib, ServerId};
use crate::CoreError;

/// Upper bound on a single reservation, far above any real node, so absurd
/// values are refused before they reach arithmetic.
pub const MAX_MEMORY_MIB: u64 = 16 * 1024 * 1024;

/// Server, node and template names: 1-63 characters of letters, digits,
/// `-` and `_`, starting with a letter or digit. This keeps names safe as
/// path components and URL segments (no `/`, no `..`).
pub fn name(n: &str) -> Result<(), CoreError> {
    let err = |reason| Err(CoreError::InvalidName { name: n.to_string(), reason });
    if n.is_empty() {
        return err("must not be empty");
    }
    if n.len() > 63 {
        return err("must be at most 63 characters");
    }
    if !n.as_bytes()[0].is_ascii_alphanumeric() {
        return err("must start with a letter or digit");
    }
    if !n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return err("may contain only letters, digits, '-' and '_'");
    }
    Ok(())
}

/// A server name must also not look like a server id, so `{id}` in a URL
/// is never ambiguous.
pub fn server_name(n: &str) -> Result<(), CoreError> {
    name(n)?;
    if ServerId::looks_like(n) {
        return Err(CoreError::InvalidName { name: n.to_string(), reason: "must not have the shape of a server id" });
    }
    Ok(())
}

pub fn memory(m: u64) -> Result<MemMib, CoreError> {
    if m == 0 {
        return Err(CoreError::InvalidMemory("must be at least 1".into()));
    }
    if m > MAX_MEMORY_MIB {
        return Err(CoreError::InvalidMemory(format!("must be at most {MAX_MEMORY_MIB}")));
    }
    Ok(MemMib(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_refuse_paths_and_empties() {
        for bad in ["", "a/b", "..", "../x", "-a", "a b", "é", &"x".repeat(64)] {
            assert!(name(bad).is_err(), "{bad:?}");
        }
        for good in ["a", "mc-1", "World_2", &"x".repeat(63)] {
            assert!(name(good).is_ok(), "{good:?}");
        }
        assert!(server_name("srv_0123456789abcdef").is_err());
    }

    #[test]
    fn memory_bounds() {
        assert!(memory(0).is_err());
        assert!(memory(MAX_MEMORY_MIB + 1).is_err());
        assert_eq!(memory(1024).unwrap(), MemMib(1024));
    }
}

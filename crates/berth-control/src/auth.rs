//! Bearer tokens: generation, hashing, and turning a request's
//! `Authorization` header into a `Caller`. Secrets are shown once and only
//! their SHA-256 is stored. This module decides who is calling, not what
//! they may do (handlers check that with `Caller`'s predicates).

use axum::http::HeaderMap;
use berth_core::{Server, TokenKind};
use berth_store::Store;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::error::ControlError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub kind: TokenKind,
    pub tenant: Option<String>,
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.kind == TokenKind::Admin
    }

    /// Admins see every server; a tenant only its own; agents none.
    pub fn can_see(&self, s: &Server) -> bool {
        self.can_see_tenant(&s.tenant)
    }

    /// Whether the caller may see a server of `tenant`.
    pub fn can_see_tenant(&self, tenant: &str) -> bool {
        match self.kind {
            TokenKind::Admin => true,
            TokenKind::Tenant => self.tenant.as_deref() == Some(tenant),
            TokenKind::Agent => false,
        }
    }

    pub fn require_admin(&self) -> Result<(), ControlError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ControlError::Forbidden("this needs an admin token".into()))
        }
    }

    /// Users of the server API: admins and tenants, never agents.
    pub fn require_user(&self) -> Result<(), ControlError> {
        if self.kind == TokenKind::Agent {
            Err(ControlError::Forbidden("agent tokens may only register and sync".into()))
        } else {
            Ok(())
        }
    }

    pub fn require_agent(&self) -> Result<(), ControlError> {
        match self.kind {
            TokenKind::Agent | TokenKind::Admin => Ok(()),
            TokenKind::Tenant => Err(ControlError::Forbidden("tenant tokens may not act as an agent".into())),
        }
    }
}

pub fn hash_secret(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new secret: a readable prefix naming the kind and 192 random bits.
pub fn new_secret(kind: TokenKind) -> String {
    let mut bytes = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("berth_{}_{hex}", kind.as_str())
}

/// Tokens recently found in the store, by hash, so a busy API does not
/// read the tokens table on every request. Only tokens that exist are
/// kept, for `TTL`, at most `MAX` of them. Tokens cannot be revoked yet;
/// when they can, revoking must clear this cache.
#[derive(Default)]
pub struct TokenCache {
    inner: std::sync::Mutex<std::collections::HashMap<String, (Caller, std::time::Instant)>>,
}

impl TokenCache {
    const TTL: std::time::Duration = std::time::Duration::from_secs(10);
    const MAX: usize = 10_000;

    fn get(&self, hash: &str) -> Option<Caller> {
        let inner = self.inner.lock().expect("token cache lock");
        inner.get(hash).filter(|(_, at)| at.elapsed() < Self::TTL).map(|(c, _)| c.clone())
    }

    fn put(&self, hash: String, caller: Caller) {
        let mut inner = self.inner.lock().expect("token cache lock");
        if inner.len() >= Self::MAX {
            inner.clear();
        }
        inner.insert(hash, (caller, std::time::Instant::now()));
    }
}

pub async fn authenticate(store: &dyn Store, cache: &TokenCache, headers: &HeaderMap) -> Result<Caller, ControlError> {
    let value = headers.get(axum::http::header::AUTHORIZATION).ok_or(ControlError::Unauthorized)?;
    let value = value.to_str().map_err(|_| ControlError::Unauthorized)?;
    let secret = value.strip_prefix("Bearer ").ok_or(ControlError::Unauthorized)?.trim();
    if secret.is_empty() || secret.len() > 256 {
        return Err(ControlError::Unauthorized);
    }
    let hash = hash_secret(secret);
    if let Some(caller) = cache.get(&hash) {
        return Ok(caller);
    }
    let record = store.find_token(&hash).await?.ok_or(ControlError::Unauthorized)?;
    let caller = Caller { kind: record.kind, tenant: record.tenant };
    cache.put(hash, caller.clone());
    Ok(caller)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_unique_and_hashes_stable() {
        let a = new_secret(TokenKind::Admin);
        let b = new_secret(TokenKind::Admin);
        assert_ne!(a, b);
        assert!(a.starts_with("berth_admin_"));
        assert_eq!(hash_secret(&a), hash_secret(&a));
        assert_eq!(hash_secret(&a).len(), 64);
    }
}

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
        match self.kind {
            TokenKind::Admin => true,
            TokenKind::Tenant => self.tenant.as_deref() == Some(s.tenant.as_str()),
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

pub async fn authenticate(store: &dyn Store, headers: &HeaderMap) -> Result<Caller, ControlError> {
    let value = headers.get(axum::http::header::AUTHORIZATION).ok_or(ControlError::Unauthorized)?;
    let value = value.to_str().map_err(|_| ControlError::Unauthorized)?;
    let secret = value.strip_prefix("Bearer ").ok_or(ControlError::Unauthorized)?.trim();
    if secret.is_empty() || secret.len() > 256 {
        return Err(ControlError::Unauthorized);
    }
    let record = store.find_token(&hash_secret(secret)).await?.ok_or(ControlError::Unauthorized)?;
    Ok(Caller { kind: record.kind, tenant: record.tenant })
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

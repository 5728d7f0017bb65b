//! Which notification channels an event goes to. Pure: the event, the
//! tenant of its server and the configured webhooks are inputs; sending,
//! signing and retrying live in the control plane.
//!
//! A global webhook (no tenant) receives events of every tenant and of
//! nodes; a tenant's webhook only events of that tenant's servers. A
//! webhook without an event list receives the alert kinds; `*` means every
//! kind. Email goes to the operator for the alert kinds only.

use serde::{Deserialize, Serialize};

use crate::model::Event;
use crate::retry::RetryPolicy;

/// Events worth waking someone for: by default webhooks and email get these.
pub const ALERT_KINDS: &[&str] = &["server_crashed", "start_failed", "restart_limit_reached", "node_lost", "server_lost", "backup_failed", "webhook_disabled"];

/// Kinds email is sent for (crashed, failed, node lost, backup failed).
pub const EMAIL_KINDS: &[&str] = &["server_crashed", "start_failed", "restart_limit_reached", "node_lost", "server_lost", "backup_failed"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Webhook {
    pub id: String,
    pub url: String,
    /// `None`: global (admin); otherwise only this tenant's servers.
    pub tenant: Option<String>,
    /// Event kinds; empty means `ALERT_KINDS`; `["*"]` means all.
    pub events: Vec<String>,
    /// Key of the HMAC-SHA256 signature; stored because signing needs it.
    pub secret: String,
    pub enabled: bool,
    /// Failed attempts in a row; reset by any success.
    pub consecutive_failures: u32,
    /// The newest event when the webhook was created: it receives only
    /// later ones, not the history.
    pub after_seq: i64,
    pub created_at: crate::Millis,
}

impl Webhook {
    pub fn wants(&self, event: &Event, tenant: Option<&str>) -> bool {
        if !self.enabled || event.seq <= self.after_seq {
            return false;
        }
        if let Some(t) = &self.tenant {
            if tenant != Some(t.as_str()) {
                return false;
            }
        }
        if self.events.iter().any(|k| k == "*") {
            return true;
        }
        if self.events.is_empty() {
            // A webhook never alerts about itself being disabled: it would
            // not be delivered anyway.
            return ALERT_KINDS.contains(&event.kind.as_str());
        }
        self.events.iter().any(|k| k == &event.kind)
    }
}

/// Where one event goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Webhook(String),
    Email,
}

pub fn targets(event: &Event, tenant: Option<&str>, webhooks: &[Webhook], email: bool) -> Vec<Target> {
    let mut out: Vec<Target> = webhooks.iter().filter(|w| w.wants(event, tenant)).map(|w| Target::Webhook(w.id.clone())).collect();
    if email && EMAIL_KINDS.contains(&event.kind.as_str()) {
        out.push(Target::Email);
    }
    out
}

/// Delivery retries: first retry after `base`, doubling, with jitter.
pub fn default_delivery_retry() -> RetryPolicy {
    RetryPolicy { base_ms: 5_000, max_ms: 600_000, max_attempts: 10, jitter_permille: 100 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ServerId;

    fn ev(kind: &str) -> Event {
        Event { seq: 1, at: 0, kind: kind.into(), server_id: Some(ServerId("srv_a".into())), node_id: None, message: String::new() }
    }

    fn hook(id: &str, tenant: Option<&str>, events: &[&str]) -> Webhook {
        Webhook {
            id: id.into(),
            url: "http://127.0.0.1:1/".into(),
            tenant: tenant.map(String::from),
            events: events.iter().map(|s| s.to_string()).collect(),
            secret: "s".into(),
            enabled: true,
            consecutive_failures: 0,
            after_seq: 0,
            created_at: 0,
        }
    }

    #[test]
    fn tenants_see_only_their_servers_and_globals_see_all() {
        let hooks = [hook("g", None, &[]), hook("alice", Some("alice"), &[]), hook("bob", Some("bob"), &[])];
        let t = targets(&ev("server_crashed"), Some("alice"), &hooks, false);
        assert_eq!(t, vec![Target::Webhook("g".into()), Target::Webhook("alice".into())]);
        assert_eq!(targets(&ev("node_lost"), None, &hooks, false), vec![Target::Webhook("g".into())]);
    }

    #[test]
    fn event_lists_filter_and_email_takes_alerts_only() {
        let hooks = [hook("all", None, &["*"]), hook("runs", None, &["server_running"])];
        assert_eq!(targets(&ev("server_running"), None, &hooks, true), vec![Target::Webhook("all".into()), Target::Webhook("runs".into())]);
        assert_eq!(targets(&ev("server_crashed"), None, &hooks, true), vec![Target::Webhook("all".into()), Target::Email]);
        let mut off = hook("off", None, &["*"]);
        off.enabled = false;
        assert!(targets(&ev("server_crashed"), None, &[off], false).is_empty());
    }
}

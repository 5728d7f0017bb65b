//! Webhook use cases: create (the secret is shown once), list, delete,
//! re-enable, and the delivery log. Admins manage global webhooks and any
//! tenant's; a tenant token only its own tenant's. Input is validated
//! completely before anything is written (L7).

use berth_api::{CreateWebhook, DeliveryView, WebhookView};
use berth_core::notify::Webhook;
use berth_core::TokenKind;
use berth_store::{Delivery, DeliveryFilter};

use crate::auth::Caller;
use crate::error::ControlError;
use crate::service::App;

fn view_delivery(d: &Delivery) -> DeliveryView {
    DeliveryView {
        id: d.id.clone(),
        channel: d.channel.clone(),
        webhook_id: d.webhook_id.clone(),
        event_seq: d.event_seq,
        event_kind: d.event_kind.clone(),
        status: d.status.clone(),
        attempts: d.attempts,
        next_attempt_at: (d.status == "pending").then(|| berth_api::rfc3339(d.next_attempt_at)),
        last_status: d.last_status,
        last_error: d.last_error.clone(),
        created_at: berth_api::rfc3339(d.created_at),
        delivered_at: d.delivered_at.map(berth_api::rfc3339),
    }
}

fn valid_kind(k: &str) -> bool {
    k == "*" || (!k.is_empty() && k.len() <= 64 && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
}

impl App {
    pub async fn create_webhook(&self, caller: &Caller, req: &CreateWebhook) -> Result<WebhookView, ControlError> {
        caller.require_user()?;
        let url = req.url.trim();
        if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() > 2048 || url.contains(char::is_whitespace) {
            return Err(ControlError::invalid("invalid_url", format!("url must be an http:// or https:// URL, got {:?}", req.url)));
        }
        reqwest::Url::parse(url).map_err(|e| ControlError::invalid("invalid_url", format!("url {url:?}: {e}")))?;
        if req.events.len() > 64 {
            return Err(ControlError::invalid("invalid_request", "events: at most 64 kinds"));
        }
        if let Some(bad) = req.events.iter().find(|k| !valid_kind(k)) {
            return Err(ControlError::invalid("invalid_request", format!("events: {bad:?} is not an event kind")));
        }
        let tenant = match (caller.kind, &req.tenant) {
            (TokenKind::Tenant, Some(_)) => return Err(ControlError::Forbidden("tenant tokens create webhooks for their own tenant only".into())),
            (TokenKind::Tenant, None) => caller.tenant.clone(),
            (_, Some(t)) => {
                berth_core::validate::name(t)?;
                Some(t.clone())
            }
            (_, None) => None,
        };
        let secret = crate::auth::new_secret(TokenKind::Agent).replace("berth_agent_", "whsec_");
        let w = Webhook {
            id: format!("wh_{:016x}", rand::random::<u64>()),
            url: url.to_string(),
            tenant,
            events: req.events.clone(),
            secret: secret.clone(),
            enabled: true,
            consecutive_failures: 0,
            after_seq: 0,
            created_at: self.clock.now_ms(),
        };
        let w = self.store.insert_webhook(&w).await?;
        Ok(WebhookView { secret: Some(secret), ..WebhookView::from(&w) })
    }

    /// A webhook the caller may manage; others are not found.
    async fn find_webhook(&self, caller: &Caller, id: &str) -> Result<Webhook, ControlError> {
        caller.require_user()?;
        match self.store.get_webhook(id).await? {
            Some(w) if caller.is_admin() || (w.tenant.is_some() && w.tenant == caller.tenant) => Ok(w),
            _ => Err(ControlError::NotFound(format!("webhook {id:?}"))),
        }
    }

    pub async fn list_webhooks(&self, caller: &Caller) -> Result<Vec<WebhookView>, ControlError> {
        caller.require_user()?;
        let tenant = if caller.is_admin() { None } else { Some(caller.tenant.clone().unwrap_or_default()) };
        Ok(self.store.list_webhooks(tenant.as_deref()).await?.iter().map(WebhookView::from).collect())
    }

    pub async fn delete_webhook(&self, caller: &Caller, id: &str) -> Result<(), ControlError> {
        let w = self.find_webhook(caller, id).await?;
        Ok(self.store.delete_webhook(&w.id).await?)
    }

    pub async fn set_webhook_enabled(&self, caller: &Caller, id: &str, enabled: bool) -> Result<WebhookView, ControlError> {
        let w = self.find_webhook(caller, id).await?;
        Ok(WebhookView::from(&self.store.set_webhook_enabled(&w.id, enabled).await?))
    }

    /// The delivery log of one webhook, newest first.
    pub async fn webhook_deliveries(&self, caller: &Caller, id: &str, limit: u32) -> Result<Vec<DeliveryView>, ControlError> {
        let w = self.find_webhook(caller, id).await?;
        let f = DeliveryFilter { webhook_id: Some(w.id), limit, ..Default::default() };
        Ok(self.store.list_deliveries(&f).await?.iter().map(view_delivery).collect())
    }

    /// Every delivery (admin), optionally of one channel (`webhook`, `email`).
    pub async fn deliveries(&self, caller: &Caller, channel: Option<String>, limit: u32) -> Result<Vec<DeliveryView>, ControlError> {
        caller.require_admin()?;
        if let Some(c) = &channel {
            if c != "webhook" && c != "email" {
                return Err(ControlError::invalid("invalid_request", format!("channel must be webhook or email, got {c:?}")));
            }
        }
        let f = DeliveryFilter { channel, limit, ..Default::default() };
        Ok(self.store.list_deliveries(&f).await?.iter().map(view_delivery).collect())
    }
}

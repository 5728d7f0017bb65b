//! Notifications: webhooks signed with HMAC-SHA256 and email over SMTP.
//!
//! The notifier (leader only) turns new events into deliveries (one per
//! target, in the store, so nothing is lost across a restart), sends the
//! due ones, and records each attempt; the store retries with backoff and
//! disables a webhook after too many failures in a row. Which targets an
//! event has is decided in `berth_core::notify`; this module only signs,
//! sends and reports.
//!
//! A webhook request is `POST <url>` with the JSON body
//! `{"id", "webhook_id", "event": {"seq","at","kind","server_id","node_id","message"}}`
//! and the headers:
//! - `Idempotency-Key`: the delivery id, the same on every retry of one
//!   event to one webhook (receivers drop repeats by it);
//! - `Berth-Timestamp`: Unix seconds of this attempt;
//! - `Berth-Signature`: `v1=` and the hex HMAC-SHA256, keyed with the
//!   webhook's secret, of `Berth-Timestamp + "." + body`;
//! - `Berth-Event`: the event kind; `Berth-Webhook`: the webhook id.
//!
//! Any 2xx answer is a delivery; anything else (or no answer in 10 s) is a
//! failed attempt.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use berth_api::EventView;
use berth_store::{DeliveryJob, DeliveryOutcome, DeliveryPolicy, Store};
use hmac::{Hmac, Mac};
use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use sha2::Sha256;
use tokio::sync::Notify;

use crate::clock::Clock;
use crate::error::ControlError;
use crate::worker::{Worker, WorkerState};

/// `v1=` + hex HMAC-SHA256 of `timestamp + "." + body` keyed with `secret`.
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("hmac accepts keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    format!("v1={hex}")
}

/// The body of a webhook delivery: the same bytes on every retry.
pub fn webhook_body(job: &DeliveryJob) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "id": job.delivery.id,
        "webhook_id": job.delivery.webhook_id,
        "event": EventView::from(&job.event),
    }))
    .expect("json values serialize")
}

/// How the SMTP connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// STARTTLS when the server offers it, plain otherwise.
    Opportunistic,
    /// STARTTLS, or fail.
    Required,
    /// TLS from the first byte (port 465).
    Wrapper,
    None,
}

impl SmtpTls {
    pub fn parse(s: &str) -> Option<SmtpTls> {
        match s {
            "opportunistic" => Some(SmtpTls::Opportunistic),
            "required" => Some(SmtpTls::Required),
            "wrapper" => Some(SmtpTls::Wrapper),
            "none" => Some(SmtpTls::None),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct EmailConfig {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    pub credentials: Option<(String, String)>,
    pub from: String,
    pub to: Vec<String>,
}

/// Sends one email per delivery over SMTP.
pub struct EmailSender {
    cfg: EmailConfig,
    transport: AsyncSmtpTransport<Tokio1Executor>,
}

impl EmailSender {
    pub fn new(cfg: EmailConfig) -> Result<EmailSender, ControlError> {
        let bad = |e: &dyn std::fmt::Display| ControlError::Startup(format!("invalid email settings: {e}"));
        cfg.from.parse::<lettre::message::Mailbox>().map_err(|e| bad(&format!("from address {:?}: {e}", cfg.from)))?;
        if cfg.to.is_empty() {
            return Err(bad(&"no recipient (--email-to)"));
        }
        for to in &cfg.to {
            to.parse::<lettre::message::Mailbox>().map_err(|e| bad(&format!("recipient {to:?}: {e}")))?;
        }
        let params = || TlsParameters::new(cfg.host.clone()).map_err(|e| bad(&e));
        let tls = match cfg.tls {
            SmtpTls::Opportunistic => Tls::Opportunistic(params()?),
            SmtpTls::Required => Tls::Required(params()?),
            SmtpTls::Wrapper => Tls::Wrapper(params()?),
            SmtpTls::None => Tls::None,
        };
        let mut b = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(cfg.host.as_str()).port(cfg.port).tls(tls).timeout(Some(Duration::from_secs(10)));
        if let Some((user, password)) = &cfg.credentials {
            b = b.credentials(Credentials::new(user.clone(), password.clone()));
        }
        Ok(EmailSender { transport: b.build(), cfg })
    }

    /// The subject line of an event's email.
    pub fn subject(job: &DeliveryJob) -> String {
        let mut s = format!("[berth] {}: {}", job.event.kind, job.event.message);
        if s.len() > 200 {
            let mut cut = 200;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s.truncate(cut);
        }
        s
    }

    async fn send(&self, job: &DeliveryJob) -> Result<(), String> {
        let e = &job.event;
        let body = format!(
            "{}\n\nkind:    {}\nserver:  {}\nnode:    {}\nat:      {}\nevent:   {}\n",
            e.message,
            e.kind,
            e.server_id.as_ref().map(|s| s.0.as_str()).unwrap_or("-"),
            e.node_id.as_ref().map(|n| n.0.as_str()).unwrap_or("-"),
            berth_api::rfc3339(e.at),
            e.seq,
        );
        let mut m = Message::builder()
            .from(self.cfg.from.parse().map_err(|e| format!("from: {e}"))?)
            .subject(Self::subject(job))
            .message_id(Some(format!("<{}@berth>", job.delivery.id)))
            .header(ContentType::TEXT_PLAIN);
        for to in &self.cfg.to {
            m = m.to(to.parse().map_err(|e| format!("to: {e}"))?);
        }
        let msg = m.body(body).map_err(|e| e.to_string())?;
        self.transport.send(msg).await.map(|_| ()).map_err(|e| e.to_string())
    }
}

pub struct NotifyWorker {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub policy: DeliveryPolicy,
    pub email: Option<Arc<EmailSender>>,
    pub http: reqwest::Client,
    pub leading: Arc<AtomicBool>,
    pub wake: Arc<Notify>,
}

const BATCH: u32 = 64;

async fn send_webhook(http: &reqwest::Client, job: &DeliveryJob, now_ms: i64) -> DeliveryOutcome {
    let Some(w) = &job.webhook else {
        return DeliveryOutcome::Abandon { error: "webhook deleted".into() };
    };
    if !w.enabled {
        return DeliveryOutcome::Abandon { error: "webhook disabled".into() };
    }
    let body = webhook_body(job);
    let ts = now_ms / 1000;
    let resp = http
        .post(&w.url)
        .header("content-type", "application/json")
        .header("user-agent", concat!("berth/", env!("CARGO_PKG_VERSION")))
        .header("idempotency-key", &job.delivery.id)
        .header("berth-timestamp", ts.to_string())
        .header("berth-signature", sign(&w.secret, ts, &body))
        .header("berth-event", &job.event.kind)
        .header("berth-webhook", &w.id)
        .body(body)
        .send()
        .await;
    match resp {
        Ok(r) if r.status().is_success() => DeliveryOutcome::Delivered { status: Some(r.status().as_u16()) },
        Ok(r) => DeliveryOutcome::Failed { status: Some(r.status().as_u16()), error: format!("http {}", r.status().as_u16()) },
        Err(e) => DeliveryOutcome::Failed { status: None, error: e.to_string() },
    }
}

#[async_trait]
impl Worker for NotifyWorker {
    fn name(&self) -> &'static str {
        "notify"
    }

    async fn work(&mut self) -> Result<WorkerState, ControlError> {
        if !self.leading.load(Ordering::SeqCst) {
            return Ok(WorkerState::Idle);
        }
        let now = self.clock.now_ms();
        let fanned = self.store.fan_out(self.email.is_some(), 500, now).await?;
        let due = self.store.due_deliveries(now, BATCH).await?;
        let mut tasks = tokio::task::JoinSet::new();
        for job in due.iter().cloned() {
            let (http, email) = (self.http.clone(), self.email.clone());
            tasks.spawn(async move {
                let outcome = match job.delivery.channel.as_str() {
                    "email" => match email {
                        Some(e) => match e.send(&job).await {
                            Ok(()) => DeliveryOutcome::Delivered { status: None },
                            Err(error) => DeliveryOutcome::Failed { status: None, error },
                        },
                        None => DeliveryOutcome::Abandon { error: "email is not configured".into() },
                    },
                    _ => send_webhook(&http, &job, now).await,
                };
                (job.delivery.id, outcome)
            });
        }
        while let Some(done) = tasks.join_next().await {
            let (id, outcome) = done.map_err(|e| ControlError::Internal(format!("delivery task failed: {e}")))?;
            if let DeliveryOutcome::Failed { error, .. } = &outcome {
                tracing::warn!(delivery = %id, %error, "notification attempt failed");
            }
            self.store.record_delivery(&id, &outcome, &self.policy, rand::random(), self.clock.now_ms()).await?;
        }
        Ok(if fanned == 500 || due.len() as u32 == BATCH { WorkerState::Busy } else { WorkerState::Idle })
    }

    async fn wait_for_work(&mut self) {
        tokio::select! {
            _ = self.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_over_timestamp_dot_body() {
        let s = sign("Jefe", 0, b"what do ya want for nothing?");
        assert!(s.starts_with("v1="));
        assert_eq!(s.len(), 3 + 64);
        assert_ne!(sign("Jefe", 1, b"x"), sign("Jefe", 2, b"x"), "the timestamp is signed");
        assert_ne!(sign("a", 1, b"x"), sign("b", 1, b"x"), "the key matters");
        // HMAC-SHA256("key", "1.{}") computed independently (Python hmac).
        assert_eq!(sign("key", 1, b"{}"), "v1=1ba6b8171186efc613e8bcc0cbdab2748f24984d7c5a84faa2637afa0e40d224");
    }
}

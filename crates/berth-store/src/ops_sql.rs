//! The reads of operations, webhooks and deliveries, written once for both
//! backends (their writes are in `writes`).
//!
//! `ops_store_impl!` expands inside `sqlite.rs` and `postgres.rs` into
//! inherent methods of their store reading `self.read`; each backend's
//! `Store` impl delegates to them. The SQL is written with `?` placeholders
//! and passed through the backend's `q` (identity on SQLite, `$n`
//! numbering on PostgreSQL).

/// Rewrites `?` placeholders as `$1`, `$2`, … for PostgreSQL.
pub(crate) fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

pub(crate) fn same(sql: &str) -> String {
    sql.to_string()
}

macro_rules! ops_store_impl {
    ($Store:ty, $q:path) => {
        mod ops_impl {
            use super::*;
            use berth_core::notify::Webhook;
            use berth_core::operation::Operation;
            use berth_core::{Event, Generation, Millis, NodeId, ServerId, ServerStatus};
            use sqlx::Row;
            use crate::rows::{corrupt, delivery_from_row, op_from_row, webhook_from_row, DELIVERY_COLS, OP_COLS, WEBHOOK_COLS};

            use crate::{
                Delivery, DeliveryFilter, DeliveryJob, OpFilter, OpsWork, StoreError,
            };



            impl $Store {
                pub(crate) async fn ops_get(&self, id: &str) -> Result<Option<Operation>, StoreError> {
                    let row = sqlx::query(&$q(&format!("SELECT {OP_COLS} FROM operations WHERE id = ?")))
                        .bind(id)
                        .fetch_optional(&self.read)
                        .await?;
                    row.as_ref().map(op_from_row).transpose()
                }

                pub(crate) async fn ops_list(&self, f: &OpFilter) -> Result<Vec<Operation>, StoreError> {
                    let active = if f.active_only { " AND status IN ('pending', 'running')" } else { "" };
                    let rows = sqlx::query(&$q(&format!(
                        "SELECT {OP_COLS} FROM operations WHERE (? IS NULL OR server_id = ?) AND seq > ?{active} ORDER BY seq LIMIT ?"
                    )))
                    .bind(f.server_id.as_ref().map(|s| s.0.clone()))
                    .bind(f.server_id.as_ref().map(|s| s.0.clone()))
                    .bind(f.after.unwrap_or(0))
                    .bind(f.limit.clamp(1, 1000) as i64)
                    .fetch_all(&self.read)
                    .await?;
                    rows.iter().map(op_from_row).collect()
                }

                pub(crate) async fn ops_worklist(&self, window_start: Millis, with_active: bool) -> Result<OpsWork, StoreError> {
                    let mut conn = self.read.acquire().await?;
                    // Unfinished operations with what settling them depends
                    // on, in one read, so the executor writes only where
                    // something would change.
                    let op_cols: String = OP_COLS.split(", ").map(|c| format!("o.{c}")).collect::<Vec<_>>().join(", ");
                    let rows = sqlx::query(&$q(&format!(
                        "SELECT {op_cols}, s.status AS s_status, s.attempts AS s_attempts, s.next_attempt_at AS s_next, \
                         s.last_error AS s_error FROM operations o LEFT JOIN servers s ON s.id = o.server_id AND s.status <> 'deleted' \
                         WHERE o.status IN ('pending', 'running') AND (? OR o.server_id IN (SELECT id FROM servers WHERE status = 'crashed')) \
                         ORDER BY o.server_id, o.seq"
                    )))
                    .bind(with_active)
                    .fetch_all(&mut *conn)
                    .await?;
                    let mut active_ops: Vec<crate::ActiveOps> = Vec::new();
                    for r in &rows {
                        let op = op_from_row(r)?;
                        if active_ops.last().is_none_or(|a| a.server_id != op.server_id) {
                            let status: Option<String> = r.try_get("s_status")?;
                            let server = match status {
                                None => None,
                                Some(st) => Some(berth_core::operation::ServerFacts {
                                    status: ServerStatus::parse(&st).ok_or_else(|| corrupt("server status", &st))?,
                                    attempts: r.try_get::<i64, _>("s_attempts")? as u32,
                                    next_attempt_at: r.try_get("s_next")?,
                                    last_error: r.try_get("s_error")?,
                                }),
                            };
                            active_ops.push(crate::ActiveOps { server_id: op.server_id.clone(), server, ops: Vec::new() });
                        }
                        active_ops.last_mut().expect("pushed above").ops.push(op);
                    }
                    let active: std::collections::HashSet<&str> = active_ops.iter().map(|a| a.server_id.0.as_str()).collect();
                    let crashed_rows = sqlx::query(&format!(
                        "SELECT {SERVER_COLS} FROM servers WHERE status = 'crashed' AND restart_policy = 'on-failure' ORDER BY id"
                    ))
                    .fetch_all(&mut *conn)
                    .await?;
                    let mut crashed = Vec::new();
                    for r in &crashed_rows {
                        let s = server_from_row(r)?;
                        if active.contains(s.id.0.as_str()) {
                            continue;
                        }
                        let n: i64 = sqlx::query_scalar(&$q(
                            "SELECT COUNT(*) FROM operations WHERE server_id = ? AND origin = 'restart_policy' AND created_at >= ? \
                             AND seq > COALESCE((SELECT MAX(seq) FROM operations WHERE server_id = ? AND origin = 'user' \
                             AND kind IN ('start', 'restart')), 0)",
                        ))
                        .bind(&s.id.0)
                        .bind(window_start)
                        .bind(&s.id.0)
                        .fetch_one(&mut *conn)
                        .await?;
                        crashed.push((s, n as u32));
                    }
                    let queued = sqlx::query(
                        "SELECT id, generation, memory_mib, queued_at, next_attempt_at, home_node FROM servers WHERE status = 'queued' ORDER BY queued_at, id",
                    )
                    .fetch_all(&mut *conn)
                    .await?
                    .iter()
                    .map(|r| {
                        Ok(berth_core::placement::QueuedServer {
                            server_id: ServerId(r.try_get("id")?),
                            generation: r.try_get::<i64, _>("generation")? as u64,
                            memory_mib: berth_core::MemMib(r.try_get::<i64, _>("memory_mib")? as u64),
                            queued_at: r.try_get::<Option<i64>, _>("queued_at")?.unwrap_or(0),
                            next_attempt_at: r.try_get("next_attempt_at")?,
                            home_node: r.try_get::<Option<String>, _>("home_node")?.map(berth_core::NodeId),
                        })
                    })
                    .collect::<Result<_, StoreError>>()?;
                    Ok(OpsWork { active: active_ops, crashed, queued })
                }

                pub(crate) async fn ops_killing_on(&self, node: &NodeId) -> Result<Vec<(ServerId, Generation)>, StoreError> {
                    let rows = sqlx::query(&$q(
                        "SELECT s.id, s.generation FROM servers s WHERE s.node_id = ? AND s.status = 'stopping' AND EXISTS \
                         (SELECT 1 FROM operations o WHERE o.server_id = s.id AND o.kind = 'kill' AND o.status = 'running') ORDER BY s.id",
                    ))
                    .bind(&node.0)
                    .fetch_all(&self.read)
                    .await?;
                    rows.iter().map(|r| Ok((ServerId(r.try_get("id")?), r.try_get::<i64, _>("generation")? as u64))).collect()
                }

                pub(crate) async fn webhook_list(&self, tenant: Option<&str>) -> Result<Vec<Webhook>, StoreError> {
                    let rows = sqlx::query(&$q(&format!("SELECT {WEBHOOK_COLS} FROM webhooks WHERE (? IS NULL OR tenant = ?) ORDER BY created_at, id")))
                        .bind(tenant)
                        .bind(tenant)
                        .fetch_all(&self.read)
                        .await?;
                    rows.iter().map(webhook_from_row).collect()
                }

                pub(crate) async fn webhook_get(&self, id: &str) -> Result<Option<Webhook>, StoreError> {
                    let row = sqlx::query(&$q(&format!("SELECT {WEBHOOK_COLS} FROM webhooks WHERE id = ?"))).bind(id).fetch_optional(&self.read).await?;
                    row.as_ref().map(webhook_from_row).transpose()
                }

                pub(crate) async fn notify_due(&self, now: Millis, limit: u32) -> Result<Vec<DeliveryJob>, StoreError> {
                    let rows = sqlx::query(&$q(&format!(
                        "SELECT {DELIVERY_COLS}, e.at AS e_at, e.server_id AS e_server, e.node_id AS e_node, e.message AS e_message \
                         FROM deliveries d JOIN events e ON e.seq = d.event_seq \
                         WHERE d.status = 'pending' AND d.next_attempt_at <= ? ORDER BY d.next_attempt_at, d.id LIMIT ?"
                    )))
                    .bind(now)
                    .bind(limit.max(1) as i64)
                    .fetch_all(&self.read)
                    .await?;
                    let mut out = Vec::with_capacity(rows.len());
                    for r in &rows {
                        let delivery = delivery_from_row(r)?;
                        let event = Event {
                            seq: delivery.event_seq,
                            at: r.try_get("e_at")?,
                            kind: delivery.event_kind.clone(),
                            server_id: r.try_get::<Option<String>, _>("e_server")?.map(ServerId),
                            node_id: r.try_get::<Option<String>, _>("e_node")?.map(NodeId),
                            message: r.try_get("e_message")?,
                        };
                        let webhook = match &delivery.webhook_id {
                            Some(w) => self.webhook_get(w).await?,
                            None => None,
                        };
                        out.push(DeliveryJob { delivery, event, webhook });
                    }
                    Ok(out)
                }

                pub(crate) async fn notify_list(&self, f: &DeliveryFilter) -> Result<Vec<Delivery>, StoreError> {
                    let rows = sqlx::query(&$q(&format!(
                        "SELECT {DELIVERY_COLS} FROM deliveries d WHERE (? IS NULL OR d.webhook_id = ?) AND (? IS NULL OR d.channel = ?) \
                         AND (? IS NULL OR d.tenant = ?) ORDER BY d.event_seq DESC, d.id LIMIT ?"
                    )))
                    .bind(&f.webhook_id)
                    .bind(&f.webhook_id)
                    .bind(&f.channel)
                    .bind(&f.channel)
                    .bind(&f.tenant)
                    .bind(&f.tenant)
                    .bind(f.limit.clamp(1, 1000) as i64)
                    .fetch_all(&self.read)
                    .await?;
                    rows.iter().map(delivery_from_row).collect()
                }
            }
        }
    };
}


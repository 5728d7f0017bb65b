-- berth schema, version 4 (PostgreSQL): operations per server, restart
-- policy, webhooks and notification deliveries.
ALTER TABLE servers ADD COLUMN restart_policy TEXT NOT NULL DEFAULT 'never';

-- One row per admitted request. At most one non-kill operation of a server
-- is running; the others wait in `seq` order (L5).
CREATE TABLE operations (
    seq              BIGSERIAL PRIMARY KEY,
    id               TEXT NOT NULL UNIQUE,
    server_id        TEXT NOT NULL REFERENCES servers(id),
    kind             TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')),
    phase            TEXT,
    origin           TEXT NOT NULL,
    attempts         BIGINT NOT NULL DEFAULT 0,
    next_attempt_at  BIGINT,
    error_code       TEXT,
    error            TEXT,
    created_at       BIGINT NOT NULL,
    started_at       BIGINT,
    finished_at      BIGINT
);
CREATE INDEX operations_server ON operations(server_id, seq);
CREATE INDEX operations_active ON operations(status) WHERE status IN ('pending', 'running');

-- The secret signs deliveries (HMAC-SHA256), so it is stored as is.
-- A webhook receives events with a sequence above `after_seq` only.
CREATE TABLE webhooks (
    id                    TEXT PRIMARY KEY,
    url                   TEXT NOT NULL,
    tenant                TEXT,
    events                TEXT NOT NULL,
    secret                TEXT NOT NULL,
    enabled               BOOLEAN NOT NULL,
    consecutive_failures  BIGINT NOT NULL DEFAULT 0,
    after_seq             BIGINT NOT NULL,
    created_at            BIGINT NOT NULL
);

-- One row per (event, target); the id is the idempotency key.
CREATE TABLE deliveries (
    id               TEXT PRIMARY KEY,
    channel          TEXT NOT NULL CHECK (channel IN ('webhook', 'email')),
    webhook_id       TEXT,
    event_seq        BIGINT NOT NULL,
    event_kind       TEXT NOT NULL,
    tenant           TEXT,
    status           TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         BIGINT NOT NULL DEFAULT 0,
    next_attempt_at  BIGINT NOT NULL,
    last_status      BIGINT,
    last_error       TEXT,
    created_at       BIGINT NOT NULL,
    delivered_at     BIGINT
);
CREATE INDEX deliveries_due ON deliveries(status, next_attempt_at);
CREATE INDEX deliveries_webhook ON deliveries(webhook_id, event_seq);

-- The last event turned into deliveries. Starts at the newest event, so
-- history is not sent to channels configured later.
CREATE TABLE notify_cursor (
    id   BIGINT PRIMARY KEY CHECK (id = 1),
    seq  BIGINT NOT NULL
);
INSERT INTO notify_cursor (id, seq) SELECT 1, COALESCE(MAX(seq), 0) FROM events;

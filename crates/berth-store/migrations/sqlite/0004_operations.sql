-- berth schema, version 4 (SQLite): operations per server, restart
-- policy, webhooks and notification deliveries.
ALTER TABLE servers ADD COLUMN restart_policy TEXT NOT NULL DEFAULT 'never';

-- One row per admitted request. At most one non-kill operation of a server
-- is running; the others wait in `seq` order (L5).
CREATE TABLE operations (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT NOT NULL UNIQUE,
    server_id        TEXT NOT NULL REFERENCES servers(id),
    kind             TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')),
    phase            TEXT,
    origin           TEXT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  INTEGER,
    error_code       TEXT,
    error            TEXT,
    created_at       INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER
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
    enabled               INTEGER NOT NULL,
    consecutive_failures  INTEGER NOT NULL DEFAULT 0,
    after_seq             INTEGER NOT NULL,
    created_at            INTEGER NOT NULL
);

-- One row per (event, target); the id is the idempotency key.
CREATE TABLE deliveries (
    id               TEXT PRIMARY KEY,
    channel          TEXT NOT NULL CHECK (channel IN ('webhook', 'email')),
    webhook_id       TEXT,
    event_seq        INTEGER NOT NULL,
    event_kind       TEXT NOT NULL,
    tenant           TEXT,
    status           TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  INTEGER NOT NULL,
    last_status      INTEGER,
    last_error       TEXT,
    created_at       INTEGER NOT NULL,
    delivered_at     INTEGER
);
CREATE INDEX deliveries_due ON deliveries(status, next_attempt_at);
CREATE INDEX deliveries_webhook ON deliveries(webhook_id, event_seq);

-- The last event turned into deliveries. Starts at the newest event, so
-- history is not sent to channels configured later.
CREATE TABLE notify_cursor (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  INTEGER NOT NULL
);
INSERT INTO notify_cursor (id, seq) SELECT 1, COALESCE(MAX(seq), 0) FROM events;

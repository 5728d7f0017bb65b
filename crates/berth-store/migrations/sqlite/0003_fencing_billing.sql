-- berth schema, version 3 (SQLite): disconnect windows, disk facts, drain
-- deadlines, and billing. Booleans are 0/1 integers.
ALTER TABLE servers ADD COLUMN stop_after_ms INTEGER NOT NULL DEFAULT 300000;
ALTER TABLE servers ADD COLUMN stateless INTEGER NOT NULL DEFAULT 0;
ALTER TABLE servers ADD COLUMN plan TEXT NOT NULL DEFAULT 'standard';
ALTER TABLE servers ADD COLUMN price_per_gib_hour INTEGER NOT NULL DEFAULT 0;
ALTER TABLE servers ADD COLUMN home_node TEXT;
ALTER TABLE nodes ADD COLUMN disk_total_mib INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN disk_used_mib INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN disk_pressure INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN drain_deadline INTEGER;

-- L4: a session per confirmed stretch of running; at most one open per server.
CREATE TABLE billing_sessions (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    server_id           TEXT NOT NULL,
    tenant              TEXT NOT NULL,
    node_id             TEXT NOT NULL,
    generation          INTEGER NOT NULL,
    memory_mib          INTEGER NOT NULL,
    plan                TEXT NOT NULL,
    price_per_gib_hour  INTEGER NOT NULL,
    started_at          INTEGER NOT NULL,
    ended_at            INTEGER,
    end_reason          TEXT,
    CHECK (ended_at IS NULL OR ended_at >= started_at)
);
CREATE UNIQUE INDEX billing_one_open_per_server ON billing_sessions(server_id) WHERE ended_at IS NULL;
CREATE INDEX billing_server ON billing_sessions(server_id, started_at);
CREATE INDEX billing_tenant ON billing_sessions(tenant, started_at);

-- Every open and close, append-only.
CREATE TABLE ledger (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    at          INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    session_id  INTEGER NOT NULL,
    server_id   TEXT NOT NULL,
    detail      TEXT NOT NULL
);
CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;

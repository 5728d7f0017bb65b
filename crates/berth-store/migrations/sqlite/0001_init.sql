-- berth schema, version 1 (SQLite).
CREATE TABLE tokens (
    id          TEXT PRIMARY KEY,
    hash        TEXT NOT NULL UNIQUE,
    kind        TEXT NOT NULL CHECK (kind IN ('admin', 'tenant', 'agent')),
    tenant      TEXT,
    created_at  INTEGER NOT NULL
);

CREATE TABLE nodes (
    id                    TEXT PRIMARY KEY,
    name                  TEXT NOT NULL UNIQUE,
    address               TEXT NOT NULL,
    driver                TEXT NOT NULL,
    total_mib             INTEGER NOT NULL CHECK (total_mib >= 0),
    system_reserved_mib   INTEGER NOT NULL CHECK (system_reserved_mib >= 0),
    cpu_cores             INTEGER NOT NULL,
    status                TEXT NOT NULL,
    max_concurrent_starts INTEGER NOT NULL,
    port_min              INTEGER NOT NULL,
    port_max              INTEGER NOT NULL,
    epoch                 INTEGER NOT NULL,
    sync_seq              INTEGER NOT NULL,
    last_sync_at          INTEGER,
    registered_at         INTEGER NOT NULL,
    host_total_mib        INTEGER NOT NULL DEFAULT 0,
    host_available_mib    INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE servers (
    id               TEXT PRIMARY KEY,
    tenant           TEXT NOT NULL,
    name             TEXT NOT NULL,
    template         TEXT NOT NULL,
    memory_mib       INTEGER NOT NULL CHECK (memory_mib > 0),
    config           TEXT NOT NULL,
    status           TEXT NOT NULL,
    node_id          TEXT REFERENCES nodes(id),
    generation       INTEGER NOT NULL,
    port             INTEGER,
    last_exit        TEXT,
    queued_at        INTEGER,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  INTEGER,
    last_error       TEXT,
    used_mib         INTEGER,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL
);
-- Names are unique among servers that are not deleted.
CREATE UNIQUE INDEX servers_live_name ON servers(name) WHERE status <> 'deleted';
CREATE INDEX servers_status_queue ON servers(status, queued_at);
CREATE INDEX servers_node ON servers(node_id);

-- L2: reserved memory is the sum of these rows; one row per placed server.
CREATE TABLE reservations (
    server_id   TEXT NOT NULL REFERENCES servers(id),
    generation  INTEGER NOT NULL,
    node_id     TEXT NOT NULL REFERENCES nodes(id),
    memory_mib  INTEGER NOT NULL CHECK (memory_mib > 0),
    port        INTEGER NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('pending', 'active')),
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (server_id, generation)
);
CREATE UNIQUE INDEX reservations_one_per_server ON reservations(server_id);
CREATE UNIQUE INDEX reservations_node_port ON reservations(node_id, port);

CREATE TABLE events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    at         INTEGER NOT NULL,
    kind       TEXT NOT NULL,
    server_id  TEXT,
    node_id    TEXT,
    message    TEXT NOT NULL
);
CREATE INDEX events_server ON events(server_id, seq);

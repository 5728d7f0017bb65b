-- berth schema, version 1 (PostgreSQL). Times are Unix milliseconds.
CREATE TABLE tokens (
    id          TEXT PRIMARY KEY,
    hash        TEXT NOT NULL UNIQUE,
    kind        TEXT NOT NULL CHECK (kind IN ('admin', 'tenant', 'agent')),
    tenant      TEXT,
    created_at  BIGINT NOT NULL
);

CREATE TABLE nodes (
    id                    TEXT PRIMARY KEY,
    name                  TEXT NOT NULL UNIQUE,
    address               TEXT NOT NULL,
    driver                TEXT NOT NULL,
    total_mib             BIGINT NOT NULL CHECK (total_mib >= 0),
    system_reserved_mib   BIGINT NOT NULL CHECK (system_reserved_mib >= 0),
    cpu_cores             BIGINT NOT NULL,
    status                TEXT NOT NULL,
    max_concurrent_starts BIGINT NOT NULL,
    port_min              BIGINT NOT NULL,
    port_max              BIGINT NOT NULL,
    epoch                 BIGINT NOT NULL,
    sync_seq              BIGINT NOT NULL,
    last_sync_at          BIGINT,
    registered_at         BIGINT NOT NULL,
    host_total_mib        BIGINT NOT NULL DEFAULT 0,
    host_available_mib    BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE servers (
    id               TEXT PRIMARY KEY,
    tenant           TEXT NOT NULL,
    name             TEXT NOT NULL,
    template         TEXT NOT NULL,
    memory_mib       BIGINT NOT NULL CHECK (memory_mib > 0),
    config           TEXT NOT NULL,
    status           TEXT NOT NULL,
    node_id          TEXT REFERENCES nodes(id),
    generation       BIGINT NOT NULL,
    port             BIGINT,
    last_exit        TEXT,
    queued_at        BIGINT,
    attempts         BIGINT NOT NULL DEFAULT 0,
    next_attempt_at  BIGINT,
    last_error       TEXT,
    used_mib         BIGINT,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL
);
-- Names are unique among servers that are not deleted.
CREATE UNIQUE INDEX servers_live_name ON servers(name) WHERE status <> 'deleted';
CREATE INDEX servers_status_queue ON servers(status, queued_at);
CREATE INDEX servers_node ON servers(node_id);

-- L2: reserved memory is the sum of these rows; one row per placed server.
CREATE TABLE reservations (
    server_id   TEXT NOT NULL REFERENCES servers(id),
    generation  BIGINT NOT NULL,
    node_id     TEXT NOT NULL REFERENCES nodes(id),
    memory_mib  BIGINT NOT NULL CHECK (memory_mib > 0),
    port        BIGINT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('pending', 'active')),
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (server_id, generation)
);
CREATE UNIQUE INDEX reservations_one_per_server ON reservations(server_id);
CREATE UNIQUE INDEX reservations_node_port ON reservations(node_id, port);

CREATE TABLE events (
    seq        BIGSERIAL PRIMARY KEY,
    at         BIGINT NOT NULL,
    kind       TEXT NOT NULL,
    server_id  TEXT,
    node_id    TEXT,
    message    TEXT NOT NULL
);
CREATE INDEX events_server ON events(server_id, seq);

-- berth schema, version 6 (SQLite): a reservation is keyed by its server
-- alone. One row per placed server (L2) was enforced by a unique index on
-- server_id beside the key (server_id, generation), so every placement,
-- confirmation and release wrote four b-trees (the rowid table, the key's
-- index, the unique index, the node's ports) where two hold the same
-- rules: the table keyed by server_id and the node's ports.
CREATE TABLE reservations_keyed (
    server_id   TEXT NOT NULL PRIMARY KEY REFERENCES servers(id),
    generation  INTEGER NOT NULL,
    node_id     TEXT NOT NULL REFERENCES nodes(id),
    memory_mib  INTEGER NOT NULL CHECK (memory_mib > 0),
    port        INTEGER NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('pending', 'active')),
    created_at  INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO reservations_keyed (server_id, generation, node_id, memory_mib, port, state, created_at)
    SELECT server_id, generation, node_id, memory_mib, port, state, created_at FROM reservations;
DROP TABLE reservations;
ALTER TABLE reservations_keyed RENAME TO reservations;
CREATE UNIQUE INDEX reservations_node_port ON reservations(node_id, port);

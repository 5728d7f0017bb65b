-- berth schema, version 7 (SQLite): reservations are stored in node order.
-- Keyed by server (version 6), a node's rows were spread over the whole
-- table, and every read of a node's reservations (the admission commit's
-- re-check, the queue's capacities, a node's reserved memory) looked each
-- row up by its key from the (node, port) index. Keyed by (node, port),
-- a node's rows are neighbours in the table itself; one reservation per
-- server (L2) is the unique index on server_id. Still two b-trees.
CREATE TABLE reservations_by_node (
    node_id     TEXT NOT NULL REFERENCES nodes(id),
    port        INTEGER NOT NULL,
    server_id   TEXT NOT NULL REFERENCES servers(id),
    generation  INTEGER NOT NULL,
    memory_mib  INTEGER NOT NULL CHECK (memory_mib > 0),
    state       TEXT NOT NULL CHECK (state IN ('pending', 'active')),
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (node_id, port)
) WITHOUT ROWID;
INSERT INTO reservations_by_node (node_id, port, server_id, generation, memory_mib, state, created_at)
    SELECT node_id, port, server_id, generation, memory_mib, state, created_at FROM reservations;
DROP TABLE reservations;
ALTER TABLE reservations_by_node RENAME TO reservations;
CREATE UNIQUE INDEX reservations_server ON reservations(server_id);

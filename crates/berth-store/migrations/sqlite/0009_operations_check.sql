-- berth schema, version 9 (SQLite): an operation's status is checked
-- without an IN list. SQLite evaluates a CHECK of `status IN (five
-- values)` by building a temporary b-tree of the five values, and it did
-- so for every insert and every status update of an operation: two a
-- start on the writer (its operation's insert and the update that
-- settles it), 4-5 % of the writer's time in opening and closing those
-- b-trees. The same rule written as equalities joined by OR is evaluated
-- in place. The table is rebuilt (SQLite cannot change a CHECK): the same
-- columns, rows, keys and indexes, and the key counter carried over, so
-- an operation's `seq` is never given twice.
CREATE TABLE operations_next (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT NOT NULL UNIQUE,
    server_id        TEXT NOT NULL REFERENCES servers(id),
    kind             TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status = 'pending' OR status = 'running' OR status = 'succeeded' OR status = 'failed' OR status = 'cancelled'),
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
INSERT INTO operations_next (seq, id, server_id, kind, status, phase, origin, attempts, next_attempt_at, error_code, error, created_at, started_at, finished_at)
    SELECT seq, id, server_id, kind, status, phase, origin, attempts, next_attempt_at, error_code, error, created_at, started_at, finished_at FROM operations;
DELETE FROM sqlite_sequence WHERE name = 'operations_next';
INSERT INTO sqlite_sequence (name, seq) SELECT 'operations_next', seq FROM sqlite_sequence WHERE name = 'operations';
DROP TABLE operations;
ALTER TABLE operations_next RENAME TO operations;
CREATE INDEX operations_server ON operations(server_id, seq);
CREATE INDEX operations_active ON operations(status) WHERE status IN ('pending', 'running');

-- berth schema, version 2 (SQLite): control-plane replicas and the leader
-- lease that decides which replica runs the background workers.
CREATE TABLE replicas (
    id          TEXT PRIMARY KEY,
    address     TEXT NOT NULL,
    started_at  INTEGER NOT NULL,
    last_seen   INTEGER NOT NULL
);

-- One row. `epoch` grows whenever leadership changes hands; the committer
-- checks it inside its transaction, so a deposed leader cannot commit.
CREATE TABLE leader (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    holder      TEXT NOT NULL,
    epoch       INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL
);

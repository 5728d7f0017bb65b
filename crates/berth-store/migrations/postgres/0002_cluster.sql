-- berth schema, version 2 (PostgreSQL): control-plane replicas and the leader
-- lease that decides which replica runs the background workers.
CREATE TABLE replicas (
    id          TEXT PRIMARY KEY,
    address     TEXT NOT NULL,
    started_at  BIGINT NOT NULL,
    last_seen   BIGINT NOT NULL
);

-- One row. `epoch` grows whenever leadership changes hands; the committer
-- checks it inside its transaction, so a deposed leader cannot commit.
CREATE TABLE leader (
    id          BIGINT PRIMARY KEY CHECK (id = 1),
    holder      TEXT NOT NULL,
    epoch       BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL
);

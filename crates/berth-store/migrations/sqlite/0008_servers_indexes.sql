-- berth schema, version 8 (SQLite): a server's step from one status to the
-- next writes its row and no index entry it does not have to. SQLite
-- rewrites an index entry when a column of the index, or of a partial
-- index's WHERE clause, changes; every start moves a server's status three
-- times (queued, starting, running), and each move rewrote its entry in
-- (status, queued_at) and in the live-name index (WHERE status <>
-- 'deleted'): random keys, a dirtied page each. Now the name index is
-- partial on `deleted_at`, which changes once, and the queue index holds
-- only queued servers; crashed servers, which the restart policy looks
-- for, have a partial index of their own.
ALTER TABLE servers ADD COLUMN deleted_at INTEGER;
UPDATE servers SET deleted_at = updated_at WHERE status = 'deleted';
DROP INDEX servers_live_name;
CREATE UNIQUE INDEX servers_live_name ON servers(name) WHERE deleted_at IS NULL;
DROP INDEX servers_status_queue;
CREATE INDEX servers_queue ON servers(queued_at, id) WHERE status = 'queued';
CREATE INDEX servers_crashed ON servers(id) WHERE status = 'crashed';

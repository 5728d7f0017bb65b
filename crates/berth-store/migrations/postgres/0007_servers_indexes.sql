-- berth schema, version 7 (PostgreSQL): the same indexes as SQLite's
-- schema 8. A server's status moves three times a start; an update that
-- changes a column of any index (or of a partial index's predicate) gets
-- no heap-only update and writes a new entry in every index of the
-- table. The live-name index is now partial on `deleted_at`, which
-- changes once, and the queue index holds only queued servers.
ALTER TABLE servers ADD COLUMN deleted_at BIGINT;
UPDATE servers SET deleted_at = updated_at WHERE status = 'deleted';
DROP INDEX servers_live_name;
CREATE UNIQUE INDEX servers_live_name ON servers(name) WHERE deleted_at IS NULL;
DROP INDEX servers_status_queue;
CREATE INDEX servers_queue ON servers(queued_at, id) WHERE status = 'queued';
CREATE INDEX servers_crashed ON servers(id) WHERE status = 'crashed';

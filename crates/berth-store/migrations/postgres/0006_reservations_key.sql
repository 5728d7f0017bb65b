-- berth schema, version 6 (PostgreSQL): a reservation is keyed by its
-- server alone (one row per placed server, L2); the key (server_id,
-- generation) beside the unique index on server_id was a second index
-- with no rule of its own that every placement and release wrote.
ALTER TABLE reservations DROP CONSTRAINT reservations_pkey;
ALTER TABLE reservations ADD CONSTRAINT reservations_pkey PRIMARY KEY USING INDEX reservations_one_per_server;

-- berth schema, version 5 (SQLite): the server data dirs each node keeps,
-- as last reported (a JSON array of server ids).
ALTER TABLE nodes ADD COLUMN volumes TEXT NOT NULL DEFAULT '[]';

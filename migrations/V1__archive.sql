-- The archive: one row per finished message, its raw bytes, its addresses, its delivery
-- attempts, and a full-text index over subject and text (tsvector + GIN).
-- `seq` orders the archive: newest first is `seq DESC`; a message archived again gets a new
-- `seq` (it moves to the top), keeping its attempts (they are keyed on the message id).

CREATE TABLE message (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL CHECK (state IN ('delivered', 'dropped', 'dead')),
    received_ms BIGINT NOT NULL,
    finished_at TEXT NOT NULL,
    source TEXT NOT NULL,
    sender TEXT NOT NULL,
    subject TEXT NOT NULL,
    rule TEXT,
    destinations JSONB NOT NULL,
    envelope JSONB NOT NULL,
    fields JSONB,
    payload TEXT,
    reason TEXT,
    size BIGINT NOT NULL,
    -- What the message takes in the archive (raw bytes, text, payload, envelope), for
    -- `[archive] max_size`.
    footprint BIGINT NOT NULL,
    search TSVECTOR NOT NULL
);
CREATE INDEX message_state ON message (state, seq);
CREATE INDEX message_rule ON message (rule, seq);
CREATE INDEX message_sender ON message (sender, seq);
CREATE INDEX message_source ON message (source, seq);
CREATE INDEX message_received ON message (received_ms);
CREATE INDEX message_search ON message USING GIN (search);

CREATE TABLE message_raw (
    seq BIGINT PRIMARY KEY REFERENCES message (seq) ON DELETE CASCADE,
    bytes BYTEA NOT NULL
);

CREATE TABLE address (
    seq BIGINT NOT NULL REFERENCES message (seq) ON DELETE CASCADE,
    kind TEXT NOT NULL CHECK (kind IN ('to', 'dest')),
    value TEXT NOT NULL
);
CREATE INDEX address_value ON address (kind, value, seq);
CREATE INDEX address_seq ON address (seq);

CREATE TABLE attempt (
    n BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id TEXT NOT NULL,
    at TEXT NOT NULL,
    destination TEXT NOT NULL,
    outcome TEXT NOT NULL,
    status INTEGER,
    reply TEXT,
    body TEXT,
    duration_ms BIGINT NOT NULL
);
CREATE INDEX attempt_message ON attempt (message_id, n);
CREATE INDEX attempt_destination ON attempt (destination, at, n);

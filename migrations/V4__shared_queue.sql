-- The shared queue, in use from this version: one row per message waiting, being delivered or
-- dead, with its raw bytes, so that any instance can deliver or show any message. It replaces
-- the unused `queue` and `dead_letter` tables of V2: a dead letter is a row in state `dead`.
--
-- `meta` is the spool's metadata of the message (envelope, size, attempts, the rules' decision
-- with the state of each destination) as JSON text, byte for byte as mailhook wrote it (JSONB
-- would reorder the keys of a stored payload). `next_attempt_at` is when the message is due.
-- A row is claimed by one instance at a time: `lease_owner` is that instance's id and the claim
-- holds until `lease_until`, renewed while the instance works; once it has passed, another
-- instance may claim the row (`FOR UPDATE SKIP LOCKED`).

DROP TABLE queue;
DROP TABLE dead_letter;

CREATE TABLE queue (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('incoming', 'active', 'deferred', 'dead')),
    meta TEXT NOT NULL,
    raw BYTEA NOT NULL,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    lease_owner TEXT,
    lease_until TIMESTAMPTZ,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX queue_due ON queue (next_attempt_at) WHERE state <> 'dead';
CREATE INDEX queue_state ON queue (state, id);
CREATE INDEX queue_owner ON queue (lease_owner) WHERE lease_owner IS NOT NULL;

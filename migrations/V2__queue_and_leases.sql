-- The tables of the shared queue, the IMAP folder leases and the shared pacing. mailhook does
-- not use them yet (the file spool holds the queue); they are created now so that the schema
-- the next versions build on is reviewed and versioned as one.

-- Messages waiting for delivery, and who holds them. An instance claims due rows with
-- `FOR UPDATE SKIP LOCKED`, sets `lease_owner`/`lease_until`, and renews the lease while it
-- works; a row whose lease expired is claimable again.
CREATE TABLE queue (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('incoming', 'active', 'deferred')),
    envelope JSONB NOT NULL,
    raw BYTEA NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error TEXT,
    lease_owner TEXT,
    lease_until TIMESTAMPTZ,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX queue_due ON queue (next_attempt_at);
CREATE INDEX queue_lease ON queue (lease_until) WHERE lease_owner IS NOT NULL;

-- Messages that failed for good, until replayed or removed.
CREATE TABLE dead_letter (
    id TEXT PRIMARY KEY,
    envelope JSONB NOT NULL,
    raw BYTEA NOT NULL,
    reason TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    died_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Where each IMAP folder's watcher got to.
CREATE TABLE imap_checkpoint (
    account TEXT NOT NULL,
    folder TEXT NOT NULL,
    uidvalidity BIGINT NOT NULL,
    last_uid BIGINT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (account, folder)
);

-- The permanent dedupe ledger: a message of a folder is spooled once, whichever instance
-- reads it and however often instances crash. The fingerprint (a hash of the raw message)
-- also catches the same message under a new UIDVALIDITY.
CREATE TABLE imap_seen (
    account TEXT NOT NULL,
    folder TEXT NOT NULL,
    uidvalidity BIGINT NOT NULL,
    uid BIGINT NOT NULL,
    fingerprint BYTEA NOT NULL,
    message_id TEXT NOT NULL,
    seen_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (account, folder, uidvalidity, uid)
);
CREATE INDEX imap_seen_fingerprint ON imap_seen (account, folder, fingerprint);

-- Each IMAP folder is watched by one instance at a time: the holder renews `until` with a
-- heartbeat; once it has passed, another instance takes the folder over.
CREATE TABLE folder_lease (
    account TEXT NOT NULL,
    folder TEXT NOT NULL,
    owner TEXT NOT NULL,
    until TIMESTAMPTZ NOT NULL,
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (account, folder)
);

-- Pacing shared by every instance (Kustomer counts requests per org): a token bucket per
-- destination and the pause a 429 asked for.
CREATE TABLE pacing (
    destination TEXT PRIMARY KEY,
    tokens DOUBLE PRECISION NOT NULL,
    refilled_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    paused_until TIMESTAMPTZ
);

-- The instances sharing the database, for health pages.
CREATE TABLE instance (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Event feeds (pull delivery). See resilience::feed.
--
-- Producer side: an append-only log per feed. Producers insert rows with a
-- NULL position in their own transaction; a sequencer numbers committed rows
-- later, serialised by the feed's head row, so positions become visible in
-- order and a reader can never skip one (see the module docs).
CREATE TABLE IF NOT EXISTS feed_events (
    seq          BIGSERIAL PRIMARY KEY,
    feed         TEXT NOT NULL,
    position     BIGINT,
    id           TEXT NOT NULL,
    event_type   TEXT NOT NULL,
    payload      TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    sequenced_at BIGINT,
    UNIQUE (feed, id)
);
CREATE UNIQUE INDEX IF NOT EXISTS feed_events_position ON feed_events (feed, position);
CREATE INDEX IF NOT EXISTS feed_events_unsequenced ON feed_events (feed, seq) WHERE position IS NULL;
-- One row per feed: the highest position handed out (the sequencer's lock)
-- and the highest position trimmed away by retention.
CREATE TABLE IF NOT EXISTS feed_heads (
    feed         TEXT PRIMARY KEY,
    head         BIGINT NOT NULL DEFAULT 0,
    trimmed_upto BIGINT NOT NULL DEFAULT 0,
    updated_at   BIGINT NOT NULL
);
-- Consumer side: the offset of each feed this service reads, under a lease.
CREATE TABLE IF NOT EXISTS feed_offsets (
    feed         TEXT PRIMARY KEY,
    position     BIGINT NOT NULL DEFAULT 0,
    holder       TEXT,
    lease_until  BIGINT,
    takeovers    BIGINT NOT NULL DEFAULT 0,
    head         BIGINT,
    updated_at   BIGINT NOT NULL
);
-- Events the consumer's handler refused: kept, visible and requeueable.
CREATE TABLE IF NOT EXISTS feed_dead (
    feed         TEXT NOT NULL,
    id           TEXT NOT NULL,
    position     BIGINT NOT NULL,
    event_type   TEXT NOT NULL,
    payload      TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    reason       TEXT NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('dead', 'requeued', 'applied')),
    attempts     BIGINT NOT NULL DEFAULT 1,
    updated_at   BIGINT NOT NULL,
    PRIMARY KEY (feed, id)
);
CREATE INDEX IF NOT EXISTS feed_dead_status ON feed_dead (feed, status);

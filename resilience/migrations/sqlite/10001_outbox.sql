-- The transactional outbox: outgoing HTTP requests, inserted in the caller's
-- transaction and delivered by the relay until the peer acknowledges them.
CREATE TABLE IF NOT EXISTS outbox (
    id              TEXT PRIMARY KEY,
    destination     TEXT NOT NULL,
    method          TEXT NOT NULL,
    path            TEXT NOT NULL,
    headers         TEXT NOT NULL,
    body            BLOB NOT NULL,
    kind            TEXT NOT NULL,
    correlation_id  TEXT,
    idempotency_key TEXT,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    lease_owner     TEXT,
    lease_until     BIGINT,
    takeovers       BIGINT NOT NULL DEFAULT 0,
    last_error      TEXT,
    last_status     BIGINT,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    delivered_at    BIGINT
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (status, next_attempt_at);
CREATE INDEX IF NOT EXISTS outbox_delivered ON outbox (status, delivered_at);

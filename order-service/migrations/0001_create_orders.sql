-- Orders owned by order-service. Timestamps are milliseconds since the epoch,
-- so the same DDL works on SQLite and Postgres.
CREATE TABLE IF NOT EXISTS orders (
    id            TEXT PRIMARY KEY,
    customer_id   TEXT NOT NULL,
    items         TEXT NOT NULL,
    delivery_mode TEXT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('pending', 'accepted', 'shipped')),
    shipment_id   TEXT,
    last_error    TEXT,
    send_attempts BIGINT NOT NULL DEFAULT 0,
    created_at    BIGINT NOT NULL,
    accepted_at   BIGINT,
    shipped_at    BIGINT,
    updated_at    BIGINT NOT NULL
);

CREATE INDEX IF NOT EXISTS orders_by_created ON orders (created_at, id);
CREATE INDEX IF NOT EXISTS orders_by_status ON orders (status, created_at, id);

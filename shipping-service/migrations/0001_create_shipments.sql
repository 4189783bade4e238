-- Shipments owned by shipping-service. No unique constraint on order_id: a
-- sender that retries without idempotency keys can create two shipments for
-- one order, and the lab counts exactly that.
CREATE TABLE IF NOT EXISTS shipments (
    id              TEXT PRIMARY KEY,
    order_id        TEXT NOT NULL,
    items           TEXT NOT NULL,
    delivery_mode   TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('packing', 'shipped')),
    created_at      BIGINT NOT NULL,
    ship_at         BIGINT NOT NULL,
    shipped_at      BIGINT,
    report_attempts BIGINT NOT NULL DEFAULT 0,
    report_error    TEXT,
    reported_at     BIGINT,
    updated_at      BIGINT NOT NULL
);

CREATE INDEX IF NOT EXISTS shipments_by_order ON shipments (order_id, created_at, id);
CREATE INDEX IF NOT EXISTS shipments_by_created ON shipments (created_at, id);
CREATE INDEX IF NOT EXISTS shipments_due ON shipments (status, ship_at);

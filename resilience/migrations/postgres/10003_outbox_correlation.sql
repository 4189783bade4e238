-- Owners look up the messages of one of their entities (an order's request).
CREATE INDEX IF NOT EXISTS outbox_correlation ON outbox (correlation_id);

-- The W3C trace context a shipment was created in (its `traceparent`, whose
-- parent is the span that created the shipment, and the caller's
-- `tracestate`). The shipped report carries it, so the report joins the
-- order's trace. NULL for shipments created before it existed. Plain
-- ADD COLUMN: the same DDL on SQLite and Postgres.
ALTER TABLE shipments ADD COLUMN traceparent TEXT;
ALTER TABLE shipments ADD COLUMN tracestate TEXT;

-- The relay's claim walks this index in next_attempt_at order and stops
-- after a batch. It holds claimable rows only, so it stays as small as the
-- backlog however much delivered history the table keeps.
--
-- The predicate is spelled as two inequalities, and the claim spells it the
-- same way, on purpose: with no statistics (a fresh table, or a backlog that
-- grew since the last ANALYZE) Postgres takes `status = 'pending'` for a
-- rare value, expects a handful of due rows, and sorts all of them instead
-- of walking an index; a claim then read the whole backlog. Inequalities
-- are expected to match most rows, so the planner walks this index and
-- stops at the batch's LIMIT. The CHECK on status admits three values, so
-- the two spellings select the same rows.
CREATE INDEX IF NOT EXISTS outbox_claimable ON outbox (next_attempt_at)
    WHERE status <> 'delivered' AND status <> 'dead';

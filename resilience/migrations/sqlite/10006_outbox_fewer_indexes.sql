-- Every message is inserted, claimed and settled, and each of those writes
-- a new row version with an entry in every index of the table whenever it
-- cannot stay on its page (a claim rarely can: the rows of one page are
-- claimed together). Five indexes made that fourteen index entries per
-- message; these three make it nine.
--
-- `outbox_due (status, next_attempt_at)` served the pending count and the
-- relay's next-due query; both now read `outbox_claimable`, written so that
-- it serves them even without statistics (`claimable!` in outbox/mod.rs). The two history indexes are partial, so
-- a pending message has no entry in them: `outbox_delivered_at` for the
-- retention purge, `outbox_dead` for the dead-letter listing.
DROP INDEX IF EXISTS outbox_due;
DROP INDEX IF EXISTS outbox_delivered;
CREATE INDEX IF NOT EXISTS outbox_delivered_at ON outbox (delivered_at)
    WHERE status = 'delivered';
CREATE INDEX IF NOT EXISTS outbox_dead ON outbox (created_at, id)
    WHERE status = 'dead';

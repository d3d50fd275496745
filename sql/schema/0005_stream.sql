-- segflow stream: what a ledger reader needs to resume without gaps.
--
-- transition_id comes from a sequence, so a transaction can commit a smaller id after a larger
-- one is visible. Each row therefore records its writing (top-level) transaction: every row
-- whose xact_id is below the xmin of a reader's snapshot is final (its transaction has ended),
-- and every row that is not yet visible has an xact_id at or above it. `GET /v1/stream` reads
-- in batches of such final transactions.
ALTER TABLE segflow.transition_log
    ADD COLUMN xact_id xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX transition_log_xact ON segflow.transition_log (xact_id);

-- segflow delivery: destinations, segment actions, and one delivery row per (transition,
-- destination). Delivery rows are written by a statement trigger on the ledger, in the same
-- transaction as the transitions, so no consumer needs a high-water mark on transition_id
-- (a smaller id can commit after a larger one). NOTIFY only wakes the worker up.

CREATE TABLE segflow.destinations (
    name            text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_]{0,62}$'),
    url             text NOT NULL,
    channel         text NOT NULL CHECK (channel IN ('email', 'sms', 'push', 'ads', 'webhook')),
    secret_env      text,
    secret_file     text,
    timeout         interval NOT NULL DEFAULT '10 seconds',
    max_attempts    integer NOT NULL DEFAULT 8 CHECK (max_attempts >= 1),
    active          boolean NOT NULL DEFAULT true,
    definition      jsonb NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT segflow.now(),
    CHECK ((secret_env IS NULL) <> (secret_file IS NULL))
);

CREATE TABLE segflow.segment_actions (
    segment_id       integer NOT NULL,
    position         integer NOT NULL,
    on_kind          text NOT NULL CHECK (on_kind IN ('enter', 'exit')),
    destination      text NOT NULL,
    priority         integer,
    payload          jsonb,
    include_backfill boolean NOT NULL DEFAULT false,
    PRIMARY KEY (segment_id, position)
);
CREATE INDEX segment_actions_kind ON segflow.segment_actions (segment_id, on_kind);

CREATE TABLE segflow.deliveries (
    delivery_id     bigint GENERATED ALWAYS AS IDENTITY,
    transition_id   bigint NOT NULL,
    profile_id      bigint NOT NULL,
    segment_id      integer NOT NULL,
    destination     text NOT NULL,
    channel         text NOT NULL,
    priority        integer,
    payload         jsonb,
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'sending', 'delivered', 'dead', 'skipped')),
    skip_reason     text,
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- While `sending`: when the claim expires and another worker may take the row over.
    locked_until    timestamptz,
    last_error      text,
    -- Sent as X-Segflow-Delivery; the same on every attempt and replay.
    delivery_key    text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    delivered_at    timestamptz,
    -- Keyed by profile like every engine table; transition_id is globally unique, so this is
    -- also unique per (transition_id, destination).
    PRIMARY KEY (profile_id, delivery_id),
    UNIQUE (profile_id, transition_id, destination)
);
CREATE INDEX deliveries_id ON segflow.deliveries (delivery_id);
CREATE INDEX deliveries_due ON segflow.deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX deliveries_lease ON segflow.deliveries (locked_until) WHERE status = 'sending';
CREATE INDEX deliveries_dead ON segflow.deliveries (delivery_id) WHERE status = 'dead';

CREATE FUNCTION segflow._transitions_to_deliveries() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO segflow.deliveries (transition_id, profile_id, segment_id, destination, channel,
                                    priority, payload, delivery_key)
    SELECT t.transition_id, t.profile_id, t.segment_id, a.destination, d.channel,
           a.priority, a.payload, t.transition_id || '-' || a.destination
    FROM new_rows t
    JOIN segflow.segment_actions a ON a.segment_id = t.segment_id AND a.on_kind = t.kind
    JOIN segflow.destinations d ON d.name = a.destination AND d.active
    -- A backfill is the segment being installed, not the trader doing something.
    WHERE t.reason <> 'backfill' OR a.include_backfill
    ORDER BY t.profile_id, t.transition_id
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;

CREATE TRIGGER transition_log_deliveries
    AFTER INSERT ON segflow.transition_log
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION segflow._transitions_to_deliveries();

-- Claims up to p_limit due deliveries for one worker (SKIP LOCKED, so workers never share a
-- row), applying the campaign rules first: a row a rule rejects becomes `skipped` with its
-- reason and is not returned. A `sending` row whose lease expired (its worker died) is taken
-- over; on its last attempt it becomes `dead` instead.
CREATE FUNCTION segflow.claim_deliveries(p_limit integer DEFAULT 50,
                                         p_lease interval DEFAULT '30 seconds')
RETURNS TABLE (delivery_id bigint, profile_id bigint, destination text, url text,
               secret_env text, secret_file text, timeout_s double precision,
               attempts integer, max_attempts integer, delivery_key text, body jsonb)
LANGUAGE sql AS $$
    WITH due AS (
        SELECT d.profile_id, d.delivery_id FROM segflow.deliveries d
        WHERE (d.status = 'pending' AND d.next_attempt_at <= clock_timestamp())
           OR (d.status = 'sending' AND d.locked_until < clock_timestamp())
        ORDER BY d.next_attempt_at, d.delivery_id
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ), judged AS (
        SELECT d.profile_id, d.delivery_id, dst.timeout,
               coalesce(s.traits, p.traits, '{}') AS traits,
               CASE
                   WHEN dst.name IS NULL OR NOT dst.active THEN 'skipped'
                   WHEN coalesce(s.traits, p.traits) #> ARRAY['consent', d.channel]
                        = 'false'::jsonb THEN 'skipped'
                   WHEN d.status = 'sending' AND d.attempts >= dst.max_attempts THEN 'dead'
                   ELSE 'sending'
               END AS status,
               CASE
                   WHEN dst.name IS NULL OR NOT dst.active THEN 'destination_removed'
                   WHEN coalesce(s.traits, p.traits) #> ARRAY['consent', d.channel]
                        = 'false'::jsonb THEN 'suppressed_consent'
               END AS skip_reason
        FROM due
        JOIN segflow.deliveries d
          ON d.profile_id = due.profile_id AND d.delivery_id = due.delivery_id
        LEFT JOIN segflow.destinations dst ON dst.name = d.destination
        LEFT JOIN segflow.profiles p ON p.profile_id = d.profile_id
        -- A merged profile's traits live on the survivor.
        LEFT JOIN segflow.profiles s ON s.profile_id = p.merged_into
    ), claimed AS (
        UPDATE segflow.deliveries d
        SET status = j.status,
            skip_reason = j.skip_reason,
            attempts = d.attempts + CASE WHEN j.status = 'sending' THEN 1 ELSE 0 END,
            locked_until = CASE WHEN j.status = 'sending'
                                THEN clock_timestamp() + j.timeout + p_lease END,
            last_error = CASE WHEN j.status = 'dead'
                              THEN 'worker lease expired on the last attempt'
                              ELSE d.last_error END
        FROM judged j
        WHERE d.profile_id = j.profile_id AND d.delivery_id = j.delivery_id
        RETURNING d.*, j.traits
    )
    SELECT c.delivery_id, c.profile_id, c.destination, dst.url, dst.secret_env, dst.secret_file,
           extract(epoch FROM dst.timeout)::double precision, c.attempts, dst.max_attempts,
           c.delivery_key,
           jsonb_strip_nulls(jsonb_build_object(
               'transition_id', t.transition_id, 'segment', sd.name,
               'profile_id', t.profile_id, 'kind', t.kind, 'effective_at', t.effective_at,
               'reason', t.reason, 'context', t.context, 'payload', c.payload))
           || jsonb_build_object('profile', c.traits)
    FROM claimed c
    JOIN segflow.destinations dst ON dst.name = c.destination
    JOIN segflow.transition_log t
      ON t.profile_id = c.profile_id AND t.transition_id = c.transition_id
    JOIN segflow.segment_defs sd ON sd.segment_id = c.segment_id
    WHERE c.status = 'sending'
    ORDER BY c.delivery_id
$$;

-- The outcome of attempt p_attempt; ignored if the row was taken over meanwhile.
CREATE FUNCTION segflow.delivery_succeeded(p_profile_id bigint, p_delivery_id bigint,
                                           p_attempt integer) RETURNS boolean
LANGUAGE sql AS $$
    WITH done AS (
        UPDATE segflow.deliveries
        SET status = 'delivered', delivered_at = clock_timestamp(), locked_until = NULL,
            last_error = NULL
        WHERE profile_id = p_profile_id AND delivery_id = p_delivery_id
          AND status = 'sending' AND attempts = p_attempt
        RETURNING 1)
    SELECT EXISTS (SELECT FROM done)
$$;

-- A failed attempt: retried after p_retry_in, or `dead` when p_permanent or out of attempts.
-- Returns the new status (NULL if the row was taken over meanwhile).
CREATE FUNCTION segflow.delivery_failed(p_profile_id bigint, p_delivery_id bigint,
                                        p_attempt integer, p_error text, p_retry_in interval,
                                        p_permanent boolean DEFAULT false) RETURNS text
LANGUAGE sql AS $$
    UPDATE segflow.deliveries d
    SET status = CASE WHEN p_permanent OR d.attempts >= coalesce(x.max_attempts, 1)
                      THEN 'dead' ELSE 'pending' END,
        next_attempt_at = clock_timestamp() + p_retry_in,
        locked_until = NULL,
        last_error = left(p_error, 2000)
    FROM segflow.deliveries cur
    LEFT JOIN segflow.destinations x ON x.name = cur.destination
    WHERE cur.profile_id = p_profile_id AND cur.delivery_id = p_delivery_id
      AND d.profile_id = cur.profile_id AND d.delivery_id = cur.delivery_id
      AND d.status = 'sending' AND d.attempts = p_attempt
    RETURNING d.status
$$;

-- Replays dead letters: one delivery, or every dead one when p_delivery_id is NULL. The
-- delivery key is kept, so a receiver that did get an earlier attempt can drop the replay.
CREATE FUNCTION segflow.retry_deliveries(p_delivery_id bigint DEFAULT NULL) RETURNS integer
LANGUAGE sql AS $$
    WITH replayed AS (
        UPDATE segflow.deliveries
        SET status = 'pending', attempts = 0, next_attempt_at = clock_timestamp(),
            locked_until = NULL
        WHERE status = 'dead' AND (p_delivery_id IS NULL OR delivery_id = p_delivery_id)
        RETURNING 1)
    SELECT count(*)::integer FROM replayed
$$;

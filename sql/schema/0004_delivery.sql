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
    -- Frequency cap: at most cap_max messages per profile on this channel within cap_per.
    cap_max         integer CHECK (cap_max >= 1),
    cap_per         interval,
    -- A repeat of the last message within this window is dropped; NULL: never.
    dedup_window    interval DEFAULT '1 hour',
    definition      jsonb NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT segflow.now(),
    CHECK ((secret_env IS NULL) <> (secret_file IS NULL)),
    CHECK ((cap_max IS NULL) = (cap_per IS NULL)),
    -- An ads destination is an audience: membership updates are never rationed.
    CHECK (channel <> 'ads' OR cap_max IS NULL)
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
    -- The transition's kind: an ads audience also gets the exits of an `on: enter` action.
    kind            text NOT NULL CHECK (kind IN ('enter', 'exit')),
    priority        integer,
    -- The action's payload; its strings are templates the worker renders at send time.
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
    -- When the campaign rules judged the row (sent on or skipped). Judged once: a retry or a
    -- replay keeps the slot it won under the frequency cap; only consent is checked again.
    judged_at       timestamptz,
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
                                    kind, priority, payload, delivery_key)
    SELECT t.transition_id, t.profile_id, t.segment_id, a.destination, d.channel,
           t.kind, a.priority, a.payload, t.transition_id || '-' || a.destination
    FROM new_rows t
    JOIN segflow.segment_actions a ON a.segment_id = t.segment_id
    JOIN segflow.destinations d ON d.name = a.destination AND d.active
    -- An ads audience mirrors membership: its `on: enter` action also removes on exit.
    WHERE (a.on_kind = t.kind OR (d.channel = 'ads' AND a.on_kind = 'enter'))
      -- A backfill is the segment being installed, not the trader doing something.
      AND (t.reason <> 'backfill' OR a.include_backfill)
    ORDER BY t.profile_id, t.transition_id
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;

CREATE TRIGGER transition_log_deliveries
    AFTER INSERT ON segflow.transition_log
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION segflow._transitions_to_deliveries();

-- The latest delivery to p_destination for this profile and segment before p_transition_id
-- that was sent or is on its way (judged and not dead or skipped).
CREATE FUNCTION segflow._last_sent(p_profile_id bigint, p_destination text,
                                   p_segment_id integer, p_transition_id bigint)
RETURNS TABLE (kind text, payload jsonb, status text, delivered_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT x.kind, x.payload, x.status, x.delivered_at
    FROM segflow.deliveries x
    WHERE x.profile_id = p_profile_id AND x.destination = p_destination
      AND x.segment_id = p_segment_id AND x.transition_id < p_transition_id
      AND (x.status = 'delivered'
           OR (x.status IN ('pending', 'sending') AND x.judged_at IS NOT NULL))
    ORDER BY x.transition_id DESC
    LIMIT 1
$$;

-- Claims up to p_limit deliveries for one worker and applies the campaign rules to them
-- first; a row a rule rejects becomes `skipped` with its reason and is not returned.
--
-- The rules compare a delivery with the others of its profile and channel, so each
-- (profile, channel) is judged by one worker at a time: a worker owns the groups it gets a
-- transaction advisory lock on (try-locks, so workers never wait on each other), and reads
-- the group afterwards in a new statement, whose snapshot therefore holds every decision of
-- the group's previous owner. Within a group, rows are judged by priority (higher first),
-- then in arrival order; each decision is written at once, so the next row sees it:
--
--   destination_removed      the destination is no longer applied
--   suppressed_consent       traits.consent.<channel> is false (checked on every attempt;
--                            removing someone the ads audience was told about needs no
--                            consent)
--   suppressed_duplicate     the destination's last message for this profile and segment
--                            (sent, or on its way) has the same kind and payload, within
--                            the destination's dedup_window
--   suppressed_frequency_cap the channel already carried cap_max messages to the profile
--                            within cap_per (any destination of the channel counts)
--   suppressed_priority      the cap had room, but deliveries of higher priority judged
--                            in the same claim took it
--
-- Ads deliveries are audience updates, not messages: only destination and consent apply.
-- A `sending` row whose lease expired (its worker died) was judged already; it is taken
-- over, or becomes `dead` if that was its last attempt.
CREATE FUNCTION segflow.claim_deliveries(p_limit integer DEFAULT 50,
                                         p_lease interval DEFAULT '30 seconds')
RETURNS TABLE (delivery_id bigint, profile_id bigint, destination text, url text,
               secret_env text, secret_file text, timeout_s double precision,
               attempts integer, max_attempts integer, delivery_key text, body jsonb)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_now timestamptz := clock_timestamp();
    v_groups text[] := '{}';
    v_profiles bigint[] := '{}';
    v_channels text[] := '{}';
    v_rows integer := 0;
    v_claimed bigint[] := '{}';
    v_claimed_profiles bigint[] := '{}';
    r record;
    v_group text;
    v_status text;
    v_reason text;
    v_before integer;
    v_total integer;
BEGIN
    -- 1. Own the groups of the earliest due rows, skipping groups another worker holds.
    FOR r IN
        SELECT d.profile_id, d.channel FROM segflow.deliveries d
        WHERE (d.status = 'pending' AND d.next_attempt_at <= v_now)
           OR (d.status = 'sending' AND d.locked_until < v_now)
        ORDER BY d.next_attempt_at, d.delivery_id
        -- Enough candidates for p_limit rows when some groups belong to other workers.
        LIMIT p_limit * 8
    LOOP
        v_group := r.profile_id || ':' || r.channel;
        IF v_group = ANY (v_groups) THEN
            v_rows := v_rows + 1;
        ELSIF pg_try_advisory_xact_lock(hashtextextended('segflow.delivery:' || v_group, 0)) THEN
            v_groups := v_groups || v_group;
            v_profiles := v_profiles || r.profile_id;
            v_channels := v_channels || r.channel;
            v_rows := v_rows + 1;
        END IF;
        EXIT WHEN v_rows >= p_limit;
    END LOOP;
    IF v_rows = 0 THEN
        RETURN;
    END IF;

    -- 2. Judge every due row of the owned groups (a fresh snapshot: see above).
    FOR r IN
        SELECT d.profile_id, d.delivery_id, d.transition_id, d.segment_id, d.destination,
               d.channel, d.kind, d.payload, coalesce(d.priority, 0) AS priority, d.status,
               d.attempts, d.judged_at, dst.active, dst.timeout, dst.max_attempts,
               dst.cap_max, dst.cap_per, dst.dedup_window,
               coalesce(s.traits, p.traits) #> ARRAY['consent', d.channel]
                   = 'false'::jsonb AS no_consent
        FROM unnest(v_profiles, v_channels) g(profile_id, channel)
        JOIN segflow.deliveries d ON d.profile_id = g.profile_id AND d.channel = g.channel
        LEFT JOIN segflow.destinations dst ON dst.name = d.destination
        LEFT JOIN segflow.profiles p ON p.profile_id = d.profile_id
        -- A merged profile's traits live on the survivor.
        LEFT JOIN segflow.profiles s ON s.profile_id = p.merged_into
        WHERE (d.status = 'pending' AND d.next_attempt_at <= v_now)
           OR (d.status = 'sending' AND d.locked_until < v_now)
        ORDER BY d.profile_id, d.channel, coalesce(d.priority, 0) DESC, d.delivery_id
        FOR UPDATE OF d SKIP LOCKED
    LOOP
        EXIT WHEN cardinality(v_claimed) >= p_limit;
        v_status := 'sending';
        v_reason := NULL;
        IF r.active IS NOT TRUE THEN
            v_status := 'skipped';
            v_reason := 'destination_removed';
        ELSIF r.no_consent AND NOT (r.channel = 'ads' AND r.kind = 'exit' AND EXISTS (
                SELECT FROM segflow._last_sent(r.profile_id, r.destination, r.segment_id,
                                               r.transition_id) last
                WHERE last.kind = 'enter'))
        THEN
            v_status := 'skipped';
            v_reason := 'suppressed_consent';
        ELSIF r.status = 'sending' AND r.attempts >= r.max_attempts THEN
            v_status := 'dead';
        ELSIF r.judged_at IS NULL AND r.channel <> 'ads' THEN
            IF r.dedup_window IS NOT NULL AND EXISTS (
                SELECT FROM segflow._last_sent(r.profile_id, r.destination, r.segment_id,
                                               r.transition_id) last
                WHERE last.kind = r.kind AND last.payload IS NOT DISTINCT FROM r.payload
                  AND (last.status <> 'delivered'
                       OR last.delivered_at > v_now - r.dedup_window))
            THEN
                v_status := 'skipped';
                v_reason := 'suppressed_duplicate';
            ELSIF r.cap_max IS NOT NULL THEN
                -- Messages on the channel in the window: delivered, or on their way.
                SELECT count(*) FILTER (WHERE x.judged_at IS DISTINCT FROM v_now), count(*)
                INTO v_before, v_total
                FROM segflow.deliveries x
                WHERE x.profile_id = r.profile_id AND x.channel = r.channel
                  AND ((x.status = 'delivered' AND x.delivered_at > v_now - r.cap_per)
                       OR (x.status IN ('pending', 'sending') AND x.judged_at IS NOT NULL));
                IF v_total >= r.cap_max THEN
                    v_status := 'skipped';
                    v_reason := CASE
                        WHEN v_before < r.cap_max AND EXISTS (
                            SELECT FROM segflow.deliveries x
                            WHERE x.profile_id = r.profile_id AND x.channel = r.channel
                              AND x.judged_at = v_now AND x.status = 'sending'
                              AND coalesce(x.priority, 0) > r.priority)
                        THEN 'suppressed_priority'
                        ELSE 'suppressed_frequency_cap' END;
                END IF;
            END IF;
        END IF;

        UPDATE segflow.deliveries d
        SET status = v_status,
            skip_reason = v_reason,
            attempts = d.attempts + CASE WHEN v_status = 'sending' THEN 1 ELSE 0 END,
            locked_until = CASE WHEN v_status = 'sending'
                                THEN clock_timestamp() + r.timeout + p_lease END,
            last_error = CASE WHEN v_status = 'dead'
                              THEN 'worker lease expired on the last attempt'
                              ELSE d.last_error END,
            judged_at = coalesce(d.judged_at, v_now)
        WHERE d.profile_id = r.profile_id AND d.delivery_id = r.delivery_id;
        IF v_status = 'sending' THEN
            v_claimed := v_claimed || r.delivery_id;
            v_claimed_profiles := v_claimed_profiles || r.profile_id;
        END IF;
    END LOOP;

    RETURN QUERY
    SELECT c.delivery_id, c.profile_id, c.destination, dst.url, dst.secret_env, dst.secret_file,
           extract(epoch FROM dst.timeout)::double precision, c.attempts, dst.max_attempts,
           c.delivery_key,
           jsonb_build_object(
               'transition_id', t.transition_id, 'segment', sd.name,
               'profile_id', t.profile_id, 'kind', t.kind, 'effective_at', t.effective_at,
               'reason', t.reason, 'context', t.context)
           -- Only an absent payload is left out: nulls inside context are values.
           || CASE WHEN c.payload IS NULL THEN '{}'::jsonb
                   ELSE jsonb_build_object('payload', c.payload) END
           || jsonb_build_object('profile', coalesce(s.traits, p.traits, '{}'))
    FROM unnest(v_claimed_profiles, v_claimed) k(profile_id, delivery_id)
    JOIN segflow.deliveries c ON c.profile_id = k.profile_id AND c.delivery_id = k.delivery_id
    JOIN segflow.destinations dst ON dst.name = c.destination
    JOIN segflow.transition_log t
      ON t.profile_id = c.profile_id AND t.transition_id = c.transition_id
    JOIN segflow.segment_defs sd ON sd.segment_id = c.segment_id
    LEFT JOIN segflow.profiles p ON p.profile_id = c.profile_id
    LEFT JOIN segflow.profiles s ON s.profile_id = p.merged_into
    ORDER BY c.delivery_id;
END
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

-- Ad suppression audiences for pull-based ad platforms: every current member of a segment
-- with an action on an active `ads` destination (the audience), with identifiers hashed the
-- way ad platforms match them (SHA-256 hex of the trimmed, lower-case email; of the phone as
-- '+' and its digits). Profiles whose consent.ads is false are left out, like their push
-- deliveries. Push-based platforms get the same membership through the destination's
-- webhooks (enter adds, exit removes).
CREATE VIEW segflow.ad_suppression AS
SELECT m.profile_id, a.destination AS audience, sd.name AS segment, m.entered_at AS since,
       ids.crm_id, ids.email_sha256, ids.phone_sha256
FROM (SELECT DISTINCT segment_id, destination FROM segflow.segment_actions
      WHERE on_kind = 'enter') a
JOIN segflow.destinations dst ON dst.name = a.destination AND dst.active AND dst.channel = 'ads'
JOIN segflow.segment_defs sd ON sd.segment_id = a.segment_id AND sd.active
JOIN segflow.segment_members m ON m.segment_id = a.segment_id
JOIN segflow.profiles p ON p.profile_id = m.profile_id
CROSS JOIN LATERAL (
    SELECT min(i.value) FILTER (WHERE i.kind = 'crm_id') AS crm_id,
           array_agg(DISTINCT encode(sha256(convert_to(lower(btrim(i.value)), 'UTF8')), 'hex'))
               FILTER (WHERE i.kind = 'email') AS email_sha256,
           array_agg(DISTINCT encode(sha256(convert_to(
                   '+' || regexp_replace(i.value, '[^0-9]', '', 'g'), 'UTF8')), 'hex'))
               FILTER (WHERE i.kind = 'phone') AS phone_sha256
    FROM segflow.identities i
    WHERE i.profile_id = m.profile_id
) ids
WHERE p.traits #> '{consent,ads}' IS DISTINCT FROM 'false'::jsonb;
COMMENT ON VIEW segflow.ad_suppression IS
    'members of segments whose actions target an ads destination (audience), with hashed identifiers';

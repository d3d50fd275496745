-- segflow ingest: validation, idempotency, FX, identity resolution, traits, merges.

-- The first problem of one event as 'field: reason', or NULL when the row is valid.
-- FX problems need a lookup and come from segflow.fx_problem.
CREATE FUNCTION segflow.event_problem(
    p_event_type text, p_occurred_at timestamptz, p_identifiers jsonb, p_profile_id bigint,
    p_amount numeric, p_currency text, p_properties jsonb, p_latest_allowed timestamptz
) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN p_event_type IS NULL OR p_event_type = '' THEN 'event_type: is required'
        WHEN p_event_type !~ '^[a-z][a-z0-9_]{0,62}$' THEN
            format('event_type: %s is not a lower-case identifier ([a-z][a-z0-9_]*)',
                   quote_literal(p_event_type))
        WHEN p_occurred_at IS NULL THEN 'occurred_at: is required'
        WHEN p_occurred_at > p_latest_allowed THEN
            format('occurred_at: %s is more than %s ahead of segflow.now()', p_occurred_at,
                   segflow.config_value('future_tolerance'))
        WHEN p_identifiers IS NULL AND p_profile_id IS NULL THEN
            'identifiers: required unless profile_id is given'
        WHEN p_identifiers IS NOT NULL AND jsonb_typeof(p_identifiers) <> 'object' THEN
            'identifiers: must be a JSON object of identifier kind to value'
        WHEN p_profile_id IS NULL AND p_identifiers = '{}'::jsonb THEN
            'identifiers: is empty'
        WHEN EXISTS (SELECT 1 FROM jsonb_object_keys(p_identifiers) k
                     WHERE k !~ '^[a-z][a-z0-9_]{0,62}$') THEN
            format('identifiers: kind %s is not a lower-case identifier',
                   (SELECT quote_literal(k) FROM jsonb_object_keys(p_identifiers) k
                    WHERE k !~ '^[a-z][a-z0-9_]{0,62}$' LIMIT 1))
        WHEN EXISTS (SELECT 1 FROM jsonb_each(p_identifiers) e
                     WHERE jsonb_typeof(e.value) NOT IN ('string', 'number')
                        OR e.value = '""'::jsonb) THEN
            format('identifiers: value of %s must be a non-empty string or a number',
                   (SELECT quote_literal(e.key) FROM jsonb_each(p_identifiers) e
                    WHERE jsonb_typeof(e.value) NOT IN ('string', 'number')
                       OR e.value = '""'::jsonb LIMIT 1))
        WHEN p_amount IS NOT NULL AND p_currency IS NULL THEN
            'currency: required when amount is given'
        WHEN p_currency IS NOT NULL AND p_currency !~ '^[A-Z]{3}$' THEN
            format('currency: %s is not an ISO 4217 code (three capital letters)',
                   quote_literal(p_currency))
        WHEN p_properties IS NOT NULL AND jsonb_typeof(p_properties) <> 'object' THEN
            'properties: must be a JSON object'
    END
$$;

-- The USD rate valid at an instant: the latest rate with valid_from <= p_at (USD is 1).
CREATE FUNCTION segflow.usd_rate(p_currency text, p_at timestamptz) RETURNS numeric
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN p_currency = 'USD' THEN 1::numeric ELSE
        (SELECT r.usd_per_unit FROM segflow.fx_rates r
         WHERE r.currency = p_currency AND r.valid_from <= p_at
         ORDER BY r.valid_from DESC LIMIT 1) END
$$;

-- Why an amount in p_currency at p_at cannot be converted (called only when no rate was found).
CREATE FUNCTION segflow.fx_problem(p_currency text, p_at timestamptz) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN NOT EXISTS (SELECT 1 FROM segflow.fx_rates WHERE currency = p_currency) THEN
            format('currency: unknown currency %s (no rate in segflow.fx_rates)',
                   quote_literal(p_currency))
        ELSE format('currency: no FX rate for %s valid at %s (earliest is %s)', p_currency, p_at,
                    (SELECT min(valid_from) FROM segflow.fx_rates WHERE currency = p_currency))
    END
$$;

-- Leaves of a JSON object as (path, value); arrays and scalars are leaves.
CREATE FUNCTION segflow.jsonb_leaves(p_doc jsonb, p_prefix text[] DEFAULT '{}')
RETURNS TABLE (path text[], value jsonb)
LANGUAGE sql IMMUTABLE AS $$
    WITH RECURSIVE walk(path, value) AS (
        SELECT p_prefix || e.key, e.value FROM jsonb_each(p_doc) e
        UNION ALL
        SELECT w.path || e.key, e.value
        FROM walk w, jsonb_each(w.value) e
        WHERE jsonb_typeof(w.value) = 'object'
    )
    SELECT w.path, w.value FROM walk w
    WHERE jsonb_typeof(w.value) <> 'object' OR w.value = '{}'::jsonb
$$;

-- jsonb_set that also creates missing intermediate objects.
CREATE FUNCTION segflow.jsonb_set_deep(p_doc jsonb, p_path text[], p_value jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_child jsonb;
BEGIN
    IF cardinality(p_path) = 1 THEN
        RETURN coalesce(p_doc, '{}'::jsonb) || jsonb_build_object(p_path[1], p_value);
    END IF;
    v_child := p_doc -> p_path[1];
    IF v_child IS NULL OR jsonb_typeof(v_child) <> 'object' THEN
        v_child := '{}'::jsonb;
    END IF;
    RETURN coalesce(p_doc, '{}'::jsonb) || jsonb_build_object(
        p_path[1], segflow.jsonb_set_deep(v_child, p_path[2:], p_value));
END
$$;

-- Applies one trait value to a profile under the trait's merge policy.
-- Returns true when the stored value changed.
CREATE FUNCTION segflow.apply_trait(
    p_profile_id bigint, p_path text[], p_value jsonb, p_at timestamptz, p_source text
) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_key text := array_to_string(p_path, '.');
    v_policy segflow.trait_policies;
    v_traits jsonb;
    v_meta jsonb;
    v_current jsonb;
    v_cur_at timestamptz;
    v_new jsonb := p_value;
    v_take boolean;
    v_rank_new integer;
    v_rank_cur integer;
BEGIN
    SELECT * INTO v_policy FROM segflow.trait_policies
    WHERE trait = v_key OR trait = p_path[1]
    ORDER BY (trait = v_key) DESC LIMIT 1;
    SELECT traits, trait_meta -> v_key INTO v_traits, v_meta
    FROM segflow.profiles WHERE profile_id = p_profile_id;
    v_current := v_traits #> p_path;
    v_cur_at := (v_meta ->> 'at')::timestamptz;

    IF v_current IS NULL THEN
        v_take := true;
    ELSE
        CASE coalesce(v_policy.policy, 'latest')
        WHEN 'first' THEN
            v_take := v_cur_at IS NULL OR p_at < v_cur_at;
        WHEN 'max', 'min' THEN
            IF jsonb_typeof(p_value) = 'number' AND jsonb_typeof(v_current) = 'number' THEN
                v_take := CASE v_policy.policy
                    WHEN 'max' THEN p_value::numeric > v_current::numeric
                    ELSE p_value::numeric < v_current::numeric END;
            ELSE
                v_take := v_cur_at IS NULL OR p_at >= v_cur_at;
            END IF;
        WHEN 'sum' THEN
            IF jsonb_typeof(p_value) = 'number' AND jsonb_typeof(v_current) = 'number' THEN
                v_new := to_jsonb(p_value::numeric + v_current::numeric);
                v_take := true;
            ELSE
                v_take := v_cur_at IS NULL OR p_at >= v_cur_at;
            END IF;
        WHEN 'source_priority' THEN
            v_rank_new := coalesce(array_position(v_policy.source_priority, p_source), 1000000);
            v_rank_cur := coalesce(array_position(v_policy.source_priority, v_meta ->> 'source'),
                                   1000000);
            v_take := v_rank_new < v_rank_cur
                OR (v_rank_new = v_rank_cur AND (v_cur_at IS NULL OR p_at >= v_cur_at));
        ELSE
            v_take := v_cur_at IS NULL OR p_at >= v_cur_at;
        END CASE;
    END IF;

    IF NOT v_take OR v_new IS NOT DISTINCT FROM v_current THEN
        RETURN false;
    END IF;
    UPDATE segflow.profiles
    SET traits = segflow.jsonb_set_deep(traits, p_path, v_new),
        trait_meta = trait_meta || jsonb_build_object(
            v_key, jsonb_build_object('at', p_at, 'source', p_source)),
        updated_at = segflow.now()
    WHERE profile_id = p_profile_id;
    RETURN true;
END
$$;

-- One lock over the whole book. Every writer of events, traits or identities holds it shared,
-- first, before its identifier and profile locks; a backfill (segflow apply) holds it
-- exclusively until it commits, so nothing slips between its evaluation and its commit. One
-- lock rather than one per profile: a book of millions needs more than the lock table holds.
CREATE FUNCTION segflow.lock_book(p_exclusive boolean DEFAULT false) RETURNS void
LANGUAGE sql AS $$
    SELECT CASE WHEN p_exclusive THEN pg_advisory_xact_lock(1936025956, -1)
                ELSE pg_advisory_xact_lock_shared(1936025956, -1) END
$$;

-- Serialises work on profiles: transaction-scoped advisory locks in ascending id order
-- (keys 0 and up; -1 is the book's).
CREATE FUNCTION segflow.lock_profiles(p_profile_ids bigint[]) RETURNS void
LANGUAGE sql AS $$
    SELECT segflow.lock_book();
    SELECT max(pg_advisory_xact_lock(1936025956, (id % 2147483647)::integer)::text)::void
    FROM (SELECT DISTINCT id FROM unnest(p_profile_ids) id ORDER BY id) s
$$;

-- Merges p_absorbed into p_survivor: identities, events, traits, then the engine.
CREATE FUNCTION segflow.merge_profiles(p_survivor bigint, p_absorbed bigint) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_leaf record;
    v_meta jsonb;
    v_internal text := current_setting('segflow.internal', true);
BEGIN
    IF p_survivor = p_absorbed THEN
        RETURN;
    END IF;
    -- The events table before the book's lock, in the order of an INSERT (which opens the
    -- table first) and of apply (SHARE on it, then the book exclusively): a merge called on
    -- its own must not hold the book while waiting for the table.
    LOCK TABLE ONLY segflow.events IN ROW EXCLUSIVE MODE;
    PERFORM segflow.lock_profiles(ARRAY[p_survivor, p_absorbed]);
    PERFORM segflow._before_events(ARRAY[p_survivor, p_absorbed], segflow.now());
    PERFORM set_config('segflow.internal', 'on', true);

    UPDATE segflow.identities SET profile_id = p_survivor WHERE profile_id = p_absorbed;
    UPDATE segflow.events_stored SET profile_id = p_survivor WHERE profile_id = p_absorbed;

    SELECT trait_meta INTO v_meta FROM segflow.profiles WHERE profile_id = p_absorbed;
    FOR v_leaf IN
        SELECT l.path, l.value
        FROM segflow.profiles p, segflow.jsonb_leaves(p.traits) l
        WHERE p.profile_id = p_absorbed
    LOOP
        PERFORM segflow.apply_trait(
            p_survivor, v_leaf.path, v_leaf.value,
            coalesce((v_meta -> array_to_string(v_leaf.path, '.') ->> 'at')::timestamptz,
                     '-infinity'::timestamptz),
            v_meta -> array_to_string(v_leaf.path, '.') ->> 'source');
    END LOOP;

    UPDATE segflow.profiles SET merged_into = p_survivor, updated_at = segflow.now()
    WHERE profile_id = p_absorbed OR merged_into = p_absorbed;
    INSERT INTO segflow.profile_merges (survivor_id, absorbed_id, merged_at, identifiers)
    SELECT p_survivor, p_absorbed, segflow.now(),
           (SELECT jsonb_agg(jsonb_build_array(kind, value))
            FROM segflow.identities WHERE profile_id = p_survivor);

    PERFORM set_config('segflow.internal', coalesce(v_internal, ''), true);
    PERFORM segflow._after_merge(p_survivor, p_absorbed, segflow.now());
END
$$;

-- Resolves one set of identifiers to a profile: creates, attaches, merges (CONTRACT §3).
CREATE FUNCTION segflow.resolve_identifiers(p_identifiers jsonb) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_kinds text[];
    v_values text[];
    v_owners bigint[];
    v_profiles bigint[];
    v_target bigint;
    v_other bigint;
    v_mergeable boolean;
BEGIN
    PERFORM segflow.lock_book();
    -- Concurrent transactions with an identifier in common resolve one after the other.
    PERFORM count(pg_advisory_xact_lock(h))
    FROM (SELECT DISTINCT hashtextextended(k.key || chr(31) || k.value, 1936025956) h
          FROM jsonb_each_text(p_identifiers) k ORDER BY 1) s;

    -- Each identifier with the profile holding it, one primary-key probe each (LIMIT keeps
    -- the planner from turning the few probes into a join over the whole table). Merges
    -- below move identities between profiles but never add or remove one, and the locks
    -- above keep others from adding these, so the holders found here stay valid.
    SELECT array_agg(k.key ORDER BY k.key), array_agg(k.value ORDER BY k.key),
           array_agg(o.profile_id ORDER BY k.key)
    INTO v_kinds, v_values, v_owners
    FROM jsonb_each_text(p_identifiers) k
    LEFT JOIN LATERAL (SELECT i.profile_id FROM segflow.identities i
                       WHERE i.kind = k.key AND i.value = k.value LIMIT 1) o ON true;

    SELECT array_agg(DISTINCT u.owner ORDER BY u.owner) INTO v_profiles
    FROM unnest(v_owners) u(owner) WHERE u.owner IS NOT NULL;

    IF v_profiles IS NULL THEN
        INSERT INTO segflow.profiles DEFAULT VALUES RETURNING profile_id INTO v_target;
    ELSIF cardinality(v_profiles) = 1 THEN
        v_target := v_profiles[1];
    ELSE
        -- Merging must not give one profile more values of a kind than the kind allows.
        SELECT NOT EXISTS (
            SELECT 1
            FROM (SELECT i.kind, i.value FROM segflow.identities i
                  WHERE i.profile_id = ANY (v_profiles)
                  UNION
                  SELECT u.kind, u.value FROM unnest(v_kinds, v_values) u(kind, value)) a
            JOIN segflow.identity_kinds ik ON ik.kind = a.kind
            WHERE ik.max_per_profile IS NOT NULL
            GROUP BY a.kind, ik.max_per_profile
            HAVING count(*) > ik.max_per_profile)
        INTO v_mergeable;
        IF v_mergeable THEN
            SELECT profile_id INTO v_target FROM segflow.profiles
            WHERE profile_id = ANY (v_profiles) ORDER BY created_at, profile_id LIMIT 1;
            FOREACH v_other IN ARRAY v_profiles LOOP
                PERFORM segflow.merge_profiles(v_target, v_other);
            END LOOP;
        ELSE
            SELECT u.owner INTO v_target
            FROM unnest(v_kinds, v_owners) u(kind, owner)
            LEFT JOIN segflow.identity_kinds ik ON ik.kind = u.kind
            WHERE u.owner IS NOT NULL
            ORDER BY coalesce(ik.priority, 1000000), u.kind
            LIMIT 1;
        END IF;
    END IF;

    -- Attach the identifiers nobody holds yet, within the kind's per-profile limit.
    INSERT INTO segflow.identities (kind, value, profile_id)
    SELECT u.kind, u.value, v_target
    FROM unnest(v_kinds, v_values, v_owners) u(kind, value, owner)
    LEFT JOIN segflow.identity_kinds ik ON ik.kind = u.kind
    WHERE u.owner IS NULL
      AND (ik.max_per_profile IS NULL
           OR (SELECT count(*) FROM segflow.identities i
               WHERE i.profile_id = v_target AND i.kind = u.kind) < ik.max_per_profile)
    ON CONFLICT DO NOTHING;
    RETURN v_target;
END
$$;

-- Profiles for a batch of events, position by position: a set-based fast path for events
-- whose identifiers all point at one known profile, resolve_identifiers for the rest.
-- Every identity and profile is read with one primary-key probe per distinct key: the
-- LATERAL … LIMIT 1 subqueries keep the planner from hash-joining the batch against a
-- scan of the whole table (it estimates 100 rows per jsonb_each_text).
CREATE FUNCTION segflow.resolve_batch(p_identifiers jsonb[], p_profile_ids bigint[])
RETURNS bigint[]
LANGUAGE plpgsql AS $$
DECLARE
    v_result bigint[];
    v_unknown bigint;
    v_set jsonb;
    v_sets jsonb[] := '{}';
    v_set_profiles bigint[] := '{}';
    v_merges_before bigint;
    v_kinds text[];
    v_values text[];
    v_fast bigint[];
    v_need bigint[];
    v_locked bigint[] := '{}';
BEGIN
    SELECT u.pid INTO v_unknown
    FROM unnest(p_profile_ids) u(pid)
    LEFT JOIN LATERAL (SELECT p.profile_id FROM segflow.profiles p
                       WHERE p.profile_id = u.pid LIMIT 1) p ON true
    WHERE u.pid IS NOT NULL AND p.profile_id IS NULL
    LIMIT 1;
    IF v_unknown IS NOT NULL THEN
        RAISE EXCEPTION 'segflow.events: profile_id: unknown profile %', v_unknown
            USING ERRCODE = 'foreign_key_violation', COLUMN = 'profile_id';
    END IF;

    -- One pass over the batch, grouped by position.
    SELECT array_agg(r.profile_id ORDER BY r.ord) INTO v_result
    FROM (
        SELECT x.ord,
               CASE WHEN x.pid IS NOT NULL THEN
                        (SELECT coalesce(p.merged_into, p.profile_id)
                         FROM segflow.profiles p WHERE p.profile_id = x.pid)
                    WHEN count(k.key) > 0 AND count(k.key) = count(i.profile_id)
                         AND min(i.profile_id) = max(i.profile_id)
                    THEN min(i.profile_id) END AS profile_id
        FROM unnest(p_identifiers, p_profile_ids) WITH ORDINALITY x(idents, pid, ord)
        LEFT JOIN LATERAL jsonb_each_text(x.idents) k ON x.pid IS NULL
        LEFT JOIN LATERAL (SELECT i.profile_id FROM segflow.identities i
                           WHERE i.kind = k.key AND i.value = k.value LIMIT 1) i ON true
        GROUP BY x.ord, x.pid
    ) r;

    -- The slow path's identifiers, each once, and the fast path's profiles.
    SELECT array_agg(d.key ORDER BY d.key, d.value), array_agg(d.value ORDER BY d.key, d.value)
    INTO v_kinds, v_values
    FROM (SELECT DISTINCT k.key, k.value
          FROM unnest(p_identifiers, v_result) u(idents, pid)
          CROSS JOIN jsonb_each_text(u.idents) k
          WHERE u.pid IS NULL) d;
    SELECT array_agg(DISTINCT u.pid ORDER BY u.pid) INTO v_fast
    FROM unnest(v_result) u(pid) WHERE u.pid IS NOT NULL;

    -- Locks in one ascending round each, the book's, identifiers', then profiles', as every
    -- statement takes them: set by set, two statements could each hold what the other waits for.
    PERFORM segflow.lock_book();
    PERFORM count(pg_advisory_xact_lock(h))
    FROM (SELECT DISTINCT hashtextextended(k.kind || chr(31) || k.value, 1936025956) h
          FROM unnest(v_kinds, v_values) k(kind, value) ORDER BY 1) s;
    -- Then every profile the batch may touch: the fast path's and the current owners of the
    -- slow path's identifiers. Without these locks a concurrent merge could absorb a profile
    -- chosen here and leave events on it. A merge that committed while we waited may have
    -- moved them to a profile not locked yet: lock that too, until nothing new appears. That
    -- second round can deadlock; the subtransaction then releases its profile locks and we
    -- start over, so the other statement goes on.
    <<locking>>
    LOOP
        BEGIN
            v_locked := '{}';
            LOOP
                SELECT array_agg(DISTINCT s.p ORDER BY s.p) INTO v_need
                FROM (SELECT o.p
                      FROM unnest(v_fast) u(pid)
                      CROSS JOIN LATERAL (SELECT coalesce(p.merged_into, p.profile_id) AS p
                                          FROM segflow.profiles p
                                          WHERE p.profile_id = u.pid LIMIT 1) o
                      UNION ALL
                      SELECT o.profile_id
                      FROM unnest(v_kinds, v_values) k(kind, value)
                      CROSS JOIN LATERAL (SELECT i.profile_id FROM segflow.identities i
                                          WHERE i.kind = k.kind AND i.value = k.value
                                          LIMIT 1) o) s
                WHERE s.p <> ALL (v_locked);
                EXIT locking WHEN v_need IS NULL;
                PERFORM segflow.lock_profiles(v_need);
                v_locked := v_locked || v_need;
            END LOOP;
        EXCEPTION WHEN deadlock_detected THEN
            NULL;
        END;
    END LOOP;
    SELECT array_agg(coalesce(p.merged_into, u.pid) ORDER BY u.ord) INTO v_result
    FROM unnest(v_result) WITH ORDINALITY u(pid, ord)
    LEFT JOIN LATERAL (SELECT p.merged_into FROM segflow.profiles p
                       WHERE p.profile_id = u.pid LIMIT 1) p ON true;

    SELECT max(merge_id) INTO v_merges_before FROM segflow.profile_merges;

    -- The slow path, once per distinct identifier set, in order of first appearance.
    FOR v_set IN
        SELECT u.idents
        FROM unnest(p_identifiers, v_result) WITH ORDINALITY u(idents, pid, ord)
        WHERE u.pid IS NULL
        GROUP BY u.idents ORDER BY min(u.ord)
    LOOP
        v_sets := v_sets || v_set;
        v_set_profiles := v_set_profiles || segflow.resolve_identifiers(v_set);
    END LOOP;

    IF cardinality(v_sets) > 0 THEN
        SELECT array_agg(coalesce(u.pid, s.pid) ORDER BY u.ord) INTO v_result
        FROM unnest(p_identifiers, v_result) WITH ORDINALITY u(idents, pid, ord)
        LEFT JOIN unnest(v_sets, v_set_profiles) s(idents, pid)
               ON u.pid IS NULL AND s.idents = u.idents;
    END IF;

    -- A merge in the slow path may have absorbed a profile chosen earlier in this batch.
    IF (SELECT max(merge_id) FROM segflow.profile_merges) IS DISTINCT FROM v_merges_before THEN
        SELECT array_agg(coalesce(p.merged_into, u.pid) ORDER BY u.ord) INTO v_result
        FROM unnest(v_result) WITH ORDINALITY u(pid, ord)
        LEFT JOIN LATERAL (SELECT p.merged_into FROM segflow.profiles p
                           WHERE p.profile_id = u.pid LIMIT 1) p ON true;
    END IF;
    RETURN v_result;
END
$$;

-- The statement trigger behind every INSERT and COPY into segflow.events.
CREATE FUNCTION segflow._events_after_insert() RETURNS trigger
LANGUAGE plpgsql
-- Compiled segment queries are costed high: JIT would spend seconds compiling each.
SET jit = off AS $$
DECLARE
    v_now timestamptz := segflow.now();
    v_latest_allowed timestamptz := v_now + segflow.config_value('future_tolerance')::interval;
    v_problem text;
    v_problem_id bigint;
    v_ids bigint[];
    v_types text[];
    v_times timestamptz[];
    v_idents jsonb[];
    v_pids bigint[];
    v_amounts numeric[];
    v_currencies text[];
    v_usd numeric[];
    v_props jsonb[];
    v_sources text[];
    v_keys text[];
    v_ingested timestamptz[];
    v_fresh bigint[];
    v_n integer;
    v_trait record;
    v_leaf record;
    v_profiles bigint[];
    v_new_profiles bigint[];
    v_event_types text[];
BEGIN
    IF EXISTS (SELECT 1 FROM new_rows WHERE stored) THEN
        IF current_setting('segflow.trusted_ingest', true) IS DISTINCT FROM 'on' THEN
            RAISE EXCEPTION 'segflow.events: stored: is set by segflow, insert without it'
                USING ERRCODE = 'invalid_parameter_value', COLUMN = 'stored';
        END IF;
        -- Rows stored directly (bulk loads) bypass the per-profile score and session rows
        -- kept by the triggers on events_stored: drop them, evaluations read the events.
        v_profiles := ARRAY(SELECT DISTINCT n.profile_id FROM new_rows n WHERE n.stored);
        DELETE FROM segflow.score_state WHERE profile_id = ANY (v_profiles);
        DELETE FROM segflow.session_state WHERE profile_id = ANY (v_profiles);
        PERFORM segflow._note_event_profiles(array_agg(f.profile_id ORDER BY f.profile_id),
                                             array_agg(f.first_at ORDER BY f.profile_id))
        FROM (SELECT n.profile_id, min(n.occurred_at) AS first_at FROM new_rows n
              WHERE n.stored GROUP BY n.profile_id) f;
        v_profiles := NULL;
    END IF;

    SELECT array_agg(n.event_id ORDER BY n.event_id),
           array_agg(n.event_type ORDER BY n.event_id),
           array_agg(n.occurred_at ORDER BY n.event_id),
           array_agg(n.identifiers ORDER BY n.event_id),
           array_agg(n.profile_id ORDER BY n.event_id),
           array_agg(n.amount ORDER BY n.event_id),
           array_agg(n.currency ORDER BY n.event_id),
           array_agg(n.amount * fx.rate ORDER BY n.event_id),
           array_agg(coalesce(n.properties, '{}'::jsonb) ORDER BY n.event_id),
           array_agg(n.source ORDER BY n.event_id),
           array_agg(n.event_key ORDER BY n.event_id),
           array_agg(n.ingested_at ORDER BY n.event_id),
           (array_agg(n.event_id ORDER BY n.event_id) FILTER (WHERE p.problem IS NOT NULL))[1],
           (array_agg(p.problem ORDER BY n.event_id) FILTER (WHERE p.problem IS NOT NULL))[1]
    INTO v_ids, v_types, v_times, v_idents, v_pids, v_amounts, v_currencies, v_usd, v_props,
         v_sources, v_keys, v_ingested, v_problem_id, v_problem
    FROM new_rows n
    -- OFFSET 0 keeps each subquery a unit computed once per row: flattened, its expression
    -- would be copied into every aggregate that reads it and run once for each.
    CROSS JOIN LATERAL (
        SELECT CASE WHEN n.amount IS NOT NULL
                    THEN segflow.usd_rate(n.currency, n.occurred_at) END AS rate
        OFFSET 0
    ) fx
    CROSS JOIN LATERAL (
        SELECT coalesce(
            segflow.event_problem(n.event_type, n.occurred_at, n.identifiers, n.profile_id,
                                  n.amount, n.currency, n.properties, v_latest_allowed),
            CASE WHEN n.amount IS NOT NULL AND fx.rate IS NULL
                 THEN segflow.fx_problem(n.currency, n.occurred_at) END) AS problem
        OFFSET 0
    ) p
    WHERE NOT n.stored;

    IF v_ids IS NULL THEN
        RETURN NULL;
    END IF;
    IF v_problem IS NOT NULL THEN
        RAISE EXCEPTION 'segflow.events: %', v_problem
            USING ERRCODE = 'invalid_parameter_value',
                  COLUMN = split_part(v_problem, ':', 1),
                  DETAIL = format('rejected event: %s',
                                  (SELECT to_jsonb(n) - 'stored' - 'ingested_at'
                                   FROM new_rows n WHERE n.event_id = v_problem_id));
    END IF;

    -- Idempotency: keep the first row of each new (source, event_key).
    IF EXISTS (SELECT 1 FROM unnest(v_keys) k WHERE k IS NOT NULL) THEN
        WITH keyed AS (
            INSERT INTO segflow.event_keys (source, event_key, event_id)
            SELECT coalesce(u.src, ''), u.k, min(u.id)
            FROM unnest(v_sources, v_keys, v_ids) u(src, k, id)
            WHERE u.k IS NOT NULL
            GROUP BY coalesce(u.src, ''), u.k
            ON CONFLICT DO NOTHING
            RETURNING event_id
        )
        SELECT array_agg(u.id ORDER BY u.id) INTO v_fresh
        FROM unnest(v_keys, v_ids) u(k, id)
        WHERE u.k IS NULL OR u.id IN (SELECT event_id FROM keyed);
    ELSE
        v_fresh := v_ids;
    END IF;

    DELETE FROM segflow.events_pending WHERE event_id = ANY (v_ids);
    IF v_fresh IS NULL THEN
        PERFORM set_config('segflow.last_stored', '0', true);
        RETURN NULL;
    END IF;
    IF cardinality(v_fresh) < cardinality(v_ids) THEN
        SELECT array_agg(u.id), array_agg(u.t), array_agg(u.at), array_agg(u.idents),
               array_agg(u.pid), array_agg(u.amount), array_agg(u.cur), array_agg(u.usd),
               array_agg(u.props), array_agg(u.src), array_agg(u.k), array_agg(u.ing)
        INTO v_ids, v_types, v_times, v_idents, v_pids, v_amounts, v_currencies, v_usd,
             v_props, v_sources, v_keys, v_ingested
        FROM unnest(v_ids, v_types, v_times, v_idents, v_pids, v_amounts, v_currencies, v_usd,
                    v_props, v_sources, v_keys, v_ingested)
             u(id, t, at, idents, pid, amount, cur, usd, props, src, k, ing)
        WHERE u.id = ANY (v_fresh);
    END IF;

    PERFORM set_config('segflow.internal', 'on', true);
    v_pids := segflow.resolve_batch(v_idents, v_pids);
    PERFORM set_config('segflow.internal', '', true);
    SELECT array_agg(DISTINCT p ORDER BY p) INTO v_profiles FROM unnest(v_pids) p;
    -- Profiles seen for the first time: every segment may hold for them, not only those
    -- these event types feed (e.g. "no deposit within 4h").
    SELECT array_agg(p ORDER BY p) INTO v_new_profiles FROM unnest(v_profiles) p
    WHERE NOT EXISTS (SELECT 1 FROM segflow.event_profiles ep WHERE ep.profile_id = p);
    -- Time-driven changes due up to now are applied before these events exist, so a late
    -- event never counts at an instant before it arrived.
    PERFORM segflow._before_events(v_profiles, v_now);

    -- Only the days that have events: a backfill of two far-apart days must not create
    -- every partition in between. Ascending, like every partition lock.
    PERFORM segflow.ensure_partitions(d.t, d.t)
    FROM (SELECT min(t) AS t FROM unnest(v_times) t
          GROUP BY (t AT TIME ZONE 'UTC')::date ORDER BY 1) d;

    INSERT INTO segflow.events_stored (event_id, event_type, occurred_at, identifiers, profile_id,
                                       amount, currency, amount_usd, properties, source,
                                       event_key, ingested_at, stored)
    SELECT u.*, true
    FROM unnest(v_ids, v_types, v_times, v_idents, v_pids, v_amounts, v_currencies, v_usd,
                v_props, v_sources, v_keys, v_ingested) u;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    PERFORM set_config('segflow.last_stored', v_n::text, true);

    -- identify and consent_updated events write traits, in the order they occurred.
    IF v_types && ARRAY['identify', 'consent_updated'] THEN
        PERFORM set_config('segflow.internal', 'on', true);
        FOR v_trait IN
            SELECT u.t, u.pid, u.at, u.props, u.src
            FROM unnest(v_types, v_pids, v_times, v_props, v_sources, v_ids)
                 u(t, pid, at, props, src, id)
            WHERE u.t IN ('identify', 'consent_updated')
            ORDER BY u.at, u.id
        LOOP
            FOR v_leaf IN
                SELECT l.path, l.value
                FROM segflow.jsonb_leaves(
                    v_trait.props,
                    CASE WHEN v_trait.t = 'consent_updated' THEN ARRAY['consent']
                         ELSE '{}'::text[] END) l
            LOOP
                PERFORM segflow.apply_trait(v_trait.pid, v_leaf.path, v_leaf.value,
                                            v_trait.at, v_trait.src);
            END LOOP;
        END LOOP;
        PERFORM set_config('segflow.internal', '', true);
    END IF;

    SELECT array_agg(DISTINCT t) INTO v_event_types FROM unnest(v_types) t;
    PERFORM segflow._after_events(v_profiles, v_event_types, v_now, v_new_profiles, v_pids,
                                  v_types);
    RETURN NULL;
END
$$;

CREATE TRIGGER events_ingest
    AFTER INSERT ON segflow.events
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION segflow._events_after_insert();

-- Per-element problems of a JSON batch, with the same rules as the insert trigger.
CREATE FUNCTION segflow.check_events(p_batch jsonb)
RETURNS TABLE (idx integer, field text, reason text)
LANGUAGE sql STABLE AS $$
    WITH rows AS (
        SELECT (a.ord - 1)::integer AS idx, x.*
        FROM jsonb_array_elements(p_batch) WITH ORDINALITY a(elem, ord)
        CROSS JOIN LATERAL jsonb_to_record(a.elem) AS x(
            event_type text, occurred_at timestamptz, identifiers jsonb, profile_id bigint,
            amount numeric, currency text, properties jsonb, source text, event_key text)
    ), problems AS (
        SELECT r.idx, coalesce(
            segflow.event_problem(r.event_type, coalesce(r.occurred_at, segflow.now()),
                                  r.identifiers, r.profile_id, r.amount, r.currency,
                                  r.properties,
                                  segflow.now()
                                  + segflow.config_value('future_tolerance')::interval),
            CASE WHEN r.amount IS NOT NULL
                      AND segflow.usd_rate(r.currency, coalesce(r.occurred_at, segflow.now()))
                          IS NULL
                 THEN segflow.fx_problem(r.currency, coalesce(r.occurred_at, segflow.now())) END,
            CASE WHEN r.profile_id IS NOT NULL
                      AND NOT EXISTS (SELECT 1 FROM segflow.profiles p
                                      WHERE p.profile_id = r.profile_id)
                 THEN format('profile_id: unknown profile %s', r.profile_id) END) AS problem
        FROM rows r
    )
    SELECT p.idx, split_part(p.problem, ': ', 1),
           substr(p.problem, length(split_part(p.problem, ': ', 1)) + 3)
    FROM problems p WHERE p.problem IS NOT NULL ORDER BY p.idx
$$;

-- Stores a JSON array of events with one INSERT statement; returns how many were stored
-- (re-sent (source, event_key) pairs are not counted).
CREATE FUNCTION segflow.ingest_json(p_batch jsonb) RETURNS integer
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('segflow.last_stored', '0', true);
    INSERT INTO segflow.events (event_type, occurred_at, identifiers, profile_id, amount,
                                currency, properties, source, event_key)
    SELECT x.event_type, coalesce(x.occurred_at, segflow.now()), x.identifiers, x.profile_id,
           x.amount, x.currency, x.properties, x.source, x.event_key
    FROM jsonb_to_recordset(p_batch) AS x(
        event_type text, occurred_at timestamptz, identifiers jsonb, profile_id bigint,
        amount numeric, currency text, properties jsonb, source text, event_key text);
    RETURN coalesce(nullif(current_setting('segflow.last_stored', true), ''), '0')::integer;
END
$$;

-- Profiles written with plain SQL (not by ingest or merges): created ones are evaluated for
-- every segment at once, updated ones whose traits changed for the trait-driven segments.
-- One function serves both triggers (a trigger with transition tables fires on one event).
CREATE FUNCTION segflow._profiles_after_write() RETURNS trigger
LANGUAGE plpgsql
-- Compiled segment queries are costed high: JIT would spend seconds compiling each.
SET jit = off AS $$
DECLARE
    v_profiles bigint[];
BEGIN
    IF current_setting('segflow.internal', true) = 'on' THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        SELECT array_agg(n.profile_id ORDER BY n.profile_id) INTO v_profiles
        FROM new_rows n WHERE n.merged_into IS NULL;
    ELSE
        SELECT array_agg(n.profile_id ORDER BY n.profile_id) INTO v_profiles
        FROM new_rows n JOIN old_rows o ON o.profile_id = n.profile_id
        WHERE n.traits IS DISTINCT FROM o.traits AND n.merged_into IS NULL;
    END IF;
    IF v_profiles IS NOT NULL THEN
        PERFORM segflow._after_traits(v_profiles, segflow.now(), TG_OP = 'INSERT');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER profiles_traits
    AFTER UPDATE ON segflow.profiles
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION segflow._profiles_after_write();

CREATE TRIGGER profiles_created
    AFTER INSERT ON segflow.profiles
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION segflow._profiles_after_write();

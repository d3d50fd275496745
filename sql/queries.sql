-- Named queries used from Python, loaded by segflow.db.query(name).

-- name: now --
SELECT segflow.now() AS now

-- name: installed_segments --
SELECT segment_id, name, version, mode, definition_hash, active
FROM segflow.segment_defs ORDER BY segment_id

-- name: installed_scores --
SELECT name, definition_hash FROM segflow.score_defs

-- name: upsert_score --
-- A changed score's accumulators are stale: evaluations sum events until the next insert
-- rebuilds them.
WITH stale AS (DELETE FROM segflow.score_state WHERE score = %(name)s)
INSERT INTO segflow.score_defs (name, half_life, weights, definition, definition_hash, updated_at)
VALUES (%(name)s, make_interval(secs => %(half_life_s)s), %(weights)s, %(definition)s, %(hash)s,
        segflow.now())
ON CONFLICT (name) DO UPDATE SET half_life = excluded.half_life, weights = excluded.weights,
    definition = excluded.definition, definition_hash = excluded.definition_hash,
    updated_at = excluded.updated_at

-- name: reserve_segment --
INSERT INTO segflow.segment_defs (name, mode, refresh, definition, definition_hash, active)
VALUES (%(name)s, %(mode)s, make_interval(secs => %(refresh_s)s), %(definition)s, '', false)
ON CONFLICT (name) DO UPDATE SET name = excluded.name
RETURNING segment_id

-- name: store_segment --
UPDATE segflow.segment_defs
SET version = CASE WHEN %(bump)s THEN version + 1 ELSE version END,
    mode = %(mode)s, refresh = make_interval(secs => %(refresh_s)s),
    description = %(description)s, definition = %(definition)s,
    definition_hash = %(hash)s, trigger_types = %(trigger_types)s,
    trait_sensitive = %(trait_sensitive)s, reads_sessions = %(reads_sessions)s,
    depends_on = %(depends_on)s, topo_order = %(topo_order)s, active = true,
    last_refresh_at = CASE WHEN %(mode)s = 'scheduled' THEN segflow.now() END,
    updated_at = segflow.now()
WHERE segment_id = %(segment_id)s

-- name: store_segment_order --
UPDATE segflow.segment_defs
SET trigger_types = %(trigger_types)s, trait_sensitive = %(trait_sensitive)s,
    reads_sessions = %(reads_sessions)s, depends_on = %(depends_on)s,
    topo_order = %(topo_order)s
WHERE segment_id = %(segment_id)s

-- name: deactivate_segment --
UPDATE segflow.segment_defs SET active = false, updated_at = segflow.now()
WHERE segment_id = %(segment_id)s

-- name: live_profile_count --
SELECT count(*) AS n FROM segflow.profiles WHERE merged_into IS NULL

-- name: evaluate_batch --
SELECT segflow.evaluate_batch(%(segment_id)s, %(after)s, %(limit)s, %(at)s, %(reason)s) AS last

-- name: exit_all --
SELECT segflow.exit_all(%(segment_id)s, %(at)s, %(reason)s) AS n

-- name: tick --
SELECT segflow.tick(%(at)s) AS n

-- name: tick_now --
SELECT segflow.tick() AS n

-- name: preview_members --
-- Evaluates the segment compiled as s0 (inside a rolled-back transaction) over the whole
-- book in one set-based pass; its members.
SELECT e.profile_id, e.context
FROM segflow_compiled.s0_book(
    ARRAY(SELECT profile_id FROM segflow.profiles WHERE merged_into IS NULL ORDER BY profile_id),
    segflow.now()) e
WHERE e.member
ORDER BY e.profile_id

-- name: upsert_destination --
INSERT INTO segflow.destinations (name, url, channel, secret_env, secret_file, timeout,
                                  max_attempts, cap_max, cap_per, dedup_window, active,
                                  definition, updated_at)
VALUES (%(name)s, %(url)s, %(channel)s, %(secret_env)s, %(secret_file)s,
        make_interval(secs => %(timeout_s)s), %(max_attempts)s, %(cap_max)s,
        make_interval(secs => %(cap_per_s)s), make_interval(secs => %(dedup_window_s)s), true,
        %(definition)s, segflow.now())
ON CONFLICT (name) DO UPDATE SET url = excluded.url, channel = excluded.channel,
    secret_env = excluded.secret_env, secret_file = excluded.secret_file,
    timeout = excluded.timeout, max_attempts = excluded.max_attempts,
    cap_max = excluded.cap_max, cap_per = excluded.cap_per,
    dedup_window = excluded.dedup_window, active = true,
    definition = excluded.definition, updated_at = excluded.updated_at
WHERE (segflow.destinations.definition, segflow.destinations.active)
      IS DISTINCT FROM (excluded.definition, true)

-- name: deactivate_destinations --
-- Destinations missing from the applied set; their pending deliveries end as skipped.
UPDATE segflow.destinations SET active = false, updated_at = segflow.now()
WHERE active AND NOT (name = ANY (%(keep)s))

-- name: clear_actions --
DELETE FROM segflow.segment_actions WHERE segment_id = %(segment_id)s

-- name: clear_message_actions --
-- A removed segment's actions except those of ads audiences, which must still lose the
-- segment's members.
DELETE FROM segflow.segment_actions a WHERE a.segment_id = %(segment_id)s
  AND NOT EXISTS (SELECT FROM segflow.destinations d
                  WHERE d.name = a.destination AND d.active AND d.channel = 'ads')

-- name: insert_action --
INSERT INTO segflow.segment_actions
    (segment_id, position, on_kind, destination, priority, payload, include_backfill)
VALUES (%(segment_id)s, %(position)s, %(on)s, %(destination)s, %(priority)s, %(payload)s,
        %(include_backfill)s)

"""Coalesce decisions and late arrivals rebuilt from a Landscape, set-based in DuckDB SQL.

Inputs are the raw Landscape tables registered as ``l_<table>``. ELSPETH records a merge as identical
``context_after_json`` copies on every consumed branch token's coalesce state (deduplicated here to
one decision per join_group_id), a failure only as ``error_json`` on the held tokens' failed states
(policy and timeout come from the node's ``config_json``; error_json's ``merge_policy`` is really the
merge *strategy*), and a late arrival as a failed state with ``late_arrival_after_merge`` whatever the
decision was. Triggers are not recorded: they are inferred from policy, counts and failure reason.
Contexts are JSON text with sorted keys, null members left out and integral numbers without ``.0``
(RFC 8785 for our ASCII content); they are assembled by string concatenation, which DuckDB does far
faster than building JSON documents.
"""

# ruff: noqa: S608  (every SQL string here is our own constant text; data never reaches it)

from __future__ import annotations

import duckdb

from elspeth_nb.audit.hashing import error_hash
from elspeth_nb.audit.importers.elspeth._lost import reason_table

LATE_REASON = "late_arrival_after_merge"
LATE_HASH = error_hash(LATE_REASON)
#: Members are ordered by sorting structs whose leading fields are the sort keys (arrival ordinal, start,
#: state id): far cheaper than an ordered aggregate. A missing ordinal or start sorts last.
LAST_US = 9223372036854775807

MACROS = [
    "CREATE OR REPLACE TEMP MACRO ms_between(a, b) AS (epoch_us(b) - epoch_us(a)) / 1000.0",
    "CREATE OR REPLACE TEMP MACRO plus_ms(t, ms) AS t + to_microseconds(CAST(round(coalesce(ms, 0) * 1000) AS BIGINT))",
    "CREATE OR REPLACE TEMP MACRO det_id(s) AS left(sha256(s), 32)",
    "CREATE OR REPLACE TEMP MACRO jx(j, p) AS CASE WHEN json_valid(j) THEN json_extract_string(j, p) END",
    # JSON text of a number (integral values without ".0"), of any other value, of a key/value member
    "CREATE OR REPLACE TEMP MACRO jnum(x) AS CASE WHEN x IS NULL THEN NULL "
    "WHEN x = trunc(x) AND abs(x) < 1e15 THEN CAST(CAST(x AS BIGINT) AS VARCHAR) "
    "ELSE CAST(to_json(CAST(x AS DOUBLE)) AS VARCHAR) END",
    "CREATE OR REPLACE TEMP MACRO jstr(x) AS CAST(to_json(x) AS VARCHAR)",
    # ``||`` is NULL when v is: concat() then skips the whole member (and v is evaluated once)
    "CREATE OR REPLACE TEMP MACRO kv(k, v) AS (',\"' || k || '\":' || v)",
    # an object from kv() members given in sorted key order; null members are simply absent
    "CREATE OR REPLACE TEMP MACRO jobj(body) AS concat('{', ltrim(body, ','), '}')",
    "CREATE OR REPLACE TEMP MACRO jarr(items) AS concat('[', array_to_string(items, ','), ']')",
]

_MERGE_TRIGGER = """CASE policy
        WHEN 'require_all' THEN 'all_arrived' WHEN 'quorum' THEN 'quorum_met' WHEN 'first' THEN 'first_arrival'
        WHEN 'best_effort' THEN CASE
            WHEN timeout_seconds IS NOT NULL AND wait_ms >= timeout_seconds * 1000 THEN 'timeout'
            WHEN n_arrived >= n_expected THEN 'all_arrived'
            WHEN n_arrived + n_lost >= n_expected THEN 'all_accounted'
            ELSE 'end_of_source' END
        END"""

_FAIL_TRIGGER = f"""CASE
        WHEN failure_reason IN ('branch_lost', 'quorum_impossible', 'all_branches_lost') THEN 'branch_lost'
        WHEN failure_reason LIKE '%timeout%' THEN 'timeout'
        WHEN failure_reason = 'incomplete_branches' THEN CASE
            WHEN timeout_ms IS NOT NULL OR (timeout_seconds IS NOT NULL AND wait_ms >= timeout_seconds * 1000)
            THEN 'timeout' ELSE 'end_of_source' END
        WHEN failure_reason = 'quorum_not_met' THEN 'end_of_source'
        WHEN failure_reason = 'select_branch_not_arrived' THEN {_MERGE_TRIGGER}
        END"""

# what a lost branch of a failure was, from the sibling token's own terminal outcome and the node that decided
# it (``ln``, a _LAST_NODES row): a routed token also has its state at the sink, so the router is the last
# node before a sink; a failed one failed at its last node. Named as elspeth-nb's engine names them.
_LOST_KIND = """CASE WHEN fl.lost_token IS NULL THEN 'unknown'
        WHEN fl.outcome = 'routed'
            THEN CASE WHEN ln.router_type = 'gate' THEN 'gate_routed_to_sink' ELSE 'error_routed' END
        WHEN fl.outcome = 'failed' THEN CASE ln.node_type WHEN 'transform' THEN 'transform_failed'
            WHEN 'gate' THEN 'gate_failed' WHEN 'sink' THEN 'sink_write_failed' ELSE 'failed' END
        ELSE coalesce(fl.outcome, 'unknown') END"""
# the node that decided a lost branch's fate: its router if it was routed, else where it ended
_LOST_NODE = "CASE WHEN fl.outcome = 'routed' THEN ln.router ELSE ln.node_id END"


def _last_nodes(tokens: str) -> str:
    """Per token of ``tokens`` (a query of token_id): its last node and type, and its last node before a sink."""
    return f"""SELECT s.token_id, arg_max(s.node_id, s.step_index * 1000 + s.attempt) AS node_id,
        arg_max(n.node_type, s.step_index * 1000 + s.attempt) AS node_type,
        arg_max(s.node_id, s.step_index * 1000 + s.attempt) FILTER (WHERE n.node_type IS DISTINCT FROM 'sink')
            AS router,
        arg_max(n.node_type, s.step_index * 1000 + s.attempt) FILTER (WHERE n.node_type IS DISTINCT FROM 'sink')
            AS router_type
    FROM l_node_states s LEFT JOIN x_nodes n ON n.node_id = s.node_id AND n.run_id = s.run_id
    WHERE s.token_id IN ({tokens})
    GROUP BY s.token_id"""

# the members every context shares: the node's settings (sorted among the other keys by each caller)
_ARRIVAL_ORDER = """jarr(list_transform(range(1, n_arrived + 1), lambda i: concat(
            '{"arrival_offset_ms":', coalesce(jnum(arrival_offsets_ms[i]), 'null'),
            ',"branch":', coalesce(jstr(branches_arrived[i]), 'null'),
            ',"token_id":', coalesce(jstr(arrived_token_ids[i]), 'null'), '}')))"""

_CTX_SCHEMA = ('{"policy":"VARCHAR","merge_strategy":"VARCHAR","expected_branches":["VARCHAR"],'
               '"branches_arrived":["VARCHAR"],'
               '"arrival_order":[{"branch":"VARCHAR","arrival_offset_ms":"DOUBLE"}],"wait_duration_ms":"DOUBLE",'
               '"branches_lost":"JSON","union_field_collisions":"JSON"}')

STAGE_1 = [
    # coalesce nodes and their real settings (config_json), expected branches in config order when a list
    # (an unreadable config_json keeps the node, with ELSPETH's defaults, and is reported: config_policy NULL)
    """CREATE TEMP TABLE c_nodes AS
    WITH n AS (SELECT *, CASE WHEN json_valid(config_json) THEN config_json END AS cfg
               FROM x_nodes WHERE node_type = 'coalesce')
    SELECT run_id, node_id, node_name AS coalesce_name,
        coalesce(jx(cfg, '$.policy'), 'require_all') AS policy,
        coalesce(jx(cfg, '$.merge'), 'union') AS merge_strategy,
        TRY_CAST(jx(cfg, '$.quorum_count') AS INTEGER) AS quorum_count,
        TRY_CAST(jx(cfg, '$.timeout_seconds') AS DOUBLE) AS timeout_seconds,
        jx(cfg, '$.select_branch') AS select_branch,
        CASE json_type(cfg, '$.branches') WHEN 'OBJECT' THEN json_keys(cfg, '$.branches')
            WHEN 'ARRAY' THEN json_extract_string(cfg, '$.branches[*]') END AS config_branches,
        jx(cfg, '$.policy') AS config_policy, jx(cfg, '$.merge') AS config_merge
    FROM n""",
    # every state at a coalesce node, narrow: its token's row and branch, a hash of its context (a failed state
    # without error_json is a late arrival when its outcome carries the late arrival's error_hash)
    f"""CREATE TEMP TABLE c_states AS
    SELECT s.state_id, s.token_id, s.run_id, s.node_id, s.status, s.started_at, s.duration_ms,
        hash(s.context_after_json) AS ctx_hash,
        CASE WHEN s.status = 'failed' THEN s.error_json END AS error_json,
        CASE WHEN s.status = 'failed' THEN coalesce(jx(s.error_json, '$.failure_reason'),
            CASE WHEN o.error_hash = '{LATE_HASH}' THEN '{LATE_REASON}' END) END AS failure_raw,
        t.row_id, t.branch_name, t.fork_group_id
    FROM l_node_states s
    JOIN c_nodes c ON c.run_id = s.run_id AND c.node_id = s.node_id
    JOIN l_tokens t ON t.token_id = s.token_id
    LEFT JOIN l_token_outcomes o ON o.token_id = s.token_id AND o.is_terminal = 1 AND s.status = 'failed'
        AND s.error_json IS NULL""",
    # consumed token -> the merged token created from it (parent ordinal = arrival order)
    """CREATE TEMP TABLE c_children AS
    SELECT tp.parent_token_id AS token_id, tp.token_id AS merged_token_id, tp.ordinal, m.join_group_id
    FROM l_token_parents tp JOIN l_tokens m ON m.token_id = tp.token_id
    WHERE m.join_group_id IS NOT NULL AND tp.parent_token_id IN (SELECT token_id FROM c_states)""",
    # the hash of a merged row = the input hash of the merged token's first state
    """CREATE TEMP TABLE c_first_input AS
    SELECT s.token_id, arg_min(s.input_hash, s.step_index * 1000 + s.attempt) AS input_hash
    FROM l_node_states s WHERE s.token_id IN (SELECT merged_token_id FROM c_children) GROUP BY s.token_id""",
    # merge members: one row per consumed token, keyed by its join group (identical context copies)
    """CREATE TEMP TABLE c_merge_members AS
    SELECT cs.*, coalesce(o.join_group_id, ch.join_group_id) AS join_group_id, ch.merged_token_id, ch.ordinal,
        det_id(cs.run_id || ':' || cs.node_id || ':' || cs.row_id || ':merged:'
               || coalesce(o.join_group_id, ch.join_group_id, '')) AS event_id
    FROM c_states cs
    LEFT JOIN l_token_outcomes o ON o.token_id = cs.token_id AND o.outcome = 'coalesced' AND o.is_terminal = 1
    LEFT JOIN c_children ch ON ch.token_id = cs.token_id
    WHERE cs.status = 'completed'""",
    # one row per merge: ELSPETH's context parsed once, members in arrival (parent ordinal) order
    f"""CREATE TEMP TABLE c_merge_groups AS
    WITH g AS (
        SELECT event_id, any_value(run_id) AS run_id, any_value(node_id) AS node_id, any_value(row_id) AS row_id,
            any_value(join_group_id) AS join_group_id, any_value(merged_token_id) AS merged_token_id,
            min(state_id) FILTER (WHERE ctx_hash IS NOT NULL) AS ctx_state,
            count(ctx_hash) > 0 AND min(ctx_hash) IS DISTINCT FROM max(ctx_hash) AS ctx_differs,
            min(started_at) AS first_arrival_at, max(plus_ms(started_at, duration_ms)) AS last_done_at,
            list_sort(list({{'o': coalesce(ordinal, 2147483647), 'k': coalesce(epoch_us(started_at), {LAST_US}),
                             's': state_id, 't': token_id, 'b': coalesce(branch_name, ''), 'u': epoch_us(started_at)}}))
                AS members,
            any_value(fork_group_id) AS fork_group_id
        FROM c_merge_members GROUP BY event_id)
    SELECT g.* EXCLUDE (members),
        CASE WHEN json_valid(s.context_after_json) THEN json_transform(s.context_after_json, '{_CTX_SCHEMA}') END AS c,
        list_transform(members, lambda m: m.t) AS member_tokens,
        list_transform(members, lambda m: m.b) AS member_branches,
        list_transform(members, lambda m: (m.u - epoch_us(first_arrival_at)) / 1000.0) AS member_offsets
    FROM g LEFT JOIN l_node_states s ON s.state_id = g.ctx_state""",
    """CREATE TEMP TABLE c_merges AS
    WITH g AS (
        SELECT g.* EXCLUDE (c), n.* EXCLUDE (run_id, node_id, policy, merge_strategy), g.c IS NOT NULL AS has_ctx,
            coalesce(n.config_policy, g.c.policy, n.policy) AS policy,  -- the merge's own record if config says nothing
            coalesce(n.config_merge, g.c.merge_strategy, n.merge_strategy) AS merge_strategy,
            list_transform(g.c.arrival_order, lambda a: a.branch) AS ctx_arrived,
            list_transform(g.c.arrival_order, lambda a: a.arrival_offset_ms) AS ctx_offsets,
            coalesce(nullif(g.c.expected_branches, []), n.config_branches) AS expected_branches,
            g.c.wait_duration_ms AS ctx_wait,
            CASE WHEN json_type(g.c.branches_lost) = 'OBJECT' THEN g.c.branches_lost END AS lost_obj,
            CASE WHEN json_type(g.c.union_field_collisions) = 'OBJECT' THEN g.c.union_field_collisions END
                AS collisions_json
        FROM c_merge_groups g JOIN c_nodes n ON n.run_id = g.run_id AND n.node_id = g.node_id),
    h AS (
        SELECT *,
            coalesce(nullif(ctx_arrived, []), member_branches) AS branches_arrived,
            CASE WHEN len(ctx_offsets) = len(member_tokens) THEN ctx_offsets ELSE member_offsets END
                AS arrival_offsets_ms,
            coalesce(ctx_wait, ms_between(first_arrival_at, last_done_at)) AS wait_ms,
            coalesce(json_keys(lost_obj), []) AS branches_lost
        FROM g)
    SELECT h.*,
        CASE WHEN list_has_all(member_branches, branches_arrived) AND len(member_tokens) = len(branches_arrived)
            THEN list_transform(branches_arrived, lambda b: member_tokens[list_position(member_branches, b)])
            ELSE member_tokens END AS arrived_token_ids,
        len(expected_branches) AS n_expected, len(branches_arrived) AS n_arrived, len(branches_lost) AS n_lost,
        plus_ms(first_arrival_at, wait_ms) AS decided_at, f.input_hash AS merged_row_hash
    FROM h LEFT JOIN c_first_input f ON f.token_id = h.merged_token_id""",
    # lost branches recorded by ELSPETH in the merge context: raw strings, parsed later
    """CREATE TEMP TABLE c_merge_lost AS
    SELECT m.event_id, m.run_id, m.row_id, m.fork_group_id, b.branch,
        CASE WHEN json_type(m.lost_obj, '$."' || b.branch || '"') = 'VARCHAR'
            THEN json_extract_string(m.lost_obj, '$."' || b.branch || '"')
            ELSE CAST(json_extract(m.lost_obj, '$."' || b.branch || '"') AS VARCHAR) END AS raw
    FROM c_merges m, unnest(m.branches_lost) AS b(branch)""",
    # failure decisions: failed (non-late) states grouped per identical error_json of one row's join
    f"""CREATE TEMP TABLE c_fail_members AS
    SELECT cs.*, coalesce(cs.failure_raw, 'unknown') AS failure_key
    FROM c_states cs WHERE cs.status = 'failed' AND cs.failure_raw IS DISTINCT FROM '{LATE_REASON}'""",
    f"""CREATE TEMP TABLE c_fail_groups AS
    WITH g AS (
        SELECT run_id, node_id, row_id, error_json, any_value(failure_key) AS failure_raw,
            min(started_at) AS first_arrival_at, max(plus_ms(started_at, duration_ms)) AS decided_at,
            list_sort(list({{'k': coalesce(epoch_us(started_at), {LAST_US}), 's': state_id, 't': token_id,
                             'b': coalesce(branch_name, ''), 'u': epoch_us(started_at)}})) AS members,
            any_value(fork_group_id) AS fork_group_id, min(token_id) AS first_token
        FROM c_fail_members GROUP BY run_id, node_id, row_id, error_json)
    SELECT g.* EXCLUDE (members),
        list_transform(members, lambda m: m.t) AS member_tokens,
        list_transform(members, lambda m: m.b) AS member_branches,
        list_transform(members, lambda m: (m.u - epoch_us(first_arrival_at)) / 1000.0) AS member_offsets
    FROM g""",
    """CREATE TEMP TABLE c_fails AS
    WITH g AS (
        SELECT g.*, c.* EXCLUDE (run_id, node_id),
            det_id(g.run_id || ':' || g.node_id || ':' || g.row_id || ':failed:' || g.first_token) AS event_id,
            CASE WHEN failure_raw LIKE 'branch_lost:%' THEN 'branch_lost'
                WHEN failure_raw LIKE 'quorum_impossible:%' THEN 'quorum_impossible'
                ELSE failure_raw END AS failure_reason,
            CASE WHEN failure_raw LIKE 'branch_lost:%'
                THEN string_split(substr(failure_raw, 13), ',') END AS named_lost,
            TRY_CAST(jx(error_json, '$.timeout_ms') AS DOUBLE) AS timeout_ms,
            jx(error_json, '$.branches_arrived[*]') AS ej_arrived,
            jx(error_json, '$.expected_branches[*]') AS ej_expected,
            ms_between(first_arrival_at, decided_at) AS wait_ms
        FROM c_fail_groups g JOIN c_nodes c ON c.run_id = g.run_id AND c.node_id = g.node_id),
    h AS (
        SELECT *,
            coalesce(nullif(ej_expected, []), config_branches) AS expected_branches,
            CASE WHEN len(ej_arrived) = len(member_tokens) THEN ej_arrived ELSE member_branches END AS branches_arrived,
            member_offsets AS arrival_offsets_ms
        FROM g)
    SELECT *,
        CASE WHEN list_has_all(member_branches, branches_arrived)
            THEN list_transform(branches_arrived, lambda b: member_tokens[list_position(member_branches, b)])
            ELSE member_tokens END AS arrived_token_ids,
        len(expected_branches) AS n_expected, len(branches_arrived) AS n_arrived
    FROM h""",
    # a lost branch of a failure, inferred from the sibling token that ended elsewhere
    """CREATE TEMP TABLE c_fail_lost AS
    SELECT f.event_id, b.branch, t.token_id AS lost_token, o.outcome, o.sink_name
    FROM c_fails f, unnest(f.expected_branches) AS b(branch)
    JOIN l_tokens t ON t.row_id = f.row_id AND t.branch_name = b.branch
        AND t.fork_group_id IS NOT DISTINCT FROM f.fork_group_id
    LEFT JOIN l_token_outcomes o ON o.token_id = t.token_id AND o.is_terminal = 1
    WHERE NOT list_contains(f.branches_arrived, b.branch)
        AND t.token_id NOT IN (SELECT token_id FROM c_states WHERE node_id = f.node_id)
        AND (list_contains(f.named_lost, b.branch)
             OR (f.named_lost IS NULL AND f.failure_reason IN ('quorum_impossible', 'all_branches_lost'))
             OR (f.named_lost IS NULL AND o.recorded_at <= f.decided_at))""",
    f"""CREATE TEMP TABLE c_late AS
    SELECT cs.* FROM c_states cs WHERE cs.status = 'failed' AND cs.failure_raw = '{LATE_REASON}'""",
]

STAGE_2 = [
    # lost-branch objects: parsed reason + lineage (the token that ended elsewhere, the node where it ended)
    "CREATE TEMP TABLE c_last_node AS " + _last_nodes(
        "SELECT token_id FROM l_tokens WHERE row_id IN (SELECT row_id FROM c_merge_lost UNION "
        "SELECT row_id FROM c_fails)"),
    """CREATE TEMP TABLE c_fail_lost_all AS
    SELECT f.event_id, b.branch FROM c_fails f, unnest(f.named_lost) AS b(branch)
    UNION SELECT event_id, branch FROM c_fail_lost""",
    """CREATE TEMP TABLE c_lost AS
    SELECT l.event_id, l.branch, coalesce(r.reason, 'unknown') AS reason,
        jobj(concat(kv('detail', r.detail_json), kv('node', jstr(ln.node_id)), kv('raw', jstr(l.raw)),
                    kv('reason', jstr(coalesce(r.reason, 'unknown'))), kv('sink', jstr(r.sink)),
                    kv('token_id', jstr(t.token_id)))) AS obj
    FROM c_merge_lost l
    LEFT JOIN c_lost_reasons r ON r.raw IS NOT DISTINCT FROM l.raw
    LEFT JOIN l_tokens t ON t.row_id = l.row_id AND t.branch_name = l.branch
        AND t.fork_group_id IS NOT DISTINCT FROM l.fork_group_id
    LEFT JOIN c_last_node ln ON ln.token_id = t.token_id""",
    f"""INSERT INTO c_lost
    WITH k AS (
        SELECT a.event_id, a.branch, fl.lost_token, fl.sink_name, {_LOST_NODE} AS node_id, {_LOST_KIND} AS reason
        FROM c_fail_lost_all a JOIN c_fails f USING (event_id)
        LEFT JOIN c_fail_lost fl USING (event_id, branch)
        LEFT JOIN c_last_node ln ON ln.token_id = fl.lost_token)
    SELECT event_id, branch, reason,
        jobj(concat(kv('detail', jstr(sink_name)), kv('inferred', 'true'), kv('node', jstr(node_id)),
                    kv('reason', jstr(reason)),
                    kv('sink', jstr(CASE WHEN reason IN ('gate_routed_to_sink', 'error_routed') THEN sink_name END)),
                    kv('token_id', jstr(lost_token))))
    FROM k""",
    """CREATE TEMP TABLE c_lost_by_event AS
    SELECT event_id, list(branch ORDER BY branch) AS branches_lost, list(reason ORDER BY branch) AS lost_reasons,
        jobj(string_agg(concat(',', jstr(branch), ':', obj), '' ORDER BY branch)) AS lost_json
    FROM c_lost GROUP BY event_id""",
]

STAGE_3 = [
    f"""CREATE TEMP TABLE c_merge_events AS
    WITH m AS (SELECT m.*, {_MERGE_TRIGGER} AS trigger FROM c_merges m)
    SELECT m.*, coalesce(l.lost_reasons, []) AS lost_reasons,
        jobj(concat(
            kv('arrival_order', {_ARRIVAL_ORDER}),
            kv('branches_arrived', jstr(branches_arrived)), kv('branches_lost', coalesce(l.lost_json, '{{}}')),
            kv('coalesce', jstr(coalesce_name)), kv('event_id', jstr(event_id)),
            kv('expected_branches', jstr(expected_branches)), kv('join_group_id', jstr(join_group_id)),
            kv('merge_strategy', jstr(merge_strategy)), kv('merged_row_hash', jstr(merged_row_hash)),
            kv('merged_token_id', jstr(merged_token_id)), kv('outcome', '"merged"'), kv('policy', jstr(policy)),
            kv('quorum_count', jnum(quorum_count)), kv('select_branch', jstr(select_branch)),
            kv('source', '"elspeth"'), kv('timeout_seconds', jnum(timeout_seconds)), kv('trigger', jstr(trigger)),
            kv('trigger_inferred', 'true'),
            kv('union_field_collisions', CASE WHEN collisions_json IS NOT NULL THEN jobj(array_to_string(
                list_transform(list_sort(json_keys(collisions_json)), lambda f: concat(',', jstr(f), ':{{"branches":',
                    CAST(json_extract(collisions_json, '$."' || f || '"') AS VARCHAR), ',"winner":',
                    jstr(json_extract_string(collisions_json, '$."' || f || '"[-1]')), '}}')), '')) END),
            kv('wait_duration_ms', jnum(wait_ms)))) AS context_json
    FROM m LEFT JOIN c_lost_by_event l USING (event_id)""",
    f"""CREATE TEMP TABLE c_fail_events AS
    WITH f0 AS (
        SELECT f.*, coalesce(l.branches_lost, []) AS branches_lost, coalesce(l.lost_reasons, []) AS lost_reasons,
            len(coalesce(l.branches_lost, [])) AS n_lost, l.lost_json
        FROM c_fails f LEFT JOIN c_lost_by_event l USING (event_id)),
    f AS (SELECT *, {_FAIL_TRIGGER} AS trigger FROM f0)
    SELECT f.*,
        jobj(concat(
            kv('arrival_order', {_ARRIVAL_ORDER}),
            kv('branches_arrived', jstr(branches_arrived)), kv('branches_lost', coalesce(lost_json, '{{}}')),
            kv('coalesce', jstr(coalesce_name)), kv('elspeth_failure_reason', jstr(failure_raw)),
            kv('event_id', jstr(event_id)), kv('expected_branches', jstr(expected_branches)),
            kv('failure_reason', jstr(failure_reason)), kv('merge_strategy', jstr(merge_strategy)),
            kv('outcome', '"failed"'), kv('policy', jstr(policy)), kv('quorum_count', jnum(quorum_count)),
            kv('select_branch', jstr(select_branch)), kv('source', '"elspeth"'), kv('timeout_ms', jnum(timeout_ms)),
            kv('timeout_seconds', jnum(timeout_seconds)), kv('trigger', jstr(trigger)),
            kv('trigger_inferred', 'true'), kv('wait_duration_ms', jnum(wait_ms)))) AS context_json
    FROM f""",
    """CREATE TEMP TABLE c_decisions AS
    SELECT event_id, run_id, node_id, row_id, decided_at, first_arrival_at, true AS merged, trigger,
        NULL::VARCHAR AS failure_reason, join_group_id, merged_token_id FROM c_merge_events
    UNION ALL
    SELECT event_id, run_id, node_id, row_id, decided_at, first_arrival_at, false, trigger, failure_reason,
        NULL, NULL FROM c_fail_events""",
    # late arrivals and the decision each came after (the latest taken before it started, else the first)
    f"""CREATE TEMP TABLE c_late_events AS
    WITH matched AS (
        SELECT l.state_id, coalesce(max_by(d.event_id, d.decided_at) FILTER (WHERE d.decided_at <= l.started_at),
                                    min_by(d.event_id, d.decided_at)) AS event_id
        FROM c_late l JOIN c_decisions d ON l.run_id = d.run_id AND l.node_id = d.node_id AND l.row_id = d.row_id
        GROUP BY l.state_id),
    l AS (
        SELECT l.*, a.event_id AS decision_event_id,
            det_id(l.run_id || ':' || l.node_id || ':' || l.row_id || ':late_arrival:' || l.token_id) AS event_id
        FROM c_late l LEFT JOIN matched a USING (state_id))
    , m AS (
        SELECT l.*, c.* EXCLUDE (run_id, node_id), d.event_id AS d_event_id, d.decided_at,
            d.first_arrival_at AS decision_first_at, d.merged, d.trigger AS decision_trigger, d.failure_reason,
            d.join_group_id, d.merged_token_id, ms_between(d.decided_at, l.started_at) AS late_by_ms
        FROM l JOIN c_nodes c ON c.run_id = l.run_id AND c.node_id = l.node_id
        LEFT JOIN c_decisions d ON d.event_id = l.decision_event_id)
    SELECT m.*,
        jobj(concat(
            kv('branch', jstr(branch_name)), kv('coalesce', jstr(coalesce_name)),
            kv('decision', CASE WHEN d_event_id IS NOT NULL THEN jobj(concat(
                kv('event_id', jstr(d_event_id)), kv('failure_reason', jstr(failure_reason)),
                kv('join_group_id', jstr(join_group_id)), kv('merged', CASE WHEN merged THEN 'true' ELSE 'false' END),
                kv('merged_token_id', jstr(merged_token_id)), kv('trigger', jstr(decision_trigger)),
                kv('trigger_inferred', 'true'))) END),
            kv('elspeth_failure_reason', '"{LATE_REASON}"'), kv('elspeth_outcome', '"failed"'),
            kv('event_id', jstr(event_id)), kv('late_by_ms', jnum(late_by_ms)),
            kv('merge_strategy', jstr(merge_strategy)), kv('outcome', '"late_arrival"'), kv('policy', jstr(policy)),
            kv('quorum_count', jnum(quorum_count)), kv('select_branch', jstr(select_branch)),
            kv('source', '"elspeth"'), kv('timeout_seconds', jnum(timeout_seconds)),
            kv('token_id', jstr(token_id)), kv('trigger', '"late_arrival"'))) AS context_json
    FROM m""",
    # which event's context each coalesce state and token gets (narrow: contexts are joined in Arrow)
    """CREATE TEMP TABLE c_state_map AS
    SELECT state_id, token_id, event_id, 'merged' AS kind, NULL::VARCHAR AS new_outcome, NULL::VARCHAR AS join_group_id
    FROM c_merge_members
    UNION ALL
    SELECT fm.state_id, fm.token_id, e.event_id, 'failed', NULL, NULL
    FROM c_fail_members fm JOIN c_fail_events e
        ON e.run_id = fm.run_id AND e.node_id = fm.node_id AND e.row_id = fm.row_id AND e.error_json = fm.error_json
    UNION ALL
    SELECT state_id, token_id, event_id, 'late_arrival', 'late_arrival', CASE WHEN merged THEN join_group_id END
    FROM c_late_events""",
]

#: A branch token that ended elsewhere after a decision taken without it (neither arrived nor known lost then):
#: the outcome context our engine writes in that case, ``{"lost_branch": {...}}``, which ELSPETH never records.
AFTER_LOSS = [
    f"""CREATE TEMP TABLE c_after_loss AS
    WITH d AS (
        SELECT event_id, run_id, node_id, coalesce_name, row_id, fork_group_id, expected_branches, branches_arrived,
            branches_lost FROM c_merge_events
        UNION ALL
        SELECT event_id, run_id, node_id, coalesce_name, row_id, fork_group_id, expected_branches, branches_arrived,
            branches_lost FROM c_fail_events),
    open AS (
        SELECT d.*, b.branch FROM d, unnest(d.expected_branches) AS b(branch)
        WHERE NOT list_contains(d.branches_arrived, b.branch) AND NOT list_contains(d.branches_lost, b.branch)),
    ended AS (
        SELECT x.*, t.token_id AS lost_token, o.outcome_id, o.outcome, o.sink_name
        FROM open x
        JOIN l_tokens t ON t.row_id = x.row_id AND t.branch_name = x.branch
            AND t.fork_group_id IS NOT DISTINCT FROM x.fork_group_id
        JOIN l_token_outcomes o ON o.token_id = t.token_id AND o.is_terminal = 1
        ANTI JOIN c_states cs ON cs.token_id = t.token_id AND cs.node_id = x.node_id),
    last_node AS ({_last_nodes("SELECT lost_token FROM ended")}),
    k AS (
        SELECT e.*, n.node_name, {_LOST_KIND.replace("fl.", "e.")} AS reason
        FROM ended e LEFT JOIN last_node ln ON ln.token_id = e.lost_token
        LEFT JOIN x_nodes n ON n.node_id = {_LOST_NODE.replace("fl.", "e.")} AND n.run_id = e.run_id)
    SELECT outcome_id, jobj(kv('lost_branch', jobj(concat(
            kv('after_event_id', jstr(event_id)), kv('branch', jstr(branch)), kv('coalesce', jstr(coalesce_name)),
            kv('inferred', 'true'), kv('node', jstr(node_name)), kv('reason', jstr(reason)),
            kv('sink', jstr(sink_name)), kv('token_id', jstr(lost_token)))))) AS context_json
    FROM k""",
]

EVENT_CONTEXTS = """
SELECT event_id, context_json FROM c_merge_events UNION ALL SELECT event_id, context_json FROM c_fail_events
UNION ALL SELECT event_id, context_json FROM c_late_events
"""

EVENTS_SELECT = """
SELECT event_id, run_id, node_id, coalesce_name, row_id, 'merged' AS event_type, trigger,
    NULL AS failure_reason, policy, merge_strategy, quorum_count, timeout_seconds, select_branch,
    expected_branches, branches_arrived, arrived_token_ids, arrival_offsets_ms, branches_lost, lost_reasons,
    n_expected, n_arrived, n_lost, first_arrival_at, decided_at, wait_ms AS wait_duration_ms, join_group_id,
    merged_token_id, merged_row_hash,
    CASE WHEN collisions_json IS NOT NULL THEN list_sort(json_keys(collisions_json)) END AS union_collisions,
    NULL AS decision_event_id, NULL AS late_branch, NULL AS late_token_id, NULL AS late_by_ms, context_json
FROM c_merge_events
UNION ALL BY NAME
SELECT event_id, run_id, node_id, coalesce_name, row_id, 'failed' AS event_type, trigger, failure_reason,
    policy, merge_strategy, quorum_count, timeout_seconds, select_branch, expected_branches, branches_arrived,
    arrived_token_ids, arrival_offsets_ms, branches_lost, lost_reasons, n_expected, n_arrived, n_lost,
    first_arrival_at, decided_at, wait_ms AS wait_duration_ms, context_json
FROM c_fail_events
UNION ALL BY NAME
SELECT event_id, run_id, node_id, coalesce_name, row_id, 'late_arrival' AS event_type, 'late_arrival' AS trigger,
    failure_reason, policy, merge_strategy, quorum_count, timeout_seconds, select_branch,
    coalesce(config_branches, []) AS expected_branches, [branch_name] AS branches_arrived,
    [token_id] AS arrived_token_ids, [ms_between(decision_first_at, started_at)] AS arrival_offsets_ms,
    [] AS branches_lost, [] AS lost_reasons, len(coalesce(config_branches, [])) AS n_expected, 1 AS n_arrived,
    0 AS n_lost, started_at AS first_arrival_at, decided_at, join_group_id, merged_token_id,
    decision_event_id, branch_name AS late_branch, token_id AS late_token_id, late_by_ms, context_json
FROM c_late_events
"""


def build(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Create the ``c_*`` tables (decisions, late arrivals, contexts); returns the problems found."""
    for sql in STAGE_1:
        con.execute(sql)
    raws = [r[0] for r in con.execute("SELECT DISTINCT raw FROM c_merge_lost ORDER BY raw").fetchall()]
    reasons, problems = reason_table(raws)
    con.register("c_lost_reasons", reasons)
    for sql in STAGE_2 + STAGE_3 + AFTER_LOSS:
        con.execute(sql)
    return problems + _problems(con)


PROBLEM_CHECKS = {
    "merge(s) whose consumed tokens carry different context_after_json copies (the first was kept)":
        "SELECT count(*) FROM c_merge_groups WHERE ctx_differs",
    "merge(s) without ELSPETH merge metadata (context rebuilt from node states and token parents)":
        "SELECT count(*) FROM c_merge_groups WHERE c IS NULL",
    "late arrival(s) with no decision of their coalesce and row to refer to":
        "SELECT count(*) FROM c_late_events WHERE decision_event_id IS NULL",
    "late arrival(s) that started before the decision they were matched to (late_by_ms < 0)":
        "SELECT count(*) FROM c_late_events WHERE late_by_ms < 0",
    "coalesce node(s) whose config_json is unreadable or names no policy (require_all and union assumed where a "
    "merge's own context does not say)":
        "SELECT count(*) FROM c_nodes WHERE config_policy IS NULL",
    "coalesce state(s) still open (the run was interrupted while joins were pending)":
        "SELECT count(*) FROM c_states WHERE status NOT IN ('completed', 'failed')",
}


def _problems(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Findings about the coalesce records that the import worked around, in one query."""
    counts = con.execute("SELECT " + ", ".join(f"({q})" for q in PROBLEM_CHECKS.values())).fetchall()[0]
    return [f"{n} {text}" for text, n in zip(PROBLEM_CHECKS, counts, strict=True) if n]

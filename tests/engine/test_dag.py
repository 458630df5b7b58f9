"""The pipeline graph: ELSPETH-identical node ids and steps, wiring, fork targets, every graph rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from elspeth_nb.audit.hashing import stable_hash
from elspeth_nb.engine.dag import (
    DISCARD,
    Destination,
    EdgeSpec,
    Pipeline,
    build_graph,
    engine_version,
    load_pipeline,
)
from elspeth_nb.errors import ConfigError, NotFoundError

CONFIGS = Path(__file__).parent / "configs"
SCHEMA_FIXED = {
    "mode": "fixed",
    "fields": ["id: int", "name: str", "amount: int", "category: str", "note: str"],
}
BRANCHES = {"path_a": "out_a", "path_b": "out_b", "path_c": "out_c"}

# (name, node_id, node_type, plugin_name, determinism, step, config) as ELSPETH recorded them in the
# `nodes` table of its run of requireall_nested (gate/coalesce config_json there also carry a schema
# that ELSPETH adds after computing the id).
ELSPETH_REQUIREALL_NODES = [
    (
        "source",
        "source_csv_8fe6e7b3ee3c",
        "source",
        "csv",
        "io_read",
        0,
        {"on_validation_failure": "discard", "path": "input.csv", "schema": SCHEMA_FIXED},
    ),
    (
        "fork_gate",
        "config_gate_fork_gate_8881eaa3e221",
        "gate",
        "config_gate:fork_gate",
        "deterministic",
        1,
        {
            "condition": "True",
            "fork_to": ["path_a", "path_b", "path_c"],
            "routes": {"false": "output", "true": "fork"},
        },
    ),
    (
        "branch_a_passthrough",
        "transform_branch_a_passthrough_e7eff0f8b3dc",
        "transform",
        "passthrough",
        "deterministic",
        2,
        {"schema": {"mode": "observed"}},
    ),
    (
        "branch_b_truncate",
        "transform_branch_b_truncate_d09e123fa78f",
        "transform",
        "truncate",
        "deterministic",
        3,
        {"fields": {"note": 12}, "schema": {"mode": "observed"}, "suffix": "..."},
    ),
    (
        "branch_c_mapper",
        "transform_branch_c_mapper_7adc251f45fc",
        "transform",
        "field_mapper",
        "deterministic",
        4,
        {
            "mapping": {"amount": "amount_c", "category": "category_c", "id": "id"},
            "schema": {"mode": "observed"},
            "select_only": True,
        },
    ),
    (
        "merge3",
        "coalesce_merge3_f4c2695d8c42",
        "coalesce",
        "coalesce:merge3",
        "deterministic",
        5,
        {"branches": BRANCHES, "merge": "nested", "policy": "require_all"},
    ),
    (
        "output",
        "sink_output_9f64af7f956b",
        "sink",
        "json",
        "io_write",
        6,
        {"format": "jsonl", "path": "output.jsonl", "schema": {"mode": "observed"}},
    ),
]
ELSPETH_QUORUM_IDS = [
    "source_csv_8fe6e7b3ee3c",
    "config_gate_fork_gate_8881eaa3e221",
    "transform_branch_a_passthrough_e7eff0f8b3dc",
    "transform_branch_b_truncate_d09e123fa78f",
    "transform_branch_c_filter_cce782274576",
    "coalesce_merge3_6cb3c71ce6cd",
    "sink_output_9f64af7f956b",
]


# nodes.config_hash of ELSPETH's plugin nodes (its gate/coalesce hashes also cover the schema it adds).
ELSPETH_PLUGIN_CONFIG_HASHES = {
    "source": "8fe6e7b3ee3c0a59bd5ab3556450096ba4230f3d1ed55a68392593baa1edb2d3",
    "branch_a_passthrough": "e7eff0f8b3dc59d6d6b2e7eff96c7145d1f2fc5e6ad5ce032fa2984a341a5537",
    "branch_b_truncate": "d09e123fa78f2343dfa98dfca8624924ae1d6b8d20d9acd07452821760c10cd6",
    "branch_c_mapper": "7adc251f45fc69f3516644f1ce5f8a71d55ccc99d4123da1b435ea2c34e174ac",
    "output": "9f64af7f956be20d240523c9da56d6e355afabe5684d938d9526bbd1b50a7cb6",
}


def sample_edges(branch_c: str) -> list[EdgeSpec]:
    """The edges ELSPETH recorded for the sample runs, by node name."""
    return [
        EdgeSpec("source", "fork_gate", "continue", "move"),
        EdgeSpec("fork_gate", "branch_a_passthrough", "path_a", "move"),
        EdgeSpec("fork_gate", "branch_b_truncate", "path_b", "move"),
        EdgeSpec("fork_gate", branch_c, "path_c", "move"),
        EdgeSpec("fork_gate", "output", "false", "move"),
        EdgeSpec("branch_a_passthrough", "merge3", "continue", "move"),
        EdgeSpec("branch_b_truncate", "merge3", "continue", "move"),
        EdgeSpec(branch_c, "merge3", "continue", "move"),
        EdgeSpec("merge3", "output", "on_success", "move"),
    ]


def fork_settings(**changes: Any) -> dict[str, Any]:
    """source -(raw)-> fork [a, b] -> ta / tb -> merge -> out; ``changes`` replace whole sections."""
    data: dict[str, Any] = {
        "source": {"plugin": "csv", "on_success": "raw", "options": {"path": "in.csv"}},
        "gates": [
            {
                "name": "fan",
                "input": "raw",
                "condition": "True",
                "routes": {"true": "fork", "false": "out"},
                "fork_to": ["a", "b"],
            }
        ],
        "transforms": [
            {"name": "ta", "plugin": "passthrough", "input": "a", "on_success": "a_out"},
            {"name": "tb", "plugin": "passthrough", "input": "b", "on_success": "b_out"},
        ],
        "coalesce": [{"name": "merge", "branches": {"a": "a_out", "b": "b_out"}, "on_success": "out"}],
        "sinks": {"out": {"plugin": "jsonl", "options": {"path": "out.jsonl"}}},
    }
    data.update(changes)
    return data


def linear(*transforms: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """source -(raw)-> transforms -> sink ``out``."""
    data: dict[str, Any] = {
        "source": {"plugin": "csv", "on_success": "raw", "options": {"path": "in.csv"}},
        "transforms": list(transforms),
        "sinks": {"out": {"plugin": "jsonl", "options": {"path": "out.jsonl"}}},
    }
    data.update(changes)
    return data


def t(name: str, input_: str, on_success: str | None = "out", **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "plugin": "passthrough", "input": input_, **extra}
    if on_success is not None:
        entry["on_success"] = on_success
    return entry


def fork_gate(name: str, input_: str, branches: list[str], otherwise: str = "out") -> dict[str, Any]:
    return {
        "name": name,
        "input": input_,
        "condition": "True",
        "routes": {"true": "fork", "false": otherwise},
        "fork_to": branches,
    }


def split(name: str, input_: str, yes: str, no: str) -> dict[str, Any]:
    return {"name": name, "input": input_, "condition": "row['x'] > 1", "routes": {"true": yes, "false": no}}


def sinks(*names: str) -> dict[str, Any]:
    return {n: {"plugin": "jsonl", "options": {"path": f"{n}.jsonl"}} for n in names}


def problems_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        Pipeline.from_dict(data)
    return info.value.problems


def has(problems: list[str], loc: str, fragment: str) -> bool:
    return any(p.startswith(f"{loc}: ") and fragment in p for p in problems)


# -- ELSPETH samples -------------------------------------------------------------------------


def test_requireall_sample_matches_elspeth_nodes() -> None:
    graph = load_pipeline(CONFIGS / "elspeth_requireall_nested.yaml").graph
    got = [
        (n.name, n.node_id, n.node_type, n.plugin_name, n.determinism, n.step, dict(n.config))
        for n in graph.nodes
    ]
    assert got == ELSPETH_REQUIREALL_NODES
    for node in graph.nodes:
        assert node.config_hash == stable_hash(node.config)
        assert node.node_id.endswith(node.config_hash[:12])
        engine = node.node_type in ("gate", "coalesce")
        assert node.plugin_version == (engine_version() if engine else "1.0.0")
    assert engine_version().startswith("engine:")
    for name, config_hash in ELSPETH_PLUGIN_CONFIG_HASHES.items():
        assert graph.node(name).config_hash == config_hash


def test_quorum_sample_node_ids_and_steps() -> None:
    graph = load_pipeline(CONFIGS / "elspeth_quorum2_lossy.yaml").graph
    assert [n.node_id for n in graph.nodes] == ELSPETH_QUORUM_IDS
    assert [n.step for n in graph.nodes] == [0, 1, 2, 3, 4, 5, 6]
    assert graph.node("merge3").config == {
        "branches": BRANCHES,
        "policy": "quorum",
        "merge": "nested",
        "quorum_count": 2,
        "timeout_seconds": 5.0,
    }


def test_elspeth_resolved_settings_give_the_same_node_ids() -> None:
    graph = load_pipeline(CONFIGS / "elspeth_resolved_settings.yaml").graph
    assert [n.node_id for n in graph.nodes] == ELSPETH_QUORUM_IDS


@pytest.mark.parametrize(
    ("name", "branch_c"),
    [
        ("elspeth_requireall_nested.yaml", "branch_c_mapper"),
        ("elspeth_quorum2_lossy.yaml", "branch_c_filter"),
    ],
)
def test_sample_edges_and_fork_wiring(name: str, branch_c: str) -> None:
    pipeline = load_pipeline(CONFIGS / name)
    graph = pipeline.graph
    assert list(graph.edges) == sample_edges(branch_c)
    assert dict(graph.fork_targets) == {("fork_gate", b): ("merge3", b) for b in BRANCHES}
    assert dict(graph.coalesce_gate) == {"merge3": "fork_gate"}
    assert graph.source_destination == Destination("node", "fork_gate")
    assert graph.resolve("out_b") == Destination("node", "merge3", "path_b")
    assert graph.resolve("path_c") == Destination("node", branch_c)
    assert graph.resolve("output") == Destination("sink", "output")
    assert graph.resolve("discard") is DISCARD
    assert pipeline.base_dir == CONFIGS.absolute()
    assert pipeline.source_path == (CONFIGS / name).absolute()
    assert pipeline.resolve_path("input.csv") == CONFIGS.absolute() / "input.csv"
    assert [w.split(": ", 2)[1] for w in pipeline.warnings] == [
        "landscape",
        "payload_store",
        "sinks.output.on_write_failure",
    ]


# -- nested forks and other shapes -----------------------------------------------------------


def test_nested_forks_carry_the_outer_branch_through_the_inner_merge() -> None:
    graph = load_pipeline(CONFIGS / "nested_forks.yaml").graph
    assert [(n.name, n.step) for n in graph.nodes] == [
        ("source", 0),
        ("g1", 1),
        ("ta", 2),
        ("g2", 3),
        ("t1", 4),
        ("inner", 5),
        ("outer", 6),
        ("output", 7),
        ("rejects", 7),
    ]
    assert dict(graph.fork_targets) == {
        ("g1", "a"): ("outer", "a"),
        ("g1", "b"): ("outer", "b"),
        ("g2", "b1"): ("inner", "b1"),
        ("g2", "b2"): ("inner", "b2"),
    }
    assert dict(graph.coalesce_gate) == {"inner": "g2", "outer": "g1"}
    assert graph.edges_from("g2") == (
        EdgeSpec("g2", "t1", "b1", "move"),
        EdgeSpec("g2", "inner", "b2", "move"),
        EdgeSpec("g2", "rejects", "false", "move"),
    )
    assert graph.edges_from("t1") == (
        EdgeSpec("t1", "inner", "continue", "move"),
        EdgeSpec("t1", "rejects", "__error_t1__", "divert"),
    )
    assert EdgeSpec("source", "rejects", "__quarantine__", "divert") in graph.edges
    assert graph.resolve("b2") == Destination("node", "inner", "b2")
    assert graph.resolve("b_done") == Destination("node", "outer", "b")


def test_fork_branch_straight_to_a_sink_named_like_it() -> None:
    data = fork_settings(
        gates=[fork_gate("fan", "raw", ["a", "b", "audit_copy"])], sinks=sinks("out", "audit_copy")
    )
    graph = Pipeline.from_dict(data).graph
    assert graph.fork_targets[("fan", "audit_copy")] is None
    assert graph.fork_targets[("fan", "a")] == ("merge", "a")
    assert EdgeSpec("fan", "audit_copy", "audit_copy", "move") in graph.edges


def test_identity_branches_go_from_the_fork_straight_to_the_coalesce() -> None:
    data = fork_settings(
        transforms=[], coalesce=[{"name": "merge", "branches": ["a", "b"], "on_success": "out"}]
    )
    graph = Pipeline.from_dict(data).graph
    assert graph.edges_from("fan")[:2] == (
        EdgeSpec("fan", "merge", "a", "move"),
        EdgeSpec("fan", "merge", "b", "move"),
    )
    assert graph.connections["a"] == Destination("node", "merge", "a")
    assert [(n.name, n.step) for n in graph.nodes] == [("source", 0), ("fan", 1), ("merge", 2), ("out", 3)]


def test_lossy_branch_still_targets_its_coalesce() -> None:
    data = fork_settings(
        gates=[fork_gate("fan", "raw", ["a", "b"]), split("filter_b", "b", "b_kept", "rejects")],
        transforms=[t("ta", "a", "a_out")],
        coalesce=[{"name": "merge", "branches": {"a": "a_out", "b": "b_kept"}, "on_success": "out"}],
        sinks=sinks("out", "rejects"),
    )
    graph = Pipeline.from_dict(data).graph
    assert graph.fork_targets[("fan", "b")] == ("merge", "b")
    assert graph.coalesce_gate["merge"] == "fan"


def test_source_straight_to_a_sink() -> None:
    data = {
        "source": {"plugin": "jsonl", "on_success": "out", "options": {"path": "in.jsonl"}},
        "sinks": sinks("out"),
    }
    graph = Pipeline.from_dict(data).graph
    assert list(graph.edges) == [EdgeSpec("source", "out", "on_success", "move")]
    assert [(n.node_id.split("_")[0], n.step) for n in graph.nodes] == [("source", 0), ("sink", 1)]
    assert graph.node("source").node_id.startswith("source_jsonl_")


def test_determinism_versions_and_long_names() -> None:
    long_sink = "s" * 64
    data = linear(
        t("slow", "raw", "mid", plugin="latency", options={"mean_ms": 5}),
        t("udf", "mid", long_sink, plugin="python", options={"function": "pkg.mod:fn"}),
        sinks=sinks(long_sink),
    )
    graph = Pipeline.from_dict(data).graph
    assert graph.node("slow").determinism == "seeded"
    assert graph.node("udf").determinism == "non_deterministic"
    assert graph.node("udf").config == {"function": "pkg.mod:fn"}
    sink = graph.node(long_sink)
    assert len(sink.node_id) == 64 and sink.node_id.startswith("sink_sss")
    assert graph.node_by_id(sink.node_id) is sink
    assert graph.edges_from("udf") == (EdgeSpec("udf", long_sink, "on_success", "move"),)


def test_lookups_of_unknown_names_say_what_exists() -> None:
    graph = Pipeline.from_dict(fork_settings()).graph
    with pytest.raises(NotFoundError) as info:
        graph.node("nope")
    assert str(info.value).startswith("node `nope` not found. Available: `source`, `fan`, `ta`")
    with pytest.raises(KeyError):
        graph.node_by_id("nope")
    with pytest.raises(NotFoundError) as info:
        graph.resolve("ghost")
    assert (
        str(info.value)
        == "connection or sink `ghost` not found. Available: `a`, `b`, `raw`, `a_out`, `b_out`, `out`."
    )


def test_pipeline_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    pipeline = Pipeline.from_dict(fork_settings())
    assert pipeline.base_dir == tmp_path and pipeline.source_path is None and pipeline.warnings == ()
    given = Pipeline.from_dict(fork_settings(), base_dir="data")
    assert given.base_dir == tmp_path / "data"
    assert given.resolve_path("in.csv") == tmp_path / "data" / "in.csv"
    assert given.resolve_path("/abs/in.csv") == Path("/abs/in.csv")
    assert given.resolve_path("~/in.csv") == Path.home() / "in.csv"


def test_load_pipeline_is_pipeline_load() -> None:
    path = CONFIGS / "nested_forks.yaml"
    assert load_pipeline(path) == Pipeline.load(path)


def test_build_graph_directly() -> None:
    pipeline = Pipeline.from_dict(fork_settings())
    assert build_graph(pipeline.config) == pipeline.graph


# -- graph rules -----------------------------------------------------------------------------

GRAPH_RULES: list[tuple[str, dict[str, Any], str, str]] = [
    (
        "duplicate node name",
        fork_settings(gates=[fork_gate("ta", "raw", ["a", "b"])]),
        "gates[0].name",
        "duplicate node name: transforms[0] is also called 'ta' (got 'ta')",
    ),
    (
        "name clashes with a sink",
        linear(t("out", "raw")),
        "transforms[0].name",
        "a sink has the same name; node and sink names must differ (got 'out')",
    ),
    (
        "name of the source",
        linear(t("source", "raw")),
        "transforms[0].name",
        "'source' is the name of the source node; choose another name",
    ),
    (
        "dead-end on_success",
        linear(t("t1", "raw", "nowhere")),
        "transforms[0].on_success",
        "'nowhere' is neither a sink nor a connection that a node consumes "
        "(sinks: out; connections: raw) (got 'nowhere')",
    ),
    (
        "dead-end route",
        linear(gates=[split("g", "raw", "out", "nope")]),
        "gates[0].routes.false",
        "'nope' is neither a sink nor a connection that a node consumes",
    ),
    (
        "dead-end source",
        linear(source={"plugin": "csv", "on_success": "rw", "options": {"path": "x"}}),
        "source.on_success",
        "'rw' is neither a sink nor a connection",
    ),
    (
        "consumed twice",
        linear(t("t1", "raw"), t("t2", "raw")),
        "transforms[1].input",
        "connection 'raw' is already consumed by transforms[0].input; a connection feeds one node "
        "(use a gate to send rows to several) (got 'raw')",
    ),
    (
        "no producer",
        linear(t("t1", "raw"), t("t2", "ghost")),
        "transforms[1].input",
        "no node produces connection 'ghost' (connections produced: raw) (got 'ghost')",
    ),
    (
        "input is a sink",
        linear(t("t1", "raw"), t("t2", "out")),
        "transforms[1].input",
        "'out' is a sink; a sink cannot be the input of a node",
    ),
    (
        "transform without on_success",
        linear(t("t1", "raw", None)),
        "transforms[0].on_success",
        "required: where processed rows go (a sink or a connection) (got nothing)",
    ),
    (
        "on_error not a sink",
        linear(t("t1", "raw", on_error="nowhere")),
        "transforms[0].on_error",
        "must be 'discard' or a sink name (sinks: out) (got 'nowhere')",
    ),
    (
        "quarantine not a sink",
        linear(
            t("t1", "raw"),
            source={
                "plugin": "csv",
                "on_success": "raw",
                "options": {"path": "x", "on_validation_failure": "bin"},
            },
        ),
        "source.options.on_validation_failure",
        "must be 'discard' or a sink name (sinks: out) (got 'bin')",
    ),
    ("self loop", linear(t("t1", "raw"), t("t2", "x", "x")), "transforms[1].on_success", "cycle: t2 → t2"),
    (
        "unused sink",
        linear(t("t1", "raw"), sinks=sinks("out", "unused")),
        "sinks.unused",
        "nothing leads to this sink "
        "(no on_success, route, fork branch, on_error or on_validation_failure names it)",
    ),
    (
        "fork branch leads nowhere",
        fork_settings(gates=[fork_gate("fan", "raw", ["a", "b", "c"])]),
        "gates[0].fork_to[2]",
        "fork branch 'c' leads nowhere: name a sink after it, or use it as the input of a "
        "transform, gate or coalesce branch (sinks: out; connections: a, a_out, b, b_out, raw) (got 'c')",
    ),
    (
        "branch name used by two forks",
        fork_settings(
            gates=[fork_gate("g1", "raw", ["a", "b"], "rest"), fork_gate("g2", "rest", ["a", "c"])],
            sinks=sinks("out", "c"),
        ),
        "gates[1].fork_to[0]",
        "fork branch 'a' is also a branch of gate 'g1'; branch names must be unique across gates",
    ),
    (
        "coalesce without on_success",
        fork_settings(coalesce=[{"name": "merge", "branches": {"a": "a_out", "b": "b_out"}}]),
        "coalesce[0].on_success",
        "required: where merged rows go (a sink or a connection) (got nothing)",
    ),
    (
        "two producers",
        linear(t("t1", "p", "mid"), t("t2", "q", "mid"), t("t3", "mid"), gates=[split("g", "raw", "p", "q")]),
        "transforms[1].on_success",
        "connection 'mid' is also produced by transforms[0].on_success; "
        "a connection has exactly one producer (got 'mid')",
    ),
    (
        "route label equal to a fork branch",
        fork_settings(
            gates=[
                {
                    "name": "fan",
                    "input": "raw",
                    "condition": "row['k']",
                    "routes": {"a": "fork", "b": "out"},
                    "fork_to": ["a", "b"],
                }
            ]
        ),
        "gates[0].routes.b",
        "label 'b' is used twice by 'fan'",
    ),
]


@pytest.mark.parametrize(
    ("data", "loc", "fragment"), [r[1:] for r in GRAPH_RULES], ids=[r[0] for r in GRAPH_RULES]
)
def test_every_graph_rule_is_reported_at_its_location(data: dict[str, Any], loc: str, fragment: str) -> None:
    problems = problems_of(data)
    assert has(problems, loc, fragment), problems


def test_a_cycle_is_named() -> None:
    data = linear(t("t0", "raw"), t("t1", "x", "y"), t("t2", "y", "z"), t("t3", "z", "x"))
    assert problems_of(data) == ["transforms[3].on_success: cycle: t1 → t2 → t3 → t1"]


def test_a_cycle_through_a_coalesce_reachable_from_the_source() -> None:
    data = fork_settings(
        transforms=[t("ta", "a", "a_out"), t("loop", "merged", "b_in")],
        coalesce=[{"name": "merge", "branches": {"a": "a_out", "b": "b_in"}, "on_success": "merged"}],
        sinks=sinks("out", "b"),
    )
    problems = problems_of(data)
    assert has(problems, "transforms[1].on_success", "cycle: merge → loop → merge"), problems


def test_unreachable_nodes() -> None:
    data = linear(
        t("t1", "back", "loop"),
        t("t3", "side"),
        gates=[split("g", "loop", "side", "back")],
        source={"plugin": "csv", "on_success": "out", "options": {"path": "x"}},
    )
    problems = problems_of(data)
    assert has(
        problems, "transforms[1]", "unreachable from the source: its input only comes from unreachable nodes"
    )
    assert has(problems, "gates[0].routes.false", "cycle: t1 → g → t1")
    assert not any(p.startswith(("transforms[0]: ", "gates[0]: ")) for p in problems), problems


def test_coalesce_branch_that_does_not_come_from_a_fork() -> None:
    data = fork_settings(
        gates=[
            {
                "name": "route",
                "input": "raw",
                "condition": "row['kind']",
                "routes": {"forked": "pre", "plain": "plain_rows"},
            },
            fork_gate("fan", "pre", ["a", "b"]),
        ],
        transforms=[t("ta", "a", "a_out")],
        coalesce=[{"name": "merge", "branches": {"a": "a_out", "b": "plain_rows"}, "on_success": "out"}],
        sinks=sinks("out", "b"),
    )
    assert problems_of(data) == [
        "coalesce[0].branches.b: input 'plain_rows' does not come from a fork branch: it traces back to the "
        "source without passing a fork gate (got 'plain_rows')"
    ]


def test_coalesce_branches_from_two_fork_gates() -> None:
    data = fork_settings(
        gates=[fork_gate("g1", "raw", ["a", "b"], "rest"), fork_gate("g2", "rest", ["c", "d"])],
        transforms=[],
        coalesce=[{"name": "merge", "branches": ["a", "c"], "on_success": "out"}],
        sinks=sinks("out", "b", "d"),
    )
    assert problems_of(data) == [
        "coalesce[0].branches: branches come from different fork gates (a ← g1.a, c ← g2.c); "
        "a coalesce joins the branches of one fork"
    ]


def test_two_coalesce_branches_from_one_fork_branch() -> None:
    data = fork_settings(
        gates=[fork_gate("fan", "raw", ["a", "b"]), split("split_a", "a", "a1", "a2")],
        transforms=[],
        coalesce=[{"name": "merge", "branches": {"a": "a1", "y": "a2"}, "on_success": "out"}],
        sinks=sinks("out", "b"),
    )
    assert problems_of(data) == [
        "coalesce[0].branches.y: traces back to fork branch 'a' of gate 'fan', like branch 'a'; "
        "each branch must come from a different fork branch (got 'a2')"
    ]


def test_fork_branch_feeding_two_coalesces() -> None:
    data = fork_settings(
        gates=[fork_gate("fan", "raw", ["a", "b", "c"]), split("split_a", "a", "a1", "a2")],
        transforms=[],
        coalesce=[
            {"name": "m1", "branches": {"a": "a1", "b": "b"}, "on_success": "out"},
            {"name": "m2", "branches": {"a": "a2", "c": "c"}, "on_success": "out"},
        ],
    )
    assert problems_of(data) == [
        "gates[0].fork_to[0]: fork branch reaches 2 coalesces (m1, m2); a branch can join only one (got 'a')"
    ]


def test_several_graph_problems_are_reported_together_in_file_order() -> None:
    data = fork_settings(
        source={
            "plugin": "csv",
            "on_success": "raw",
            "options": {"path": "x", "on_validation_failure": "bin"},
        },
        transforms=[t("ta", "a", "a_out", on_error="nowhere"), t("tb", "b", None)],
        coalesce=[{"name": "merge", "branches": {"a": "a_out", "b": "b_out"}}],
        sinks=sinks("out", "unused"),
    )
    locations = [p.split(": ", 1)[0] for p in problems_of(data)]
    assert locations == [
        "source.options.on_validation_failure",
        "transforms[0].on_error",
        "transforms[1].on_success",
        "coalesce[0].on_success",
        "coalesce[0].branches.b",
        "sinks.unused",
    ]


def test_graph_problems_in_a_file_carry_lines(tmp_path: Path) -> None:
    text = (CONFIGS / "nested_forks.yaml").read_text().replace("on_success: b_done", "on_success: b_dnoe")
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        Pipeline.load(path)
    assert info.value.source == str(path)
    assert info.value.problems == [
        "pipeline.yaml:41: coalesce[0].on_success: 'b_dnoe' is neither a sink nor a connection that a node "
        "consumes (sinks: output, rejects; connections: a, a_out, b, b1, b1_out, b2, b_done, raw) "
        "(got 'b_dnoe')",
        "pipeline.yaml:43: coalesce[1].branches.b: no node produces connection 'b_done' "
        "(connections produced: a, a_out, b, b1, b1_out, b2, b_dnoe, raw) (got 'b_done')",
    ]


def test_a_pipeline_shows_its_nodes_in_step_order() -> None:
    demo = Path(__file__).resolve().parents[2] / "data" / "demo" / "pipeline.yaml"
    pipeline = load_pipeline(demo)
    nodes = pipeline.to_polars()
    assert nodes.columns == ["name", "node_type", "plugin", "step", "node_id", "config_hash"]
    assert nodes["name"].to_list() == [n.name for n in pipeline.graph.nodes]
    assert nodes["step"].is_sorted() and nodes.row(0)[:2] == ("source", "source")
    counts = dict(nodes.group_by("node_type").len().rows())
    text = repr(pipeline)
    assert text.splitlines()[0] == (f"Pipeline {demo}: {nodes.height} nodes (1 source, {counts['gate']} gates, "
                                    f"{counts['transform']} transforms, 1 coalesce, {counts['sink']} sinks)")
    assert len(text.splitlines()) == 1 + nodes.height and len(text) < 2_000  # not the settings dump
    assert "decision (coalesce:decision)" in text
    html = pipeline._repr_html_()
    assert html.startswith(f"<p><b>Pipeline {demo}: ") and html.count("<tr>") == nodes.height + 2  # names, types, nodes
    assert all(f"&quot;{node_id}&quot;" in html for node_id in nodes["node_id"])  # no row or id cut short


def test_load_pipeline_takes_a_mapping_like_run_pipeline() -> None:
    from tests.cases import fork_pipeline

    settings = fork_pipeline(Path("in.csv"))
    pipeline = load_pipeline(settings)
    assert pipeline.source_path is None and repr(pipeline).startswith("Pipeline (from a mapping): ")
    assert [c.name for c in pipeline.config.coalesce] == ["merge3"]

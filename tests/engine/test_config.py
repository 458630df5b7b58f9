"""Settings models and loading: ELSPETH files load unchanged, every problem is located and listed."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pydantic
import pytest

from elspeth_nb.engine.config import (
    CoalesceConfig,
    CsvSource,
    CsvSourceOptions,
    FieldMapperOptions,
    FieldSpec,
    GateConfig,
    JsonSink,
    KeywordFilterOptions,
    LatencyOptions,
    PassthroughTransform,
    PipelineConfig,
    PythonOptions,
    SchemaConfig,
    TruncateOptions,
    config_from_mapping,
    load_config,
    read_settings,
)
from elspeth_nb.engine.dag import load_pipeline
from elspeth_nb.errors import ConfigError

CONFIGS = Path(__file__).parent / "configs"
ELSPETH_WARNINGS = [
    "landscape: ELSPETH-only setting, ignored (elspeth-nb writes its audit trail to audit.path)",
    "payload_store: ELSPETH-only setting, ignored "
    "(row payloads are kept in the audit store; see audit.payloads)",
    "sinks.output.on_write_failure: accepted for ELSPETH compatibility, not applied (a row the sink cannot write "
    "fails its token, recorded with the sink's error, and the run goes on; a sink that breaks fails the run)",
]


def minimal(**sections: Any) -> dict[str, Any]:
    """The smallest valid settings (source straight to a sink), plus ``sections``."""
    data: dict[str, Any] = {
        "source": {"plugin": "csv", "on_success": "out", "options": {"path": "in.csv"}},
        "sinks": {"out": {"plugin": "jsonl", "options": {"path": "out.jsonl"}}},
    }
    data.update(sections)
    return data


def source(plugin: str = "csv", **options: Any) -> dict[str, Any]:
    return {"plugin": plugin, "on_success": "out", "options": {"path": "in.csv", **options}}


def transform(plugin: str, options: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    entry = {"name": "t", "plugin": plugin, "input": "raw", "on_success": "out", **extra}
    if options is not None:
        entry["options"] = options
    return entry


def gate(**extra: Any) -> dict[str, Any]:
    return {
        "name": "g",
        "input": "raw",
        "condition": "row['a'] > 1",
        "routes": {"true": "out", "false": "out"},
        **extra,
    }


def coalesce(**extra: Any) -> dict[str, Any]:
    return {"name": "m", "branches": ["a", "b"], "on_success": "out", **extra}


def problems_of(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(data)
    return info.value.problems


# -- ELSPETH files ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["elspeth_requireall_nested.yaml", "elspeth_quorum2_lossy.yaml"])
def test_elspeth_settings_load_unchanged_with_warnings(name: str) -> None:
    path = CONFIGS / name
    config, warnings = load_config(path)
    assert [w.split(": ", 1)[1] for w in warnings] == ELSPETH_WARNINGS
    assert all(w.startswith(f"{name}:") for w in warnings)
    assert isinstance(config.source, CsvSource)
    assert config.source.on_success == "raw"
    assert config.source.options.schema.mode == "fixed"
    assert config.source.options.schema.field_specs()[0] == FieldSpec("id", "int", True)
    assert [t.name for t in config.transforms][:2] == ["branch_a_passthrough", "branch_b_truncate"]
    assert isinstance(config.transforms[0], PassthroughTransform)
    truncate = config.transforms[1].options
    assert isinstance(truncate, TruncateOptions)
    assert (truncate.fields, truncate.suffix) == ({"note": 12}, "...")
    assert config.gates[0].routes == {"true": "fork", "false": "output"}
    assert config.gates[0].fork_to == ("path_a", "path_b", "path_c")
    assert config.gates[0].compiled_condition().is_constant
    merge = config.coalesce[0]
    assert dict(merge.branch_inputs) == {"path_a": "out_a", "path_b": "out_b", "path_c": "out_c"}
    assert merge.merge == "nested"
    sink = config.sinks["output"]
    assert isinstance(sink, JsonSink)
    assert (sink.options.format, sink.options.path, sink.on_write_failure) == (
        "jsonl",
        "output.jsonl",
        "discard",
    )


def test_quorum_sample_specifics() -> None:
    config, _ = load_config(CONFIGS / "elspeth_quorum2_lossy.yaml")
    merge = config.coalesce[0]
    assert (merge.policy, merge.quorum_count, merge.timeout_seconds) == ("quorum", 2, 5.0)
    keyword = config.transforms[2].options
    assert isinstance(keyword, KeywordFilterOptions)
    assert (keyword.fields, keyword.blocked_patterns) == (("category",), ("^toys$",))


def test_require_all_sample_specifics() -> None:
    config, _ = load_config(CONFIGS / "elspeth_requireall_nested.yaml")
    assert config.coalesce[0].policy == "require_all"
    mapper = config.transforms[2].options
    assert isinstance(mapper, FieldMapperOptions)
    assert mapper.mapping == {"id": "id", "amount": "amount_c", "category": "category_c"}
    assert (mapper.select_only, mapper.strict) == (True, False)


def test_elspeth_resolved_settings_json_loads() -> None:
    """ELSPETH's runs.settings_json writes every default out; all of it must be accepted."""
    config, warnings = load_config(CONFIGS / "elspeth_resolved_settings.yaml")
    keys = sorted(w.split(": ", 2)[1] for w in warnings)
    assert keys == [
        "checkpoint",
        "concurrency",
        "landscape",
        "payload_store",
        "rate_limit",
        "retry",
        "run_mode",
        "sinks.output.on_write_failure",
        "telemetry",
    ]
    assert config.coalesce[0].select_branch is None
    assert config.coalesce[0].quorum_count == 2


# -- every rule, located ---------------------------------------------------------------------

RULES: list[tuple[str, dict[str, Any], str, str]] = [
    (
        "source plugin",
        minimal(source=source("xml")),
        "source.plugin",
        "unknown plugin; expected one of 'csv', 'jsonl', 'parquet' (got 'xml')",
    ),
    (
        "source plugin missing",
        minimal(source={"on_success": "out", "options": {"path": "x"}}),
        "source.plugin",
        "required (got nothing)",
    ),
    ("source missing", {"sinks": minimal()["sinks"]}, "source", "required (got nothing)"),
    (
        "source path missing",
        minimal(source={"plugin": "csv", "on_success": "out", "options": {}}),
        "source.options.path",
        "required (got nothing)",
    ),
    (
        "source path empty",
        minimal(source=source(path="")),
        "source.options.path",
        "must have at least 1 character (got '')",
    ),
    (
        "delimiter",
        minimal(source=source(delimiter=";;")),
        "source.options.delimiter",
        "must have at most 1 character (got ';;')",
    ),
    (
        "encoding",
        minimal(source=source(encoding="utf-9")),
        "source.options.encoding",
        "unknown text encoding 'utf-9'",
    ),
    (
        "csv-only option on jsonl",
        minimal(source=source("jsonl", delimiter=";")),
        "source.options.delimiter",
        "unknown setting",
    ),
    (
        "fixed schema without fields",
        minimal(source=source(schema={"mode": "fixed"})),
        "source.options.schema.fields",
        "required when mode is fixed (got nothing)",
    ),
    (
        "schema mode",
        minimal(source=source(schema={"mode": "fixd"})),
        "source.options.schema.mode",
        "must be 'fixed', 'flexible', 'observed' or 'parse' (got 'fixd')",
    ),
    (
        "schema field type",
        minimal(source=source(schema={"mode": "fixed", "fields": ["id: int", "n: integer"]})),
        "source.options.schema.fields[1]",
        "unknown type 'integer' in 'n: integer'",
    ),
    (
        "schema field form",
        minimal(source=source(schema={"mode": "flexible", "fields": ["id"]})),
        "source.options.schema.fields[0]",
        "'id' is not of the form 'name: type'",
    ),
    (
        "schema duplicate fields",
        minimal(source=source(schema={"mode": "fixed", "fields": ["id: int", "id: str"]})),
        "source.options.schema.fields",
        "duplicate field names: id",
    ),
    (
        "quarantine name",
        minimal(source=source(on_validation_failure="bad sink")),
        "source.options.on_validation_failure",
        "must start with an ASCII letter, digit or '_'",
    ),
    (
        "source on_success reserved",
        minimal(source={**source(), "on_success": "continue"}),
        "source.on_success",
        "'continue' is reserved (reserved: continue, fork, on_success)",
    ),
    (
        "transform plugin",
        minimal(transforms=[transform("llm")]),
        "transforms[0].plugin",
        "unknown plugin; expected one of 'passthrough', 'field_mapper', 'truncate', 'keyword_filter', "
        "'latency', 'python' (got 'llm')",
    ),
    (
        "transform name chars",
        minimal(transforms=[transform("passthrough", name="3bad")]),
        "transforms[0].name",
        "must start with an ASCII letter and contain only ASCII letters, digits, '_' and '-' (got '3bad')",
    ),
    (
        "transform name length",
        minimal(transforms=[transform("passthrough", name="n" * 39)]),
        "transforms[0].name",
        "must be at most 38 characters (it has 39)",
    ),
    (
        "transform name reserved",
        minimal(transforms=[transform("passthrough", name="fork")]),
        "transforms[0].name",
        "'fork' is reserved",
    ),
    (
        "transform name dunder",
        minimal(transforms=[transform("passthrough", name="__t")]),
        "transforms[0].name",
        "must start with an ASCII letter",
    ),
    (
        "transform input reserved",
        minimal(transforms=[transform("passthrough", input="on_success")]),
        "transforms[0].input",
        "'on_success' is reserved",
    ),
    (
        "transform input dunder",
        minimal(transforms=[transform("passthrough", input="__x")]),
        "transforms[0].input",
        "names starting with '__' are reserved for system edges",
    ),
    (
        "on_error name",
        minimal(transforms=[transform("passthrough", on_error="bad sink")]),
        "transforms[0].on_error",
        "must start with an ASCII letter, digit or '_'",
    ),
    (
        "unknown key",
        minimal(transforms=[transform("passthrough", optoins={})]),
        "transforms[0].optoins",
        "unknown setting; did you mean 'options'? (got {})",
    ),
    (
        "options missing",
        minimal(transforms=[transform("truncate")]),
        "transforms[0].options",
        "required (got nothing)",
    ),
    (
        "truncate suffix",
        minimal(transforms=[transform("truncate", {"fields": {"note": 3, "x": 9}, "suffix": "..."})]),
        "transforms[0].options.fields",
        "each length must be greater than len(suffix) = 3; too short: note: 3",
    ),
    (
        "truncate empty",
        minimal(transforms=[transform("truncate", {"fields": {}})]),
        "transforms[0].options.fields",
        "at least one field is required",
    ),
    (
        "regex",
        minimal(transforms=[transform("keyword_filter", {"fields": "all", "blocked_patterns": ["ok", "("]})]),
        "transforms[0].options.blocked_patterns[1]",
        "invalid regular expression '(': missing ), unterminated",
    ),
    (
        "keyword fields",
        minimal(transforms=[transform("keyword_filter", {"fields": "some", "blocked_patterns": ["x"]})]),
        "transforms[0].options.fields",
        "must be 'all' or a non-empty list of field names (got 'some')",
    ),
    (
        "keyword patterns",
        minimal(transforms=[transform("keyword_filter", {"fields": ["a"], "blocked_patterns": []})]),
        "transforms[0].options.blocked_patterns",
        "at least one pattern is required",
    ),
    (
        "mapper targets",
        minimal(transforms=[transform("field_mapper", {"mapping": {"a": "x", "b": "x"}})]),
        "transforms[0].options.mapping",
        "several fields map to the same output field: x",
    ),
    (
        "uniform low",
        minimal(transforms=[transform("latency", {"distribution": "uniform", "high_ms": 5})]),
        "transforms[0].options.low_ms",
        "required when distribution is uniform (got nothing)",
    ),
    (
        "uniform order",
        minimal(transforms=[transform("latency", {"distribution": "uniform", "low_ms": 10, "high_ms": 5})]),
        "transforms[0].options.high_ms",
        "must be >= low_ms (10) (got 5)",
    ),
    (
        "low without uniform",
        minimal(transforms=[transform("latency", {"low_ms": 10})]),
        "transforms[0].options.low_ms",
        "only used when distribution is uniform (distribution is fixed) (got 10)",
    ),
    (
        "failure rate",
        minimal(transforms=[transform("latency", {"failure_rate": 1.5})]),
        "transforms[0].options.failure_rate",
        "must be less than or equal to 1 (got 1.5)",
    ),
    (
        "sigma",
        minimal(transforms=[transform("latency", {"sigma": 0})]),
        "transforms[0].options.sigma",
        "must be greater than 0 (got 0)",
    ),
    (
        "mean",
        minimal(transforms=[transform("latency", {"mean_ms": -1})]),
        "transforms[0].options.mean_ms",
        "must be greater than or equal to 0 (got -1)",
    ),
    (
        "python function",
        minimal(transforms=[transform("python", {"function": "clean rows"})]),
        "transforms[0].options.function",
        "must be 'package.module:function' or 'relative/path.py:function'",
    ),
    (
        "condition name",
        minimal(gates=[gate(condition="x > 1")]),
        "gates[0].condition",
        "name 'x' is not allowed; only `row` is (at column 1) (got 'x > 1')",
    ),
    ("condition syntax", minimal(gates=[gate(condition="row['a'] >")]), "gates[0].condition", "syntax error"),
    (
        "boolean labels",
        minimal(gates=[gate(routes={"high": "out", "low": "out"})]),
        "gates[0].routes",
        "the condition is boolean, so the route labels must be exactly 'true' and 'false'",
    ),
    (
        "boolean labels missing one",
        minimal(gates=[gate(routes={"true": "out"})]),
        "gates[0].routes",
        "must be exactly 'true' and 'false'",
    ),
    ("no routes", minimal(gates=[gate(routes={})]), "gates[0].routes", "at least one route is required"),
    (
        "route label reserved",
        minimal(gates=[gate(condition="row['s']", routes={"continue": "out"})]),
        "gates[0].routes.continue",
        "'continue' is reserved",
    ),
    (
        "route destination reserved",
        minimal(gates=[gate(routes={"true": "continue", "false": "out"})]),
        "gates[0].routes.true",
        "'continue' is reserved (reserved: continue, fork, on_success) (got 'continue')",
    ),
    (
        "fork without fork_to",
        minimal(gates=[gate(routes={"true": "fork", "false": "out"})]),
        "gates[0].fork_to",
        "required when a route is 'fork' (got nothing)",
    ),
    (
        "fork_to without fork",
        minimal(gates=[gate(fork_to=["a", "b"])]),
        "gates[0].fork_to",
        "only used when a route is 'fork' (no route is)",
    ),
    (
        "duplicate fork branch",
        minimal(gates=[gate(routes={"true": "fork", "false": "out"}, fork_to=["a", "a"])]),
        "gates[0].fork_to",
        "duplicate branch names: a",
    ),
    (
        "fork branch reserved",
        minimal(gates=[gate(routes={"true": "fork", "false": "out"}, fork_to=["a", "fork"])]),
        "gates[0].fork_to[1]",
        "'fork' is reserved",
    ),
    ("gate name", minimal(gates=[gate(name="g!")]), "gates[0].name", "must start with an ASCII letter"),
    (
        "quorum needs count",
        minimal(coalesce=[coalesce(policy="quorum")]),
        "coalesce[0].quorum_count",
        "required when policy is quorum (got nothing)",
    ),
    (
        "quorum too big",
        minimal(coalesce=[coalesce(policy="quorum", quorum_count=3)]),
        "coalesce[0].quorum_count",
        "cannot exceed the number of branches (2) (got 3)",
    ),
    (
        "quorum_count elsewhere",
        minimal(coalesce=[coalesce(quorum_count=2)]),
        "coalesce[0].quorum_count",
        "only used when policy is quorum (policy is require_all) (got 2)",
    ),
    (
        "quorum zero",
        minimal(coalesce=[coalesce(policy="quorum", quorum_count=0)]),
        "coalesce[0].quorum_count",
        "must be greater than 0 (got 0)",
    ),
    (
        "best effort timeout",
        minimal(coalesce=[coalesce(policy="best_effort")]),
        "coalesce[0].timeout_seconds",
        "required when policy is best_effort (got nothing)",
    ),
    (
        "timeout positive",
        minimal(coalesce=[coalesce(timeout_seconds=0)]),
        "coalesce[0].timeout_seconds",
        "must be greater than 0 (got 0)",
    ),
    (
        "select needs branch",
        minimal(coalesce=[coalesce(merge="select")]),
        "coalesce[0].select_branch",
        "required when merge is select (got nothing)",
    ),
    (
        "select branch known",
        minimal(coalesce=[coalesce(merge="select", select_branch="c")]),
        "coalesce[0].select_branch",
        "must be one of the branches: a, b (got 'c')",
    ),
    (
        "one branch",
        minimal(coalesce=[coalesce(branches=["a"])]),
        "coalesce[0].branches",
        "a coalesce needs at least 2 branches (it has 1)",
    ),
    (
        "duplicate branches",
        minimal(coalesce=[coalesce(branches=["a", "b", "a"])]),
        "coalesce[0].branches",
        "duplicate branch names: a",
    ),
    (
        "branch name",
        minimal(coalesce=[coalesce(branches={"a b": "x", "c": "y"})]),
        "coalesce[0].branches['a b']",
        "must start with an ASCII letter, digit or '_'",
    ),
    (
        "policy",
        minimal(coalesce=[coalesce(policy="most")]),
        "coalesce[0].policy",
        "must be 'require_all', 'quorum', 'best_effort' or 'first' (got 'most')",
    ),
    (
        "merge",
        minimal(coalesce=[coalesce(merge="zip")]),
        "coalesce[0].merge",
        "must be 'union', 'nested' or 'select' (got 'zip')",
    ),
    ("no sinks", minimal(sinks={}), "sinks", "at least one sink is required"),
    ("sinks missing", {"source": source()}, "sinks", "required (got nothing)"),
    (
        "sink named discard",
        minimal(sinks={"discard": {"plugin": "jsonl", "options": {"path": "x"}}}),
        "sinks.discard",
        "'discard' is reserved",
    ),
    (
        "sink plugin",
        minimal(sinks={"out": {"plugin": "kafka", "options": {"path": "x"}}}),
        "sinks.out.plugin",
        "unknown plugin; expected one of 'csv', 'json', 'jsonl', 'parquet' (got 'kafka')",
    ),
    (
        "sink format",
        minimal(sinks={"out": {"plugin": "json", "options": {"path": "x", "format": "yaml"}}}),
        "sinks.out.options.format",
        "must be 'json' or 'jsonl' (got 'yaml')",
    ),
    (
        "sink path",
        minimal(sinks={"out": {"plugin": "csv", "options": {}}}),
        "sinks.out.options.path",
        "required (got nothing)",
    ),
    (
        "payloads",
        minimal(audit={"payloads": "some"}),
        "audit.payloads",
        "must be 'all', 'boundaries' or 'hashes' (got 'some')",
    ),
    (
        "max in flight",
        minimal(engine={"max_in_flight": 0}),
        "engine.max_in_flight",
        "must be greater than or equal to 1 (got 0)",
    ),
    (
        "aggregations",
        minimal(aggregations=[{"name": "batch"}]),
        "aggregations",
        "not supported by elspeth-nb; remove them",
    ),
    (
        "unknown top-level key",
        minimal(transform=[]),
        "transform",
        "unknown setting; did you mean 'transforms'?",
    ),
]


@pytest.mark.parametrize(("data", "loc", "fragment"), [r[1:] for r in RULES], ids=[r[0] for r in RULES])
def test_every_rule_is_reported_at_its_location(data: dict[str, Any], loc: str, fragment: str) -> None:
    problems = problems_of(data)
    assert any(p.startswith(f"{loc}: ") and fragment in p for p in problems), problems


def test_brief_examples_word_for_word() -> None:
    assert problems_of(minimal(coalesce=[coalesce(policy="quorum")])) == [
        "coalesce[0].quorum_count: required when policy is quorum (got nothing)"
    ]
    assert problems_of(minimal(coalesce=[coalesce(quorum_count=2)])) == [
        "coalesce[0].quorum_count: only used when policy is quorum (policy is require_all) (got 2)"
    ]


def test_several_problems_are_reported_together() -> None:
    data = minimal(
        source=source("xml"),
        transforms=[transform("truncate", {"fields": {"note": 1}, "suffix": ".."}), transform("llm")],
        gates=[gate(condition="__import__('os')")],
        coalesce=[coalesce(policy="quorum")],
        sinks={"out": {"plugin": "json", "options": {"path": "o", "format": "xml"}}},
    )
    with pytest.raises(ConfigError) as info:
        config_from_mapping(data, source="pipeline.yaml")
    locations = [p.split(": ", 1)[0] for p in info.value.problems]
    assert locations == [
        "source.plugin",
        "transforms[0].options.fields",
        "transforms[1].plugin",
        "gates[0].condition",
        "coalesce[0].quorum_count",
        "sinks.out.options.format",
    ]
    assert str(info.value).startswith("6 problem(s) in pipeline.yaml:\n  - source.plugin: ")


def test_settings_must_be_a_mapping() -> None:
    assert problems_of(["source"]) == ["the settings are a list, not a mapping of settings"]


# -- what loads ------------------------------------------------------------------------------


def test_schema_accepts_mapping_form_and_parses_specs() -> None:
    schema = SchemaConfig.model_validate(
        {"mode": "flexible", "fields": [{"id": "int"}, "note: str?", "x:any"]}
    )
    assert schema.fields == ("id: int", "note: str?", "x:any")
    assert schema.field_specs() == (
        FieldSpec("id", "int", True),
        FieldSpec("note", "str", False),
        FieldSpec("x", "any", True),
    )
    assert SchemaConfig().field_specs() == ()


def test_source_options_defaults_and_schema_alias() -> None:
    config, warnings = config_from_mapping(minimal())
    options = config.source.options
    assert isinstance(options, CsvSourceOptions)
    assert (options.delimiter, options.quotechar, options.encoding) == (",", '"', "utf-8")
    assert options.on_validation_failure == "discard"
    assert options.schema == SchemaConfig(mode="observed") == options.schema_
    assert config.audit.path == "./audit" and config.audit.payloads == "all"
    assert config.engine.max_in_flight == 1024
    assert warnings == ()


def test_plugin_options_are_typed_per_plugin() -> None:
    config, _ = config_from_mapping(
        minimal(
            transforms=[
                transform("passthrough"),
                transform("latency", {"distribution": "uniform", "low_ms": 1, "high_ms": 2}, name="slow"),
                transform("python", {"function": "udf/clean.py:fix", "options": {"k": 1}}, name="py"),
                transform("python", {"function": "pkg.mod:Cleaner.run"}, name="py2"),
                transform("keyword_filter", {"fields": "all", "blocked_patterns": ["x"]}, name="kf"),
            ]
        )
    )
    names = [type(t.options).__name__ for t in config.transforms]
    assert names == [
        "PassthroughOptions",
        "LatencyOptions",
        "PythonOptions",
        "PythonOptions",
        "KeywordFilterOptions",
    ]
    assert config.transforms[0].options.schema is None
    python, keyword = config.transforms[2].options, config.transforms[4].options
    assert isinstance(python, PythonOptions) and python.options == {"k": 1}
    assert isinstance(keyword, KeywordFilterOptions) and keyword.fields == "all"


def test_coalesce_branch_list_is_an_identity_map_in_order() -> None:
    merge = CoalesceConfig.model_validate(coalesce(branches=["b", "a", "c"]))
    assert list(merge.branch_inputs.items()) == [("b", "b"), ("a", "a"), ("c", "c")]
    with pytest.raises(TypeError):
        merge.branch_inputs["a"] = "x"  # type: ignore[index]


def test_gate_compiles_its_condition() -> None:
    g = GateConfig.model_validate(gate(condition="row['s']", routes={"books": "out", "toys": "out"}))
    assert g.compiled_condition()({"s": "toys"}) == "toys"
    assert not g.compiled_condition().is_boolean


def test_config_is_frozen() -> None:
    config, _ = config_from_mapping(minimal())
    with pytest.raises(pydantic.ValidationError):
        config.audit = config.audit  # type: ignore[misc]
    assert isinstance(config, PipelineConfig)


def test_accepted_but_unused_settings_warn_once_each() -> None:
    data = minimal(
        coalesce=[coalesce(policy="first", timeout_seconds=3), coalesce(name="m2", select_branch="a")],
        checkpoint={"enabled": True},
        concurrency={"max_workers": 4},
        retry={},
        secrets={"source": "env"},
        depends_on=[],
        commencement_gates=[],
        collection_probes=[],
        aggregations=[],
        replay_from=None,
    )
    _, warnings = config_from_mapping(data)
    assert list(warnings) == [
        "checkpoint: ELSPETH-only setting, ignored (elspeth-nb does not checkpoint or resume runs)",
        "concurrency: ELSPETH-only setting, ignored "
        "(branches run concurrently; engine.max_in_flight bounds the rows in flight)",
        "secrets: ELSPETH-only setting, ignored (no secrets are resolved)",
        "coalesce[0].timeout_seconds: never used when policy is first (the first arrival merges)",
        "coalesce[1].select_branch: only used when merge is select (merge is union), ignored",
    ]


# -- files -----------------------------------------------------------------------------------


def write(tmp_path: Path, text: str, name: str = "settings.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_syntax_error_reports_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "source:\n  plugin: csv\n    on_success: raw\n", "broken.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == ["broken.yaml:3: invalid YAML: mapping values are not allowed here"]
    assert info.value.source == str(path)


def test_missing_empty_and_non_mapping_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="settings file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "# nothing\n"))
    assert info.value.problems == ["settings.yaml: the settings are empty"]
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "- a\n- b\n"))
    assert info.value.problems == ["settings.yaml:1: the settings are a list, not a mapping of settings"]


SETTINGS_WITH_PROBLEMS = """\
source:
  plugin: csv
  on_success: raw
  options:
    path: in.csv
coalesce:
  - name: merge
    branches: [a, b]
    on_success: out
  - name: merge2
    branches: [c, d]
    policy: quorum
    on_success: out
sinks:
  out:
    plugin: json
    options:
      path: out.json
      format: yaml
"""


def test_problems_in_a_file_carry_its_name_and_lines(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, SETTINGS_WITH_PROBLEMS))
    assert info.value.problems == [
        "settings.yaml:10: coalesce[1].quorum_count: required when policy is quorum (got nothing)",
        "settings.yaml:19: sinks.out.options.format: must be 'json' or 'jsonl' (got 'yaml')",
    ]


def test_duplicate_yaml_keys_are_problems(tmp_path: Path) -> None:
    text = SETTINGS_WITH_PROBLEMS.replace(
        "    on_success: out\n  - name: merge2",
        "    on_success: out\n    policy: first\n    policy: quorum\n  - name: merge2",
    )
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert info.value.problems[0] == (
        "settings.yaml:11: coalesce[0].policy: duplicate key, overrides the value at line 10"
    )


@pytest.mark.parametrize(("condition", "labels"), [
    ("row['a'] > 1", ["true", "false"]),
    ("row['answer']", ["yes", "no", "on"]),  # YAML 1.1 booleans too, as keys: each stays its own label
])
def test_unquoted_yaml_booleans_are_route_labels(tmp_path: Path, condition: str, labels: list[str]) -> None:
    routes = "".join(f"      {label}: out\n" for label in labels)
    text = f"""\
source: {{plugin: csv, on_success: raw, options: {{path: in.csv}}}}
gates:
  - name: g
    input: raw
    condition: {condition}
    routes:
{routes}sinks: {{out: {{plugin: jsonl, options: {{path: o}}}}}}
"""
    config, _ = load_config(write(tmp_path, text))
    assert config.gates[0].routes == dict.fromkeys(labels, "out")


def test_empty_sections_are_empty_lists(tmp_path: Path) -> None:
    text = (
        "source: {plugin: csv, on_success: out, options: {path: x}}\ntransforms:\ngates:\n"
        "sinks: {out: {plugin: csv, options: {path: o.csv}}}\n"
    )
    config, _ = load_config(write(tmp_path, text))
    assert config.transforms == () and config.gates == ()


MERGED_SINKS = """\
source: {plugin: csv, on_success: rows, options: {path: in.csv}}
gates:
  - {name: g, input: rows, condition: "row['name'] == 'bob'", routes: {'true': a, 'false': b}}
sinks:
  a: &s {plugin: jsonl, options: {path: out/a.jsonl}}
  b:
    <<: *s
    options: {path: out/b.jsonl}
"""

MERGED_TRANSFORMS = """\
source: {plugin: csv, on_success: raw, options: {path: in.csv}}
transforms:
  - &t {name: t1, plugin: truncate, input: raw, on_success: mid, options: {fields: {note: 8}}}
  - <<: *t
    name: t2
    input: mid
    on_success: out
sinks: {out: {plugin: jsonl, options: {path: out.jsonl}}}
"""


def test_yaml_merge_keys_are_not_duplicates_and_explicit_keys_win(tmp_path: Path) -> None:
    config, _ = load_config(write(tmp_path, MERGED_SINKS))
    assert (config.sinks["a"].options.path, config.sinks["b"].options.path) == ("out/a.jsonl", "out/b.jsonl")
    config, _ = load_config(write(tmp_path, MERGED_TRANSFORMS))
    assert [(t.name, t.input, t.on_success) for t in config.transforms] == [
        ("t1", "raw", "mid"),
        ("t2", "mid", "out"),
    ]


def test_merge_keys_do_not_hide_real_duplicates_or_locations(tmp_path: Path) -> None:
    text = MERGED_SINKS.replace("    options: {path: out/b.jsonl}", "    plugin: csv\n    plugin: xlsx")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert info.value.problems == [
        "settings.yaml:9: sinks.b.plugin: duplicate key, overrides the value at line 8",
        "settings.yaml:9: sinks.b.plugin: unknown plugin; expected one of 'csv', 'json', 'jsonl', 'parquet' "
        "(got 'xlsx')",
    ]


def test_duplicate_walk_visits_each_aliased_node_once(tmp_path: Path) -> None:
    text = "x: &x {k: 1, k: 2}\ny: [*x, *x, *x]\n" + minimal_yaml()
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert info.value.problems[0] == "settings.yaml:1: x.k: duplicate key, overrides the value at line 1"
    assert sum("duplicate key" in p for p in info.value.problems) == 1


def minimal_yaml() -> str:
    return (
        "source: {plugin: csv, on_success: out, options: {path: in.csv}}\n"
        "sinks: {out: {plugin: jsonl, options: {path: out.jsonl}}}\n"
    )


def test_deeply_nested_yaml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "source: " + "[" * 800 + "]" * 800 + "\n", "deep.yaml"))
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("deep.yaml:1: ")
    assert "nested too deeply" in info.value.problems[0]


def test_the_scanner_stops_at_the_bracket_nested_too_deeply(tmp_path: Path) -> None:
    """PyYAML scans ahead over every open bracket (quadratic time); the error must come before the bad quote."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "source: " + "[" * 900 + '"unclosed\n', "deep.yaml"))
    assert info.value.problems == [
        "deep.yaml:1: nested too deeply (more than 100 levels of lists and mappings inside one another)"
    ]


def _laughs(levels: int) -> str:
    lines = ["a0: &a0 [" + ", ".join(['"x"'] * 10) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels + 1)]
    return "\n".join([*lines, f"source: *a{levels}"]) + "\n"


@pytest.mark.parametrize("levels", [6, 8])
def test_alias_expansion_is_bounded_and_fails_fast(tmp_path: Path, levels: int) -> None:
    started = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, _laughs(levels), "laughs.yaml"))
    assert time.perf_counter() - started < 1
    assert info.value.problems == [
        "laughs.yaml:5: a4: the aliases expand to too many values (more than 100,000)"
    ]


def test_a_self_containing_alias_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "a: &a [1, *a]\nsource: *a\n", "loop.yaml"))
    assert info.value.problems == ["loop.yaml:1: a[1]: the alias *a refers to a value that contains it"]


def test_a_value_used_through_an_alias_names_the_alias_and_where_the_value_is_written(tmp_path: Path) -> None:
    text = MERGED_TRANSFORMS.replace("fields: {note: 8}", "fields: {note: -1}").replace("  - <<: *t\n",
                                                                                          "  - *t\n  - <<: *t\n")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert [p.split(".options.fields: ")[0] for p in info.value.problems] == [
        "settings.yaml:3: transforms[0]",
        "settings.yaml:3 (through *t at line 4): transforms[1]",
        "settings.yaml:3 (through *t at line 5): transforms[2]",
    ]


def test_keys_merged_through_two_levels_name_the_outer_alias(tmp_path: Path) -> None:
    text = MERGED_TRANSFORMS.replace("fields: {note: 8}", "fields: {note: -1}").replace(
        "  - <<: *t\n", "  - &u\n    <<: *t\n    name: t2\n  - <<: *u\n").replace("    name: t2\n    input: mid",
                                                                           "    name: t3\n    input: mid")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert [p.split(".options.fields: ")[0] for p in info.value.problems if ".options.fields: " in p] == [
        "settings.yaml:3: transforms[0]",
        "settings.yaml:3 (through *t at line 5): transforms[1]",
        "settings.yaml:3 (through *u at line 7): transforms[2]",
    ]


def test_keys_merged_from_a_list_of_aliases_name_the_alias_they_came_through(tmp_path: Path) -> None:
    text = ("base: &b {plugin: jsonl}\nbad: &o {options: {path: 7}}\n"
            "source: {plugin: csv, on_success: out, options: {path: in.csv}}\n"
            "sinks:\n  out:\n    <<: [*b, *o]\n")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert "settings.yaml:2 (through *o at line 6): sinks.out.options.path: " in "\n".join(info.value.problems)
    assert not any("through *b" in p for p in info.value.problems)


def latency_branch_yaml(latency_options: str, timeout_seconds: str) -> str:
    """A fork into a latency branch and a plain one, joined best_effort: the number settings under test in line 6
    (the latency options) and line 8 (the coalesce timeout)."""
    return minimal_yaml().replace("on_success: out,", "on_success: raw,") + (
        "gates:\n  - {name: g, input: raw, condition: 'True', routes: {'true': fork, 'false': out}, "
        "fork_to: [a, b]}\n"
        f"transforms:\n  - {{name: t, plugin: latency, input: a, on_success: oa, options: {latency_options}}}\n"
        "coalesce:\n  - {name: m, branches: {a: oa, b: b}, policy: best_effort, "
        f"timeout_seconds: {timeout_seconds}, on_success: out}}\n"
    )


def test_yaml_1_2_exponent_floats_are_numbers(tmp_path: Path) -> None:
    text = latency_branch_yaml("{mean_ms: 1.0e300, max_ms: 1e3, seed: 1}", "5e-2")
    config, _ = load_config(write(tmp_path, text))
    options = config.transforms[0].options
    assert isinstance(options, LatencyOptions)
    assert (options.mean_ms, options.max_ms, config.coalesce[0].timeout_seconds) == (1e300, 1000.0, 0.05)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text.replace("timeout_seconds: 5e-2", "timeout_seconds: 5e400")))
    assert info.value.problems == [
        "settings.yaml:8: coalesce[0].timeout_seconds: must be a finite number (got '5e400')"]


@pytest.mark.parametrize("text", ["5e-2", "1e3", "-2E+5", "+1.5e10", ".5e1", "1e300"])
def test_the_settings_loader_reads_exponent_text_as_text(tmp_path: Path, text: str) -> None:
    """Only a number setting turns it into a number (see the test above); a name or a path stays as written."""
    data, _ = read_settings(write(tmp_path, f"a: {text}\n"))
    assert data == {"a": text}


@pytest.mark.parametrize("text", ["5e-2", "1e3", "1E3", "1e300"])
def test_a_connection_named_like_an_exponent_number_loads(tmp_path: Path, text: str) -> None:
    settings = minimal_yaml().replace("on_success: out,", f"on_success: '{text}',") + (
        f"transforms:\n  - {{name: t, plugin: passthrough, input: {text}, on_success: out}}\n")
    config, _ = load_config(write(tmp_path, settings))
    assert config.transforms[0].input == text


def test_infinite_numbers_are_refused_at_their_key(tmp_path: Path) -> None:
    text = latency_branch_yaml("{mean_ms: .inf}", ".inf")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert info.value.problems == [
        "settings.yaml:6: transforms[0].options.mean_ms: must be a finite number (got inf)",
        "settings.yaml:8: coalesce[0].timeout_seconds: must be a finite number (got inf)",
    ]


def test_infinite_numbers_in_free_form_options_are_refused_at_their_key(tmp_path: Path) -> None:
    """A python transform's options are passed as written; a NaN or infinity deep in them is named where it is."""
    (tmp_path / "fn.py").write_text("def f(row, options):\n    return row\n")
    text = minimal_yaml().replace("on_success: out,", "on_success: raw,") + (
        "transforms:\n  - {name: t, plugin: python, input: raw, on_success: out, "
        "options: {function: 'fn.py:f', options: {limits: {low: 1, bands: [0.5, .inf]}}}}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_pipeline(write(tmp_path, text))
    assert info.value.problems == ["settings.yaml:4: transforms[0].options.options.limits.bands[1]: must be a finite "
                                   "number (got inf)"]


def test_non_ascii_names_are_refused_as_not_ascii_once(tmp_path: Path) -> None:
    text = minimal_yaml().replace("on_success: out,", "on_success: raw,") + (
        "gates:\n  - {name: g, input: raw, condition: 'True', routes: {'true': fork, 'false': out}, "
        "fork_to: [ä, b]}\n"
        "coalesce:\n  - {name: m, branches: [ä, b], on_success: out}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    rule = "must start with an ASCII letter, digit or '_' and contain only ASCII letters, digits, '_' and '-'"
    assert info.value.problems == [
        f"settings.yaml:4: gates[0].fork_to[0]: {rule} (got 'ä')",
        f"settings.yaml:6: coalesce[0].branches[0]: {rule} (got 'ä')",
    ]


def test_a_sink_cannot_be_called_source(tmp_path: Path) -> None:
    text = (
        "source: {plugin: csv, on_success: source, options: {path: in.csv}}\n"
        "sinks:\n  source: {plugin: jsonl, options: {path: out.jsonl}}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert info.value.problems == [
        "settings.yaml:3: sinks.source: 'source' is the name of the source node; it cannot name a sink "
        "(got 'source')"
    ]


def test_a_name_ending_in_a_newline_is_refused() -> None:
    """``$`` matches before a final newline; ``name: |`` gives ``"t\\n"``, which would end up in a node id."""
    assert problems_of(minimal(transforms=[transform("passthrough", name="t\n", input="out")])) == [
        "transforms[0].name: must start with an ASCII letter and contain only ASCII letters, digits, '_' and '-' "
        "(got 't\\n')"
    ]
    assert problems_of(minimal(sinks={"out\n": {"plugin": "jsonl", "options": {"path": "o.jsonl"}}}))[0] == (
        "sinks['out\\n']: must start with an ASCII letter, digit or '_' and contain only ASCII letters, digits, "
        "'_' and '-' (got 'out\\n')"
    )


def test_yes_and_no_values_stay_booleans(tmp_path: Path) -> None:
    data, _ = read_settings(write(tmp_path, "python_option: {drop_id: no, keep: on}\nyes: 1\n"))
    assert data == {"python_option": {"drop_id": False, "keep": True}, "yes": 1}  # as ELSPETH's YAML 1.1 reads them


def test_an_unknown_option_is_matched_against_its_own_plugins_options_only(tmp_path: Path) -> None:
    text = """\
source: {plugin: csv, on_success: raw, options: {path: in.csv, schema: {mdoe: fixed}}}
transforms:
  - {name: t, plugin: truncate, input: raw, on_success: out, options: {fields: {note: 8}, strict: true, sufix: "."}}
sinks: {out: {plugin: jsonl, options: {path: out.jsonl, formatt: x}}}
"""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert info.value.problems == [  # field_mapper's 'strict' and the json sink's 'format' are no hints here
        "settings.yaml:1: source.options.schema.mdoe: unknown setting; did you mean 'mode'? (got 'fixed')",
        "settings.yaml:3: transforms[0].options.strict: unknown setting (got true)",
        "settings.yaml:3: transforms[0].options.sufix: unknown setting; did you mean 'suffix'? (got '.')",
        "settings.yaml:4: sinks.out.options.formatt: unknown setting (got 'x')",
    ]

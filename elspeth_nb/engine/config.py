"""Pipeline settings: frozen pydantic models for ELSPETH's ``settings.yaml`` subset, and loading.

An ELSPETH settings file that only uses the plugins below loads unchanged. ELSPETH-only keys
(``landscape``, ``payload_store``, ...) are accepted and reported once each as a warning.
Every problem in a file is reported together in one :class:`~elspeth_nb.errors.ConfigError`,
one line per problem: ``settings.yaml:42: coalesce[0].quorum_count: required when policy is
quorum (got nothing)``.

Plugin options are discriminated by the ``plugin`` key: ``SourceConfig``, ``TransformConfig``
and ``SinkConfig`` are base classes, and each plugin has a subclass whose ``options`` model is
that plugin's (``TruncateTransform.options`` is a ``TruncateOptions``).
"""

from __future__ import annotations

import codecs
import difflib
import functools
import json
import re
import typing
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from elspeth_nb.engine.expressions import Condition, compile_condition
from elspeth_nb.errors import ConfigError

Loc = tuple[str | int, ...]

RESERVED_LABELS = frozenset({"continue", "fork", "on_success"})
MAX_NODE_NAME_LENGTH = 38
MAX_CONNECTION_NAME_LENGTH = 64
FIELD_TYPES = ("int", "float", "str", "bool", "any")
_NODE_NAME_RE = re.compile(r"[a-zA-Z][a-zA-Z0-9_-]*")
_CONNECTION_NAME_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9_-]*")
_CALLABLE = r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*"
_FUNCTION_RE = re.compile(rf"^({_CALLABLE}|[^:\s][^:]*\.py):{_CALLABLE}$")

# -- names ----------------------------------------------------------------------------------


def _not_reserved(value: str) -> str:
    """Edge labels the engine uses itself (and ``__`` names) cannot be user names."""
    if value in RESERVED_LABELS:
        raise ValueError(f"{value!r} is reserved (reserved: {', '.join(sorted(RESERVED_LABELS))})")
    if value.startswith("__"):
        raise ValueError("names starting with '__' are reserved for system edges")
    return value


def _node_name(value: str) -> str:
    """A transform, gate or coalesce name: it becomes part of a node id of at most 64 characters."""
    if len(value) > MAX_NODE_NAME_LENGTH:
        raise ValueError(f"must be at most {MAX_NODE_NAME_LENGTH} characters (it has {len(value)})")
    if not _NODE_NAME_RE.fullmatch(value):
        raise ValueError("must start with an ASCII letter and contain only ASCII letters, digits, '_' and '-'")
    return _not_reserved(value)


def _connection_name(value: str) -> str:
    """A connection, route label, fork branch or sink name."""
    if len(value) > MAX_CONNECTION_NAME_LENGTH:
        raise ValueError(f"must be at most {MAX_CONNECTION_NAME_LENGTH} characters (it has {len(value)})")
    if not _CONNECTION_NAME_RE.fullmatch(value):
        raise ValueError(
            "must start with an ASCII letter, digit or '_' and contain only ASCII letters, digits, '_' and '-'"
        )
    return _not_reserved(value)


def _sink_name(value: str) -> str:
    """A sink name; ``discard`` is taken by on_error / on_validation_failure, ``source`` by the source node."""
    if value == "source":
        raise ValueError("'source' is the name of the source node; it cannot name a sink")
    if value == "discard":
        raise ValueError(
            "'discard' is reserved: it means 'drop the row' in on_error and on_validation_failure"
        )
    return _connection_name(value)


def _sink_or_discard(value: str) -> str:
    """``discard`` or something shaped like a sink name (the graph checks the sink exists)."""
    return value if value == "discard" else _connection_name(value)


def _route_destination(value: str) -> str:
    """``fork`` or a sink/connection name."""
    return value if value == "fork" else _connection_name(value)


def _encoding(value: str) -> str:
    """A text encoding Python knows, checked now rather than when the file is opened."""
    try:
        codecs.lookup(value)
    except LookupError:
        raise ValueError(f"unknown text encoding {value!r}") from None
    return value


def _regex(value: str) -> str:
    """A regular expression that compiles, checked now rather than on the first row."""
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {value!r}: {exc}") from None
    return value


NodeName = Annotated[str, AfterValidator(_node_name)]
ConnectionName = Annotated[str, AfterValidator(_connection_name)]
SinkName = Annotated[str, AfterValidator(_sink_name)]
SinkOrDiscard = Annotated[str, AfterValidator(_sink_or_discard)]
RouteDestination = Annotated[str, AfterValidator(_route_destination)]
Encoding = Annotated[str, AfterValidator(_encoding)]
Regex = Annotated[str, AfterValidator(_regex)]
def _file_path(value: str) -> str:
    if not value.strip():
        raise ValueError("must name a file (it is blank)")
    return value


NonEmpty = Annotated[str, Field(min_length=1)]
#: A file path: not empty and not blank (``' '`` would be a file named by a space, beside the settings).
FilePath = Annotated[str, Field(min_length=1), AfterValidator(_file_path)]
OneChar = Annotated[str, Field(min_length=1, max_length=1)]
#: Numbers that refuse YAML booleans (``quorum_count: true`` is a mistake, not 1); floats must be finite
#: (``.inf`` and ``.nan`` cannot be hashed into a node id, and are refused at their key).
Whole = Annotated[int, Strict()]
#: YAML 1.2 floats with an exponent that YAML 1.1 reads as text: ``5e-2``, ``1e3``, ``-2E+5``, ``1.0e300``.
_EXPONENT_FLOAT = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+")


def _exponent_number(value: Any) -> Any:
    """A number setting written ``5e-2`` is that number: PyYAML reads it as text, and only a number setting
    can tell (the same text as a name or a path stays text)."""
    if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value):
        return float(value)
    return value


Number = Annotated[float, BeforeValidator(_exponent_number), Strict(), AllowInfNan(False)]


class _Model(BaseModel):
    """Frozen, and unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def _only_when(value: Any, wanted: bool, condition: str, actual: str) -> Any:
    """``value`` is required when ``condition`` holds (``wanted``) and an error otherwise."""
    if wanted and value is None:
        raise ValueError(f"required when {condition}")
    if not wanted and value is not None:
        raise ValueError(f"only used when {condition} ({actual})")
    return value


# -- schema ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldSpec:
    """One declared field of a schema: ``'amount: int?'`` is ``FieldSpec('amount', 'int', False)``."""

    name: str
    type: str
    required: bool


def parse_field_spec(spec: str) -> FieldSpec:
    """Parse ELSPETH's ``"name: type"`` form; a trailing ``?`` makes the field optional."""
    name, sep, type_text = spec.partition(":")
    name, type_text = name.strip(), type_text.strip()
    required = not type_text.endswith("?")
    type_name = type_text.removesuffix("?").strip()
    if not sep or not name:
        raise ValueError(f"{spec!r} is not of the form 'name: type'")
    if type_name not in FIELD_TYPES:
        raise ValueError(
            f"unknown type {type_name!r} in {spec!r}; types: {', '.join(FIELD_TYPES)} (add '?' for optional)"
        )
    return FieldSpec(name, type_name, required)


def _field_spec_text(spec: str) -> str:
    """Check one ``"name: type"`` entry, keeping the text as written (it is hashed into node ids)."""
    parse_field_spec(spec)
    return spec


class SchemaConfig(_Model):
    """ELSPETH's schema block: a mode and, for fixed/flexible, the declared fields."""

    mode: Literal["fixed", "flexible", "observed", "parse"] = "observed"
    fields: tuple[Annotated[str, AfterValidator(_field_spec_text)], ...] | None = Field(
        None, validate_default=True
    )

    @field_validator("fields", mode="before")
    @classmethod
    def _mapping_form(cls, value: Any) -> Any:
        """Accept YAML's ``- id: int`` (a one-key mapping) as ``'id: int'``, as ELSPETH does."""
        if isinstance(value, list | tuple):
            return [_one_key_mapping_to_text(item) for item in value]
        return value

    @field_validator("fields")
    @classmethod
    def _fields_rules(cls, value: tuple[str, ...] | None, info: ValidationInfo) -> tuple[str, ...] | None:
        """Fixed and flexible schemas declare their fields; names are unique."""
        mode = info.data.get("mode")
        if mode in ("fixed", "flexible") and not value:
            raise ValueError(f"required when mode is {mode}")
        names = [parse_field_spec(spec).name for spec in value or ()]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate field names: {', '.join(duplicates)}")
        return value

    def field_specs(self) -> tuple[FieldSpec, ...]:
        """The declared fields, parsed (empty when none are declared)."""
        return tuple(parse_field_spec(spec) for spec in self.fields or ())


def _one_key_mapping_to_text(item: Any) -> Any:
    """``{"id": "int"}`` -> ``"id: int"``; anything else unchanged for the type check to report."""
    if isinstance(item, Mapping) and len(item) == 1:
        ((name, type_name),) = item.items()
        return f"{name}: {type_name}"
    return item


# Pydantic warns that a field named ``schema`` shadows the deprecated ``BaseModel.schema()``;
# ELSPETH's key is ``schema``, and the field value is what ``options.schema`` returns.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "schema"', category=UserWarning)

    class PluginOptions(_Model):
        """Options every transform and sink plugin accepts (ELSPETH puts ``schema`` everywhere)."""

        schema: SchemaConfig | None = None  # type: ignore[assignment]

        @property
        def schema_(self) -> SchemaConfig | None:
            """``schema`` under a name that cannot be confused with pydantic's ``BaseModel.schema()``."""
            return self.schema

    class SourceOptions(_Model):
        """Options of every source plugin."""

        path: FilePath
        schema: SchemaConfig = SchemaConfig()  # type: ignore[assignment]
        on_validation_failure: SinkOrDiscard = "discard"

        @property
        def schema_(self) -> SchemaConfig:
            """``schema`` under a name that cannot be confused with pydantic's ``BaseModel.schema()``."""
            return self.schema


# -- source ---------------------------------------------------------------------------------


class CsvSourceOptions(SourceOptions):
    """Options of the ``csv`` source."""

    delimiter: OneChar = ","
    quotechar: OneChar = '"'
    encoding: Encoding = "utf-8"


class JsonlSourceOptions(SourceOptions):
    """Options of the ``jsonl`` source."""

    encoding: Encoding = "utf-8"


class ParquetSourceOptions(SourceOptions):
    """Options of the ``parquet`` source."""


class SourceConfig(_Model):
    """The ``source`` block; one subclass per plugin."""

    plugin: str
    on_success: ConnectionName
    options: SourceOptions


class CsvSource(SourceConfig):
    """``plugin: csv``."""

    plugin: Literal["csv"]
    options: CsvSourceOptions


class JsonlSource(SourceConfig):
    """``plugin: jsonl``."""

    plugin: Literal["jsonl"]
    options: JsonlSourceOptions


class ParquetSource(SourceConfig):
    """``plugin: parquet``."""

    plugin: Literal["parquet"]
    options: ParquetSourceOptions


AnySource = Annotated[CsvSource | JsonlSource | ParquetSource, Field(discriminator="plugin")]

# -- transforms -----------------------------------------------------------------------------


class PassthroughOptions(PluginOptions):
    """``passthrough`` has no options of its own."""


class FieldMapperOptions(PluginOptions):
    """``field_mapper``: rename fields (source field -> output field)."""

    mapping: dict[str, str]
    select_only: bool = False
    strict: bool = False

    @field_validator("mapping")
    @classmethod
    def _distinct_targets(cls, mapping: dict[str, str]) -> dict[str, str]:
        """Two fields mapped to one output field would silently overwrite each other."""
        targets = list(mapping.values())
        clashes = sorted({t for t in targets if targets.count(t) > 1})
        if clashes:
            raise ValueError(f"several fields map to the same output field: {', '.join(clashes)}")
        return mapping


class TruncateOptions(PluginOptions):
    """``truncate``: cut fields to a maximum length that includes the suffix."""

    suffix: str = ""
    fields: dict[str, Whole]

    @field_validator("fields")
    @classmethod
    def _room_for_suffix(cls, fields: dict[str, int], info: ValidationInfo) -> dict[str, int]:
        """A length includes the suffix, so it must leave room for at least one character."""
        if not fields:
            raise ValueError("at least one field is required")
        suffix = info.data.get("suffix", "")
        too_short = [f"{name}: {n}" for name, n in fields.items() if n <= len(suffix)]
        if too_short:
            raise ValueError(
                f"each length must be greater than len(suffix) = {len(suffix)}; "
                f"too short: {', '.join(too_short)}"
            )
        return fields


class KeywordFilterOptions(PluginOptions):
    """``keyword_filter``: drop rows whose fields match a blocked pattern."""

    fields: tuple[str, ...] | Literal["all"]
    blocked_patterns: tuple[Regex, ...]

    @field_validator("fields", mode="before")
    @classmethod
    def _fields(cls, value: Any) -> Any:
        """Check the union up front, so a bad value gives one clear message."""
        if value == "all" or (
            isinstance(value, list | tuple) and value and all(isinstance(v, str) and v for v in value)
        ):
            return value
        raise ValueError("must be 'all' or a non-empty list of field names")

    @field_validator("blocked_patterns")
    @classmethod
    def _some_pattern(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        """A filter without patterns would pass everything."""
        if not patterns:
            raise ValueError("at least one pattern is required")
        return patterns


class LatencyOptions(PluginOptions):
    """``latency``: a simulated external call with a seeded delay distribution and failure rate."""

    distribution: Literal["fixed", "uniform", "exponential", "lognormal"] = "fixed"
    mean_ms: Number = Field(0.0, ge=0)
    low_ms: Number | None = Field(None, ge=0, validate_default=True)
    high_ms: Number | None = Field(None, ge=0, validate_default=True)
    sigma: Number = Field(0.5, gt=0)
    max_ms: Number | None = Field(None, ge=0)
    failure_rate: Number = Field(0.0, ge=0, le=1)
    seed: Whole = 0

    @field_validator("low_ms", "high_ms")
    @classmethod
    def _uniform_bounds(cls, value: float | None, info: ValidationInfo) -> float | None:
        """low_ms/high_ms belong to the uniform distribution, with low <= high."""
        distribution = info.data.get("distribution")
        if distribution is None:
            return value
        uniform = distribution == "uniform"
        _only_when(value, uniform, "distribution is uniform", f"distribution is {distribution}")
        low = info.data.get("low_ms")
        if info.field_name == "high_ms" and value is not None and low is not None and value < low:
            raise ValueError(f"must be >= low_ms ({low:g})")
        return value


class PythonOptions(PluginOptions):
    """``python``: call a user function ``module:function`` or ``path/file.py:function``."""

    function: str
    options: dict[str, Any] = {}

    @field_validator("function")
    @classmethod
    def _function_shape(cls, value: str) -> str:
        """Check the shape only; the function is imported when the pipeline runs."""
        if not _FUNCTION_RE.fullmatch(value):
            raise ValueError("must be 'package.module:function' or 'relative/path.py:function'")
        return value


class TransformConfig(_Model):
    """A ``transforms[]`` entry; one subclass per plugin."""

    name: NodeName
    plugin: str
    input: ConnectionName
    on_success: ConnectionName | None = None
    on_error: SinkOrDiscard | None = None
    options: PluginOptions = PluginOptions()


class PassthroughTransform(TransformConfig):
    """``plugin: passthrough``."""

    plugin: Literal["passthrough"]
    options: PassthroughOptions = PassthroughOptions()


class FieldMapperTransform(TransformConfig):
    """``plugin: field_mapper``."""

    plugin: Literal["field_mapper"]
    options: FieldMapperOptions


class TruncateTransform(TransformConfig):
    """``plugin: truncate``."""

    plugin: Literal["truncate"]
    options: TruncateOptions


class KeywordFilterTransform(TransformConfig):
    """``plugin: keyword_filter``."""

    plugin: Literal["keyword_filter"]
    options: KeywordFilterOptions


class LatencyTransform(TransformConfig):
    """``plugin: latency``."""

    plugin: Literal["latency"]
    options: LatencyOptions = LatencyOptions()


class PythonTransform(TransformConfig):
    """``plugin: python``."""

    plugin: Literal["python"]
    options: PythonOptions


AnyTransform = Annotated[
    PassthroughTransform
    | FieldMapperTransform
    | TruncateTransform
    | KeywordFilterTransform
    | LatencyTransform
    | PythonTransform,
    Field(discriminator="plugin"),
]

# -- gates and coalesces --------------------------------------------------------------------


@functools.lru_cache(maxsize=512)
def _compiled(text: str) -> Condition:
    """Compile a condition once per text."""
    return compile_condition(text)


class GateConfig(_Model):
    """A ``gates[]`` entry: a condition whose value picks a route (or forks the row)."""

    name: NodeName
    input: ConnectionName
    condition: str
    routes: dict[ConnectionName, RouteDestination]
    fork_to: tuple[ConnectionName, ...] | None = Field(None, validate_default=True)

    @field_validator("condition")
    @classmethod
    def _safe_condition(cls, text: str) -> str:
        """The condition must compile under the safe grammar; every problem is listed."""
        try:
            compile_condition(text, where="")
        except ConfigError as exc:
            raise ValueError("; ".join(exc.problems)) from None
        return text

    @field_validator("routes", mode="before")
    @classmethod
    def _yaml_boolean_labels(cls, routes: Any) -> Any:
        """YAML reads an unquoted ``true:`` label as a boolean; it means the label ``'true'``."""
        if isinstance(routes, Mapping):
            return {(str(k).lower() if isinstance(k, bool) else k): v for k, v in routes.items()}
        return routes

    @field_validator("routes")
    @classmethod
    def _boolean_labels(cls, routes: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        """A boolean condition yields True/False, so its labels are exactly 'true' and 'false'."""
        if not routes:
            raise ValueError("at least one route is required")
        condition = info.data.get("condition")
        if condition is not None and _compiled(condition).is_boolean and set(routes) != {"true", "false"}:
            raise ValueError(
                "the condition is boolean, so the route labels must be exactly 'true' and 'false'"
            )
        return routes

    @field_validator("fork_to")
    @classmethod
    def _fork_rules(cls, fork_to: tuple[str, ...] | None, info: ValidationInfo) -> tuple[str, ...] | None:
        """fork_to is given exactly when a route is 'fork', without duplicate branches."""
        routes = info.data.get("routes")
        if routes is None:
            return fork_to
        forks = "fork" in routes.values()
        if forks and not fork_to:
            raise ValueError("required when a route is 'fork'")
        if fork_to is not None and not forks:
            raise ValueError("only used when a route is 'fork' (no route is)")
        branches = fork_to or ()
        duplicates = sorted({b for b in branches if branches.count(b) > 1})
        if duplicates:
            raise ValueError(f"duplicate branch names: {', '.join(duplicates)}")
        return fork_to

    def compiled_condition(self) -> Condition:
        """The condition compiled for evaluation (cached per text)."""
        return _compiled(self.condition)


class CoalesceConfig(_Model):
    """A ``coalesce[]`` entry: a barrier that merges the branches of one fork."""

    name: NodeName
    branches: dict[ConnectionName, ConnectionName]
    policy: Literal["require_all", "quorum", "best_effort", "first"] = "require_all"
    merge: Literal["union", "nested", "select"] = "union"
    timeout_seconds: Number | None = Field(None, gt=0, validate_default=True)
    quorum_count: Whole | None = Field(None, gt=0, validate_default=True)
    select_branch: str | None = Field(None, validate_default=True)
    on_success: ConnectionName | None = None

    @field_validator("branches", mode="before")
    @classmethod
    def _list_form(cls, branches: Any) -> Any:
        """``[a, b]`` means ``{a: a, b: b}``: each branch arrives on the connection of its name."""
        if not isinstance(branches, list | tuple):
            return branches
        duplicates = sorted({str(b) for b in branches if branches.count(b) > 1})
        if duplicates:
            raise ValueError(f"duplicate branch names: {', '.join(duplicates)}")
        return {b: b for b in branches}

    @field_validator("branches")
    @classmethod
    def _at_least_two(cls, branches: dict[str, str]) -> dict[str, str]:
        """Merging fewer than two branches is not a merge."""
        if len(branches) < 2:
            raise ValueError(f"a coalesce needs at least 2 branches (it has {len(branches)})")
        return branches

    @field_validator("timeout_seconds")
    @classmethod
    def _timeout(cls, value: float | None, info: ValidationInfo) -> float | None:
        """best_effort needs a timeout to know when to stop waiting."""
        if value is None and info.data.get("policy") == "best_effort":
            raise ValueError("required when policy is best_effort")
        return value

    @field_validator("quorum_count")
    @classmethod
    def _quorum(cls, value: int | None, info: ValidationInfo) -> int | None:
        """quorum_count belongs to the quorum policy and cannot exceed the branches."""
        policy, branches = info.data.get("policy"), info.data.get("branches")
        if policy is not None:
            _only_when(value, policy == "quorum", "policy is quorum", f"policy is {policy}")
        if value is not None and branches is not None and value > len(branches):
            raise ValueError(f"cannot exceed the number of branches ({len(branches)})")
        return value

    @field_validator("select_branch")
    @classmethod
    def _select(cls, value: str | None, info: ValidationInfo) -> str | None:
        """select merges one named branch, which must be one of the branches."""
        merge, branches = info.data.get("merge"), info.data.get("branches")
        if value is None and merge == "select":
            raise ValueError("required when merge is select")
        if value is not None and branches is not None and value not in branches:
            raise ValueError(f"must be one of the branches: {', '.join(branches)}")
        return value

    @property
    def branch_inputs(self) -> Mapping[str, str]:
        """Branch name -> the connection its rows arrive on, in configured order."""
        return MappingProxyType(self.branches)


# -- sinks ----------------------------------------------------------------------------------


class SinkOptions(PluginOptions):
    """Options of every sink plugin."""

    path: FilePath


class CsvSinkOptions(SinkOptions):
    """Options of the ``csv`` sink."""

    delimiter: OneChar = ","


class JsonSinkOptions(SinkOptions):
    """Options of the ``json`` sink: a JSON array, or JSON lines with ``format: jsonl``."""

    format: Literal["json", "jsonl"] = "json"


class SinkConfig(_Model):
    """A ``sinks{}`` entry; one subclass per plugin."""

    plugin: str
    options: SinkOptions
    on_write_failure: str | None = None


class CsvSink(SinkConfig):
    """``plugin: csv``."""

    plugin: Literal["csv"]
    options: CsvSinkOptions


class JsonSink(SinkConfig):
    """``plugin: json``."""

    plugin: Literal["json"]
    options: JsonSinkOptions


class JsonlSink(SinkConfig):
    """``plugin: jsonl``."""

    plugin: Literal["jsonl"]


class ParquetSink(SinkConfig):
    """``plugin: parquet``."""

    plugin: Literal["parquet"]


AnySink = Annotated[CsvSink | JsonSink | JsonlSink | ParquetSink, Field(discriminator="plugin")]

# -- the pipeline ---------------------------------------------------------------------------


class AuditConfig(_Model):
    """Where the audit trail goes and how much row data it keeps."""

    path: FilePath = "./audit"
    payloads: Literal["all", "boundaries", "hashes"] = "all"


class EngineConfig(_Model):
    """Engine limits."""

    max_in_flight: Whole = Field(1024, ge=1)


ELSPETH_ONLY_SETTINGS: Mapping[str, str] = MappingProxyType(
    {
        "landscape": "elspeth-nb writes its audit trail to audit.path",
        "payload_store": "row payloads are kept in the audit store; see audit.payloads",
        "checkpoint": "elspeth-nb does not checkpoint or resume runs",
        "concurrency": "branches run concurrently; engine.max_in_flight bounds the rows in flight",
        "retry": "failed rows are not retried",
        "rate_limit": "no calls are rate-limited",
        "telemetry": "no telemetry is emitted; the audit store is the record",
        "run_mode": "runs are always live",
        "replay_from": "runs are always live",
        "secrets": "no secrets are resolved",
        "depends_on": "no pre-flight dependencies are run",
        "commencement_gates": "no pre-flight gates are checked",
        "collection_probes": "no pre-flight probes are run",
    }
)


class PipelineConfig(_Model):
    """A whole settings file."""

    source: AnySource
    transforms: tuple[AnyTransform, ...] = ()
    gates: tuple[GateConfig, ...] = ()
    coalesce: tuple[CoalesceConfig, ...] = ()
    sinks: dict[SinkName, AnySink]
    audit: AuditConfig = AuditConfig()
    engine: EngineConfig = EngineConfig()
    landscape: Any = None
    payload_store: Any = None
    checkpoint: Any = None
    concurrency: Any = None
    retry: Any = None
    rate_limit: Any = None
    telemetry: Any = None
    run_mode: Any = None
    replay_from: Any = None
    secrets: Any = None
    depends_on: Any = None
    commencement_gates: Any = None
    collection_probes: Any = None
    aggregations: tuple[Any, ...] = ()

    @field_validator("transforms", "gates", "coalesce", "aggregations", mode="before")
    @classmethod
    def _empty_section(cls, value: Any) -> Any:
        """A key with no value (``transforms:``) is an empty list."""
        return () if value is None else value

    @field_validator("sinks")
    @classmethod
    def _some_sink(cls, sinks: dict[str, SinkConfig]) -> dict[str, SinkConfig]:
        """Rows must end somewhere."""
        if not sinks:
            raise ValueError("at least one sink is required")
        return sinks

    @field_validator("aggregations")
    @classmethod
    def _no_aggregations(cls, aggregations: tuple[Any, ...]) -> tuple[Any, ...]:
        """ELSPETH aggregations have no equivalent here; an empty list is fine."""
        if aggregations:
            raise ValueError("not supported by elspeth-nb; remove them")
        return aggregations


def collect_warnings(config: PipelineConfig, locator: Locator | None = None) -> tuple[str, ...]:
    """Settings that are accepted but have no effect, one line each."""
    found: list[tuple[Loc, str]] = [
        ((key,), f"ELSPETH-only setting, ignored ({reason})")
        for key, reason in ELSPETH_ONLY_SETTINGS.items()
        if getattr(config, key) not in (None, (), [], {})
    ]
    for name, sink in config.sinks.items():
        if sink.on_write_failure is not None:
            found.append(
                (
                    ("sinks", name, "on_write_failure"),
                    "accepted for ELSPETH compatibility, not applied (a row the sink cannot write fails its token, "
                    "recorded with the sink's error, and the run goes on; a sink that breaks fails the run)",
                )
            )
    for i, c in enumerate(config.coalesce):
        if c.policy == "first" and c.timeout_seconds is not None:
            found.append(
                (
                    ("coalesce", i, "timeout_seconds"),
                    "never used when policy is first (the first arrival merges)",
                )
            )
        if c.merge != "select" and c.select_branch is not None:
            found.append(
                (
                    ("coalesce", i, "select_branch"),
                    f"only used when merge is select (merge is {c.merge}), ignored",
                )
            )
    return tuple(format_problem(loc, message, locator=locator) for loc, message in found)


# -- loading --------------------------------------------------------------------------------

_MERGE_TAG = "tag:yaml.org,2002:merge"
_BOOL_TAG, _STR_TAG = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:str"
#: Lists and mappings inside one another; settings need about 8, and PyYAML recurses once per level.
MAX_NESTING_DEPTH = 100
#: Values (keys included) once every alias is expanded; ten lines of nested aliases can make billions.
MAX_EXPANDED_NODES = 100_000


class _TooDeep(Exception):
    """Raised by the loader at the first node nested deeper than MAX_NESTING_DEPTH."""

    def __init__(self, mark: Any) -> None:
        super().__init__(mark)
        self.mark = mark


class _SettingsLoader(yaml.SafeLoader):  # type: ignore[misc]
    """PyYAML's safe loader, refusing nesting deeper than MAX_NESTING_DEPTH before its recursion overflows."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0
        self.anchor_names: dict[int, str] = {}  # id(node) -> its anchor, to name aliases in messages
        #: (id(parent), id(key) or item index) -> (anchor, line) of each alias, to name where a value was used
        self.alias_uses: dict[tuple[int, int], tuple[str, int]] = {}

    def fetch_flow_collection_start(self, token_class: Any) -> None:
        """Stop at the bracket that nests too deeply: the scanner looks ahead over every open one."""
        if self.flow_level >= MAX_NESTING_DEPTH:
            raise _TooDeep(self.get_mark())
        super().fetch_flow_collection_start(token_class)

    def compose_node(self, parent: Any, index: Any) -> Any:
        """Compose one node, counting how deep it is and remembering its anchor."""
        self.depth += 1
        try:
            event = self.peek_event()
            if self.depth > MAX_NESTING_DEPTH:
                raise _TooDeep(event.start_mark)
            node = super().compose_node(parent, index)
            if isinstance(parent, yaml.MappingNode) and index is None and node.tag == _BOOL_TAG \
                    and node.value.lower() not in ("true", "false"):
                node.tag = _STR_TAG  # a key such as a route label `yes:` is the text, not a YAML 1.1 boolean
            if isinstance(event, yaml.AliasEvent):
                if parent is not None and index is not None:
                    slot = id(index) if isinstance(index, yaml.Node) else index
                    self.alias_uses[(id(parent), slot)] = (event.anchor, event.start_mark.line + 1)
            elif event.anchor is not None:
                self.anchor_names[id(node)] = event.anchor
            return node
        finally:
            self.depth -= 1



def _children(node: yaml.Node) -> list[tuple[str | int, int, yaml.Node]]:
    """(path part, line, node) of each key and value of a mapping node, or of each item of a sequence node."""
    if isinstance(node, yaml.MappingNode):
        return [
            (str(key.value) if isinstance(key, yaml.ScalarNode) else "", key.start_mark.line + 1, child)
            for key, value in node.value
            for child in (key, value)
        ]
    if isinstance(node, yaml.SequenceNode):
        return [(i, item.start_mark.line + 1, item) for i, item in enumerate(node.value)]
    return []


@dataclass
class _Frame:
    """One node being sized: its children, the next one to look at, and the size so far."""

    node: yaml.Node
    children: list[tuple[str | int, int, yaml.Node]]
    next: int = 0
    size: int = 1


def _expanded_sizes(root: yaml.Node) -> tuple[dict[int, int], set[tuple[int, int]]]:
    """Each node's value count with aliases expanded (capped past the limit), and the (node, child index) of
    each alias to a node that contains it. Each node is sized once, however many aliases reach it."""
    sizes: dict[int, int] = {}
    loops: set[tuple[int, int]] = set()
    frames = [_Frame(root, _children(root))]
    on_path = {id(root)}
    while frames:
        frame = frames[-1]
        if frame.next == len(frame.children):
            frames.pop()
            on_path.discard(id(frame.node))
            sizes[id(frame.node)] = min(frame.size, MAX_EXPANDED_NODES + 1)
            if frames:
                frames[-1].size += sizes[id(frame.node)]
            continue
        child = frame.children[frame.next][2]
        frame.next += 1
        if id(child) in on_path:
            loops.add((id(frame.node), frame.next - 1))
            frame.size += MAX_EXPANDED_NODES + 1
        elif id(child) in sizes:
            frame.size += sizes[id(child)]
        else:
            on_path.add(id(child))
            frames.append(_Frame(child, _children(child)))
    return sizes, loops


def _expansion_problem(root: yaml.Node, anchor_names: Mapping[int, str]) -> tuple[Loc, int, str] | None:
    """(location, line, message) of an alias that expands to too many values or to a value containing
    itself: the innermost value that is too large alone, or the looping alias; None when the file is fine."""
    sizes, loops = _expanded_sizes(root)
    if sizes[id(root)] <= MAX_EXPANDED_NODES:
        return None
    node, line = root, root.start_mark.line + 1
    loc: Loc = ()
    while True:
        for i, (part, child_line, child) in enumerate(_children(node)):
            if (id(node), i) in loops:
                name = anchor_names.get(id(child), "")
                return (*loc, part), child_line, f"the alias *{name} refers to a value that contains it"
            if sizes[id(child)] > MAX_EXPANDED_NODES:
                node, loc, line = child, (*loc, part), child_line
                break
        else:
            return loc, line, f"the aliases expand to too many values (more than {MAX_EXPANDED_NODES:,})"


@dataclass(frozen=True)
class Locator:
    """Finds the line of a location path (``('coalesce', 0, 'policy')``) in a YAML settings file."""

    filename: str
    root: yaml.Node | None = None
    #: (location, line, first line) of each key given twice, found before YAML merge keys were applied.
    duplicates: tuple[tuple[Loc, int, int], ...] = ()
    #: (id(parent), id(key) or item index) -> (anchor, line of the alias) of each value reached through an alias,
    #: keys brought in by ``<<: *base`` included.
    aliases: Mapping[tuple[int, int], tuple[str, int]] = field(default_factory=dict)

    def line(self, loc: Sequence[str | int]) -> int | None:
        """1-based line of the deepest part of ``loc`` present in the file."""
        return self._find(loc)[0]

    def _find(self, loc: Sequence[str | int]) -> tuple[int | None, tuple[str, int] | None]:
        """(line of the deepest part of ``loc`` present, the first alias crossed on the way there, if any)."""
        node = self.root
        if node is None:
            return None, None
        line, through = int(node.start_mark.line) + 1, None
        for part in loc:
            found = _child(node, part)
            if found is None:
                break
            line, child, slot = found
            through = through or self.aliases.get((id(node), slot))
            node = child
        return line, through

    def prefix(self, loc: Sequence[str | int]) -> str:
        """``settings.yaml:12: `` (or ``settings.yaml: `` when the line is unknown).

        A value written once and used through an alias is located where it is written, and the alias
        is named: ``settings.yaml:3 (through *base at line 20): ``.
        """
        line, through = self._find(loc)
        if not line:
            return f"{self.filename}: "
        if through is None:
            return f"{self.filename}:{line}: "
        return f"{self.filename}:{line} (through *{through[0]} at line {through[1]}): "

    def duplicate_keys(self) -> list[str]:
        """Keys given twice in one mapping (YAML keeps the last one silently)."""
        return [
            f"{self.filename}:{line}: {render_loc(loc)}: duplicate key, overrides the value at line {first}"
            for loc, line, first in self.duplicates
        ]


def _child(node: yaml.Node, part: str | int) -> tuple[int, yaml.Node, int] | None:
    """The (line, node, slot) of ``part`` in a mapping or sequence node; of a key given twice, the last (it wins).

    The slot (``id`` of the key, or the item index) is what :class:`Locator` finds aliases by.
    """
    if isinstance(node, yaml.MappingNode):
        for key, value in reversed(node.value):
            if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                return key.start_mark.line + 1, value, id(key)
    elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
        item = node.value[part]
        return item.start_mark.line + 1, item, part
    return None


def _merged_keys(merged: yaml.Node) -> list[yaml.Node]:
    """The key nodes a ``<<:`` value brings: its mapping's own keys and, in turn, those of its own ``<<:``."""
    keys: list[yaml.Node] = []
    pending, seen = [merged], set()
    while pending:
        node = pending.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            pending.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.tag == _MERGE_TAG:
                    pending.append(value)
                else:
                    keys.append(key)
    return keys


def _alias_crossings(root: yaml.Node | None, alias_uses: Mapping[tuple[int, int], tuple[str, int]],
                     ) -> dict[tuple[int, int], tuple[str, int]]:
    """``alias_uses`` plus the keys each ``<<: *base`` (or ``<<: [*a, *b]``) brings into its mapping.

    Read before the document is constructed: constructing it moves the merged keys into the mapping, where
    they keep the lines of the anchored mapping they were written in.
    """
    crossings = dict(alias_uses)
    walked: set[int] = set()
    pending = [root]
    while pending:
        node = pending.pop()
        if node is None or id(node) in walked:
            continue
        walked.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.tag == _MERGE_TAG:
                    sources = [(alias_uses.get((id(node), id(key))), value)]
                    if isinstance(value, yaml.SequenceNode):
                        sources = [(alias_uses.get((id(value), i)), item) for i, item in enumerate(value.value)]
                    for origin, merged in sources:
                        if origin is not None:
                            crossings.update({(id(node), id(k)): origin for k in _merged_keys(merged)})
                pending.append(value)
        elif isinstance(node, yaml.SequenceNode):
            pending.extend(node.value)
    return crossings


def _duplicates(root: yaml.Node | None) -> Iterator[tuple[Loc, int, int]]:
    """(location, line, first line) of each key given twice in one mapping, before ``<<: *base`` merges (whose
    keys may be overridden) are applied; a node reached again through an alias is not walked again."""
    walked: set[int] = set()
    pending: list[tuple[yaml.Node | None, Loc]] = [(root, ())]
    while pending:
        node, loc = pending.pop()
        if node is None or id(node) in walked:
            continue
        walked.add(id(node))
        children: list[tuple[yaml.Node, Loc]] = []
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key, value in node.value:
                name = str(key.value) if isinstance(key, yaml.ScalarNode) else ""
                line = key.start_mark.line + 1
                if key.tag != _MERGE_TAG:
                    if name in seen:
                        yield (*loc, name), line, seen[name]
                    seen.setdefault(name, line)
                children.append((value, (*loc, name)))
        elif isinstance(node, yaml.SequenceNode):
            children = [(item, (*loc, i)) for i, item in enumerate(node.value)]
        pending.extend(reversed(children))


def read_settings(path: str | Path) -> tuple[Any, Locator]:
    """Read and parse a YAML settings file: (data, locator). Unreadable files raise ConfigError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: settings file not found"], str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read the settings file: {exc}"], str(path)) from None
    loader = _SettingsLoader(text)
    try:
        root = loader.get_single_node()
        expansion = _expansion_problem(root, loader.anchor_names) if root is not None else None
        if expansion is not None:
            loc, line, message = expansion
            raise ConfigError([f"{path.name}:{line}: {format_problem(loc, message)}"], str(path))
        duplicates = tuple(_duplicates(root))
        aliases = _alias_crossings(root, loader.alias_uses)
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path.name}:{mark.line + 1}" if mark else path.name
        started = exc.context_mark if exc.problem and exc.context else None  # where the unfinished part began
        context = ""
        if started and mark and started.line != mark.line:
            context = f" ({exc.context} at line {started.line + 1})"
        raise ConfigError([f"{where}: invalid YAML: {exc.problem or exc.context}{context}"], str(path)) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path.name}: invalid YAML: {exc}"], str(path)) from None
    except _TooDeep as exc:
        where, levels = f"{path.name}:{exc.mark.line + 1}", MAX_NESTING_DEPTH
        raise ConfigError(
            [f"{where}: nested too deeply (more than {levels} levels of lists and mappings inside one another)"],
            str(path),
        ) from None
    finally:
        loader.dispose()
    return data, Locator(path.name, root, duplicates, aliases)


def load_config(path: str | Path) -> tuple[PipelineConfig, tuple[str, ...]]:
    """Load and validate a settings file: (config, warnings). Paths in it are not resolved."""
    data, locator = read_settings(path)
    return config_from_mapping(data, source=str(path), locator=locator)


def config_from_mapping(
    data: Mapping[str, Any], *, source: str | None = None, locator: Locator | None = None
) -> tuple[PipelineConfig, tuple[str, ...]]:
    """Validate settings given as a mapping: (config, warnings), or one ConfigError with every problem."""
    problems = locator.duplicate_keys() if locator else []
    if not isinstance(data, Mapping):
        what = "empty" if data is None else f"a {type(data).__name__}, not a mapping of settings"
        problems.append(format_problem((), f"the settings are {what}", locator=locator))
        raise ConfigError(problems, source)
    try:
        config = PipelineConfig.model_validate(dict(data))
    except ValidationError as exc:
        problems.extend(_validation_problems(exc, data, locator))
    if problems:
        raise ConfigError(problems, source)
    return config, collect_warnings(config, locator)


# -- problem formatting ---------------------------------------------------------------------

_OMIT: Any = object()
_SIMPLE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def render_loc(loc: Sequence[str | int]) -> str:
    """``('coalesce', 0, 'branches', 'a b')`` -> ``coalesce[0].branches['a b']``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _SIMPLE_KEY.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


def render_value(value: Any, limit: int = 80) -> str:
    """A short, YAML-flavoured rendering of an offending value."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        text = repr(value)
    elif isinstance(value, int | float):
        text = str(value)
    else:
        text = json.dumps(value, default=str, separators=(", ", ": "))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_problem(
    loc: Sequence[str | int], message: str, got: Any = _OMIT, *, locator: Locator | None = None
) -> str:
    """``<file>:<line>: <path>: <message> (got <value>)``; the file part only with a locator."""
    path = render_loc(loc)
    text = f"{path}: {message}" if path else message
    if got is not _OMIT:
        text += f" (got {render_value(got)})"
    return f"{locator.prefix(loc)}{text}" if locator else text


def _validation_problems(exc: ValidationError, data: Any, locator: Locator | None) -> list[str]:
    """One line per pydantic error, located in the user's terms; duplicates dropped."""
    lines: list[str] = []
    for error in exc.errors(include_url=False):
        loc, message, got = _describe(error, data)
        line = format_problem(loc, message, got, locator=locator)
        if line not in lines:
            lines.append(line)
    return lines


def _describe(error: Mapping[str, Any], data: Any) -> tuple[Loc, str, Any]:
    """(location, message, offending value) of one pydantic error."""
    loc = _user_loc(error["loc"], data)
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        key = str(ctx.get("discriminator", "plugin")).strip("'")
        if kind == "union_tag_not_found":
            return (*loc, key), "required", None
        return (*loc, key), f"unknown {key}; expected one of {ctx.get('expected_tags')}", ctx.get("tag")
    if kind == "missing":
        return loc, "required", None
    if kind == "extra_forbidden":
        return loc, _unknown_key_message(loc, error["loc"]), error.get("input")
    return loc, _tidy(error["msg"]), error.get("input")


def _user_loc(loc: Sequence[str | int], data: Any) -> Loc:
    """Keep the parts of a pydantic location that exist in the input (drops union tags and ``[key]``); in a list
    a validator made a mapping (``branches: [a, b]``), a name is located by its index."""
    out: list[str | int] = []
    node = data
    for i, given in enumerate(loc):
        listed = isinstance(node, list | tuple) and isinstance(given, str) and given in node
        part = node.index(given) if listed else given
        in_mapping = isinstance(node, Mapping) and part in node
        in_list = isinstance(node, list | tuple) and isinstance(part, int) and 0 <= part < len(node)
        if in_mapping or in_list:
            node = node[part]
        elif i == len(loc) - 1 and part != "[key]":
            node = None
        else:
            continue
        out.append(part)
    return tuple(out)


_SHOULD = re.compile(r"^\w+ should (be|have) ")


def _tidy(message: str) -> str:
    """Pydantic's wording, shortened: ``Value error, x`` -> ``x``; ``Input should be`` -> ``must be``."""
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    message = _SHOULD.sub(lambda m: f"must {m.group(1)} ", message)
    return message[:1].lower() + message[1:]


def _unknown_key_message(loc: Loc, raw_loc: Sequence[str | int]) -> str:
    """"unknown setting", with the closest key the plugin (or section) has: another plugin's key is no hint."""
    key = str(loc[-1]) if loc else ""
    keys = _known_keys(_section_model(loc[:-1]))
    if len(raw_loc) >= 3 and raw_loc[-2] == "options":  # a key right under a plugin's options
        options = _options_models().get((str(raw_loc[0]), str(raw_loc[-3])))
        keys = tuple(options.model_fields) if options is not None else keys
    close = difflib.get_close_matches(key, keys, n=1)
    return f"unknown setting; did you mean {close[0]!r}?" if close else "unknown setting"


@functools.cache
def _options_models() -> dict[tuple[str, str], type[BaseModel]]:
    """(section, plugin) -> that plugin's options model, as pydantic's error locations name them."""
    found: dict[tuple[str, str], type[BaseModel]] = {}
    for section, base in (("source", SourceConfig), ("transforms", TransformConfig), ("sinks", SinkConfig)):
        for config in base.__subclasses__():
            options = config.model_fields["options"].annotation
            if isinstance(options, type) and issubclass(options, BaseModel):
                for plugin in typing.get_args(config.model_fields["plugin"].annotation):
                    found[(section, str(plugin))] = options
    return found


def _section_model(parent: Loc) -> type[BaseModel]:
    """The settings model (with its plugin subclasses) whose keys belong at ``parent``; the base for any."""
    if not parent:
        return PipelineConfig
    if len(parent) >= 2 and parent[-1] == "options":
        return PluginOptions if parent[0] != "source" else SourceOptions
    sections: dict[tuple[str, int], type[BaseModel]] = {
        ("source", 1): SourceConfig, ("transforms", 2): TransformConfig, ("gates", 2): GateConfig,
        ("coalesce", 2): CoalesceConfig, ("sinks", 2): SinkConfig, ("audit", 1): AuditConfig,
        ("engine", 1): EngineConfig,
    }
    return sections.get((str(parent[0]), len(parent)), _Model)


@functools.cache
def _known_keys(model: type[BaseModel]) -> tuple[str, ...]:
    """Every key ``model`` or one of its plugin subclasses accepts, for 'did you mean' hints."""
    keys: set[str] = set()
    pending: list[type[BaseModel]] = [model]
    while pending:
        current = pending.pop()
        keys.update(current.model_fields)
        pending.extend(current.__subclasses__())
    return tuple(sorted(keys))


__all__ = [
    "ELSPETH_ONLY_SETTINGS",
    "FIELD_TYPES",
    "RESERVED_LABELS",
    "AnySink",
    "AnySource",
    "AnyTransform",
    "AuditConfig",
    "CoalesceConfig",
    "CsvSink",
    "CsvSinkOptions",
    "CsvSource",
    "CsvSourceOptions",
    "EngineConfig",
    "FieldMapperOptions",
    "FieldMapperTransform",
    "FieldSpec",
    "GateConfig",
    "JsonSink",
    "JsonSinkOptions",
    "JsonlSink",
    "JsonlSource",
    "JsonlSourceOptions",
    "KeywordFilterOptions",
    "KeywordFilterTransform",
    "LatencyOptions",
    "LatencyTransform",
    "Locator",
    "ParquetSink",
    "ParquetSource",
    "ParquetSourceOptions",
    "PassthroughOptions",
    "PassthroughTransform",
    "PipelineConfig",
    "PluginOptions",
    "PythonOptions",
    "PythonTransform",
    "SchemaConfig",
    "SinkConfig",
    "SinkOptions",
    "SourceConfig",
    "SourceOptions",
    "TransformConfig",
    "TruncateOptions",
    "TruncateTransform",
    "collect_warnings",
    "config_from_mapping",
    "format_problem",
    "load_config",
    "parse_field_spec",
    "read_settings",
    "render_loc",
    "render_value",
]

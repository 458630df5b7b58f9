"""The validated pipeline graph and the ``Pipeline`` object the runner executes.

``build_graph`` wires ELSPETH's named connections (a producer's ``on_success``, route
destination or fork branch matched to a consumer's ``input`` or coalesce branch input; a label
equal to a sink name goes to that sink), checks the whole graph, and reports every problem at
once. Node ids are ELSPETH's ``<prefix>_<name>_<sha256(canonical config)[:12]>``, so the same
settings give the same ids in both systems; steps are ELSPETH's (source 0, processing nodes
1..N in one topological order, sinks N+1).
"""

from __future__ import annotations

import functools
import heapq
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from elspeth_nb._arguments import path_argument
from elspeth_nb.audit.hashing import stable_hash
from elspeth_nb.engine.config import (
    CoalesceConfig,
    GateConfig,
    Loc,
    Locator,
    PipelineConfig,
    TransformConfig,
    config_from_mapping,
    format_problem,
    read_settings,
    render_loc,
)
from elspeth_nb.errors import CanonicalizationError, ConfigError, NotFoundError

NodeType = Literal["source", "transform", "gate", "coalesce", "sink"]
EdgeMode = Literal["move", "copy", "divert"]
MAX_NODE_ID_LENGTH = 64
QUARANTINE_LABEL = "__quarantine__"
PLUGIN_VERSION = "1.0.0"
_PREFIX: Mapping[str, str] = {
    "source": "source",
    "transform": "transform",
    "gate": "config_gate",
    "coalesce": "coalesce",
    "sink": "sink",
}
_DETERMINISM: Mapping[str, str] = {"latency": "seeded", "python": "non_deterministic"}
_SECTIONS = ("source", "transforms", "gates", "coalesce", "sinks")


def error_label(transform: str) -> str:
    """Label of the divert edge from a transform to its ``on_error`` sink (ELSPETH's)."""
    return f"__error_{transform}__"


@functools.cache
def engine_version() -> str:
    """``engine:<elspeth-nb version>``: the plugin version of gates and coalesces."""
    import elspeth_nb

    version = getattr(elspeth_nb, "__version__", None)
    if not version:
        try:
            version = metadata.version("elspeth-nb")
        except metadata.PackageNotFoundError:
            version = "0.1.0"
    return f"engine:{version}"


@dataclass(frozen=True)
class NodeSpec:
    """One node of the graph, with what ``nodes`` records about it."""

    name: str
    node_type: NodeType
    node_id: str
    plugin_name: str
    plugin_version: str
    determinism: str
    config: Mapping[str, Any]
    config_hash: str
    step: int


@dataclass(frozen=True)
class EdgeSpec:
    """One edge; ends are node names (sinks by sink name)."""

    from_node: str
    to_node: str
    label: str
    mode: EdgeMode


@dataclass(frozen=True)
class Destination:
    """Where a label leads: a processing node (and the coalesce branch it feeds), a sink, or discard."""

    kind: Literal["node", "sink", "discard"]
    name: str | None
    coalesce_branch: str | None = None


DISCARD = Destination("discard", None)


@dataclass(frozen=True)
class PipelineGraph:
    """The validated graph: nodes in step order, edges, and the fork/coalesce wiring."""

    nodes: tuple[NodeSpec, ...]
    edges: tuple[EdgeSpec, ...]
    source_destination: Destination
    fork_targets: Mapping[tuple[str, str], tuple[str, str] | None]
    coalesce_gate: Mapping[str, str]
    connections: Mapping[str, Destination]
    _by_name: Mapping[str, NodeSpec] = field(init=False, repr=False, compare=False)
    _by_id: Mapping[str, NodeSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {n.name: n for n in self.nodes})
        object.__setattr__(self, "_by_id", {n.node_id: n for n in self.nodes})

    def node(self, name: str) -> NodeSpec:
        """The node called ``name`` (the source is ``source``; sinks by sink name)."""
        try:
            return self._by_name[name]
        except KeyError:
            raise NotFoundError("node", name, self._by_name) from None

    def node_by_id(self, node_id: str) -> NodeSpec:
        """The node whose id is ``node_id``."""
        try:
            return self._by_id[node_id]
        except KeyError:
            raise NotFoundError("node id", node_id, self._by_id) from None

    def resolve(self, label: str) -> Destination:
        """Where a connection or sink name leads; ``discard`` drops the row."""
        if label == "discard":
            return DISCARD
        if label in self._by_name and self._by_name[label].node_type == "sink":
            return Destination("sink", label)
        try:
            return self.connections[label]
        except KeyError:
            known = [*self.connections, *(n.name for n in self.nodes if n.node_type == "sink")]
            raise NotFoundError("connection or sink", label, known) from None

    def edges_from(self, name: str) -> tuple[EdgeSpec, ...]:
        """The outgoing edges of node ``name``, in declaration order."""
        return tuple(e for e in self.edges if e.from_node == name)


def build_graph(
    config: PipelineConfig, *, locator: Locator | None = None, source: str | None = None
) -> PipelineGraph:
    """Wire and check ``config``; every problem is reported in one ``ConfigError``."""
    return _Builder(config).build(locator, source)


# -- building -------------------------------------------------------------------------------

_Origin = tuple[str, str] | None  # (fork gate, branch), or None: comes from the source unforked


class _Broken:
    """Marks a trace that hit a wiring problem already reported elsewhere."""


_BROKEN = _Broken()


@dataclass(frozen=True)
class _Decl:
    """A processing node (or the source) as declared in the settings."""

    name: str
    node_type: NodeType
    order: int
    loc: Loc
    input: str | None
    settings: Any


@dataclass(frozen=True)
class _Producer:
    """Something that sends rows to ``label`` (a connection or a sink name)."""

    node: str
    label: str
    edge_label: str
    loc: Loc
    branch: str | None = None
    on_success: bool = False


@dataclass(frozen=True)
class _Consumer:
    """A node that takes its rows from connection ``connection``."""

    node: str
    connection: str
    loc: Loc
    coalesce_branch: str | None = None


@dataclass(frozen=True)
class _Edge:
    spec: EdgeSpec
    loc: Loc


class _Builder:
    """Collects declarations, wiring and problems for one ``PipelineConfig``."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.sinks = list(config.sinks)
        self.problems: list[tuple[Loc, str, tuple[Any, ...]]] = []
        self.decls: dict[str, _Decl] = {}
        self.producers: list[_Producer] = []
        self.consumers: dict[str, _Consumer] = {}
        self.produced: dict[str, _Producer] = {}
        self.edges: list[_Edge] = []
        self.on_cycle: set[str] = set()
        self.unwired: set[str] = set()  # nodes with an input problem already reported
        self._gate_of: dict[str, str | _Broken] = {}

    def problem(self, loc: Loc, message: str, *got: Any) -> None:
        """Record one problem; ``got``, when given, is the offending value (None: nothing)."""
        self.problems.append((loc, message, got))

    def build(self, locator: Locator | None, source: str | None) -> PipelineGraph:
        """Run every check, then assemble the graph (or raise with all problems).

        Name clashes are reported alone: with a node left out, the wiring checks would only list its
        consequences (connections nobody produces, sinks nothing reaches) as if they were mistakes too.
        """
        self._declare()
        if self.problems:
            raise ConfigError(self._formatted(locator), source)
        self._collect()
        self._wire()
        self._divert_edges()
        self._check_edge_labels()
        self._check_cycles()
        self._check_reachable()
        fork_targets = self._check_forks()
        steps = self._steps() if not self.on_cycle else {}
        nodes = self._node_specs(steps)
        if self.problems:
            raise ConfigError(self._formatted(locator), source)
        return PipelineGraph(
            nodes=nodes,
            edges=tuple(e.spec for e in sorted(self.edges, key=lambda e: steps[e.spec.from_node])),
            source_destination=self._destination(self.config.source.on_success) or DISCARD,
            fork_targets=MappingProxyType(fork_targets),
            coalesce_gate=MappingProxyType({c: g for c, g in self._gate_of.items() if isinstance(g, str)}),
            connections=MappingProxyType({c: self._destination(c) or DISCARD for c in self.consumers}),
        )

    def _formatted(self, locator: Locator | None) -> list[str]:
        """Problems in file order (section, then entry), each located."""

        def position(item: tuple[Loc, str, tuple[Any, ...]]) -> tuple[int, int]:
            loc = item[0]
            index = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else 0
            return _SECTIONS.index(str(loc[0])) if loc and loc[0] in _SECTIONS else len(_SECTIONS), index

        return [
            format_problem(loc, msg, *got, locator=locator)
            for loc, msg, got in sorted(self.problems, key=position)
        ]

    # -- declarations and connections ------------------------------------------------------

    def _declare(self) -> None:
        """Register the source and every processing node; report name clashes."""
        self.decls["source"] = _Decl("source", "source", -1, ("source",), None, self.config.source)
        sections: list[tuple[str, NodeType, Sequence[TransformConfig | GateConfig | CoalesceConfig]]] = [
            ("transforms", "transform", self.config.transforms),
            ("gates", "gate", self.config.gates),
            ("coalesce", "coalesce", self.config.coalesce),
        ]
        entries = [(key, node_type, i, e) for key, node_type, items in sections for i, e in enumerate(items)]
        for order, (key, node_type, i, entry) in enumerate(entries):
            input_ = entry.input if isinstance(entry, TransformConfig | GateConfig) else None
            self._declare_one(_Decl(entry.name, node_type, order, (key, i), input_, entry))

    def _declare_one(self, decl: _Decl) -> None:
        """Register one node unless its name clashes with the source, a sink or another node."""
        loc = (*decl.loc, "name")
        if decl.name == "source":
            self.problem(loc, "'source' is the name of the source node; choose another name", decl.name)
        elif decl.name in self.config.sinks:
            self.problem(loc, "a sink has the same name; node and sink names must differ", decl.name)
        elif decl.name in self.decls:
            first = self.decls[decl.name].loc
            self.problem(
                loc, f"duplicate node name: {render_loc(first)} is also called {decl.name!r}", decl.name
            )
        else:
            self.decls[decl.name] = decl

    def _collect(self) -> None:
        """Every producer label and consumed connection, from every declared node."""
        source = self.config.source
        self.producers.append(
            _Producer("source", source.on_success, "continue", ("source", "on_success"), on_success=True)
        )
        branch_owner: dict[str, str] = {}
        for decl in list(self.decls.values())[1:]:
            if isinstance(decl.settings, TransformConfig):
                self._collect_transform(decl, decl.settings)
            elif isinstance(decl.settings, GateConfig):
                self._collect_gate(decl, decl.settings, branch_owner)
            else:
                self._collect_coalesce(decl, decl.settings)

    def _collect_transform(self, decl: _Decl, t: TransformConfig) -> None:
        """A transform consumes its input and produces its on_success."""
        self._consume(t.input, decl.name, (*decl.loc, "input"))
        if t.on_success is None:
            self.problem(
                (*decl.loc, "on_success"), "required: where processed rows go (a sink or a connection)", None
            )
        else:
            self.producers.append(
                _Producer(t.name, t.on_success, "continue", (*decl.loc, "on_success"), on_success=True)
            )

    def _collect_gate(self, decl: _Decl, g: GateConfig, branch_owner: dict[str, str]) -> None:
        """A gate consumes its input and produces each route destination (or its fork branches, once)."""
        self._consume(g.input, decl.name, (*decl.loc, "input"))
        forked = False
        for label, target in g.routes.items():
            if target != "fork":
                self.producers.append(_Producer(g.name, target, label, (*decl.loc, "routes", label)))
            elif not forked:
                forked = True
                for j, branch in enumerate(g.fork_to or ()):
                    self._fork_branch(decl, j, branch, branch_owner)

    def _fork_branch(self, decl: _Decl, j: int, branch: str, branch_owner: dict[str, str]) -> None:
        """A fork branch is a connection named after it; branch names are unique across gates."""
        loc = (*decl.loc, "fork_to", j)
        if branch in branch_owner:
            self.problem(
                loc,
                f"fork branch {branch!r} is also a branch of gate {branch_owner[branch]!r}; "
                "branch names must be unique across gates",
                branch,
            )
            return
        branch_owner[branch] = decl.name
        self.producers.append(_Producer(decl.name, branch, branch, loc, branch=branch))

    def _collect_coalesce(self, decl: _Decl, c: CoalesceConfig) -> None:
        """A coalesce consumes one connection per branch and produces its on_success."""
        for branch, connection in c.branch_inputs.items():
            self._consume(connection, decl.name, (*decl.loc, "branches", branch), branch)
        if c.on_success is None:
            message = "required: where merged rows go (a sink or a connection)"
            self.problem((*decl.loc, "on_success"), message, None)
        else:
            self.producers.append(
                _Producer(c.name, c.on_success, "continue", (*decl.loc, "on_success"), on_success=True)
            )

    def _consume(self, connection: str, node: str, loc: Loc, branch: str | None = None) -> None:
        """Claim ``connection`` for ``node``: one consumer per connection, never a sink."""
        if connection in self.config.sinks:
            self.unwired.add(node)
            self.problem(loc, f"{connection!r} is a sink; a sink cannot be the input of a node", connection)
        elif connection in self.consumers:
            other = self.consumers[connection]
            self.unwired.add(node)
            self.problem(
                loc,
                f"connection {connection!r} is already consumed by {render_loc(other.loc)}; "
                "a connection feeds one node (use a gate to send rows to several)",
                connection,
            )
        else:
            self.consumers[connection] = _Consumer(node, connection, loc, branch)

    # -- edges -----------------------------------------------------------------------------

    def _destination(self, label: str) -> Destination | None:
        """Where ``label`` leads (a sink or the consumer of that connection), if anywhere."""
        if label in self.config.sinks:
            return Destination("sink", label)
        consumer = self.consumers.get(label)
        return Destination("node", consumer.node, consumer.coalesce_branch) if consumer else None

    def _wire(self) -> None:
        """One edge per producer; report labels that lead nowhere and connections without producer."""
        for producer in self.producers:
            destination = self._destination(producer.label)
            if destination is None:
                self._report_dead_end(producer)
                continue
            if destination.kind == "node":
                self._register_production(producer)
            label = (
                "on_success" if producer.on_success and destination.kind == "sink" else producer.edge_label
            )
            self.edges.append(
                _Edge(EdgeSpec(producer.node, str(destination.name), label, "move"), producer.loc)
            )
        for connection, consumer in self.consumers.items():
            if connection not in self.produced:
                self.problem(
                    consumer.loc,
                    f"no node produces connection {connection!r} "
                    f"(connections produced: {_listing(self._produced_labels())})",
                    connection,
                )

    def _register_production(self, producer: _Producer) -> None:
        """Record the producer of a connection; a second, different producer is an error."""
        first = self.produced.setdefault(producer.label, producer)
        if first.node != producer.node:
            self.problem(
                producer.loc,
                f"connection {producer.label!r} is also produced by {render_loc(first.loc)}; "
                "a connection has exactly one producer",
                producer.label,
            )

    def _produced_labels(self) -> list[str]:
        """Every connection name some node produces, for messages."""
        return sorted({p.label for p in self.producers if p.label not in self.config.sinks})

    def _report_dead_end(self, producer: _Producer) -> None:
        """A label that is neither a sink nor a consumed connection; fork branches get their own advice."""
        known = f"sinks: {_listing(self.sinks)}; connections: {_listing(sorted(self.consumers))}"
        if producer.branch is not None:
            message = (
                f"fork branch {producer.label!r} leads nowhere: name a sink after it, or use it as the "
                f"input of a transform, gate or coalesce branch ({known})"
            )
        else:
            message = f"{producer.label!r} is neither a sink nor a connection that a node consumes ({known})"
        self.problem(producer.loc, message, producer.label)

    def _divert_edges(self) -> None:
        """Structural edges to the quarantine and on_error sinks (mode divert)."""
        failure = self.config.source.options.on_validation_failure
        self._divert("source", failure, QUARANTINE_LABEL, ("source", "options", "on_validation_failure"))
        for decl in self.decls.values():
            if isinstance(decl.settings, TransformConfig) and decl.settings.on_error is not None:
                self._divert(
                    decl.name, decl.settings.on_error, error_label(decl.name), (*decl.loc, "on_error")
                )

    def _divert(self, node: str, target: str, label: str, loc: Loc) -> None:
        """One divert edge to ``target`` unless it is ``discard``; anything else must be a sink."""
        if target == "discard":
            return
        if target not in self.config.sinks:
            self.problem(loc, f"must be 'discard' or a sink name (sinks: {_listing(self.sinks)})", target)
            return
        self.edges.append(_Edge(EdgeSpec(node, target, label, "divert"), loc))

    def _check_edge_labels(self) -> None:
        """Labels leaving one node must differ: the runner finds an edge by (node, label)."""
        seen: set[tuple[str, str]] = set()
        for edge in self.edges:
            key = (edge.spec.from_node, edge.spec.label)
            if key in seen:
                self.problem(
                    edge.loc,
                    f"label {edge.spec.label!r} is used twice by {edge.spec.from_node!r} "
                    "(a route label equal to a fork branch?)",
                    edge.spec.label,
                )
            seen.add(key)

    # -- structure -------------------------------------------------------------------------

    def _successors(self) -> dict[str, list[tuple[str, Loc]]]:
        """Processing-node adjacency (sinks excluded), with the location of each edge."""
        graph: dict[str, list[tuple[str, Loc]]] = {name: [] for name in self.decls}
        for edge in self.edges:
            if edge.spec.to_node in self.decls:
                graph[edge.spec.from_node].append((edge.spec.to_node, edge.loc))
        return graph

    def _check_cycles(self) -> None:
        """Report each cycle once, by name: ``a → b → a``."""
        reported: set[frozenset[str]] = set()
        for cycle, loc in _find_cycles(self._successors()):
            members = frozenset(cycle)
            self.on_cycle |= members
            if members not in reported:
                reported.add(members)
                self.problem(loc, f"cycle: {' → '.join([*cycle, cycle[0]])}")

    def _check_reachable(self) -> None:
        """Every node must be reachable from the source (unless a reported problem explains why not)."""
        reached = {"source"}
        pending = ["source"]
        while pending:
            node = pending.pop()
            for edge in self.edges:
                if edge.spec.from_node == node and edge.spec.to_node not in reached:
                    reached.add(edge.spec.to_node)
                    pending.append(edge.spec.to_node)
        for decl in self.decls.values():
            explained = decl.name in self.on_cycle or decl.name in self.unwired
            if decl.name not in reached and not explained and self._inputs_produced(decl):
                self.problem(
                    decl.loc, "unreachable from the source: its input only comes from unreachable nodes"
                )
        for sink in self.sinks:
            if sink not in reached:
                self.problem(
                    ("sinks", sink),
                    "nothing leads to this sink (no on_success, route, fork branch, "
                    "on_error or on_validation_failure names it)",
                )

    def _inputs_produced(self, decl: _Decl) -> bool:
        """Whether every input of ``decl`` has a producer (otherwise that problem is already reported)."""
        if isinstance(decl.settings, CoalesceConfig):
            return all(c in self.produced for c in decl.settings.branch_inputs.values())
        return decl.input is not None and decl.input in self.produced

    # -- forks and coalesces ---------------------------------------------------------------

    def _origin(self, connection: str, seen: frozenset[str]) -> _Origin | _Broken:
        """The fork branch a connection's rows come from, walking upstream through transforms,
        non-fork gate routes and inner coalesces (whose rows come from their fork gate's input)."""
        producer = self.produced.get(connection)
        if producer is None or producer.node in seen:
            return _BROKEN
        if producer.branch is not None:
            return producer.node, producer.branch
        decl = self.decls[producer.node]
        if decl.node_type == "source":
            return None
        seen = seen | {decl.name}
        if isinstance(decl.settings, CoalesceConfig):
            gate = self._coalesce_gate(decl.settings, seen)
            return (
                _BROKEN
                if isinstance(gate, _Broken)
                else self._origin(str(self.decls[gate].input), seen | {gate})
            )
        return self._origin(str(decl.input), seen)

    def _coalesce_gate(self, c: CoalesceConfig, seen: frozenset[str]) -> str | _Broken:
        """The single fork gate whose branches coalesce ``c`` joins (memoised)."""
        if c.name not in self._gate_of:
            origins = [self._origin(conn, seen | {c.name}) for conn in c.branch_inputs.values()]
            gates = {o[0] for o in origins if isinstance(o, tuple)}
            whole = all(isinstance(o, tuple) for o in origins) and len(gates) == 1
            self._gate_of[c.name] = gates.pop() if whole else _BROKEN
        return self._gate_of[c.name]

    def _check_forks(self) -> dict[tuple[str, str], tuple[str, str] | None]:
        """Check every coalesce's branch origins and every fork branch's destination coalesce."""
        arrivals: dict[tuple[str, str], list[tuple[str, str]]] = {}
        for decl in self.decls.values():
            if isinstance(decl.settings, CoalesceConfig):
                for origin, arrival in self._check_coalesce(decl, decl.settings).items():
                    arrivals.setdefault(origin, []).append(arrival)
        targets: dict[tuple[str, str], tuple[str, str] | None] = {}
        for decl in self.decls.values():
            if isinstance(decl.settings, GateConfig) and "fork" in decl.settings.routes.values():
                for j, branch in enumerate(decl.settings.fork_to or ()):
                    joined = arrivals.get((decl.name, branch), [])
                    targets[(decl.name, branch)] = self._fork_target(decl, j, branch, joined)
        return targets

    def _check_coalesce(self, decl: _Decl, c: CoalesceConfig) -> dict[tuple[str, str], tuple[str, str]]:
        """Each branch must trace back to a distinct branch of one fork gate.

        Returns fork origin -> (coalesce, branch) for the branches that trace back cleanly.
        """
        found: dict[tuple[str, str], tuple[str, str]] = {}
        for branch, connection in c.branch_inputs.items():
            loc = (*decl.loc, "branches", branch)
            origin = self._origin(connection, frozenset({c.name})) if connection in self.produced else _BROKEN
            if origin is None:
                self.problem(
                    loc,
                    f"input {connection!r} does not come from a fork branch: it traces back to "
                    "the source without passing a fork gate",
                    connection,
                )
            elif isinstance(origin, tuple) and origin in found:
                self.problem(
                    loc,
                    f"traces back to fork branch {origin[1]!r} of gate {origin[0]!r}, like branch "
                    f"{found[origin][1]!r}; each branch must come from a different fork branch",
                    connection,
                )
            elif isinstance(origin, tuple):
                found[origin] = (c.name, branch)
                if origin[1] != branch:
                    self.problem(
                        loc,
                        f"input {connection!r} carries fork branch {origin[1]!r} of gate {origin[0]!r}; a coalesce "
                        f"branch is named after the fork branch it joins (tokens carry that name): use {origin[1]!r}",
                        branch,
                    )
        gates = list(dict.fromkeys(gate for gate, _ in found))
        if len(gates) > 1:
            traced = ", ".join(f"{b} ← {g}.{fb}" for (g, fb), (_, b) in found.items())
            self.problem(
                (*decl.loc, "branches"),
                f"branches come from different fork gates ({traced}); "
                "a coalesce joins the branches of one fork",
            )
        self._coalesce_gate(c, frozenset())
        return found

    def _fork_target(
        self, decl: _Decl, j: int, branch: str, joined: list[tuple[str, str]]
    ) -> tuple[str, str] | None:
        """The (coalesce, branch) a fork branch joins, if any; joining two coalesces is an error."""
        coalesces = list(dict.fromkeys(c for c, _ in joined))
        if len(coalesces) > 1:
            self.problem(
                (*decl.loc, "fork_to", j),
                f"fork branch reaches {len(coalesces)} coalesces "
                f"({', '.join(coalesces)}); a branch can join only one",
                branch,
            )
        return joined[0] if joined else None

    # -- order and node specs --------------------------------------------------------------

    def _steps(self) -> dict[str, int]:
        """Source 0; processing nodes 1..N in topological order (ties by declaration); sinks N+1."""
        graph = self._successors()
        indegree = dict.fromkeys(graph, 0)
        for successors in graph.values():
            for target, _ in successors:
                indegree[target] += 1
        ready = [(self.decls[n].order, n) for n, d in indegree.items() if d == 0]
        heapq.heapify(ready)
        steps: dict[str, int] = {}
        while ready:
            _, name = heapq.heappop(ready)
            steps[name] = len(steps)
            for target, _ in graph[name]:
                indegree[target] -= 1
                if indegree[target] == 0:
                    heapq.heappush(ready, (self.decls[target].order, target))
        return steps | dict.fromkeys(self.sinks, len(steps))

    def _node_specs(self, steps: Mapping[str, int]) -> tuple[NodeSpec, ...]:
        """Source and processing nodes in step order, then sinks in config order."""
        processing = sorted(self.decls.values(), key=lambda d: steps.get(d.name, d.order + 1))
        specs = [self._spec(d.loc, d.name, d.node_type, d.settings, steps.get(d.name, 0)) for d in processing]
        specs += [
            self._spec(("sinks", name), name, "sink", sink, steps.get(name, 0))
            for name, sink in self.config.sinks.items()
        ]
        return tuple(spec for spec in specs if spec is not None)

    def _spec(self, loc: Loc, name: str, node_type: NodeType, settings: Any, step: int) -> NodeSpec | None:
        """The NodeSpec of one node, its id built as ELSPETH's builder does."""
        plugin, config = _plugin_and_config(node_type, name, settings)
        options: Any = getattr(settings, "options", None)
        found = _non_finite(options.model_dump(exclude_none=True), ()) if hasattr(options, "model_dump") else None
        if found is not None:  # in free-form options (a python transform's), which the JSON dump turns into null
            where, value = found
            self.problem((*loc, "options", *where), f"must be a finite number (got {value})")
            return None
        try:
            config_hash = stable_hash(config)
        except CanonicalizationError as exc:
            self.problem(loc, f"the settings cannot be hashed: {exc}")
            return None
        id_name = settings.plugin if node_type == "source" else name
        room = MAX_NODE_ID_LENGTH - len(_PREFIX[node_type]) - 14
        node_id = f"{_PREFIX[node_type]}_{id_name[:room]}_{config_hash[:12]}"
        plugin_node = node_type not in ("gate", "coalesce")
        determinism = {"source": "io_read", "sink": "io_write"}.get(
            node_type, _DETERMINISM.get(plugin, "deterministic")
        )
        version = PLUGIN_VERSION if plugin_node else engine_version()
        return NodeSpec(name, node_type, node_id, plugin, version, determinism, config, config_hash, step)


def _non_finite(value: Any, loc: Loc) -> tuple[Loc, float] | None:
    """Where the first NaN or infinity in a JSON-like ``value`` is, and the value, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return loc, value
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        if (found := _non_finite(child, (*loc, key))) is not None:
            return found
    return None


def _plugin_and_config(node_type: NodeType, name: str, settings: Any) -> tuple[str, dict[str, Any]]:
    """(plugin_name, JSON config) as ELSPETH records them: the options as written, for plugins."""
    if isinstance(settings, GateConfig):
        gate: dict[str, Any] = {"condition": settings.condition, "routes": dict(settings.routes)}
        if settings.fork_to is not None:
            gate["fork_to"] = list(settings.fork_to)
        return f"config_gate:{name}", gate
    if isinstance(settings, CoalesceConfig):
        optional = settings.model_dump(
            include={"timeout_seconds", "quorum_count", "select_branch"}, exclude_none=True
        )
        return f"coalesce:{name}", {
            "branches": dict(settings.branches),
            "policy": settings.policy,
            "merge": settings.merge,
            **optional,
        }
    options = settings.options.model_dump(mode="json", exclude_unset=True, exclude_none=True)
    return str(settings.plugin), options


def _find_cycles(graph: Mapping[str, Sequence[tuple[str, Loc]]]) -> Iterator[tuple[list[str], Loc]]:
    """Each cycle met by a depth-first walk, as (nodes in order, location of the closing edge)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    for start in graph:
        if start in state:
            continue
        path: list[str] = [start]
        stack = [iter(graph[start])]
        state[start] = 1
        while stack:
            step = next(stack[-1], None)
            if step is None:
                state[path.pop()] = 2
                stack.pop()
                continue
            target, loc = step
            if state.get(target) == 1:
                yield path[path.index(target) :], loc
            elif target not in state:
                state[target] = 1
                path.append(target)
                stack.append(iter(graph[target]))


def _listing(names: Sequence[str]) -> str:
    """Comma-separated names for messages."""
    return ", ".join(names) if names else "none"


# -- the pipeline object --------------------------------------------------------------------


@dataclass(frozen=True)
class Pipeline:
    """A validated pipeline: its settings, its graph, and where its relative paths start."""

    config: PipelineConfig
    graph: PipelineGraph
    base_dir: Path
    source_path: Path | None = None
    warnings: tuple[str, ...] = ()
    locator: Locator | None = field(default=None, compare=False, repr=False)

    @classmethod
    def load(cls, path: str | Path) -> Pipeline:
        """Load a settings file; relative paths in it are relative to its directory."""
        path = Path(path)
        data, locator = read_settings(path)
        config, warnings = config_from_mapping(data, source=str(path), locator=locator)
        graph = build_graph(config, locator=locator, source=str(path))
        absolute = path.absolute()
        return cls(config, graph, absolute.parent, absolute, warnings, locator)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base_dir: str | Path | None = None) -> Pipeline:
        """Build from settings given as a mapping; relative paths start at ``base_dir`` (default: cwd)."""
        config, warnings = config_from_mapping(data)
        base = Path(base_dir).absolute() if base_dir is not None else Path.cwd()
        return cls(config, build_graph(config), base, None, warnings)

    def to_polars(self) -> Any:
        """One row per node, in step order: name, node_type, plugin, step, node_id, config_hash.

        >>> load_pipeline("data/demo/pipeline.yaml").to_polars().row(0)[:3]
        ('source', 'source', 'csv')
        """
        import polars as pl

        return pl.DataFrame([{"name": n.name, "node_type": n.node_type, "plugin": n.plugin_name, "step": n.step,
                              "node_id": n.node_id, "config_hash": n.config_hash} for n in self.graph.nodes],
                            schema={"name": pl.String, "node_type": pl.String, "plugin": pl.String,
                                    "step": pl.Int64, "node_id": pl.String, "config_hash": pl.String})

    def title(self) -> str:
        """``Pipeline <settings file>: <n> nodes (<how many of each node type>)``."""
        counts: dict[str, int] = {}
        for node in self.graph.nodes:
            counts[node.node_type] = counts.get(node.node_type, 0) + 1
        parts = ", ".join(f"{n} {kind}{'s' if n > 1 else ''}" for kind, n in counts.items())
        origin = str(self.source_path) if self.source_path is not None else "(from a mapping)"
        return f"Pipeline {origin}: {len(self.graph.nodes)} nodes ({parts})"

    def __repr__(self) -> str:
        lines = [self.title()]
        lines += [f"  {n.step:>2} {n.node_type:<9} {n.name} ({n.plugin_name})" for n in self.graph.nodes]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from html import escape

        import polars as pl

        warnings = "".join(f"<p>warning: {escape(w)}</p>" for w in self.warnings)
        with pl.Config(tbl_rows=-1, fmt_str_lengths=64):  # every node, ids in full
            table = self.to_polars()._repr_html_()
        return f"<p><b>{escape(self.title())}</b></p>{table}{warnings}"

    def resolve_path(self, p: str | Path) -> Path:
        """``p`` as an absolute path: relative paths are taken from ``base_dir``."""
        path = Path(p).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    def where(self, loc: Loc) -> str:
        """``settings.yaml:25: transforms[1].options.function``: a setting as error messages name it."""
        return f"{self.locator.prefix(loc) if self.locator else ''}{render_loc(loc)}"

    def check_paths(self, audit_root: Path) -> None:
        """Refuse sink paths that would overwrite the input, the settings, a python transform's code, another sink
        or the audit store.

        Checked before anything is opened: a sink truncates its file when the run starts.
        """
        def real(p: str | Path) -> Path:
            return Path(os.path.realpath(self.resolve_path(p)))

        taken: dict[Path, str] = {real(self.config.source.options.path): "the source's input file "
                                  "(source.options.path)"}
        if self.source_path is not None:
            taken[real(self.source_path)] = "this settings file"
        for i, transform in enumerate(self.config.transforms):
            module = str(getattr(transform.options, "function", "") or "").rpartition(":")[0]
            if transform.plugin == "python" and module.endswith(".py"):
                taken.setdefault(real(module), f"the code of transforms[{i}] ({transform.name}), loaded from "
                                               "options.function")
        audit = real(audit_root)
        problems = []
        for name, sink in self.config.sinks.items():
            loc = ("sinks", name, "options", "path")
            path = real(sink.options.path)
            if path in taken:
                problems.append(format_problem(loc, f"is {taken[path]}; the sink would overwrite it",
                                               sink.options.path, locator=self.locator))
            elif path == audit or audit in path.parents:
                problems.append(format_problem(loc, f"is inside the audit store {audit}; write sink files elsewhere",
                                               sink.options.path, locator=self.locator))
            taken.setdefault(path, f"already the file of sinks.{name}.options.path")
        if problems:
            raise ConfigError(problems, str(self.source_path) if self.source_path else None)


def load_pipeline(source: str | os.PathLike[str] | Mapping[str, Any]) -> Pipeline:
    """Load and validate a pipeline: a settings file (YAML), or settings given as a mapping.

    Every problem raises ConfigError naming where it is (file, line, setting path).

    >>> pipeline = load_pipeline("data/demo/pipeline.yaml")
    >>> [c.name for c in pipeline.config.coalesce]
    ['decision']
    """
    if isinstance(source, Mapping):
        return Pipeline.from_dict(source)
    return Pipeline.load(path_argument(source, "pipeline"))


__all__ = [
    "DISCARD",
    "QUARANTINE_LABEL",
    "Destination",
    "EdgeSpec",
    "NodeSpec",
    "Pipeline",
    "PipelineGraph",
    "build_graph",
    "engine_version",
    "error_label",
    "load_pipeline",
]

"""Safe gate conditions: a whitelisted subset of Python compiled to closures, never ``eval``.

The grammar is ELSPETH's (``engine/expression_parser.py``): the name ``row``, ``row['field']``
and nested subscripts of row values, ``row.get(key[, default])``, literals and container
literals, comparisons (``is`` only against ``None``), ``and``/``or``/``not``, unary ``-``/``+``,
binary ``+ - * / // %`` and ``a if c else b``. The text is parsed with :mod:`ast`, checked
against that whitelist, then turned into a tree of closures; constant sub-trees are folded.

>>> cond = compile_condition("row['amount'] > 100 and row.get('flag') is None")
>>> cond({"amount": 150}), cond.is_boolean
(True, True)
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from elspeth_nb.errors import ConfigError, Error

Row = Mapping[str, Any]
Evaluator = Callable[[Row], Any]


class ExpressionEvaluationError(Error, ValueError):
    """A condition failed on one row: a missing field, a type error, a division by zero."""


@dataclass(frozen=True)
class Condition:
    """A compiled condition: call it with a row to get its value."""

    text: str
    is_boolean: bool
    evaluate: Evaluator = field(repr=False, compare=False)
    is_constant: bool = False

    def __call__(self, row: Row) -> Any:
        """Evaluate the condition against ``row``."""
        return self.evaluate(row)


def compile_condition(text: str, *, where: str = "condition") -> Condition:
    """Parse, whitelist-check and compile ``text``; problems raise one ``ConfigError``.

    Each problem is prefixed with ``where`` (nothing when ``where`` is empty).
    """
    problems, tree = _parse_and_check(text)
    if problems or tree is None:
        raise ConfigError([f"{where}: {p}" if where else p for p in problems])
    code = _Compiler(text).compile(tree.body)
    evaluate = _constant(code.value) if code.is_constant else code.fn
    return Condition(text, _is_boolean(tree.body), evaluate, code.is_constant)


def _parse_and_check(text: str) -> tuple[list[str], ast.Expression | None]:
    """Parse ``text`` in eval mode and list every construct outside the whitelist."""
    if not text.strip():
        return ["the expression is empty"], None
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        column = f" at column {exc.offset}" if exc.offset else ""
        return [f"syntax error: {exc.msg}{column}"], None
    except (ValueError, RecursionError, MemoryError) as exc:
        return [f"cannot parse the expression: {str(exc) or 'it is too deeply nested'}"], None
    checker = _Checker()
    try:
        checker.check(tree.body)
    except RecursionError:
        return ["the expression is too deeply nested"], None
    return checker.problems, tree


def _is_boolean(node: ast.expr) -> bool:
    """True when ``node`` always yields a bool (ELSPETH's ``is_boolean_expression``)."""
    if isinstance(node, ast.Compare):
        return True
    if isinstance(node, ast.BoolOp):
        return all(_is_boolean(value) for value in node.values)
    if isinstance(node, ast.UnaryOp):
        return isinstance(node.op, ast.Not)
    if isinstance(node, ast.Constant):
        return isinstance(node.value, bool)
    if isinstance(node, ast.IfExp):
        return _is_boolean(node.body) and _is_boolean(node.orelse)
    return False


# -- whitelist -------------------------------------------------------------------------------

_COMPARE: dict[type[ast.cmpop], tuple[str, Callable[[Any, Any], Any]]] = {
    ast.Eq: ("==", operator.eq),
    ast.NotEq: ("!=", operator.ne),
    ast.Lt: ("<", operator.lt),
    ast.LtE: ("<=", operator.le),
    ast.Gt: (">", operator.gt),
    ast.GtE: (">=", operator.ge),
    ast.In: ("in", lambda a, b: a in b),
    ast.NotIn: ("not in", lambda a, b: a not in b),
    ast.Is: ("is", operator.is_),
    ast.IsNot: ("is not", operator.is_not),
}
#: The longest text or list a condition may build with ``*`` or a ``%`` width: larger ones are evaluation errors.
MAX_BUILT_LENGTH = 1_000_000
#: A %-format's conversion: ``%%`` (a literal percent sign) or its width and precision (digits or ``*``).
_FORMAT_WIDTHS = re.compile(r"%(%|(?:\([^)]*\))?[-+ #0]*(\*|\d*)(?:\.(\*|\d+))?)")
_LINES = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$")

_BINARY: dict[type[ast.operator], tuple[str, Callable[[Any, Any], Any]]] = {
    ast.Add: ("+", operator.add),
    ast.Sub: ("-", operator.sub),
    ast.Mult: ("*", operator.mul),
    ast.Div: ("/", operator.truediv),
    ast.FloorDiv: ("//", operator.floordiv),
    ast.Mod: ("%", operator.mod),
}
_UNARY: dict[type[ast.unaryop], tuple[str, Callable[[Any], Any]]] = {
    ast.Not: ("not", operator.not_),
    ast.USub: ("-", operator.neg),
    ast.UAdd: ("+", operator.pos),
}
_FORBIDDEN_OPERATORS = {
    ast.Pow: "'**'",
    ast.MatMult: "'@'",
    ast.LShift: "'<<'",
    ast.RShift: "'>>'",
    ast.BitOr: "'|'",
    ast.BitXor: "'^'",
    ast.BitAnd: "'&'",
    ast.Invert: "'~'",
}
_CONSTRUCTS = {
    ast.Lambda: "lambda",
    ast.ListComp: "list comprehension",
    ast.SetComp: "set comprehension",
    ast.DictComp: "dict comprehension",
    ast.GeneratorExp: "generator expression",
    ast.JoinedStr: "f-string",
    ast.FormattedValue: "f-string",
    ast.NamedExpr: "assignment expression (:=)",
    ast.Starred: "starred expression (*)",
    ast.Slice: "slice",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield from",
    ast.Attribute: "attribute access",
    ast.Call: "function call",
}
_LITERAL_TYPES = (str, int, float, bool, type(None))


def _is_row(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and node.id == "row"


def _is_row_get(node: ast.expr) -> bool:
    """``row.get(...)``: the only call the grammar allows."""
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and _is_row(node.func.value)
        and node.func.attr == "get"
    )


def _is_row_derived(node: ast.expr) -> bool:
    """``row``, a subscript of a row-derived value, or ``row.get(...)``."""
    if isinstance(node, ast.Subscript):
        return _is_row_derived(node.value)
    return _is_row(node) or _is_row_get(node)


def _is_none(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value is None


class _Checker:
    """Walks a parsed expression and records every construct outside the whitelist."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def check(self, node: ast.expr) -> None:
        """Check ``node`` and its children."""
        method = getattr(self, f"_check_{type(node).__name__}", None)
        if method is None:
            self._reject(node, _CONSTRUCTS.get(type(node), type(node).__name__))
        else:
            method(node)

    def _reject(self, node: ast.AST, what: str, why: str = "is not allowed") -> None:
        column = getattr(node, "col_offset", -1) + 1
        self.problems.append(f"{what} {why} (at column {column})" if column > 0 else f"{what} {why}")

    def _check_all(self, nodes: Sequence[ast.expr | None]) -> None:
        for child in nodes:
            if child is not None:
                self.check(child)

    def _check_Constant(self, node: ast.Constant) -> None:
        if not isinstance(node.value, _LITERAL_TYPES):
            self._reject(node, f"a {type(node.value).__name__} literal")

    def _check_Name(self, node: ast.Name) -> None:
        if node.id != "row":
            dunder = " (dunder names are never allowed)" if node.id.startswith("__") else ""
            self._reject(node, f"name {node.id!r}", f"is not allowed; only `row` is{dunder}")

    def _check_Subscript(self, node: ast.Subscript) -> None:
        if isinstance(node.slice, ast.Slice):
            self._reject(node.slice, "slice")
        elif not _is_row_derived(node.value):
            self._reject(node, "subscript", "is only allowed on row values (row['field'], row['a']['b'])")
        self.check(node.value)
        if not isinstance(node.slice, ast.Slice):
            self.check(node.slice)

    def _check_Attribute(self, node: ast.Attribute) -> None:
        if node.attr.startswith("__"):
            self._reject(node, f"dunder attribute {node.attr!r}")
        else:
            self._reject(node, f"attribute access '.{node.attr}'", "is not allowed; only row.get(...) is")

    def _check_Call(self, node: ast.Call) -> None:
        if not _is_row_get(node):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            self._reject(
                node,
                f"function call {name + '()' if name else ''}".strip(),
                "is not allowed; only row.get(...) is",
            )
            self._check_all([a for a in node.args if not isinstance(a, ast.Starred)])
            return
        if node.keywords:
            self._reject(node, "keyword arguments", "are not allowed in row.get()")
        if not 1 <= len(node.args) <= 2:
            self._reject(
                node,
                f"row.get() with {len(node.args)} arguments",
                "is not allowed; use row.get(key[, default])",
            )
        self._check_all(node.args)

    def _check_Compare(self, node: ast.Compare) -> None:
        operands = [node.left, *node.comparators]
        for i, op in enumerate(node.ops):
            if type(op) not in _COMPARE:
                self._reject(node, f"comparison {type(op).__name__}")
            elif isinstance(op, ast.Is | ast.IsNot) and not (
                _is_none(operands[i]) or _is_none(operands[i + 1])
            ):
                self._reject(operands[i], f"'{_COMPARE[type(op)][0]}'", "is only allowed against None")
        self._check_all(operands)

    def _check_BoolOp(self, node: ast.BoolOp) -> None:
        self._check_all(node.values)

    def _check_BinOp(self, node: ast.BinOp) -> None:
        if type(node.op) not in _BINARY:
            self._reject(node, f"operator {_FORBIDDEN_OPERATORS.get(type(node.op), type(node.op).__name__)}")
        self._check_all([node.left, node.right])

    def _check_UnaryOp(self, node: ast.UnaryOp) -> None:
        if type(node.op) not in _UNARY:
            self._reject(node, f"operator {_FORBIDDEN_OPERATORS.get(type(node.op), type(node.op).__name__)}")
        self.check(node.operand)

    def _check_IfExp(self, node: ast.IfExp) -> None:
        self._check_all([node.test, node.body, node.orelse])

    def _check_List(self, node: ast.List) -> None:
        self._check_all(node.elts)

    def _check_Tuple(self, node: ast.Tuple) -> None:
        self._check_all(node.elts)

    def _check_Set(self, node: ast.Set) -> None:
        self._check_all(node.elts)

    def _check_Dict(self, node: ast.Dict) -> None:
        if any(key is None for key in node.keys):
            self._reject(node, "dict unpacking (**)")
        self._check_all([*node.keys, *node.values])


# -- compilation -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Code:
    """A compiled sub-expression: its closure, and its value when it is constant."""

    fn: Evaluator
    is_constant: bool = False
    value: Any = None


_NO_ROW: Row = {}


def _constant(value: Any) -> Evaluator:
    """A closure that returns ``value`` without looking at the row."""
    return lambda _row: value


def _fold(fn: Evaluator, parts: Sequence[_Code]) -> _Code:
    """Precompute ``fn`` when every part is constant; keep it lazy if that fails."""
    if not all(part.is_constant for part in parts):
        return _Code(fn)
    try:
        value = fn(_NO_ROW)
    except ExpressionEvaluationError:
        return _Code(fn)
    return _Code(_constant(value), True, value)


def _fields_listing(container: Any) -> str:
    """The keys of a row-like value, for error messages."""
    keys = [str(k) for k in container] if isinstance(container, Mapping) else []
    if not keys:
        return "the row has no fields"
    shown = ", ".join(keys[:20]) + (f" (and {len(keys) - 20} more)" if len(keys) > 20 else "")
    return f"available fields: {shown}"


class _Compiler:
    """Turns a checked expression tree into closures over the row."""

    def __init__(self, text: str) -> None:
        self.text = text
        # lines as UTF-8 (ast offsets count bytes), split once: ast.get_source_segment splits the whole text
        # again for every node, which made a 3,000-term condition take minutes to load
        self._lines = [line.encode() for line in _LINES.findall(text)]

    def compile(self, node: ast.expr) -> _Code:
        """Compile ``node`` (already whitelisted by ``_Checker``)."""
        method: Callable[[Any], _Code] = getattr(self, f"_compile_{type(node).__name__}")
        return method(node)

    def _source(self, node: ast.AST) -> str:
        """The text of ``node``, as ``ast.get_source_segment`` gives it."""
        end_line, end_col = getattr(node, "end_lineno", None), getattr(node, "end_col_offset", None)
        if end_line is None or end_col is None:
            return self.text
        first, last, start = node.lineno - 1, end_line - 1, node.col_offset  # type: ignore[attr-defined]
        if first == last:
            return self._lines[first][start:end_col].decode() or self.text
        middle = self._lines[first + 1:last]
        return b"".join([self._lines[first][start:], *middle, self._lines[last][:end_col]]).decode() or self.text

    def _compile_Constant(self, node: ast.Constant) -> _Code:
        return _Code(_constant(node.value), True, node.value)

    def _compile_Name(self, node: ast.Name) -> _Code:
        return _Code(lambda row: row)

    def _compile_Subscript(self, node: ast.Subscript) -> _Code:
        container, key = self.compile(node.value), self.compile(node.slice)
        where = self._source(node)
        if _is_row(node.value) and key.is_constant:
            return _Code(_field_getter(key.value, where))
        get_container, get_key = container.fn, key.fn

        def subscript(row: Row) -> Any:
            value, k = get_container(row), get_key(row)
            try:
                return value[k]
            except (KeyError, IndexError, TypeError) as exc:
                raise _subscript_error(value, k, where, exc) from exc

        return _Code(subscript)

    def _compile_Call(self, node: ast.Call) -> _Code:
        args = [self.compile(arg).fn for arg in node.args]
        get_key = args[0]
        get_default = args[1] if len(args) == 2 else _constant(None)
        where = self._source(node)

        def row_get(row: Row) -> Any:
            try:
                return row.get(get_key(row), get_default(row))
            except TypeError as exc:
                raise ExpressionEvaluationError(f"invalid key in `{where}`: {exc}") from exc

        return _Code(row_get)

    def _compile_Compare(self, node: ast.Compare) -> _Code:
        parts = [self.compile(n) for n in (node.left, *node.comparators)]
        ops = [_COMPARE[type(op)] for op in node.ops]
        where = self._source(node)
        if len(ops) == 1:
            return _fold(_comparison(ops[0], parts[0], parts[1], where), parts)
        fns = [p.fn for p in parts]

        def chained(row: Row) -> bool:
            left = fns[0](row)
            for (symbol, op), right_fn in zip(ops, fns[1:], strict=True):
                right = right_fn(row)
                try:
                    if not op(left, right):
                        return False
                except TypeError as exc:
                    raise _operator_error(symbol, left, right, where) from exc
                left = right
            return True

        return _fold(chained, parts)

    def _compile_BoolOp(self, node: ast.BoolOp) -> _Code:
        parts = [self.compile(v) for v in node.values]
        fns = [p.fn for p in parts]
        is_and = isinstance(node.op, ast.And)
        if len(fns) == 2:
            first, second = fns
            pair: Evaluator = (
                (lambda row: first(row) and second(row))
                if is_and
                else (lambda row: first(row) or second(row))
            )
            return _fold(pair, parts)

        def bool_op(row: Row) -> Any:
            result: Any = None
            for fn in fns:
                result = fn(row)
                if bool(result) is not is_and:
                    return result
            return result

        return _fold(bool_op, parts)

    def _compile_UnaryOp(self, node: ast.UnaryOp) -> _Code:
        operand = self.compile(node.operand)
        symbol, op = _UNARY[type(node.op)]
        get, where = operand.fn, self._source(node)

        def unary(row: Row) -> Any:
            value = get(row)
            try:
                return op(value)
            except TypeError as exc:
                raise ExpressionEvaluationError(
                    f"cannot apply unary '{symbol}' to {type(value).__name__} in `{where}`"
                ) from exc

        return _fold(unary, [operand])

    def _compile_BinOp(self, node: ast.BinOp) -> _Code:
        left, right = self.compile(node.left), self.compile(node.right)
        symbol, op = _BINARY[type(node.op)]
        get_left, get_right, where = left.fn, right.fn, self._source(node)

        def binary(row: Row) -> Any:
            a, b = get_left(row), get_right(row)
            if symbol in ("*", "%"):
                _check_size(symbol, a, b, where)
            try:
                return op(a, b)
            except ZeroDivisionError as exc:
                raise ExpressionEvaluationError(f"division by zero in `{where}`") from exc
            except (TypeError, ValueError, OverflowError) as exc:
                raise _operator_error(symbol, a, b, where) from exc

        if symbol in ("*", "%") and any(isinstance(p.value, str | list | tuple) for p in (left, right)):
            return _Code(binary)  # never fold sequence repetition or formatting: unbounded size
        return _fold(binary, [left, right])

    def _compile_IfExp(self, node: ast.IfExp) -> _Code:
        parts = [self.compile(n) for n in (node.test, node.body, node.orelse)]
        test, body, orelse = (p.fn for p in parts)
        return _fold(lambda row: body(row) if test(row) else orelse(row), parts)

    def _compile_List(self, node: ast.List) -> _Code:
        parts = [self.compile(e) for e in node.elts]
        fns = [p.fn for p in parts]
        return _fold(lambda row: [fn(row) for fn in fns], parts)

    def _compile_Tuple(self, node: ast.Tuple) -> _Code:
        parts = [self.compile(e) for e in node.elts]
        fns = [p.fn for p in parts]
        return _fold(lambda row: tuple(fn(row) for fn in fns), parts)

    def _compile_Set(self, node: ast.Set) -> _Code:
        parts = [self.compile(e) for e in node.elts]
        fns, where = [p.fn for p in parts], self._source(node)

        def build_set(row: Row) -> set[Any]:
            try:
                return {fn(row) for fn in fns}
            except TypeError as exc:
                raise ExpressionEvaluationError(f"cannot build the set `{where}`: {exc}") from exc

        return _fold(build_set, parts)

    def _compile_Dict(self, node: ast.Dict) -> _Code:
        keys = [self.compile(k) for k in node.keys if k is not None]
        values = [self.compile(v) for v in node.values]
        pairs = [(k.fn, v.fn) for k, v in zip(keys, values, strict=True)]
        where = self._source(node)

        def build_dict(row: Row) -> dict[Any, Any]:
            try:
                return {k(row): v(row) for k, v in pairs}
            except TypeError as exc:
                raise ExpressionEvaluationError(f"cannot build the dict `{where}`: {exc}") from exc

        return _fold(build_dict, [*keys, *values])


def _comparison(
    entry: tuple[str, Callable[[Any, Any], Any]], left: _Code, right: _Code, where: str
) -> Evaluator:
    """One comparison (the common case); a constant right-hand side is captured once."""
    symbol, op = entry
    get_left = left.fn
    if right.is_constant:
        value = right.value

        def compare_constant(row: Row) -> Any:
            a = get_left(row)
            try:
                return op(a, value)
            except TypeError as exc:
                raise _operator_error(symbol, a, value, where) from exc

        return compare_constant
    get_right = right.fn

    def compare(row: Row) -> Any:
        a, b = get_left(row), get_right(row)
        try:
            return op(a, b)
        except TypeError as exc:
            raise _operator_error(symbol, a, b, where) from exc

    return compare


def _field_getter(key: Any, where: str) -> Evaluator:
    """The hot path ``row['field']``: one dict lookup, a helpful error when it misses."""

    def get_field(row: Row) -> Any:
        try:
            return row[key]
        except (KeyError, TypeError) as exc:
            raise _subscript_error(row, key, where, exc) from exc

    return get_field


def _subscript_error(container: Any, key: Any, where: str, exc: Exception) -> ExpressionEvaluationError:
    """Explain a failed ``container[key]``: which field is missing and which exist."""
    if isinstance(exc, KeyError) and isinstance(container, Mapping):
        return ExpressionEvaluationError(
            f"field {key!r} not found in `{where}`; {_fields_listing(container)}"
        )
    if isinstance(exc, IndexError):
        return ExpressionEvaluationError(f"index {key!r} out of range in `{where}` (length {len(container)})")
    return ExpressionEvaluationError(f"cannot look up {key!r} in a {type(container).__name__} in `{where}`")


def _check_size(symbol: str, left: Any, right: Any, where: str) -> None:
    """Refuse a repetition or %-format that would build more than MAX_BUILT_LENGTH items (``'a' * 10**12``)."""
    if symbol == "*":
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, str | list | tuple) and isinstance(times, int) and len(seq) * times > MAX_BUILT_LENGTH:
                raise ExpressionEvaluationError(
                    f"`{where}` would build {len(seq) * times:,} items; the limit is {MAX_BUILT_LENGTH:,}")
    elif isinstance(left, str):
        conversions = [(width, precision) for whole, width, precision in _FORMAT_WIDTHS.findall(left)
                       if whole != "%"]
        sizes = [int(n) for pair in conversions for n in pair if n.isdigit()]
        if any("*" in pair for pair in conversions):  # the width or precision is taken from the arguments
            sizes += [abs(v) for v in (right if isinstance(right, tuple) else (right,)) if type(v) is int]
        if sizes and max(sizes) > MAX_BUILT_LENGTH:
            raise ExpressionEvaluationError(
                f"`{where}` asks for a field {max(sizes):,} characters wide; the limit is {MAX_BUILT_LENGTH:,}")


def _operator_error(symbol: str, left: Any, right: Any, where: str) -> ExpressionEvaluationError:
    """Explain an operator applied to values of the wrong types."""
    return ExpressionEvaluationError(
        f"cannot apply '{symbol}' to {type(left).__name__} {left!r} and "
        f"{type(right).__name__} {right!r} in `{where}`"
    )


__all__ = ["Condition", "Evaluator", "ExpressionEvaluationError", "Row", "compile_condition"]

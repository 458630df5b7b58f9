"""Gate conditions: the whitelist, evaluation, runtime errors, boolean classification, folding."""

from __future__ import annotations

import ast
import builtins
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from elspeth_nb.engine.expressions import Condition, ExpressionEvaluationError, compile_condition
from elspeth_nb.errors import ConfigError, Error

ROW: dict[str, Any] = {
    "a": 3,
    "s": "books",
    "flag": True,
    "tags": ["x", "y"],
    "nested": {"k": 5, "list": [10, 20]},
    "none": None,
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("row['a'] == 3", True),
        ("row['a'] != 3", False),
        ("row['a'] < 4", True),
        ("row['a'] <= 3", True),
        ("row['a'] > 3", False),
        ("row['a'] >= 3", True),
        ("1 < row['a'] < 10", True),
        ("1 < row['a'] < 2", False),
        ("'x' in row['tags']", True),
        ("'z' not in row['tags']", True),
        ("'a' in row", True),
        ("row['none'] is None", True),
        ("row.get('missing') is None", True),
        ("row.get('a') is not None", True),
        ("None is row.get('missing')", True),
        ("row.get('missing', 5) + 1", 6),
        ("row.get('s')", "books"),
        ("row['nested']['k']", 5),
        ("row['nested']['list'][1]", 20),
        ("row.get('nested')['k']", 5),
        ("-row['a']", -3),
        ("+row['a']", 3),
        ("not row['flag']", False),
        ("row['a'] * 2 - 1", 5),
        ("row['a'] / 2", 1.5),
        ("row['a'] // 2", 1),
        ("row['a'] % 2", 1),
        ("row['s'] + '!'", "books!"),
        ("'big' if row['a'] > 2 else 'small'", "big"),
        ("'big' if row['a'] > 5 else 'small'", "small"),
        ("row['a'] in [1, 3]", True),
        ("row['a'] in (1, 2)", False),
        ("row['s'] in {'books', 'toys'}", True),
        ("row['s'] in {'books': 1}", True),
        ("row['a'] > 0 and row['s']", "books"),
        ("row['a'] < 0 or 'fallback'", "fallback"),
        ("row['a'] < 0 and row['missing']", False),
        ("row.get('missing') and row['missing']['deeper']", None),
        ("[row['a'], row['s']]", [3, "books"]),
        ("(row['a'], 1)", (3, 1)),
        ("{'n': row['a']}", {"n": 3}),
        ("row['a'] == 3.0", True),
        ("'label'", "label"),
        ("None", None),
        ("True", True),
        ("False", False),
    ],
)
def test_allowed_forms_evaluate(text: str, expected: Any) -> None:
    assert compile_condition(text)(ROW) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("x > 1", "name 'x' is not allowed; only `row` is (at column 1)"),
        ("row['a'] > limit", "name 'limit' is not allowed; only `row` is (at column 12)"),
        ("__import__('os')", "function call __import__() is not allowed"),
        (
            "__builtins__",
            "name '__builtins__' is not allowed; only `row` is (dunder names are never allowed)",
        ),
        ("len(row)", "function call len() is not allowed; only row.get(...) is"),
        ("row.keys()", "function call keys() is not allowed"),
        ("row['s'].upper()", "function call upper() is not allowed"),
        ("row.items", "attribute access '.items' is not allowed; only row.get(...) is"),
        ("row.get", "attribute access '.get' is not allowed"),
        ("row.__class__", "dunder attribute '__class__' is not allowed"),
        ("row['a'].__class__", "dunder attribute '__class__' is not allowed (at column 1)"),
        ("lambda: 1", "lambda is not allowed"),
        ("[v for v in row]", "list comprehension is not allowed"),
        ("{v for v in row}", "set comprehension is not allowed"),
        ("{v: 1 for v in row}", "dict comprehension is not allowed"),
        ("(v for v in row)", "generator expression is not allowed"),
        ("f'{row}'", "f-string is not allowed"),
        ("(y := 1)", "assignment expression (:=) is not allowed (at column 2)"),
        ("[*row]", "starred expression (*) is not allowed (at column 2)"),
        ("row['s'][1:2]", "slice is not allowed (at column 10)"),
        ("row['a'] ** 2", "operator '**' is not allowed"),
        ("row['a'] @ 2", "operator '@' is not allowed"),
        ("row['a'] | 1", "operator '|' is not allowed"),
        ("row['a'] << 1", "operator '<<' is not allowed"),
        ("~row['a']", "operator '~' is not allowed"),
        ("row['a'] is 3", "'is' is only allowed against None (at column 1)"),
        ("row['a'] is not row['s']", "'is not' is only allowed against None"),
        ("[1, 2][0]", "subscript is only allowed on row values"),
        ("'abc'[0]", "subscript is only allowed on row values"),
        ("{**row}", "dict unpacking (**) is not allowed"),
        ("row.get()", "row.get() with 0 arguments is not allowed; use row.get(key[, default])"),
        ("row.get('a', 1, 2)", "row.get() with 3 arguments is not allowed"),
        ("row.get(key='a')", "keyword arguments are not allowed in row.get()"),
        ("b'x' == row['s']", "a bytes literal is not allowed"),
        ("1j", "a complex literal is not allowed"),
        ("...", "a ellipsis literal is not allowed"),
        ("import os", "syntax error: invalid syntax"),
        ("row['a'] >", "syntax error"),
        ("row['a'] = 1", "syntax error"),
        ("", "the expression is empty"),
        ("   ", "the expression is empty"),
    ],
)
def test_forbidden_constructs_are_rejected(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        compile_condition(text)
    assert any(p.startswith("condition: ") and fragment in p for p in info.value.problems), (
        info.value.problems
    )


def test_every_forbidden_construct_is_listed_with_where_prefix() -> None:
    with pytest.raises(ConfigError) as info:
        compile_condition("x + len(row) ** 2", where="gates[0].condition")
    problems = info.value.problems
    assert problems == [
        "gates[0].condition: name 'x' is not allowed; only `row` is (at column 1)",
        "gates[0].condition: operator '**' is not allowed (at column 5)",
        "gates[0].condition: function call len() is not allowed; only row.get(...) is (at column 5)",
    ]


def test_empty_where_gives_bare_messages() -> None:
    with pytest.raises(ConfigError) as info:
        compile_condition("x", where="")
    assert info.value.problems == ["name 'x' is not allowed; only `row` is (at column 1)"]


def test_never_uses_eval_exec_or_compile_beyond_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    real_compile = builtins.compile

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("eval/exec must never run")

    def ast_only(source: Any, filename: Any, mode: Any, flags: int = 0, *args: Any, **kwargs: Any) -> Any:
        assert flags & ast.PyCF_ONLY_AST, "compile() may only build an AST"
        return real_compile(source, filename, mode, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    monkeypatch.setattr(builtins, "compile", ast_only)
    condition = compile_condition("row['a'] > 2 and row.get('s') in ['books', 'toys']")
    assert condition(ROW) is True


def test_missing_field_names_it_and_lists_available_fields() -> None:
    condition = compile_condition("row['amount'] > 100")
    with pytest.raises(ExpressionEvaluationError) as info:
        condition({"id": 1, "name": "x"})
    message = str(info.value)
    assert message == "field 'amount' not found in `row['amount']`; available fields: id, name"
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, Error)


def test_missing_nested_key_names_the_sub_expression() -> None:
    with pytest.raises(
        ExpressionEvaluationError,
        match=r"field 'zz' not found in `row\['nested'\]\['zz'\]`; "
        r"available fields: k, list",
    ):
        compile_condition("row['nested']['zz'] == 1")(ROW)


def test_empty_row_says_it_has_no_fields() -> None:
    with pytest.raises(ExpressionEvaluationError, match="the row has no fields"):
        compile_condition("row['a']")({})


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("row['s'] > 1", "cannot apply '>' to str 'books' and int 1 in `row['s'] > 1`"),
        ("row['s'] - 1", "cannot apply '-' to str 'books' and int 1"),
        ("row['a'] / row['nested']['k'] / 0", "division by zero in `row['a'] / row['nested']['k'] / 0`"),
        ("row['a'] % 0", "division by zero"),
        ("row['nested']['list'][5]", "index 5 out of range in `row['nested']['list'][5]` (length 2)"),
        ("row['a']['x']", "cannot look up 'x' in a int"),
        ("-row['s']", "cannot apply unary '-' to str"),
        ("1 in row['a']", "cannot apply 'in' to int 1 and int 3"),
        ("{row['tags']}", "cannot build the set"),
        ("{row['tags']: 1}", "cannot build the dict"),
        ("row.get(row['tags'])", "invalid key in `row.get(row['tags'])`"),
    ],
)
def test_runtime_failures_raise_evaluation_errors(text: str, fragment: str) -> None:
    with pytest.raises(ExpressionEvaluationError) as info:
        compile_condition(text)(ROW)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("text", "is_boolean"),
    [
        ("row['a'] > 1", True),
        ("row['a'] == 1 and row['b'] < 2", True),
        ("row['a'] == 1 or not row['b']", True),
        ("not row['a']", True),
        ("'x' in row['tags']", True),
        ("row.get('a') is None", True),
        ("True", True),
        ("False", True),
        ("row['a'] > 1 if row['flag'] else False", True),
        ("row['a'] > 1 or row['b']", False),
        ("row['a']", False),
        ("row.get('a')", False),
        ("'x' if row['a'] else 'y'", False),
        ("row['a'] + 1", False),
        ("1", False),
        ("None", False),
        ("'true'", False),
    ],
)
def test_is_boolean_classification(text: str, is_boolean: bool) -> None:
    assert compile_condition(text).is_boolean is is_boolean


class _Untouchable(Mapping[str, Any]):
    """A row that fails the test if anything looks at it."""

    def __getitem__(self, key: str) -> Any:
        raise AssertionError("the row was read")

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("the row was read")

    def __len__(self) -> int:
        raise AssertionError("the row was read")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("True", True),
        ("False", False),
        ("1 + 2 * 3", 7),
        ("'a' in ['a', 'b']", True),
        ("not (1 > 2)", True),
        ("'yes' if 1 < 2 else 'no'", "yes"),
        ("{'k': [1, 2]}", {"k": [1, 2]}),
    ],
)
def test_constant_expressions_fold_and_never_touch_the_row(text: str, value: Any) -> None:
    condition = compile_condition(text)
    assert condition.is_constant
    assert condition(_Untouchable()) == value


def test_failing_or_unbounded_constants_are_not_folded() -> None:
    division = compile_condition("1 / 0")
    assert not division.is_constant
    with pytest.raises(ExpressionEvaluationError, match="division by zero"):
        division({})
    repeat = compile_condition("'ab' * 3")
    assert not repeat.is_constant
    assert repeat({}) == "ababab"


def test_partially_constant_expression_is_not_constant() -> None:
    condition = compile_condition("row['a'] > 1 + 1")
    assert not condition.is_constant
    assert condition({"a": 3}) is True


def test_condition_keeps_its_text_and_compares_by_text() -> None:
    condition = compile_condition("row['a'] > 1")
    assert isinstance(condition, Condition)
    assert condition.text == "row['a'] > 1"
    assert condition == compile_condition("row['a'] > 1")
    assert condition.evaluate({"a": 2}) is True


@pytest.mark.parametrize("text", [
    "row['note'] == 'café' and row['x'] > 1",
    "((row['a']\n  + row['b']) * 2 >= row['c'] or\r\n row['d'] in ('é', 'ü'))",
    "'ü' * 2 + row['s'] if row['t'] else {row['u'], 1}",
])
def test_each_node_is_quoted_as_ast_quotes_it(text: str) -> None:
    from elspeth_nb.engine.expressions import _Compiler

    compiler = _Compiler(text)
    for node in ast.walk(ast.parse(text, mode="eval").body):
        assert compiler._source(node) == (ast.get_source_segment(text, node) or text)


def test_a_condition_of_thousands_of_terms_loads_in_a_moment() -> None:
    import time

    text = " or ".join(f"row['id'] == '{i}'" for i in range(3000))
    started = time.perf_counter()
    condition = compile_condition(text)
    assert time.perf_counter() - started < 5  # quoting each node rescanned the whole text: 218 s
    assert condition.evaluate({"id": "2999"}) is True


@pytest.mark.parametrize(("text", "fragment"), [
    ("'a' * 3000000000 == row['name']", "`'a' * 3000000000` would build 3,000,000,000 items; the limit is 1,000,000"),
    ("row['n'] * [0] == []", "would build 2,000,000 items"),
    ("'%0999999999d' % row['n'] == 'x'", "asks for a field 999,999,999 characters wide"),
    ("'%.2000001f' % row['n'] == 'x'", "asks for a field 2,000,001 characters wide"),
    ("'%*d' % (row['n'], 1) == 'x'", "asks for a field 2,000,000 characters wide"),
    ("'%.*f' % (row['n'], 1.5) == 'x'", "asks for a field 2,000,000 characters wide"),
])
def test_building_huge_text_or_lists_is_an_evaluation_error(text: str, fragment: str) -> None:
    with pytest.raises(ExpressionEvaluationError) as caught:
        compile_condition(text).evaluate({"name": "a", "n": 2_000_000})
    assert fragment in str(caught.value)
    assert compile_condition("row['name'] * 3 == 'aaa' and '%05.1f' % 2.25 == '002.2'").evaluate({"name": "a"})
    assert compile_condition("'%%2000000d %s' % row['name'] == '%2000000d a'").evaluate({"name": "a"})  # %% is text

"""DocumentShape: depth with introspection counted, aliases with fragments expanded, in linear time."""

from __future__ import annotations

import pytest
from graphql import get_introspection_query, parse, specified_rules, validate

from app.api.schema import schema
from app.api.shape import shape_rule

RULE = shape_rule(max_depth=15, max_aliases=50)


def _errors(document: str) -> list[str]:
    return [error.message for error in validate(schema._schema, parse(document), [*specified_rules, RULE])]


def _doubling(levels: int, leaf: str) -> str:
    fragments = "".join(f"fragment F{i} on Query {{ ...F{i + 1} ...F{i + 1} }}\n" for i in range(levels))
    return f"query {{ ...F0 }}\n{fragments}fragment F{levels} on Query {{ {leaf} }}"


def test_graphiqls_introspection_is_15_deep_and_passes() -> None:
    assert _errors(get_introspection_query(descriptions=True)) == []


@pytest.mark.parametrize("depth", [16, 40])
def test_deeper_introspection_is_refused(depth: int) -> None:
    inner = "name"
    for _ in range(depth - 5):
        inner = f"ofType {{ {inner} }}"
    document = f"query Deep {{ __schema {{ types {{ fields {{ type {{ {inner} }} }} }} }} }}"
    assert _errors(document) == [
        f"operation 'Deep' is {depth} fields deep; at most 15 are allowed (introspection fields count too)"
    ]


def test_depth_counts_through_fragments_and_inline_fragments() -> None:
    chain = "".join(f"fragment F{i} on __Type {{ ofType {{ ...F{i + 1} }} }}\n" for i in range(12))
    root = "{ __schema { types { ... on __Type { ...F0 } } } }\n"
    document = root + chain + "fragment F12 on __Type { name }"
    assert _errors(document) == []  # 2 + 12 + 1 = 15 fields: passes
    deeper = root + chain + "fragment F12 on __Type { ofType { name } }"
    assert _errors(deeper) == [
        "the operation is 16 fields deep; at most 15 are allowed (introspection fields count too)"
    ]


def test_aliases_count_each_spread_and_doubling_fragments_cost_no_more_than_their_text() -> None:
    assert _errors(_doubling(3, "a: __typename")) == []  # 8 aliases
    assert _errors(_doubling(6, "a: __typename")) == [
        "the operation has 64 aliased fields (fragments expanded); at most 50 are allowed"
    ]
    # 2^60 aliases once expanded: a walk that expands each spread never ends.
    assert _errors(_doubling(60, "a: __typename")) == [
        "the operation has over 10^9 aliased fields (fragments expanded); at most 50 are allowed"
    ]
    assert _errors(_doubling(60, "__typename")) == []


def test_long_chains_cycles_and_unknown_fragments_are_left_to_graphql_cores_rules() -> None:
    chain = "".join(f"fragment F{i} on Query {{ ...F{i + 1} }}\n" for i in range(2000))
    errors = _errors("query { ...F0 }\n" + chain + "fragment F2000 on Query { __typename }")
    assert not any("deep" in e or "alias" in e for e in errors)  # no recursion here to run out of
    assert _errors("{ ...A } fragment A on Query { ...B } fragment B on Query { ...A }") == [
        "Cannot spread fragment 'A' within itself via 'B'."
    ]
    assert _errors("{ ...Nowhere }") == ["Unknown fragment 'Nowhere'."]

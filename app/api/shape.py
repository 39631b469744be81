"""DocumentShape: bounds on a document's depth and aliases, found in time linear in its size.

Strawberry's QueryDepthLimiter skips every field that starts with __, so an introspection query of
any depth passes it (__type { fields { type { fields ... } } } nests without end). It and its
MaxAliasesLimiter also walk a fragment again at each of its spreads: fragments that each spread the
next one twice cost 2^n steps, and 30 of them (600 tokens) would hold the server for hours. Here each
fragment is measured once, and introspection fields count like any other.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from graphql import (
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    InlineFragmentNode,
    OperationDefinitionNode,
    SelectionSetNode,
    ValidationContext,
    ValidationRule,
)
from strawberry.extensions import AddValidationRules


@dataclass(frozen=True, slots=True)
class Shape:
    """Fields on the longest path down, and aliased fields, with every fragment spread expanded."""

    depth: int = 0
    aliases: int = 0


def _spreads(selection_set: SelectionSetNode) -> set[str]:
    """The fragments a selection set spreads, at any depth."""
    names: set[str] = set()
    pending = [selection_set]
    while pending:
        for selection in pending.pop().selections:
            if isinstance(selection, FragmentSpreadNode):
                names.add(selection.name.value)
            elif isinstance(selection, FieldNode | InlineFragmentNode) and selection.selection_set:
                pending.append(selection.selection_set)
    return names


def _measure(selection_set: SelectionSetNode, fragments: dict[str, Shape]) -> Shape:
    """The shape of a selection set, its spreads' fragments measured already."""
    depth = aliases = 0
    pending = [(selection_set, 0)]
    while pending:
        node, above = pending.pop()
        for selection in node.selections:
            if isinstance(selection, FieldNode):
                aliases += selection.alias is not None
                if selection.selection_set:
                    pending.append((selection.selection_set, above + 1))
                else:
                    depth = max(depth, above + 1)
            elif isinstance(selection, InlineFragmentNode):
                pending.append((selection.selection_set, above))
            elif isinstance(selection, FragmentSpreadNode):
                # Unknown fragments and cycles count nothing here; graphql-core's own rules refuse them.
                spread = fragments.get(selection.name.value, Shape())
                depth = max(depth, above + spread.depth)
                aliases += spread.aliases
    return Shape(depth=depth, aliases=aliases)


def _fragment_shapes(fragments: dict[str, FragmentDefinitionNode]) -> dict[str, Shape]:
    """Each fragment's shape, those it spreads measured first (no recursion: chains may be long)."""
    spreads = {name: _spreads(fragment.selection_set) for name, fragment in fragments.items()}
    shapes: dict[str, Shape] = {}
    entered: set[str] = set()
    for root in fragments:
        stack = [root]
        while stack:
            name = stack[-1]
            if name in shapes:
                stack.pop()
            elif name not in entered:
                entered.add(name)
                stack.extend(n for n in spreads[name] if n in fragments and n not in entered)
            else:
                stack.pop()
                shapes[name] = _measure(fragments[name].selection_set, shapes)
    return shapes


def _shown(count: int) -> str:
    return str(count) if count < 10**9 else "over 10^9"  # doubling fragments reach any number


@functools.cache
def shape_rule(*, max_depth: int, max_aliases: int) -> type[ValidationRule]:
    """A validation rule refusing operations over max_depth fields deep or with over max_aliases aliases.

    One class per pair of limits, so a cached validation knows the same rules ran.
    """

    class ShapeRule(ValidationRule):
        def __init__(self, context: ValidationContext) -> None:
            super().__init__(context)
            definitions = context.document.definitions
            fragments = {d.name.value: d for d in definitions if isinstance(d, FragmentDefinitionNode)}
            shapes = _fragment_shapes(fragments)
            for operation in definitions:
                if not isinstance(operation, OperationDefinitionNode):
                    continue
                shape = _measure(operation.selection_set, shapes)
                name = f"operation {operation.name.value!r}" if operation.name else "the operation"
                if shape.depth > max_depth:
                    context.report_error(
                        GraphQLError(
                            f"{name} is {shape.depth} fields deep; at most {max_depth} are "
                            "allowed (introspection fields count too)",
                            operation,
                        )
                    )
                if shape.aliases > max_aliases:
                    context.report_error(
                        GraphQLError(
                            f"{name} has {_shown(shape.aliases)} aliased fields (fragments expanded); "
                            f"at most {max_aliases} are allowed",
                            operation,
                        )
                    )

    return ShapeRule


class DocumentShape(AddValidationRules):
    """Refuses operations past a depth (introspection included) or a number of aliases."""

    def __init__(self, *, max_depth: int, max_aliases: int) -> None:
        super().__init__([shape_rule(max_depth=max_depth, max_aliases=max_aliases)])

"""Merges the domain root types into one strawberry.Schema with its extensions."""

from __future__ import annotations

import logging

import strawberry
from graphql.error import GraphQLError
from strawberry.extensions import MaxAliasesLimiter, MaxTokensLimiter, QueryDepthLimiter
from strawberry.tools import merge_types
from strawberry.types import ExecutionContext

from app.api.capsules import CapsuleMutation, CapsuleQuery
from app.api.errors import ErrorCodes, is_not_unicode
from app.api.exec import ExecMutation
from app.api.output import OutputSubscription
from app.api.processes import ProcessMutation, ProcessQuery, ProcessSubscription
from app.errors import CapsuleError

logger = logging.getLogger(__name__)

Query = merge_types("Query", (CapsuleQuery, ProcessQuery))
Mutation = merge_types("Mutation", (CapsuleMutation, ExecMutation, ProcessMutation))
Subscription = merge_types("Subscription", (OutputSubscription, ProcessSubscription))


class Schema(strawberry.Schema):
    """Logs expected errors quietly and bugs once, with their traceback."""

    def process_errors(
        self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None
    ) -> None:
        for error in errors:
            original = error.original_error
            if original is None or isinstance(original, CapsuleError | GraphQLError) or is_not_unicode(error):
                logger.debug("request error: %s", error.message)
            else:
                logger.error("unexpected error in %s", error.path, exc_info=original)


# Bounds on a document's shape, far above what the contract's operations need, so that a hostile
# query costs little to refuse; GraphiQL's introspection passes them.
schema = Schema(
    query=Query,
    mutation=Mutation,
    subscription=Subscription,
    extensions=[
        ErrorCodes,
        lambda: QueryDepthLimiter(max_depth=8),
        lambda: MaxTokensLimiter(max_token_count=5000),
        lambda: MaxAliasesLimiter(max_alias_count=50),
    ],
)

if __name__ == "__main__":  # python -m app.api.schema > schema.graphql
    print(schema.as_str())

"""Merges the domain root types into one strawberry.Schema with its extensions."""

from __future__ import annotations

import logging

import strawberry
from graphql.error import GraphQLError
from strawberry.tools import merge_types
from strawberry.types import ExecutionContext

from app.api.capsules import CapsuleMutation, CapsuleQuery
from app.api.documents import Documents
from app.api.errors import ErrorCodes, internal_error, is_bug
from app.api.exec import ExecMutation
from app.api.observe import OperationMetrics
from app.api.output import OutputSubscription
from app.api.processes import ProcessMutation, ProcessQuery, ProcessSubscription
from app.api.shape import shape_rule
from app.api.sharing import SharingExecutor

logger = logging.getLogger(__name__)

Query = merge_types("Query", (CapsuleQuery, ProcessQuery))
Mutation = merge_types("Mutation", (CapsuleMutation, ExecMutation, ProcessMutation))
Subscription = merge_types("Subscription", (OutputSubscription, ProcessSubscription))


class Schema(strawberry.Schema):
    """Logs expected errors quietly and bugs once, with their traceback and errorId."""

    def process_errors(
        self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None
    ) -> None:
        # Bugs are masked here, where strawberry hands over every error first, in the very list it
        # answers with: its MaskErrors never sees an exception raised while a document is validated.
        for index, error in enumerate(errors):
            if is_bug(error):
                errors[index] = internal_error(error)  # logs it, with the id the client gets
            else:
                logger.debug("request error: %s", error.message)


# Bounds on a document's shape, far above what the contract's operations need (3 fields deep at
# most), so that a hostile query costs little to refuse. The introspection query of GraphiQL and of
# graphql-core (9 levels of ofType) is 15 fields deep: it passes, and nothing deeper does.
MAX_DEPTH = 15
MAX_ALIASES = 50
MAX_TOKENS = 5000

schema = Schema(
    query=Query,
    mutation=Mutation,
    subscription=Subscription,
    extensions=[
        # First, so that it sees each result last: its errors' codes as the client gets them.
        OperationMetrics,
        ErrorCodes,
        # The token bound and the shape limits; each document parsed and validated once, not per request.
        lambda: Documents(
            max_tokens=MAX_TOKENS, rules=(shape_rule(max_depth=MAX_DEPTH, max_aliases=MAX_ALIASES),)
        ),
    ],
    # A process's output event runs once per document, variables and team, whoever subscribed.
    execution_context_class=SharingExecutor,
)

if __name__ == "__main__":  # python -m app.api.schema > schema.graphql
    print(schema.as_str())

"""Parsing and validation once per document: a document sent again (each viewer's subscribe, each
startProcess) costs two dictionary lookups instead of graphql-core's parser and validation.

The parse cache hands out the one DocumentNode it parsed for a query text, so validation is cached
here by that node's identity and the rules that ran on it (our DocumentShape limits among
them): a document is checked against every rule once, and each request gets its own copy of the
errors found, which the schema's error handling may rewrite in place.
"""

from __future__ import annotations

import contextlib
import functools
from collections import OrderedDict
from collections.abc import Iterator

from graphql import ASTValidationRule, DocumentNode, GraphQLError, GraphQLSchema, parse
from strawberry.extensions import SchemaExtension
from strawberry.schema.schema import validate_document

# Documents kept (parsed, in ParserCache, and validated, here); the contract has about twenty.
DOCUMENTS_CACHED = 256

Rules = tuple[type[ASTValidationRule], ...]


class ValidatedDocuments:
    """The errors each recent (document, rules) pair validated to, the least recently used dropped."""

    def __init__(self, maxsize: int = DOCUMENTS_CACHED) -> None:
        self._maxsize = maxsize
        # id(document) -> (document, rules, errors); the document is held, so its id stays its own.
        self._entries: OrderedDict[int, tuple[DocumentNode, Rules, list[GraphQLError]]] = OrderedDict()

    def validate(self, schema: GraphQLSchema, document: DocumentNode, rules: Rules) -> list[GraphQLError]:
        """A fresh list of the errors of document under rules; validated on first sight only."""
        key = id(document)
        entry = self._entries.get(key)
        if entry is not None and entry[0] is document and entry[1] == rules:
            self._entries.move_to_end(key)
            return list(entry[2])
        errors = validate_document(schema, document, rules)
        self._entries[key] = (document, rules, errors)
        self._entries.move_to_end(key)
        while len(self._entries) > self._maxsize:
            self._entries.popitem(last=False)
        return list(errors)

    def __len__(self) -> int:
        return len(self._entries)


VALIDATED = ValidatedDocuments()

_parse = functools.lru_cache(maxsize=DOCUMENTS_CACHED)(parse)


class Documents(SchemaExtension):
    """A document's limits and its caches, as one extension: MaxTokensLimiter's token bound, the
    rules given (DocumentShape's), each query text parsed once and each document validated once.

    One extension rather than four, because strawberry walks every extension at each result of
    each subscription (its hooks, its results), which for thousands of viewers is most of the
    cost of an event beside the socket's own write.

    A text that does not parse is left to strawberry's own parse (unlike strawberry's ParserCache),
    whose error is answered as every other syntax error is: INVALID_REQUEST, not raised from here.
    """

    def __init__(self, *, max_tokens: int, rules: Rules = (), cache: ValidatedDocuments = VALIDATED) -> None:
        self._max_tokens, self._rules, self._cache = max_tokens, rules, cache

    def on_operation(self) -> Iterator[None]:
        context = self.execution_context
        context.parse_options["max_tokens"] = self._max_tokens
        context.validation_rules = context.validation_rules + self._rules
        yield

    def on_parse(self) -> Iterator[None]:
        context = self.execution_context
        if context.query and context.graphql_document is None:
            # One that does not parse is parsed again by strawberry, which reports its error.
            with contextlib.suppress(GraphQLError):
                context.graphql_document = _parse(context.query, **context.parse_options)
        yield

    def on_validate(self) -> Iterator[None]:
        context = self.execution_context
        document = context.graphql_document
        if document is not None and context.validation_rules and context.pre_execution_errors is None:
            context.pre_execution_errors = self._cache.validate(
                context.schema._schema, document, context.validation_rules
            )
        yield

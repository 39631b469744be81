"""schemathesis hooks for the GraphQL fuzz run (tests/fuzz/run.py loads them with SCHEMATHESIS_HOOKS).

The check `capsule_graphql_response` judges every answer: no 5xx, a well-formed GraphQL response
(a JSON object of data and/or errors, each error a message with one of ARCHITECTURE.md's codes),
and no INTERNAL. schemathesis's own GraphQL checks count every error with a path (a NOT_FOUND for a
made-up id) as a server failure, so the run uses this check alone.

`before_call` keeps the fuzzed commands harmless: every `cmd` the fuzzer writes is swapped, before
the request is sent, for one of a few programs that only print, or for a path that does not exist,
so `exec` and `startProcess` run for real with fuzzed args, envs, cwd and stdin. It also points half
of the `capsuleId` and `selector` arguments at the capsule and processes that run.py prepared
(FUZZ_CAPSULE_ID, FUZZ_SELECTORS), so that calls reach a running capsule's processes and not only
NOT_FOUND; which half is fixed by the generated value, so a case replays alike. A fuzzed
waitForProcess waits at most MAX_WAIT_SEC, within the client's read timeout.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

import graphql
import schemathesis
from schemathesis import Case, CheckContext, HookContext, Response

from app.errors import ErrorCode

CODES = frozenset(code.value for code in ErrorCode)
# The programs a fuzzed cmd becomes (chosen by the cmd's own text), and the missing one.
HARMLESS = ("/bin/true", "/bin/echo", "/usr/bin/printf")
MISSING = "/nonexistent/fuzz-"
# A refusal the server answers before any GraphQL: the request body size limit.
PLAIN_REFUSALS = frozenset({413})
# The capsule and the selectors of its processes that run.py prepared, if any.
CAPSULE_ID = os.environ.get("FUZZ_CAPSULE_ID", "")
SELECTORS = tuple(filter(None, os.environ.get("FUZZ_SELECTORS", "").split(",")))
# The longest a fuzzed waitForProcess may wait, in seconds.
MAX_WAIT_SEC = 2


def _digest(value: str) -> int:
    """A number fixed by value, to choose with."""
    return zlib.crc32(value.encode("utf-8", "surrogatepass"))


def _safe_cmd(value: str) -> str:
    choice = _digest(value) % (len(HARMLESS) + 1)
    return HARMLESS[choice] if choice < len(HARMLESS) else MISSING + value.replace("/", "_")


def _string(value: str) -> graphql.StringValueNode:
    return graphql.StringValueNode(value=value, block=False)


class _Rewrite(graphql.Visitor):
    def enter_object_field(self, node: graphql.ObjectFieldNode, *_: Any) -> graphql.ObjectFieldNode | None:
        if node.name.value == "cmd" and isinstance(node.value, graphql.StringValueNode):
            return graphql.ObjectFieldNode(name=node.name, value=_string(_safe_cmd(node.value.value)))
        return None

    def enter_argument(self, node: graphql.ArgumentNode, *_: Any) -> graphql.ArgumentNode | None:
        if node.name.value == "timeoutSec" and isinstance(node.value, graphql.IntValueNode):
            # waitForProcess holds its answer for up to timeoutSec (3600 allowed), past the client's
            # read timeout: fuzzed waits last at most MAX_WAIT_SEC; out-of-range values stay as they are.
            if 0 < int(node.value.value) <= 3600:
                value = str(min(int(node.value.value), MAX_WAIT_SEC))
                return graphql.ArgumentNode(name=node.name, value=graphql.IntValueNode(value=value))
            return None
        if not isinstance(node.value, graphql.StringValueNode) or _digest(node.value.value) % 2:
            return None
        if node.name.value == "capsuleId" and CAPSULE_ID:
            return graphql.ArgumentNode(name=node.name, value=_string(CAPSULE_ID))
        if node.name.value == "selector" and SELECTORS:
            selector = SELECTORS[_digest(node.value.value) // 2 % len(SELECTORS)]
            return graphql.ArgumentNode(name=node.name, value=_string(selector))
        return None


def rewrite(query: str) -> str:
    """The query with every `cmd` made harmless and half its capsule ids and selectors made real."""
    try:
        document = graphql.parse(query)
    except graphql.GraphQLError:
        return query  # a document the server refuses unparsed runs nothing
    return graphql.print_ast(graphql.visit(document, _Rewrite()))


@schemathesis.hook
def before_call(context: HookContext, case: Case[Any], kwargs: dict[str, Any]) -> None:
    if isinstance(case.body, str):
        case.body = rewrite(case.body)


def _problems(response: Response) -> list[str]:
    if response.status_code >= 500:
        return [f"HTTP {response.status_code}"]
    if response.status_code in PLAIN_REFUSALS:
        return []
    problems = []
    if response.status_code != 200:
        problems.append(f"HTTP {response.status_code}, not 200")
    if not (response.headers.get("content-type") or [""])[0].startswith("application/json"):
        problems.append(f"content-type {response.headers.get('content-type')}")
    try:
        payload = json.loads(response.content)
    except ValueError:
        return [*problems, "the body is not JSON"]
    if not isinstance(payload, dict) or not payload or set(payload) - {"data", "errors", "extensions"}:
        return [*problems, "the body is not a GraphQL response (an object of data, errors, extensions)"]
    if "data" not in payload and "errors" not in payload:
        problems.append("neither data nor errors")
    if "data" in payload and not isinstance(payload["data"], dict | None):
        problems.append("data is neither an object nor null")
    errors = payload.get("errors", [])
    if not isinstance(errors, list) or ("errors" in payload and not errors):
        return [*problems, "errors is not a non-empty list"]
    for error in errors:
        if not isinstance(error, dict) or not isinstance(error.get("message"), str):
            problems.append(f"an error without a message: {error!r}")
            continue
        code = (error.get("extensions") or {}).get("code")
        if code == ErrorCode.INTERNAL.value:
            problems.append(f"INTERNAL: {error['message']} {error.get('extensions')}")
        elif code not in CODES:
            problems.append(f"an error without a known code: {error!r}")
    return problems


@schemathesis.check
def capsule_graphql_response(ctx: CheckContext, response: Response, case: Case[Any]) -> bool | None:
    """Every answer is well-formed GraphQL with a known code on each error; none is INTERNAL or a 5xx."""
    problems = _problems(response)
    if problems:
        raise AssertionError("; ".join(problems))
    return None

"""Structured-output constraints checked in the front end, before a request is admitted.

vLLM parses a request's constraint (`response_format`, `structured_outputs` json / regex /
choice / grammar / structural_tag, or the JSON schema that `tool_choice: "required"` or a named
tool implies) when the engine client receives the request: for a streamed request that is after
the 200 has been sent, so a malformed constraint arrives as an error event inside a 200 stream.
And a constraint that parses but admits no output at all (a JSON schema whose only definition
refers to itself, `{"$ref": "#/$defs/n", "$defs": {"n": {"$ref": "#/$defs/n"}}}`, or a grammar
rule that never terminates) passes vLLM's check, then fails in the engine on the first token the
grammar rejects: a 500, or an error event after a 200.

`check_structured_outputs` runs vLLM's own validation (`SamplingParams._validate_structured_
outputs`, the backend the server is configured with, including `auto`'s fallbacks) and then
checks, on xgrammar's grammar of the constraint, that every part of it reachable from the start
can be completed by some text (`dead_rules`): both answer 400 before generation.
"""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

import xgrammar as xgr
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import SamplingParams, StructuredOutputsParams
from vllm.tool_parsers.utils import get_json_schema_from_tools
from vllm.v1.structured_output.utils import grammar_is_likely_lark

logger = logging.getLogger("fluxserve.structured_outputs")

# xgrammar's serialized grammar (Grammar.serialize_json): the format version the analysis below
# reads, and its expression types (cpp/grammar_impl.h, GrammarExprType).
XGRAMMAR_SERIAL_VERSION = "v16"
_BYTE_STRING, _CHAR_CLASS, _CHAR_CLASS_STAR, _EMPTY_STR = 0, 1, 2, 3
_RULE_REF, _SEQUENCE, _CHOICES, _TAG_DISPATCH, _REPEAT = 4, 5, 6, 7, 8
_MAX_CODEPOINT = 0x10FFFF


class DeadConstraintError(VLLMValidationError):
    """The constraint is well-formed but part of it (or all of it) admits no text."""


def _char_class_is_empty(args: list[int]) -> bool:
    negated, bounds = bool(args[0]), args[1:]
    ranges = sorted(zip(bounds[0::2], bounds[1::2], strict=True))
    if not negated:
        return not ranges
    covered = -1  # highest code point covered so far, scanning up from 0
    for lo, hi in ranges:
        if lo > covered + 1:
            return False
        covered = max(covered, hi)
    return covered >= _MAX_CODEPOINT


def dead_rules(grammar: xgr.Grammar) -> list[str]:
    """Names of the rules of `grammar` where generation can get stuck; empty when it cannot.

    xgrammar's matcher allows any token that continues some parse, whether or not that parse can
    ever finish: for a property whose schema admits no value it accepts `{"a":` and then no token
    at all, and the engine fails the request there; if the root rule admits no string, not even a
    first token exists. A rule is reported when generation can enter it (it is reachable from the
    root along parses that can finish up to it, and it can consume a token) but cannot finish it.

    Two least fixed points over the grammar: *productive* (a finite string derives from it) and
    *enterable* (it can consume at least one token). Expression types the analysis does not model
    count as productive and not enterable, so an unknown construct never causes a rejection.
    On an xgrammar serialization format this code was not written for, it logs a warning and
    reports nothing (vLLM's own checks still run; tests/unit/test_structured_outputs.py fails on
    such an xgrammar, so that an upgrade is noticed).
    """
    data = json.loads(grammar.serialize_json())
    if data.get("__VERSION__") != XGRAMMAR_SERIAL_VERSION:
        logger.warning("xgrammar grammar format %r is not the %r the dead-end check reads: "
                       "check skipped", data.get("__VERSION__"), XGRAMMAR_SERIAL_VERSION)
        return []
    flat, indptr = data["grammar_expr_data"], data["grammar_expr_indptr"]
    rules = data["rules"]  # [name, body expression, ...]
    productive: set[int] = set()
    enterable: set[int] = set()

    def expr(expr_id: int) -> tuple[int, list[int]]:
        # layout from indptr[expr_id]: type, number of arguments, arguments...
        start = indptr[expr_id]
        return flat[start], flat[start + 2:start + 2 + flat[start + 1]]

    def derives(expr_id: int) -> bool:
        kind, args = expr(expr_id)
        if kind == _CHAR_CLASS:
            return not _char_class_is_empty(args)
        if kind == _RULE_REF:
            return args[0] in productive
        if kind == _SEQUENCE:
            return all(derives(e) for e in args)
        if kind == _CHOICES:
            return any(derives(e) for e in args)
        if kind == _REPEAT:  # (rule, min, max)
            return args[1] == 0 or args[0] in productive
        return True  # byte strings, the empty string, char-class stars, tag dispatch, others

    def enters(expr_id: int) -> bool:
        kind, args = expr(expr_id)
        if kind == _BYTE_STRING:
            return bool(args)
        if kind in (_CHAR_CLASS, _CHAR_CLASS_STAR):
            return not _char_class_is_empty(args)
        if kind in (_RULE_REF, _REPEAT):
            return args[0] in enterable
        if kind == _SEQUENCE:  # some element is entered after finishing the ones before it
            for e in args:
                if enters(e):
                    return True
                if not derives(e):
                    return False
            return False
        if kind == _CHOICES:
            return any(enters(e) for e in args)
        return False

    for found, test in ((productive, derives), (enterable, enters)):
        changed = True
        while changed:
            changed = False
            for rule_id, rule in enumerate(rules):
                if rule_id not in found and test(rule[1]):
                    found.add(rule_id)
                    changed = True

    root = data["root_rule_id"]
    if root not in productive:
        return [rules[root][0]]
    dead: list[str] = []
    seen: set[int] = set()

    def visit(expr_id: int, rule_id: int) -> None:
        kind, args = expr(expr_id)
        if kind in (_RULE_REF, _REPEAT):
            ref = args[0]
            if ref not in productive and ref in enterable:
                dead.append(rules[ref][0])
            elif ref not in seen:
                seen.add(ref)
                visit(rules[ref][1], ref)
        elif kind == _SEQUENCE:
            if not derives(expr_id) and enters(expr_id):
                dead.append(rules[rule_id][0])
                return
            for e in args:
                visit(e, rule_id)
                if not derives(e):
                    return
        elif kind == _CHOICES:
            for e in args:
                visit(e, rule_id)

    seen.add(root)
    visit(rules[root][1], root)
    return dead


def _xgrammar_grammar(so: StructuredOutputsParams) -> xgr.Grammar | None:
    """xgrammar's grammar of the constraint; None for constraints that always admit output
    (choice, json_object) and for ones xgrammar cannot express (vLLM then uses guidance or
    outlines, whose own checks have run)."""
    try:
        if so.json is not None:
            schema = json.loads(so.json) if isinstance(so.json, str) else so.json
            return xgr.Grammar.from_json_schema(schema)
        if so.regex is not None:
            return xgr.Grammar.from_regex(so.regex)
        if so.grammar is not None:
            if grammar_is_likely_lark(so.grammar):
                return xgr.Grammar.from_lark(so.grammar)
            return xgr.Grammar.from_ebnf(so.grammar)
        if so.structural_tag is not None:
            tag = json.loads(so.structural_tag)
            if "structures" in tag:  # the deprecated form, compiled as vLLM does
                items = [xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s["schema"]),
                                               end=s["end"]) for s in tag["structures"]]
                return xgr.Grammar.from_structural_tag(items, tag["triggers"])
            return xgr.Grammar.from_structural_tag(so.structural_tag)
    except Exception:  # noqa: BLE001 - not expressible in xgrammar: nothing to prove here
        return None
    return None


def _constraints(body: Any) -> list[tuple[str, StructuredOutputsParams]]:
    found: list[tuple[str, StructuredOutputsParams]] = []
    so = body.extract_structured_outputs()
    if so is not None:
        param = "structured_outputs" if body.structured_outputs is not None else "response_format"
        found.append((param, so))
    tools, tool_choice = getattr(body, "tools", None), getattr(body, "tool_choice", None)
    if tools and tool_choice not in (None, "none", "auto"):
        schema = get_json_schema_from_tools(tool_choice=tool_choice, tools=tools,
                                            parallel_tool_calls=body.parallel_tool_calls)
        if schema is not None:
            found.append(("tools", StructuredOutputsParams(json=schema)))
    return found


def check_structured_outputs(body: Any, engine_client: Any) -> None:
    """Reject a request whose structured-output constraint the engine could not serve.

    `body`: a ChatRequest or CompletionsRequest; `engine_client`: the running AsyncLLM (its
    model config, structured-outputs config and tokenizer pick the backend, as in vLLM).
    Raises VLLMValidationError (answered 400, `param` naming the field) for a constraint vLLM's
    validation rejects, and DeadConstraintError for one with parts no text satisfies.
    """
    constraints = _constraints(body)
    if not constraints:
        return
    vllm_config = engine_client.vllm_config
    for param, so in constraints:
        params = SamplingParams(max_tokens=1, structured_outputs=copy.deepcopy(so))
        try:
            params._validate_structured_outputs(  # noqa: SLF001 - vLLM's own request check
                vllm_config.model_config, vllm_config.structured_outputs_config,
                engine_client.tokenizer)
        except VLLMValidationError as exc:
            raise VLLMValidationError(exc.args[0], parameter=exc.parameter or param) from exc
        except (ValueError, TypeError, KeyError) as exc:
            raise VLLMValidationError(f"invalid structured-output constraint: {exc}",
                                      parameter=param) from exc
        grammar = _xgrammar_grammar(so)
        dead = dead_rules(grammar) if grammar is not None else []
        if dead:
            raise DeadConstraintError(
                f"the {param} constraint contains parts that no text can satisfy (grammar "
                f"rules {', '.join(dead[:5])}): e.g. a JSON schema definition that only refers "
                "to itself, or a grammar rule that never terminates. Generation would be stuck "
                "there.", parameter=param)

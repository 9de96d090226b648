"""The dead-end check on structured-output constraints (server/structured_outputs.py)."""

from __future__ import annotations

import json

import pytest
import xgrammar as xgr
from vllm.sampling_params import StructuredOutputsParams

from server.structured_outputs import XGRAMMAR_SERIAL_VERSION, _xgrammar_grammar, dead_rules

SELF_REF_DEFS = {"n": {"$ref": "#/$defs/n"}}

DEAD = {
    "schema that only refers to itself": {"json": {"$ref": "#/$defs/n", "$defs": SELF_REF_DEFS}},
    "required property that admits nothing": {"json": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/n"}}, "required": ["a"],
        "$defs": SELF_REF_DEFS}},
    "optional property that admits nothing (generation can enter it)": {"json": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/n"}}, "$defs": SELF_REF_DEFS}},
    "recursion with no base case": {"json": {"$ref": "#/$defs/t", "$defs": {"t": {
        "type": "object", "required": ["c"], "properties": {"c": {
            "type": "array", "minItems": 1, "items": {"$ref": "#/$defs/t"}}}}}}},
    "empty character class": {"regex": "[^\\x00-\\U0010FFFF]"},
    "EBNF rule that never ends": {"grammar": "root ::= a\na ::= a"},
    "lark rule that never ends": {"grammar": 'start: a\na: a "x"'},
    "string then a dead rule": {"grammar": 'root ::= "x" a\na ::= "y" a'},
}

LIVE = {
    "plain object": {"json": {"type": "object", "properties": {"a": {"type": "integer"}},
                              "required": ["a"]}},
    "dead branch no token can enter": {"json": {
        "type": "object", "required": ["a"], "properties": {"a": {"anyOf": [
            {"$ref": "#/$defs/n"}, {"type": "integer"}]}}, "$defs": SELF_REF_DEFS}},
    "recursion with a base case": {"json": {"$ref": "#/$defs/t", "$defs": {"t": {
        "type": "object", "required": ["c"], "properties": {"c": {
            "type": "array", "items": {"$ref": "#/$defs/t"}}}}}}},
    "bounded array": {"json": {"type": "array", "items": {"type": "integer"}, "minItems": 2,
                               "maxItems": 4}},
    "regex": {"regex": "[a-z]+@example\\.com"},
    "empty regex": {"regex": ""},
    "negated class that leaves something": {"regex": "[^a-z]"},
    "grammar with an unreachable-by-token dead rule": {"grammar": 'root ::= "x" | a\na ::= a'},
    "lark repetition": {"grammar": 'start: "x"+'},
    "structural tag": {"structural_tag": json.dumps({
        "structures": [{"begin": "<f>", "schema": {"type": "integer"}, "end": "</f>"}],
        "triggers": ["<f"]})},
}


def _grammar(kwargs: dict) -> xgr.Grammar:
    grammar = _xgrammar_grammar(StructuredOutputsParams(**kwargs))
    assert grammar is not None
    return grammar


@pytest.mark.parametrize("case", list(DEAD))
def test_dead_constraints_are_found(case):
    assert dead_rules(_grammar(DEAD[case]))


@pytest.mark.parametrize("case", list(LIVE))
def test_live_constraints_pass(case):
    assert dead_rules(_grammar(LIVE[case])) == []


def test_choice_and_json_object_need_no_grammar():
    assert _xgrammar_grammar(StructuredOutputsParams(choice=["a", "b"])) is None
    assert _xgrammar_grammar(StructuredOutputsParams(json_object=True)) is None


def test_installed_xgrammar_writes_the_format_the_check_reads():
    data = json.loads(xgr.Grammar.from_regex("a").serialize_json())
    assert data["__VERSION__"] == XGRAMMAR_SERIAL_VERSION

"""JSON Schema → GBNF against llama.cpp's own expectations: every case of llama.cpp 0c1e570's
tests/test-json-schema-to-grammar.cpp (extracted to tests/data by
tests/data/extract_llamacpp_json_schema_cases.py) must give exactly the grammar text llama.cpp
expects (or fail where it fails). The grammars then go through both grammar engines (ours and
llama.cpp's) on documents that do and do not fit the schema.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jllama.server import gbnf
from jllama.server.json_schema import SchemaError, schema_to_grammar

CASES = json.loads((Path(__file__).parent / "data" / "llamacpp_json_schema_to_grammar.json")
                   .read_text(encoding="utf-8"))


def _canon(g: str) -> str:
    return "\n".join(line.strip() for line in g.strip().splitlines())


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_grammar_text_is_llamacpps(case):
    try:
        schema = json.loads(case["schema"])
    except json.JSONDecodeError:
        assert case["status"] == "FAILURE"  # llama.cpp's JSON parser refuses it as well
        return
    if case["status"] == "FAILURE":
        with pytest.raises(SchemaError):
            schema_to_grammar(schema)
        return
    got = schema_to_grammar(schema)
    assert _canon(got) == case["grammar"]
    gbnf.Grammar(got)  # and our grammar engine takes it


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    from llamacpp_grammar import GrammarOracle

    o = GrammarOracle(tmp_path_factory.mktemp("schema"))
    yield o
    o.close()


def _ours(grammar: str, text: str) -> bool:
    m = gbnf.Matcher(gbnf.Grammar(grammar))
    st = m.feed_bytes(m.initial(), text.encode()) if text else m.initial()
    return st is not None and m.can_end(st)


SCHEMA_DOCS = [
    ({"type": "object", "properties": {"name": {"type": "string", "minLength": 2,
                                                "maxLength": 4},
                                       "age": {"type": "integer", "minimum": -5, "maximum": 120},
                                       "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                                "minItems": 1, "maxItems": 2}},
      "required": ["age"]},
     ['{"age": 7}', '{"age": -5, "name": "abc"}', '{"age":120,"name":"ab","tags":["a","b"]}',
      '{"age": 121}', '{"age": -6}', '{"name": "ab", "age": 3}', '{"age": 3, "tags": []}',
      '{"age": 3, "tags": ["a", "b", "a"]}', '{"age": 3, "name": "a"}', '{"age": 3, "x": 1}',
      '{\n  "age": 3\n}']),
    ({"anyOf": [{"type": "null"}, {"$ref": "#/$defs/p"}],
      "$defs": {"p": {"type": "object", "properties": {"x": {"const": 1},
                                                         "y": {"pattern": "^[a-c]{2}-x?$"}},
                      "additionalProperties": {"type": "boolean"}}}},
     ['null', '{}', '{"x": 1}', '{"x": 2}', '{"y": "ab-"}', '{"y": "ab-x"}', '{"y": "ad-"}',
      '{"x": 1, "z": true}', '{"z": false}', '{"z": 1}', '{"y": "ab-", "x": 1}']),
    ({"allOf": [{"type": "object", "properties": {"a": {"type": "number"}}},
                {"type": "object", "properties": {"b": {"type": "boolean"}}}]},
     ['{"a": 1.5e3, "b": true}', '{"a": 1}', '{"b": true, "a": 1}', '{"a": 01}']),
    ({"type": "array", "prefixItems": [{"type": "string", "format": "date"},
                                       {"type": "string", "format": "uuid"}]},
     ['["2024-02-29", "123e4567-e89b-12d3-a456-426614174000"]', '["2024-13-01", "x"]']),
]


@pytest.mark.parametrize("schema,docs", SCHEMA_DOCS, ids=[str(i) for i in range(len(SCHEMA_DOCS))])
def test_schema_grammars_accept_what_llamacpp_accepts(oracle, schema, docs):
    g = schema_to_grammar(schema)
    assert oracle.parses(g)
    results = []
    for d in docs:
        want = oracle.accepts(g, d)
        assert _ours(g, d) == want, d
        results.append(want)
    assert any(results) and not all(results)  # the documents tell the schema apart

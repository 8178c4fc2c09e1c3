"""Writes llamacpp_json_schema_to_grammar.json: the cases of llama.cpp 0c1e570's
tests/test-json-schema-to-grammar.cpp (schema, expected status, expected grammar text), so that
tests/test_server_json_schema.py can hold our converter to llama.cpp's own expectations.

    python tests/data/extract_llamacpp_json_schema_cases.py \
        <llama.cpp>/tests/test-json-schema-to-grammar.cpp > tests/data/llamacpp_json_schema_to_grammar.json
"""

import json
import re
import sys

src = open(sys.argv[1], encoding="utf-8").read()
body = src[src.index("static void test_all"):src.index("int main()")]
# a C++ raw string R"""(...)""" or an ordinary "..." literal
lit = re.compile(r'R"""\((.*?)\)"""|"((?:[^"\\]|\\.)*)"', re.S)
cases = []
for block in body.split("test({")[1:]:
    status = "SUCCESS" if block.lstrip().startswith("SUCCESS") else "FAILURE"
    strs = []
    for m in lit.finditer(block[: block.index("});")]):
        strs.append(m.group(1) if m.group(1) is not None
                    else bytes(m.group(2), "utf-8").decode("unicode_escape"))
    name, schema, grammar = strs[:3]
    grammar = "\n".join(line.strip() for line in grammar.strip().splitlines())
    cases.append({"status": status, "name": name, "schema": schema, "grammar": grammar})
print(len(cases), "cases", file=sys.stderr)
json.dump(cases, sys.stdout, indent=1, ensure_ascii=False)
print()

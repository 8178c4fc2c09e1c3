"""Writes llamacpp_grammar_parser.json: llama.cpp 0c1e570's tests/test-grammar-parser.cpp cases,
each a grammar with the symbol ids and the flat rule elements llama.cpp's parser must produce
(``verify_parsing``), or a grammar it must refuse (``verify_failure``).

    python tests/data/extract_llamacpp_grammar_parser_cases.py \
        <llama.cpp>/tests/test-grammar-parser.cpp > tests/data/llamacpp_grammar_parser.json
"""

import json
import re
import sys

src = open(sys.argv[1], encoding="utf-8").read()
body = src[src.index("int main()"):]
CHARS = {"\\n": 10, "\\t": 9, "\\r": 13, "\\0": 0, "\\\\": 92, "\\'": 39}
cases = []
for m in re.finditer(r'verify_failure\(R"""\((.*?)\)"""\);', body, re.S):
    cases.append({"grammar": m.group(1), "ok": False})
# symbols are {"name", id} pairs, elements {LLAMA_GRETYPE_X, value}: told apart by their shape
pat = re.compile(r'verify_parsing\(R"""\((.*?)\)""",(.*?)\}\);', re.S)
for m in pat.finditer(body):
    symbols = {n: int(i) for n, i in re.findall(r'\{"([^"]+)",\s*(\d+)\}', m.group(2))}
    rules = []
    for t, v in re.findall(r"\{LLAMA_GRETYPE_(\w+),\s*(?:/\*.*?\*/\s*)?('(?:\\.|[^'])'|\d+)\}",
                           m.group(2)):
        if v.startswith("'"):
            inner = v[1:-1]
            v = CHARS[inner] if inner in CHARS else ord(inner)
        rules.append([t, int(v)])
    cases.append({"grammar": m.group(1), "ok": True, "symbols": symbols, "elements": rules})
print(len(cases), "cases", file=sys.stderr)
json.dump(cases, sys.stdout, indent=1, ensure_ascii=False)
print()

"""Writes llamacpp_grammar_integration.json: the test_grammar / test_schema cases of llama.cpp
0c1e570's tests/test-grammar-integration.cpp (grammar or JSON schema, strings that must match,
strings that must not), so that tests/test_server_grammar.py holds our GBNF engine and schema
converter to llama.cpp's own expectations. Strings are lists of parts: ["s", hex of the bytes]
or ["t", token id] (the C++ file's token(id) markers).

    python tests/data/extract_llamacpp_grammar_cases.py \
        <llama.cpp>/tests/test-grammar-integration.cpp > tests/data/llamacpp_grammar_integration.json
"""

import json
import re
import sys

TOKEN = re.compile(r'''R"""\((?P<raw>.*?)\)"""|"(?P<str>(?:[^"\\\n]|\\.)*)"|token\((?P<tok>\d+)\)|//[^\n]*|(?P<p>[{},+()])|\s+''', re.S)
ESC = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)", re.S)
SIMPLE = {"n": b"\n", "t": b"\t", "r": b"\r", "\\": b"\\", '"': b'"', "'": b"'", "0": b"\0"}


def c_bytes(s: str) -> bytes:
    out = b""
    pos = 0
    for m in ESC.finditer(s):
        out += s[pos:m.start()].encode()
        e = m.group(1)
        if e[0] == "x":
            out += bytes([int(e[1:], 16)])
        elif e[0] in "uU":
            out += chr(int(e[1:], 16)).encode()
        else:
            out += SIMPLE[e]
        pos = m.end()
    return out + s[pos:].encode()


def tokens(text: str):
    pos = 0
    while pos < len(text):
        m = TOKEN.match(text, pos)
        if m is None:
            raise ValueError(f"cannot read: {text[pos:pos + 60]!r}")
        pos = m.end()
        if m.group("raw") is not None:
            yield ("s", m.group("raw").encode())
        elif m.group("str") is not None:
            yield ("s", c_bytes(m.group("str")))
        elif m.group("tok") is not None:
            yield ("t", int(m.group("tok")))
        elif m.group("p"):
            yield ("p", m.group("p"))


def parse_call(toks: list) -> tuple[list, int]:
    """The arguments of one call: expressions (joined parts) and brace lists of them."""
    args, cur, lst, i, depth = [], [], None, 0, 0
    while True:
        kind, v = toks[i]
        i += 1
        if kind in "st":
            (lst[-1] if lst is not None else cur).append((kind, v))
        elif v == "+":
            continue
        elif v == "{":
            lst = [[]]
        elif v == "}":
            args.append([e for e in lst if e])
            lst = None
        elif v == ",":
            if lst is not None:
                lst.append([])
            elif cur:
                args.append(cur)
                cur = []
        elif v == "(":
            depth += 1
        elif v == ")":
            if depth == 0:
                if cur:
                    args.append(cur)
                return args, i
            depth -= 1


def joined(parts: list) -> list:
    out: list = []
    for kind, v in parts:
        if kind == "s" and out and out[-1][0] == "s":
            out[-1] = ("s", out[-1][1] + v)
        else:
            out.append((kind, v))
    return [[k, v.hex() if k == "s" else v] for k, v in out]


src = open(sys.argv[1], encoding="utf-8").read()
cases = []
for m in re.finditer(r"\n\s+(test_grammar|test_schema)\(", src):
    toks = list(tokens(src[m.end():m.end() + 20000].split("\n    );")[0] + ")"))
    args, _ = parse_call(toks)
    desc, body, good, bad = args
    text = b"".join(v for _, v in body).decode()
    cases.append({"kind": "grammar" if m.group(1) == "test_grammar" else "schema",
                  "name": b"".join(v for k, v in desc if k == "s").decode(),
                  "text": text, "pass": [joined(p) for p in good],
                  "fail": [joined(p) for p in bad]})
print(len(cases), "cases", file=sys.stderr)
json.dump(cases, sys.stdout, indent=1, ensure_ascii=False)
print()

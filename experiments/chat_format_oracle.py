"""Record llama.cpp 0c1e570's own chat-format behaviour as test data.

Builds experiments/chat_format_oracle.cpp against the llama.cpp build's libllama-common.so
(common_chat_templates_apply + common_chat_parse) and runs it over the cases below: for each
template (llama.cpp's models/templates/*.jinja from the oracle's sdist) the prompt it renders
for a user message with tools, the generation prompt, and the message it parses out of each
model output. Writes tests/data/llamacpp_chat_formats.json, which
tests/test_server_chat_formats.py replays against jllama/server/chat_formats.py.

    PYTHONPATH=. /work/main/.venv/bin/python experiments/chat_format_oracle.py \
        [--sdist /tmp/sdist/llama_cpp_python-0.3.36] [--bin ~/.cache/llamacpp-0c1e570/bin]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "data" / "llamacpp_chat_formats.json"

SPECIAL = {"type": "function", "function": {
    "name": "special_function", "description": "I'm special", "parameters": {
        "type": "object", "properties": {"arg1": {"type": "integer", "description": "The arg."}},
        "required": ["arg1"]}}}
C1 = '{"name": "special_function", "arguments": {"arg1": 1}}'
C2 = '{"name": "special_function", "arguments": {"arg1": 2}}'
H1, H2 = f"<tool_call>\n{C1}\n</tool_call>", f"<tool_call>\n{C2}\n</tool_call>"
R1B, R1E = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"


def r1call(n: int) -> str:
    return ("<｜tool▁call▁begin｜>function<｜tool▁sep｜>special_function\n```json\n"
            f'{{"arg1": {n}}}\n```<｜tool▁call▁end｜>')


NEMO1 = '{"name": "special_function", "arguments": {"arg1": 1}, "id": "123456789"}'
NEMO2 = '{"name": "special_function", "arguments": {"arg1": 2}, "id": "223456789"}'
THINK_OUTS = ["<think>hm</think>Answer", " \n<think>\nhm\n</think>\n\nAnswer\n",
              "<think>hm still", "Pre<think>hm</think>Answer", "hm</think>Answer",
              "<think></think>Answer"]
FORCED_OUTS = ["hm\n</think>\n\nAnswer\n", "hm still", "</think>Answer",
               "I'm\nthinking</think>Hello, world!\nWhat's up?"]

# (template, request options, outputs)
CASES = [
    ("Qwen-Qwen2.5-7B-Instruct", {"tools": True}, [
        "Hello, world!\nWhat's up?", H1, "Hi there " + H1 + "\n" + H2, H1 + " trailing",
        '<tool_call>\n{"name": "nope", "arguments": {"arg1": 1}}\n</tool_call>',
        '<tool_call>{"arguments": {"arg1": 1}, "name": "special_function"}</tool_call>',
        "<think>x</think>y"]),
    ("Qwen-Qwen2.5-7B-Instruct", {"tools": False}, [H1, "Hello"]),
    ("NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use", {"tools": True}, [
        "Hello, world!\nWhat's up?<tool_call>\n" + C1 + "</tool_call>", H1 + H2]),
    ("NousResearch-Hermes-3-Llama-3.1-8B-tool_use", {"tools": True}, [H1, "Hello"]),
    ("meta-llama-Llama-3.1-8B-Instruct", {"tools": True}, [
        '{"name": "special_function", "parameters": {"arg1": 1}}',
        'Sure {"name": "special_function", "parameters": {"arg1": 1}}',
        '  {"name": "special_function", "parameters": {"arg1": 1}}\n',
        '<|python_tag|>{"name": "special_function", "parameters": {"arg1": 1}}',
        '<|python_tag|>python.call(code="print(1)")',
        '{"name": "nope", "parameters": {"arg1": 1}}',
        '{"name": "special_function", "arguments": {"arg1": 1}}',
        '{"name": "special_function", "parameters": {"arg1": 1}} after', "Hello"]),
    ("meta-llama-Llama-3.2-3B-Instruct", {"tools": True}, [
        '{"name": "special_function", "parameters": {"arg1": 1}}',
        '{"type": "function", "name": "special_function", "parameters": {"arg1": 1}}']),
    ("meta-llama-Llama-3.3-70B-Instruct", {"tools": True}, [
        '{"name": "special_function", "parameters": {"arg1": 1}}', "Hello"]),
    ("mistralai-Mistral-Nemo-Instruct-2407", {"tools": True}, [
        "Hello, world!\nWhat's up?", f"[TOOL_CALLS][{NEMO1}]", f"Hi[TOOL_CALLS][{NEMO1}]",
        f"[TOOL_CALLS][{NEMO1}, {NEMO2}]", f"[TOOL_CALLS][{NEMO1}][{NEMO2}]", f"[TOOL_CALLS][{C1}]"]),
    ("fireworks-ai-llama-3-firefunction-v2", {"tools": True}, [
        "Hello", f" functools[{C1}]", f"Hi functools[{C1}]", f" functools[{C1}, {C2}]",
        f"functools[{C1}]"]),
    ("meetkai-functionary-medium-v3.1", {"tools": True}, [
        "Hello", '<function=special_function>{"arg1": 1}</function>',
        '<function=special_function>{"arg1": 1}</function><function=special_function>{"arg1": 2}</function>',
        'Hi<function=special_function>{"arg1": 1}</function>',
        '<function=nope>{"arg1": 1}</function>', "<|python_tag|>print(1)"]),
    ("meetkai-functionary-medium-v3.2", {"tools": True}, [
        "all\nHello, world!\nWhat's up?", 'special_function\n{"arg1": 1}',
        'all\nHi>>>special_function\n{"arg1": 1}']),
    ("CohereForAI-c4ai-command-r7b-12-2024-tool_use", {"tools": True}, [
        "<|START_RESPONSE|>Hello, world!\nWhat's up?<|END_RESPONSE|>",
        "<|START_THINKING|>I'm\nthinking<|END_THINKING|><|START_ACTION|>[\n    {\"tool_call_id\": "
        "\"0\", \"tool_name\": \"special_function\", \"parameters\": {\"arg1\": 1}}\n]<|END_ACTION|>",
        '<|START_ACTION|>[{"tool_call_id": "0", "tool_name": "special_function", "parameters": '
        '{"arg1": 1}}, {"tool_call_id": "1", "tool_name": "special_function", "parameters": '
        '{"arg1": 2}}]<|END_ACTION|>',
        "<|START_THINKING|>a<|END_THINKING|><|START_RESPONSE|>b<|END_RESPONSE|>"]),
    ("CohereForAI-c4ai-command-r7b-12-2024-tool_use", {"tools": True, "parallel_tool_calls": True},
     ['<|START_ACTION|>[{"tool_call_id": "0", "tool_name": "special_function", "parameters": '
      '{"arg1": 1}}, {"tool_call_id": "1", "tool_name": "special_function", "parameters": '
      '{"arg1": 2}}]<|END_ACTION|>']),
    ("mistralai-Mistral-Nemo-Instruct-2407", {"tools": True, "parallel_tool_calls": True},
     [f"[TOOL_CALLS][{NEMO1}, {NEMO2}]", f"Hi[TOOL_CALLS][{NEMO1}]"]),
    ("fireworks-ai-llama-3-firefunction-v2", {"tools": True, "parallel_tool_calls": True},
     [f" functools[{C1}, {C2}]"]),
    ("meetkai-functionary-medium-v3.1", {"tools": True, "parallel_tool_calls": True},
     ['<function=special_function>{"arg1": 1}</function><function=special_function>{"arg1": 2}</function>']),
    ("Qwen-Qwen2.5-7B-Instruct", {"tools": True, "parallel_tool_calls": True},
     ["Hi there " + H1 + "\n" + H2]),
    ("llama-cpp-deepseek-r1", {"tools": True}, ["hm</think>Sure" + R1B + r1call(1) + r1call(2) + R1E]),
    ("CohereForAI-c4ai-command-r7b-12-2024-tool_use", {"tools": False}, [
        "<|START_RESPONSE|>Hello, world!\nWhat's up?<|END_RESPONSE|>",
        "<|START_THINKING|>a<|END_THINKING|><|START_RESPONSE|>b<|END_RESPONSE|>"]),
    ("llama-cpp-deepseek-r1", {"tools": True, "parallel_tool_calls": True}, [
        "I'm\nthinking</think>Hello", "</think>" + R1B + r1call(1) + R1E,
        "hm</think>Sure" + R1B + r1call(1) + r1call(2) + R1E]),
    ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", {"tools": True, "enable_thinking": False}, [
        R1B + r1call(1) + R1E]),
    ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", {"tools": True}, [
        "I'm\nthinking</think>Hello", R1B + r1call(1) + R1E,
        "x</think>" + R1B + r1call(1) + R1E]),
    ("deepseek-ai-DeepSeek-R1-Distill-Llama-8B", {"tools": False}, FORCED_OUTS),
    ("Qwen-QwQ-32B", {"tools": True}, FORCED_OUTS + [H1, "hm</think>\n\n" + H1]),
    ("Qwen-QwQ-32B", {"tools": False, "reasoning_format": "none"}, FORCED_OUTS),
    ("Qwen-QwQ-32B", {"tools": False, "enable_thinking": False}, FORCED_OUTS),
    ("llama-cpp-deepseek-r1", {"tools": False, "enable_thinking": False}, FORCED_OUTS),
    ("Qwen-Qwen3-0.6B", {"tools": False}, THINK_OUTS),
    ("Qwen-Qwen3-0.6B", {"tools": False, "reasoning_format": "none"}, THINK_OUTS),
    ("Qwen-Qwen3-0.6B", {"tools": False, "reasoning_format": "auto"}, THINK_OUTS),
    ("Qwen-Qwen3-0.6B", {"tools": False, "reasoning_format": "deepseek-legacy"}, THINK_OUTS),
    ("Qwen-Qwen3-0.6B", {"tools": False, "enable_thinking": False}, THINK_OUTS),
    ("Qwen-Qwen3-0.6B", {"tools": True}, [
        "<think>\nhm\n</think>\n\n" + H1, "Answer only", H1 + "\n" + H2]),
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sdist", default="/tmp/sdist/llama_cpp_python-0.3.36")
    ap.add_argument("--bin", default=str(Path.home() / ".cache/llamacpp-0c1e570/bin"))
    ap.add_argument("--exe", default="/tmp/chat_format_oracle")
    a = ap.parse_args()
    lc = Path(a.sdist) / "vendor/llama.cpp"
    subprocess.run(["g++", "-std=c++17", "-O1", f"-I{lc}/common", f"-I{lc}/include",
                    f"-I{lc}/ggml/include", f"-I{lc}/vendor",
                    str(REPO / "experiments/chat_format_oracle.cpp"), "-o", a.exe,
                    f"-L{a.bin}", "-lllama-common", "-lllama", f"-Wl,-rpath,{a.bin}"], check=True)
    out = []
    for name, opts, outputs in CASES:
        opts = dict(opts)
        req = {"template": str(lc / "models/templates" / f"{name}.jinja"),
               "messages": [{"role": "user", "content": "Hey there!"}], "outputs": outputs,
               "reasoning_format": opts.pop("reasoning_format", "deepseek")}
        if opts.pop("tools"):
            req["tools"] = [SPECIAL]
        req.update(opts)
        r = json.loads(subprocess.run([a.exe], input=json.dumps(req), capture_output=True,
                                      text=True, check=True).stdout)
        if "error" in r:
            raise SystemExit(f"{name}: {r['error']}")
        out.append({"template": name, "tools": "tools" in req,
                    "reasoning_format": req["reasoning_format"],
                    "enable_thinking": req.get("enable_thinking", True),
                    "parallel_tool_calls": req.get("parallel_tool_calls", False),
                    "caps": r["caps"],
                    "generation_prompt": r["generation_prompt"], "prompt": r["prompt"],
                    "cases": [{"text": o, "expect": p} for o, p in zip(outputs, r["parsed"])]})
    # llama.cpp's common_chat_extra_context of the day the prompts were rendered
    day = {"date_string": time.strftime("%d %b %Y"), "datetime": time.strftime("%b %d %Y")}
    OUT.write_text(json.dumps({"source": "llama.cpp 0c1e570 common_chat_templates_apply + "
                               "common_chat_parse via experiments/chat_format_oracle.py",
                               "context": day, "tool": SPECIAL, "sets": out}, indent=1, ensure_ascii=False)
                   + "\n")
    print(f"wrote {OUT} ({sum(len(s['cases']) for s in out)} cases)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""llama-server's own (non-OpenAI) ``/completion`` response shapes (server-task.cpp:
``to_json_non_oaicompat`` of the final and partial results, ``task_params::to_json``)."""

from __future__ import annotations

import math

from jllama.server import openai_schema as oa


def body_for_parse(body: dict) -> dict:
    """``n_predict`` < 0 means no limit in llama-server; drop it before the common checks."""
    v = body.get("n_predict")
    if isinstance(v, int) and not isinstance(v, bool) and v < 0:
        body = {k: x for k, x in body.items() if k != "n_predict"}
    return body


def generation_settings(opts: oa.GenOptions, eog: frozenset[int], model: str) -> dict:
    p = opts.params
    bias = dict(p.logit_bias)
    if opts.ignore_eos:  # llama-server adds these (JSON has no -inf: null)
        bias.update({t: -math.inf for t in sorted(eog)})
    n_predict = opts.max_tokens if opts.max_tokens is not None else -1
    return {
        "seed": p.seed if p.seed is not None else 0xFFFFFFFF, "temperature": p.temperature,
        "top_k": p.top_k, "top_p": p.top_p, "min_p": p.min_p,
        "repeat_last_n": p.repeat_last_n, "repeat_penalty": p.repeat_penalty,
        "presence_penalty": p.presence_penalty, "frequency_penalty": p.frequency_penalty,
        "max_tokens": n_predict, "n_predict": n_predict, "ignore_eos": opts.ignore_eos,
        "stream": opts.stream, "n_probs": opts.n_probs, "model": model,
        "stop": opts.stop, "grammar": opts.grammar or "",
        "logit_bias": [{"bias": None if math.isinf(v) else v,
                        "token": t} for t, v in bias.items()],
    }


def stop_type(finish: str | None, stop_word: str | None) -> str:
    if stop_word:
        return "word"
    return {"stop": "eos", "length": "limit"}.get(finish or "", "none")


def timings(n_prompt: int, prompt_s: float, n_gen: int, gen_s: float) -> dict:
    pm, gm = prompt_s * 1e3, gen_s * 1e3
    return {"prompt_n": n_prompt, "prompt_ms": pm,
            "prompt_per_token_ms": pm / n_prompt if n_prompt else 0.0,
            "prompt_per_second": n_prompt / prompt_s if prompt_s > 0 else 0.0,
            "predicted_n": n_gen, "predicted_ms": gm,
            "predicted_per_token_ms": gm / n_gen if n_gen else 0.0,
            "predicted_per_second": n_gen / gen_s if gen_s > 0 else 0.0}


def final(content: str, *, model: str, prompt: str, n_prompt: int, n_gen: int, cached: int,
          finish: str | None, stop_word: str | None, settings: dict, probs: list | None,
          timing: dict, stream: bool) -> dict:
    d = {"index": 0, "content": content, "tokens": [], "id_slot": -1, "stop": True,
         "model": model, "tokens_predicted": n_gen, "tokens_evaluated": n_prompt,
         "generation_settings": settings, "prompt": prompt, "has_new_line": "\n" in content,
         "truncated": False, "stop_type": stop_type(finish, stop_word),
         "stopping_word": stop_word or "", "tokens_cached": n_prompt + n_gen,
         "timings": timing}
    if not stream and probs:
        d["completion_probabilities"] = probs
    return d


def partial(content: str, n_prompt: int, n_gen: int, probs: list | None) -> dict:
    d = {"index": 0, "content": content, "tokens": [], "stop": False, "id_slot": -1,
         "tokens_predicted": n_gen, "tokens_evaluated": n_prompt}
    if probs:
        d["completion_probabilities"] = probs
    return d

"""llama-server's own (non-OpenAI) ``/completion`` response shapes (server-task.cpp:
``to_json_non_oaicompat`` of the final, partial and progress results, ``task_params::to_json``,
server-common's ``result_timings``)."""

from __future__ import annotations

import math

from jllama.engine.sampling import SamplingParams
from jllama.server import openai_schema as oa

DEFAULT_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: what a seed left unset reports


def params_json(p: SamplingParams, n_predict: int | None, seed: int | None = None) -> dict:
    """``task_params::to_json(only_metrics)`` for the fields jllama has (``/props``, ``/slots``
    and the start of ``generation_settings``); ``seed`` stands in for an unset ``p.seed``."""
    n = -1 if n_predict is None else n_predict
    s = p.seed if p.seed is not None else seed
    return {"seed": DEFAULT_SEED if s is None or s < 0 else s,
            "temperature": p.temperature, "dynatemp_range": p.dynatemp_range,
            "dynatemp_exponent": p.dynatemp_exponent, "top_k": p.top_k, "top_p": p.top_p,
            "min_p": p.min_p, "top_n_sigma": p.top_n_sigma,
            "xtc_probability": p.xtc_probability, "xtc_threshold": p.xtc_threshold,
            "typical_p": p.typical_p, "repeat_last_n": p.repeat_last_n,
            "repeat_penalty": p.repeat_penalty, "presence_penalty": p.presence_penalty,
            "frequency_penalty": p.frequency_penalty, "dry_multiplier": p.dry_multiplier,
            "dry_base": p.dry_base, "dry_allowed_length": p.dry_allowed_length,
            "dry_penalty_last_n": p.dry_penalty_last_n, "mirostat": p.mirostat,
            "mirostat_tau": p.mirostat_tau, "mirostat_eta": p.mirostat_eta,
            "min_keep": p.min_keep,
            "max_tokens": n, "n_predict": n}


def generation_settings(opts: oa.GenOptions, eog: frozenset[int], model: str) -> dict:
    bias = dict(opts.params.logit_bias)
    if opts.ignore_eos:  # llama-server adds these (JSON has no -inf: null)
        bias.update({t: -math.inf for t in sorted(eog)})
    return {
        **params_json(opts.params, opts.max_tokens),
        # the full task_params::to_json has the breakers too (/props and /slots do not)
        "dry_sequence_breakers": list(opts.params.dry_sequence_breakers),
        "ignore_eos": opts.ignore_eos, "n_keep": opts.n_keep,
        "stream": opts.stream, "n_probs": opts.n_probs, "model": model,
        "stop": opts.stop, "grammar": opts.grammar or "",
        "logit_bias": [{"bias": None if math.isinf(v) else v,
                        "token": t} for t, v in bias.items()],
    }


def stop_type(finish: str | None, stop_word: str | None) -> str:
    if stop_word:
        return "word"
    return {"stop": "eos", "length": "limit"}.get(finish or "", "none")


def timings(cached: int, n_prompt: int, prompt_s: float, n_gen: int, gen_s: float,
            draft_n: int = 0, draft_accepted: int = 0) -> dict:
    """``result_timings``: ``n_prompt`` tokens evaluated (``cached`` reused) in ``prompt_s``,
    ``n_gen`` generated in ``gen_s``. The first generated token comes from the prompt's logits,
    so the generation rate is over the ``n_gen - 1`` decode steps after it (n_gen_steps).
    ``draft_n``/``draft_n_accepted`` only when speculative decoding drafted tokens."""
    pm, gm = prompt_s * 1e3, gen_s * 1e3
    steps = max(n_gen - 1, 0)
    out = {"cache_n": cached, "prompt_n": n_prompt, "prompt_ms": pm,
           "prompt_per_token_ms": pm / n_prompt if n_prompt else 0.0,
           "prompt_per_second": 1e3 * n_prompt / pm if n_prompt and pm > 0 else 0.0,
           "predicted_n": n_gen, "predicted_ms": gm,
           "predicted_per_token_ms": gm / steps if steps and gm > 0 else 0.0,
           "predicted_per_second": 1e3 * steps / gm if steps and gm > 0 else 0.0}
    if draft_n > 0:
        out.update(draft_n=draft_n, draft_n_accepted=draft_accepted)
    return out


def final(content: str, *, model: str, prompt: str, n_prompt: int, n_gen: int,
          finish: str | None, stop_word: str | None, settings: dict, probs: list | None,
          timing: dict, stream: bool, id_slot: int = -1, truncated: bool = False,
          tokens_cached: int | None = None) -> dict:
    d = {"index": 0, "content": content, "tokens": [], "id_slot": id_slot, "stop": True,
         "model": model, "tokens_predicted": n_gen, "tokens_evaluated": n_prompt,
         "generation_settings": settings, "prompt": prompt, "has_new_line": "\n" in content,
         "truncated": truncated, "stop_type": stop_type(finish, stop_word),
         "stopping_word": stop_word or "",
         "tokens_cached": n_prompt + n_gen if tokens_cached is None else tokens_cached,
         "timings": timing}
    if not stream and probs:
        d["completion_probabilities"] = probs
    return d


def partial(content: str, n_prompt: int, n_gen: int, probs: list | None,
            tokens: list[int] | None = None) -> dict:
    """A streamed chunk: its text and the ids of the tokens behind it."""
    d = {"index": 0, "content": content, "tokens": tokens or [], "stop": False, "id_slot": -1,
         "tokens_predicted": n_gen, "tokens_evaluated": n_prompt}
    if probs:
        d["completion_probabilities"] = probs
    return d


def progress(total: int, cached: int, processed: int, seconds: float) -> dict:
    """The prompt_progress chunk of ``return_progress``: counts and prompt timings so far (the
    first one before any prompt token is evaluated)."""
    n = max(processed - cached, 0)
    return {"index": 0, "content": "", "tokens": [], "stop": False, "id_slot": -1,
            "prompt_progress": {"total": total, "cache": cached, "processed": processed,
                                "time_ms": seconds * 1e3},
            "timings": timings(cached, n, seconds, 0, 0.0)}


def nested_values(paths: list[str], d: dict) -> dict:
    """llama-server's response_fields (json_get_nested_values): only the named fields, each
    keyed by its path ("generation_settings/n_predict" walks into objects); missing paths are
    left out."""
    out = {}
    for path in paths:
        cur, ok = d, True
        for k in path.split("/"):
            if isinstance(cur, dict) and k in cur:
                cur = cur[k]
            else:
                ok = False
                break
        if ok:
            out[path] = cur
    return out

"""Run configs: every error names the file, the key path and what was expected."""

from __future__ import annotations

import pytest

from jllama.config import load_config
from jllama.errors import ConfigError


def _write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_shipped_configs_load():
    from pathlib import Path

    files = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert files
    for f in files:
        cfg = load_config(f)
        assert cfg.model


def test_values_and_overrides(tmp_path):
    p = _write(tmp_path, """
model: smollm2-135m-instruct
runtime: {ctx_size: 1024}
generation:
  prompt: hi
  sampling: {temperature: 0.5, stop: ["\\n"]}
""")
    cfg = load_config(p, ["generation.max_tokens=7", "generation.sampling.seed=3", "runtime.ctx_size=512"])
    assert cfg.runtime.ctx_size == 512
    assert cfg.generation.max_tokens == 7
    assert cfg.generation.sampling.seed == 3
    assert cfg.generation.sampling.temperature == 0.5
    assert cfg.generation.sampling.stop == ["\n"]


def test_unknown_key_names_file_and_path(tmp_path):
    p = _write(tmp_path, "runtime:\n  ctx_sise: 10\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "runtime.ctx_sise" in str(e.value) and "ctx_size" in str(e.value)


def test_wrong_type(tmp_path):
    p = _write(tmp_path, "generation:\n  sampling:\n    top_k: lots\n")
    with pytest.raises(ConfigError, match=r"'generation.sampling.top_k' must be an integer, got str 'lots'"):
        load_config(p)


def test_bad_yaml_and_missing_file(tmp_path):
    p = _write(tmp_path, "runtime: {ctx_size: [\n")
    with pytest.raises(ConfigError, match="invalid YAML at line"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["generation.max_tokens"])
    with pytest.raises(ConfigError, match="unknown key 'generation.max_tokenz'"):
        load_config(None, ["generation.max_tokenz=3"])


def test_messages_and_prompt_conflict(tmp_path):
    p = _write(tmp_path, "generation:\n  prompt: a\n  messages: [{role: user, content: b}]\n")
    with pytest.raises(ConfigError, match="either"):
        load_config(p)


def test_cli_reports_config_error_without_traceback(tmp_path, capsys):
    from jllama.cli.main import main

    p = _write(tmp_path, "modle: x\n")
    assert main(["run", str(p)]) == 1
    err = capsys.readouterr().err
    assert "unknown key 'modle'" in err and "Traceback" not in err


def test_numerics_switches(tmp_path):
    """runtime.flash_attn / runtime.prompt_matmul: overrides and CLI flags reach the config;
    a wrong prompt_matmul names the key and the file."""
    import argparse

    from jllama.cli.common import add_numerics_args, overrides_from_args
    from jllama.config import load_config
    from jllama.errors import ConfigError

    p = argparse.ArgumentParser()
    add_numerics_args(p, via_config=True)
    args = p.parse_args(["-fa", "off", "--prompt-matmul", "f32"])
    cfg = load_config(None, overrides_from_args(args))
    assert cfg.runtime.flash_attn is False and cfg.runtime.prompt_matmul == "f32"
    assert load_config(None, []).runtime.prompt_matmul == "int8"
    bad = tmp_path / "bad.yaml"
    bad.write_text("runtime: {prompt_matmul: fp8}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*prompt_matmul"):
        load_config(bad)


@pytest.mark.parametrize("key, value, hint", [("dtype", "bf16", "always f32"),
                                              ("n_slots", 4, "server.parallel")])
def test_removed_runtime_keys_name_file_and_key(tmp_path, key, value, hint):
    """runtime.dtype and runtime.n_slots were accepted and never read: now an error that names
    the file, the key and what to use instead."""
    p = _write(tmp_path, f"runtime:\n  {key}: {value}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and f"'runtime.{key}'" in msg and hint in msg
    with pytest.raises(ConfigError, match=f"'runtime.{key}'"):
        load_config(None, [f"runtime.{key}={value}"])


def test_runtime_and_perplexity_ranges(tmp_path):
    assert load_config(None, []).runtime.platform is None  # JAX_PLATFORMS, else cpu
    assert load_config(None, ["runtime.threads=2"]).runtime.threads == 2
    with pytest.raises(ConfigError, match="'runtime.threads' must be at least 1"):
        load_config(None, ["runtime.threads=0"])
    for bad in ("perplexity.ctx=8", "perplexity.batch=0", "perplexity.chunks=0"):
        with pytest.raises(ConfigError, match="perplexity settings out of range"):
            load_config(None, [bad])
    (tmp_path / "wiki.txt").write_text("text")
    p = _write(tmp_path, "perplexity: {file: wiki.txt, chunks: 3}\n")
    cfg = load_config(p)
    assert cfg.perplexity.file == str(tmp_path / "wiki.txt")  # relative to the config file
    assert (cfg.perplexity.ctx, cfg.perplexity.chunks, cfg.perplexity.batch) == (512, 3, 2)
    with pytest.raises(ConfigError, match="not both"):
        load_config(p, ["generation.prompt=hi"])


def test_config_that_is_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_llama_cpp_sampler_flags_reach_sampling_params():
    """generate/chat's --typical, --top-nsigma, --xtc-*, --dynatemp-*, --min-keep (common/
    arg.cpp's names) go through generation.sampling to the engine's SamplingParams."""
    import argparse

    from jllama.cli.common import add_sampling_args, overrides_from_args
    from jllama.config import load_config, sampling_params

    p = argparse.ArgumentParser()
    add_sampling_args(p)
    args = p.parse_args(["--typical-p", "0.4", "--top-n-sigma", "2", "--xtc-probability", "0.3",
                         "--xtc-threshold", "0.15", "--dynatemp-range", "0.2",
                         "--dynatemp-exp", "0.5", "--min-keep", "3"])
    sp = sampling_params(load_config(None, overrides_from_args(args)).generation.sampling)
    assert (sp.typical_p, sp.top_n_sigma, sp.xtc_probability, sp.xtc_threshold,
            sp.dynatemp_range, sp.dynatemp_exponent, sp.min_keep) == \
        (0.4, 2.0, 0.3, 0.15, 0.2, 0.5, 3)
    assert not sampling_params(load_config(None, []).generation.sampling).uses_extended()


def test_mirostat_and_dry_flags_reach_sampling_params():
    """--mirostat/--mirostat-lr/--mirostat-ent and --dry-* (common/arg.cpp): a --dry-base
    below 1 keeps the default, --dry-sequence-breaker replaces the default breakers (escapes
    processed, "none" clears them); a mirostat other than 0-2 is one clear error."""
    import argparse

    from jllama.cli.common import add_sampling_args, overrides_from_args
    from jllama.config import load_config, sampling_params
    from jllama.errors import ConfigError

    p = argparse.ArgumentParser()
    add_sampling_args(p)

    def params(*flags):
        return sampling_params(load_config(None, overrides_from_args(p.parse_args(flags)))
                               .generation.sampling)

    sp = params("--mirostat", "2", "--mirostat-lr", "0.3", "--mirostat-ent", "4")
    assert (sp.mirostat, sp.mirostat_eta, sp.mirostat_tau) == (2, 0.3, 4.0)
    assert sp.uses_extended() and not sp.uses_dry()
    sp = params("--dry-multiplier", "0.8", "--dry-base", "0.5", "--dry-allowed-length", "3",
                "--dry-penalty-last-n", "32", "--dry-sequence-breaker", "\\n",
                "--dry-sequence-breaker", "a\\x41\\q")
    assert (sp.dry_multiplier, sp.dry_base, sp.dry_allowed_length, sp.dry_penalty_last_n) == \
        (0.8, 1.75, 3, 32)
    assert sp.dry_sequence_breakers == ("\n", "aA\\q") and sp.uses_dry()
    assert params("--dry-sequence-breaker", "none").dry_sequence_breakers == ()
    assert params().dry_sequence_breakers == ("\n", ":", "\"", "*")
    for bad in (["--mirostat", "3"], ["--dry-penalty-last-n", "-1"]):
        with pytest.raises(ConfigError):
            params(*bad)

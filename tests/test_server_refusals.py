"""The real teacher server (in this process, under uvicorn) against bad requests, seen from TeacherClient: each is
refused with a clear 4xx and the next request is served; refusals are not retried; formats and batching agree."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from conftest import ThreadedUvicorn
from fault_servers import FORMATS, assert_batches_equal

from protege.teacher.client import TeacherClient, TeacherServerError

pytest_plugins = ["fault_servers"]  # the sleeps fixture


LIMITS = dict(max_model_len=64, max_top_logprobs=8, max_body_bytes=16384)


@pytest.fixture(scope="module")
def real_server(backend):
    from protege.server.app import ServerLimits, create_app

    with ThreadedUvicorn(create_app(backend, ServerLimits(**LIMITS))) as running:
        yield running.url


GOOD = dict(sequences=[[3, 40, 41, 42, 43], [7, 8, 9]], prompt_lengths=[2, 1], top_k=3)


@pytest.fixture(scope="module")
def good_answer(real_server):
    client = TeacherClient(real_server, response_format="binary", max_retries=0)
    answer = client.score(GOOD["sequences"], GOOD["prompt_lengths"], top_k=GOOD["top_k"])
    client.close()
    return answer


def body(**overrides) -> dict:
    request = {"sequences": [[3, 40, 41, 42], [7, 8, 9]], "prompt_lengths": [1, 2], "top_logprobs": 2}
    request.update(overrides)
    return request


def refusals(vocab: int):
    """(id, JSON body or raw bytes, expected status, a substring of the answer)."""
    return [
        ("token id = vocab", body(sequences=[[3, 4, 5], [7, vocab, 9]]), 400, f"token id {vocab}, outside the vocab"),
        ("negative token id", body(sequences=[[3, -1, 5], [7, 8, 9]]), 400, "token id -1, outside the vocabulary"),
        ("no sequences", body(sequences=[], prompt_lengths=[]), 400, "'sequences' is empty"),
        ("an empty sequence", body(sequences=[[3, 4], []], prompt_lengths=[1, 1]), 400, "sequence 1 is empty"),
        ("prompt_length 0", body(prompt_lengths=[0, 1]), 400, "prompt_lengths[0]=0 is outside [1, 4)"),
        ("prompt_length = len", body(prompt_lengths=[1, 3]), 400, "prompt_lengths[1]=3 is outside [1, 3)"),
        ("over max_model_len", body(sequences=[[3] * 65, [7, 8]]), 400, "65 tokens, over max_model_len=64"),
        ("top_logprobs over limit", body(top_logprobs=9), 400, "top_logprobs=9 is outside [1, 8]"),
        ("top_logprobs 0", body(top_logprobs=0), 400, "top_logprobs=0 is outside [1, 8]"),
        ("body too large", body(sequences=[[3] * 60] * 200, prompt_lengths=[1] * 200), 413, "over the limit of 16384"),
        ("sequences a string", body(sequences="3 4 5"), 422, "sequences"),
        ("token ids as strings", body(sequences=[["3", "4"], [7, 8]]), 422, "sequences"),
        ("token ids as floats", body(sequences=[[3.0, 4.5], [7, 8]]), 422, "sequences"),
        ("top_logprobs a string", body(top_logprobs="2"), 422, "top_logprobs"),
        ("unknown response_format", body(response_format="xml"), 422, "response_format"),
        ("malformed JSON", b'{"sequences": [[3, 4]', 422, "JSON"),
        ("mismatched lengths", body(prompt_lengths=[1]), 400, "'prompt_lengths' has 1 entries for 2 sequences"),
        ("temperature 0", body(temperature=0), 400, "temperature=0 must be a finite number > 0"),
        ("temperature < 0", body(temperature=-0.5), 400, "temperature=-0.5 must be a finite number > 0"),
        (
            "temperature NaN",
            b'{"sequences": [[3, 4]], "prompt_lengths": [1], "temperature": NaN}',
            422,
            "finite number",
        ),
        ("unknown field", body(top_k=2), 422, "top_k"),
    ]


REFUSAL_IDS = [case[0] for case in refusals(0)]


@pytest.mark.parametrize("case", REFUSAL_IDS)
def test_real_server_refuses_bad_requests_then_serves_the_next(real_server, backend, good_answer, case):
    _, request, status, detail = next(c for c in refusals(backend.vocab_size) if c[0] == case)
    url = f"{real_server}/get_sequence_logprobs/"
    if isinstance(request, bytes):
        answer = httpx.post(url, content=request, headers={"Content-Type": "application/json"}, timeout=30)
    else:
        answer = httpx.post(url, json=request, timeout=30)
    assert answer.status_code == status, answer.text
    assert detail in answer.text, answer.text
    assert "detail" in answer.json()

    client = TeacherClient(real_server, response_format="binary", max_retries=0)
    after = client.score(GOOD["sequences"], GOOD["prompt_lengths"], top_k=GOOD["top_k"])
    client.close()
    assert_batches_equal(after, good_answer, atol=1e-6)


def test_real_server_refusal_reaches_the_client_unretried(real_server, backend, sleeps):
    before = httpx.get(f"{real_server}/info/").json()
    client = TeacherClient(real_server, backoff=0.01, max_retries=3)
    with pytest.raises(TeacherServerError) as error:
        client.score([[3, 4, backend.vocab_size + 5]], [1])
    client.close()
    message = str(error.value)
    assert f"{real_server}/get_sequence_logprobs/ refused the request (HTTP 400)" in message
    assert f"token id {backend.vocab_size + 5}, outside the vocabulary" in message
    after = httpx.get(f"{real_server}/info/").json()
    assert (after["requests"] - before["requests"], after["refused"] - before["refused"]) == (1, 1)
    assert sleeps == []


@pytest.mark.parametrize("response_format", FORMATS)
def test_real_server_formats_agree(real_server, good_answer, response_format):
    client = TeacherClient(real_server, response_format=response_format, max_retries=0)
    batch = client.score(GOOD["sequences"], GOOD["prompt_lengths"], top_k=GOOD["top_k"])
    client.close()
    # float16 keeps a relative error under 2**-11
    assert_batches_equal(batch, good_answer, atol=1e-6, rtol=1e-3 if response_format == "compact" else 0.0)


class GatedBackend:
    """The real backend, whose first call waits for `gate`: requests sent meanwhile queue up and get batched."""

    def __init__(self, inner):
        self.inner, self.vocab_size, self.model_name = inner, inner.vocab_size, inner.model_name
        self.gate, self.calls = threading.Event(), 0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)  # the rest of the Backend protocol is the real backend's

    def score(self, *args):
        self.calls += 1
        if self.calls == 1:
            self.gate.wait(timeout=30)
        return self.inner.score(*args)


def test_real_server_batches_concurrent_requests_like_sequential_ones(backend, real_server):
    from protege.server.app import ServerLimits, create_app

    rng = np.random.default_rng(1)
    requests = []
    for _ in range(8):
        sequences = [rng.integers(0, backend.vocab_size, size=int(n)).tolist() for n in rng.integers(3, 20, size=3)]
        requests.append((sequences, [int(rng.integers(1, len(s))) for s in sequences]))

    sequential_client = TeacherClient(real_server, response_format="binary", max_retries=0)
    sequential = [sequential_client.score(s, p, top_k=4) for s, p in requests]
    sequential_client.close()

    gated = GatedBackend(backend)
    with ThreadedUvicorn(create_app(gated, ServerLimits(**LIMITS, batching=True))) as running:
        client = TeacherClient(running.url, response_format="binary", max_retries=0, timeout=60)
        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = [pool.submit(client.score, s, p, 4) for s, p in requests]
            deadline = time.monotonic() + 30
            while httpx.get(f"{running.url}/info/").json()["requests"] < len(requests):
                assert time.monotonic() < deadline, "the requests did not all reach the server"
                time.sleep(0.01)
            gated.gate.set()
            concurrent = [future.result(timeout=60) for future in futures]
        client.close()
        info = httpx.get(f"{running.url}/info/").json()

    for got, want in zip(concurrent, sequential):
        assert_batches_equal(got, want, atol=1e-5)
    assert info["requests"] == 8 and info["refused"] == 0
    assert info["backend_calls"] < info["requests"]
    assert info["backend_calls"] == gated.calls <= 2  # the first call, then every request queued behind it
    assert info["scored_tokens"] == sum(len(s) - p for ss, pp in requests for s, p in zip(ss, pp))


def test_server_refuses_top_logprobs_over_vocab_size(backend):
    from protege.server.app import ServerLimits, create_app

    with ThreadedUvicorn(create_app(backend, ServerLimits(max_top_logprobs=10 * backend.vocab_size))) as running:
        answer = httpx.post(f"{running.url}/get_sequence_logprobs/", json=body(top_logprobs=backend.vocab_size + 1))
    assert answer.status_code == 400, answer.text


def test_server_refuses_chunked_body_over_the_limit(real_server):
    content = json.dumps(body(sequences=[[3] * 60] * 200, prompt_lengths=[1] * 200)).encode()
    assert len(content) > LIMITS["max_body_bytes"]
    answer = httpx.post(
        f"{real_server}/get_sequence_logprobs/",
        content=iter([content]),  # no Content-Length: Transfer-Encoding: chunked
        headers={"Content-Type": "application/json"},
    )
    assert answer.status_code == 413, answer.status_code

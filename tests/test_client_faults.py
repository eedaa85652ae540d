"""TeacherClient against faulty servers over real HTTP on 127.0.0.1: retries and backoff, timeouts and deadlines,
bad and impossible answers, and batches split to the server's limits.

The scripted servers are tests/fault_servers.py's. Nothing here sleeps to make a timing assertion: retries are counted
by the stubs, backoff delays are recorded, and concurrency is shown by a barrier.
"""

from __future__ import annotations

import json
import re
import socket
import threading

import httpx
import numpy as np
import pytest
from conftest import ThreadedUvicorn, free_port
from fault_servers import (
    FORMATS,
    PROMPT_LENGTHS,
    ROUTE,
    SEQUENCES,
    VOCAB,
    assert_batches_equal,
    expected_batch,
    fake_rows,
    score,
    tolerance,
    valid_payload,
)
from starlette.responses import JSONResponse, Response

from protege.server.app import ServerLimits, create_app
from protege.teacher.client import TeacherClient, TeacherServerError
from protege.teacher.codec import encode

pytest_plugins = ["fault_fixtures"]  # the stub, raw_server and sleeps fixtures


# ----- Retries -----


@pytest.mark.parametrize("response_format", FORMATS)
def test_5xx_twice_then_success_is_retried_with_exponential_backoff(stub, sleeps, response_format):
    server, url = stub(lambda body, i: Response("overloaded", status_code=503) if i < 2 else valid_payload(body))
    batch = score(url, response_format, top_k=3, backoff=0.01, max_retries=4)
    assert len(server.bodies) == 3
    assert sleeps == [0.01, 0.02]
    assert all(body == server.bodies[0] for body in server.bodies)
    assert server.bodies[0]["response_format"] == response_format and server.bodies[0]["top_logprobs"] == 3
    assert_batches_equal(batch, expected_batch(SEQUENCES, PROMPT_LENGTHS, 3), tolerance(response_format))


def test_dropped_connections_are_retried_with_exponential_backoff(raw_server, sleeps):
    server = raw_server(["close", "close", "ok"])
    batch = score(server.url, "binary", top_k=2, backoff=0.01, max_retries=3)
    assert server.connections == 3
    assert sleeps == [0.01, 0.02]
    assert_batches_equal(batch, expected_batch(SEQUENCES, PROMPT_LENGTHS, 2))


def test_4xx_is_not_retried(stub, sleeps):
    detail = "sequence 1 holds token id 99999, outside the vocabulary [0, 1000)"
    server, url = stub(lambda body, i: JSONResponse({"detail": detail}, status_code=400))
    with pytest.raises(TeacherServerError) as error:
        score(url, backoff=0.01, max_retries=4)
    message = str(error.value)
    assert f"{url}/get_sequence_logprobs/" in message and "HTTP 400" in message and detail in message
    assert len(server.bodies) == 1 and sleeps == []


def test_persistent_5xx_fails_after_all_attempts(stub, sleeps):
    server, url = stub(lambda body, i: Response("backend on fire", status_code=500))
    with pytest.raises(TeacherServerError) as error:
        score(url, backoff=0.01, max_retries=3)
    message = str(error.value)
    assert f"teacher server at {url}/get_sequence_logprobs/ failed after 4 attempts" in message
    assert "HTTP 500" in message and "backend on fire" in message
    assert len(server.bodies) == 4
    assert sleeps == [0.01, 0.02, 0.04]


def test_connection_refused():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(TeacherServerError) as error:
        score(url, backoff=0.01, max_retries=2)
    message = str(error.value)
    assert f"teacher server at {url}/get_sequence_logprobs/ failed after 3 attempts" in message
    assert "ConnectError" in message

    client = TeacherClient(url, backoff=0.01)
    with pytest.raises(TeacherServerError, match=rf"teacher server at {url}/health/ was not ready after 1 s"):
        client.wait_until_ready(timeout=1, interval=0.1)
    client.close()


def test_server_that_never_answers_times_out(raw_server):
    server = raw_server(["hang"])
    outcome = {}

    def call():
        try:
            score(server.url, timeout=0.5, max_retries=1, backoff=0.01)
        except Exception as error:  # noqa: BLE001 - checked below
            outcome["error"] = error

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout=20)  # two 0.5 s attempts; a hang would stop here, not block the run
    assert not thread.is_alive(), "the client hung on a server that never answers"
    error = outcome.get("error")
    assert isinstance(error, TeacherServerError), error
    message = str(error)
    assert f"teacher server at {server.url}/get_sequence_logprobs/ failed after 2 attempts" in message
    assert "no answer within the 0.5 s timeout" in message
    assert server.connections == 2


def openai_answer(sequences, spoil):
    """A /v1/completions answer with prompt log-probs, whose top-1 log-prob at position 2 is `spoil`."""
    choices = []
    for index, sequence in enumerate(sequences):
        logprobs = [None] + [{f"token_id:{t}": {"logprob": -0.5, "rank": 1}} for t in sequence[1:]]
        if index == 0:  # the top-1 entry is another token's, spoiled; the actual token ranks second
            logprobs[2] = {
                "token_id:1": {"logprob": spoil, "rank": 1},
                f"token_id:{sequence[2]}": {"logprob": -0.5, "rank": 2},
            }
        choices.append({"index": index, "prompt_logprobs": logprobs})
    return {"choices": choices}


@pytest.mark.parametrize(
    ("value", "problem"),
    [("NaN", "top-1 log-prob is missing or not finite"), ("Infinity", "not finite"), (0.5, "positive")],
)
def test_openai_protocol_refuses_impossible_log_probs(value, problem):
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    async def completions(request):
        body = json.loads(await request.body())
        spoil = float(value) if isinstance(value, str) else value
        return Response(json.dumps(openai_answer(body["prompt"], spoil)), media_type="application/json")

    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])
    with ThreadedUvicorn(app) as running:
        client = TeacherClient(running.url, protocol="openai", model="m", max_retries=0)
        with pytest.raises(TeacherServerError, match=f"answered impossible log-probs: sequence 0: .*{problem}"):
            client.score([[3, 4, 5, 6]], [1], top_k=2)
        client.close()


def test_frozen_server_ends_at_the_deadline_with_one_log_line_per_retry(caplog):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)  # accepts connections (the kernel does), never answers
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    client = TeacherClient(url, timeout=0.3, max_retries=50, backoff=0.05, deadline=1.0)
    with caplog.at_level("WARNING", logger="protege"), pytest.raises(TeacherServerError) as error:
        client.score([[3, 4, 5]], [1])
    client.close()
    sock.close()
    message = str(error.value)
    attempts = int(message.split("failed after ")[1].split(" attempt")[0])
    assert 2 <= attempts < 50  # the deadline, not the retry count, ended it
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == attempts - 1
    assert retries[0] == f"teacher server at {url}{ROUTE}: no answer within the 0.3 s timeout; retry 1/50 in 0.05 s"


# ----- Bad payloads -----


def mutate(name):
    """Payload mutations by name: (formats it applies to, function(payload, body) -> payload or a Response)."""

    def truncate_b64(cut):
        def apply(p, body):
            key = "logprobs_b64" if body["response_format"] == "binary" else "logprobs_f16_b64"
            p[key] = p[key][:-cut]
            return p

        return apply

    def wrong_shape(p, body):
        p["shape"][1] += 1
        return p

    def wrong_lengths(p, body):
        p["completion_lengths"][0] += 1
        return p

    def wrong_actual_ids(p, body):
        if body["response_format"] == "json":
            p["actual_token_ids"][1][0] += 1
        else:
            rows = fake_rows(body["sequences"], body["prompt_lengths"], body["top_logprobs"])
            rows[1].actual_ids[0] += 1
            p = encode(rows, body["top_logprobs"], "binary", VOCAB)
        return p

    def non_finite_actual(value):
        def apply(p, body):
            rows = fake_rows(body["sequences"], body["prompt_lengths"], body["top_logprobs"])
            rows[2].actual_logprobs[1] = value
            return encode(rows, body["top_logprobs"], body["response_format"], VOCAB)

        return apply

    def unsorted_topk(p, body):
        rows = fake_rows(body["sequences"], body["prompt_lengths"], body["top_logprobs"])
        rows[0].topk_logprobs[1] = rows[0].topk_logprobs[1, ::-1].copy()
        return encode(rows, body["top_logprobs"], body["response_format"], VOCAB)

    def missing_key(p, body):
        del p[{"json": "logprobs", "binary": "token_ids_b64", "compact": "logprobs_f16_b64"}[body["response_format"]]]
        return p

    table = {
        "truncated base64 (invalid)": (
            ("binary", "compact"),
            truncate_b64(3),
            r"'logprobs(_f16)?_b64' is not valid base64",
        ),
        "truncated base64 (short)": (("binary", "compact"), truncate_b64(8), r"'logprobs(_f16)?_b64' holds \d+ bytes"),
        "wrong shape": (("binary",), wrong_shape, r"shape \[3, 4, 3\] does not match the request's \[3, 3, 3\]"),
        "wrong completion_lengths": (FORMATS, wrong_lengths, r"completion_lengths \[4, 2, 3\] do not match"),
        "wrong actual_token_ids": (("json", "binary"), wrong_actual_ids, r"sequence 1: actual_token_ids differ"),
        "-inf actual log-prob": (FORMATS, non_finite_actual(-np.inf), r"sequence 2: the log-prob of an actual token"),
        "NaN actual log-prob": (FORMATS, non_finite_actual(np.nan), r"sequence 2: the log-prob of an actual token"),
        "unsorted top-k": (FORMATS, unsorted_topk, r"sequence 0: top-k log-probs are not sorted"),
        "invalid JSON": (
            FORMATS,
            lambda p, body: Response(b'{"completion_lengths": [3, 2', media_type="application/json"),
            r"answered invalid JSON \(\d+ bytes\)",
        ),
        "a JSON list": (FORMATS, lambda p, body: [p], r"the response is a list, not a JSON object"),
        "missing key": (FORMATS, missing_key, r"the response has no '(logprobs|token_ids_b64|logprobs_f16_b64)'"),
    }
    return table[name]


BAD_PAYLOADS = [
    pytest.param(name, response_format, id=f"{name}-{response_format}")
    for name in [
        "truncated base64 (invalid)",
        "truncated base64 (short)",
        "wrong shape",
        "wrong completion_lengths",
        "wrong actual_token_ids",
        "-inf actual log-prob",
        "NaN actual log-prob",
        "unsorted top-k",
        "invalid JSON",
        "a JSON list",
        "missing key",
    ]
    for response_format in mutate(name)[0]
]


@pytest.mark.parametrize(("name", "response_format"), BAD_PAYLOADS)
def test_bad_payload_is_a_clear_error(stub, name, response_format):
    _, change, problem = mutate(name)
    server, url = stub(lambda body, i: change(valid_payload(body), body))
    with pytest.raises(TeacherServerError) as error:
        score(url, response_format, top_k=3, backoff=0.01, max_retries=2)
    message = str(error.value)
    assert f"teacher server at {url}/get_sequence_logprobs/ answered" in message
    assert re.search(problem, message), message
    assert len(server.bodies) == 1  # a wrong answer is not asked again


# ----- Splitting -----


def test_large_batch_is_split_into_concurrent_requests_and_merged_in_order(stub):
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, VOCAB, size=int(n)).tolist() for n in rng.integers(3, 30, size=24)]
    prompt_lengths = [int(rng.integers(1, len(s))) for s in sequences]
    server, url = stub(lambda body, i: valid_payload(body))

    whole = TeacherClient(url, response_format="binary", max_tokens_per_request=10**6)
    unsplit = whole.score(sequences, prompt_lengths, top_k=4)
    whole.close()
    assert len(server.bodies) == 1
    server.bodies.clear()
    server.peak, server.barrier = 0, 3

    limit = 60
    split = TeacherClient(url, response_format="binary", max_tokens_per_request=limit, max_concurrency=3)
    merged = split.score(sequences, prompt_lengths, top_k=4)
    split.close()

    sizes = [sum(len(s) for s in body["sequences"]) for body in server.bodies]
    assert len(sizes) >= 6 and all(size <= limit for size in sizes), sizes
    assert server.peak == 3  # the barrier let requests through only once three were in flight together
    received = sorted(
        (tuple(s), p) for body in server.bodies for s, p in zip(body["sequences"], body["prompt_lengths"])
    )
    assert received == sorted((tuple(s), p) for s, p in zip(sequences, prompt_lengths))
    assert_batches_equal(merged, unsplit)
    assert_batches_equal(merged, expected_batch(sequences, prompt_lengths, 4))


def test_trainer_client_splits_batches_to_the_servers_request_limit(tiny_paths, tmp_path):
    from tiny import config
    from transformers import AutoTokenizer

    from protege.server.backends import TransformersBackend
    from protege.teacher.remote import connect_teacher

    teacher = TransformersBackend(tiny_paths["teacher"], device="cpu")
    limits = ServerLimits(max_model_len=64, max_batch_tokens=64)  # 64 tokens a request
    with ThreadedUvicorn(create_app(teacher, limits), limits) as running:
        tokenizer = AutoTokenizer.from_pretrained(tiny_paths["student"])
        args = config(tmp_path, use_teacher_server=True, teacher_model_server_url=running.url, loss_top_k=1)
        client = connect_teacher(args, tokenizer).client
        assert client.max_tokens_per_request == 64
        rng = np.random.default_rng(0)
        sequences = [rng.integers(0, teacher.vocab_size, 40).tolist() for _ in range(5)]
        batch = client.score(sequences, [1] * 5)
        client.close()
        info = httpx.get(f"{running.url}/info/").json()
    assert batch.completion_lengths.tolist() == [39] * 5
    assert (info["requests"], info["refused"]) == (5, 0)


# ----- More bad answers and requests: top-k columns, payload types, gzip bodies, server limits -----


def json_fewer_columns(columns):
    def apply(p, body):
        p["logprobs"] = [[row[:columns] for row in sequence] for sequence in p["logprobs"]]
        p["logprob_token_ids"] = [[row[:columns] for row in sequence] for sequence in p["logprob_token_ids"]]
        return p

    return apply


def json_minus_infinity_actual(p, body):
    p["actual_logprobs"][2][1] = float("-inf")  # json.dumps writes -Infinity; httpx's json.loads reads it back
    return p


def binary_shape_not_a_list(p, body):
    p["shape"] = 3
    return p


def json_logprobs_an_object(p, body):
    p["logprobs"] = {"0": p["logprobs"][0]}
    return p


@pytest.mark.parametrize(
    ("response_format", "change"),
    [
        # (N, 1) top-k lists for K=3 must not be broadcast into all K columns (top-1 repeated K times)
        pytest.param("json", json_fewer_columns(1), id="json-1-of-3-topk-columns"),
        pytest.param("json", json_fewer_columns(2), id="json-2-of-3-topk-columns"),
        # -Infinity must not pass as a finite log-prob (np.nan_to_num(nan=-inf) would make it -3.4e38)
        pytest.param("json", json_minus_infinity_actual, id="json-minus-Infinity-actual-logprob"),
        pytest.param("binary", binary_shape_not_a_list, id="binary-shape-an-int"),
        pytest.param("json", json_logprobs_an_object, id="json-logprobs-an-object"),
    ],
)
def test_malformed_payload_shapes_and_types_are_clear_errors(stub, response_format, change):
    _, url = stub(lambda body, i: change(valid_payload(body), body))
    with pytest.raises(TeacherServerError, match=rf"teacher server at {url}/get_sequence_logprobs/ answered"):
        score(url, response_format, top_k=3, max_retries=0)


def test_undecodable_gzip_body_is_a_clear_error(stub):
    _, url = stub(lambda body, i: Response(b"not gzip", headers={"Content-Encoding": "gzip"}))
    with pytest.raises(TeacherServerError, match=rf"teacher server at {url}/get_sequence_logprobs/"):
        score(url, max_retries=0)

"""The teacher server against malformed and extreme bodies: always a small 4xx, never a 5xx, and the connection (or
the `protege serve-teacher` process of a hypothesis fuzz run) stays up. Non-finite scores are never sent."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import ThreadedUvicorn, free_port, start_server, stop_server
from fault_servers import GOOD, ROUTE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protege.server.app import ServerLimits, create_app

LITERAL_CASES = [
    (b'{"sequences": [[3, 4]], "prompt_lengths": [1], "temperature": NaN}', 422, "finite"),
    (b'{"sequences": [[3, 4]], "prompt_lengths": [1], "temperature": Infinity}', 422, "finite"),
    (b'{"sequences": [[3, 4]], "prompt_lengths": [NaN]}', 422, "prompt_lengths"),
    (b'{"sequences": [[3, 4]], "prompt_lengths": [1], "temperature": 18446744073709551616}', 400, "outside [0.001"),
    (b'{"sequences": [[3, 4]], "prompt_lengths": [1], "temperature": 1e309}', 422, "finite"),
    (b'{"sequences": [[3, 4]], "prompt_lengths": [1], "temperature": 1e-38}', 400, "outside [0.001, 1000]"),
    (b'{"sequences": [[3, 4]], "prompt_lengths": [1], "temperature": 1e300}', 400, "outside [0.001, 1000]"),
    (b"\xff\xfe\x00garbage", 422, "Invalid JSON"),
    (b'{"sequences": [[3, 99999999999999999999999]], "prompt_lengths": [1]}', 400, "outside the vocabulary"),
    (b"[]", 422, "Input should be an object"),
    (b"null", 422, "Input should be an object"),
    (b"", 422, "Invalid JSON"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("body", "status", "detail"), LITERAL_CASES)
def test_extreme_values_get_a_4xx_and_the_connection_stays_open(backend, body, status, detail):
    limits = ServerLimits(max_model_len=64)
    with ThreadedUvicorn(create_app(backend, limits), limits) as running, httpx.Client() as client:
        answer = client.post(f"{running.url}{ROUTE}", content=body, headers={"Content-Type": "text/plain"})
        assert answer.status_code == status, answer.text
        assert detail in answer.text
        # the same keep-alive connection serves the next request
        assert client.post(f"{running.url}{ROUTE}", json=GOOD).status_code == 200
        assert client.get(f"{running.url}/info/").json()["requests"] == 2


@pytest.mark.slow
def test_validation_errors_are_listed_briefly_with_their_count(backend):
    limits = ServerLimits(max_model_len=64, max_body_bytes=8 * 2**20)
    body = {"sequences": [["x"] * 300_000], "prompt_lengths": [1]}
    with ThreadedUvicorn(create_app(backend, limits), limits) as running:
        answer = httpx.post(f"{running.url}{ROUTE}", json=body, timeout=60)
    assert answer.status_code == 422
    detail = answer.json()["detail"]
    assert detail["error_count"] == 300_000
    assert detail["errors"][0] == {
        "loc": ["sequences", 0, 0],
        "msg": "Input should be a valid integer",
        "type": "int_type",
    }
    assert len(detail["errors"]) == 5 and len(answer.content) < 1024


class NonFiniteBackend:
    """Scores like the real backend, then spoils one log-prob of sequence 1."""

    def __init__(self, inner, value: float, field: str):
        self.inner, self.vocab_size, self.model_name = inner, inner.vocab_size, inner.model_name
        self.value, self.field = value, field

    def __getattr__(self, name: str):
        return getattr(self.inner, name)  # the rest of the Backend protocol is the real backend's

    def score(self, *args):
        rows = self.inner.score(*args)
        getattr(rows[1], self.field)[0] = self.value
        return rows


@pytest.mark.parametrize("response_format", ["json", "binary", "compact"])
@pytest.mark.parametrize(
    ("value", "field", "detail"),
    [
        (float("nan"), "actual_logprobs", "sequence 1: the log-prob of an actual token is missing or not finite"),
        (float("-inf"), "actual_logprobs", "sequence 1: the log-prob of an actual token is missing or not finite"),
        (float("nan"), "topk_logprobs", "sequence 1: a top-1 log-prob is missing or not finite"),
    ],
)
def test_non_finite_log_probs_are_never_sent(backend, response_format, value, field, detail):
    limits = ServerLimits(max_model_len=64)
    spoiled = NonFiniteBackend(backend, value, field)
    with ThreadedUvicorn(create_app(spoiled, limits), limits) as running:
        answer = httpx.post(f"{running.url}{ROUTE}", json={**GOOD, "response_format": response_format})
    assert answer.status_code == 422
    assert answer.json()["detail"] == detail


@pytest.fixture(scope="module")
def fuzz_server(tiny_paths):
    """`protege serve-teacher` on the tiny teacher, as users run it."""
    port = free_port()
    process = start_server(tiny_paths["teacher"], port, "--max-model-len", "64", "--max-body-mb", "0.25")
    yield f"http://127.0.0.1:{port}", process
    stop_server(process)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=40,
)
field_names = st.sampled_from(
    ["sequences", "prompt_lengths", "top_logprobs", "temperature", "response_format", "hidden_dtype", "extra"]
)
requests = st.dictionaries(field_names, json_values, max_size=6)
token_lists = st.lists(st.lists(st.integers(-5, 400), max_size=70), max_size=4)
near_valid = st.fixed_dictionaries(
    {"sequences": token_lists, "prompt_lengths": st.lists(st.integers(-2, 70), max_size=4)},
    optional={
        "top_logprobs": st.integers(-3, 400),
        "temperature": st.floats() | st.integers(),
        "response_format": st.sampled_from(["json", "binary", "compact", "hidden", "xml"]),
        "hidden_dtype": st.sampled_from(["float16", "bfloat16", "float32", "int8"]),
    },
)
raw_bodies = st.binary(max_size=300)
LITERAL_EXTRAS = [b"NaN", b"-Infinity", b'{"sequences": [[1, 2]], "prompt_lengths": [1], "temperature": -0.0}']


def post_and_check(url: str, client: httpx.Client, content: bytes) -> None:
    answer = client.post(f"{url}{ROUTE}", content=content, headers={"Content-Type": "application/json"})
    assert answer.status_code < 500, (content[:200], answer.status_code, answer.text[:300])
    if answer.status_code >= 400:
        assert len(answer.content) < 2048, (content[:200], len(answer.content))
    health = client.get(f"{url}/health/", timeout=5)
    assert health.status_code == 200


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=st.one_of(requests.map(lambda d: json.dumps(d).encode()), raw_bodies))  # NaN, Infinity as Python writes
def test_fuzz_arbitrary_bodies_never_get_a_5xx(fuzz_server, body):
    url, _ = fuzz_server
    with httpx.Client(timeout=30) as client:
        post_and_check(url, client, body)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(request=near_valid)
def test_fuzz_near_valid_requests_never_get_a_5xx(fuzz_server, request):
    url, _ = fuzz_server
    body = json.dumps(request).encode()
    with httpx.Client(timeout=30) as client:
        post_and_check(url, client, body)


@pytest.mark.slow
def test_fuzz_literal_cases_then_the_server_is_alive(fuzz_server):
    url, process = fuzz_server
    with httpx.Client(timeout=30) as client:
        for body, *_ in LITERAL_CASES:
            post_and_check(url, client, body)
        for body in LITERAL_EXTRAS:
            post_and_check(url, client, body)
        assert client.post(f"{url}{ROUTE}", json=GOOD).status_code == 200
    assert process.poll() is None

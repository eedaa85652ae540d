"""HTTP to protege's servers (the teacher server, the student's vLLM server), made not to lose a training run to a
flaky network, nor to hang it on a frozen server: every attempt has a timeout and every call a total deadline;
connection errors, timeouts and 5xx answers are retried with exponential backoff (or the server's Retry-After), each
retry logged; 4xx answers are not (the request itself is wrong, and sending it again cannot help); every error names
the server's role and the URL."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

logger = logging.getLogger("protege")


class ServerError(RuntimeError):
    """A server could not be reached, refused the request, or answered something unusable."""


class RetryingClient:
    role = "server"  # how errors name the server
    error: type[ServerError] = ServerError
    startup_setting: str | None = None  # the setting that bounds `wait_until_ready`, named when nothing listens yet

    def __init__(
        self,
        base_url: str,
        timeout: float = 120.0,
        max_retries: int = 4,
        backoff: float = 0.5,
        deadline: float | None = None,
        api_key: str | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self.deadline = deadline  # seconds for one call, all its attempts and waits together; None: no total limit
        self.headers = {"Accept-Encoding": "gzip"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self._client: httpx.Client | None = None
        self._client_lock = threading.Lock()  # concurrent requests share the pool

    @property
    def _http(self) -> httpx.Client:
        """The connection pool, opened on first use and again after `close`."""
        with self._client_lock:
            if self._client is None or self._client.is_closed:
                self._client = httpx.Client(timeout=self.timeout, headers=self.headers)
            return self._client

    def close(self) -> None:
        """Release the connections (the trainer calls it when training ends)."""
        if self._client is not None:
            self._client.close()

    def _url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def wait_until_ready(self, timeout: float = 60.0, interval: float = 0.5, path: str = "/health/") -> None:
        """Poll the health endpoint until it answers 200, or raise after `timeout` seconds. A server that is still
        starting is waited for; the first failed connection says so at once, so that a wrong URL is not a silent
        wait of `timeout` seconds."""
        deadline, last, said = time.monotonic() + timeout, "no answer", False
        logger.info("waiting up to %g s for the %s at %s", timeout, self.role, self._url(path))
        while time.monotonic() < deadline:
            try:
                response = self._http.get(
                    self._url(path), timeout=min(self.timeout, max(deadline - time.monotonic(), 0.05))
                )
                if response.status_code == 200:
                    return
                last = f"HTTP {response.status_code}"
            except httpx.HTTPError as error:
                last = f"{type(error).__name__}: {error}"
                if isinstance(error, httpx.ConnectError) and not said:
                    self._say_nothing_listens(error, timeout)
                    said = True
            time.sleep(interval)
        raise self.error(f"{self.role} at {self._url(path)} was not ready after {timeout:g} s ({last})")

    def _say_nothing_listens(self, error: httpx.ConnectError, timeout: float) -> None:
        """One warning on the first failed connection: what failed, and how long the wait for a start goes on."""
        refused = _caused_by(error, ConnectionRefusedError)
        what = f"nothing listens at {self.base_url} yet" if refused else f"cannot connect to {self.base_url} yet"
        bound = f" ({self.startup_setting})" if self.startup_setting else ""
        logger.warning("%s (%s); waiting up to %g s%s for the %s to start", what, error, timeout, bound, self.role)

    def _get_json(self, path: str) -> dict | None:
        """GET once (no retries: used at start-up); the JSON of a 200 answer, else None."""
        try:
            response = self._http.get(self._url(path))
        except httpx.HTTPError as error:
            raise self.error(f"{self.role} at {self._url(path)} did not answer: {error}") from None
        return response.json() if response.status_code == 200 else None

    def post(self, path: str, headers: dict | None = None, **content) -> httpx.Response:
        """POST (`json=` or `content=`) with retries (see `_with_retries`); the 200 answer."""
        url = self._url(path)
        return self._with_retries(
            url, lambda timeout: self._http.post(url, headers=headers, timeout=timeout, **content)
        )

    def post_json(self, path: str, body: dict) -> dict:
        """POST `body` as JSON with retries; the answer's JSON."""
        return self._json_of(self.post(path, json=body), path)

    def get(self, path: str, refusal_ok: bool = False) -> httpx.Response:
        """GET with retries; the 200 answer, or with `refusal_ok` a 4xx one, for the caller to read (a route that
        is not served)."""
        url = self._url(path)
        return self._with_retries(url, lambda timeout: self._http.get(url, timeout=timeout), refusal_ok)

    def download(self, path: str, target: Path) -> None:
        """GET `path` into the file `target`, streamed, with retries; a transfer cut short starts again from the
        first byte, and a failed one leaves no file."""
        url = self._url(path)

        def attempt(timeout: float) -> httpx.Response:
            try:
                with self._http.stream("GET", url, headers={"Accept-Encoding": "identity"}, timeout=timeout) as answer:
                    if answer.status_code != 200:
                        answer.read()  # the error's text, for the message
                        return answer
                    with open(target, "wb") as f:
                        for block in answer.iter_bytes(2**22):
                            f.write(block)
                return answer
            except BaseException:
                target.unlink(missing_ok=True)
                raise

        self._with_retries(url, attempt)

    def _json_of(self, response: httpx.Response, path: str):
        try:
            return response.json()
        except ValueError:
            raise self.error(
                f"{self.role} at {self._url(path)} answered invalid JSON ({len(response.content)} bytes)"
            ) from None

    def _with_retries(
        self, url: str, attempt: Callable[[float], httpx.Response], refusal_ok: bool = False
    ) -> httpx.Response:
        """`attempt(timeout)` until it answers 200, retried on connection errors, timeouts and 5xx within `deadline`;
        a 4xx is an error at once (with `refusal_ok`, the answer). One loop for every request, GET or POST."""
        start = time.monotonic()
        end = start + self.deadline if self.deadline is not None else float("inf")
        attempts, answered = self.max_retries + 1, False
        for number in range(1, attempts + 1):
            wait = self.backoff * 2 ** (number - 1)
            timeout = min(self.timeout, max(end - time.monotonic(), 0.01))
            try:
                response = attempt(timeout)
            except httpx.DecodingError as error:
                raise self.error(f"{self.role} at {url} answered a body that does not decode: {error}") from None
            except httpx.TimeoutException:
                problem, answered = f"no answer within the {timeout:g} s timeout", False
            except httpx.TransportError as error:
                problem, answered = f"{type(error).__name__}: {error}", False
            else:
                if response.status_code == 200 or (refusal_ok and 400 <= response.status_code < 500):
                    return response
                if 400 <= response.status_code < 500:
                    raise self.error(
                        f"{self.role} at {url} refused the request (HTTP {response.status_code}): {response.text[:500]}"
                    )
                problem, answered = f"HTTP {response.status_code}: {response.text[:200]}", True
                wait = max(wait, _retry_after(response))
            if number == attempts or time.monotonic() + wait >= end:
                break
            logger.warning("%s at %s: %s; retry %d/%d in %g s", self.role, url, problem, number, attempts - 1, wait)
            time.sleep(wait)
        if number == 1:  # one attempt: what happened is the whole story
            raise self.error(f"{self.role} at {url} {'answered' if answered else 'did not answer:'} {problem}")
        spent = time.monotonic() - start
        raise self.error(f"{self.role} at {url} failed after {number} attempts in {spent:.0f} s: {problem}")


def _retry_after(response: httpx.Response) -> float:
    """The seconds a 503's Retry-After asks for (0 when absent or not a number; capped at a minute)."""
    try:
        return min(float(response.headers.get("retry-after", 0)), 60.0)
    except ValueError:
        return 0.0


def _caused_by(error: BaseException, kind: type[BaseException]) -> bool:
    """Whether `kind` is in the chain of exceptions that led to `error` (httpx wraps the socket's own error)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kind):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False

"""HTTP to protege's servers (the teacher server, the student's vLLM server), made not to lose a training run to a
flaky network, nor to hang it on a frozen server: every attempt has a timeout and every call a total deadline;
connection errors, timeouts and 5xx answers are retried with exponential backoff (or the server's Retry-After), each
retry logged; 4xx answers are not (the request itself is wrong, and sending it again cannot help); every error names
the server's role and the URL."""

from __future__ import annotations

import logging
import threading
import time

import httpx

logger = logging.getLogger("protege")


class ServerError(RuntimeError):
    """A server could not be reached, refused the request, or answered something unusable."""


class RetryingClient:
    role = "server"  # how errors name the server
    error: type[ServerError] = ServerError

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
        """Poll the health endpoint until it answers 200, or raise after `timeout` seconds."""
        deadline, last = time.monotonic() + timeout, "no answer"
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
            time.sleep(interval)
        raise self.error(f"{self.role} at {self._url(path)} was not ready after {timeout:g} s ({last})")

    def _get_json(self, path: str) -> dict | None:
        """GET once (no retries: used at start-up); the JSON of a 200 answer, else None."""
        try:
            response = self._http.get(self._url(path))
        except httpx.HTTPError as error:
            raise self.error(f"{self.role} at {self._url(path)} did not answer: {error}") from None
        return response.json() if response.status_code == 200 else None

    def _post(self, path: str, body: dict) -> dict:
        """POST with retries; the answer's JSON."""
        response = self._post_for(path, json=body)
        try:
            return response.json()
        except ValueError:
            raise self.error(
                f"{self.role} at {self._url(path)} answered invalid JSON ({len(response.content)} bytes)"
            ) from None

    def _post_for(self, path: str, headers: dict | None = None, **content) -> httpx.Response:
        """POST (`json=` or `content=`) with retries on connection errors, timeouts and 5xx, within `deadline`; the
        200 answer."""
        url = self._url(path)
        start = time.monotonic()
        end = start + self.deadline if self.deadline is not None else float("inf")
        attempts = self.max_retries + 1
        for attempt in range(1, attempts + 1):
            wait = self.backoff * 2 ** (attempt - 1)
            timeout = min(self.timeout, max(end - time.monotonic(), 0.01))
            try:
                response = self._http.post(url, headers=headers, timeout=timeout, **content)
            except httpx.DecodingError as error:
                raise self.error(f"{self.role} at {url} answered a body that does not decode: {error}") from None
            except httpx.TimeoutException:
                problem = f"no answer within the {timeout:g} s timeout"
            except httpx.TransportError as error:
                problem = f"{type(error).__name__}: {error}"
            else:
                if response.status_code == 200:
                    return response
                if 400 <= response.status_code < 500:
                    raise self.error(
                        f"{self.role} at {url} refused the request (HTTP {response.status_code}): {response.text[:500]}"
                    )
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
                wait = max(wait, _retry_after(response))
            if attempt == attempts or time.monotonic() + wait >= end:
                break
            logger.warning("%s at %s: %s; retry %d/%d in %g s", self.role, url, problem, attempt, attempts - 1, wait)
            time.sleep(wait)
        spent = time.monotonic() - start
        raise self.error(
            f"{self.role} at {url} failed after {attempt} attempt{'s' * (attempt > 1)} in {spent:.0f} s: {problem}"
        )


def _retry_after(response: httpx.Response) -> float:
    """The seconds a 503's Retry-After asks for (0 when absent or not a number; capped at a minute)."""
    try:
        return min(float(response.headers.get("retry-after", 0)), 60.0)
    except ValueError:
        return 0.0

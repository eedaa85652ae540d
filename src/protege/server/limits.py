"""The teacher server's limits, apart from its HTTP layer: `serve-teacher --help` reads their defaults from here
without importing FastAPI, so a default is written once."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class ServerLimits:
    """What one request, the queue and one connection may take; None derives a limit from the others."""

    max_model_len: int = 4096
    max_top_logprobs: int = 100
    max_batch_tokens: int = 16384
    max_request_tokens: int | None = None  # default: max(max_batch_tokens, max_model_len)
    max_queued_tokens: int | None = None  # default: 8 x max_request_tokens
    max_body_bytes: int | None = None  # default: 16 bytes a token of max_request_tokens, at least 1 MiB
    batching: bool = True
    batch_wait_s: float = 0.005
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 1024

    def __post_init__(self) -> None:
        if self.max_request_tokens is None:
            self.max_request_tokens = max(self.max_batch_tokens, self.max_model_len)
        if self.max_queued_tokens is None:
            self.max_queued_tokens = 8 * self.max_request_tokens
        if self.max_body_bytes is None:  # a token id is at most 7 characters and a comma in JSON
            self.max_body_bytes = max(2**20, 16 * self.max_request_tokens)
        for name in ("max_model_len", "max_top_logprobs", "max_batch_tokens", "max_body_bytes", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_request_tokens < self.max_model_len:
            raise ValueError(
                f"max_request_tokens={self.max_request_tokens} must be >= max_model_len={self.max_model_len}: "
                "a request of one longest sequence must fit"
            )
        if self.max_queued_tokens < self.max_request_tokens:
            raise ValueError(
                f"max_queued_tokens={self.max_queued_tokens} must be >= max_request_tokens={self.max_request_tokens}"
            )


DEFAULT_LIMITS = {spec.name: spec.default for spec in fields(ServerLimits)}  # before __post_init__ derives any

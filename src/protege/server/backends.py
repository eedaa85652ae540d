"""Teacher backends: score full sequences (teacher forcing) and return top-k and actual-token log-probs."""

from __future__ import annotations

import logging
import os
from typing import Protocol

import numpy as np

from ..teacher.codec import SequenceScores
from ..teacher.head import LMHead
from ..teacher.vocabulary import TOKENIZER_FILES, has_tokenizer_files

_log = logging.getLogger("protege.server")


class Backend(Protocol):
    """What the HTTP layer asks of a teacher; every attribute is required, so /info/ never reports a guess."""

    vocab_size: int
    model_name: str
    honours_temperature: bool
    serves_logprobs: bool  # the json, binary and compact formats
    serves_hidden: bool  # the hidden format and /lm_head/
    tokenizer_sha256: str | None  # of the token-to-id map; None: no tokenizer
    vocabulary: dict[str, int] | None  # the token-to-id map for /vocabulary/; None: no tokenizer
    revision: str | None  # the hub commit the model was loaded from; None: a local folder
    config_sha256: str  # of the model's config (`teacher.head.config_sha256`): who the teacher is, for a cache

    def score(
        self, sequences: list[list[int]], prompt_lengths: list[int], top_k: int, temperature: float
    ) -> list[SequenceScores]: ...

    def hidden_states(self, sequences: list[list[int]], prompt_lengths: list[int]) -> list[np.ndarray]: ...

    def lm_head(self) -> LMHead: ...


def return_large_blocks_to_the_os(threshold_bytes: int = 4 * 2**20) -> bool:
    """Make glibc give blocks over `threshold_bytes` back to the OS when they are freed.

    The chunked scoring allocates and frees tens of MiB per chunk. glibc raises its mmap threshold after the first such
    free and serves the next ones from its heap, which then grows with every chunk (measured: +2.4 GiB for 2 x 2,000
    tokens at vocabulary 151,936, +37 GiB extrapolated to 2 x 16,000). A fixed threshold keeps those blocks mapped
    and unmapped. Returns whether the setting took (glibc only; elsewhere nothing changes).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, threshold_bytes))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def served_tokenizer(model: str, trust_remote_code: bool = False):
    """The teacher's tokenizer, or None for a model folder that holds no tokenizer files (logged: the server
    then reports no fingerprint and no vocabulary). A tokenizer that is there but fails to load is an error."""
    if os.path.isdir(model) and not has_tokenizer_files(model):
        _log.warning(
            "the teacher folder %s holds no tokenizer (none of %s): serving without one, so /info/ has no "
            "tokenizer_sha256 and /vocabulary/ answers 404",
            model,
            ", ".join(TOKENIZER_FILES),
        )
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception as error:  # tokenizers raises plain Exceptions for a malformed file: name the path in all cases
        raise ValueError(
            f"the teacher's tokenizer at {model} could not be loaded: {type(error).__name__}: {error}"
        ) from error


def config_identity(config) -> tuple[str | None, str]:
    """The hub revision a model's config came from (None for a local folder) and its digest, as /info/ reports them:
    what a cache written from this server records as the teacher's identity."""
    from ..teacher.head import config_sha256

    return getattr(config, "_commit_hash", None), config_sha256(config)


class TransformersBackend:
    """A transformers causal LM on CPU or GPU; sequences are right-padded into one forward pass."""

    honours_temperature = True
    serves_logprobs = True
    serves_hidden = True

    def __init__(self, model: str, dtype: str = "float32", device: str | None = None, trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForCausalLM

        from ..models import DTYPES
        from ..teacher.head import vocabulary_sha256

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = DTYPES[dtype]
        self.model = (
            AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype, trust_remote_code=trust_remote_code)
            .to(self.device)
            .eval()
        )
        self.model_name = model
        self.revision, self.config_sha256 = config_identity(self.model.config)
        tokenizer = served_tokenizer(model, trust_remote_code)
        tokenizer_size = 0 if tokenizer is None else len(tokenizer)
        self.tokenizer_sha256 = None if tokenizer is None else vocabulary_sha256(tokenizer)
        self.vocabulary = None if tokenizer is None else tokenizer.get_vocab()  # served on /vocabulary/
        rows = self.model.get_output_embeddings().weight.shape[0]
        # Ids past the tokenizer in a padded output layer are never real tokens; accept only real ones.
        self.vocab_size = tokenizer_size if 1 < tokenizer_size <= rows else rows
        self.chunk_tokens: int | None = None  # scored positions per LM-head chunk; None sizes it to the vocabulary
        from ..models import head_view

        # Decided once: chunks of the LM head where the logits are hidden @ head.T, else full logits (said once).
        self.scores_in_chunks = head_view(self.model, "served teacher", "auto") == "hidden"

    def _padded(self, sequences):
        """Right-padded ids and attention mask (B, Tmax)."""
        torch = self.torch
        width = max(len(s) for s in sequences)
        ids = torch.zeros((len(sequences), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(sequences):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        return ids, mask

    def lm_head(self) -> LMHead:
        from ..teacher.head import head_of_model

        return head_of_model(self.model)

    def hidden_states(self, sequences, prompt_lengths):
        """The final hidden state at each scored position, (completion length, H) float32 per sequence."""
        ids, mask = self._padded(sequences)
        with self.torch.inference_mode():
            hidden = self._scored_hidden(ids, mask, sequences, prompt_lengths).float().cpu().numpy()
        bounds = np.cumsum([0] + [len(s) - p for s, p in zip(sequences, prompt_lengths)])
        return [hidden[start:end] for start, end in zip(bounds[:-1], bounds[1:])]

    def _scored_hidden(self, ids, mask, sequences, prompt_lengths):
        """(scored tokens, H): the decoder's final output at the positions predicting each completion token."""
        from ..models import last_hidden_state

        torch = self.torch
        hidden = last_hidden_state(self.model, input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        rows, positions, _ = self._scored_positions(sequences, prompt_lengths)
        return hidden[torch.tensor(rows), torch.tensor(positions)]

    def score(self, sequences, prompt_lengths, top_k, temperature):
        torch = self.torch
        ids, mask = self._padded(sequences)
        with torch.inference_mode():
            if self.scores_in_chunks:
                top_logprobs, top_ids, actual = self._score_chunked(
                    ids, mask, sequences, prompt_lengths, top_k, temperature
                )
            else:
                top_logprobs, top_ids, actual = self._score_logits(
                    ids, mask, sequences, prompt_lengths, top_k, temperature
                )
        rows, start = [], 0
        for s, p in zip(sequences, prompt_lengths):
            n = len(s) - p
            rows.append(
                SequenceScores(
                    top_logprobs[start : start + n],
                    top_ids[start : start + n].astype(np.int64),
                    actual[start : start + n],
                    np.asarray(s[p:], dtype=np.int64),
                )
            )
            start += n
        return rows

    @staticmethod
    def _scored_positions(sequences, prompt_lengths):
        """(row, position) of every scored token's predicting position, and the token it predicts."""
        rows, positions, targets = [], [], []
        for i, (s, p) in enumerate(zip(sequences, prompt_lengths)):
            rows += [i] * (len(s) - p)
            positions += range(p - 1, len(s) - 1)
            targets += s[p:]
        return rows, positions, targets

    def _log_probs(self, logits, targets, top_k, temperature):
        """Top-k and actual-token log-probs of rows of logits: one logsumexp per row, nothing else normalised."""
        scaled = logits[..., : self.vocab_size].float()
        if temperature != 1:
            scaled = scaled / temperature
        normaliser = self.torch.logsumexp(scaled, dim=-1, keepdim=True)
        top_logits, top_ids = scaled.topk(top_k, dim=-1)
        actual = scaled.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - normaliser.squeeze(-1)
        return (top_logits - normaliser).cpu().numpy(), top_ids.cpu().numpy(), actual.cpu().numpy()

    def _score_chunked(self, ids, mask, sequences, prompt_lengths, top_k, temperature):
        """The LM head on a chunk of scored positions at a time: memory bounded by the chunk, not by tokens x vocab."""
        from ..chunked import auto_chunk_size, head_chunks
        from ..models import lm_head

        torch = self.torch
        hidden = self._scored_hidden(ids, mask, sequences, prompt_lengths)
        targets = torch.tensor(self._scored_positions(sequences, prompt_lengths)[2], device=self.device)
        weight, bias = lm_head(self.model, self.vocab_size)
        chunk = self.chunk_tokens or auto_chunk_size(self.vocab_size)
        parts = [
            self._log_probs(logits, chunk_targets, top_k, temperature)
            for _, logits, (chunk_targets,) in head_chunks(hidden, weight, bias, chunk, targets)
        ]
        return tuple(np.concatenate(column) for column in zip(*parts))

    def _score_logits(self, ids, mask, sequences, prompt_lengths, top_k, temperature):
        """Full logits of every scored position at once, for models that transform their logits after the LM head."""
        torch = self.torch
        start = min(prompt_lengths) - 1  # first position whose logits any sequence needs
        logits = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            logits_to_keep=ids.shape[1] - start,
            use_cache=False,
        ).logits
        rows, positions, targets = self._scored_positions(sequences, prompt_lengths)
        logits = logits[torch.tensor(rows), torch.tensor(positions) - start]
        return self._log_probs(logits, torch.tensor(targets, device=self.device), top_k, temperature)


class VLLMBackend:
    """vLLM prompt log-probs: each sequence is a prompt, one token is generated and discarded.

    vLLM returns prompt log-probs of the untempered distribution whatever the sampling temperature, and the tempered
    one cannot be rebuilt from a top-k, so this backend serves temperature 1 only.

    With `hidden_states=True` it builds vLLM's pooling runner instead ("token_embed", no activation), which returns
    the final post-norm hidden state of every prompt token: the "hidden" format, and only it (one vLLM object cannot
    both generate and pool). The LM head for /lm_head/ is then read from the checkpoint files.
    """

    honours_temperature = False

    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        max_model_len: int | None = None,
        max_logprobs: int = 100,
        trust_remote_code: bool = False,
        gpu_memory_utilization: float = 0.9,
        hidden_states: bool = False,
    ):
        from vllm import LLM, SamplingParams

        from ..teacher.head import vocabulary_sha256

        self.sampling_params = SamplingParams
        kwargs = {
            "model": model,
            "dtype": dtype,
            "enable_prefix_caching": False,
            "trust_remote_code": trust_remote_code,
            "enforce_eager": True,
            "gpu_memory_utilization": gpu_memory_utilization,
        }
        if hidden_states:
            from vllm.config import PoolerConfig

            kwargs |= {"runner": "pooling", "pooler_config": PoolerConfig(task="token_embed", use_activation=False)}
        else:
            kwargs["max_logprobs"] = max_logprobs
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        self.llm = LLM(**kwargs)
        self.model_name, self.trust_remote_code = model, trust_remote_code
        self.serves_logprobs, self.serves_hidden = not hidden_states, hidden_states
        self.vocab_size = len(self.llm.get_tokenizer())
        self.tokenizer_sha256 = vocabulary_sha256(self.llm.get_tokenizer())
        self.vocabulary = self.llm.get_tokenizer().get_vocab()
        from transformers import AutoConfig

        self.revision, self.config_sha256 = config_identity(
            AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
        )

    def hidden_states(self, sequences, prompt_lengths):
        outputs = self.llm.encode(
            [{"prompt_token_ids": s} for s in sequences], pooling_task="token_embed", use_tqdm=False
        )
        return [
            output.outputs.data[p - 1 : len(s) - 1].float().cpu().numpy()
            for s, p, output in zip(sequences, prompt_lengths, outputs)
        ]

    def lm_head(self) -> LMHead:
        from ..teacher.head import head_from_checkpoint

        return head_from_checkpoint(self.model_name, trust_remote_code=self.trust_remote_code)

    def score(self, sequences, prompt_lengths, top_k, temperature):
        params = self.sampling_params(max_tokens=1, temperature=temperature, prompt_logprobs=top_k)
        outputs = self.llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
        rows = []
        for s, p, output in zip(sequences, prompt_lengths, outputs):
            n = len(s) - p
            top_logprobs = np.full((n, top_k), -np.inf, dtype=np.float32)
            top_ids = np.zeros((n, top_k), dtype=np.int64)
            actual = np.full(n, -np.inf, dtype=np.float32)
            for t, position in enumerate(range(p, len(s))):
                entries = output.prompt_logprobs[position] or {}
                ranked = sorted(entries.items(), key=lambda item: item[1].rank)[:top_k]
                for k, (token, logprob) in enumerate(ranked):
                    top_ids[t, k], top_logprobs[t, k] = token, logprob.logprob
                if s[position] in entries:
                    actual[t] = entries[s[position]].logprob
            rows.append(SequenceScores(top_logprobs, top_ids, actual, np.asarray(s[p:], dtype=np.int64)))
        return rows

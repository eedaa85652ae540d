"""Teacher backends: score full sequences (teacher forcing) and return top-k and actual-token log-probs."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..teacher.codec import SequenceScores


class Backend(Protocol):
    vocab_size: int
    model_name: str
    honours_temperature: bool

    def score(
        self, sequences: list[list[int]], prompt_lengths: list[int], top_k: int, temperature: float
    ) -> list[SequenceScores]: ...


class TransformersBackend:
    """A transformers causal LM on CPU or GPU; sequences are right-padded into one forward pass."""

    honours_temperature = True

    def __init__(self, model: str, dtype: str = "float32", device: str | None = None, trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        from ..models import DTYPES

        torch_dtype = DTYPES[dtype]
        self.model = (
            AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype, trust_remote_code=trust_remote_code)
            .to(self.device)
            .eval()
        )
        self.model_name = model
        try:
            tokenizer_size = len(AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code))
        except (OSError, ValueError):
            tokenizer_size = 0
        rows = self.model.get_output_embeddings().weight.shape[0]
        # Ids past the tokenizer in a padded output layer are never real tokens; accept only real ones.
        self.vocab_size = tokenizer_size if 1 < tokenizer_size <= rows else rows

    def score(self, sequences, prompt_lengths, top_k, temperature):
        torch = self.torch
        width = max(len(s) for s in sequences)
        ids = torch.zeros((len(sequences), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(sequences):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        start = min(prompt_lengths) - 1  # first position whose logits any sequence needs
        with torch.inference_mode():
            logits = self.model(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                logits_to_keep=width - start,
                use_cache=False,
            ).logits
            # Log-probs only where they are returned: top-k and gather on the logits, minus one logsumexp per position.
            scaled = logits[..., : self.vocab_size].float()
            if temperature != 1:
                scaled = scaled / temperature
            normaliser = torch.logsumexp(scaled, dim=-1, keepdim=True)
            top_logits, top_ids = scaled.topk(top_k, dim=-1)
            top_logprobs = top_logits - normaliser
            targets = torch.cat([ids[:, start + 1 :], torch.zeros((len(sequences), 1), dtype=torch.long)], dim=1)
            actual = (scaled.gather(-1, targets.to(self.device).unsqueeze(-1)) - normaliser).squeeze(-1)
        top_logprobs, top_ids, actual = top_logprobs.cpu().numpy(), top_ids.cpu().numpy(), actual.cpu().numpy()
        rows = []
        for i, (s, p) in enumerate(zip(sequences, prompt_lengths)):
            positions = slice(p - 1 - start, len(s) - 1 - start)
            rows.append(
                SequenceScores(
                    top_logprobs[i, positions],
                    top_ids[i, positions].astype(np.int64),
                    actual[i, positions],
                    np.asarray(s[p:], dtype=np.int64),
                )
            )
        return rows


class VLLMBackend:
    """vLLM prompt log-probs: each sequence is a prompt, one token is generated and discarded.

    vLLM returns prompt log-probs of the untempered distribution whatever the sampling temperature, and the tempered
    one cannot be rebuilt from a top-k, so this backend serves temperature 1 only.
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
    ):
        from vllm import LLM, SamplingParams

        self.sampling_params = SamplingParams
        kwargs = {
            "model": model,
            "dtype": dtype,
            "max_logprobs": max_logprobs,
            "enable_prefix_caching": False,
            "trust_remote_code": trust_remote_code,
            "enforce_eager": True,
            "gpu_memory_utilization": gpu_memory_utilization,
        }
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        self.llm = LLM(**kwargs)
        self.model_name = model
        self.vocab_size = len(self.llm.get_tokenizer())

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

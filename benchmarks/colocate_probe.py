"""Does a vLLM engine in the training process slow the student's training pass? (docs/benchmarks.md, "Student
generation": colocate's student pass was about 14% slower than transformers' in the generation benchmark.)

    VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1 \\
        .vllm-env/bin/python benchmarks/colocate_probe.py

In one process: the generation benchmark's student (random Qwen2, hidden 512, 8 layers, vocabulary 32,000) runs
forward and backward on 8 x 192 tokens. The best of 3 passes is taken 3 times before a `vllm.LLM` of the same shape
is built (dummy weights, float32, eager, as colocate builds it) and after it has generated once; after, each round
is timed with Python's garbage collector on and then off. Then the threads' CPU affinity and torch's thread count are
printed, since vLLM's CPU worker binds OpenMP threads and replaces `torch.set_num_threads` in the process.
"""

from __future__ import annotations

import datetime
import gc
import os
import tempfile
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM


def best_pass(step, passes: int = 3) -> float:
    times = []
    for _ in range(passes):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    config = Qwen2Config(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=32000,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    tokens = torch.randint(0, config.vocab_size, (8, 192))

    def step() -> None:
        model(input_ids=tokens, labels=tokens).loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    before = [best_pass(step) for _ in range(3)]
    folder = tempfile.mkdtemp()
    config.save_pretrained(folder)
    import vllm

    llm = vllm.LLM(
        model=folder,
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        seed=0,
    )
    llm.generate([{"prompt_token_ids": [1, 2, 3]}], vllm.SamplingParams(max_tokens=4), use_tqdm=False)
    step()
    after_gc_on, after_gc_off = [], []
    for _ in range(3):
        gc.enable()
        after_gc_on.append(best_pass(step))
        gc.disable()
        after_gc_off.append(best_pass(step))
    gc.enable()
    pinned = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/status") as status:
            allowed = next(line.split(":")[1].strip() for line in status if line.startswith("Cpus_allowed_list"))
        if allowed != f"0-{os.cpu_count() - 1}":
            pinned.append((task, allowed))

    def seconds(values: list[float]) -> str:
        return ", ".join(f"{value:.2f}" for value in values)

    print(f"before the engine:          {seconds(before)} s")
    print(f"after, garbage collector on:  {seconds(after_gc_on)} s")
    print(f"after, garbage collector off: {seconds(after_gc_off)} s")
    threads = len(os.listdir("/proc/self/task"))
    print(f"torch threads {torch.get_num_threads()}; {threads} threads, {len(pinned)} not allowed every CPU {pinned}")
    print(
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, vllm {vllm.__version__}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}"
    )


if __name__ == "__main__":
    main()

"""What the benchmarks' processes build: models, tokenizers and data, and the trainers they run.

Standard library only at import, like `benchmarks` itself: the TRL environment (no protege) imports this module for
the TRL side of `vs_trl` and `real_scale`, the vLLM environment for `generation`'s workers. Each function imports
what it needs; the trainer helpers take the classes they extend as arguments (TRL's or protege's
`DistillationTrainer`, transformers' `TrainerCallback`), so both sides share them without this module importing
either.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import io
import json
import math
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import read_jsonl, setting

# ---------------------------------------------------------------------------------------------------------------------
# A small trained language model (payload, teacher_server): peaked log-probs, not random ones
# ---------------------------------------------------------------------------------------------------------------------


def english_corpus() -> list[str]:
    """Paragraphs of English prose available offline: standard-library docstrings and licence texts."""
    skip = {"antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle", "pydoc_data"}
    docs: list[str] = []
    seen: set[str] = set()
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in skip:
            continue
        try:
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - platform-specific modules
            continue
        for obj in [module] + [getattr(module, n, None) for n in sorted(dir(module)) if not n.startswith("_")]:
            doc = inspect.getdoc(obj) if obj is not None else None
            if doc and len(doc) > 80 and doc not in seen:
                seen.add(doc)
                docs.append(doc)
    licenses = Path("/usr/share/common-licenses")
    if licenses.is_dir():
        for path in sorted(licenses.iterdir()):
            if path.is_file():
                docs.extend(p.strip() for p in path.read_text(errors="ignore").split("\n\n") if len(p.strip()) > 80)
    return docs


def train_lm(model: Any, stream: Any, steps: int, batch: int, length: int, lr: float, seed: int) -> list[float]:
    """Next-token cross-entropy on random windows of a token stream, AdamW with a warm-up and a cosine decay."""
    import numpy as np
    import torch

    gen = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))
    )
    model.train()
    losses = []
    for _ in range(steps):
        starts = gen.integers(0, len(stream) - length - 1, size=batch)
        x = torch.from_numpy(np.stack([stream[s : s + length] for s in starts]).astype(np.int64))
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def trained_models(cache_dir: Path, vocab: int, teacher_steps: int, student_steps: int, log: Callable = print) -> dict:
    """A byte-level BPE, a trained teacher (3 layers, hidden 128) and student (2 layers, hidden 64) saved under
    `cache_dir` (reused when there), and held-out tokens; ~7 CPU-minutes the first time at vocabulary 8000."""
    import numpy as np
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from protege.toy import tiny_model, train_tokenizer

    transformers.utils.logging.disable_progress_bar()
    root = Path(cache_dir) / f"v{vocab}-t{teacher_steps}-s{student_steps}"
    teacher_dir, student_dir, info_path = root / "teacher", root / "student", root / "info.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        log(f"models: reusing {root}")
    else:
        started = time.perf_counter()
        docs = english_corpus()
        random.Random(0).shuffle(docs)
        split = int(len(docs) * 0.9)
        log(f"corpus: {len(docs)} paragraphs, {sum(map(len, docs)) / 1e6:.2f} M characters; training tokenizer")
        tokenizer = train_tokenizer(docs[:split], vocab_size=vocab)
        eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")

        def stream(texts):
            ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
            return np.array([t for seq in ids for t in [*seq, eos]], dtype=np.int32)

        train_ids, heldout_ids = stream(docs[:split]), stream(docs[split:])
        log(f"tokens: {len(train_ids)} train, {len(heldout_ids)} held out ({time.perf_counter() - started:.0f} s)")
        info = {"vocab_size": len(tokenizer), "train_tokens": len(train_ids), "heldout_tokens": len(heldout_ids)}
        for name, directory, layers, hidden, steps, seed in (
            ("teacher", teacher_dir, 3, 128, teacher_steps, 0),
            ("student", student_dir, 2, 64, student_steps, 1),
        ):
            t0 = time.perf_counter()
            model = tiny_model(len(tokenizer), layers=layers, hidden=hidden, heads=4, eos_token_id=eos, seed=seed)
            losses = train_lm(model, train_ids, steps, batch=16, length=64, lr=3e-3, seed=seed)
            model.save_pretrained(directory)
            tokenizer.save_pretrained(directory)
            info[name] = {
                "layers": layers,
                "hidden": hidden,
                "parameters": sum(p.numel() for p in model.parameters()),
                "steps": steps,
                "train_loss_first": float(np.mean(losses[:10])),
                "train_loss_last": float(np.mean(losses[-10:])),
                "train_seconds": round(time.perf_counter() - t0, 1),
            }
            log(f"{name}: {info[name]}")
        np.save(root / "heldout.npy", heldout_ids)
        info_path.write_text(json.dumps(info, indent=1))
    return {
        "root": root,
        "teacher_dir": teacher_dir,
        "student_dir": student_dir,
        "info": info,
        "heldout": np.load(root / "heldout.npy"),
        "tokenizer": AutoTokenizer.from_pretrained(teacher_dir),
        "load_student": lambda: AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval(),
    }


def heldout_batch(heldout: Any, batch: int, prompt: int, completion: int, ragged: bool, seed: int) -> tuple:
    """`batch` windows of held-out text: prompt + completion tokens (completion lengths ragged or fixed)."""
    import numpy as np

    gen = np.random.default_rng(seed)
    sequences, prompt_lengths = [], []
    for _ in range(batch):
        n = int(gen.integers(max(completion // 8, 1), completion + 1)) if ragged else completion
        start = int(gen.integers(0, len(heldout) - prompt - n))
        sequences.append(heldout[start : start + prompt + n].astype(int).tolist())
        prompt_lengths.append(prompt)
    return sequences, prompt_lengths


# ---------------------------------------------------------------------------------------------------------------------
# Random Qwen2 models of a given shape, with a word-level tokenizer of exactly their vocabulary (real_scale, generation)
# ---------------------------------------------------------------------------------------------------------------------

SPECIALS = ("<pad>", "<unk>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The vocabulary and the `Qwen2Config` settings of both models."""

    name: str
    vocab: int
    student: dict
    teacher: dict


def qwen2(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, tied: bool) -> dict:
    return dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        tie_word_embeddings=tied,
    )


def random_models(folder: Path, shapes: Shapes) -> dict:
    """The tokenizer, student and teacher folders under `folder` (built on first use) and the parameter counts.

    The tokenizer lives in its own folder: transformers 5's `AutoTokenizer` on a folder whose config.json is Qwen2
    rebuilds Qwen2's BPE, so the workers load it with `PreTrainedTokenizerFast`.
    """
    manifest = folder / "built.json"
    if manifest.exists():
        return json.loads(manifest.read_text())
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    print(f"building the {shapes.name} models in {folder}", flush=True)
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    vocab.update((f"t{i}", len(SPECIALS) + i) for i in range(shapes.vocab - len(SPECIALS)))
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
    )
    if len(tokenizer) != shapes.vocab:
        raise RuntimeError(f"the tokenizer has {len(tokenizer)} entries, not {shapes.vocab}")
    built = {"shapes": dataclasses.asdict(shapes), "tokenizer": str(folder / "tokenizer")}
    tokenizer.save_pretrained(built["tokenizer"])
    special_ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    for seed, name in enumerate(("student", "teacher")):
        torch.manual_seed(seed)
        config = Qwen2Config(
            vocab_size=shapes.vocab, max_position_embeddings=32768, **special_ids, **getattr(shapes, name)
        )
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        built[name] = str(folder / name)
        built[f"{name}_params"] = sum(p.numel() for p in model.parameters())
        model.save_pretrained(built[name])  # no tokenizer files: the server takes its vocabulary from the LM head
        del model
    manifest.write_text(json.dumps(built, indent=1))
    return built


def word_rows(tokenizer: Any, count: int, words_each: tuple[int, ...], seed: int) -> list[list[str]]:
    """`count` rows of texts of random word tokens (`t812 t17 ...`), one text per entry of `words_each`."""
    words = sorted(w for w in tokenizer.get_vocab() if w[1:].isdigit())
    rng = random.Random(seed)
    return [[" ".join(rng.choice(words) for _ in range(n)) for n in words_each] for _ in range(count)]


# ---------------------------------------------------------------------------------------------------------------------
# vs_trl's inputs: a tiny student, a confident teacher and arithmetic chat data
# ---------------------------------------------------------------------------------------------------------------------


def arithmetic_models(folder: Path, rows: int, seed: int) -> dict[str, Any]:
    """Save a BPE (vocabulary 512), a student (2 layers, hidden 64), a teacher (4 layers, hidden 128, LM head scaled
    by 20 so there is a divergence to learn), each with the tokenizer, and `rows` chat rows under `folder`."""
    import torch
    from transformers.utils import logging as hf_logging

    from protege.toy import arithmetic_rows, tiny_model, train_tokenizer

    hf_logging.disable_progress_bar()
    data = arithmetic_rows(rows, seed)
    tokenizer = train_tokenizer([m["content"] for r in data for m in r["messages"]], vocab_size=512)
    eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id
    paths: dict[str, Any] = {}
    for name, layers, hidden, model_seed in (("student", 2, 64, 1), ("teacher", 4, 128, 2)):
        model = tiny_model(len(tokenizer), layers, hidden, eos_token_id=eos, pad_token_id=pad, seed=model_seed)
        if name == "teacher":
            with torch.no_grad():
                model.lm_head.weight.mul_(20.0)
        model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
        paths[name] = str(folder / name)
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    return {**paths, "data": str(folder / "data.jsonl"), "vocab": len(tokenizer)}


# ---------------------------------------------------------------------------------------------------------------------
# Trainers: one job, two libraries
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True)
class RunSettings:
    """The training job a benchmark gives TRL and protege alike, so both run the same settings."""

    steps: int = setting(20, "optimizer steps timed, after the warm-up")
    warmup: int = setting(2, "optimizer steps run first and not timed")
    batch: int = setting(2, "per_device_train_batch_size")
    grad_accum: int = setting(8, "gradient_accumulation_steps")
    max_completion_length: int = setting(32)
    max_length: int = setting(128)
    lmbda: float = setting(1.0, "fraction of on-policy slices")
    beta: float = setting(0.5, "generalized JSD interpolation")
    loss_top_k: int = setting(0, "0: the full vocabulary")
    temperature: float = setting(1.0)
    top_p: float = setting(0.95, "generation top_p")
    learning_rate: float = setting(1e-3)
    seed: int = setting(0)
    threads: int = setting(1, "torch threads (and OMP_NUM_THREADS); vs_trl's docstring says why 1")


@dataclasses.dataclass(kw_only=True)
class FolderRun(RunSettings):
    """A worker's job on `random_models`' folders: the shared settings, where the models and the tokenizer are, and
    where the Trainer may write."""

    student: str = setting(help="student model folder")
    teacher: str = setting(help="teacher model folder (a local teacher's)")
    tokenizer: str = setting(help="tokenizer folder (PreTrainedTokenizerFast)")
    output_dir: str | None = setting(None, "Trainer output_dir (nothing is saved)")


def trainer_config(run: RunSettings, output_dir: str) -> dict[str, Any]:
    """`DistillationConfig` keyword arguments, the same for TRL and protege: CPU, float32, no activation checkpointing,
    `model.generate` (no vLLM), no eval, no saving, a log line every step."""
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=run.batch,
        gradient_accumulation_steps=run.grad_accum,
        max_steps=run.warmup + run.steps,
        learning_rate=run.learning_rate,
        max_length=run.max_length,
        max_completion_length=run.max_completion_length,
        lmbda=run.lmbda,
        beta=run.beta,
        loss_top_k=run.loss_top_k,
        temperature=run.temperature,
        top_p=run.top_p,
        seed=run.seed,
        use_cpu=True,
        bf16=False,
        fp16=False,
        activation_checkpointing=False,  # transformers 5.x name of gradient_checkpointing
        use_vllm=False,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def load_inputs(run: Any, torch: Any, datasets: Any, transformers: Any) -> tuple[Any, Any, Any, Any]:
    """Tokenizer, float32 student and teacher, and the `messages` of `run.data`, loaded alike on both sides (each
    passes its own `torch`, `datasets` and `transformers`). Sets the thread count first, turns progress bars off."""
    torch.set_num_threads(run.threads)
    datasets.disable_progress_bars()
    tokenizer = transformers.AutoTokenizer.from_pretrained(run.student)
    student = transformers.AutoModelForCausalLM.from_pretrained(run.student, dtype=torch.float32)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(run.teacher, dtype=torch.float32)
    return tokenizer, student, teacher, datasets.Dataset.from_list(read_jsonl(run.data, ["messages"]))


def counting_trainer(base: type) -> type:
    """`base` (a DistillationTrainer) that also counts, per optimizer step, the completion tokens it trains on.

    Counted in what `compute_loss` receives (`labels != -100`), so on-policy completions count at their generated
    length; `step_items` keeps the Trainer's `num_items_in_batch`. The loss itself is `base`'s.
    """

    class CountingTrainer(base):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.step_tokens: dict[int, int] = {}
            self.step_items: dict[int, float] = {}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                step = self.state.global_step + 1
                count = int((inputs["labels"] != -100).sum().item())
                self.step_tokens[step] = self.step_tokens.get(step, 0) + count
                if num_items_in_batch is not None:
                    self.step_items[step] = float(num_items_in_batch)
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )

    return CountingTrainer


def step_timer(base: type) -> Any:
    """A `base` (TrainerCallback) recording `perf_counter` when each optimizer step begins and ends.

    `begin[k]` and `end[k]` are step k's (1-based); `end[0]` is the start of training, when the loop starts fetching
    step 1, so `end[k] - end[k - 1]` is the whole of step k, batch collation and generation included.
    """

    class StepTimer(base):
        def __init__(self) -> None:
            self.begin: dict[int, float] = {}
            self.end: dict[int, float] = {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.end[0] = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin[state.global_step + 1] = time.perf_counter()  # global_step counts the finished steps

        def on_step_end(self, args, state, control, **kwargs):
            self.end[state.global_step] = time.perf_counter()

    return StepTimer()


def build_trainer(
    run: Any, name: str, config_class: Callable, trainer_base: type, callback_base: type, **inputs: Any
) -> tuple[Any, Any, list[str]]:
    """A `counting_trainer(trainer_base)` set up by `trainer_config(run)`, with a `step_timer(callback_base)`.

    Returns the trainer, the timer and the warnings raised while building them: each is printed to stderr (prefixed
    with `name`) and goes into the result, so a setting one library ignores or changes shows up next to the numbers.
    """
    output_dir = run.output_dir or tempfile.mkdtemp(prefix=f"{name}_")
    timer = step_timer(callback_base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = config_class(**trainer_config(run, output_dir))
        trainer = counting_trainer(trainer_base)(args=config, callbacks=[timer], **inputs)
    messages = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    for message in messages:
        print(f"[{name}] setup warning: {message}", file=sys.stderr)
    return trainer, timer, messages


def train(trainer: Any) -> tuple[float, dict[int, dict[str, Any]]]:
    """Train; the wall seconds it took and, by step, the log entry of every step that logged a loss."""
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return seconds, {int(e["step"]): e for e in trainer.state.log_history if "loss" in e and "step" in e}

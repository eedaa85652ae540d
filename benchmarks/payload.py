"""Size, speed and loss fidelity of the teacher server's response formats (json, binary, compact), with and without
gzip.

The log-probs are a real (tiny) language model's, not random numbers: the script trains a byte-level BPE tokenizer
(`protege.toy.train_tokenizer`, vocabulary 8000, so token ids need more than one byte and K = 100 is a small part of
the vocabulary) on English text that ships with every Python (the docstrings of the standard library, plus the licence
texts under /usr/share/common-licenses when present), then trains a `protege.toy.tiny_model` teacher on it with plain
next-token cross-entropy for a few hundred steps, so its distributions are peaked rather than near uniform, though
flatter than a production LM's (the script prints the mean log-prob of the held-out tokens and how much probability
the top-1 / top-K hold). A smaller student is
trained the same way for fewer steps. Both are cached under --cache-dir (benchmarks/teacher_server.py reuses the
teacher).

For each K in --top-k, one batch of --batch held-out sequences (--prompt + --completion tokens) is scored with
`TransformersBackend.score` (the server's code path), then, for each format:

* encode = `codec.encode` + `json.dumps` with the settings of Starlette's `JSONResponse.render`
  (`ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")`, UTF-8), plus, for "+gzip", the
  compression `GZipMiddleware` applies: `zlib.compressobj(6, DEFLATED, 16 + MAX_WBITS)` (protege's app sets
  compresslevel=6, src/protege/server/app.py; Starlette's default is 9; --gzip-level compares others);
* decode = gunzip (for "+gzip") + `json.loads` (what httpx's `response.json()` does) + `codec.decode` (the client's
  checks included);
* bytes per scored token = body bytes on the wire / number of completion tokens (HTTP headers excluded);
* times are the median of --repeats runs (single thread of this process; torch may use more for the losses);
* loss: the student's logits on the same sequences against the decoded teacher: `sparse_top1_loss` (beta 0.5) at
  K = 1, `topk_forward_kl_loss` (beta 0) at K > 1, and its relative difference from the loss of the "binary"
  (float32) answer.

With --ragged, completion lengths are drawn uniformly from [--completion // 8, --completion] (sampled completions
that stop at EOS), which costs the padded "binary" format; by default every completion has --completion tokens.

    python benchmarks/payload.py                      # first run: + ~7 CPU-minutes of training (cached), then ~1 min
    python benchmarks/payload.py --ragged
    python benchmarks/payload.py --temperature 0.5    # a sharper teacher: how much do the gzip sizes depend on it?
    python benchmarks/payload.py --quick              # smoke run: small vocabulary, few steps, K in {1, 20}
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import math
import os
import random
import statistics
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from protege.choices import LOGPROB_FORMATS as FORMATS

GZIP_LEVEL = 6  # the compresslevel protege's app gives GZipMiddleware (src/protege/server/app.py)


# ---------------------------------------------------------------------------------------------------------------------
# Corpus, tokenizer and models
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


def _train_lm(model, stream: np.ndarray, steps: int, batch: int, length: int, lr: float, seed: int) -> list[float]:
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


def build_models(cache_dir: Path, vocab: int, teacher_steps: int, student_steps: int, log=print) -> dict:
    """Tokenizer, trained teacher and student saved under cache_dir (reused when present), and held-out tokens."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from protege.toy import tiny_model, train_tokenizer

    transformers.utils.logging.disable_progress_bar()

    tag = f"v{vocab}-t{teacher_steps}-s{student_steps}"
    root = cache_dir / tag
    teacher_dir, student_dir = root / "teacher", root / "student"
    info_path = root / "info.json"
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
            losses = _train_lm(model, train_ids, steps, batch=16, length=64, lr=3e-3, seed=seed)
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
    heldout = np.load(root / "heldout.npy")
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    return {
        "root": root,
        "teacher_dir": teacher_dir,
        "student_dir": student_dir,
        "info": info,
        "heldout": heldout,
        "tokenizer": tokenizer,
        "load_student": lambda: AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval(),
    }


def make_batch(heldout: np.ndarray, batch: int, prompt: int, completion: int, ragged: bool, seed: int):
    """`batch` windows of held-out text: prompt + completion tokens (completion lengths ragged or fixed)."""
    gen = np.random.default_rng(seed)
    sequences, prompt_lengths = [], []
    for _ in range(batch):
        n = int(gen.integers(max(completion // 8, 1), completion + 1)) if ragged else completion
        start = int(gen.integers(0, len(heldout) - prompt - n))
        sequences.append(heldout[start : start + prompt + n].astype(int).tolist())
        prompt_lengths.append(prompt)
    return sequences, prompt_lengths


# ---------------------------------------------------------------------------------------------------------------------
# Encode / decode as the server and client do
# ---------------------------------------------------------------------------------------------------------------------


def render(payload: dict) -> bytes:
    """starlette.responses.JSONResponse.render."""
    return json.dumps(payload, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode("utf-8")


def gzip_body(body: bytes, level: int = GZIP_LEVEL) -> bytes:
    """starlette.middleware.gzip.GZipResponder for a single-message body."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return compressor.compress(body) + compressor.flush()


def _median_ms(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), result


def measure_format(rows, sequences, prompt_lengths, top_k, vocab, fmt, gzip_level, repeats):
    from protege.teacher import codec

    def encode():
        body = render(codec.encode(rows, top_k, fmt, vocab))
        return gzip_body(body, gzip_level) if gzip_level else body

    encode_ms, wire = _median_ms(encode, repeats)

    def decode():
        body = zlib.decompress(wire, 16 + zlib.MAX_WBITS) if gzip_level else wire
        return codec.decode(json.loads(body), fmt, sequences, prompt_lengths, top_k)

    decode_ms, batch = _median_ms(decode, repeats)
    return {"bytes": len(wire), "encode_ms": encode_ms, "decode_ms": decode_ms}, batch


def student_inputs(student, sequences, prompt_lengths):
    """Student logits at the completion positions (B, Tmax, V) and labels (B, Tmax) padded with -100."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.zeros((len(sequences), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    with torch.inference_mode():
        logits = student(input_ids=ids, attention_mask=mask).logits.float()
    tmax = max(len(s) - p for s, p in zip(sequences, prompt_lengths))
    out = torch.zeros((len(sequences), tmax, logits.shape[-1]))
    labels = torch.full((len(sequences), tmax), -100, dtype=torch.long)
    for i, (s, p) in enumerate(zip(sequences, prompt_lengths)):
        n = len(s) - p
        out[i, :n] = logits[i, p - 1 : len(s) - 1]
        labels[i, :n] = torch.tensor(s[p:])
    return out, labels


def loss_of(batch, student_logits, labels, top_k: int, temperature: float) -> float:
    import torch

    from protege.losses import sparse_top1_loss, topk_forward_kl_loss

    t = {k: torch.from_numpy(np.ascontiguousarray(getattr(batch, k))) for k in ("topk_logprobs", "topk_ids")}
    if top_k == 1:
        return sparse_top1_loss(
            student_logits,
            labels,
            t["topk_ids"][..., 0],
            t["topk_logprobs"][..., 0],
            torch.from_numpy(np.ascontiguousarray(batch.actual_logprobs)),
            beta=0.5,
            temperature=temperature,
        ).item()
    return topk_forward_kl_loss(
        student_logits, labels, t["topk_ids"], t["topk_logprobs"], temperature=temperature
    ).item()


def peakedness(rows) -> dict:
    top = np.concatenate([r.topk_logprobs for r in rows])
    p = np.exp(top.astype(np.float64))
    return {
        "top1_prob": float(p[:, 0].mean()),
        "topk_mass": float(p.sum(-1).mean()),
        "actual_logprob": float(np.concatenate([r.actual_logprobs for r in rows]).mean()),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--student-steps", type=int, default=100)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/protege-bench-models"))
    parser.add_argument("--top-k", type=int, nargs="+", default=[1, 20, 100])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--completion", type=int, default=128)
    parser.add_argument("--ragged", action="store_true", help="completion lengths uniform in [completion // 8, ...]")
    parser.add_argument("--temperature", type=float, default=1.0, help="teacher (and loss) temperature")
    parser.add_argument("--gzip-level", type=int, default=GZIP_LEVEL, help="default: protege's app's (6)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (training, scoring, losses)")
    parser.add_argument("--quick", action="store_true", help="smoke run: vocab 1000, 30/10 steps, K in {1, 20}")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.vocab, args.teacher_steps, args.student_steps, args.top_k, args.repeats = 1000, 30, 10, [1, 20], 2

    import torch

    from protege.server.backends import TransformersBackend

    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min)")
    models = build_models(args.cache_dir, args.vocab, args.teacher_steps, args.student_steps)
    info = models["info"]
    backend = TransformersBackend(str(models["teacher_dir"]))
    student = models["load_student"]()
    sequences, prompt_lengths = make_batch(
        models["heldout"], args.batch, args.prompt, args.completion, args.ragged, seed=0
    )
    scored = sum(len(s) - p for s, p in zip(sequences, prompt_lengths))
    student_logits, labels = student_inputs(student, sequences, prompt_lengths)
    print(
        f"teacher {info['teacher']['parameters'] / 1e6:.2f} M params, {info['teacher']['steps']} steps, train loss "
        f"{info['teacher']['train_loss_first']:.2f} -> {info['teacher']['train_loss_last']:.2f}; student "
        f"{info['student']['parameters'] / 1e6:.2f} M params, {info['student']['steps']} steps, train loss "
        f"{info['student']['train_loss_first']:.2f} -> {info['student']['train_loss_last']:.2f}; "
        f"vocab {backend.vocab_size}"
    )
    print(
        f"batch: {len(sequences)} sequences, prompt {args.prompt}, completions "
        f"{'ragged ' if args.ragged else ''}{min(len(s) - p for s, p in zip(sequences, prompt_lengths))}-"
        f"{max(len(s) - p for s, p in zip(sequences, prompt_lengths))} tokens, {scored} scored tokens"
    )
    results = []
    header = (
        f"{'K':>3} {'format':<13} {'bytes/token':>11} {'vs json':>8} {'encode ms':>9} {'decode ms':>9} "
        f"{'loss':>12} {'rel. diff vs binary':>19}"
    )
    for top_k in args.top_k:
        rows = backend.score(sequences, prompt_lengths, top_k, args.temperature)
        peak = peakedness(rows)
        print(
            f"\nK={top_k}: teacher mean top-1 prob {peak['top1_prob']:.3f}, mean top-{top_k} mass "
            f"{peak['topk_mass']:.3f}, mean log-prob of the actual token {peak['actual_logprob']:.2f}"
        )
        print(header)
        per_k = []
        for fmt in FORMATS:
            for level in (0, args.gzip_level):
                stats, batch = measure_format(
                    rows, sequences, prompt_lengths, top_k, backend.vocab_size, fmt, level, args.repeats
                )
                loss = loss_of(batch, student_logits, labels, top_k, args.temperature)
                stats.update(k=top_k, format=fmt + ("+gzip" if level else ""), loss=loss)
                per_k.append(stats)
        results.extend(per_k)
        reference = next(r for r in per_k if r["format"] == "binary")["loss"]
        json_bytes = next(r for r in per_k if r["format"] == "json")["bytes"]
        for r in per_k:
            r["bytes_per_token"] = r["bytes"] / scored
            r["ratio_vs_json"] = json_bytes / r["bytes"]
            r["loss_rel_diff"] = abs(r["loss"] - reference) / abs(reference)
            r.update(peak)
            print(
                f"{top_k:>3} {r['format']:<13} {r['bytes_per_token']:>11.1f} {r['ratio_vs_json']:>7.1f}x "
                f"{r['encode_ms']:>9.1f} {r['decode_ms']:>9.1f} {r['loss']:>12.6f} {r['loss_rel_diff']:>19.1e}"
            )
    print(f"\nload average after: {os.getloadavg()[0]:.2f} (1 min)\n")
    print("| K | format | bytes / token | json / this | encode ms | decode ms | loss | rel. diff vs binary |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(
            f"| {r['k']} | {r['format']} | {r['bytes_per_token']:.1f} | {r['ratio_vs_json']:.1f}x | "
            f"{r['encode_ms']:.1f} | {r['decode_ms']:.1f} | {r['loss']:.6f} | {r['loss_rel_diff']:.1e} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args), "results": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

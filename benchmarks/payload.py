"""What the teacher server's answers cost: size, codec time and loss fidelity of each response format.

    python -m benchmarks payload                      # formats; first run: + ~7 CPU-minutes of training (cached)
    python -m benchmarks payload --ragged             # formats, completions that stop at EOS
    python -m benchmarks payload --temperature 0.5    # formats, a sharper teacher
    python -m benchmarks payload size error student   # the hidden format's parts: ~10 min on 2 cores
    python -m benchmarks payload --quick formats size error student   # smoke run: small shapes

Parts (positional, default `formats`):

* `formats`: the log-prob formats (json, binary, compact), with and without gzip, on a real (tiny) trained LM
  (`workers.trained_models`: a BPE of `--vocab` tokens and a teacher trained on the English text every Python ships, so
  its log-probs are peaked rather than random; cached under `--cache-dir`). For each K in `--top-k`, `--batch`
  held-out sequences (`--prompt` + `--completion` tokens; `--ragged`: completion lengths uniform in [completion // 8,
  completion]) scored by `TransformersBackend.score` (the server's code path), then per format: encode =
  `codec.encode` + the server's JSON rendering (+ the gzip `GZipMiddleware` applies at protege's level 6, or
  `--gzip-level`); decode = gunzip + `json.loads` + `codec.decode` with its checks; bytes per scored token (headers
  excluded); the student's loss against the decoded teacher (`sparse_top1_loss`, beta 0.5, at K = 1;
  `topk_forward_kl_loss` at K > 1) and its difference from the float32 "binary" answer's.
* `size`: bytes per scored token and codec time at vocabulary 151,936, 8 sequences x 256 completion tokens: the
  log-prob formats at K in 1, 20, 100 on random logits (normal, sd 4, so their gzip sizes are indicative only), and the
  hidden format (float16, bfloat16, float32) at H = 896 and 3,584 on standard normal states (a final RMSNorm's output
  up to its weight), as JSON (base64) and as the binary answer protege's client asks for (one safetensors blob), next
  to full float32 log-probs (4V bytes a token). Per 1,000 tokens.
* `error`: on `formats`' trained teacher and student, 16 held-out windows of 32 + 128 tokens, the teacher run as the
  server runs it (`score` at K = 100, `hidden_states`). For beta 0, 0.5 and 1, the exact loss (full vocabulary, the
  teacher's float32 logits, `Objective.loss_sum`) against: the hidden format after float16 and bfloat16 rounding; the
  sparse top-1 loss with tail (what a log-prob server allows for beta > 0); the top-20 and top-100 losses with tail
  (for beta > 0 the top-k union support, which needs the full teacher). The loss's relative error, and the cosine and
  relative L2 error of the gradient on the student's logits.
* `student`: real shapes (vocabulary 151,936, student hidden 896 with a tied head, teacher hidden 1536), 2 x 1,000
  completion tokens, float32: the teacher head's bytes on the student's device, and the time and peak RSS of one
  chunked loss forward + backward (`Objective.loss_sum`, `chunk_size="auto"`) per objective, each in a fresh process;
  the peak is the loss's own (the high-water mark is reset just before it, /proc/self/clear_refs: VmHWM after it minus
  VmRSS before it).

Times are medians of `--repeats` runs on `--threads` torch threads.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import GIB, Column, Report, describe, median_ms, parser, status_bytes
from benchmarks.workers import heldout_batch, trained_models

GZIP_LEVEL = 6  # the compresslevel protege's app gives GZipMiddleware (src/protege/server/app.py)
VOCAB = 151_936
STUDENT_CASES = {  # objective: (beta, top_k, teacher)
    "hidden: exact JSD (beta 0.5, top_k 0)": (0.5, 0, "hidden"),
    "hidden: sparse top-1 (beta 0.5)": (0.5, 1, "hidden"),
    "log-probs: sparse top-1 (beta 0.5)": (0.5, 1, 1),
    "log-probs: top-20 forward KL (beta 0)": (0.0, 20, 20),
}


def per_1k(key: str) -> Column:
    return Column(f"{key.split('_')[1]} ms/1k tok ({key.split('_')[0]})", f"{key}_ms_per_1k", "{:.1f}")


TABLES = {
    "formats": [
        Column("K", "k"),
        Column("format", "format", text=True),
        Column("bytes / token", "bytes_per_token", "{:.1f}"),
        Column("json / this", "ratio_vs_json", "{:.1f}x"),
        Column("encode ms", "encode_ms", "{:.1f}"),
        Column("decode ms", "decode_ms", "{:.1f}"),
        Column("loss", "loss", "{:.6f}"),
        Column("rel. diff vs binary", "loss_rel_diff", "{:.1e}"),
    ],
    "size": [
        Column("format", "format", text=True),
        Column("K or H", "K or H", "{:,}"),
        Column("tensor bytes/token", "raw", "{:,.0f}"),
        Column("body bytes/token", "body", "{:,.0f}"),
        Column("gzip bytes/token", "gzip", "{:,.0f}"),
        *(per_1k(f"{tag}_{step}") for tag in ("body", "gzip") for step in ("encode", "decode")),
    ],
    "error": [
        Column("beta", "beta"),
        Column("objective", "objective", text=True),
        Column("served by", "served by", text=True),
        Column("exact loss", "exact loss", "{:.4f}"),
        Column("loss", "loss", "{:.4f}"),
        Column("loss rel. error", "loss relative error", "{:+.2e}"),
        Column("gradient cosine", "gradient cosine", "{:.4f}"),
        Column("gradient rel. L2 error", "gradient relative L2 error", "{:.2e}"),
    ],
    "student": [
        Column("objective", "case", text=True),
        Column("tokens", "tokens", "{:,}"),
        Column("teacher head (float32) GiB", lambda r: r["teacher_head_bytes_float32"] / GIB, "{:.2f}"),
        Column("loss fwd+bwd s", "seconds", "{:.1f}"),
        Column("s per 1k tokens", lambda r: r["seconds"] * 1000 / r["tokens"], "{:.2f}"),
        Column("peak RSS above start GiB", lambda r: r["loss_peak_rss_above_start"] / GIB, "{:.2f}"),
    ],
}

# ---------------------------------------------------------------------------------------------------------------------
# Encode / decode as the server and the client do
# ---------------------------------------------------------------------------------------------------------------------


def render(payload: dict) -> bytes:
    """starlette.responses.JSONResponse.render."""
    return json.dumps(payload, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode("utf-8")


def gzip_body(body: bytes, level: int = GZIP_LEVEL) -> bytes:
    """starlette.middleware.gzip.GZipResponder for a single-message body."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return compressor.compress(body) + compressor.flush()


def measure_codec(encode: Callable[[], bytes], decode: Callable[[bytes], Any], gzip_level: int, repeats: int) -> tuple:
    """Wire bytes and median encode / decode ms of one answer (gzipped when `gzip_level`), and the decoded answer."""
    encode_ms, wire = median_ms(lambda: gzip_body(encode(), gzip_level) if gzip_level else encode(), repeats)
    unzip = (lambda body: zlib.decompress(body, 16 + zlib.MAX_WBITS)) if gzip_level else (lambda body: body)
    decode_ms, decoded = median_ms(lambda: decode(unzip(wire)), repeats)
    return {"bytes": len(wire), "encode_ms": encode_ms, "decode_ms": decode_ms}, decoded


def measure_format(rows, sequences, prompt_lengths, top_k, vocab, fmt, gzip_level, repeats) -> tuple:
    from protege.teacher import codec

    return measure_codec(
        lambda: render(codec.encode(rows, top_k, fmt, vocab)),
        lambda body: codec.decode(json.loads(body), fmt, sequences, prompt_lengths, top_k),
        gzip_level,
        repeats,
    )


def measure_hidden(rows, sequences, prompt_lengths, dtype: str, gzip_level: int, repeats: int, binary=False) -> dict:
    """The JSON payload (base64), or with `binary` the safetensors blob protege's client asks for."""
    from protege.teacher.codec import decode_hidden, decode_hidden_binary, encode_hidden, encode_hidden_binary

    hidden = rows[0].shape[-1]

    def encode() -> bytes:
        return encode_hidden_binary(rows, dtype) if binary else render(encode_hidden(rows, dtype))

    def decode(body: bytes) -> Any:
        if binary:
            return decode_hidden_binary(body, sequences, prompt_lengths, hidden)
        return decode_hidden(json.loads(body), sequences, prompt_lengths, hidden)

    return measure_codec(encode, decode, gzip_level, repeats)[0]


# ---------------------------------------------------------------------------------------------------------------------
# formats: the log-prob formats on a trained teacher
# ---------------------------------------------------------------------------------------------------------------------


def student_inputs(student, sequences, prompt_lengths) -> tuple:
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
        out[i, : len(s) - p] = logits[i, p - 1 : len(s) - 1]
        labels[i, : len(s) - p] = torch.tensor(s[p:])
    return out, labels


def loss_of(batch, student_logits, labels, top_k: int, temperature: float) -> float:
    import numpy as np
    import torch

    from protege.losses import sparse_top1_loss, topk_forward_kl_loss

    t = {k: torch.from_numpy(np.ascontiguousarray(getattr(batch, k))) for k in ("topk_logprobs", "topk_ids")}
    if top_k == 1:
        actual = torch.from_numpy(np.ascontiguousarray(batch.actual_logprobs))
        top1 = (t["topk_ids"][..., 0], t["topk_logprobs"][..., 0], actual)
        return sparse_top1_loss(student_logits, labels, *top1, beta=0.5, temperature=temperature).item()
    return topk_forward_kl_loss(
        student_logits, labels, t["topk_ids"], t["topk_logprobs"], temperature=temperature
    ).item()


def peakedness(rows) -> dict:
    import numpy as np

    p = np.exp(np.concatenate([r.topk_logprobs for r in rows]).astype(np.float64))
    return {
        "top1_prob": float(p[:, 0].mean()),
        "topk_mass": float(p.sum(-1).mean()),
        "actual_logprob": float(np.concatenate([r.actual_logprobs for r in rows]).mean()),
    }


def part_formats(args: argparse.Namespace) -> list[dict]:
    from protege.choices import LOGPROB_FORMATS
    from protege.server.backends import TransformersBackend

    models = trained_models(args.cache_dir, args.vocab, args.teacher_steps, args.student_steps)
    info, backend, student = models["info"], TransformersBackend(str(models["teacher_dir"])), models["load_student"]()
    sequences, prompt_lengths = heldout_batch(
        models["heldout"], args.batch, args.prompt, args.completion, args.ragged, seed=0
    )
    completions = [len(s) - p for s, p in zip(sequences, prompt_lengths)]
    student_logits, labels = student_inputs(student, sequences, prompt_lengths)
    for name in ("teacher", "student"):
        print(
            f"{name}: {info[name]['parameters'] / 1e6:.2f} M params, {info[name]['steps']} steps, train loss "
            f"{info[name]['train_loss_first']:.2f} -> {info[name]['train_loss_last']:.2f}; vocab {backend.vocab_size}"
        )
    print(f"batch: {len(sequences)} sequences, completions {min(completions)}-{max(completions)}, {sum(completions)}")
    results = []
    for top_k in args.top_k:
        rows = backend.score(sequences, prompt_lengths, top_k, args.temperature)
        peak = peakedness(rows)
        print(f"K={top_k}: teacher mean top-1 prob {peak['top1_prob']:.3f}, top-{top_k} mass {peak['topk_mass']:.3f}")
        per_k = []
        for fmt in LOGPROB_FORMATS:
            for level in (0, args.gzip_level):
                stats, batch = measure_format(
                    rows, sequences, prompt_lengths, top_k, backend.vocab_size, fmt, level, args.repeats
                )
                loss = loss_of(batch, student_logits, labels, top_k, args.temperature)
                per_k.append({**stats, "k": top_k, "format": fmt + ("+gzip" if level else ""), "loss": loss, **peak})
        reference = next(r for r in per_k if r["format"] == "binary")["loss"]
        json_bytes = next(r for r in per_k if r["format"] == "json")["bytes"]
        for r in per_k:
            r.update(bytes_per_token=r["bytes"] / sum(completions), ratio_vs_json=json_bytes / r["bytes"])
            r["loss_rel_diff"] = abs(r["loss"] - reference) / abs(reference)
        results += per_k
    return results


# ---------------------------------------------------------------------------------------------------------------------
# size: the log-prob and hidden formats at a real vocabulary
# ---------------------------------------------------------------------------------------------------------------------


def synthetic_logprob_rows(tokens_per_row: int, rows: int, vocab: int, top_k: int, seed: int) -> list:
    """SequenceScores of random logits over the whole vocabulary (log-softmax, top-k, a sampled actual token)."""
    import numpy as np
    import torch

    from protege.teacher.codec import SequenceScores

    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(rows):
        parts = []
        for start in range(0, tokens_per_row, 64):
            logp = torch.log_softmax(torch.randn(min(64, tokens_per_row - start), vocab, generator=generator) * 4.0, -1)
            top = logp.topk(top_k, dim=-1)
            actual_ids = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
            parts.append((top.values, top.indices, logp.gather(-1, actual_ids[:, None]).squeeze(-1), actual_ids))
        values, ids, actual, actual_ids = (torch.cat(column).numpy() for column in zip(*parts))
        out.append(SequenceScores(values, ids.astype(np.int64), actual, actual_ids.astype(np.int64)))
    return out


def size_record(record: dict, measure: Callable[[int], dict], tokens: int, levels=(0, GZIP_LEVEL)) -> dict:
    """`record` with bytes per token and ms per 1,000 tokens of each gzip level (0: "body", else "gzip")."""
    for level in levels:
        tag, measured = ("gzip" if level else "body"), measure(level)
        record[tag] = measured["bytes"] / tokens
        for step in ("encode", "decode"):
            record[f"{tag}_{step}_ms_per_1k"] = measured[f"{step}_ms"] * 1000 / tokens
    return record


def part_size(args: argparse.Namespace) -> list[dict]:
    import numpy as np

    from protege.choices import LOGPROB_FORMATS

    rows_count, length, prompt = (2, 64, 8) if args.quick else (8, 256, 32)
    vocab, tokens = (4096 if args.quick else VOCAB), rows_count * length
    generators = [np.random.default_rng(i) for i in range(rows_count)]
    sequences = [[*range(prompt), *generator.integers(0, vocab, length).tolist()] for generator in generators]
    prompt_lengths = [prompt] * rows_count
    full = 4 * vocab
    results = [{"format": "full float32 log-probs", "K or H": vocab, "raw": full, "body": full * 4 / 3}]
    for top_k in (1, 20) if args.quick else (1, 20, 100):
        rows = synthetic_logprob_rows(length, rows_count, vocab, top_k, seed=top_k)
        for i, row in enumerate(rows):
            row.actual_ids[:] = sequences[i][prompt:]
        for fmt in LOGPROB_FORMATS:

            def measure(level: int, fmt: str = fmt, rows: list = rows, top_k: int = top_k) -> dict:
                return measure_format(rows, sequences, prompt_lengths, top_k, vocab, fmt, level, args.repeats)[0]

            results.append(size_record({"format": fmt, "K or H": top_k}, measure, tokens))
    for hidden_size in (64, 128) if args.quick else (896, 3584):
        generator = np.random.default_rng(hidden_size)
        rows = [generator.standard_normal((length, hidden_size)).astype(np.float32) for _ in range(rows_count)]
        for dtype in ("float16", "bfloat16", "float32"):
            raw = hidden_size * (4 if dtype == "float32" else 2)

            def measure(level, dtype=dtype, rows=rows, binary=False):
                return measure_hidden(rows, sequences, prompt_lengths, dtype, level, args.repeats, binary)

            record = {"format": f"hidden {dtype}", "K or H": hidden_size, "raw": raw}
            results.append({**size_record(record, measure, tokens), "smaller_than_full_float32": full / raw})
            record = {"format": f"hidden {dtype}, binary (the client's)", "K or H": hidden_size, "raw": raw}
            results.append(size_record(record, lambda level, m=measure: m(level, binary=True), tokens, levels=(0,)))
    return results


# ---------------------------------------------------------------------------------------------------------------------
# error: each approximation against the exact loss, on the trained teacher
# ---------------------------------------------------------------------------------------------------------------------


def part_error(args: argparse.Namespace) -> list[dict]:
    import torch

    from protege.objective import Objective, StudentLogits, TeacherHidden, TeacherLogits, TeacherScores
    from protege.server.backends import TransformersBackend
    from protege.teacher.codec import BatchScores, decode_hidden, encode_hidden

    models = trained_models(args.cache_dir, *((1000, 30, 10) if args.quick else (8000, 300, 100)))
    sequences, prompt_lengths = heldout_batch(models["heldout"], 16, 32, 128, ragged=False, seed=7)
    student_logits, labels = student_inputs(models["load_student"](), sequences, prompt_lengths)
    backend = TransformersBackend(str(models["teacher_dir"]))
    scores = {k: BatchScores.pad(backend.score(sequences, prompt_lengths, k, 1.0), k) for k in (1, 20, 100)}
    hidden = backend.hidden_states(sequences, prompt_lengths)
    weight = backend.lm_head().weight
    exact_teacher = TeacherLogits(torch.stack([torch.from_numpy(h) for h in hidden]) @ weight.T)  # float32

    def rounded(dtype: str) -> TeacherHidden:
        rows = decode_hidden(encode_hidden(hidden, dtype), sequences, prompt_lengths)
        return TeacherHidden(torch.stack([torch.from_numpy(r) for r in rows]), weight, None)

    def served(k: int) -> TeacherScores:
        s = scores[k]
        return TeacherScores(*(torch.from_numpy(x) for x in (s.topk_ids, s.topk_logprobs, s.actual_logprobs)))

    def loss_and_grad(objective: Objective, teacher) -> tuple[float, torch.Tensor]:
        logits = student_logits.clone().requires_grad_(True)
        loss = objective.loss_sum(StudentLogits(logits), teacher, labels) / labels.ne(-100).sum()
        loss.backward()
        return loss.item(), logits.grad.flatten().double()

    results = []
    for beta in (0.0, 0.5, 1.0):
        exact_loss, exact_grad = loss_and_grad(Objective(beta=beta, top_k=0), exact_teacher)
        cases = [(f"hidden {dtype}", "server", 0, rounded(dtype)) for dtype in ("float16", "bfloat16")]
        if beta > 0:
            cases.append(("sparse top-1 + tail", "server", 1, served(1)))
        for k in (20, 100):  # for beta > 0 the top-k union support needs the full teacher
            where, teacher = ("server", served(k)) if beta == 0 else ("local or hidden", exact_teacher)
            cases.append((f"top-{k} + tail", where, k, teacher))
        for name, where, top_k, teacher in cases:
            loss, grad = loss_and_grad(Objective(beta=beta, top_k=top_k), teacher)
            results.append(
                {
                    "beta": beta,
                    "objective": name,
                    "served by": where,
                    "exact loss": exact_loss,
                    "loss": loss,
                    "loss relative error": loss / exact_loss - 1,
                    "gradient cosine": torch.nn.functional.cosine_similarity(grad, exact_grad, dim=0).item(),
                    "gradient relative L2 error": ((grad - exact_grad).norm() / exact_grad.norm()).item(),
                }
            )
    return results


# ---------------------------------------------------------------------------------------------------------------------
# student: what each teacher format costs the student's process at real shapes
# ---------------------------------------------------------------------------------------------------------------------


def student_case(name: str, quick: bool, threads: int, queue: Any) -> None:
    """One chunked loss forward + backward at real shapes, in a fresh process (peak RSS of this case alone)."""
    import torch

    from protege.objective import Objective, StudentHidden, TeacherHidden, TeacherScores

    torch.set_num_threads(threads)
    vocab, student_h, teacher_h, tokens = (8000, 64, 128, 200) if quick else (VOCAB, 896, 1536, 2000)
    generator = torch.Generator().manual_seed(0)
    student_weight = (torch.randn(vocab, student_h, generator=generator) * 0.02).requires_grad_(True)
    student_hidden = torch.randn(1, tokens, student_h, generator=generator).requires_grad_(True)
    labels = torch.randint(0, vocab, (1, tokens), generator=generator)
    beta, top_k, source = STUDENT_CASES[name]
    if source == "hidden":
        states = torch.randn(1, tokens, teacher_h, generator=generator)
        teacher = TeacherHidden(states, torch.randn(vocab, teacher_h, generator=generator) * 0.05, None)
    else:
        logits = torch.randn(1, tokens, source + 1, generator=generator)
        logp = torch.log_softmax(logits, -1)[..., :source].sort(-1, descending=True).values
        ids = torch.randint(0, vocab, (1, tokens, source), generator=generator)
        teacher = TeacherScores(ids, logp, logp[..., 0] - 1.0)
    objective = Objective(beta=beta, top_k=top_k, chunk_size="auto")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark: the set-up's own peak is not counted
    rss_before = status_bytes("VmRSS")
    started = time.perf_counter()
    objective.loss_sum(StudentHidden(student_hidden, student_weight, None), teacher, labels).backward()
    seconds = time.perf_counter() - started
    queue.put(
        {
            "case": name,
            "tokens": tokens,
            "seconds": seconds,
            "loss_peak_rss_above_start": status_bytes("VmHWM") - rss_before,
            "teacher_head_bytes_float32": teacher.weight.numel() * 4 if source == "hidden" else 0,
        }
    )


def part_student(args: argparse.Namespace) -> list[dict]:
    context = multiprocessing.get_context("spawn")
    results = []
    for name in STUDENT_CASES:
        queue = context.Queue()
        process = context.Process(target=student_case, args=(name, args.quick, args.threads, queue))
        process.start()
        results.append(queue.get())
        process.join()
    return results


PARTS = {"formats": part_formats, "size": part_size, "error": part_error, "student": part_student}


def main(argv: list[str] | None = None) -> int:
    options = parser("payload", __doc__, quick="vocabulary 1000, 30 / 10 training steps, K in 1 and 20, small shapes")
    options.add_argument("parts", nargs="*", default=["formats"], help=f"of {', '.join(PARTS)} (default formats)")
    options.add_argument("--vocab", type=int, default=8000, help="formats: the trained models' vocabulary")
    options.add_argument("--teacher-steps", type=int, default=300)
    options.add_argument("--student-steps", type=int, default=100)
    options.add_argument("--cache-dir", type=Path, default=Path("/tmp/protege-bench-models"), help="trained models")
    options.add_argument("--top-k", type=int, nargs="+", default=[1, 20, 100], help="formats: K")
    options.add_argument("--batch", type=int, default=16, help="formats: sequences")
    options.add_argument("--prompt", type=int, default=32)
    options.add_argument("--completion", type=int, default=128)
    options.add_argument("--ragged", action="store_true", help="formats: completion lengths in [completion // 8, ...]")
    options.add_argument("--temperature", type=float, default=1.0, help="formats: teacher (and loss) temperature")
    options.add_argument("--gzip-level", type=int, default=GZIP_LEVEL, help="formats: default protege's app's (6)")
    options.add_argument("--repeats", type=int, default=None, help="timed runs (default 5 for formats, else 3)")
    options.add_argument("--threads", type=int, default=2, help="torch threads")
    args = options.parse_args(argv)
    if unknown := set(args.parts) - set(PARTS):
        options.error(f"unknown parts {sorted(unknown)}: choose from {', '.join(PARTS)}")
    if args.quick:
        args.vocab, args.teacher_steps, args.student_steps, args.top_k = 1000, 30, 10, [1, 20]
    import torch

    torch.set_num_threads(args.threads)
    report = Report("payload", args)
    print(describe(report.head), flush=True)
    repeats, defaults = args.repeats, {"formats": 2 if args.quick else 5}
    for name in args.parts:
        args.repeats = repeats or defaults.get(name, 3)
        started = time.perf_counter()
        rows = PARTS[name](args)
        print(f"\n## {name} ({time.perf_counter() - started:.0f} s)\n\n{report.table(name, rows, TABLES)}", flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.2f} (1 min); rows appended to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

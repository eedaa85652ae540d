"""Throughput of on-policy distillation steps: student generation with transformers' `generate` vs vLLM colocate.

Every mode runs protege's `DistillationTrainer` with lmbda 1 (every slice on-policy), in a fresh worker process of the
vLLM environment's interpreter (`make vllm-env` creates `.vllm-env`), so torch and transformers are the same:

* `transformers`: `use_vllm=False`; the trainer generates a step's completions with `model.generate`;
* `vllm`: `use_vllm=True, vllm_mode="colocate"`; a `vllm.LLM` in the training process generates them, after the trainer
  pushed the student's changed weights to it (`collective_rpc("reload_weights")`, every step);
* `vllm-server`: `use_vllm=True, vllm_mode="server"`; `protege serve-student` (started by the parent on 127.0.0.1 in
  the same environment) generates them, after the trainer pushed the student's weights over HTTP (safetensors bytes in
  chunks, every step). On one machine the server and the trainer take turns on the same cores.

Either way the trainer makes ONE generation call per optimizer step for all its slices (`get_batch_samples`).

    .vllm-env/bin/python -m benchmarks generation --quick                # smoke run: tiny models, 16 tokens
    .vllm-env/bin/python -m benchmarks generation                        # grad accum 4 and 8, 128 tokens
    .vllm-env/bin/python -m benchmarks generation --grad-accum 8 --modes transformers vllm vllm-server

The parent uses the standard library only (any Python 3.10+ runs it); the workers run with `--python` (default
`.vllm-env/bin/python`) and `VLLM_ENABLE_V1_MULTIPROCESSING=0` (the engine in-process), `VLLM_CPU_KVCACHE_SPACE`
(`--kv-cache-gib`), `HF_HUB_OFFLINE=1`, `TOKENIZERS_PARALLELISM=false` and `OMP_NUM_THREADS` = `--threads` (vLLM's CPU
worker binds the process's threads itself once built, so each worker reports the thread count it trained with).

Models (`workers.random_models`, built once into `--cache-dir` in a process of `--python`): a word-level tokenizer of
exactly 32,000 entries; a Qwen2 student of hidden 512, 8 layers, 8 heads (2 key-value), intermediate 1536, tied
(40.5M parameters); a teacher of 4 such layers (28.5M), so the teacher's cost is small and the same in every mode.
`--quick`: vocabulary 2000, hidden 64, 2 layers, 2 heads (head_dim 32, the least vLLM's CPU kernels take), 1 warm-up
and 2 timed steps of 16-token completions at grad accum 1. Data: prompt-only rows of `--prompt-words` random words.

Settings, the same in every mode: per-device batch 8, grad accum `--grad-accum`, `--max-new-tokens` new tokens,
temperature 1, top_p 1, lmbda 1, beta 0.5, full vocabulary, float32, AdamW at 1e-5, no activation checkpointing, seed
0. Step k takes from the `on_step_end` of step k-1 to its own (`workers.step_timer`): generation, the weight push,
teacher and student passes and the AdamW step are inside; `--warmup` steps are not counted. Per timed step the worker
reports its seconds, the trainer's logged `time/generation_s`, `time/teacher_s`, `time/student_s`, the weight push
alone (the engine's `_sync_weights`, timed by the worker) and the logged `completion_tokens` (checked against
`workers.counting_trainer`). Tokens/s = completion tokens of the timed steps / their seconds; speedup = over
transformers' at the same grad accum. The machine's other load moves these numbers a lot: the JSON lines keep the
1-minute load average sampled every 10 s while each worker ran.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import (
    GIB,
    REPO,
    Column,
    Finished,
    Report,
    describe,
    emit_result,
    free_port,
    module_command,
    parse,
    parser,
    read_result,
    setting,
    worker_env,
)
from benchmarks.workers import FolderRun, Shapes, build_trainer, qwen2, random_models, train, word_rows

MODES = ("transformers", "vllm", "vllm-server")
SHAPES = {
    "full": Shapes("full", 32_000, qwen2(512, 8, 8, 2, 1536, tied=True), qwen2(512, 4, 8, 2, 1536, tied=True)),
    "quick": Shapes("quick", 2000, qwen2(64, 2, 2, 2, 256, tied=True), qwen2(64, 2, 2, 2, 256, tied=True)),
}
LOAD_SECONDS = 10.0


@dataclasses.dataclass(kw_only=True)
class Case(FolderRun):
    """One worker: one mode at one grad accum; the `RunSettings` part is what `workers.trainer_config` reads."""

    mode: str = setting(help=f"one of {', '.join(MODES)}")
    steps: int = setting(3, "optimizer steps timed, after the warm-up")
    warmup: int = setting(1, "optimizer steps run first and not timed")
    batch: int = setting(8, "per_device_train_batch_size")
    grad_accum: int = setting(4, "gradient_accumulation_steps")
    max_completion_length: int = setting(128, "max_completion_length (new tokens a prompt)")
    max_length: int = setting(0, "0: prompt tokens + max_completion_length + 16 (also vLLM's max_model_len)")
    top_p: float = setting(1.0)
    learning_rate: float = setting(1e-5)
    threads: int = setting(2, "torch threads (and OMP_NUM_THREADS)")
    prompt_words: int = setting(16, "random words in each prompt")
    server_url: str | None = setting(None, "vllm-server mode: the student server's URL (the parent starts it)")

    def __post_init__(self) -> None:
        self.max_length = self.max_length or self.prompt_words + 3 + self.max_completion_length + 16


# ---------------------------------------------------------------------------------------------------------------------
# Worker side (the vLLM environment's interpreter)
# ---------------------------------------------------------------------------------------------------------------------


def prompts(case: Case, tokenizer) -> list[dict]:
    """Prompt-only chat rows of random words, enough for every step of the run."""
    count = (case.warmup + case.steps) * case.batch * case.grad_accum
    texts = word_rows(tokenizer, count, (case.prompt_words,), case.seed)
    return [{"prompt": [{"role": "user", "content": text}]} for (text,) in texts]


def worker(argv: list[str]) -> int:
    """One mode at one grad accum, in the vLLM environment: warm-up and timed steps, the result as one JSON line."""
    case = parse(Case, argv, "one mode of benchmarks/generation.py")
    if case.mode not in MODES:
        raise SystemExit(f"--mode must be one of {MODES}")

    import datasets
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from transformers.utils import logging as hf_logging

    import protege
    from protege import DistillationConfig, DistillationTrainer

    torch.set_num_threads(case.threads)
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()

    # AutoTokenizer on a folder whose config.json is Qwen2 would rebuild Qwen2's BPE: load the word-level one as is.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(case.tokenizer)
    train_dataset = datasets.Dataset.from_list(prompts(case, tokenizer))
    student = AutoModelForCausalLM.from_pretrained(case.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(case.teacher, dtype=torch.float32)

    def configure(**shared):
        if "activation_checkpointing" not in {f.name for f in dataclasses.fields(DistillationConfig)}:
            shared["gradient_checkpointing"] = shared.pop("activation_checkpointing")  # transformers < 5.2x
        if case.mode == "vllm-server":
            vllm = {"use_vllm": True, "vllm_mode": "server", "vllm_server_base_url": case.server_url}
        else:
            vllm = {"use_vllm": case.mode == "vllm", "vllm_mode": "colocate"}
        return DistillationConfig(**{**shared, **vllm})

    started = time.perf_counter()
    trainer, timer, init_warnings = build_trainer(
        case,
        case.mode,
        configure,
        DistillationTrainer,
        TrainerCallback,
        model=student,
        teacher_model=teacher,
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    setup_seconds = time.perf_counter() - started
    threads_ready = torch.get_num_threads()
    sync_seconds = time_weight_pushes(trainer)
    train_seconds, logs = train(trainer)
    steps = step_records(case, trainer, timer, logs, sync_seconds)
    emit_result(
        {
            "mode": case.mode,
            "grad_accum": case.grad_accum,
            "prompts_per_step": case.batch * case.grad_accum,
            **timed_summary(steps),
            "generate_calls": None if trainer.vllm is None else trainer.vllm.generate_calls,
            "setup_seconds": setup_seconds,
            "train_seconds": train_seconds,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
            "student_params": sum(p.numel() for p in student.parameters()),
            "teacher_params": sum(p.numel() for p in teacher.parameters()),
            "torch_threads_ready": threads_ready,
            "torch_threads_after": torch.get_num_threads(),
            "protege_version": protege.__version__,
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "vllm_version": vllm_version(),
            "init_warnings": init_warnings,
            "config": dataclasses.asdict(case),
        }
    )
    return 0


def time_weight_pushes(trainer) -> dict[int, float]:
    """Seconds of the engine's weight pushes (its `_sync_weights`), by the optimizer step (1-based) whose generation
    made them; filled while the trainer trains."""
    sync_seconds: dict[int, float] = {}
    if trainer.vllm is not None:
        push = trainer.vllm._sync_weights

        def timed_push(model, step):
            began = time.perf_counter()
            push(model, step)
            sync_seconds[step + 1] = sync_seconds.get(step + 1, 0.0) + time.perf_counter() - began

        trainer.vllm._sync_weights = timed_push
    return sync_seconds


def step_records(case: Case, trainer, timer, logs: dict, sync_seconds: dict[int, float]) -> list[dict]:
    """Every optimizer step: its wall seconds (`on_step_end` to `on_step_end`), the trainer's logs, the push."""
    steps = []
    for k in range(1, case.warmup + case.steps + 1):
        log = logs.get(k, {})
        steps.append(
            {
                "step": k,
                "timed": k > case.warmup,
                "seconds": timer.end[k] - timer.end[k - 1],
                "generation_seconds": log.get("time/generation_s"),
                "sync_seconds": sync_seconds.get(k),
                "teacher_seconds": log.get("time/teacher_s"),
                "student_seconds": log.get("time/student_s"),
                "completion_tokens": log.get("completion_tokens"),
                "counted_tokens": trainer.step_tokens.get(k),
                "mean_length": log.get("completions/mean_length"),
                "truncated_fraction": log.get("completions/truncated_fraction"),
                "on_policy_fraction": log.get("on_policy_fraction"),
                "loss": log.get("loss"),
            }
        )
    return steps


def timed_summary(steps: list[dict]) -> dict:
    """The timed steps' seconds and tokens, and their means per step; whether the token counts agree."""
    timed = [s for s in steps if s["timed"]]
    seconds = sum(s["seconds"] for s in timed)
    tokens = sum(s["completion_tokens"] or 0 for s in timed)
    parts = ("generation_seconds", "sync_seconds", "teacher_seconds", "student_seconds")
    return {
        "steps": steps,
        "timed_seconds": seconds,
        "timed_completion_tokens": tokens,
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
        "seconds_per_step": seconds / len(timed),
        **{f"{part}_per_step": mean(s[part] for s in timed) for part in parts},
        "mean_completion_length": mean(s["mean_length"] for s in timed),
        "token_counts_match": all(s["completion_tokens"] == s["counted_tokens"] for s in steps),
    }


def vllm_version() -> str | None:
    try:
        import vllm
    except ImportError:
        return None
    return vllm.__version__


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def build(argv: list[str]) -> int:
    """The models, built by the workers' interpreter (its torch and transformers save them)."""
    folder, name = argv
    emit_result(random_models(Path(folder), SHAPES[name]))
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Parent side (standard library only)
# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser("generation", __doc__, quick="tiny models, grad accum 1, 16 tokens, 2 steps")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="default: both, in this order")
    p.add_argument("--grad-accum", type=int, nargs="+", help="gradient_accumulation_steps (default: 4 8; --quick: 1)")
    p.add_argument("--max-new-tokens", type=int, help="max_completion_length (default: 128; --quick: 16)")
    p.add_argument("--steps", type=int, help="timed steps (default: 3; --quick: 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--batch", type=int, default=8, help="per_device_train_batch_size")
    p.add_argument("--prompt-words", type=int, default=16, help="random words in each prompt")
    p.add_argument("--threads", type=int, default=2, help="torch threads and OMP_NUM_THREADS of the workers")
    p.add_argument("--kv-cache-gib", type=float, default=2, help="VLLM_CPU_KVCACHE_SPACE of the workers")
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/protege_generation"), help="models and runs")
    p.add_argument(
        "--python", default=str(REPO / ".vllm-env" / "bin" / "python"), help="the vLLM environment's interpreter"
    )
    p.add_argument("--timeout", type=float, default=3600, help="seconds a worker may take")
    args = p.parse_args(argv)
    args.shapes = "quick" if args.quick else "full"
    args.grad_accum = args.grad_accum or ([1] if args.quick else [4, 8])
    args.max_new_tokens = args.max_new_tokens or (16 if args.quick else 128)
    args.steps = args.steps or (2 if args.quick else 3)
    return args


def vllm_env(args: argparse.Namespace) -> dict[str, str]:
    """The workers' environment: their own interpreter's packages only, the engine in-process, offline."""
    threads = str(args.threads)
    return worker_env(
        True,
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_CPU_KVCACHE_SPACE=f"{args.kv_cache_gib:g}",
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
    )


def run(argv: list[str], env: dict, folder: Path, timeout: float) -> tuple[Finished, list[float]]:
    """A worker to its end (or `timeout`), its output going to `folder`/worker.out and worker.err as it runs; also
    the 1-minute load average, sampled every `LOAD_SECONDS` while it ran."""
    folder.mkdir(parents=True, exist_ok=True)
    out, err = folder / "worker.out", folder / "worker.err"
    load = [os.getloadavg()[0]]
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen(argv, env=env, cwd=folder, stdout=stdout, stderr=stderr)
        deadline = time.monotonic() + timeout
        while True:
            try:
                process.wait(timeout=LOAD_SECONDS)
                break
            except subprocess.TimeoutExpired:
                load.append(os.getloadavg()[0])
                if time.monotonic() > deadline:
                    process.kill()
                    process.wait()
                    stderr.write(f"\nkilled after {timeout:.0f} s\n")
                    break
    load.append(os.getloadavg()[0])
    text = out.read_text()
    return Finished(argv, process.returncode, text, err.read_text(), read_result(text)), load


def start_student_server(args: argparse.Namespace, env: dict, case: Case, folder: Path) -> subprocess.Popen:
    """`protege serve-student` on the case's student, on 127.0.0.1 and a free port, once it answers /health/; sets
    `case.server_url`. Its output goes to `folder`/server.err."""
    import urllib.request

    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    command = [args.python, "-m", "protege", "serve-student", "--model", case.student, "--dtype", "float32"]
    command += ["--max-model-len", str(case.max_length), "--port", str(port), "--log-level", "warning"]
    with open(folder / "server.err", "w") as stderr:
        server = subprocess.Popen(command, env=env, cwd=folder, stdout=subprocess.DEVNULL, stderr=stderr)
    case.server_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{case.server_url}/health/", timeout=2) as answer:
                if answer.status == 200:
                    return server
        except OSError:
            if server.poll() is not None:
                break
            time.sleep(1)
    server.kill()
    raise SystemExit(f"the student server did not start: see {folder}/server.err")


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


TABLES = {
    "steps": [
        Column("mode", "mode", text=True),
        Column("grad accum", "grad_accum"),
        Column("prompts/step", "prompts_per_step"),
        Column("mean completion length", "mean_completion_length", "{:.1f}"),
        Column("s/step", "seconds_per_step", "{:.2f}"),
        Column("generation s/step", "generation_seconds_per_step", "{:.2f}"),
        Column("weight sync s/step", "sync_seconds_per_step", "{:.3f}"),
        Column("teacher s/step", "teacher_seconds_per_step", "{:.1f}"),
        Column("student s/step", "student_seconds_per_step", "{:.1f}"),
        Column("trained completion tokens/s", "tokens_per_second", "{:.1f}"),
        Column("speedup", "speedup", "{:.2f}"),
        Column("peak RSS GiB", lambda r: None if r.get("peak_rss") is None else r["peak_rss"] / GIB, "{:.2f}"),
        Column("1-min load (mean)", "load_mean", "{:.2f}"),
        Column("status", "status", text=True),
    ]
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return worker(argv[1:])
    if argv[:1] == ["build"]:
        return build(argv[1:])
    args = parse_args(argv)
    if not Path(args.python).exists():
        raise SystemExit(f"no vLLM interpreter at {args.python}: run `make vllm-env` or pass --python")
    env = vllm_env(args)
    report = Report("generation", args)
    started = time.perf_counter()
    folder = args.cache_dir / args.shapes
    command = module_command(args.python, "benchmarks.generation", "build", folder, args.shapes)
    done, _ = run(command, env, folder, args.timeout)
    if done.returncode != 0 or done.result is None:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"building the models failed (exit {done.returncode})")
    built = done.result
    print(describe(report.head), flush=True)
    print(
        f"{args.shapes} shapes: vocabulary {SHAPES[args.shapes].vocab}, student {built['student_params']:,} "
        f"parameters, teacher {built['teacher_params']:,}; {args.threads} threads; KV cache {args.kv_cache_gib:g} GiB",
        flush=True,
    )
    records = []
    for grad_accum in args.grad_accum:
        for mode in args.modes:
            case_dir = folder / "runs" / f"ga{grad_accum}-{mode}"
            case = Case(
                mode=mode,
                steps=args.steps,
                warmup=args.warmup,
                batch=args.batch,
                grad_accum=grad_accum,
                max_completion_length=args.max_new_tokens,
                threads=args.threads,
                prompt_words=args.prompt_words,
                student=built["student"],
                teacher=built["teacher"],
                tokenizer=built["tokenizer"],
                output_dir=str(case_dir / "trainer"),
            )
            record = {"mode": mode, "grad_accum": grad_accum, "prompts_per_step": args.batch * grad_accum}
            server = start_student_server(args, env, case, case_dir) if mode == "vllm-server" else None
            began = time.perf_counter()
            try:
                command = module_command(args.python, "benchmarks.generation", "worker", case)
                done, load = run(command, env, case_dir, args.timeout)
            finally:
                if server is not None:
                    server.terminate()
                    server.wait(timeout=60)
            record.update(done.result or {}, process_seconds=time.perf_counter() - began)
            record.update(load_before=load[0], load_after=load[-1], load_mean=sum(load) / len(load), load_samples=load)
            if done.returncode != 0 or done.result is None:
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
                record["status"] = f"failed: exit {done.returncode}: {tail} (see {case_dir}/worker.err)"
            elif not record["token_counts_match"]:
                record["status"] = "logged completion_tokens differ from the tokens compute_loss received"
            else:
                record["status"] = "ok"
            records.append(record)
            print(
                f"  ga {grad_accum} {mode:<12} {record['status']}: {fmt(record.get('tokens_per_second'), '.1f')} "
                f"tokens/s, {fmt(record.get('seconds_per_step'), '.1f')} s/step, process "
                f"{record['process_seconds']:.0f} s, 1-min load {record['load_before']:.2f} -> "
                f"{record['load_after']:.2f} (mean {record['load_mean']:.2f})",
                flush=True,
            )
    for record in records:  # vLLM's (and transformers' own, 1.00) over transformers' at the same grad accum
        baseline = [r for r in records if r["mode"] == "transformers" and r["grad_accum"] == record["grad_accum"]]
        if record["status"] == "ok" and baseline and baseline[0]["status"] == "ok":
            record["speedup"] = record["tokens_per_second"] / baseline[0]["tokens_per_second"]
    print("\n" + report.table("steps", records, TABLES))
    wall = time.perf_counter() - started
    print(f"\nwall time {wall:.0f} s; 1-min load average {os.getloadavg()[0]:.2f} at the end")
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())

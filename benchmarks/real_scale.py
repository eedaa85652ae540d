"""Peak memory and time of ONE distillation optimizer step at real shapes: protege's loss modes and TRL 1.8.0's.

Run it with protege's interpreter; `trl-dense` runs in the TRL environment (`make trl-env` creates `.trl-env`):

    python -m benchmarks real_scale --quick                  # smoke run: tiny models, 64 tokens, every mode
    python -m benchmarks real_scale                          # real shapes, 1000 completion tokens, every mode
    python -m benchmarks real_scale --lengths 1000 4000 --modes local-default server-top1
    python -m benchmarks real_scale --lengths 16000 --modes local-chunked server-top1 --mem-budget-gib 21
    python -m benchmarks real_scale --lengths 1000 --modes onpolicy-divergence onpolicy-pg --mem-budget-gib 14

Models, built once into `--cache-dir` (`workers.random_models`: random init, float32): a Qwen2 student of hidden 896,
4 layers, 14 heads (2 key-value), intermediate 4864, tied embeddings; a teacher of hidden 1536, 4 layers, 12 heads (2
key-value), intermediate 8960, untied; a word-level tokenizer of exactly their 151,936 entries. `--quick`: vocabulary
8000, hidden 64 / 128, 2 layers, 64-token completions.

Every case (mode x completion length) is one off-policy step (lmbda 0) on 2 rows of 16 prompt and exactly N
completion tokens (batch 2, grad accum 1), float32, AdamW, learning rate 1e-6, no activation checkpointing (unless
`--activation-checkpointing`), in a fresh worker process (`python -m benchmarks.real_scale worker ...`). The modes
(`MODES`), beta 0.5 unless said: `local-default` (protege's default `loss_top_k` and `loss_chunk_size`),
`local-dense` (full vocabulary, full logits), `local-chunked` (full vocabulary, 256 tokens at a time), `server-top1`
(a teacher server, `loss_top_k=1`), `server-top20` (a teacher server, beta 0, `loss_top_k=20`), `trl-dense` (TRL
1.8.0's trainer, full vocabulary, its only local loss). The server modes start `python -m protege serve-teacher` (a
fresh one per case, with limits large enough for the whole batch in one call); the teacher lives there.

On-policy modes (`Mode.on_policy`) run lmbda 1 instead: the student samples each row's completion with transformers'
`generate` at temperature 1, top_p 1 (the sampler is the trained student itself), exactly N new tokens
(`generation_kwargs={"min_new_tokens": N}` with max_new_tokens N: a random student may sample `<|im_end|>` early),
local teacher, protege's default loss settings (beta 1, `loss_top_k` 1, chunk "auto"): `onpolicy-divergence`
(`on_policy_objective="divergence"`: reverse KL, the divergence whose gradient the policy gradient estimates),
`onpolicy-divergence-full` (the same over the full vocabulary, `loss_top_k` 0) and `onpolicy-pg`
(`"policy_gradient"`, `kl_coef` 1, default discount 0). Their table adds the trainer's logged generation, teacher and
student seconds, and the seconds spent in `sampled_logprobs` (timed from outside): the policy gradient's no-grad pass
over the sampled tokens' log-probs, and the sampled-token KL estimate both objectives log on a logged step.

Memory: the parent samples the resident set of the worker and the server every 0.2 s and kills the worker when the two
pass `--mem-budget-gib` or the machine has less than 0.5 GiB available (reported as killed, with the largest resident
set seen). A finished case reports the worker's `ru_maxrss` as peak RSS, the server's `VmHWM` separately. The worker
reads every weight before the step (`from_pretrained` maps the files, so an unread weight is not resident); the server
does not. The floor is what a step cannot do without: the worker's resident set after its imports, plus the student's
weights, gradients and two AdamW moments (16 bytes a parameter), plus the teacher's weights (4 bytes a parameter; 0 for
the server modes). Overhead = peak - floor. s/step: from the start of training to the end of the step.
"""

from __future__ import annotations

import argparse
import contextlib
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
    Server,
    describe,
    emit_result,
    module_command,
    parse,
    parser,
    read_result,
    setting,
    status_bytes,
    worker_env,
)
from benchmarks.workers import FolderRun, Shapes, build_trainer, qwen2, random_models, train, word_rows

POLL_SECONDS = 0.2
MACHINE_RESERVE = 0.5 * GIB  # kill the worker when the machine has less than this available
REAL = Shapes("real", 151_936, qwen2(896, 4, 14, 2, 4864, tied=True), qwen2(1536, 4, 12, 2, 8960, tied=False))
QUICK = Shapes("quick", 8000, qwen2(64, 2, 4, 2, 256, tied=True), qwen2(128, 2, 4, 2, 512, tied=False))
SERVER = {"teacher_server_timeout": 3600.0, "teacher_server_max_retries": 0}  # a slow answer is a result, not a fault


@dataclasses.dataclass(frozen=True)
class Mode:
    """What a mode trains with: the library, the config settings it changes, whether the teacher is a server."""

    system: str  # "protege" or "trl"
    config: dict
    server: bool = False
    library_defaults: bool = False  # leave loss_top_k (and loss_chunk_size) to the library's defaults
    on_policy: bool = False  # lmbda 1: the student generates every completion (`on_policy_settings`)


MODES = {
    "local-default": Mode("protege", {}, library_defaults=True),
    "local-dense": Mode("protege", {"loss_top_k": 0, "loss_chunk_size": None}),
    "local-chunked": Mode("protege", {"loss_top_k": 0, "loss_chunk_size": 256}),
    "server-top1": Mode("protege", {"loss_top_k": 1, "use_teacher_server": True, **SERVER}, server=True),
    "server-top20": Mode("protege", {"beta": 0.0, "loss_top_k": 20, "use_teacher_server": True, **SERVER}, server=True),
    "trl-dense": Mode("trl", {"loss_top_k": 0}),
    "onpolicy-divergence": Mode("protege", {"beta": 1.0}, library_defaults=True, on_policy=True),
    "onpolicy-divergence-full": Mode("protege", {"beta": 1.0, "loss_top_k": 0}, on_policy=True),
    "onpolicy-pg": Mode(
        "protege",
        {"beta": 1.0, "on_policy_objective": "policy_gradient", "kl_coef": 1.0},
        library_defaults=True,
        on_policy=True,
    ),
}


def on_policy_settings(completion_tokens: int) -> dict:
    """An on-policy mode's `DistillationConfig` settings: every slice sampled by the student itself (top_p 1, so
    the importance weight is 1) and exactly `completion_tokens` new tokens a row, so that the case is the length it
    says (the step's trained tokens are checked against it)."""
    return dict(lmbda=1.0, temperature=1.0, top_p=1.0, generation_kwargs={"min_new_tokens": completion_tokens})


@dataclasses.dataclass(kw_only=True)
class Case(FolderRun):
    """One step of one mode at one completion length; the `RunSettings` part is what `workers.trainer_config` reads."""

    steps: int = setting(1, "optimizer steps (all timed)")
    warmup: int = setting(0, "untimed steps first")
    grad_accum: int = setting(1, "gradient_accumulation_steps")
    lmbda: float = setting(0.0, "0: off-policy, dataset completions only")
    learning_rate: float = setting(1e-6)
    threads: int = setting(2, "torch threads (and OMP_NUM_THREADS)")
    max_completion_length: int = setting(0, "0: completion_tokens")
    max_length: int = setting(0, "0: prompt_tokens + completion_tokens + 16")
    mode: str = setting(help=f"one of {', '.join(MODES)}")
    completion_tokens: int = setting(help="completion length of every row, in tokens (its <|im_end|> included)")
    prompt_tokens: int = setting(16, "prompt length in tokens, chat markers and generation prompt included")
    server_url: str | None = setting(None, "teacher server of the server modes")
    activation_checkpointing: bool = setting(False, "recompute the student's layer activations in backward")

    def __post_init__(self) -> None:
        self.max_completion_length = self.max_completion_length or self.completion_tokens
        self.max_length = self.max_length or self.prompt_tokens + self.completion_tokens + 16


def gib(value: float | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


TABLES = {
    "step": [
        Column("completion tokens", "length"),
        Column("mode", "mode", text=True),
        Column(
            "loss",
            lambda r: f"top_k {r.get('loss_top_k', '?')}, chunk {r.get('loss_chunk_size')}, beta {r.get('beta', '?')}",
            text=True,
        ),
        Column("RSS ready GiB", lambda r: gib(r.get("rss_ready"))),
        Column("peak RSS GiB", lambda r: gib(r.get("peak_rss"))),
        Column("floor GiB", lambda r: gib(r.get("floor"))),
        Column("overhead GiB", lambda r: gib(r.get("overhead"))),
        Column("s/step", "step_seconds", "{:.1f}"),
        Column("loss value", "loss", "{:.4g}"),
        Column("server peak GiB", lambda r: gib(r.get("server_peak_rss"))),
        Column("status", "status", text=True),
    ],
    "on_policy": [
        Column("completion tokens", "length"),
        Column("mode", "mode", text=True),
        Column("objective", lambda r: f"{r.get('on_policy_objective')}, top_k {r.get('loss_top_k')}", text=True),
        Column("peak RSS GiB", lambda r: gib(r.get("peak_rss"))),
        Column("floor GiB", lambda r: gib(r.get("floor"))),
        Column("overhead GiB", lambda r: gib(r.get("overhead"))),
        Column("s/step", "step_seconds", "{:.1f}"),
        Column("generation s", lambda r: logged(r, "time/generation_s"), "{:.1f}"),
        Column("teacher s", lambda r: logged(r, "time/teacher_s"), "{:.1f}"),
        Column("student s", lambda r: logged(r, "time/student_s"), "{:.1f}"),
        Column("PG log-prob pass s", "pg_logprob_s", "{:.2f}"),
        Column("KL estimate s", "kl_estimate_s", "{:.2f}"),
        Column("loss value", "loss", "{:.4g}"),
        Column("sampled KL a token", lambda r: logged(r, "on_policy_reverse_kl_estimate"), "{:.4g}"),
        Column("min length", lambda r: logged(r, "completions/min_length"), "{:.0f}"),
        Column("status", "status", text=True),
    ],
}


def logged(record: dict, key: str) -> float | None:
    """A figure of the trainer's log of the step (on-policy modes)."""
    return (record.get("log") or {}).get(key)


# ---------------------------------------------------------------------------------------------------------------------
# Parent: one case is the worker (and the teacher server) under a memory watch
# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    options = parser("real_scale", __doc__, quick="vocabulary 8000, hidden 64, 2 layers, 64 tokens")
    options.add_argument("--lengths", type=int, nargs="+", help="completion tokens per row (default 1000; quick 64)")
    options.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES), help="default: all")
    options.add_argument("--cache-dir", type=Path, default=Path("/tmp/protege_real_scale"), help="models and runs")
    options.add_argument("--mem-budget-gib", type=float, default=21.0, help="kill a case whose worker + server pass it")
    options.add_argument("--threads", type=int, default=2, help="torch threads of the worker and the server")
    options.add_argument("--activation-checkpointing", action="store_true", help="recompute the student's activations")
    options.add_argument("--python", default=sys.executable, help="interpreter for protege (default: this one)")
    options.add_argument("--trl-python", default=str(REPO / ".trl-env" / "bin" / "python"), help="TRL's interpreter")
    args = options.parse_args(argv)
    args.shapes = QUICK if args.quick else REAL
    args.lengths = args.lengths or ([64] if args.quick else [1000])
    return args


def watch(argv: list[str], env: dict, folder: Path, budget: float, server_pid: int | None) -> tuple:
    """Run the worker to its end, or kill it when it and the server pass `budget` bytes; its output goes to files.

    Returns the `Finished` run, the largest resident sets sampled (worker, server) and why it was killed.
    """
    import psutil

    out, err = folder / "worker.out", folder / "worker.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        worker = subprocess.Popen(argv, stdout=stdout, stderr=stderr, env=env, cwd=folder)
        processes = [psutil.Process(worker.pid)] + ([psutil.Process(server_pid)] if server_pid else [])
        peaks, killed = [0] * len(processes), None
        while worker.poll() is None:
            now = []
            for process in processes:
                try:
                    now.append(process.memory_info().rss)
                except psutil.Error:  # the worker just exited
                    now.append(0)
            peaks = [max(a, b) for a, b in zip(peaks, now)]
            if sum(now) > budget:
                killed = f"over budget: {sum(now) / GIB:.1f} GiB > {budget / GIB:.1f} GiB"
            elif psutil.virtual_memory().available < MACHINE_RESERVE:
                killed = f"machine memory low ({psutil.virtual_memory().available / GIB:.2f} GiB available)"
            if killed:
                worker.kill()
                worker.wait()
                break
            time.sleep(POLL_SECONDS)
    text = out.read_text()
    finished = Finished(argv, worker.returncode, text, err.read_text(), read_result(text))
    return finished, peaks + [None] * (2 - len(peaks)), killed


def run_case(case: Case, args: argparse.Namespace, built: dict, folder: Path) -> dict:
    """One mode at one length in a fresh worker (and server); the record that goes into the table."""
    mode = MODES[case.mode]
    python = args.trl_python if mode.system == "trl" else args.python
    record = {"length": case.completion_tokens, "mode": case.mode, "load_before": os.getloadavg()[0]}
    with contextlib.ExitStack() as stack:
        server = None
        if mode.server:
            limits = ["--max-model-len", case.max_length, "--max-batch-tokens", case.batch * case.max_length]
            server = stack.enter_context(Server(built["teacher"], True, folder, limits))
            case.server_url = server.url
            record["server_rss_ready"] = status_bytes("VmHWM", server.process.pid)
        started = time.perf_counter()
        argv = module_command(python, "benchmarks.real_scale", "worker", case)
        env = worker_env(mode.system == "trl")  # the TRL interpreter sees only its own environment
        server_pid = server.process.pid if server else None
        done, (worker_peak, server_peak), killed = watch(argv, env, folder, args.mem_budget_gib * GIB, server_pid)
        record["process_seconds"] = time.perf_counter() - started
        if server:
            record["server_peak_rss"] = status_bytes("VmHWM", server.process.pid) or server_peak
    result = done.result or {}
    record.update(result, load_after=os.getloadavg()[0], sampled_peak_rss=worker_peak, sampled_server_rss=server_peak)
    if "rss_imports" in result:
        record["floor"] = result["rss_imports"] + 16 * result["student_params"] + 4 * result["teacher_params"]
    if killed:
        record.update(status=f"killed: {killed}", peak_rss=worker_peak)
    elif done.returncode != 0 or not result.get("finished"):
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:160]
        cause = "SIGKILL (OOM killer?)" if done.returncode == -9 else f"exit {done.returncode}: {tail}"
        record.update(status=f"failed: {cause}", peak_rss=worker_peak)
    elif result["completion_tokens_trained"] != case.batch * case.completion_tokens:
        trained = result["completion_tokens_trained"]
        record["status"] = f"trained {trained} tokens, not {case.batch} x {case.completion_tokens}"
    else:
        record["status"] = "ok"
    if record.get("floor") and record.get("peak_rss"):
        record["overhead"] = record["peak_rss"] - record["floor"]
    return record


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return worker(argv[1:])
    args = parse_args(argv)
    threads = str(args.threads)
    os.environ.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")
    os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    if "trl-dense" in args.modes and not Path(args.trl_python).exists():
        raise SystemExit(f"no TRL interpreter at {args.trl_python}: run `make trl-env` or pass --trl-python")
    folder = args.cache_dir / args.shapes.name
    built = random_models(folder, args.shapes)
    report = Report("real_scale", args)
    print(describe(report.head), flush=True)
    print(
        f"{args.shapes.name} shapes: vocabulary {args.shapes.vocab}, student {built['student_params']:,} parameters, "
        f"teacher {built['teacher_params']:,}; memory budget {args.mem_budget_gib} GiB; {args.threads} threads",
        flush=True,
    )
    records = []
    for length in args.lengths:
        for mode in args.modes:
            case_dir = folder / "runs" / f"{length}-{mode}"
            case_dir.mkdir(parents=True, exist_ok=True)
            case = Case(
                mode=mode,
                completion_tokens=length,
                student=built["student"],
                teacher=built["teacher"],
                tokenizer=built["tokenizer"],
                output_dir=str(case_dir / "trainer"),
                threads=args.threads,
                activation_checkpointing=args.activation_checkpointing,
                lmbda=1.0 if MODES[mode].on_policy else 0.0,
            )
            records.append(run_case(case, args, built, case_dir))
            print(
                f"  {length:>6} {mode:<14} {records[-1]['status']}: peak {gib(records[-1].get('peak_rss'))} GiB, "
                f"{records[-1].get('step_seconds') or 0:.1f} s/step, load {records[-1]['load_before']:.2f} -> "
                f"{records[-1]['load_after']:.2f} ({case_dir})",
                flush=True,
            )
    for name, on in (("step", False), ("on_policy", True)):
        if rows := [r for r in records if MODES[r["mode"]].on_policy == on]:
            print("\n" + report.table(name, rows, TABLES))
    return 0 if all(r["status"] == "ok" for r in records) else 1


# ---------------------------------------------------------------------------------------------------------------------
# Worker: `python -m benchmarks.real_scale worker FLAGS`, standard library at import (TRL's environment runs it)
# ---------------------------------------------------------------------------------------------------------------------


def conversations_file(path: Path, rows: int, prompt_tokens: int, completion_tokens: int, tokenizer: str) -> Path:
    """`rows` of `conversations` (seed 0) written as JSON lines to `path`, the dataset file a `protege` command reads;
    `tokenizer` is `random_models`' tokenizer folder."""
    import json
    from types import SimpleNamespace

    from transformers import PreTrainedTokenizerFast

    case = SimpleNamespace(batch=rows, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, seed=0)
    made = conversations(case, PreTrainedTokenizerFast.from_pretrained(tokenizer))
    path.write_text("".join(json.dumps(row) + "\n" for row in made))
    return path


def conversations(case: Case, tokenizer) -> list[dict]:
    """`case.batch` rows of random word tokens, their rendered prompt and completion lengths checked (the chat
    template puts `<|im_start|>` before and `<|im_end|>` after each turn)."""
    texts = word_rows(tokenizer, case.batch, (case.prompt_tokens - 3, case.completion_tokens - 1), case.seed)
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]} for p, c in texts]
    for row in rows:
        prompt_text = tokenizer.apply_chat_template(row["messages"][:1], tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        prompt_ids, full_ids = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (prompt_text, full_text))
        lengths = (len(prompt_ids), len(full_ids) - len(prompt_ids))
        if lengths != (case.prompt_tokens, case.completion_tokens) or full_ids[: len(prompt_ids)] != prompt_ids:
            raise SystemExit(f"rendered prompt/completion are {lengths} tokens, not the case's")
    return rows


def load_models(case: Case, mode: Mode) -> tuple:
    """The student and (for a local mode) the teacher, float32, every weight read once."""
    import torch
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(case.student, dtype=torch.float32)
    teacher = None
    if not mode.server:
        teacher = AutoModelForCausalLM.from_pretrained(case.teacher, dtype=torch.float32)
        # TRL checks the teacher's tokenizer, loaded with AutoTokenizer from _name_or_path: point it where that works.
        teacher.config._name_or_path = case.tokenizer
    # A mapped weight is resident only once read, and one step reads ~2,000 of the teacher's 151,936 embedding rows:
    # read every weight now, as a long run will have, so that the resident set can be compared with the floor.
    with torch.no_grad():
        for model in [m for m in (student, teacher) if m is not None]:
            for tensor in model.state_dict().values():
                tensor.sum()
    return student, teacher


def timed_sampled_logprobs() -> dict[str, float]:
    """Seconds in protege's `sampled_logprobs` (every sampled token's log-prob, no grad), by caller: the policy
    gradient's pass before its weighted log-prob pass (`pg_logprob_s`), and the sampled-token KL estimate a logged
    on-policy step adds under either objective (`kl_estimate_s`). Timed by wrapping each module's name for it."""
    import protege.objective
    import protege.policy_gradient

    seconds: dict[str, float] = {}
    for module, key in ((protege.policy_gradient, "pg_logprob_s"), (protege.objective, "kl_estimate_s")):
        seconds[key] = 0.0

        def wrapper(*args, _original=module.sampled_logprobs, _key=key, **kwargs):
            started = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                seconds[_key] += time.perf_counter() - started

        module.sampled_logprobs = wrapper
    return seconds


def worker(argv: list[str]) -> int:
    """One step; `rss_imports` after the imports, `rss_ready` with every weight read and the trainer built."""
    for key, value in (("HF_HUB_DISABLE_TELEMETRY", "1"), ("HF_HUB_OFFLINE", "1"), ("TRL_EXPERIMENTAL_SILENCE", "1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    case = parse(Case, argv, "one case of benchmarks/real_scale.py")
    mode = MODES[case.mode]

    import datasets
    import torch
    import transformers
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from transformers.utils import logging as hf_logging

    if mode.system == "trl":
        import trl as library
        from trl.experimental.distillation import DistillationConfig, DistillationTrainer
    else:
        import protege as library
        from protege import DistillationConfig, DistillationTrainer

    torch.set_num_threads(case.threads)
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    rss_imports = status_bytes("VmRSS")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(case.tokenizer)  # AutoTokenizer would rebuild Qwen2's BPE
    train_dataset = datasets.Dataset.from_list(conversations(case, tokenizer))
    student, teacher = load_models(case, mode)

    def configure(**shared):
        """`workers.trainer_config`'s settings, then the mode's."""
        if mode.library_defaults:
            shared.pop("loss_top_k")
        if mode.server:
            shared["teacher_model_server_url"] = case.server_url
        shared["activation_checkpointing"] = case.activation_checkpointing
        if mode.on_policy:
            shared.update(on_policy_settings(case.completion_tokens))
        return DistillationConfig(**{**shared, **mode.config})

    inputs = dict(model=student, teacher_model=teacher, train_dataset=train_dataset, processing_class=tokenizer)
    trainer, timer, init_warnings = build_trainer(
        case, case.mode, configure, DistillationTrainer, TrainerCallback, **inputs
    )
    report = {
        "mode": case.mode,
        "system": mode.system,
        "library_version": library.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "student_params": sum(p.numel() for p in student.parameters()),  # tied weights counted once
        "teacher_params": 0 if teacher is None else sum(p.numel() for p in teacher.parameters()),
        "rss_imports": rss_imports,
        "rss_ready": status_bytes("VmRSS"),
        "loss_top_k": trainer.args.loss_top_k,
        "loss_chunk_size": getattr(trainer.args, "loss_chunk_size", None),
        "beta": trainer.args.beta,
        "on_policy_objective": getattr(trainer.args, "on_policy_objective", None),
        "objective": repr(getattr(trainer, "objective", None)),
        "init_warnings": init_warnings,
        "config": dataclasses.asdict(case),
        "finished": False,
    }
    emit_result(report)  # what the parent reports if the step is killed
    seconds = timed_sampled_logprobs() if mode.system == "protege" else {}
    train_seconds, logs = train(trainer)
    log = logs.get(case.steps, {})
    report.update(
        peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
        step_seconds=(timer.end[case.steps] - timer.end[0]) / case.steps,
        train_seconds=train_seconds,
        completion_tokens_trained=sum(trainer.step_tokens.values()),
        loss=log.get("loss"),
        log=log,
        finished=True,
        **{key: value / case.steps for key, value in seconds.items()},
    )
    emit_result(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

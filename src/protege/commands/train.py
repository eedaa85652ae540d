"""`protege train`: TRL's distillation example script flags, with HfArgumentParser, plus `--config FILE.yaml`."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
import warnings
from dataclasses import dataclass, field

import yaml
from transformers import HfArgumentParser, TrainingArguments
from transformers.hf_argparser import string_to_bool

from ..choices import DTYPE_NAMES
from ..config import DistillationConfig
from ..model_source import check_model_source
from ..teacher.spec import SINGLE, needs_no_teacher
from .errors import UsageError, report
from .interrupts import Interrupted, interruptible
from .train_quick import output_dir_notice, remember, resume_value, unknown_arguments, unknown_keys


@dataclass
class ScriptArguments:
    """Which dataset to train and evaluate on (TRL's ScriptArguments)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset name, a json/jsonl/parquet/csv file, or a folder saved with `datasets`."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name on the hub."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(
        default="test", metadata={"help": "Split to evaluate on; falls back to 'validation', then 'dev'."}
    )
    dataset_streaming: bool = field(default=False, metadata={"help": "Accepted for TRL compatibility; unused."})


@dataclass
class ModelConfig:
    """The student model and its LoRA adapter (TRL's ModelConfig)."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "Student: hub id or local path."})
    model_revision: str = field(default="main", metadata={"help": "Revision of the student."})
    dtype: str = field(
        default="float32",
        metadata={
            "help": "Weights dtype for student and teacher.",
            "choices": list(DTYPE_NAMES),
        },
    )
    attn_implementation: str | None = field(default=None, metadata={"help": "Attention implementation, e.g. sdpa."})
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of the full student."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "Modules to adapt."})
    lora_target_parameters: list[str] | None = field(default=None, metadata={"help": "Parameters to adapt."})
    lora_modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained in full too."})
    lora_task_type: str = field(default="CAUSAL_LM", metadata={"help": "PEFT task type."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA."})
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load in 8 bits (needs bitsandbytes)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load in 4 bits (needs bitsandbytes)."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "4-bit quantisation type."})
    use_bnb_nested_quant: bool = field(default=False, metadata={"help": "Nested 4-bit quantisation."})
    bnb_4bit_quant_storage: str | None = field(default=None, metadata={"help": "Storage dtype of 4-bit weights."})


TRAINING_GROUP = "training (transformers TrainingArguments)"
# --help lists the flags in these groups, in this order: protege's own first, then transformers' TrainingArguments.
HELP_GROUPS = {
    "distillation": "The objective: which divergence, over which tokens, on whose completions, and the lengths.",
    "teacher": "The teacher: a local model, or a teacher server that scores for it.",
    "generation": "The student's on-policy completions: sampling, vLLM, and the completions table.",
    "model": "The student, and its LoRA adapter.",
    "dataset": "What to train and evaluate on.",
    TRAINING_GROUP: "Optimizer, schedule, batch sizes, precision, logging, saving, hub.",
}
TRAINING_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainingArguments))
GENERATION_FIELDS = frozenset(
    {"num_generations", "generation_batch_size", "top_p", "top_k", "min_p", "repetition_penalty", "generation_kwargs"}
    | {"use_vllm", "log_completions", "log_completions_steps", "num_completions_to_print"}
)
# Listed first within their groups (the rest keep the dataclasses' order): the flags a distillation run sets.
LEADING_FIELDS = ("lmbda", "beta", "temperature", "loss_top_k", "loss_add_tail", "teacher_model_name_or_path")
USAGE = (
    "protege train [-h] [--config FILE.yaml] --model_name_or_path STUDENT --teacher_model_name_or_path TEACHER "
    "--dataset_name DATASET [--FLAG [VALUE] ...]"
)


def help_group(dtype: type, name: str) -> str:
    """The --help group of a field. DistillationConfig's own fields are sorted by prefix, so a field added later
    lands in a sensible group (distillation by default); what it inherits from TrainingArguments goes last."""
    if dtype is ScriptArguments:
        return "dataset"
    if dtype is ModelConfig or name in ("model_init_kwargs", "trust_remote_code"):
        return "model"
    if name in TRAINING_FIELDS or name == "overwrite_output_dir" or not issubclass(dtype, DistillationConfig):
        return TRAINING_GROUP
    if name.startswith("teacher_") or name == "use_teacher_server":
        return "teacher"
    if name.startswith("vllm_") or name in GENERATION_FIELDS:
        return "generation"
    return "distillation"


def bool_or_word(value: str) -> bool | str:
    """A `str | bool` field's value (include_num_input_tokens_seen: true, false, 'all', 'non_padding')."""
    try:
        return string_to_bool(value)
    except argparse.ArgumentTypeError:
        return value


class TrainArgumentParser(HfArgumentParser):
    """HfArgumentParser with the flags in `HELP_GROUPS`, every boolean flag usable bare, and one-line errors.

    HfArgumentParser puts every field of a dataclass without `_argument_group_name` in one flat list (TrainingArguments'
    ~200 flags before the distillation ones), and gives a `bool | None` field (bf16, tf32, disable_tqdm...) no bare
    form, so `--bf16` alone fails while `--fp16` works. TRL's documented commands use bare boolean flags.
    """

    def __init__(self, dataclass_types, **kwargs) -> None:
        super().__init__(dataclass_types, **kwargs)
        self._accept_bare_booleans()

    def _add_dataclass_arguments(self, dtype) -> None:
        if not hasattr(self, "_help_groups"):  # created once, before any flag, so groups print in HELP_GROUPS order
            self._help_groups = {title: self.add_argument_group(title, text) for title, text in HELP_GROUPS.items()}
        hints = typing.get_type_hints(dtype)
        leading = {name: rank for rank, name in enumerate(LEADING_FIELDS)}
        for dataclass_field in sorted(dataclasses.fields(dtype), key=lambda f: leading.get(f.name, len(leading))):
            if dataclass_field.init:
                dataclass_field.type = hints[dataclass_field.name]
                group = self._help_groups[help_group(dtype, dataclass_field.name)]
                self._parse_dataclass_field(group, dataclass_field)

    def _accept_bare_booleans(self) -> None:
        """`--flag`, `--flag true` and `--flag false` for every boolean field, whatever its default."""
        word_fields = {
            name
            for dtype in self.dataclass_types
            for name, hint in typing.get_type_hints(dtype).items()
            if {bool, str} <= set(typing.get_args(hint))
        }
        for action in self._actions:
            if action.type is string_to_bool:
                if action.nargs is None:
                    action.nargs, action.const = "?", True
                if action.dest in word_fields:
                    action.type = bool_or_word

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(message)

    def long_flags(self) -> list[str]:
        return [option for action in self._actions for option in action.option_strings if option.startswith("--")]


def build_parser(prog: str = "protege train") -> TrainArgumentParser:
    parser = TrainArgumentParser(
        (ScriptArguments, DistillationConfig, ModelConfig),
        prog=prog,
        usage=USAGE,
        description="Distil a student from a teacher. Flags follow TRL's distillation script; a boolean flag may be "
        "given bare (--bf16) or with a value (--bf16 false).",
    )
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE.yaml",
        help="YAML file of the same keys as the flags (flags override it).",
    )
    parser.add_argument(
        "--teacher",
        action="append",
        metavar="NAME=PATH_OR_URL",
        help="One of several teachers, repeatable: a model (hub id or folder) or a teacher server (http:// or "
        "https://) under NAME, which the dataset's teacher_column names for the rows it scores.",
    )
    return parser


def named_teachers(argv: list[str]) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """argv without its `--teacher NAME=PATH_OR_URL` flags, and the local teachers and servers they name."""
    rest, local, servers = [], {}, {}
    items = iter(argv)
    for item in items:
        if item != "--teacher" and not item.startswith("--teacher="):
            rest.append(item)
            continue
        value = item.split("=", 1)[1] if "=" in item else next(items, "")
        name, _, where = value.partition("=")
        if not name or not where:
            raise UsageError(f"--teacher takes NAME=PATH_OR_URL, got {value!r}")
        if name in local or name in servers:
            raise UsageError(f"--teacher {name!r} is given twice")
        (servers if where.startswith(("http://", "https://")) else local)[name] = where
    return rest, local, servers


def parse(argv: list[str]) -> tuple[ScriptArguments, DistillationConfig, ModelConfig]:
    parser = build_parser()
    known = {f.name for cls in (ScriptArguments, DistillationConfig, ModelConfig) for f in dataclasses.fields(cls)}
    remember(parser.format_help(), parser.long_flags(), sorted(known))  # for the next run's quick checks
    config_path = None
    if "--config" in argv:
        position = argv.index("--config")
        if position + 1 >= len(argv):
            raise UsageError("--config needs a YAML file")
        config_path = argv[position + 1]
        argv = argv[:position] + argv[position + 2 :]
    argv, local_teachers, teacher_servers = named_teachers(argv)
    if config_path is not None:
        try:
            with open(config_path) as handle:
                values = yaml.safe_load(handle) or {}
        except OSError as error:
            raise UsageError(f"cannot read config file {config_path}: {error.strerror}") from None
        except yaml.YAMLError as error:
            raise UsageError(f"config file {config_path} is not valid YAML: {str(error).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise UsageError(f"config file {config_path} must hold a mapping of keys to values")
        problem = unknown_keys(config_path, values, sorted(known))
        if problem:
            raise UsageError(problem)
        parser.set_defaults(**values)
    if local_teachers or teacher_servers:
        if "--teacher_model_name_or_path" in argv or "--teacher_model_server_url" in argv:
            raise UsageError("give the teachers with --teacher NAME=PATH_OR_URL or with their own flags, not both")
        parser.set_defaults(
            teacher_model_name_or_path=local_teachers or None, teacher_model_server_url=teacher_servers or None
        )
    _, remaining = parser.parse_known_args(argv)  # before the dataclasses, so a typo is reported as one
    if remaining:
        raise UsageError(unknown_arguments(parser.long_flags(), remaining))
    try:
        script_args, training_args, model_args, *_ = parser.parse_args_into_dataclasses(
            args=argv, look_for_args_file=False
        )
    except ValueError as error:  # a DistillationConfig rule, or a value argparse could not convert
        raise UsageError(str(error)) from None
    if not model_args.model_name_or_path:
        raise UsageError("--model_name_or_path is required (the student)")
    if not script_args.dataset_name:
        raise UsageError("--dataset_name is required")
    cache_alone = training_args.teacher_cache and training_args.lmbda == 0  # every slice from the cache
    no_teacher = cache_alone or needs_no_teacher(training_args)  # or rewards alone
    if not training_args.teacher_model_name_or_path and not training_args.use_teacher_server and not no_teacher:
        raise UsageError(
            "--teacher_model_name_or_path is required (or --use_teacher_server with its URL, or --teacher_cache with "
            "--lmbda 0; or, for task rewards alone, --on_policy_objective policy_gradient --kl_coef 0 with --lmbda 1)"
        )
    return script_args, training_args, model_args


def peft_config(model_args: ModelConfig):
    if not model_args.use_peft:
        return None
    try:
        from peft import LoraConfig
    except ImportError:
        raise UsageError("--use_peft needs the peft package: pip install 'protege[peft]'") from None
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules,
        target_parameters=model_args.lora_target_parameters,
        modules_to_save=model_args.lora_modules_to_save,
        task_type=model_args.lora_task_type,
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
        bias="none",
    )


def model_kwargs(model_args: ModelConfig, revision: str | None) -> dict:
    kwargs = {"dtype": model_args.dtype}
    if revision:
        kwargs["revision"] = revision
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if model_args.load_in_4bit or model_args.load_in_8bit:
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise UsageError("--load_in_4bit / --load_in_8bit need the bitsandbytes package") from None
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=model_args.load_in_4bit,
            load_in_8bit=model_args.load_in_8bit,
            bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
            bnb_4bit_quant_storage=model_args.bnb_4bit_quant_storage,
        )
    return kwargs


def check_models(student: str, args: DistillationConfig) -> None:
    """The student's and the local teacher's names point at models (see `protege.model_source`), with the init
    kwargs they will be loaded with, so a wrong name fails before the dataset and the weights load."""
    from ..models import parse_init_kwargs

    check_model_source(student, "student", parse_init_kwargs(args.model_init_kwargs, "model_init_kwargs"))
    teachers = local_teachers(args)
    if teachers:
        teacher_kwargs = parse_init_kwargs(args.teacher_model_init_kwargs, "teacher_model_init_kwargs")
        if args.teacher_model_revision is not None:
            teacher_kwargs.setdefault("revision", args.teacher_model_revision)
        for name, path in teachers.items():
            check_model_source(path, "teacher" if name == SINGLE else f'teacher "{name}"', teacher_kwargs)


def local_teachers(args: DistillationConfig) -> dict[str, str]:
    """The teachers the command loads itself, by name (servers are connected to, not loaded)."""
    named = args.teacher_model_name_or_path
    if isinstance(named, dict):
        return named
    return {} if args.use_teacher_server or not named else {SINGLE: named}


def check_output_dir(args: DistillationConfig) -> str:
    """The line that says where outputs go, or a UsageError for an output_dir an earlier run holds (see
    `train_quick.output_dir_notice`)."""
    return output_dir_notice(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)


def build(argv: list[str]):
    """The trainer a command line describes, its config, what to resume from and the output folder's line; every
    check that needs no weights runs first, so a mistake costs a second, not a model load."""
    from ..checkpoints import newest_complete
    from ..trainer import DistillationTrainer
    from .datasets import eval_split, load_any

    script_args, args, model_args = parse(argv)
    if args.model_init_kwargs is None:
        args.model_init_kwargs = model_kwargs(model_args, model_args.model_revision)
    if args.teacher_model_init_kwargs is None and local_teachers(args):
        args.teacher_model_init_kwargs = model_kwargs(model_args, args.teacher_model_revision)
    check_models(model_args.model_name_or_path, args)  # first: a wrong name fails at once, in one line
    output_notice = check_output_dir(args)
    dataset = load_any(script_args.dataset_name, script_args.dataset_config)
    if script_args.dataset_train_split not in dataset:
        raise UsageError(
            f"dataset {script_args.dataset_name} has no split {script_args.dataset_train_split!r} "
            f"(splits: {sorted(dataset)})"
        )
    test_split = eval_split(dataset, script_args.dataset_test_split) if args.eval_strategy != "no" else None
    resume = resume_value(args.resume_from_checkpoint)
    if resume is True and newest_complete(args.output_dir) is None:
        raise UsageError(f"--resume_from_checkpoint: no complete checkpoint in {args.output_dir}")
    trainer = DistillationTrainer(
        model=model_args.model_name_or_path,
        teacher_model=None,  # the config names every teacher (teacher.spec.teacher_specs)
        args=args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[test_split] if test_split else None,
        peft_config=peft_config(model_args),
    )
    return trainer, script_args, resume, output_notice


def run(argv: list[str]) -> int:
    from ..http_client import ServerError
    from ..metrics import NonFiniteLossError

    trainer = None
    with interruptible():
        try:
            try:
                trainer, script_args, resume, output_notice = build(argv)
            except (ValueError, OSError, ServerError) as error:
                return report("train", error)
            args = trainer.args
            if args.process_index == 0:
                print(output_notice, file=sys.stderr)
            try:
                trainer.train(resume_from_checkpoint=resume)
            except (ServerError, NonFiniteLossError) as error:  # the last checkpoint is intact and resumable
                return report("train", error)
            trainer.save_model(args.output_dir)
            if args.push_to_hub:
                trainer.push_to_hub(dataset_name=script_args.dataset_name)
        except Interrupted as interrupt:
            if trainer is None or trainer.args.process_index == 0:
                print(where_it_stands(interrupt, trainer), file=sys.stderr)
            return interrupt.exit_code
    if args.process_index == 0:
        print(finished(args, script_args), file=sys.stderr)
    return 0


def where_it_stands(interrupt: Interrupted, trainer) -> str:
    """One line for an interrupted run: the step it reached, and the checkpoint a resume would take, if any."""
    from ..checkpoints import newest_complete
    from ..progress import close_progress

    if trainer is None:
        return f"protege train: interrupted ({interrupt.name}) before training started; nothing was written"
    close_progress(trainer)  # the bar's last state first, then this line under it
    with warnings.catch_warnings():  # a save cut short leaves a staging folder: the resume passes over it, said here
        warnings.simplefilter("ignore")
        checkpoint = newest_complete(trainer.args.output_dir)
    step = trainer.state.global_step
    if checkpoint is None:
        return (
            f"protege train: interrupted ({interrupt.name}) at step {step}; no complete checkpoint in "
            f"{os.path.abspath(trainer.args.output_dir)} yet, so a rerun starts from the beginning"
        )
    return (
        f"protege train: interrupted ({interrupt.name}) at step {step}; last complete checkpoint: "
        f"{os.path.abspath(checkpoint)}; resume with --resume_from_checkpoint true"
    )


def finished(args: DistillationConfig, script_args: ScriptArguments) -> str:
    """Where the trained student went, and the command that compares it with its teacher."""
    folder = os.path.abspath(args.output_dir)
    line = f"protege train: done; the trained student is in {folder}"
    if args.use_teacher_server or not isinstance(args.teacher_model_name_or_path, str):
        return line
    return (
        f"{line}. Compare it with its teacher: protege eval --model {folder} --teacher "
        f"{args.teacher_model_name_or_path} --dataset_name {script_args.dataset_name}"
    )

"""`protege train`: TRL's distillation example script flags, with HfArgumentParser, plus `--config FILE.yaml`."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field

import yaml

from ..config import DistillationConfig


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
            "choices": ["auto", "bfloat16", "float16", "float32"],
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


class UsageError(ValueError):
    """A problem with what the user asked for: printed as one line, exit code 2."""


def build_parser(prog: str = "protege train"):
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        (ScriptArguments, DistillationConfig, ModelConfig),
        prog=prog,
        description="Distil a student from a teacher. Flags follow TRL's distillation script.",
    )
    parser.add_argument("--config", default=None, help="YAML file of the same keys as the flags (flags override it).")

    def one_line_error(message: str):
        raise UsageError(message)

    parser.error = one_line_error
    return parser


def parse(argv: list[str]) -> tuple[ScriptArguments, DistillationConfig, ModelConfig]:
    parser = build_parser()
    known = {f.name for cls in (ScriptArguments, DistillationConfig, ModelConfig) for f in dataclasses.fields(cls)}
    config_path = None
    if "--config" in argv:
        position = argv.index("--config")
        if position + 1 >= len(argv):
            raise UsageError("--config needs a YAML file")
        config_path = argv[position + 1]
        argv = argv[:position] + argv[position + 2 :]
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
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"unknown key(s) in {config_path}: {', '.join(unknown)}")
        parser.set_defaults(**values)
    try:
        script_args, training_args, model_args, *_ = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:  # a DistillationConfig rule, or a value argparse could not convert
        raise UsageError(str(error)) from None
    if not model_args.model_name_or_path:
        raise UsageError("--model_name_or_path is required (the student)")
    if not script_args.dataset_name:
        raise UsageError("--dataset_name is required")
    if not training_args.teacher_model_name_or_path and not training_args.use_teacher_server:
        raise UsageError("--teacher_model_name_or_path is required (or --use_teacher_server with its URL)")
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


def run(argv: list[str]) -> int:
    from ..trainer import DistillationTrainer
    from .datasets import eval_split, load_any

    try:
        script_args, args, model_args = parse(argv)
        dataset = load_any(script_args.dataset_name, script_args.dataset_config)
        if script_args.dataset_train_split not in dataset:
            raise UsageError(
                f"dataset {script_args.dataset_name} has no split {script_args.dataset_train_split!r} "
                f"(splits: {sorted(dataset)})"
            )
        test_split = eval_split(dataset, script_args.dataset_test_split) if args.eval_strategy != "no" else None
        if args.model_init_kwargs is None:
            args.model_init_kwargs = model_kwargs(model_args, model_args.model_revision)
        if args.teacher_model_init_kwargs is None and not args.use_teacher_server:
            args.teacher_model_init_kwargs = model_kwargs(model_args, args.teacher_model_revision)
        trainer = DistillationTrainer(
            model=model_args.model_name_or_path,
            teacher_model=None if args.use_teacher_server else args.teacher_model_name_or_path,
            args=args,
            train_dataset=dataset[script_args.dataset_train_split],
            eval_dataset=dataset[test_split] if test_split else None,
            peft_config=peft_config(model_args),
        )
    except (ValueError, OSError) as error:
        print(f"protege train: error: {error}", file=sys.stderr)
        return 2
    trainer.train()
    trainer.save_model(args.output_dir)
    if args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return 0

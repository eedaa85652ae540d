"""`protege train` answers --help, a mistyped flag or YAML key, and a missing model folder or dataset file before it
imports torch and transformers (10-14 s on a loaded 2-core machine, about 7 s on a quiet one).

The flags are those of `DistillationConfig` (a transformers `TrainingArguments`), so building the parser needs those
imports. The first full parse therefore keeps what the quick checks need, its help text, its flags and its YAML keys,
in a cache file named by a fingerprint of what the flags come from: the installed transformers version and the
sources of protege that declare them. Later runs read it in milliseconds; a run without it (the first, or after an
upgrade) takes the full path, which makes the same checks with the same messages.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from importlib import metadata
from pathlib import Path

from .errors import UsageError, report

# The sources whose fields and choices become `protege train`'s flags and help.
FLAG_SOURCES = ("config.py", "choices.py", "commands/train.py")
DATASET_FILES = (".json", ".jsonl", ".parquet", ".csv")  # what `datasets.load_any` reads as a file
PACKAGE = Path(__file__).resolve().parent.parent


def fingerprint() -> str:
    """Changes whenever the flags or their help can: another transformers, or an edited protege source."""
    digest = hashlib.sha256(metadata.version("transformers").encode())
    for name in FLAG_SOURCES:
        digest.update((PACKAGE / name).read_bytes())
    return digest.hexdigest()[:32]


def cache_file() -> Path:
    root = os.environ.get("PROTEGE_CACHE_DIR") or Path.home() / ".cache" / "protege"
    return Path(root) / "train_cli" / f"{fingerprint()}.json"


def remember(help_text: str, flags: list[str], keys: list[str]) -> None:
    """Keep what the quick checks need (written whole or not at all; a read-only home only loses the speed-up)."""
    path = cache_file()
    if path.exists():
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.part")
        partial.write_text(json.dumps({"help": help_text, "flags": sorted(flags), "keys": sorted(keys)}))
        os.replace(partial, path)
    except OSError:
        pass


def recalled() -> dict | None:
    try:
        return json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return None


def did_you_mean(word: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {match[0]}?)" if match else ""


def is_number(text: str) -> bool:
    """A negative number after an unknown flag is its value, not another flag."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def unknown_arguments(known_flags: list[str], remaining: list[str]) -> str:
    """One line for what the parser did not take: each unknown flag with the closest real one, or stray values."""
    flags = [item.split("=", 1)[0] for item in remaining if item.startswith("-") and not is_number(item)]
    if not flags:
        return f"unexpected value(s) {' '.join(remaining)}: no flag takes them"
    named = ", ".join(f"{flag}{did_you_mean(flag, known_flags)}" for flag in flags)
    return f"unknown flag{'s' if len(flags) > 1 else ''} {named}"


def unknown_keys(path: str, keys, known: list[str]) -> str | None:
    unknown = sorted(set(keys) - set(known))
    if not unknown:
        return None
    named = ", ".join(f"{key}{did_you_mean(key, sorted(known))}" for key in unknown)
    return f"unknown key(s) in {path}: {named}"


def flag_value(argv: list[str], flag: str) -> str | None:
    for i, item in enumerate(argv):
        if item == flag and i + 1 < len(argv):
            return argv[i + 1]
        if item.startswith(f"{flag}="):
            return item.split("=", 1)[1]
    return None


def resume_value(flag: str | None) -> str | bool | None:
    """--resume_from_checkpoint: a folder, true/yes/1 for the newest complete checkpoint in output_dir, or false/no/0
    for none."""
    word = (flag or "").strip().lower()
    if word in ("true", "yes", "1"):
        return True
    if word in ("false", "no", "0", ""):
        return None
    return flag


# What an earlier run leaves in its output_dir: checkpoints (published or staged, see `protege.checkpoints`) and the
# files of a saved model or adapter.
EARLIER_RUN = re.compile(
    r"^((tmp-)?checkpoint-\d+|config\.json|adapter_config\.json|trainer_state\.json"
    r"|(model|pytorch_model|adapter_model)(-\d+-of-\d+)?\.(safetensors|bin)|(model|pytorch_model)\.\w+\.index\.json)$"
)


def output_dir_notice(output_dir: str, resume_flag: str | None, overwrite: bool) -> str:
    """Refuse an output_dir holding an earlier run's model or checkpoints, unless the user resumes that run or passes
    --overwrite_output_dir; else the line that says where outputs go (printed once the trainer is built, so that an
    error found on the way stays the only line). transformers writes to ./trainer_output when no
    --output_dir is given and says so only at INFO level, and a second run into the same folder mixes its checkpoints
    and model with the first's without a word (transformers 5 dropped `overwrite_output_dir`, so nothing stops it)."""
    folder = os.path.abspath(output_dir)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UsageError(f"--output_dir {folder} is a file, not a folder")
    found = sorted(name for name in os.listdir(folder) if EARLIER_RUN.match(name)) if os.path.isdir(folder) else []
    resuming = resume_value(resume_flag) is not None
    if found and not resuming and not overwrite:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise UsageError(
            f"--output_dir {folder} already holds an earlier run ({shown}): pass --resume_from_checkpoint to continue "
            "it, --overwrite_output_dir to train over it, or another --output_dir"
        )
    if resuming:
        how = " (resuming the run there)"
    elif found:
        how = " (over the earlier run there: --overwrite_output_dir)"
    elif output_dir == "trainer_output":
        how = " (transformers' default: choose another with --output_dir)"
    else:
        how = ""
    return f"protege train: checkpoints and the trained model go to {folder}{how}"


def quick_answer(argv: list[str]) -> int | None:
    """The exit code where the quick checks settle the command (help printed, or one error line), else None. The
    checks run in the full path's order, so the first problem is the one either path names."""
    cached = recalled()
    if cached is None:
        return None
    if "-h" in argv or "--help" in argv:
        print(cached["help"], end="")
        return 0
    typed = [item for item in argv if item.startswith("--")]
    remaining = [item for item in typed if item.split("=", 1)[0] not in cached["flags"]]
    if remaining:
        return report("train", unknown_arguments(cached["flags"], remaining))
    if "--config" in argv:  # the YAML file may set any value below: only its keys are checked here
        problem = _config_keys(argv, cached["keys"])
        return None if problem is None else report("train", problem)
    try:
        _check_paths(argv)
    except (UsageError, ValueError) as error:
        return report("train", error)
    return None


def flag_on(argv: list[str], flag: str) -> bool:
    """A boolean flag as the full parser reads it: bare, or followed by a true word."""
    for i, item in enumerate(argv):
        if item == flag:
            following = argv[i + 1].lower() if i + 1 < len(argv) else ""
            return following not in ("false", "no", "0", "f", "n")
        if item.startswith(f"{flag}="):
            return item.split("=", 1)[1].lower() not in ("false", "no", "0", "f", "n")
    return False


def _check_paths(argv: list[str]) -> None:
    """The full path's first checks, in its order: the model folders named by paths (hub names are left to it), the
    output folder, then a dataset file."""
    from ..model_source import check_model_source, looks_like_path

    for flag, role in (("--model_name_or_path", "student"), ("--teacher_model_name_or_path", "teacher")):
        name = flag_value(argv, flag)
        if name and looks_like_path(name) and not os.path.exists(os.path.expanduser(name)):
            check_model_source(name, role)
    output_dir = flag_value(argv, "--output_dir") or "trainer_output"
    output_dir_notice(output_dir, flag_value(argv, "--resume_from_checkpoint"), flag_on(argv, "--overwrite_output_dir"))
    dataset = flag_value(argv, "--dataset_name")
    if dataset and os.path.splitext(dataset)[1].lower() in DATASET_FILES and not os.path.exists(dataset):
        raise UsageError(f"dataset file {dataset} does not exist")


def _config_keys(argv: list[str], known: list[str]) -> str | None:
    path = flag_value(argv, "--config")
    if path is None:
        return None
    import yaml

    try:
        with open(path) as handle:
            values = yaml.safe_load(handle) or {}
    except (OSError, yaml.YAMLError):  # the full path reports an unreadable file or bad YAML in its own words
        return None
    return unknown_keys(path, values, known) if isinstance(values, dict) else None

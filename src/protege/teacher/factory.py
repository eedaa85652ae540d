"""One function makes every teacher: a spec in, a finished `Teacher` out (loaded or connected, checked against the
student's tokenizer, with its LM head where the loss needs it). The trainer calls it once per teacher and never asks
what kind it made; placing it for the engine in use comes after, through `Teacher.place`."""

from __future__ import annotations

from torch import nn

from . import Teacher
from .cached import CachedTeacher
from .foreign import load_foreign_teacher
from .local import load_local_teacher
from .remote import connect_remote_teacher
from .spec import SINGLE, TeacherSpec


def make_teacher(spec: TeacherSpec, args, student: nn.Module, tokenizer, objective) -> Teacher:
    """The teacher `spec` describes, ready to score the student's batches under `objective` (a `DistillationConfig`
    gives the loading and connection options, `student` and `tokenizer` the vocabulary it is checked against). Where
    the run has several teachers, an error in making one says which: `teacher "code": ...`."""
    try:
        if args.use_uld_loss:  # another tokenizer: the teacher runs on its own tokens
            return load_foreign_teacher(spec, args, student, tokenizer, objective)
        if spec.server_url is not None:
            return connect_remote_teacher(spec, args, student, tokenizer, objective)
        return load_local_teacher(spec, args, student, tokenizer, objective)
    except Exception as error:
        if spec.name != SINGLE and error.args and isinstance(error.args[0], str):
            error.args = (f'teacher "{spec.name}": {error.args[0]}', *error.args[1:])
        raise


def cached_teachers(args, student: nn.Module, tokenizer, objective, live: list[Teacher]) -> list[Teacher]:
    """The run's teachers with `teacher_cache`: a teacher with a cache reads its off-policy rows from it (checked
    against the run) and keeps its live self (if any) for on-policy slices; a teacher without one stays live. One
    folder serves a run's one teacher; several teachers map names to folders, and a teacher that has only a cache
    comes after the live ones."""
    caches = args.teacher_cache
    if not isinstance(caches, dict):
        if len(live) > 1:
            raise ValueError(
                f"teacher_cache is one folder, but the run has the teachers {[t.name for t in live]}: map each "
                f'teacher\'s name to its cache, teacher_cache={{"{live[0].name}": FOLDER, ...}} (`protege '
                "cache-teacher --teacher_name NAME` writes one teacher's rows)"
            )
        return [_cached(args, student, tokenizer, objective, caches, live[0] if live else None)]
    if [t.name for t in live] == [SINGLE] and set(caches) != {SINGLE}:
        raise ValueError(
            f"teacher_cache maps the teacher names {sorted(caches)}, so name the live teacher too: teacher_model="
            "{name: model} (or teacher_model_name_or_path / teacher_model_server_url as a mapping)"
        )
    teachers = [
        _cached(args, student, tokenizer, objective, caches[t.name], t) if t.name in caches else t for t in live
    ]
    for name in [name for name in caches if name not in {t.name for t in live}]:  # (nothing to close: no model)
        if args.lmbda > 0:
            raise ValueError(
                f'teacher "{name}" has a cache only (teacher_cache), which serves off-policy slices, and lmbda='
                f"{args.lmbda}: give it a model or a server too, for its on-policy slices"
            )
        teachers.append(_cached(args, student, tokenizer, objective, caches[name], None, name))
    if len(teachers) > 1:
        for index, teacher in enumerate(teachers):
            if isinstance(teacher, CachedTeacher):
                teacher.route = index  # its rows of the dataset are those routed to `index`
    return teachers


def _cached(args, student, tokenizer, objective, folder: str, live: Teacher | None, name: str | None = None):
    """One teacher's cache, checked against the run, with its live teacher; an error names the teacher where the
    run's caches are a mapping."""
    from .cache import CacheReader
    from .cached import check_cache

    named = name or (live.name if live is not None else None)
    try:
        reader = CacheReader(folder)
        check_cache(reader, args, tokenizer, objective, named if isinstance(args.teacher_cache, dict) else None)
        return CachedTeacher(reader, student, tokenizer, live, named)
    except Exception as error:
        if isinstance(args.teacher_cache, dict) and error.args and isinstance(error.args[0], str):
            error.args = (f'teacher "{named}": {error.args[0]}', *error.args[1:])
        raise

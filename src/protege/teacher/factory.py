"""One function makes every teacher: a spec in, a finished `Teacher` out (loaded or connected, checked against the
student's tokenizer, with its LM head where the loss needs it). The trainer calls it once per teacher and never asks
what kind it made; placing it for the engine in use comes after, through `Teacher.place`."""

from __future__ import annotations

from torch import nn

from . import Teacher
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


def cached_teacher(args, student: nn.Module, tokenizer, objective, live: list[Teacher]) -> Teacher:
    """The teacher of a run with `teacher_cache`: the cache, checked against the run, with the live teacher (if any)
    for on-policy slices."""
    from .cache import CacheReader
    from .cached import CachedTeacher, check_cache

    if len(live) > 1:
        raise ValueError("teacher_cache serves one teacher; several teachers with caches are not supported yet")
    reader = CacheReader(args.teacher_cache)
    check_cache(reader, args, tokenizer, objective)
    return CachedTeacher(reader, student, tokenizer, live[0] if live else None)

"""Teachers described in values: where each lives and what it returns to the loss.

`teacher_specs` is the one place that decides which teachers a run has and which view of each it uses;
`factory.make_teacher` turns a spec into a working teacher. One teacher is today's TRL API (`teacher_model`, or
`teacher_model_name_or_path`, or `use_teacher_server` with its URL); several are mappings of names to models, paths or
URLs (`protege.routing` sends each row to its own).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..choices import HIDDEN_FORMAT

# What a teacher returns: full logits; its last hidden state and LM head (the loss applies the head, a chunk of tokens
# at a time); or a server's scores (top-k and sampled-token log-probs).
RETURNS = ("logits", "hidden", "scores")
SINGLE = "teacher"  # the name of a run's only teacher
# Fields that may map teacher names to values (several teachers); the config turns their JSON text into mappings.
MAPPING_FIELDS = (
    "teacher_model_name_or_path",
    "teacher_model_server_url",
    "teacher_server_response_format",
    "teacher_tokenizer_name_or_path",
    "teacher_cache",
)
DEFAULT_FORMAT = "compact"  # a teacher server's format where a mapping of formats does not name it


def local_returns(args) -> str:
    """What a local teacher returns: its last hidden state wherever the loss applies LM heads itself (the chunked and
    fused paths); `factory.make_teacher` may still settle on logits for a model that transforms them after its head
    (see `models.head_view`)."""
    return "hidden" if args.loss_chunk_size is not None or args.use_liger_kernel else "logits"


def server_format(args, name: str = SINGLE) -> str:
    """The response format asked of the teacher server called `name`."""
    formats = args.teacher_server_response_format
    return formats.get(name, DEFAULT_FORMAT) if isinstance(formats, dict) else formats


def server_urls(args) -> dict[str, str]:
    """The run's teacher servers by name: the mapping of several, or the one of `use_teacher_server`."""
    urls = args.teacher_model_server_url
    if isinstance(urls, dict):
        return dict(urls)
    return {SINGLE: urls} if args.use_teacher_server else {}


def teacher_returns(args, name: str = SINGLE) -> str:
    """What the teacher `name` of a `DistillationConfig` returns, before any model is seen: a server what its
    response format carries, a local teacher `local_returns`."""
    if name in server_urls(args):
        return "hidden" if server_format(args, name) == HIDDEN_FORMAT else "scores"
    return local_returns(args)


def scores_teachers(args) -> list[str]:
    """The servers of the run that send log-probs only (the objective's rules for them apply)."""
    return [name for name in server_urls(args) if teacher_returns(args, name) == "scores"]


@dataclass(frozen=True)
class TeacherSpec:
    """One teacher: a model (a built module, or a hub id or local path) or a server URL, and what it returns."""

    model: Any = None
    server_url: str | None = None
    returns: str = "logits"
    name: str = SINGLE  # how messages and logs name it
    response_format: str | None = None  # a server's payload format

    def __post_init__(self) -> None:
        if (self.model is None) == (self.server_url is None):
            raise ValueError(f"{self.name}: give a model or a server URL, exactly one of the two")
        if self.returns not in RETURNS:
            raise ValueError(f"{self.name}: returns={self.returns!r} is not one of {RETURNS}")
        if self.returns == "scores" and self.server_url is None:
            raise ValueError(f"{self.name}: scores come from a teacher server; a local model returns logits or hidden")


def _local_models(args, teacher_model) -> dict[str, Any]:
    """The local teachers by name: `teacher_model` (a module, a name, or a mapping of them), else the config's."""
    models = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
    if isinstance(models, dict):
        return dict(models)
    if isinstance(args.teacher_model_server_url, dict) and models is not None:
        raise ValueError(
            "teacher_model_server_url maps teacher names to servers, so name the local teacher too: pass a mapping "
            "{name: model} (teacher_model or teacher_model_name_or_path)"
        )
    return {} if models is None else {SINGLE: models}


def needs_no_teacher(args) -> bool:
    """Whether the run asks nothing of a teacher: every slice on-policy, trained on task rewards alone
    (`absent.NoTeacher`)."""
    policy_gradient = getattr(args, "on_policy_objective", "divergence") == "policy_gradient"
    return policy_gradient and args.kl_coef == 0 and args.lmbda == 1


def teacher_specs(args, teacher_model=None) -> list[TeacherSpec]:
    """Every teacher of the run, in a fixed order (local ones first, then servers, each in the order given)."""
    servers = server_urls(args)
    if args.use_teacher_server and not isinstance(args.teacher_model_server_url, dict) and teacher_model is not None:
        raise ValueError(
            "use_teacher_server=True scores with the server at teacher_model_server_url; do not also pass "
            "teacher_model (several teachers, local and served: map names to both, teacher_model={name: model} and "
            "teacher_model_server_url={name: url})"
        )
    local = {} if SINGLE in servers else _local_models(args, teacher_model)
    if not local and not servers:
        cache = getattr(args, "teacher_cache", None)
        if cache and args.lmbda == 0:
            return []  # every slice reads the cache
        if needs_no_teacher(args):
            return []  # rewards alone: `absent.NoTeacher`
        why = " (teacher_cache serves off-policy slices only, and lmbda > 0)" if cache else ""
        raise ValueError(f"no teacher: pass teacher_model or set teacher_model_name_or_path{why}")
    both = sorted(set(local) & set(servers))
    if both:
        raise ValueError(f"teacher names {both} are given both a local model and a server URL; use one name each")
    specs = [_local_spec(name, model, args) for name, model in local.items()]
    specs += [_server_spec(name, url, args) for name, url in servers.items()]
    names = [spec.name for spec in specs]
    caches = getattr(args, "teacher_cache", None)  # a teacher may have a cache only (factory.cached_teachers)
    names += [name for name in caches if name not in names] if isinstance(caches, dict) else []
    if len(names) > 1 and args.default_teacher is not None and args.default_teacher not in names:
        raise ValueError(f"default_teacher={args.default_teacher!r} is not one of the teachers {names}")
    return specs


def _local_spec(name: str, model: Any, args) -> TeacherSpec:
    if model is None:
        raise ValueError(f"teacher {name!r} has no model")
    return TeacherSpec(model=model, returns=local_returns(args), name=name)


def _server_spec(name: str, url: str, args) -> TeacherSpec:
    return TeacherSpec(
        server_url=url, returns=teacher_returns(args, name), name=name, response_format=server_format(args, name)
    )

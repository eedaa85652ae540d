"""DistillationConfig: TRL's defaults, one test per validation rule, warnings, and the command-line round trip."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from transformers import HfArgumentParser

from protege import DistillationConfig
from protege.objective import Objective
from protege.teacher.spec import teacher_returns

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a machine without CUDA")


@pytest.fixture
def make(tmp_path):
    def make(**kwargs) -> DistillationConfig:
        return DistillationConfig(output_dir=str(tmp_path), report_to="none", **kwargs)

    return make


SERVER = dict(use_teacher_server=True, teacher_model_server_url="http://127.0.0.1:8000")


# ---------------------------------------------------------------------------------------------------------------------
# Defaults
# ---------------------------------------------------------------------------------------------------------------------


def test_defaults_follow_trl(make):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the defaults are a consistent setting: no warning
        config = make()
    assert config.learning_rate == 1e-6
    assert config.lmbda == 1.0
    assert config.beta == 1.0
    assert config.loss_top_k == 1
    assert config.temperature == 1.0
    assert config.max_length == 1024
    assert config.max_completion_length == 512
    assert config.top_p == 0.95
    assert config.top_k == 0
    assert config.vllm_server_port == 8001
    assert config.reverse_kl_top_1_mode == "sampled"
    assert config.loss_add_tail is True
    assert config.loss_chunk_size == "auto"  # memory-bounded by default
    assert config.use_teacher_server is False
    assert config.use_vllm is False
    assert config.num_generations == 1


@no_cuda
def test_bf16_resolves_false_without_cuda(make):
    assert DistillationConfig.__dataclass_fields__["bf16"].default is None
    assert make().bf16 is False
    assert make(bf16=False).bf16 is False


def test_max_prompt_length_is_derived(make):
    assert make().max_prompt_length == 1024 - 512
    assert make(max_length=300, max_completion_length=100).max_prompt_length == 200
    assert make(max_prompt_length=64).max_prompt_length == 64  # an explicit value is kept


def test_generation_batch_size_is_only_checked(make):
    assert make().generation_batch_size is None  # nothing reads it: the step's prompts go to one generate call
    config = make(
        per_device_train_batch_size=4, gradient_accumulation_steps=3, num_generations=2, generation_batch_size=6
    )
    assert config.generation_batch_size == 6


# ---------------------------------------------------------------------------------------------------------------------
# Validation: one row per rule (and per kind of bad value); each message names the field
# ---------------------------------------------------------------------------------------------------------------------

GENERATION_BATCH = r"generation_batch_size=.*per_device_train_batch_size"
CHUNK_SIZE = r"loss_chunk_size=.*'auto', an integer >= 1, or None"
MAX_LENGTH = r"max_completion_length=.*max_length \(1024\)"
NO_URL = r"teacher_model_server_url="


def case(name: str, kwargs: dict, match: str, marks=()):
    """One row of INVALID: the settings, a fragment of the message (a regular expression), and the row's id."""
    return pytest.param(kwargs, match, id=name, marks=marks)


INVALID = [
    case("lmbda-negative", dict(lmbda=-0.1), r"lmbda="),
    case("lmbda-above-1", dict(lmbda=1.5), r"lmbda="),
    case("beta-negative", dict(beta=-0.1), r"beta="),
    case("beta-above-1", dict(beta=1.5), r"beta="),
    case("temperature-zero", dict(temperature=0.0), r"temperature="),
    case("temperature-negative", dict(temperature=-1.0), r"temperature="),
    case("loss_top_k-negative", dict(loss_top_k=-1), r"loss_top_k=-1"),
    case("reverse_kl_top_1_mode-unknown", dict(reverse_kl_top_1_mode="greedy"), r"reverse_kl_top_1_mode='greedy'"),
    case("max_completion_length-equal", dict(max_completion_length=1024), MAX_LENGTH),
    case("max_completion_length-above", dict(max_completion_length=2000), MAX_LENGTH),
    case("max_completion_length-zero", dict(max_completion_length=0), r"max_completion_length=0"),
    case("max_prompt_length-zero", dict(max_prompt_length=0), r"max_prompt_length=0"),
    case("num_generations-zero", dict(num_generations=0), r"num_generations="),
    case("num_generations-negative", dict(num_generations=-1), r"num_generations="),
    # generation_batch_size x num_generations must fill the step's 8 rows (per-device batch 2 x accumulation 2)
    case("num_generations-3-of-8-rows", dict(num_generations=3), GENERATION_BATCH),
    case("generation_batch_size-3x2", dict(generation_batch_size=3, num_generations=2), GENERATION_BATCH),
    case(
        "generation_batch_size-4x2-of-4-rows",
        dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, generation_batch_size=4, num_generations=2),
        GENERATION_BATCH,
    ),
    case("top_p-zero", dict(top_p=0.0), r"top_p="),
    case("top_p-above-1", dict(top_p=1.5), r"top_p="),
    case("top_k-negative", dict(top_k=-1), r"top_k=-1"),
    case("min_p-above-1", dict(min_p=1.5), r"min_p=1.5 is not allowed"),
    case(
        "generation_kwargs-bad-json",
        dict(generation_kwargs="{oops"),
        r"generation_kwargs='\{oops' is not allowed: it is not valid JSON",
    ),
    case("vllm_sync_frequency-zero", dict(vllm_sync_frequency=0), r"vllm_sync_frequency=0 is not allowed"),
    case("vllm_mode-unknown", dict(vllm_mode="remote"), r"vllm_mode='remote'"),
    # this environment has no vLLM (it lives in .vllm-env): a one-line error that says where to get it
    case(
        "use_vllm-not-installed",
        dict(use_vllm=True),
        r"use_vllm=True is not allowed: vLLM is not installed .*make vllm-env",
    ),
    case("loss_chunk_size-zero", dict(loss_chunk_size=0), CHUNK_SIZE),
    case("loss_chunk_size-negative", dict(loss_chunk_size=-4), CHUNK_SIZE),
    case("loss_chunk_size-word", dict(loss_chunk_size="abc"), CHUNK_SIZE),
    case("loss_chunk_size-negative-string", dict(loss_chunk_size="-3"), CHUNK_SIZE),
    case("loss_chunk_size-bool", dict(loss_chunk_size=True), CHUNK_SIZE),
    case("bf16-without-cuda", dict(bf16=True), r"bf16=True", marks=no_cuda),
    case("liger-without-cuda", dict(use_liger_kernel=True), r"use_liger_kernel=True", marks=no_cuda),
    case("server-url-none", dict(use_teacher_server=True, teacher_model_server_url=None), NO_URL),
    case("server-url-empty", dict(use_teacher_server=True, teacher_model_server_url=""), NO_URL),
    case("server-url-blank", dict(use_teacher_server=True, teacher_model_server_url="   "), NO_URL),
    case("server-with-liger", dict(use_liger_kernel=True, **SERVER), r"use_liger_kernel=True.*use_teacher_server"),
    case("server-forward-kl-needs-top-k", dict(beta=0.0, loss_top_k=0, **SERVER), r"loss_top_k=0.*beta=0"),
    case("server-jsd-full-vocab", dict(beta=0.5, loss_top_k=0, **SERVER), r"loss_top_k=0.*beta=0.5"),
    case("server-jsd-top-5", dict(beta=0.5, loss_top_k=5, **SERVER), r"loss_top_k=5.*beta=0.5"),
    case("server-reverse-kl-top-2", dict(beta=1.0, loss_top_k=2, **SERVER), r"loss_top_k=2.*beta=1.0"),
    case(
        "server-argmax-mode",
        dict(reverse_kl_top_1_mode="argmax", **SERVER),
        r"reverse_kl_top_1_mode='argmax'.*use_teacher_server",
    ),
    case("server-protocol-unknown", dict(teacher_server_protocol="grpc", **SERVER), r"teacher_server_protocol='grpc'"),
    case(
        "server-response-format-unknown",
        dict(teacher_server_response_format="xml", **SERVER),
        r"teacher_server_response_format='xml'",
    ),
    case("server-openai-needs-model", dict(teacher_server_protocol="openai", **SERVER), r"teacher_server_model=None"),
]


@pytest.mark.parametrize(("kwargs", "match"), INVALID)
def test_invalid_setting_is_refused(make, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


@pytest.mark.parametrize(("value", "parsed"), [("auto", "auto"), ("128", 128), (64, 64), ("none", None), (None, None)])
def test_loss_chunk_size_values(make, value, parsed):
    assert make(loss_chunk_size=value).loss_chunk_size == parsed


def test_generation_kwargs_json_is_parsed(make):
    assert make(generation_kwargs='{"no_repeat_ngram_size": 3}').generation_kwargs == {"no_repeat_ngram_size": 3}


def test_server_objectives_are_chunked_too(make):
    args = make(**SERVER)
    objective = Objective.from_config(args)
    assert (objective.chunk_size, objective.student_view, teacher_returns(args)) == ("auto", "hidden", "scores")
    dense = Objective.from_config(make(loss_chunk_size=None, **SERVER))
    assert (dense.chunk_size, dense.student_view) == (None, "logits")


def test_valid_teacher_server_settings_pass(make):
    assert make(**SERVER).use_teacher_server
    assert make(beta=0.0, loss_top_k=20, **SERVER).loss_top_k == 20


# ---------------------------------------------------------------------------------------------------------------------
# Warnings for settings that have no effect
# ---------------------------------------------------------------------------------------------------------------------


def test_warns_argmax_mode_with_forward_kl(make):
    with pytest.warns(UserWarning, match=r"reverse_kl_top_1_mode='argmax' has no effect"):
        make(reverse_kl_top_1_mode="argmax", beta=0.0)


def test_warns_num_generations_with_off_policy_slices(make):
    with pytest.warns(UserWarning, match=r"num_generations=2 with lmbda=0.5"):
        make(num_generations=2, lmbda=0.5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(reverse_kl_top_1_mode="argmax", loss_top_k=5), r"reverse_kl_top_1_mode='argmax' has no effect"),
        (dict(loss_top_k=0, loss_add_tail=False), r"loss_add_tail=False has no effect"),
        (dict(beta=1.0, loss_top_k=1, loss_add_tail=False), r"always zero"),
    ],
)
def test_warns_other_ineffective_settings(make, kwargs, match):
    with pytest.warns(UserWarning, match=match):
        make(**kwargs)


def test_no_warning_for_num_generations_when_fully_on_policy(make):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make(num_generations=2, lmbda=1.0)


# ---------------------------------------------------------------------------------------------------------------------
# Command line and field metadata
# ---------------------------------------------------------------------------------------------------------------------


def test_hf_argument_parser_round_trip(tmp_path):
    out = tmp_path / "X"
    argv = ["--output_dir", str(out), "--lmbda", "0.5", "--beta", "0", "--model_init_kwargs", '{"dtype": "float32"}']
    (config,) = HfArgumentParser(DistillationConfig).parse_args_into_dataclasses([*argv, "--report_to", "none"])
    assert isinstance(config, DistillationConfig)
    assert config.output_dir == str(out)
    assert config.lmbda == 0.5
    assert config.beta == 0.0
    assert config.model_init_kwargs == {"dtype": "float32"}  # parsed from JSON, not left as a string


def test_every_own_field_has_help():
    own = DistillationConfig.__dict__["__annotations__"]
    fields = {f.name: f for f in dataclasses.fields(DistillationConfig)}
    assert "lmbda" in own and "output_dir" not in own
    missing = [name for name in own if not str(fields[name].metadata.get("help", "")).strip()]
    assert not missing, f"fields without help: {missing}"


def test_server_api_keys_are_redacted_in_what_is_logged(make):
    config = make(teacher_server_api_key="teacher-s3cret", vllm_server_api_key="student-s3cret")
    logged = config.to_dict()
    assert logged["teacher_server_api_key"] == "<TEACHER_SERVER_API_KEY>"
    assert logged["vllm_server_api_key"] == "<VLLM_SERVER_API_KEY>"
    assert "s3cret" not in config.to_json_string()
    assert config.vllm_server_api_key == "student-s3cret"  # the client still gets it
    assert make().to_dict()["vllm_server_api_key"] is None

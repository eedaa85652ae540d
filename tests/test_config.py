"""DistillationConfig: TRL's defaults, one test per validation rule, warnings, and the command-line round trip."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from transformers import HfArgumentParser

from protege import DistillationConfig
from protege.objective import Objective

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
# Validation: one rule per test, each message names the field
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_lmbda_outside_unit_interval(make, value):
    with pytest.raises(ValueError, match=r"lmbda="):
        make(lmbda=value)


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_beta_outside_unit_interval(make, value):
    with pytest.raises(ValueError, match=r"beta="):
        make(beta=value)


def test_unknown_reverse_kl_top_1_mode(make):
    with pytest.raises(ValueError, match=r"reverse_kl_top_1_mode='greedy'"):
        make(reverse_kl_top_1_mode="greedy")


@pytest.mark.parametrize("max_completion_length", [1024, 2000])
def test_max_completion_length_not_below_max_length(make, max_completion_length):
    with pytest.raises(ValueError, match=r"max_completion_length=.*max_length \(1024\)"):
        make(max_completion_length=max_completion_length)


@pytest.mark.parametrize("value", [0, -1])
def test_num_generations_below_one(make, value):
    with pytest.raises(ValueError, match=r"num_generations="):
        make(num_generations=value)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_generations=3),  # 8 rows are not a multiple of 3 completions per prompt
        dict(generation_batch_size=3, num_generations=2),  # 3 x 2 != 8
        dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, generation_batch_size=4, num_generations=2),
    ],
)
def test_generation_batch_size_times_num_generations_must_fill_the_step(make, kwargs):
    with pytest.raises(ValueError, match=r"generation_batch_size=.*per_device_train_batch_size"):
        make(**kwargs)


@pytest.mark.parametrize("value", [0.0, -1.0])
def test_temperature_not_positive(make, value):
    with pytest.raises(ValueError, match=r"temperature="):
        make(temperature=value)


def test_loss_top_k_negative(make):
    with pytest.raises(ValueError, match=r"loss_top_k=-1"):
        make(loss_top_k=-1)


@pytest.mark.parametrize("url", [None, "", "   "])
def test_teacher_server_without_url(make, url):
    with pytest.raises(ValueError, match=r"teacher_model_server_url="):
        make(use_teacher_server=True, teacher_model_server_url=url)


def test_teacher_server_with_liger(make):
    with pytest.raises(ValueError, match=r"use_liger_kernel=True.*use_teacher_server"):
        make(use_liger_kernel=True, **SERVER)


def test_teacher_server_forward_kl_needs_top_k(make):
    with pytest.raises(ValueError, match=r"loss_top_k=0.*beta=0"):
        make(beta=0.0, loss_top_k=0, **SERVER)


@pytest.mark.parametrize(("beta", "loss_top_k"), [(0.5, 0), (0.5, 5), (1.0, 2)])
def test_teacher_server_beta_positive_needs_top_1(make, beta, loss_top_k):
    with pytest.raises(ValueError, match=rf"loss_top_k={loss_top_k}.*beta={beta}"):
        make(beta=beta, loss_top_k=loss_top_k, **SERVER)


def test_teacher_server_with_argmax_mode(make):
    with pytest.raises(ValueError, match=r"reverse_kl_top_1_mode='argmax'.*use_teacher_server"):
        make(reverse_kl_top_1_mode="argmax", **SERVER)


@no_cuda
def test_bf16_true_without_cuda(make):
    with pytest.raises(ValueError, match=r"bf16=True"):
        make(bf16=True)


@pytest.mark.parametrize("value", [0, -4, "abc", "-3", True])
def test_loss_chunk_size_below_one(make, value):
    with pytest.raises(ValueError, match=r"loss_chunk_size=.*'auto', an integer >= 1, or None"):
        make(loss_chunk_size=value)


@pytest.mark.parametrize(("value", "parsed"), [("auto", "auto"), ("128", 128), (64, 64), ("none", None), (None, None)])
def test_loss_chunk_size_values(make, value, parsed):
    assert make(loss_chunk_size=value).loss_chunk_size == parsed


def test_server_objectives_are_chunked_too(make):
    objective = Objective.from_config(make(**SERVER))
    assert (objective.chunk_size, objective.student_view, objective.teacher_view) == ("auto", "hidden", "scores")
    dense = Objective.from_config(make(loss_chunk_size=None, **SERVER))
    assert (dense.chunk_size, dense.student_view) == (None, "logits")


def test_use_vllm_needs_vllm_installed(make):
    """This environment has no vLLM (it lives in .vllm-env): a one-line error that says where to get it."""
    with pytest.raises(ValueError, match=r"use_vllm=True is not allowed: vLLM is not installed .*make vllm-env"):
        make(use_vllm=True)


def test_generation_settings(make):
    assert make(generation_kwargs='{"no_repeat_ngram_size": 3}').generation_kwargs == {"no_repeat_ngram_size": 3}
    with pytest.raises(ValueError, match=r"generation_kwargs='\{oops' is not allowed: it is not valid JSON"):
        make(generation_kwargs="{oops")
    with pytest.raises(ValueError, match=r"min_p=1.5 is not allowed"):
        make(min_p=1.5)
    with pytest.raises(ValueError, match=r"vllm_sync_frequency=0 is not allowed"):
        make(vllm_sync_frequency=0)


@no_cuda
def test_use_liger_kernel_without_cuda_or_package(make):
    with pytest.raises(ValueError, match=r"use_liger_kernel=True"):
        make(use_liger_kernel=True)


def test_max_completion_length_below_one(make):
    with pytest.raises(ValueError, match=r"max_completion_length=0"):
        make(max_completion_length=0)


def test_max_prompt_length_below_one(make):
    with pytest.raises(ValueError, match=r"max_prompt_length=0"):
        make(max_prompt_length=0)


@pytest.mark.parametrize("value", [0.0, 1.5])
def test_top_p_outside_half_open_unit_interval(make, value):
    with pytest.raises(ValueError, match=r"top_p="):
        make(top_p=value)


def test_top_k_sampling_negative(make):
    with pytest.raises(ValueError, match=r"top_k=-1"):
        make(top_k=-1)


def test_unknown_vllm_mode(make):
    with pytest.raises(ValueError, match=r"vllm_mode='remote'"):
        make(vllm_mode="remote")


def test_teacher_server_unknown_protocol(make):
    with pytest.raises(ValueError, match=r"teacher_server_protocol='grpc'"):
        make(teacher_server_protocol="grpc", **SERVER)


def test_teacher_server_unknown_response_format(make):
    with pytest.raises(ValueError, match=r"teacher_server_response_format='xml'"):
        make(teacher_server_response_format="xml", **SERVER)


def test_openai_teacher_server_needs_model_name(make):
    with pytest.raises(ValueError, match=r"teacher_server_model=None"):
        make(teacher_server_protocol="openai", **SERVER)


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

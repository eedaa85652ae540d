"""What protege checks of a student before vLLM starts (`vllm_engine`), and the vLLM warnings it quiets. No vLLM here:
the checks read the transformers config; tests/test_vllm.py runs them through the commands in the vLLM environment."""

from __future__ import annotations

import logging

import pytest
from transformers import LlamaConfig

from protege.vllm_engine import CPU_HEAD_DIMS, NOTICES, check_student_for_vllm, head_dim, quiet_vllm_notices


def llama(**overrides) -> LlamaConfig:
    settings = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaConfig(**(settings | overrides))


def test_a_max_model_len_past_the_students_positions_names_the_setting_and_the_bound():
    with pytest.raises(ValueError) as error:
        check_student_for_vllm(llama(max_position_embeddings=256), 1024, "max_length", True, "vllm_max_model_length")
    assert str(error.value) == (
        "max_length=1024 is longer than the student's max_position_embeddings=256, which vLLM refuses as its "
        "max_model_len: set vllm_max_model_length to at most 256"
    )
    check_student_for_vllm(llama(max_position_embeddings=256), 256, "max_length", True)  # at the bound: fine
    check_student_for_vllm(llama(max_position_embeddings=256), None, "max_length", True)  # vLLM derives it


def test_rope_scaling_or_vllms_own_override_leave_the_length_to_vllm(monkeypatch):
    scaled = llama(max_position_embeddings=256, rope_parameters={"rope_type": "linear", "factor": 4.0})
    check_student_for_vllm(scaled, 1024, "--max-model-len", True)
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    check_student_for_vllm(llama(max_position_embeddings=256), 1024, "--max-model-len", True)


@pytest.mark.parametrize(("overrides", "size"), [({"num_attention_heads": 8}, 8), ({"head_dim": 16}, 16)])
def test_a_head_dim_the_cpu_kernels_lack_is_refused_on_cpu_only(overrides, size):
    config = llama(**overrides)
    assert head_dim(config) == size
    with pytest.raises(ValueError) as error:
        check_student_for_vllm(config, None, "--max-model-len", on_cpu=True)
    assert str(error.value) == (
        f"the student's head_dim is {size}, which vLLM's CPU attention has no kernel for: on the CPU backend head_dim "
        "(the config's head_dim, else hidden_size / num_attention_heads) must be one of 32, 64, 80, 96, 112, 128, "
        "160, 192, 224, 256, 512"
    )
    check_student_for_vllm(config, None, "--max-model-len", on_cpu=False)  # GPU kernels: vLLM's to judge
    for size in CPU_HEAD_DIMS:
        check_student_for_vllm(llama(hidden_size=2 * size), None, "--max-model-len", on_cpu=True)


def record(logger: str, message: str, *args) -> logging.LogRecord:
    return logging.getLogger(logger).makeRecord(logger, logging.WARNING, __file__, 1, message, args, None)


def test_only_the_known_harmless_vllm_warnings_are_dropped():
    quiet_vllm_notices()
    quiet_vllm_notices()  # once is enough: no second filter
    reload, renderer = NOTICES
    assert len(logging.getLogger(reload).filters) == len(logging.getLogger(renderer).filters) == 1
    kept = {
        reload: [("%s: Failed to load weights", "QKVParallelLinear"), ("Reloading weights inplace...",)],
        renderer: [("Chat template warmup completed in %.3fs", 0.1)],
    }
    dropped = {
        reload: [("%s: Failed to load weights", "RotaryEmbedding"), ("%s: Failed to load weights", "MRotaryEmbedding")],
        renderer: [("Chat template warmup failed",)],
    }
    for name, cases in kept.items():
        assert all(logging.getLogger(name).filter(record(name, *case)) for case in cases)
    for name, cases in dropped.items():
        assert not any(logging.getLogger(name).filter(record(name, *case)) for case in cases)


def test_both_problems_are_said_in_one_line():
    with pytest.raises(ValueError) as error:
        check_student_for_vllm(llama(num_attention_heads=8, max_position_embeddings=256), 1024, "--max-model-len", True)
    first, second = str(error.value).split("; and ")
    assert first.startswith("--max-model-len=1024 is longer than the student's max_position_embeddings=256")
    assert second.startswith("the student's head_dim is 8, which vLLM's CPU attention has no kernel for")

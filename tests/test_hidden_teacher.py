"""The "hidden" teacher format: a real server on 127.0.0.1 sends final hidden states, the trainer holds the teacher's
LM head (fetched once, or read alone from the checkpoint), and the loss equals a local teacher's for every
objective."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
import torch
from tiny import config, dataset, held_out_kl
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from protege import DistillationConfig, DistillationTrainer
from protege.teacher.client import TeacherClient, TeacherServerError
from protege.teacher.codec import (
    PayloadError,
    decode_hidden,
    decode_hidden_binary,
    encode_hidden,
    encode_hidden_binary,
)
from protege.teacher.head import LMHead, head_from_checkpoint, logit_transform
from protege.teacher.remote import RemoteHiddenTeacher


def hidden_trainer(tiny_paths, tmp_path, url, **overrides) -> DistillationTrainer:
    settings = dict(
        use_teacher_server=True,
        teacher_model_server_url=url,
        teacher_server_response_format="hidden",
        teacher_server_hidden_dtype="float32",
    )
    return DistillationTrainer(
        model=tiny_paths["student"], args=config(tmp_path, **settings | overrides), train_dataset=dataset(8)
    )


def loss_and_grads(trainer: DistillationTrainer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one slice of the first 4 training rows, and the student's gradients."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("top_k", [0, 20])
def test_loss_and_gradients_equal_the_local_teacher(tiny_paths, tmp_path, teacher_url, beta, top_k):
    local = DistillationTrainer(
        model=tiny_paths["student"],
        teacher_model=tiny_paths["teacher"],
        args=config(tmp_path / "local", beta=beta, loss_top_k=top_k),
        train_dataset=dataset(8),
    )
    remote = hidden_trainer(tiny_paths, tmp_path / "remote", teacher_url, beta=beta, loss_top_k=top_k)
    assert isinstance(remote.teacher, RemoteHiddenTeacher) and remote.teacher.returns == "hidden"
    local_loss, local_grads = loss_and_grads(local)
    remote_loss, remote_grads = loss_and_grads(remote)
    assert local_loss > 0
    torch.testing.assert_close(remote_loss, local_loss, rtol=1e-5, atol=0)
    assert remote_grads.keys() == local_grads.keys()
    for name, grad in local_grads.items():
        torch.testing.assert_close(remote_grads[name], grad, rtol=1e-5, atol=1e-8, msg=name)


def test_sixteen_bit_wire_and_temperature(tiny_paths, tmp_path, teacher_url):
    """float16 and bfloat16 hidden states of a float32 teacher: the loss within their rounding of the exact one."""
    local = DistillationTrainer(
        model=tiny_paths["student"],
        teacher_model=tiny_paths["teacher"],
        args=config(tmp_path / "local", beta=0.5, loss_top_k=0, temperature=0.7),
        train_dataset=dataset(8),
    )
    exact, _ = loss_and_grads(local)
    for dtype, tolerance in (("float16", 2e-3), ("bfloat16", 2e-2)):
        remote = hidden_trainer(
            tiny_paths, tmp_path / dtype, teacher_url, beta=0.5, loss_top_k=0, temperature=0.7,
            teacher_server_hidden_dtype=dtype,
        )  # fmt: skip
        loss, _ = loss_and_grads(remote)
        assert loss.item() == pytest.approx(exact.item(), rel=tolerance), dtype
        assert loss.item() != exact.item()  # 16 bits do round a float32 teacher's states


@pytest.mark.slow
def test_on_policy_training_through_hidden_states_learns(tiny_paths, tmp_path, teacher_url):
    tokenizer = AutoTokenizer.from_pretrained(tiny_paths["student"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_paths["teacher"])
    before = held_out_kl(AutoModelForCausalLM.from_pretrained(tiny_paths["student"]), teacher, tokenizer)
    trainer = DistillationTrainer(
        model=tiny_paths["student"],
        args=config(
            tmp_path,
            lmbda=1.0,
            beta=0.5,
            loss_top_k=0,
            max_steps=30,
            per_device_train_batch_size=4,
            use_teacher_server=True,
            teacher_model_server_url=teacher_url,
            teacher_server_response_format="hidden",
        ),
        train_dataset=dataset(64),
    )
    trainer.train()
    after = held_out_kl(trainer.model, teacher, tokenizer)
    assert after < 0.8 * before, (before, after)


def test_lm_head_downloaded_once_then_read_from_the_cache(tiny_paths, teacher_url, tmp_path, monkeypatch):
    client = TeacherClient(teacher_url)
    head = client.lm_head(tmp_path)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_paths["teacher"])
    torch.testing.assert_close(head.weight, teacher.lm_head.weight, rtol=0, atol=0)
    assert head.bias is None and head.logit_multiplier == 1.0 and head.final_logit_softcapping is None
    meta = httpx.get(f"{teacher_url}/lm_head/meta/").json()
    assert (meta["vocab_size"], meta["hidden_size"], meta["dtype"]) == ("300", "64", "float32")
    assert [p.name for p in tmp_path.iterdir()] == [f"{meta['sha256']}.safetensors"]

    def no_download(*args, **kwargs):
        raise AssertionError("the cached head was downloaded again")

    monkeypatch.setattr(httpx.Client, "stream", no_download)
    torch.testing.assert_close(client.lm_head(tmp_path).weight, head.weight, rtol=0, atol=0)
    client.close()


def test_head_read_alone_from_a_sharded_checkpoint(tiny_paths, tmp_path, monkeypatch):
    from safetensors import safe_open

    teacher = AutoModelForCausalLM.from_pretrained(tiny_paths["teacher"])
    teacher.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    read = []
    original = safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.inner = original(*args, **kwargs)

        def __enter__(self):
            self.file = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def get_tensor(self, name):
            read.append(name)
            return self.file.get_tensor(name)

        def __getattr__(self, name):  # keys(), metadata()
            return getattr(self.file, name)

    monkeypatch.setattr("safetensors.safe_open", Recording)
    head = head_from_checkpoint(str(tmp_path / "sharded"))
    assert read == ["lm_head.weight"]
    torch.testing.assert_close(head.weight, teacher.lm_head.weight, rtol=0, atol=0)

    tied = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_paths["teacher"], tie_word_embeddings=True))
    tied.save_pretrained(tmp_path / "tied")
    read.clear()
    head = head_from_checkpoint(str(tmp_path / "tied"))
    assert read == ["model.embed_tokens.weight"]
    torch.testing.assert_close(head.weight, tied.get_input_embeddings().weight, rtol=0, atol=0)


def test_trainer_reads_the_head_from_teacher_lm_head_path(tiny_paths, tmp_path, teacher_url):
    served = hidden_trainer(tiny_paths, tmp_path / "served", teacher_url, beta=0.5, loss_top_k=0)
    from_path = hidden_trainer(
        tiny_paths, tmp_path / "path", teacher_url, beta=0.5, loss_top_k=0, teacher_lm_head_path=tiny_paths["teacher"]
    )
    torch.testing.assert_close(from_path.teacher.weight, served.teacher.weight, rtol=0, atol=0)
    torch.testing.assert_close(loss_and_grads(from_path)[0], loss_and_grads(served)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"has an LM head of shape \(300, 32\) but the teacher server .* \(300, 64\)"):
        hidden_trainer(tiny_paths, tmp_path / "wrong", teacher_url, teacher_lm_head_path=tiny_paths["student"])


def test_logit_transforms_folded_or_refused():
    from transformers import CohereConfig, Gemma2Config, GraniteConfig

    assert logit_transform(CohereConfig(logit_scale=0.25)) == (0.25, None)
    assert logit_transform(GraniteConfig(logits_scaling=8.0)) == (0.125, None)
    assert logit_transform(Gemma2Config(final_logit_softcapping=30.0)) == (1.0, 30.0)
    weight, bias = torch.randn(6, 3), torch.randn(6)
    scaled_weight, scaled_bias = LMHead(weight, bias, logit_multiplier=0.25).for_loss(5, "cpu", torch.float32, "here")
    torch.testing.assert_close(scaled_weight, weight[:5] * 0.25)
    torch.testing.assert_close(scaled_bias, bias[:5] * 0.25)
    with pytest.raises(ValueError, match=r"LM head from http://x/lm_head/ soft-caps its logits .*=30.0"):
        LMHead(weight, final_logit_softcapping=30.0).for_loss(5, "cpu", torch.float32, "http://x/lm_head/")


# ----- The payload -----


@pytest.mark.parametrize(("dtype", "bytes_per_value", "tolerance"), [("float16", 2, 1e-3), ("bfloat16", 2, 8e-3)])
def test_hidden_payload_round_trip(dtype, bytes_per_value, tolerance):
    rng = np.random.default_rng(0)
    rows = [rng.normal(0, 3, (n, 96)).astype(np.float32) for n in (5, 1, 7)]
    sequences, prompt_lengths = [[1] * (n + 2) for n in (5, 1, 7)], [2, 2, 2]
    payload = encode_hidden(rows, dtype)
    assert len(base64.b64decode(payload["hidden_b64"])) == 13 * 96 * bytes_per_value  # 2H bytes a token
    decoded = decode_hidden(payload, sequences, prompt_lengths, hidden_size=96)
    for row, back in zip(rows, decoded):
        np.testing.assert_allclose(back, row, rtol=tolerance, atol=1e-6)
    exact = decode_hidden(encode_hidden(rows, "float32"), sequences, prompt_lengths)
    for row, back in zip(rows, exact):
        np.testing.assert_array_equal(back, row)
    blob = encode_hidden_binary(rows, dtype)  # what protege's client asks for: the same, as raw safetensors bytes
    assert 13 * 96 * bytes_per_value < len(blob) < 13 * 96 * bytes_per_value + 300
    for back, via_json in zip(decode_hidden_binary(blob, sequences, prompt_lengths, 96), decoded):
        np.testing.assert_array_equal(back, via_json)
    with pytest.raises(PayloadError, match=r"hidden_size 96 does not match the teacher's LM head \(64\)"):
        decode_hidden_binary(blob, sequences, prompt_lengths, hidden_size=64)
    with pytest.raises(PayloadError, match="not a safetensors hidden payload"):
        decode_hidden_binary(blob[:-10], sequences, prompt_lengths)
    with pytest.raises(PayloadError, match=r"hidden_size 96 does not match the teacher's LM head \(64\)"):
        decode_hidden(payload, sequences, prompt_lengths, hidden_size=64)
    with pytest.raises(PayloadError, match=r"completion_lengths \[5, 1, 7\] do not match"):
        decode_hidden(payload, sequences[:2], prompt_lengths[:2])


def test_non_finite_hidden_states_are_refused():
    rows = [np.ones((2, 4), np.float32), np.ones((3, 4), np.float32)]
    rows[1][2, 1] = 70000.0  # past float16's largest value
    with pytest.raises(ValueError, match=r"sequence 1: .*not finite in float16 .*ask for bfloat16 or float32"):
        encode_hidden(rows, "float16")
    assert encode_hidden(rows, "bfloat16")["dtype"] == "bfloat16"
    payload = encode_hidden(rows, "float32")
    raw = np.frombuffer(base64.b64decode(payload["hidden_b64"]), np.float32).copy()
    raw[9] = np.nan  # sequence 1 (rows 2..4), completion position 0
    payload["hidden_b64"] = base64.b64encode(raw.tobytes()).decode()
    with pytest.raises(PayloadError, match="sequence 1: the hidden state at completion position 0 is not finite"):
        decode_hidden(payload, [[1, 1, 1], [1, 1, 1, 1]], [1, 1])


# ----- Requests and settings -----


def test_bad_hidden_requests_get_4xx(teacher_url):
    url = f"{teacher_url}/get_sequence_logprobs/"
    good = {"sequences": [[1, 2, 3]], "prompt_lengths": [1], "response_format": "hidden"}
    answer = httpx.post(url, json=good)
    assert answer.status_code == 200 and answer.json()["completion_lengths"] == [2]
    binary = httpx.post(url, json=good, headers={"Accept": "application/octet-stream"})
    assert binary.headers["content-type"] == "application/octet-stream"
    assert len(decode_hidden_binary(binary.content, [[1, 2, 3]], [1])[0]) == 2
    assert httpx.post(url, json=good | {"hidden_dtype": "float64"}).status_code == 422
    refused = httpx.post(url, json=good | {"sequences": [[1, 2, 300]]})
    assert refused.status_code == 400 and "outside the vocabulary [0, 300)" in refused.text
    refused = httpx.post(url, json=good | {"prompt_lengths": [3]})
    assert refused.status_code == 400 and "prompt_lengths[0]=3" in refused.text


def test_settings_the_hidden_format_allows_and_refuses(tmp_path):
    common = dict(output_dir=str(tmp_path), use_teacher_server=True, teacher_model_server_url="http://127.0.0.1:1")
    exact = DistillationConfig(**common, teacher_server_response_format="hidden", beta=0.5, loss_top_k=0)
    assert exact.loss_top_k == 0
    argmax = dict(beta=0.5, loss_top_k=1, reverse_kl_top_1_mode="argmax")
    DistillationConfig(**common, teacher_server_response_format="hidden", **argmax)
    with pytest.raises(ValueError, match="teacher_server_response_format='hidden' gives the exact loss"):
        DistillationConfig(**common, beta=0.5, loss_top_k=0)
    with pytest.raises(ValueError, match="teacher_server_response_format='hidden' is not allowed: hidden states come"):
        DistillationConfig(
            **common, teacher_server_response_format="hidden", teacher_server_protocol="openai",
            teacher_server_model="m",
        )  # fmt: skip
    with pytest.raises(ValueError, match="teacher_server_hidden_dtype='float64' is not allowed"):
        DistillationConfig(**common, teacher_server_response_format="hidden", teacher_server_hidden_dtype="float64")


def test_server_without_the_head_is_a_named_error(tmp_path):
    with pytest.raises(TeacherServerError, match=r"teacher server at http://127.0.0.1:1/lm_head/meta/ did not answer"):
        TeacherClient("http://127.0.0.1:1", max_retries=0).lm_head(tmp_path)

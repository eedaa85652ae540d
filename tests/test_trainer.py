"""DistillationTrainer end to end on tiny models: learning, slices, generation calls, normalisation, LoRA."""

from __future__ import annotations

import pytest
import torch
from tiny import config, dataset, held_out_kl, logged
from transformers import AutoModelForCausalLM, AutoTokenizer

from protege import DistillationTrainer


def trainer_for(tiny_paths, tmp_path, train=None, reward_funcs=None, **overrides) -> DistillationTrainer:
    return DistillationTrainer(
        model=tiny_paths["student"],
        teacher_model=tiny_paths["teacher"],
        args=config(tmp_path, **overrides),
        train_dataset=train if train is not None else dataset(64),
        reward_funcs=reward_funcs,
    )


def test_student_learns_on_policy_and_off_policy(tiny_paths, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_paths["student"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_paths["teacher"])
    before = held_out_kl(AutoModelForCausalLM.from_pretrained(tiny_paths["student"]), teacher, tokenizer)
    for lmbda in (1.0, 0.0):
        trainer = trainer_for(tiny_paths, tmp_path, lmbda=lmbda, max_steps=30, per_device_train_batch_size=4)
        trainer.train()
        after = held_out_kl(trainer.model, teacher, tokenizer)
        assert after < 0.8 * before, (lmbda, before, after)
        key = "on_policy_loss" if lmbda == 1.0 else "off_policy_loss"
        losses = logged(trainer, key)
        assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5])


def test_mixed_lmbda_logs_both_kinds_of_slices(tiny_paths, tmp_path):
    trainer = trainer_for(tiny_paths, tmp_path, lmbda=0.5, max_steps=6, gradient_accumulation_steps=4)
    trainer.train()
    fractions = logged(trainer, "on_policy_fraction")
    assert len(fractions) == 6 and 0 < sum(fractions) / 6 < 1
    assert logged(trainer, "on_policy_loss") and logged(trainer, "off_policy_loss")
    for key in (
        "completions/mean_length",
        "completions/truncated_fraction",
        "time/generation_s",
        "time/teacher_s",
        "time/student_s",
        "completion_tokens_per_second",
    ):
        assert logged(trainer, key), key


def test_one_generate_call_per_optimizer_step(tiny_paths, tmp_path):
    trainer = trainer_for(tiny_paths, tmp_path, lmbda=1.0, max_steps=3, gradient_accumulation_steps=4)
    calls, generate = [], trainer.model.generate

    def counting_generate(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return generate(*args, **kwargs)

    trainer.model.generate = counting_generate
    trainer.train()
    assert calls == [8, 8, 8]
    # Each step's log counts the completion tokens it trained: 8 completions of the logged mean length.
    lengths, tokens = logged(trainer, "completions/mean_length"), logged(trainer, "completion_tokens")
    assert len(tokens) == 3 and all(0 < n <= 8 * 12 for n in tokens)
    assert tokens == [round(8 * length) for length in lengths]


def one_sgd_step(tiny_paths, tmp_path, batch, accumulation, **overrides):
    """The weights' change in one plain SGD step of `batch` rows x `accumulation` micro-batches (off-policy unless
    `overrides` say otherwise)."""
    settings = dict(lmbda=0.0, max_steps=1, optim="sgd", learning_rate=1.0, max_grad_norm=0.0)
    settings |= dict(lr_scheduler_type="constant", weight_decay=0.0)
    trainer = trainer_for(
        tiny_paths,
        tmp_path / f"{batch}x{accumulation}",
        **(settings | dict(per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation) | overrides),
    )
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    return {k: start[k] - v for k, v in trainer.model.state_dict().items()}


def test_gradient_does_not_depend_on_gradient_accumulation(tiny_paths, tmp_path):
    whole = one_sgd_step(tiny_paths, tmp_path, batch=8, accumulation=1)
    sliced = one_sgd_step(tiny_paths, tmp_path, batch=2, accumulation=4)
    assert max(v.abs().max().item() for v in whole.values()) > 1e-4  # the step did move the weights
    for name, delta in whole.items():
        torch.testing.assert_close(sliced[name], delta, rtol=1e-4, atol=1e-6, msg=name)


def test_lora_trains_only_the_adapter_and_saves_it(tiny_paths, tmp_path):
    from peft import LoraConfig

    trainer = DistillationTrainer(
        model=tiny_paths["student"],
        teacher_model=tiny_paths["teacher"],
        args=config(tmp_path, max_steps=3),
        train_dataset=dataset(32),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    changed = {k for k, v in trainer.model.state_dict().items() if not torch.equal(v, start[k])}
    assert changed and all("lora_" in k for k in changed)
    trainer.save_model(str(tmp_path / "saved"))
    saved = {p.name for p in (tmp_path / "saved").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= saved and "model.safetensors" not in saved


def test_saves_the_student_and_tokenizer_only(tiny_paths, tmp_path):
    trainer = trainer_for(tiny_paths, tmp_path, max_steps=2, save_strategy="steps", save_steps=2, lmbda=0.0)
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert reloaded.config.num_hidden_layers == 2  # the student, not the 3-layer teacher
    assert (checkpoint / "tokenizer.json").exists()
    assert trainer.evaluate(dataset(8, seed=5))["eval_loss"] > 0


@pytest.mark.slow
def test_chunked_training_matches_dense(tiny_paths, tmp_path):
    """loss_chunk_size changes memory, not the result: same losses and weights as the dense loss, every objective."""
    for beta, loss_top_k in ((0.5, 0), (1.0, 1), (0.0, 5)):
        runs = {}
        for chunk in (None, 3):
            trainer = trainer_for(
                tiny_paths,
                tmp_path,
                lmbda=0.0,
                max_steps=2,
                beta=beta,
                loss_top_k=loss_top_k,
                loss_chunk_size=chunk,
                optim="sgd",  # an update linear in the gradient: Adam's first step is lr * sign(g), noise included
                learning_rate=1.0,
            )
            trainer.train()
            runs[chunk] = (logged(trainer, "off_policy_loss"), trainer.model.state_dict())
        (dense_losses, dense_weights), (chunked_losses, chunked_weights) = runs[None], runs[3]
        assert len(dense_losses) == 2 and dense_losses[0] > 0
        torch.testing.assert_close(chunked_losses, dense_losses, rtol=1e-5, atol=1e-6)
        for name, value in dense_weights.items():
            torch.testing.assert_close(chunked_weights[name], value, rtol=1e-5, atol=1e-6, msg=f"{beta} {name}")


def test_local_teacher_hidden_view_keeps_only_the_last_hidden_state(tiny_paths, tmp_path):
    """The chunked path asks the teacher for its decoder output, never for every layer's hidden states."""
    trainer = trainer_for(tiny_paths, tmp_path, lmbda=0.0, loss_chunk_size=4)
    seen = []
    trainer.teacher_model.register_forward_pre_hook(
        lambda _module, _args, kwargs: seen.append(kwargs.get("output_hidden_states")), with_kwargs=True
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    answer = trainer.teacher(batch)
    width = int(batch["prompt_width"])
    full = trainer.teacher_model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        output_hidden_states=True,
    ).hidden_states[-1]
    assert seen[0] is None
    torch.testing.assert_close(answer.hidden, full[:, width - 1 : -1])
    assert answer.weight.shape[0] == trainer.vocab_size


def test_log_completions_prints_the_steps_generations(tiny_paths, tmp_path, capsys):
    trainer = trainer_for(tiny_paths, tmp_path, max_steps=2, log_completions=True, log_completions_steps=2)
    trainer.train()
    printed = capsys.readouterr().out
    assert "Completions at step 2" in printed and "Completions at step 1" not in printed
    assert "What is" in printed  # the prompts of the arithmetic rows


def test_auto_chunking_falls_back_to_full_logits_for_soft_capped_models(tiny_paths, tmp_path):
    """'auto' cannot reproduce a logit transform after the LM head, so it uses full logits; an explicit size refuses."""
    student = AutoModelForCausalLM.from_pretrained(tiny_paths["student"])
    student.config.final_logit_softcapping = 30.0
    args = config(tmp_path, lmbda=0.0)
    with pytest.warns(UserWarning, match="soft-capping"):
        trainer = DistillationTrainer(
            model=student, teacher_model=tiny_paths["teacher"], args=args, train_dataset=dataset(8)
        )
    assert trainer.objective.chunk_size is None and trainer.objective.student_view == "logits"
    assert trainer.teacher.returns == "logits"
    with pytest.raises(ValueError, match="loss_chunk_size: the student transforms its logits"):
        DistillationTrainer(
            model=student,
            teacher_model=tiny_paths["teacher"],
            args=config(tmp_path, lmbda=0.0, loss_chunk_size=4),
            train_dataset=dataset(8),
        )


def test_vllm_weight_push_of_a_peft_student_is_the_merged_model(tiny_paths):
    """What vLLM receives from a LoRA student: the base model's names, the adapters merged, trained copies of
    `modules_to_save` in place of the originals, and the PEFT model untouched."""
    from peft import LoraConfig, get_peft_model

    from protege.vllm_colocate import student_weights

    base = AutoModelForCausalLM.from_pretrained(tiny_paths["student"])
    names = list(base.state_dict())
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    model = get_peft_model(base, config)
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.add_(1.0)
    before = {n: p.clone() for n, p in model.named_parameters()}
    pushed = dict(student_weights(model))
    assert sorted(pushed) == sorted(names)
    for name, value in model.named_parameters():  # unmerged again: nothing changed
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    reference = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_paths["student"]), config)
    reference.load_state_dict(model.state_dict())
    expected = reference.merge_and_unload().state_dict()
    for name in names:
        torch.testing.assert_close(pushed[name], expected[name], rtol=1e-6, atol=1e-6, msg=name)
    original = AutoModelForCausalLM.from_pretrained(tiny_paths["student"]).state_dict()
    assert not torch.equal(
        pushed["model.layers.0.self_attn.q_proj.weight"], original["model.layers.0.self_attn.q_proj.weight"]
    )
    torch.testing.assert_close(pushed["lm_head.weight"], original["lm_head.weight"] + 1.0)


def test_each_log_is_one_short_line_and_the_full_log_stays_in_the_state(tiny_paths, tmp_path, capsys):
    """With the progress bar off, a log prints as `step N: loss ...  on-policy ...`, not as its ~700-character dict;
    trainer.state.log_history keeps every key for trackers and the JSON state."""
    trainer = trainer_for(tiny_paths, tmp_path, max_steps=2, logging_steps=1, disable_tqdm=True)
    trainer.train()
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in printed] == ["step 1", "step 2", "step 2"]  # 2 logs, then the summary
    assert printed[0].startswith("step 1: loss ") and " on-policy 100%" in printed[0]
    assert printed[-1].startswith("step 2: train loss ")
    logged_keys = set(trainer.state.log_history[0])
    assert {"grad_norm", "time/teacher_s", "completion_tokens", "on_policy_reverse_kl_estimate"} <= logged_keys

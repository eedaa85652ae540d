"""Bad inputs fail at construction, before any training, with a message that says what and where."""

from __future__ import annotations

import pytest
from datasets import Dataset
from tiny import config, dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from protege import DistillationTrainer
from protege.toy import tiny_model, train_tokenizer


def build(tiny_paths, tmp_path, train, **overrides):
    return DistillationTrainer(
        model=tiny_paths["student"],
        teacher_model=tiny_paths["teacher"],
        args=config(tmp_path, **overrides),
        train_dataset=train,
    )


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


GOOD = {"messages": [user("What is 1+1?"), assistant("1+1=2")]}


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ({"messages": [user(""), assistant("2")]}, r"row 3: the prompt is empty"),
        ({"messages": [assistant("hi"), assistant("2")]}, r"row 3: the prompt has no user message"),
        (
            {"messages": [user("a"), {"role": "system", "content": "s"}, assistant("2")]},
            r"row 3: messages\[1\] is a system message after the first position",
        ),
        ({"messages": [user("a"), {"role": "robot", "content": "x"}]}, r"row 3: messages\[1\] has role 'robot'"),
        (
            {"messages": [user("a"), {"role": "assistant", "content": None}]},
            r"row 3: messages\[1\] content must be a string, got NoneType",
        ),
        ({"messages": [user("a")]}, r"row 3 has no completion, but lmbda < 1"),
    ],
)
def test_bad_message_rows_name_the_row(tiny_paths, tmp_path, bad_row, message):
    rows = [GOOD, GOOD, GOOD, bad_row, GOOD]
    with pytest.raises(ValueError, match=message):
        build(tiny_paths, tmp_path, Dataset.from_list(rows), lmbda=0.5)


def test_prompt_only_rows_are_fine_on_policy(tiny_paths, tmp_path):
    rows = [{"messages": [user(f"What is {i}+1?")]} for i in range(8)]
    trainer = build(tiny_paths, tmp_path, Dataset.from_list(rows), lmbda=1.0, max_steps=1)
    trainer.train()
    assert trainer.state.log_history[0]["loss"] > 0  # no NaN from a zero token count, unlike TRL 1.7-1.8


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"question": "a", "answer": "b"}], r"needs a 'messages' column or 'prompt'"),
        ([{"prompt": "What is 1+1?", "completion": ["2"]}], r"row 0: 'prompt' is a string, so 'completion' must be"),
        ([{"prompt": "   ", "completion": "2"}], r"row 0: the prompt is empty"),
        ([{"prompt": 5, "completion": "2"}], r"row 0: 'prompt' must be a string or a list of messages, got int"),
        ([{"prompt": [user("a")], "completion": [user("b")]}], r"row 0: the completion must start with an assistant"),
    ],
)
def test_bad_prompt_completion_rows(tiny_paths, tmp_path, rows, message):
    with pytest.raises(ValueError, match=message):
        build(tiny_paths, tmp_path, Dataset.from_list(rows), lmbda=0.0)


def test_prompt_completion_formats_train(tiny_paths, tmp_path):
    plain = Dataset.from_list([{"prompt": f"{i}+1=", "completion": f"{i + 1}"} for i in range(8)])
    chat = Dataset.from_list([{"prompt": [user(f"{i}+1?")], "completion": [assistant(f"{i + 1}")]} for i in range(8)])
    for train in (plain, chat):
        trainer = build(tiny_paths, tmp_path, train, lmbda=0.0, max_steps=1)
        first = trainer.train_dataset[0]
        assert first["completion_ids"][-1] == trainer.processing_class.eos_token_id
        trainer.train()


def test_prompts_are_truncated_from_the_left_on_request(tiny_paths, tmp_path):
    long = {"messages": [user("noise " * 40 + "What is 2+2?"), assistant("2+2=4")]}
    with pytest.warns(UserWarning, match=r"4 of 4 prompts .* cut from the left to their last 16 tokens"):
        trainer = build(
            tiny_paths,
            tmp_path,
            Dataset.from_list([long] * 4),
            lmbda=0.0,
            max_prompt_length=16,
            prompt_truncation="left",
        )
    row = trainer.train_dataset[0]
    assert len(row["prompt_ids"]) == 16
    text = trainer.processing_class.decode(row["prompt_ids"])
    assert text.endswith("<|im_start|>assistant\n") and "2+2?" in text
    assert len(row["prompt_ids"]) + len(row["completion_ids"]) <= 48


def save_teacher(folder, tokenizer, rows):
    model = tiny_model(rows, 2, 32, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_padded_teacher_output_layer_is_accepted(tiny_paths, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_paths["student"])
    teacher = save_teacher(tmp_path / "padded", tokenizer, len(tokenizer) + 64)
    trainer = DistillationTrainer(
        model=tiny_paths["student"], teacher_model=teacher, args=config(tmp_path, max_steps=1), train_dataset=dataset(8)
    )
    assert trainer.vocab_size == len(tokenizer)
    trainer.train()


def test_teacher_smaller_than_tokenizer_is_refused(tiny_paths, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_paths["student"])
    teacher = save_teacher(tmp_path / "small", tokenizer, len(tokenizer) - 10)
    with pytest.raises(
        ValueError,
        match=rf"teacher's output layer has {len(tokenizer) - 10} rows but the tokenizer "
        rf"has {len(tokenizer)} tokens",
    ):
        DistillationTrainer(
            model=tiny_paths["student"], teacher_model=teacher, args=config(tmp_path), train_dataset=dataset(8)
        )


def test_teacher_with_another_tokenizer_is_refused(tiny_paths, tmp_path):
    other = train_tokenizer(["completely different words here"] * 20, vocab_size=300)
    teacher = save_teacher(tmp_path / "other", other, len(AutoTokenizer.from_pretrained(tiny_paths["student"])))
    with pytest.raises(ValueError, match=r"the teacher's tokenizer differs from the student's"):
        DistillationTrainer(
            model=tiny_paths["student"], teacher_model=teacher, args=config(tmp_path), train_dataset=dataset(8)
        )


def test_teacher_init_kwargs_with_a_built_teacher_is_refused(tiny_paths, tmp_path):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_paths["teacher"])
    with pytest.raises(ValueError, match=r"teacher_model_init_kwargs were given but the teacher is already built"):
        DistillationTrainer(
            model=tiny_paths["student"],
            teacher_model=teacher,
            args=config(tmp_path, teacher_model_init_kwargs={"dtype": "float32"}),
            train_dataset=dataset(8),
        )


def test_string_dtype_in_init_kwargs_loads(tiny_paths, tmp_path):
    trainer = DistillationTrainer(
        model=tiny_paths["student"],
        teacher_model=tiny_paths["teacher"],
        args=config(
            tmp_path, model_init_kwargs='{"dtype": "bfloat16"}', teacher_model_init_kwargs={"dtype": "float32"}
        ),
        train_dataset=dataset(8),
    )
    assert next(trainer.model.parameters()).dtype.is_floating_point
    assert str(next(trainer.model.parameters()).dtype) == "torch.bfloat16"


def test_missing_teacher_is_refused(tiny_paths, tmp_path):
    with pytest.raises(ValueError, match=r"no teacher: pass teacher_model or set teacher_model_name_or_path"):
        DistillationTrainer(model=tiny_paths["student"], args=config(tmp_path), train_dataset=dataset(8))

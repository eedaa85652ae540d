"""The dataset policy, exactly: how prompts and completions are cut, the one warning that counts them, and the errors
that name the row (role order, None and empty messages, rows over a limit known at start)."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
from datasets import Dataset
from tiny import config
from transformers import AutoTokenizer

from protege import DistillationConfig, DistillationTrainer
from protege.data import ORDER_RULE, SequenceLimit, Tokenizer, cut_prompt, sequence_limit, split_row, tokenize_dataset


def message(role, text, **extra):
    return {"role": role, "content": text, **extra}


def system(text):
    return message("system", text)


def user(text):
    return message("user", text)


def assistant(text, **extra):
    return message("assistant", text, **extra)


def tool(text):
    return message("tool", text)


@pytest.fixture(scope="module")
def tok(tiny_paths):
    return AutoTokenizer.from_pretrained(tiny_paths["student"])


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tok, messages: list[dict]) -> list[int]:
    return ids(tok, tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


# ----- Truncation -----


def test_cut_prompt_keeps_both_ends_or_the_end():
    assert cut_prompt(list(range(10)), 4, "middle") == [0, 1, 8, 9]
    assert cut_prompt(list(range(10)), 5, "middle") == [0, 1, 2, 8, 9]  # an odd budget gives the start the extra one
    assert cut_prompt(list(range(10)), 1, "middle") == [0]
    assert cut_prompt(list(range(10)), 4, "left") == [6, 7, 8, 9]
    assert cut_prompt(list(range(4)), 4, "middle") == [0, 1, 2, 3]


def test_middle_cut_keeps_the_template_start_and_the_question_end(tok):
    messages = [system("Be brief."), user("noise " * 30 + "What is 2+2?")]
    full = prompt_ids(tok, messages)
    out = Tokenizer(tok, 50, 64)({"messages": messages}, 0, False)
    assert out["prompt_ids"] == full[:25] + full[-25:]
    assert out["prompt_tokens_cut"] == len(full) - 50
    text = tok.decode(out["prompt_ids"])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("is 2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_left_cut_keeps_the_end_only(tok):
    messages = [system("Be brief."), user("noise " * 30 + "What is 2+2?")]
    full = prompt_ids(tok, messages)
    out = Tokenizer(tok, 40, 64, prompt_truncation="left")({"messages": messages}, 0, False)
    assert out["prompt_ids"] == full[-40:]
    assert not tok.decode(out["prompt_ids"]).startswith("<|im_start|>system")


def test_error_policy_refuses_a_long_prompt_naming_the_row(tok):
    row = {"prompt": "noise " * 10 + "What is 2+2?", "completion": "4"}
    length = len(ids(tok, row["prompt"]))
    with pytest.raises(ValueError) as error:
        Tokenizer(tok, 16, 32, prompt_truncation="error")(row, 7, True)
    assert str(error.value) == (
        f"row 7: the prompt has {length} tokens, over max_prompt_length=16; prompt_truncation='error' refuses such "
        "rows ('middle' keeps their first and last tokens)"
    )


def test_without_max_prompt_length_the_prompt_keeps_one_token_for_the_completion(tok):
    row = {"prompt": "noise " * 10, "completion": "4"}
    out = Tokenizer(tok, None, 12)(row, 0, True)
    assert len(out["prompt_ids"]) == 11
    assert out["completion_ids"] == ids(tok, "4")  # the EOS did not fit
    assert out["completion_tokens_cut"] == 1


def test_a_cut_completion_has_no_eos_and_is_marked(tok):
    eos = tok.eos_token_id
    plain = {"prompt": "What is 2+2?", "completion": "2+2=4"}
    prompt, whole = ids(tok, "What is 2+2?"), ids(tok, "2+2=4")  # the completion: these and the EOS
    out = Tokenizer(tok, len(prompt), len(prompt) + 4)(plain, 0, True)
    assert (out["prompt_ids"], out["completion_ids"]) == (prompt, whole[:4])
    assert (out["prompt_tokens_cut"], out["completion_tokens_cut"]) == (0, len(whole) + 1 - 4)
    uncut = Tokenizer(tok, len(prompt), len(prompt) + len(whole) + 1)(plain, 0, True)
    assert (uncut["completion_ids"], uncut["completion_tokens_cut"]) == ([*whole, eos], 0)

    chat = {"messages": [user("What is 2+2?"), assistant("2+2=4")]}
    room = 3
    prompt = prompt_ids(tok, chat["messages"][:1])
    out = Tokenizer(tok, len(prompt), len(prompt) + room)(chat, 0, True)
    assert out["completion_ids"] == whole[:room] and eos not in out["completion_ids"]
    assert out["completion_tokens_cut"] == len(whole) + 1 - room


def rows_with_cuts(tok) -> tuple[Dataset, int]:
    """Six plain rows: rows 1 and 4 with prompts over 16 tokens, rows 4 and 5 with completions over what is left of
    24 tokens; and the longest prompt's length."""
    short, long = "What is 1+1?", "noise " * 4 + "What is 1+1?"
    rows = [{"prompt": short, "completion": "2"} for _ in range(6)]
    rows[1]["prompt"] = long
    rows[4] = {"prompt": long + " and 2+2?", "completion": "1+1=2 " * 4}
    rows[5]["completion"] = "1+1=2 " * 4
    return Dataset.from_list(rows), len(ids(tok, long + " and 2+2?"))


def test_one_warning_counts_the_cut_prompts_and_completions(tok):
    dataset, longest = rows_with_cuts(tok)
    with pytest.warns(UserWarning) as record:
        rows = tokenize_dataset(dataset, Tokenizer(tok, 16, 24), needs_completion=True, name="train_dataset")
    assert [str(w.message) for w in record] == [
        f"train_dataset: 2 of 6 prompts were longer than max_prompt_length=16 (the longest {longest} tokens) and "
        "were cut in the middle to their first 8 and last 8 tokens (prompt_truncation='middle'): rows 1, 4; "
        "2 of 6 completions were cut at the end to fit max_length=24, losing their EOS, so they train as unfinished "
        "text: rows 4, 5."
    ]
    assert [bool(n) for n in rows["prompt_tokens_cut"]] == [False, True, False, False, True, False]
    assert [bool(n) for n in rows["completion_tokens_cut"]] == [False, False, False, False, True, True]
    assert all(len(p) + len(c) <= 24 for p, c in zip(rows["prompt_ids"], rows["completion_ids"]))


def test_unused_completions_are_not_reported_and_many_rows_are_summarised(tok):
    dataset = Dataset.from_list([{"prompt": "noise " * 4 + "What is 1+1?", "completion": "1+1=2 " * 4}] * 7)
    longest = len(ids(tok, dataset[0]["prompt"]))
    with pytest.warns(UserWarning) as record:
        tokenize_dataset(
            dataset, Tokenizer(tok, 16, 24, "left"), needs_completion=False, uses_completion=False, on_policy=True
        )
    assert [str(w.message) for w in record] == [
        f"dataset: 7 of 7 prompts were longer than max_prompt_length=16 (the longest {longest} tokens) and were cut "
        "from the left to their last 16 tokens (prompt_truncation='left'): rows 0, 1, 2, 3, 4 and 2 more."
    ]


def test_nothing_cut_nothing_said(tok):
    dataset = Dataset.from_list([{"messages": [user("What is 1+1?"), assistant("2")]}] * 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = tokenize_dataset(dataset, Tokenizer(tok, 36, 48), needs_completion=True)
    assert list(rows["prompt_tokens_cut"]) == [0, 0, 0] and list(rows["completion_tokens_cut"]) == [0, 0, 0]


def test_a_streamed_dataset_warns_at_its_first_cut_row(tok):
    dataset, _ = rows_with_cuts(tok)
    streamed = tokenize_dataset(dataset.to_iterable_dataset(), Tokenizer(tok, 16, 24), True, name="train_dataset")
    with pytest.warns(UserWarning) as record:
        rows = list(streamed)
    cut = rows[1]["prompt_tokens_cut"]
    assert [str(w.message) for w in record] == [
        f"train_dataset (streamed): row 1 was cut: its prompt lost {cut} tokens, cut in the middle to their first 8 "
        "and last 8 tokens (prompt_truncation='middle'). A streamed dataset is tokenized during training, so its cut "
        "rows cannot be counted up front; later ones are not reported."
    ]


def test_the_trainer_cuts_in_the_middle_and_warns_once(tiny_paths, tmp_path):
    rows = [{"messages": [user("noise " * 40 + "What is 2+2?"), assistant("2+2=4")]}] * 4
    with pytest.warns(UserWarning, match=r"train_dataset: 4 of 4 prompts were longer than max_prompt_length=36"):
        trainer = DistillationTrainer(
            model=tiny_paths["student"],
            teacher_model=tiny_paths["teacher"],
            args=config(tmp_path, lmbda=0.0, max_prompt_length=36),
            train_dataset=Dataset.from_list(rows),
        )
    row = trainer.train_dataset[0]
    text = trainer.processing_class.decode(row["prompt_ids"])
    assert len(row["prompt_ids"]) == 36 and row["completion_tokens_cut"] == 0
    assert text.startswith("<|im_start|>user\nnoise") and text.endswith("2+2?<|im_end|>\n<|im_start|>assistant\n")


# ----- Malformed conversations -----


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (
            {"messages": [assistant("2"), user("What is 1+1?")]},
            f"row 2: messages[0] has role 'assistant' before any user message; {ORDER_RULE}",
        ),
        (
            {"messages": [system("s"), assistant("2"), user("What is 1+1?"), assistant("2")]},
            f"row 2: messages[1] has role 'assistant' before any user message; {ORDER_RULE}",
        ),
        (
            {"messages": [user("What is"), user("1+1?")]},
            f"row 2: messages[1] has role 'user' right after role 'user' (merge them into one message); {ORDER_RULE}",
        ),
        (
            {"messages": [user("a"), user("b"), assistant("c")]},
            f"row 2: messages[1] has role 'user' right after role 'user' (merge them into one message); {ORDER_RULE}",
        ),
        (
            {"messages": [user("a"), tool("r"), assistant("c")]},
            f"row 2: messages[1] has role 'tool' right after role 'user'; {ORDER_RULE}",
        ),
        (
            {"messages": [user("a"), assistant("b"), tool("r"), user("c")]},
            f"row 2: messages[3] has role 'user' right after role 'tool'; {ORDER_RULE}",
        ),
        (
            {"prompt": [assistant("x"), user("y")], "completion": [assistant("z")]},
            f"row 2: prompt[0] has role 'assistant' before any user message; {ORDER_RULE}",
        ),
        (
            {"prompt": [user("a")], "completion": [assistant("b"), assistant("c")]},
            f"row 2: completion[1] has role 'assistant' right after role 'assistant' (merge them into one message); "
            f"{ORDER_RULE}",
        ),
        (
            {"prompt": [user("a")], "completion": [assistant("b"), tool("r")]},
            "row 2: the completion ends with a 'tool' message (completion[1]); it must end with an assistant turn to "
            "be distilled",
        ),
        (
            {"messages": [user("a"), assistant("b"), assistant("c")]},
            "row 2: the prompt ends with an assistant message, so the completion would continue it; the turn before "
            "the completion must be a user or tool message",
        ),
    ],
)
def test_role_order_errors_name_the_row_and_the_rule(row, expected):
    with pytest.raises(ValueError) as error:
        split_row(row, 2)
    assert str(error.value) == expected


def test_sensible_conversations_pass():
    called = assistant("", tool_calls=[{"type": "function", "function": {"name": "add", "arguments": "{}"}}])
    agent = [system("s"), user("a"), called, tool("1"), tool("2"), assistant("3")]
    assert split_row({"messages": agent}, 0) == (agent[:-1], agent[-1:])
    history = [user("a"), assistant("b"), user("c")]
    assert split_row({"messages": history}, 0) == (history, None)  # prompt-only, for on-policy training


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"messages": None}, "row 2: 'messages' is None"),
        ({"messages": None, "prompt": None, "completion": None}, "row 2: 'messages' and 'prompt' are None"),
        ({"prompt": None}, "row 2: 'prompt' is None"),
    ],
)
def test_none_rows_say_which_column_is_none(row, expected):
    with pytest.raises(ValueError) as error:
        split_row(row, 2)
    assert str(error.value) == f"{expected}; a row needs a list of messages in 'messages', or a 'prompt' (and a " + (
        "'completion')"
    )


def test_mixed_formats_still_fall_back_to_the_other_column():
    # In a dataset holding both shapes, each row has every column, None where it uses the other shape.
    assert split_row({"messages": None, "prompt": "a", "completion": "b"}, 1) == ("a", "b")


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (
            {"messages": [user("a"), assistant("")]},
            "row 2: the completion is empty: messages[1] (assistant) has no content",
        ),
        (
            {"messages": [user("a"), assistant(" \n")]},
            "row 2: the completion is empty: messages[1] (assistant) has no content",
        ),
        (
            {"prompt": [user("a")], "completion": [assistant("")]},
            "row 2: the completion is empty: completion[0] (assistant) has no content",
        ),
        ({"prompt": "a", "completion": ""}, "row 2: the completion is empty"),
        ({"prompt": "a", "completion": "  "}, "row 2: the completion is empty"),
    ],
)
def test_empty_completions_are_refused_in_every_format(row, expected):
    with pytest.raises(ValueError) as error:
        split_row(row, 2)
    assert str(error.value) == expected


def test_malformed_rows_fail_at_construction_even_on_policy(tiny_paths, tmp_path):
    good = {"messages": [user("What is 1+1?"), assistant("1+1=2")]}
    for bad, expected in (
        ({"messages": [assistant("1+1=2"), user("What is 1+1?")]}, "row 3: messages[0] has role 'assistant' before"),
        ({"messages": None}, "row 3: 'messages' is None"),
    ):
        with pytest.raises(ValueError, match=expected.replace("[", r"\[").replace("]", r"\]")):
            DistillationTrainer(
                model=tiny_paths["student"],
                teacher_model=tiny_paths["teacher"],
                args=config(tmp_path, lmbda=1.0),
                train_dataset=Dataset.from_list([good, good, good, bad]),
            )


# ----- Limits known at start (max_length=None) -----

SERVER = SequenceLimit(20, "the teacher server's max_model_len")


def test_an_off_policy_row_over_the_limit_names_the_row(tok):
    row = {"prompt": "What is 2+2?", "completion": "noise " * 3}
    p, c = len(ids(tok, row["prompt"])), len(ids(tok, row["completion"])) + 1
    with pytest.raises(ValueError) as error:
        Tokenizer(tok, None, None, max_completion_length=4, limit=SERVER)(row, 4, True, uses_completion=True)
    assert str(error.value) == (
        f"row 4: prompt and completion are {p} + {c} = {p + c} tokens, over the teacher server's max_model_len (20); "
        "set max_length (at most 20) to cut rows to fit, or drop the row"
    )


def test_an_on_policy_prompt_without_room_to_generate_names_the_row(tok):
    row = {"messages": [user("What is 2+2?")]}
    p = len(prompt_ids(tok, row["messages"]))
    rows = Tokenizer(tok, None, None, max_completion_length=12, limit=SequenceLimit(p + 11, "the student's x"))
    with pytest.raises(ValueError) as error:
        rows(row, 4, False, uses_completion=False, on_policy=True)
    assert str(error.value) == (
        f"row 4: the prompt has {p} tokens, so with max_completion_length=12 a generated sequence can reach {p + 12} "
        f"tokens, over the student's x ({p + 11}); set max_length (at most {p + 11}) to cut rows to fit, or drop the "
        "row"
    )
    assert rows(row, 4, False, uses_completion=False, on_policy=False)["prompt_ids"]  # off-policy: nothing to send


def test_an_unused_long_completion_is_not_refused(tok):
    row = {"prompt": "What is 2+2?", "completion": "noise " * 10}
    Tokenizer(tok, None, None, max_completion_length=4, limit=SERVER)(
        row, 0, False, uses_completion=False, on_policy=True
    )


def positions(n):
    return SimpleNamespace(config=SimpleNamespace(max_position_embeddings=n))


def test_the_known_limit_is_the_smallest_that_applies():
    models = {"student": positions(512), "teacher": positions(1024)}
    assert sequence_limit(None, 4096, models) == SequenceLimit(512, "the student's max_position_embeddings")
    assert sequence_limit(None, 300, models) == SequenceLimit(300, "the teacher server's max_model_len")
    # An explicit max_length overrides model positions (rotary models run past them), never a server's limit.
    assert sequence_limit(1024, 4096, models) == SequenceLimit(4096, "the teacher server's max_model_len")
    assert sequence_limit(1024, None, models) is None
    assert sequence_limit(None, None, {"student": positions(512), "teacher": None}) == SequenceLimit(
        512, "the student's max_position_embeddings"
    )


def test_max_length_none_refuses_a_row_over_the_models_positions_at_start(tiny_paths, tmp_path):
    good = {"messages": [user("What is 1+1?")]}
    long = {"messages": [user("noise " * 120 + "What is 1+1?")]}  # over the tiny models' 512 positions
    with pytest.raises(
        ValueError,
        match=r"row 2: the prompt has \d+ tokens, so with max_completion_length=12 .* over "
        r"the student's max_position_embeddings \(512\)",
    ):
        DistillationTrainer(
            model=tiny_paths["student"],
            teacher_model=tiny_paths["teacher"],
            args=config(tmp_path, max_length=None),
            train_dataset=Dataset.from_list([good, good, long, good]),
        )


def test_max_length_none_refuses_a_row_over_the_servers_max_model_len_at_start(tiny_paths, tmp_path):
    """A real teacher server on 127.0.0.1 whose /info/ says max_model_len 40: its limit is known at start."""
    from conftest import ThreadedUvicorn

    from protege.server.app import ServerLimits, create_app
    from protege.server.backends import TransformersBackend

    limits = ServerLimits(max_model_len=40)
    with ThreadedUvicorn(
        create_app(TransformersBackend(tiny_paths["teacher"], device="cpu"), limits), limits
    ) as server:
        _refuses_rows_over_the_servers_limit(tiny_paths, tmp_path, server.url)


def _refuses_rows_over_the_servers_limit(tiny_paths, tmp_path, url: str) -> None:
    good = {"messages": [user("What is 1+1?"), assistant("1+1=2")]}
    long = {"messages": [user("What is 1+1?"), assistant("1+1=2 " * 8)]}
    args = config(
        tmp_path,
        max_length=None,
        lmbda=0.0,
        beta=0.0,
        loss_top_k=1,
        use_teacher_server=True,
        teacher_model_server_url=url,
    )
    with pytest.raises(
        ValueError,
        match=r"row 1: prompt and completion are \d+ \+ \d+ = \d+ tokens, over the teacher "
        r"server's max_model_len \(40\); set max_length \(at most 40\)",
    ):
        DistillationTrainer(model=tiny_paths["student"], args=args, train_dataset=Dataset.from_list([good, long]))
    trainer = DistillationTrainer(model=tiny_paths["student"], args=args, train_dataset=Dataset.from_list([good] * 4))
    assert trainer._row_tokenizer.limit == SequenceLimit(40, "the teacher server's max_model_len")


# ----- Config -----


def test_config_refuses_a_prompt_budget_without_room_and_unknown_policies(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"max_prompt_length=100 is not allowed: it must be smaller than max_length "
        r"\(100\)",
    ):
        DistillationConfig(output_dir=str(tmp_path), max_length=100, max_completion_length=10, max_prompt_length=100)
    with pytest.raises(
        ValueError,
        match=r"prompt_truncation='right' is not allowed: it must be one of \('middle', "
        r"'left', 'error'\)",
    ):
        DistillationConfig(output_dir=str(tmp_path), prompt_truncation="right")
    assert DistillationConfig(output_dir=str(tmp_path), max_length=None, max_prompt_length=100).max_prompt_length == 100

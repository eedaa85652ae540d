"""The other tokenizer of the cross-tokenizer walks comparison (benchmarks/cross_tokenizer.py): a byte-level BPE
trained on walk text, whose merges join nodes, and how the alignment groups walks between it and the demo's."""

from __future__ import annotations

MERGES = 108  # as many as the graph has edges; on random walks, 2.2 nodes a token
TOKENIZER_WALKS = 4000  # rows of walk text the BPE is trained on (its own stream, seed 0, for every seed)


def chatml(backend):
    """A `tokenizers` backend as a fast tokenizer with the demo's special tokens and ChatML template."""
    from transformers import PreTrainedTokenizerFast

    from protege.toy import CHAT_TEMPLATE

    special = dict(pad_token="<|endoftext|>", eos_token="<|im_end|>", bos_token=None, chat_template=CHAT_TEMPLATE)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


def walk_tokenizer(merges: int = MERGES):
    """A byte-level BPE trained on walk text, without GPT-2's split of letters from digits, so its merges join nodes
    of both kinds into multi-node tokens; ChatML template and special tokens as the demo tokenizer's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from protege.demo.walks import Walks
    from protege.toy import SPECIAL_TOKENS

    rows = Walks().training_problems(TOKENIZER_WALKS, 0, stream="crosstok-tokenizer")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    size = len(alphabet) + len(SPECIAL_TOKENS) + merges
    trainer = trainers.BpeTrainer(
        vocab_size=size, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator([text for p in rows for text in ("".join(p.prefix), "".join(p.walk))], trainer)
    return chatml(backend)


def group_sizes(student_tokenizer, teacher_tokenizer, texts: list[str]) -> dict[str, float]:
    """How the alignment groups `texts` (completions without their end of turn): tokens per group on each side."""
    from protege.alignment import align_spans, text_tokens

    student = teacher = groups = multi = 0
    for text in texts:
        _, student_spans = text_tokens(student_tokenizer, text)
        teacher_ids, teacher_spans = text_tokens(teacher_tokenizer, text)
        student_row, _, count = align_spans(student_spans, teacher_spans)
        student, teacher, groups = student + len(student_spans), teacher + len(teacher_ids), groups + count
        multi += sum(int((student_row == g).sum()) > 1 for g in range(count))
    return {
        "teacher_tokens_per_walk": teacher / len(texts),
        "student_tokens_per_group": student / groups,
        "teacher_tokens_per_group": teacher / groups,
        "multi_token_groups": multi / groups,
    }

"""The demo's task: add two 6-digit numbers (whose sum has 6 digits) column by column, carrying, then the answer.

A problem is a chat turn; the completion is a worked chain, one line per column from the ones up, then the answer::

    user:       482130+359712
    assistant:  0+2+0=02
                3+1+0=04
                1+7+0=08
                2+9+0=11
                8+5+1=14
                4+3+1=08
                answer: 841842

Each line adds the column's two digits and the carry written on the line before (the tens digit of its sum), and the
answer reads the ones digits back from the last line to the first. So one slip early in the chain (a wrong digit, a
dropped carry) is copied forward and makes the final answer wrong: the kind of task where a student that never saw its
own mistakes during training derails at generation time.

Sums are kept to 6 digits so that the answer line always has the same layout; with 7-digit sums mixed in, small models
spend most of their errors on reading the answer back rather than on the chain, which is not the point of the demo.

Everything is generated from seeds. The held-out problems are drawn first and the training problems exclude them, so
accuracy is always measured on problems no model trained on.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .tasks import distinct_problems, problems_excluding

ASSETS = Path(__file__).parent / "assets"
DIGITS = 6
# Words the tokenizer keeps whole (the chat roles and the answer marker); digits and symbols stay single characters.
WHOLE_WORDS = ("system", "user", "assistant", "answer")
_ANSWER = re.compile(r"answer: (\d+)")


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def answer(self) -> int:
        return self.a + self.b


def random_problem(rng: random.Random, digits: int = DIGITS) -> Problem:
    """Two `digits`-digit numbers whose sum has `digits` digits too (uniform over such pairs)."""
    low, high = 10 ** (digits - 1), 10**digits - 1
    while True:
        problem = Problem(rng.randint(low, high), rng.randint(low, high))
        if problem.answer <= high:
            return problem


def held_out_problems(count: int, seed: int = 0, digits: int = DIGITS) -> list[Problem]:
    """`count` distinct problems for evaluation, the same for a given seed."""
    rng = random.Random(f"protege-demo-held-out-{seed}")
    return distinct_problems(lambda r: random_problem(r, digits), count, rng)


def training_problems(
    count: int, seed: int = 0, exclude: Iterable[Problem] = (), digits: int = DIGITS, stream: str = "train"
) -> list[Problem]:
    """`count` problems for training, none of them in `exclude` (pass the held-out problems)."""
    rng = random.Random(f"protege-demo-{stream}-{seed}")
    return problems_excluding(lambda r: [random_problem(r, digits)], count, rng, exclude)


def steps(problem: Problem) -> list[str]:
    """The chain's column lines, ones first: 'x+y+carry=sum', the sum written with two digits."""
    a, b = str(problem.a)[::-1], str(problem.b)[::-1]
    carry, lines = 0, []
    for column in range(max(len(a), len(b))):
        x = int(a[column]) if column < len(a) else 0
        y = int(b[column]) if column < len(b) else 0
        total = x + y + carry
        lines.append(f"{x}+{y}+{carry}={total:02d}")
        carry = total // 10
    return lines


def worked_solution(problem: Problem) -> str:
    """The reference completion: the column lines, then 'answer: N'."""
    return "\n".join([*steps(problem), f"answer: {problem.answer}"])


def prompt_messages(problem: Problem) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{problem.a}+{problem.b}"}]


def conversation(problem: Problem) -> list[dict[str, str]]:
    """Prompt and reference completion as chat `messages` (the completion is the final assistant turn)."""
    return [*prompt_messages(problem), {"role": "assistant", "content": worked_solution(problem)}]


def parse_problem(prompt: str) -> Problem:
    """The problem of a prompt such as '482130+359712'."""
    match = re.fullmatch(r"\s*(\d+)\+(\d+)\s*", prompt)
    if match is None:
        raise ValueError(f"not an addition prompt: {prompt!r}")
    return Problem(int(match.group(1)), int(match.group(2)))


def parse_answer(completion: str) -> int | None:
    """The final answer of a completion: its last line must read 'answer: N'; None if it does not."""
    lines = completion.strip().splitlines()
    match = _ANSWER.fullmatch(lines[-1].strip()) if lines else None
    return int(match.group(1)) if match else None


def score(completion: str, problem: Problem) -> float:
    """Exact match of the final answer: 1.0 or 0.0."""
    return float(parse_answer(completion) == problem.answer)


def first_wrong_line(completion: str, problem: Problem) -> int | None:
    """Number of the first line of the completion that differs from the reference chain, counting from 1 (line 1 is
    the ones column, line 7 the answer); None if all match. One convention for results.json and the console."""
    got, want = completion.strip().splitlines(), worked_solution(problem).splitlines()
    for index in range(max(len(got), len(want))):
        if index >= len(got) or index >= len(want) or got[index].strip() != want[index]:
            return index + 1
    return None


@dataclass(frozen=True)
class Addition:
    """This task behind the demo's `Task` interface (`tasks.py`), for `digits`-digit numbers."""

    digits: int = DIGITS
    name = "addition"
    version = 2
    metric = "exact-match accuracy"
    line_one = "the ones column"
    prompt_format = "'A+B'"

    @property
    def description(self) -> str:
        return f"{self.digits}-digit addition worked column by column, then the answer"

    def held_out_problems(self, count: int, seed: int) -> list[Problem]:
        return held_out_problems(count, seed, self.digits)

    def training_problems(
        self, count: int, seed: int, exclude: Iterable[Problem] = (), stream: str = "train"
    ) -> list[Problem]:
        return training_problems(count, seed, exclude, self.digits, stream)

    prompt_messages = staticmethod(prompt_messages)
    conversation = staticmethod(conversation)
    score = staticmethod(score)
    first_wrong_line = staticmethod(first_wrong_line)
    parse_problem = staticmethod(parse_problem)

    @staticmethod
    def canonical(problem: Problem) -> Problem:
        """Addition has one correct chain: the problem as it is."""
        return problem


# ----- Tokenizer: byte-level, one token per digit and symbol, shipped in assets/ -----


def build_tokenizer():
    """A byte-level BPE whose only merges spell the WHOLE_WORDS, with protege's ChatML template."""
    from protege.toy import train_tokenizer

    return train_tokenizer(list(WHOLE_WORDS) * 8, vocab_size=300)


def save_tokenizer(folder: str | Path = ASSETS) -> None:
    """Write tokenizer.json and tokenizer_config.json (template included); run once, the files are committed."""
    build_tokenizer().save_pretrained(str(folder), save_jinja_files=False)


def load_tokenizer(folder: str | Path = ASSETS):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


if __name__ == "__main__":  # python -m protege.demo.task regenerates the shipped tokenizer
    save_tokenizer()
    print(f"saved the demo tokenizer to {ASSETS}")

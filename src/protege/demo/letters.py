"""The demo's second task: write every letter of a set once, one per line, in any order.

A problem is a chat turn listing 12 distinct lowercase letters; any order of them is a correct answer::

    user:       q,d,m,a,z,k,b,x,e,r,t,h
    assistant:  m
                a
                q
                ...     (12 lines, each letter of the set exactly once)

The verifier (`Letters.score`) accepts all 12! = 479,001,600 orders and nothing else: a letter outside the set, a
letter written twice, a missing or an extra line makes the answer invalid. The teacher is trained on uniformly random
orders, several per prompt, so it learns "any letter not written yet, each as likely": a distribution with very many
modes rather than one reference answer.

Why this shape, when on 6-digit addition every distillation method ended in the same place (docs/benchmarks.md, "A
task where the student's own mistakes matter: protocol", has the full rationale and the fixed evaluation protocol):

- Keeping track of which letters are already written needs the model to tell 26 letters apart in its hidden state.
  The teacher (hidden size 128) can; the student (hidden size 16, fewer dimensions than letters) cannot do it
  exactly, so it is under-capacity by construction, and leaks probability onto letters it already wrote.
- Under sampling at temperature 1, that leak turns into repeated letters: a mode-covering student (forward KL on the
  teacher's or the data's sequences) spreads its mass over every letter that might still be free.
- Every prefix without a repeat can still be completed, and the teacher knows how: write the letters that are left.
  The student's own prefixes are orders it chose itself; on-policy training only asks it to be right after those,
  while supervised training asks it to continue every random order in the data.

Everything is generated from seeds, as in `task.py`: held-out sets first, training streams that skip them.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections.abc import Iterable
from dataclasses import dataclass

from .tasks import distinct_problems, problems_excluding

ALPHABET = string.ascii_lowercase
SET_SIZE = 12
ORDERS_PER_PROMPT = 4  # distinct valid answers per training prompt, next to each other in the stream
_PROMPT = re.compile(r"\s*([a-z](?:,[a-z])*)\s*")


@dataclass(frozen=True, eq=False)
class Problem:
    """A set of letters, as the prompt lists them, and one valid answer (`order`; the prompt's order when empty).

    Two problems are equal when they ask for the same set, whatever the listing and the answer: held-out sets are
    distinct sets, and no training prompt asks for a held-out set in another order.
    """

    letters: tuple[str, ...]
    order: tuple[str, ...] = ()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Problem) and frozenset(self.letters) == frozenset(other.letters)

    def __hash__(self) -> int:
        return hash(frozenset(self.letters))

    @property
    def answer(self) -> tuple[str, ...]:
        return self.order or self.letters


def random_letters(rng: random.Random, size: int = SET_SIZE) -> tuple[str, ...]:
    """`size` distinct letters in random order (uniform over such lists)."""
    return tuple(rng.sample(ALPHABET, size))


def random_orders(rng: random.Random, letters: tuple[str, ...], count: int) -> list[tuple[str, ...]]:
    """`count` distinct uniformly random orders of `letters`."""
    orders: dict[tuple[str, ...], None] = {}
    while len(orders) < min(count, math.factorial(len(letters))):
        orders.setdefault(tuple(rng.sample(letters, len(letters))), None)
    return list(orders)


class Letters:
    """The task behind the demo's `Task` interface (`tasks.py`)."""

    name = "letters"
    version = 1
    metric = "valid answers"
    line_one = "the first letter"
    prompt_format = "letters separated by commas, such as 'q,d,m'"

    @property
    def description(self) -> str:
        return f"write the {SET_SIZE} letters of a set once each, in any of its {math.factorial(SET_SIZE):,} orders"

    def held_out_problems(self, count: int, seed: int) -> list[Problem]:
        """`count` distinct sets for evaluation, each with one random valid answer (the reference for KL)."""
        rng = random.Random(f"protege-demo-letters-held-out-{seed}")

        def draw(r: random.Random) -> Problem:
            letters = random_letters(r)
            return Problem(letters, random_orders(r, letters, 1)[0])

        return distinct_problems(draw, count, rng)

    def training_problems(
        self, count: int, seed: int, exclude: Iterable[Problem] = (), stream: str = "train"
    ) -> list[Problem]:
        """`count` rows: prompts in blocks of ORDERS_PER_PROMPT rows with distinct valid answers, none asking for a
        set in `exclude` (pass the held-out problems)."""
        rng = random.Random(f"protege-demo-letters-{stream}-{seed}")

        def draw(r: random.Random) -> list[Problem]:
            letters = random_letters(r)
            return [Problem(letters, order) for order in random_orders(r, letters, ORDERS_PER_PROMPT)]

        return problems_excluding(draw, count, rng, exclude)

    def prompt_messages(self, problem: Problem) -> list[dict[str, str]]:
        return [{"role": "user", "content": ",".join(problem.letters)}]

    def conversation(self, problem: Problem) -> list[dict[str, str]]:
        """Prompt and the problem's valid answer, one letter per line, as chat `messages`."""
        return [*self.prompt_messages(problem), {"role": "assistant", "content": "\n".join(problem.answer)}]

    def canonical(self, problem: Problem) -> Problem:
        """The answer that lists the letters in the prompt's order."""
        return Problem(problem.letters)

    def parse_problem(self, prompt: str) -> Problem:
        """The problem of a prompt such as 'q,d,m' (distinct lowercase letters)."""
        match = _PROMPT.fullmatch(prompt)
        letters = tuple(match.group(1).split(",")) if match else ()
        if not letters or len(set(letters)) != len(letters):
            raise ValueError(f"not a letters prompt: {prompt!r}")
        return Problem(letters)

    def first_wrong_line(self, completion: str, problem: Problem) -> int | None:
        """Number of the first line, counting from 1, that is not a letter of the set not written before (or, when
        every line is, the line where a letter is missing); None for a valid answer."""
        wanted, seen = set(problem.letters), set()
        lines = completion.strip().splitlines()
        for index, line in enumerate(lines):
            letter = line.strip()
            if letter not in wanted or letter in seen:
                return index + 1
            seen.add(letter)
        return None if seen == wanted else len(lines) + 1

    def score(self, completion: str, problem: Problem) -> float:
        """The verifier: 1.0 when the completion lists every letter of the set exactly once, one per line, else 0.0."""
        return float(self.first_wrong_line(completion, problem) is None)

"""The demo's third task: continue a walk along the edges of a fixed hidden graph.

The graph has 36 nodes, written `A`..`Z` and `0`..`9` (one token each in the demo's tokenizer), and every node has 3
successors, drawn once from a fixed seed (`GRAPH`). The graph is never shown: models learn it from walks. A problem
is a valid walk of 4 nodes; the answer continues it by 20 more nodes, written together, each a successor of the one
before (the first, of the prompt's last node)::

    user:       K3BQ
    assistant:  7HX2M...          (20 nodes; K->3->B->Q->7->H->... every step an edge)

The verifier (`Walks.score`) accepts every such continuation (3^20, about 3.5 billion for each prompt) and nothing
else: a step that is not an edge, a symbol that is not a node, or a walk of another length makes it invalid. The
teacher is trained on uniformly random walks, so it learns "any of the 3 successors, each as likely": many modes at
every step.

Why this shape, after the letters design failed because its teacher could not learn the task (docs/benchmarks.md, "A
task where the student's own mistakes matter", design 2, has the full rationale and the fixed protocol):

- The rule is local: the next node depends on the current one only (and the count on the position), so a small
  teacher learns it exactly.
- The student is under-capacity by construction: its next-node logits are a linear map of a hidden state narrower
  than the 36 nodes, a low-rank table that cannot put all its mass on 3 successors out of 36 for every node at once.
  It leaks mass onto non-edges, and at temperature 1 a 20-step walk gives the leak 20 chances.
- Which nodes the student must get right depends on where its own walks go. Supervised training (any divergence)
  weighs every node as the data's uniform walks visit it; on-policy training weighs the nodes the student itself
  visits, so a student that settles on a part of the graph it can represent (mode seeking) only needs that part
  right. That is the difference the design targets.

Everything is generated from seeds, as in `task.py`: held-out prompts first, training streams that skip them.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .tasks import distinct_problems, problems_excluding

NODES = string.ascii_uppercase + string.digits  # no merges among these in the demo's tokenizer: one token each
SUCCESSORS = 3  # out-degree of every node
PREFIX = 4  # nodes in a prompt
STEPS = 20  # nodes in an answer


def build_graph(seed: str = "protege-demo-walks-graph-1") -> dict[str, tuple[str, ...]]:
    """Each node's SUCCESSORS successors (no self-loops), fixed by `seed`: the task's hidden rule."""
    rng = random.Random(seed)
    return {node: tuple(sorted(rng.sample([n for n in NODES if n != node], SUCCESSORS))) for node in NODES}


GRAPH = build_graph()


def walk_from(start: str, steps: int, choose: Callable[[tuple[str, ...]], str]) -> tuple[str, ...]:
    """`steps` nodes after `start`, each chosen by `choose` among the successors of the one before."""
    walk, node = [], start
    for _ in range(steps):
        node = choose(GRAPH[node])
        walk.append(node)
    return tuple(walk)


def random_walk(rng: random.Random, start: str, steps: int) -> tuple[str, ...]:
    """`steps` nodes after `start`, each a uniformly random successor of the one before."""
    return walk_from(start, steps, rng.choice)


@dataclass(frozen=True, eq=False)
class Problem:
    """A prompt walk (`prefix`) and one valid continuation (`walk`, empty for a parsed prompt). Two problems are
    equal when their prompts are: held-out prompts are distinct, and no training row has a held-out prompt."""

    prefix: tuple[str, ...]
    walk: tuple[str, ...] = ()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Problem) and self.prefix == other.prefix

    def __hash__(self) -> int:
        return hash(self.prefix)

    @property
    def answer(self) -> tuple[str, ...]:
        """`walk`, or when empty (a parsed prompt) the walk that always takes the first successor: a valid answer of
        the right length, which sizes generation."""
        return self.walk or walk_from(self.prefix[-1], STEPS, lambda successors: successors[0])


def random_problem(rng: random.Random) -> Problem:
    """A uniformly started random prompt walk of PREFIX nodes and a random continuation of STEPS nodes."""
    start = rng.choice(NODES)
    prefix = (start, *random_walk(rng, start, PREFIX - 1))
    return Problem(prefix, random_walk(rng, prefix[-1], STEPS))


class Walks:
    """The task behind the demo's `Task` interface (`tasks.py`)."""

    name = "walks"
    version = 1
    metric = "valid walks"
    line_one = "the first step after the prompt"
    prompt_format = f"a walk of the demo's graph, such as {''.join(random_problem(random.Random(0)).prefix)!r}"

    @property
    def description(self) -> str:
        return (
            f"continue a walk on a hidden {len(NODES)}-node graph by {STEPS} steps, each along one of the current "
            f"node's {SUCCESSORS} edges"
        )

    def held_out_problems(self, count: int, seed: int) -> list[Problem]:
        """`count` distinct prompts for evaluation, each with one random valid continuation (the reference for KL)."""
        return distinct_problems(random_problem, count, random.Random(f"protege-demo-walks-held-out-{seed}"))

    def training_problems(
        self, count: int, seed: int, exclude: Iterable[Problem] = (), stream: str = "train"
    ) -> list[Problem]:
        """`count` rows, each a random prompt and a random valid continuation, none with a prompt in `exclude`."""
        rng = random.Random(f"protege-demo-walks-{stream}-{seed}")
        return problems_excluding(lambda r: [random_problem(r)], count, rng, exclude)

    def prompt_messages(self, problem: Problem) -> list[dict[str, str]]:
        return [{"role": "user", "content": "".join(problem.prefix)}]

    def conversation(self, problem: Problem) -> list[dict[str, str]]:
        return [*self.prompt_messages(problem), {"role": "assistant", "content": "".join(problem.answer)}]

    def canonical(self, problem: Problem) -> Problem:
        """The answer that always takes the first successor (`Problem.answer` of a bare prompt). Such walks soon
        circle on the few nodes where the first-successor map cycles, so a dataset of them visits few states."""
        return Problem(problem.prefix)

    def parse_problem(self, prompt: str) -> Problem:
        """The problem of a prompt such as 'K3BQ': at least one node, each step an edge of the graph."""
        prefix = tuple(prompt.strip())
        if not prefix or any(node not in GRAPH for node in prefix) or self._first_non_edge(prefix[0], prefix[1:]):
            raise ValueError(f"not a walk of the demo's graph: {prompt!r}")
        return Problem(prefix)

    @staticmethod
    def _first_non_edge(start: str, walk: Iterable[str]) -> int | None:
        """Number (from 1) of the first node of `walk` that is not a successor of the node before; None if none."""
        node = start
        for index, following in enumerate(walk):
            if following not in GRAPH.get(node, ()):
                return index + 1
            node = following
        return None

    def first_wrong_line(self, completion: str, problem: Problem) -> int | None:
        """Number (from 1) of the first step that is not an edge (or, when every step is, the step where the walk
        ends too early or runs too long); None for a valid walk."""
        walk = completion.strip()
        wrong = self._first_non_edge(problem.prefix[-1], walk[:STEPS])
        if wrong is not None:
            return wrong
        return None if len(walk) == STEPS else min(len(walk), STEPS) + 1

    def score(self, completion: str, problem: Problem) -> float:
        """The verifier: 1.0 when the completion is STEPS nodes, each along an edge from the one before, else 0.0."""
        return float(self.first_wrong_line(completion, problem) is None)

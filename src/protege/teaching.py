"""The trainer's teachers through a step (`TeacherSteps`, a mixin of `DistillationTrainer`): made once by the one
factory, asked once per step for their rows of every slice, then run on each slice's routes, and each route's loss
and figures against its own teacher (`routing`: which rows are whose)."""

from __future__ import annotations

import time

import torch

from .losses import IGNORE_INDEX
from .metrics import TrainingWindow
from .objective import sampled_log_ratio_sum
from .routing import ROUTES_KEY, TeacherRoute, teacher_routes
from .teacher import Teacher
from .teacher.absent import NoTeacher
from .teacher.factory import cached_teachers, make_teacher
from .teacher.spec import TeacherSpec


class TeacherSteps:
    """`self.teachers` and what a step asks of them; the trainer supplies objective, args, window and accelerator."""

    def _setup_teachers(self, specs: list[TeacherSpec], args, model, tokenizer) -> None:
        """Every teacher made by the one factory, and the vocabulary width the student is compared on with them."""
        self.teachers: list[Teacher] = []
        try:
            for spec in specs:
                self.teachers.append(make_teacher(spec, args, model, tokenizer, self.objective))
            if args.teacher_cache is not None:  # off-policy slices from the cache, on-policy from the live teacher
                self.teachers = cached_teachers(args, model, tokenizer, self.objective, self.teachers)
            if not self.teachers:  # rewards alone (teacher.spec.needs_no_teacher)
                self.teachers = [NoTeacher(model)]
        except BaseException:
            for teacher in self.teachers:
                teacher.close()
            raise
        self.vocab_size = min(teacher.vocab_size for teacher in self.teachers)

    @property
    def teacher(self) -> Teacher:
        """The run's teacher (the first, where there are several)."""
        return self.teachers[0]

    def _new_window(self, started: float | None = None) -> TrainingWindow:
        names = [teacher.name for teacher in self.teachers] if len(self.teachers) > 1 else []
        return TrainingWindow(started=started, teacher_names=names)

    def _prepare_teachers(self, batches: list[dict]) -> None:
        """Each teacher asked once for the step, with its rows of every slice (a server scores them in one call)."""
        if not batches:
            return
        for batch in batches:
            if len(self.teachers) > 1:  # the routes ride along in the slice, so each teacher's answer does too
                batch[ROUTES_KEY] = teacher_routes(batch, len(self.teachers), self._every_teacher)
        for index, teacher in enumerate(self.teachers):
            own = [r.batch for b in batches for r in teacher_routes(b, len(self.teachers)) if r.teacher == index]
            if own:
                started = time.perf_counter()
                teacher.prepare(own)
                self._window.add_teacher_seconds(index, time.perf_counter() - started)

    def _teacher_answers(self, inputs: dict, training: bool) -> tuple[list[TeacherRoute], list]:
        """The slice's routes and each one's teacher output (timed into the training window in training only)."""
        routes = teacher_routes(inputs, len(self.teachers), self._every_teacher)
        answers = []
        for route in routes:
            started = time.perf_counter()
            answers.append(self.teachers[route.teacher](route.batch))
            if training:
                self._window.add_teacher_seconds(route.teacher, time.perf_counter() - started)
        return routes, answers

    def _slice_loss_sum(self, routes, answers, student, labels, on_policy: bool | None) -> tuple[torch.Tensor, float]:
        """The divergence summed over the slice's scored routes, and its value; in training (`on_policy` not None)
        each route's loss, tokens and sampled-token estimate go to its teacher's figures."""
        loss_sum, value = None, 0.0
        for route, teacher in zip(routes, answers):
            if not route.scored:  # a stand-in row, run only so that every rank calls a sharded teacher alike
                continue
            part_student, part_labels = student, labels
            if route.rows is not None:
                part_student, part_labels = student.select(route.rows), labels[route.rows]
            policy_gradient = on_policy and self.policy_gradient is not None
            if policy_gradient:  # it logs the sampled-token estimate itself, from its own log-probs
                part = self._policy_gradient_sum(route, part_student, teacher, part_labels)
            else:
                part = self.objective.loss_sum(part_student, teacher, part_labels)
            loss_sum = part if loss_sum is None else loss_sum + part
            if on_policy is not None:
                part_value, tokens = part.item(), part_labels.ne(IGNORE_INDEX).sum().item()
                value += part_value
                self._window.add_loss(on_policy, part_value, tokens, route.teacher)
                if on_policy and not policy_gradient and teacher is not None and self._step_will_log():
                    ratio = sampled_log_ratio_sum(part_student, teacher, part_labels, self.args.temperature)
                    self._window.add_sampled_log_ratio(ratio, tokens, route.teacher)
        return loss_sum, value

"""The policy-gradient objective through a step (`PolicyGradientSteps`, a mixin of `DistillationTrainer`): the reward
functions resolved once, each step's on-policy completions scored after generation (every rank's gathered, so a
group's baseline does not depend on where its completions ran), and each on-policy route's loss from
`policy_gradient.PolicyGradient`."""

from __future__ import annotations

import dataclasses

import torch
from accelerate.utils import gather_object

from .policy_gradient import PolicyGradient, group_advantages
from .rewards import call_reward, completions_of, resolve_reward_funcs, reward_name, weighted_rewards
from .rollout import SAMPLER_LOGPROBS

REWARD_ADVANTAGE = "reward_advantage"  # (B,) batch entry: each completion's reward advantage over its group


class PolicyGradientSteps:
    """`self.policy_gradient` (None under the divergence objective) and `self.reward_funcs`; the trainer supplies
    args, objective, accelerator, state, window and processing_class."""

    def _setup_policy_gradient(self, args, reward_funcs) -> None:
        """The policy-gradient loss and the reward functions: `reward_funcs` (TRL's trainer argument) or the config's
        import paths, not both."""
        if reward_funcs is not None and args.reward_funcs:
            raise ValueError(
                "reward_funcs is given both to DistillationTrainer and in DistillationConfig; give it in one place"
            )
        self.policy_gradient = PolicyGradient.from_config(args)
        if self.policy_gradient is not None:  # the student's path as the divergence runs it (dense or chunked)
            self.policy_gradient = dataclasses.replace(self.policy_gradient, chunk_size=self.objective.chunk_size)
        self.reward_funcs = resolve_reward_funcs(reward_funcs if reward_funcs is not None else args.reward_funcs)
        if self.reward_funcs and self.policy_gradient is None:
            raise ValueError(
                "reward_funcs need on_policy_objective='policy_gradient' (rewards enter the policy-gradient advantage)"
            )
        weights = args.reward_weights
        if weights is not None and len(weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(weights)} weights for {len(self.reward_funcs)} reward functions; give one "
                "per function"
            )

    def _score_rewards(self, batches: list[dict]) -> None:
        """Each on-policy slice's completions scored by every reward function, and `REWARD_ADVANTAGE` set: each
        completion's weighted reward minus its group's mean (its prompt's completions with num_generations > 1, else
        the step's), over the completions of every rank."""
        completions = completions_of(batches, self.processing_class)  # the step's, every function called once
        per_func = [call_reward(func, completions, self.state) for func in self.reward_funcs]
        local = list(zip(completions.rows, zip(*per_func)))  # (dataset row, one reward per function) a completion
        everyone = gather_object([local]) if self.accelerator.num_processes > 1 else [local]
        rows = [row for part in everyone for row, _ in part]
        per_func = torch.tensor([list(values) for part in everyone for _, values in part], dtype=torch.float64)
        per_func = per_func.reshape(len(rows), len(self.reward_funcs))
        totals = weighted_rewards(per_func, self.args.reward_weights)
        groups = torch.tensor(rows) if self.args.num_generations > 1 else None
        advantages = group_advantages(totals, groups, self.args.scale_rewards)
        for index, func in enumerate(self.reward_funcs):
            self._window.add_rewards(reward_name(func), per_func[:, index].tolist())
        self._window.add_rewards(None, totals.tolist())
        start = sum(len(part) for part in everyone[: self.accelerator.process_index])
        for batch in batches:
            count = batch["input_ids"].shape[0]
            batch[REWARD_ADVANTAGE] = advantages[start : start + count].to(batch["input_ids"].device)
            start += count

    def _policy_gradient_sum(self, route, student, teacher, labels) -> torch.Tensor:
        """The policy-gradient loss of one on-policy route, its figures into the training window; on a logged step
        also the sampled-token reverse-KL estimate, from the log-probs the loss computed (not a second pass)."""
        loss, figures = self.policy_gradient.loss_sum(
            student, teacher, labels, route.batch.get(SAMPLER_LOGPROBS), route.batch.get(REWARD_ADVANTAGE)
        )
        self._window.add_policy_gradient(figures)
        if figures.log_ratio_sum is not None and self._step_will_log():
            self._window.add_sampled_log_ratio(figures.log_ratio_sum, figures.tokens, route.teacher)
        return loss

    def _describe_loss(self) -> str:
        """What the logged `loss` is (announced when training starts): the objective's words, and under the policy
        gradient what on-policy slices log instead."""
        text = self.objective.describe(on_policy=self.args.lmbda > 0)
        if self.policy_gradient is None:
            return text
        terms = []
        if self.policy_gradient.kl_coef > 0 and self.teacher.returns != "none":
            terms.append(f"{self.policy_gradient.kl_coef:g} x the teacher's log-ratio log p_teacher - log p_student")
        if self.reward_funcs:
            terms.append("the rewards' advantage over their group (reward/... in the logs)")
        pg = (
            "on-policy slices train by policy gradient: their 'loss' is the surrogate -sum A rho log p_student per "
            f"completion token, whose gradient (not its value) is what counts, with A = {' + '.join(terms) or '0'} "
            "(pg/teacher_advantage_mean: the teacher's term) and rho the sampler's importance weight (pg/rho_*)"
        )
        return pg if self.args.lmbda == 1 else f"{pg}; off-policy slices: {text}"

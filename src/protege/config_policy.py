"""The policy-gradient fields of `DistillationConfig` (issue 28): on-policy slices trained by a policy-gradient update
whose advantage is the teacher's per-token log-ratio (the form of verl, NeMo-RL, slime and Tinker), task rewards
beside it with TRL GRPOTrainer's reward-function signature, and the importance weight of the sampler. Off-policy slices
keep the divergence loss whatever these say."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PolicyGradientFields:
    on_policy_objective: str = field(
        default="divergence",
        metadata={
            "help": "The loss of on-policy slices. 'divergence' (GKD): the divergence chosen by beta over the full "
            "distribution at each sampled position. 'policy_gradient': -sum_t A_t rho_t log p_student(x_t), with the "
            "advantage A_t = reward advantage + kl_coef * (log p_teacher(x_t) - log p_student(x_t)) held fixed; it "
            "needs only the sampled token's log-prob from the teacher, so any teacher server can serve it."
        },
    )
    kl_coef: float = field(
        default=1.0,
        metadata={
            "help": "policy_gradient: the weight of the teacher's term in the advantage. 0 with reward_funcs is RL on "
            "the rewards alone (no teacher is needed then, with lmbda=1)."
        },
    )
    kl_discount_factor: float = field(
        default=0.0,
        metadata={
            "help": "policy_gradient: gamma in [0, 1]. 0 gives each token its own teacher term; > 0 adds the later "
            "tokens' terms discounted by gamma per token (1: the whole rest of the completion, the gradient of the "
            "sequence-level reverse KL)."
        },
    )
    importance_sampling_cap: float = field(
        default=2.0,
        metadata={
            "help": "policy_gradient: rho_t = p_student(x_t) / p_sampler(x_t), the ratio of the trained student to "
            "the distribution the token was sampled from (as the generator reported it), is cut at this value."
        },
    )
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "policy_gradient: task rewards, as 'module:function' import paths (the command line, YAML) or "
            "callables; DistillationTrainer(reward_funcs=...) takes them too, as TRL's GRPOTrainer. Each is called "
            "as f(prompts=, completions=, completion_ids=, trainer_state=, **dataset columns) and returns one float "
            "per completion, or None where it does not apply."
        },
    )
    reward_weights: list[float] | None = field(
        default=None,
        metadata={"help": "policy_gradient: one weight per reward function (default: 1 each)."},
    )
    scale_rewards: bool = field(
        default=False,
        metadata={
            "help": "policy_gradient: divide the centred reward by the standard deviation of its group (each "
            "prompt's num_generations completions, or the step's completions when num_generations is 1), as GRPO."
        },
    )

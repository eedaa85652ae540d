"""`DistillationTrainer`: orchestration. The objective decides the loss, `teacher/` makes the teachers (one factory,
`make_teacher`), `rollout` generates, `data` makes rows, `losses` and `chunked` hold the math, `checkpoints` stages
saves.

Construction runs in parts: `_setup_student`, `_setup_teachers`, `_adapt_student` (PEFT, dropout), `_setup_data`,
transformers' own setup, then placing each teacher for the engine in use and `_setup_generation`.

One optimizer step, as the transformers training loop runs it:

1. `get_batch_samples` takes the step's gradient-accumulation micro-batches (slices), draws which are on-policy
   (each slice's batch carries its flag), generates completions for all on-policy slices in ONE call (transformers'
   `generate`, or vLLM: a colocated engine or a `protege serve-student` server, which first get the student's current
   weights), lets the teacher prepare the step (a server scores every slice in one call), and counts the completion
   tokens of the whole step across all ranks. That count normalises the loss, so the gradient does not depend on
   gradient accumulation or world size.
2. `compute_loss` runs each slice: one teacher call, the student, and the objective's divergence over completion
   positions only (the LM heads never see prompt positions). A non-finite loss on any rank stops training at the
   step's last slice, before the optimizer step (`NonFiniteLossError`).
"""

from __future__ import annotations

import math
import time

import torch
from accelerate.utils import broadcast_object_list
from torch import nn
from transformers import PreTrainedModel, Trainer

from . import checkpoints, models, sharding
from .config import DistillationConfig
from .data import ROW_INDEX, ROW_KEYS, DistillationCollator, Tokenizer, sequence_limit, tokenize_dataset
from .losses import IGNORE_INDEX, trl_generalized_jsd_loss
from .metrics import NonFiniteLossError, decoded_samples, print_completions
from .objective import Objective, student_output
from .policy_steps import PolicyGradientSteps
from .progress import announce, shorten_progress
from .rollout import (
    RepeatSampler,
    draw_on_policy,
    generate_slices,
    generation_config,
    model_generate,
    sampling_seed,
    vllm_generate,
)
from .routing import INDEX_KEY, TeacherColumn
from .teacher import Placement, prompt_tokenizers
from .teacher.spec import teacher_specs
from .teaching import TeacherSteps


class DistillationTrainer(checkpoints.StagedCheckpoints, TeacherSteps, PolicyGradientSteps, Trainer):
    """Distil a student from a teacher on its own generations, on dataset completions, or a mix (TRL's API)."""

    # compute_loss divides by the step's completion-token count itself; transformers must not divide again.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | str | None = None,
        teacher_model: PreTrainedModel | nn.Module | str | dict[str, PreTrainedModel | nn.Module | str] | None = None,
        args: DistillationConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        preprocess_logits_for_metrics=None,
        peft_config=None,
        reward_funcs=None,
    ):
        args = args if args is not None else DistillationConfig(output_dir="tmp_distillation")
        if not isinstance(args, DistillationConfig):
            raise TypeError(f"args must be a DistillationConfig, got {type(args).__name__}")
        model, processing_class = self._setup_student(model, args, processing_class)
        self._setup_policy_gradient(args, reward_funcs)  # the policy-gradient objective and its rewards, if asked
        self._setup_teachers(teacher_specs(args, teacher_model), args, model, processing_class)
        model = self._adapt_student(model, args, peft_config)
        train_dataset, eval_dataset = self._setup_data(args, model, processing_class, train_dataset, eval_dataset)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator or DistillationCollator(processing_class.pad_token_id, self._carried_columns),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        sharding.check_engine(args, self.accelerator, self.is_fsdp_enabled, self.is_deepspeed_enabled)
        placement = Placement(self.accelerator, self.is_deepspeed_enabled, self.is_fsdp_enabled)
        for teacher in self.teachers:
            teacher.place(placement)
        self._every_teacher = placement.deepspeed or placement.fsdp  # sharded teachers run on every rank alike
        self.teacher_model = self.teacher.model  # TRL's attribute: the teacher's own model where it has one, else None
        self._setup_generation(model, processing_class)
        self._window = self._new_window()
        shorten_progress(self)
        self._copy_trl_attributes(args)

    # ----- Construction, in parts -----

    def _setup_student(self, model, args: DistillationConfig, processing_class):
        """The student (loaded when named), its tokenizer with a pad token, and the objective as it can run it."""
        if model is None:
            raise ValueError("model is required: a student model or its hub id / local path")
        student_kwargs = models.parse_init_kwargs(args.model_init_kwargs, "model_init_kwargs")
        if isinstance(model, str):
            model = models.load_causal_lm(model, student_kwargs, args.trust_remote_code)
        elif student_kwargs:
            raise ValueError(
                "model_init_kwargs were given but the student is already built; pass the student as a "
                "path to load it with them, or drop model_init_kwargs"
            )
        if processing_class is None:
            processing_class = models.load_tokenizer(model.config._name_or_path, args.trust_remote_code)
        if processing_class.pad_token is None:
            processing_class.pad_token = processing_class.eos_token
        self.objective = Objective.from_config(args).for_student(model)
        return model, processing_class

    @staticmethod
    def _adapt_student(model, args: DistillationConfig, peft_config):
        """The student as it trains: wrapped in its PEFT adapters when given, without dropout unless asked."""
        if peft_config is not None:
            try:
                from peft import PeftConfig, get_peft_model
            except ImportError:
                raise ImportError("peft_config needs the peft package: pip install 'protege[peft]'") from None
            if not isinstance(peft_config, PeftConfig):
                raise TypeError(f"peft_config must be a peft.PeftConfig, got {type(peft_config).__name__}")
            model = get_peft_model(model, peft_config)
        if args.disable_dropout:
            models.disable_dropout(model)
        return model

    def _setup_data(self, args: DistillationConfig, model, tokenizer, train_dataset, eval_dataset):
        """The datasets, validated and tokenized, with rows that cannot fit a limit known now refused, named."""
        self._train_lmbda = args.lmbda  # which sequences training rows become; self.args is not set yet
        columns = getattr(train_dataset, "column_names", None) if self.reward_funcs else None
        self._carried_columns = (*columns, ROW_INDEX) if columns else ()  # each row's own columns, for the rewards
        if eval_dataset is not None and self.teacher.returns == "none":
            raise ValueError("eval_dataset: evaluation measures the divergence to a teacher, and this run has none")
        self._nonfinite: tuple[float, bool] | None = None  # this step's first non-finite slice loss, and its flag
        hard_limits = [t.max_model_len for t in self.teachers if t.max_model_len is not None]
        names = tuple(t.name for t in self.teachers)
        routing = TeacherColumn(names, args.teacher_column, args.default_teacher) if len(names) > 1 else None
        self._row_tokenizer = Tokenizer(
            tokenizer,
            args.max_prompt_length,
            args.max_length,
            args.prompt_truncation,
            args.max_completion_length,
            sequence_limit(
                args.max_length,
                min(hard_limits, default=None),
                {"student": model} | {t.name: t.model for t in self.teachers},
            ),
            teachers=routing,
            teacher_tokenizers=prompt_tokenizers(self.teachers),  # teachers of other tokenizers
        )
        if train_dataset is not None:
            train_dataset = self._tokenize(train_dataset, train=True)
            for teacher in self.teachers if args.lmbda < 1 else ():  # a cache lacking a row fails now, named
                if hasattr(teacher, "check_rows"):
                    teacher.check_rows(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: self._tokenize(v) for k, v in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = self._tokenize(eval_dataset)
        args.remove_unused_columns = False
        return train_dataset, eval_dataset

    def _setup_generation(self, model, tokenizer) -> None:
        """Sampling for on-policy slices: transformers' generate, or a vLLM engine (colocated or a server)."""
        args = self.args
        # Output rows past the compared width (a padded student's, where an extending teacher has its extra tokens)
        # are no tokens of the student: a sample of one would reach the teacher as another token, with no loss column.
        self.suppressed_ids = list(range(self.vocab_size, models.output_rows(model)))
        self.generation_config, self.eos_token_ids = generation_config(args, model, tokenizer, self.suppressed_ids)
        self.vllm = None
        if args.use_vllm:
            from .vllm_colocate import VLLMColocate, sampling_options

            sampling = sampling_options(args, self.eos_token_ids, self.suppressed_ids)
            if args.vllm_mode == "server":
                from .vllm_server import VLLMServer

                self.vllm = VLLMServer(args, sampling, self.accelerator.process_index)
            else:
                self.vllm = VLLMColocate(
                    self.model, args, sampling, self.accelerator.process_index, self.accelerator.num_processes
                )

    def _copy_trl_attributes(self, args: DistillationConfig) -> None:
        """TRL's attributes, for callbacks and subclasses that read them: copies of args taken here. The loss and
        generation read args (through the objective), so setting these later changes nothing, unlike in TRL."""
        self.lmbda, self.beta, self.temperature, self.top_p = args.lmbda, args.beta, args.temperature, args.top_p
        self.num_generations, self.reverse_kl_top_1_mode = args.num_generations, args.reverse_kl_top_1_mode
        self.loss_top_k, self.loss_add_tail = args.loss_top_k, args.loss_add_tail
        self.use_teacher_server, self.teacher_model_server_url = args.use_teacher_server, args.teacher_model_server_url
        self.use_liger_loss, self.use_vllm = args.use_liger_kernel, args.use_vllm
        self.log_completions, self.log_completions_steps = args.log_completions, args.log_completions_steps
        self.num_completions_to_print = args.num_completions_to_print

    def _tokenize(self, dataset, train: bool = False):
        """Validate and tokenize raw rows. Training rows need a completion when lmbda < 1; evaluation is off-policy and
        its rows may be prompt-only (they then add no tokens)."""
        if "prompt_ids" in (dataset.column_names or []):
            routing = self._row_tokenizer.teachers
            if routing is not None and INDEX_KEY not in dataset.column_names:
                raise ValueError(
                    f"the dataset is already tokenized but has no {INDEX_KEY!r} column, so its rows cannot be routed "
                    f"to the teachers {list(routing.names)}; give raw rows with a {routing.column!r} column instead"
                )
            return dataset
        lmbda = self._train_lmbda if train else 0.0
        return tokenize_dataset(
            dataset,
            self._row_tokenizer,
            needs_completion=train and lmbda < 1,
            uses_completion=lmbda < 1,
            on_policy=lmbda > 0,
            name="train_dataset" if train else "eval_dataset",
            keep_columns=train and bool(self._carried_columns),
        )

    def get_eval_dataloader(self, eval_dataset=None):
        if eval_dataset is not None and not isinstance(eval_dataset, str):
            eval_dataset = self._tokenize(eval_dataset)
        return super().get_eval_dataloader(eval_dataset)

    def _get_train_sampler(self, train_dataset=None):
        if self.args.num_generations == 1:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return RepeatSampler(len(dataset), self.args.num_generations, self.args.seed)

    # ----- One optimizer step: on/off-policy slices, one generation call, the teacher's view -----

    def _on_policy_flags(self, num_slices: int) -> list[bool]:
        flags = [draw_on_policy(self.args.lmbda, num_slices, self.args.seed, self.state.global_step)]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(flags, from_process=0)
        return flags[0]

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(self._prepare_inputs(next(epoch_iterator)))
            except StopIteration:
                break
        self._window.start()
        flags = self._on_policy_flags(len(batches))
        on_policy = [i for i, flag in enumerate(flags) if flag]
        self._window.on_policy_fraction.append(len(on_policy) / max(len(flags), 1))
        started = time.perf_counter()
        if on_policy:
            pad = self.processing_class.pad_token_id
            if self.vllm is not None:
                generate = vllm_generate(self.vllm, self.model, self.state.global_step, pad)
            else:
                seed = sampling_seed(self.args.seed, self.accelerator.process_index, self.state.global_step)
                generate = model_generate(self.model, self.generation_config, seed, self.policy_gradient is not None)
            rollouts = generate_slices(
                [batches[i] for i in on_policy], generate, self.eos_token_ids, pad, self.args.max_completion_length
            )
            for i, rollout in zip(on_policy, rollouts):
                for key in ROW_KEYS:  # the sample goes to its row's teacher, with the prompt as the teacher reads it
                    if key in batches[i]:
                        rollout.batch[key] = batches[i][key]
                batches[i] = rollout.batch
            lengths = self.accelerator.gather(torch.cat([r.lengths for r in rollouts]).float())
            truncated = self.accelerator.gather(torch.cat([r.truncated for r in rollouts]).float())
            self._window.add_completions(lengths, truncated)
            if self.args.log_completions:
                self._window.samples = decoded_samples([batches[i] for i in on_policy], self.processing_class)
            if self.reward_funcs:
                self._score_rewards([batches[i] for i in on_policy])
        self._window.generation_seconds.append(time.perf_counter() - started)
        for batch, flag in zip(batches, flags):
            batch["on_policy"] = flag
        self._prepare_teachers(batches)
        local_tokens = sum(b["labels"].ne(IGNORE_INDEX).sum() for b in batches) if batches else torch.tensor(0)
        global_tokens = self.accelerator.reduce(torch.as_tensor(local_tokens, device=device).reshape(1), "sum")
        self._window.completion_tokens += int(global_tokens)
        return batches, global_tokens.clamp(min=1).squeeze(0)

    def training_step(self, model, inputs, num_items_in_batch=None):
        started, teacher_before = time.perf_counter(), self._window.teacher_seconds
        loss = super().training_step(model, inputs, num_items_in_batch)
        teacher_seconds = self._window.teacher_seconds - teacher_before
        self._window.student_seconds += time.perf_counter() - started - teacher_seconds
        return loss

    def _stop_on_nonfinite_loss(self, model) -> None:
        """Raise `NonFiniteLossError` on every rank if any rank had a non-finite slice loss in this step.

        Checked once per optimizer step, at its last slice before that slice's backward (which reduces the gradients
        over ranks, and under DeepSpeed also steps the optimizer), so all ranks decide together and none is left
        waiting in a collective; the gradients accumulated so far are dropped, never applied.
        """
        local = self._nonfinite
        self._nonfinite = None
        flags = [float(local is not None)]
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.gather(torch.tensor(flags, device=self.args.device)).tolist()
        ranks = [rank for rank, flag in enumerate(flags) if flag]
        if not ranks:
            return
        model.zero_grad(set_to_none=True)
        raise NonFiniteLossError.at(self.state.global_step + 1, ranks, local)

    # ----- Loss -----

    # TRL 1.8.0's static loss, with its signature and reductions, for tests and subclasses written against TRL.
    # compute_loss does not call it: overriding it changes no training loss.
    generalized_jsd_loss = staticmethod(trl_generalized_jsd_loss)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"][:, int(inputs["prompt_width"]) :]
        tokens = labels.ne(IGNORE_INDEX).sum()
        training = "on_policy" in inputs  # a training slice (evaluation batches carry no flag)
        routes, answers = self._teacher_answers(inputs, training)
        student = student_output(model, inputs, self.objective.student_view, self.vocab_size)
        loss_sum, value = self._slice_loss_sum(routes, answers, student, labels, inputs.get("on_policy"))
        if training:
            if not math.isfinite(value) and self._nonfinite is None:
                self._nonfinite = (value, bool(inputs["on_policy"]))
            if self.accelerator.sync_gradients:  # the step's last slice
                self._stop_on_nonfinite_loss(model)
        if num_items_in_batch is None:  # evaluation: the mean over this batch's completion tokens
            loss = loss_sum / tokens.clamp(min=1)
        else:  # training: DDP averages gradients over ranks, so undo that mean on top of the global token count
            loss = loss_sum / num_items_in_batch * self.accelerator.num_processes
        return (loss, student) if return_outputs else loss

    def _step_will_log(self) -> bool:
        """Whether the step being computed ends with a log (transformers' rule for the "steps" strategy), so the
        sampled-token estimate costs an extra pass over the completion tokens on logged steps only."""
        args, step = self.args, self.state.global_step + 1
        if args.logging_strategy == "no":
            return False
        if args.logging_strategy != "steps" or (args.logging_first_step and step == 1):
            return True
        return step % max(int(self.state.logging_steps or args.logging_steps), 1) == 0

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation is off-policy on the dataset completions: the loss only, no predictions gathered."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """transformers' `train`, where `resume_from_checkpoint=True` takes the newest complete checkpoint."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = checkpoints.newest_complete(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint found in output directory ({self.args.output_dir})")
        self._nonfinite = None
        if self.is_world_process_zero():
            announce(self._describe_loss())
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            for teacher in self.teachers:
                teacher.close()  # a server client's connections; it reopens them if used again
            if self.vllm is not None:
                self.vllm.close()

    # ----- Logging -----

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and not any(k.startswith("eval_") for k in logs):
            sum_over_ranks = lambda t: self.accelerator.reduce(t.to(self.args.device), "sum").cpu()  # noqa: E731
            max_over_ranks = lambda t: self.accelerator.gather(t.to(self.args.device)).max().cpu().reshape(1)  # noqa: E731
            logs.update(self._window.logs(sum_over_ranks, max_over_ranks))
            step, args = self.state.global_step, self.args
            if args.log_completions and step % args.log_completions_steps == 0 and self.accelerator.is_main_process:
                print_completions(self._window.samples, step, args.num_completions_to_print)
            self._window = self._new_window(started=time.perf_counter())
        super().log(logs, start_time)

"""`DistillationTrainer`: orchestration only. The objective decides the loss, `teacher/` gives the teacher's view,
`rollout` generates, `data` makes rows, `losses` holds the math.

One optimizer step, as the transformers training loop runs it:

1. `get_batch_samples` takes the step's gradient-accumulation micro-batches (slices), draws which are on-policy
   (each slice's batch carries its flag), generates completions for all on-policy slices in ONE call (transformers'
   `generate`, or a colocated vLLM engine that first gets the student's current weights),
   lets the teacher view prepare the step (a server scores every slice in one call), and counts the completion
   tokens of the whole step across all ranks. That count normalises the loss, so the gradient does not depend on
   gradient accumulation or world size.
2. `compute_loss` runs each slice: one teacher call, the student, and the objective's divergence over completion
   positions only (the LM heads never see prompt positions).
"""

from __future__ import annotations

import time
import warnings

import torch
from accelerate.utils import broadcast_object_list
from torch import nn
from torch.utils.data import Sampler
from transformers import GenerationConfig, PreTrainedModel, Trainer

from . import models
from .config import DistillationConfig
from .data import DistillationCollator, Tokenizer, tokenize_dataset
from .losses import IGNORE_INDEX
from .metrics import TrainingWindow
from .objective import Objective, student_output
from .rollout import draw_on_policy, generate_slices, model_generate, vllm_generate
from .teacher.local import LocalTeacher, load_teacher, place_teacher, shared_rows, shared_vocab_size
from .teacher.remote import RemoteHiddenTeacher, RemoteTeacher, connect_teacher, teacher_head


class RepeatSampler(Sampler):
    """Shuffled indices, each repeated `repeats` times in a row (num_generations completions per prompt)."""

    def __init__(self, size: int, repeats: int, seed: int):
        self.size, self.repeats, self.seed, self.epoch = size, repeats, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        for index in order.tolist():
            yield from [index] * self.repeats

    def __len__(self) -> int:
        return self.size * self.repeats


def _disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "dropout"):
        if config is not None and isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)


class DistillationTrainer(Trainer):
    """Distil a student from a teacher on its own generations, on dataset completions, or a mix (TRL's API)."""

    # compute_loss divides by the step's completion-token count itself; transformers must not divide again.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | str | None = None,
        teacher_model: PreTrainedModel | nn.Module | str | None = None,
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
    ):
        args = args if args is not None else DistillationConfig(output_dir="tmp_distillation")
        if not isinstance(args, DistillationConfig):
            raise TypeError(f"args must be a DistillationConfig, got {type(args).__name__}")
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

        self.objective = Objective.from_config(args)
        if args.use_teacher_server:
            if teacher_model is not None:
                raise ValueError(
                    "use_teacher_server=True scores with the server at teacher_model_server_url; do not "
                    "also pass teacher_model"
                )
            client, teacher = connect_teacher(args, processing_class), None
            self.vocab_size = models.output_rows(model)
            if self.objective.teacher_view == "hidden":
                try:
                    head, where = teacher_head(args, client)
                    self.vocab_size = shared_rows(len(processing_class), self.vocab_size, head.vocab_size)
                    weight, bias = head.for_loss(self.vocab_size, model.device, model.dtype, where)
                except BaseException:
                    client.close()
                    raise
                del head
        else:
            teacher, teacher_tokenizer = load_teacher(teacher_model, args)
            self.vocab_size = shared_vocab_size(model, teacher, processing_class, teacher_tokenizer)
        if self.objective.chunk_size == "auto" and not all(models.has_plain_head(m) for m in (model, teacher or model)):
            warnings.warn(
                "loss_chunk_size='auto': a model transforms its logits after the LM head (soft-capping), so the loss "
                "uses full logits (more memory); the chunked path cannot reproduce the transform",
                UserWarning,
                stacklevel=2,
            )
            self.objective = self.objective.dense()
        if self.objective.student_view == "hidden":
            models.require_plain_head(model, "student")

        if peft_config is not None:
            try:
                from peft import PeftConfig, get_peft_model
            except ImportError:
                raise ImportError("peft_config needs the peft package: pip install 'protege[peft]'") from None
            if not isinstance(peft_config, PeftConfig):
                raise TypeError(f"peft_config must be a peft.PeftConfig, got {type(peft_config).__name__}")
            model = get_peft_model(model, peft_config)
        if args.disable_dropout:
            _disable_dropout(model)

        self._row_tokenizer = Tokenizer(processing_class, args.max_prompt_length, args.max_length)
        if train_dataset is not None:
            train_dataset = self._tokenize(train_dataset, needs_completion=args.lmbda < 1)
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: self._tokenize(v) for k, v in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = self._tokenize(eval_dataset)
        args.remove_unused_columns = False

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator or DistillationCollator(processing_class.pad_token_id),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        if teacher is None:
            self.teacher_model = None
            if self.objective.teacher_view == "hidden":
                weight, bias = weight.to(self.args.device), None if bias is None else bias.to(self.args.device)
                self.teacher = RemoteHiddenTeacher(client, weight, bias, args.teacher_server_hidden_dtype)
            else:
                self.teacher = RemoteTeacher(client, self.objective.server_top_k, args.temperature)
        else:
            self.teacher_model = place_teacher(
                teacher, self.accelerator, self.is_deepspeed_enabled, self.is_fsdp_enabled
            )
            self.teacher = LocalTeacher(self.teacher_model, self.vocab_size, self.objective.teacher_view)
        self.generation_config, self.eos_token_ids = self._generation_config(model, processing_class)
        self.vllm = None
        if args.use_vllm and args.vllm_mode == "server":
            from .vllm_server import VLLMServer

            self.vllm = VLLMServer(args, self.eos_token_ids, self.accelerator.process_index)
        elif args.use_vllm:
            from .vllm_colocate import VLLMColocate

            self.vllm = VLLMColocate(
                self.model, args, self.eos_token_ids, self.accelerator.process_index, self.accelerator.num_processes
            )
        self._window = TrainingWindow()

    # ----- Construction helpers -----

    def _generation_config(self, model, tokenizer) -> tuple[GenerationConfig, list[int]]:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
            eos_ids.append(tokenizer.eos_token_id)
        config = GenerationConfig(
            max_new_tokens=self.args.max_completion_length,
            do_sample=True,
            temperature=self.args.temperature,
            top_p=self.args.top_p,
            top_k=self.args.top_k,
            min_p=self.args.min_p,
            repetition_penalty=self.args.repetition_penalty,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos_ids,
            use_cache=True,
            **(self.args.generation_kwargs or {}),
        )
        return config, eos_ids

    def _tokenize(self, dataset, needs_completion: bool = False):
        """Validate and tokenize raw rows; evaluation rows may be prompt-only (they then add no tokens)."""
        if "prompt_ids" in (dataset.column_names or []):
            return dataset
        return tokenize_dataset(dataset, self._row_tokenizer, needs_completion)

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
                generate = model_generate(self.model, self.generation_config)
            rollouts = generate_slices(
                [batches[i] for i in on_policy], generate, self.eos_token_ids, pad, self.args.max_completion_length
            )
            for i, rollout in zip(on_policy, rollouts):
                batches[i] = rollout.batch
            lengths = self.accelerator.gather(torch.cat([r.lengths for r in rollouts]).float())
            truncated = self.accelerator.gather(torch.cat([r.truncated for r in rollouts]).float())
            self._window.add_completions(lengths, truncated)
            self._keep_samples([batches[i] for i in on_policy])
        self._window.generation_seconds.append(time.perf_counter() - started)
        for batch, flag in zip(batches, flags):
            batch["on_policy"] = flag
        if batches:
            started = time.perf_counter()
            self.teacher.prepare(batches)
            self._window.teacher_seconds += time.perf_counter() - started
        local_tokens = sum(b["labels"].ne(IGNORE_INDEX).sum() for b in batches) if batches else torch.tensor(0)
        global_tokens = self.accelerator.reduce(torch.as_tensor(local_tokens, device=device).reshape(1), "sum")
        self._window.completion_tokens += int(global_tokens)
        return batches, global_tokens.clamp(min=1).squeeze(0)

    def _keep_samples(self, batches) -> None:
        """Decoded prompts and completions of the step, for the completions table."""
        if not self.args.log_completions:
            return
        decode, pad = self.processing_class.batch_decode, self.processing_class.pad_token_id
        self._window.samples = []
        for batch in batches:
            width = batch["prompt_ids"].shape[1]
            completions = batch["input_ids"][:, width:].masked_fill(batch["labels"][:, width:] == IGNORE_INDEX, pad)
            self._window.samples.extend(
                zip(
                    decode(batch["prompt_ids"], skip_special_tokens=True),
                    decode(completions, skip_special_tokens=True),
                )
            )

    def training_step(self, model, inputs, num_items_in_batch=None):
        started, teacher_before = time.perf_counter(), self._window.teacher_seconds
        loss = super().training_step(model, inputs, num_items_in_batch)
        teacher_seconds = self._window.teacher_seconds - teacher_before
        self._window.student_seconds.append(time.perf_counter() - started - teacher_seconds)
        return loss

    # ----- Loss -----

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"][:, int(inputs["prompt_width"]) :]
        tokens = labels.ne(IGNORE_INDEX).sum()
        started = time.perf_counter()
        teacher = self.teacher(inputs)
        self._window.teacher_seconds += time.perf_counter() - started
        student = student_output(model, inputs, self.objective.student_view, self.vocab_size)
        loss_sum = self.objective.loss_sum(student, teacher, labels)
        if "on_policy" in inputs:  # a training slice (evaluation batches carry no flag)
            self._window.add_loss(inputs["on_policy"], loss_sum.item(), tokens.item())
        if num_items_in_batch is None:  # evaluation: the mean over this batch's completion tokens
            loss = loss_sum / tokens.clamp(min=1)
        else:  # training: DDP averages gradients over ranks, so undo that mean on top of the global token count
            loss = loss_sum / num_items_in_batch * self.accelerator.num_processes
        return (loss, student) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation is off-policy on the dataset completions: the loss only, no logits gathered."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self.teacher.close()  # a server client's connections; it reopens them if used again
            if self.vllm is not None:
                self.vllm.close()

    # ----- Logging -----

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and not any(k.startswith("eval_") for k in logs):
            sum_over_ranks = lambda t: self.accelerator.reduce(t.to(self.args.device), "sum").cpu()  # noqa: E731
            logs.update(self._window.logs(sum_over_ranks))
            self._maybe_print_completions()
            self._window = TrainingWindow(started=time.perf_counter())
        super().log(logs, start_time)

    def _maybe_print_completions(self) -> None:
        args = self.args
        step = self.state.global_step
        if not (args.log_completions and self._window.samples and step % args.log_completions_steps == 0):
            return
        if self.accelerator.is_main_process:
            from rich.console import Console
            from rich.table import Table

            table = Table(title=f"Completions at step {step}", show_lines=True)
            table.add_column("prompt", overflow="fold")
            table.add_column("completion", overflow="fold")
            samples = self._window.samples[: args.num_completions_to_print or len(self._window.samples)]
            for prompt, completion in samples:
                table.add_row(prompt, completion)
            Console().print(table)

"""`DistillationTrainer`: orchestration only; the math lives in `losses`, rollouts in `rollout`, rows in `data`.

One optimizer step, as the transformers training loop runs it:

1. `get_batch_samples` takes the step's gradient-accumulation micro-batches (slices), draws which are on-policy,
   generates completions for all on-policy slices in ONE `generate` call, and counts the completion tokens of the
   whole step across all ranks. That count normalises the loss, so the gradient does not depend on gradient
   accumulation or world size.
2. `training_step` / `compute_loss` run each slice: the teacher under no_grad, the student, and the divergence over
   completion positions only (the LM heads never see prompt positions).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict

import torch
from accelerate.utils import broadcast_object_list
from torch import nn
from torch.utils.data import Sampler
from transformers import GenerationConfig, PreTrainedModel, Trainer

from .config import DistillationConfig
from .data import DistillationCollator, Tokenizer, tokenize_dataset
from .losses import (
    IGNORE_INDEX,
    chunked_jsd_loss,
    chunked_sparse_top1_loss,
    generalized_jsd_loss,
    local_sparse_top1_loss,
    sparse_top1_loss,
    topk_forward_kl_loss,
)
from .models import load_causal_lm, load_tokenizer, output_rows, parse_init_kwargs
from .rollout import draw_on_policy, generate_slices
from .teacher.client import TeacherClient
from .teacher.local import shared_vocab_size

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


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


def _has_local_tokenizer(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, name)) for name in TOKENIZER_FILES)


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

        student_kwargs = parse_init_kwargs(args.model_init_kwargs, "model_init_kwargs")
        if isinstance(model, str):
            model = load_causal_lm(model, student_kwargs, args.trust_remote_code)
        elif student_kwargs:
            raise ValueError(
                "model_init_kwargs were given but the student is already built; pass the student as a "
                "path to load it with them, or drop model_init_kwargs"
            )
        if processing_class is None:
            processing_class = load_tokenizer(model.config._name_or_path, args.trust_remote_code)
        if processing_class.pad_token is None:
            processing_class.pad_token = processing_class.eos_token

        self.teacher_client = None
        if args.use_teacher_server:
            if teacher_model is not None:
                raise ValueError(
                    "use_teacher_server=True scores with the server at teacher_model_server_url; do not "
                    "also pass teacher_model"
                )
            self.teacher_client, teacher = self._connect_teacher(args, processing_class), None
            self.vocab_size = output_rows(model)
        else:
            teacher, teacher_tokenizer = self._load_teacher(teacher_model, args, processing_class)
            self.vocab_size = shared_vocab_size(model, teacher, processing_class, teacher_tokenizer)
        if args.loss_chunk_size is not None:
            for who, m in (("student", model), ("teacher", teacher or model)):
                text_config = m.config.get_text_config()
                if getattr(text_config, "final_logit_softcapping", None) or getattr(text_config, "logit_scale", None):
                    raise ValueError(
                        f"loss_chunk_size: the {who} transforms its logits after the LM head "
                        "(softcapping or scaling), which the chunked loss does not reproduce"
                    )

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
        self.teacher_model = None if teacher is None else self._prepare_teacher(teacher)
        self.generation_config, self.eos_token_ids = self._generation_config(model, processing_class)
        if args.use_liger_kernel:
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

            self._liger_loss = LigerFusedLinearJSDLoss(
                beta=args.beta,
                ignore_index=IGNORE_INDEX,
                temperature=args.temperature,
                weight_hard_loss=0.0,
                weight_soft_loss=1.0,
            )
        self._step_flags: list[bool] = []
        self._micro_index = 0
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._loss_sums = torch.zeros(4, dtype=torch.float64)  # on sum, on tokens, off sum, off tokens
        self._window = {"start": None, "tokens": 0, "teacher_s": 0.0}
        self._last_samples: list[tuple[str, str]] = []

    # ----- Construction helpers -----

    @staticmethod
    def _connect_teacher(args: DistillationConfig, tokenizer) -> TeacherClient:
        client = TeacherClient(
            args.teacher_model_server_url,
            protocol=args.teacher_server_protocol,
            response_format=args.teacher_server_response_format,
            timeout=args.teacher_server_timeout,
            max_retries=args.teacher_server_max_retries,
            model=args.teacher_server_model,
        )
        client.wait_until_ready(args.teacher_server_startup_timeout)
        served = client.vocab_size()
        if served is not None and served != len(tokenizer):
            raise ValueError(
                f"the teacher server at {args.teacher_model_server_url} serves a vocabulary of {served} "
                f"tokens but the student's tokenizer has {len(tokenizer)}; they must share a tokenizer"
            )
        return client

    @staticmethod
    def _load_teacher(teacher_model, args: DistillationConfig, tokenizer):
        teacher_model = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        if teacher_model is None:
            raise ValueError("no teacher: pass teacher_model or set teacher_model_name_or_path")
        teacher_kwargs = parse_init_kwargs(args.teacher_model_init_kwargs, "teacher_model_init_kwargs")
        if isinstance(teacher_model, str):
            if args.teacher_model_revision is not None:
                teacher_kwargs.setdefault("revision", args.teacher_model_revision)
            name = teacher_model
            teacher_model = load_causal_lm(teacher_model, teacher_kwargs, args.trust_remote_code)
        else:
            if teacher_kwargs:
                raise ValueError(
                    "teacher_model_init_kwargs were given but the teacher is already built; pass the "
                    "teacher as a path to load it with them, or drop teacher_model_init_kwargs"
                )
            name = teacher_model.config._name_or_path
        teacher_tokenizer = None
        if name and (not os.path.isdir(name) or _has_local_tokenizer(name)):
            try:
                teacher_tokenizer = load_tokenizer(name, args.trust_remote_code, args.teacher_model_revision)
            except (OSError, ValueError):
                teacher_tokenizer = None  # no tokenizer published with the teacher: only the sizes are checked
        teacher_model.eval()
        teacher_model.requires_grad_(False)
        return teacher_model, teacher_tokenizer

    def _prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        """Place the teacher like the student: sharded under DeepSpeed ZeRO-3 and FSDP, replicated otherwise."""
        if self.is_deepspeed_enabled:
            import copy

            import deepspeed

            config = copy.deepcopy(self.accelerator.state.deepspeed_plugin.deepspeed_config)
            stage = config.get("zero_optimization", {}).get("stage", 0)
            config["zero_optimization"] = {"stage": 3} if stage == 3 else {"stage": 0}
            config.pop("optimizer", None)
            config.pop("scheduler", None)
            teacher, *_ = deepspeed.initialize(model=teacher, config=config)
        elif self.is_fsdp_enabled:
            teacher = self.accelerator.prepare_model(teacher)
        else:
            teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        teacher.eval()
        return teacher

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
            min_p=None,
            repetition_penalty=1.0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos_ids,
            use_cache=True,
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

    # ----- One optimizer step: on/off-policy slices and one generation call -----

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
        if self._window["start"] is None:
            self._window["start"] = time.perf_counter()
        flags = self._on_policy_flags(len(batches))
        on_policy = [i for i, flag in enumerate(flags) if flag]
        self._metrics["on_policy_fraction"].append(len(on_policy) / max(len(flags), 1))
        if on_policy:
            started = time.perf_counter()
            rollouts = generate_slices(
                self.model,
                [batches[i] for i in on_policy],
                self.generation_config,
                self.eos_token_ids,
                self.processing_class.pad_token_id,
            )
            self._metrics["time/generation_s"].append(time.perf_counter() - started)
            lengths = torch.cat([r.lengths for r in rollouts]).float()
            truncated = torch.cat([r.truncated for r in rollouts]).float()
            for i, rollout in zip(on_policy, rollouts):
                batches[i] = rollout.batch
            self._record_completions(lengths, truncated, [batches[i] for i in on_policy])
        else:
            self._metrics["time/generation_s"].append(0.0)
        if self.teacher_client is not None and batches:
            started = time.perf_counter()
            self._score_with_server(batches)
            self._window["teacher_s"] += time.perf_counter() - started
        local_tokens = sum(b["labels"].ne(IGNORE_INDEX).sum() for b in batches) if batches else torch.tensor(0)
        global_tokens = self.accelerator.reduce(torch.as_tensor(local_tokens, device=device).reshape(1), "sum")
        self._step_flags, self._micro_index = flags, 0
        self._window["tokens"] += int(global_tokens)
        return batches, global_tokens.clamp(min=1).squeeze(0)

    def _score_with_server(self, batches: list[dict[str, torch.Tensor]]) -> None:
        """One client call for every slice of the step; the teacher's answers ride along in each slice's batch."""
        sequences, prompt_lengths, places = [], [], []
        for b, batch in enumerate(batches):
            width = batch["prompt_ids"].shape[1]
            completion_mask = batch["labels"][:, width:].ne(IGNORE_INDEX)
            for row in range(batch["input_ids"].shape[0]):
                prompt = batch["prompt_ids"][row][batch["prompt_mask"][row].bool()].tolist()
                completion = batch["input_ids"][row, width:][completion_mask[row]].tolist()
                if completion:  # a prompt-only row has nothing to score
                    sequences.append(prompt + completion)
                    prompt_lengths.append(len(prompt))
                    places.append((b, row))
        top_k = max(self.args.loss_top_k, 1)
        scores = (
            self.teacher_client.score(sequences, prompt_lengths, top_k, self.args.temperature) if sequences else None
        )
        for batch in batches:
            rows, width = batch["input_ids"].shape[0], batch["input_ids"].shape[1] - batch["prompt_ids"].shape[1]
            device = batch["input_ids"].device
            batch["teacher_topk_logprobs"] = torch.full((rows, width, top_k), float("-inf"), device=device)
            batch["teacher_topk_ids"] = torch.zeros((rows, width, top_k), dtype=torch.long, device=device)
            batch["teacher_token_logprobs"] = torch.full((rows, width), float("-inf"), device=device)
        for i, (b, row) in enumerate(places):
            n = int(scores.completion_lengths[i])
            batch = batches[b]
            batch["teacher_topk_logprobs"][row, :n] = torch.from_numpy(scores.topk_logprobs[i, :n])
            batch["teacher_topk_ids"][row, :n] = torch.from_numpy(scores.topk_ids[i, :n])
            batch["teacher_token_logprobs"][row, :n] = torch.from_numpy(scores.actual_logprobs[i, :n])

    def _record_completions(self, lengths: torch.Tensor, truncated: torch.Tensor, batches) -> None:
        lengths = self.accelerator.gather(lengths)
        truncated = self.accelerator.gather(truncated)
        self._metrics["completions/mean_length"].append(lengths.mean().item())
        self._metrics["completions/min_length"].append(lengths.min().item())
        self._metrics["completions/max_length"].append(lengths.max().item())
        self._metrics["completions/truncated_fraction"].append(truncated.mean().item())
        if self.args.log_completions:
            decode = self.processing_class.batch_decode
            self._last_samples = []
            for batch in batches:
                prompts = decode(batch["prompt_ids"], skip_special_tokens=True)
                width = batch["prompt_ids"].shape[1]
                completions = decode(
                    batch["input_ids"][:, width:].masked_fill(
                        batch["labels"][:, width:] == IGNORE_INDEX, self.processing_class.pad_token_id
                    ),
                    skip_special_tokens=True,
                )
                self._last_samples.extend(zip(prompts, completions))

    def training_step(self, model, inputs, num_items_in_batch=None):
        on_policy = self._step_flags[self._micro_index] if self._micro_index < len(self._step_flags) else False
        self._micro_index += 1
        started, teacher_before = time.perf_counter(), self._window["teacher_s"]
        loss = super().training_step(model, inputs, num_items_in_batch)
        teacher_s = self._window["teacher_s"] - teacher_before
        self._metrics["time/student_s"].append(time.perf_counter() - started - teacher_s)
        offset = 0 if on_policy else 2
        self._loss_sums[offset] += self._last_loss_sum
        self._loss_sums[offset + 1] += self._last_tokens
        return loss

    # ----- Loss -----

    def _forward_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids")} | {"use_cache": False}

    def _divergence_sum(self, student_logits, teacher_logits, labels) -> torch.Tensor:
        args = self.args
        if args.beta > 0 and args.loss_top_k == 1:
            return local_sparse_top1_loss(
                student_logits,
                teacher_logits,
                labels,
                args.beta,
                args.temperature,
                args.loss_add_tail,
                args.reverse_kl_top_1_mode,
                reduction="sum",
            )
        return generalized_jsd_loss(
            student_logits,
            teacher_logits,
            labels,
            args.beta,
            args.temperature,
            "sum",
            args.loss_top_k,
            args.loss_add_tail,
        )

    def _chunked_divergence_sum(self, model, student_hidden, teacher_hidden, labels) -> torch.Tensor:
        args = self.args
        student_head = self.accelerator.unwrap_model(model).get_output_embeddings()
        teacher_head = self.accelerator.unwrap_model(self.teacher_model).get_output_embeddings()
        common = {
            "chunk_size": args.loss_chunk_size,
            "reduction": "sum",
            "student_bias": student_head.bias,
            "teacher_bias": teacher_head.bias,
            "vocab_size": self.vocab_size,
        }
        heads = (student_hidden, student_head.weight, teacher_hidden, teacher_head.weight, labels)
        if args.beta > 0 and args.loss_top_k == 1:
            return chunked_sparse_top1_loss(
                *heads,
                args.beta,
                args.temperature,
                add_tail=args.loss_add_tail,
                reverse_kl_top_1_mode=args.reverse_kl_top_1_mode,
                **common,
            )
        return chunked_jsd_loss(
            *heads, args.beta, args.temperature, top_k=args.loss_top_k, add_tail=args.loss_add_tail, **common
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        width = int(inputs["prompt_width"])
        completion_width = inputs["input_ids"].shape[1] - width
        labels = inputs["labels"][:, width:]
        tokens = labels.ne(IGNORE_INDEX).sum()
        forward = self._forward_inputs(inputs)
        use_hidden = self.args.loss_chunk_size is not None or self.args.use_liger_kernel

        if self.teacher_client is not None:
            outputs = model(**forward, logits_to_keep=completion_width + 1)
            loss_sum = self._server_divergence_sum(outputs.logits[:, :-1, : self.vocab_size], inputs, labels)
            return self._normalise(loss_sum, tokens, num_items_in_batch, outputs, return_outputs)

        started = time.perf_counter()
        with torch.no_grad():
            if use_hidden:
                teacher_out = self.teacher_model(**forward, logits_to_keep=1, output_hidden_states=True)
                teacher_side = teacher_out.hidden_states[-1][:, width - 1 : -1]
            else:
                teacher_out = self.teacher_model(**forward, logits_to_keep=completion_width + 1)
                teacher_side = teacher_out.logits[:, :-1, : self.vocab_size]
            del teacher_out
        self._window["teacher_s"] += time.perf_counter() - started

        if use_hidden:
            outputs = model(**forward, logits_to_keep=1, output_hidden_states=True)
            student_hidden = outputs.hidden_states[-1][:, width - 1 : -1]
            if self.args.use_liger_kernel:
                loss_sum = self._liger_divergence_sum(model, student_hidden, teacher_side, labels, tokens)
            else:
                loss_sum = self._chunked_divergence_sum(model, student_hidden, teacher_side, labels)
        else:
            outputs = model(**forward, logits_to_keep=completion_width + 1)
            loss_sum = self._divergence_sum(outputs.logits[:, :-1, : self.vocab_size], teacher_side, labels)

        return self._normalise(loss_sum, tokens, num_items_in_batch, outputs, return_outputs)

    def _normalise(self, loss_sum, tokens, num_items_in_batch, outputs, return_outputs):
        self._last_loss_sum, self._last_tokens = loss_sum.detach().double().cpu(), tokens.double().cpu()
        if num_items_in_batch is None:  # evaluation: the mean over this batch's completion tokens
            loss = loss_sum / tokens.clamp(min=1)
        else:  # training: DDP averages gradients over ranks, so undo that mean on top of the global token count
            loss = loss_sum / num_items_in_batch * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _server_divergence_sum(self, student_logits, inputs, labels) -> torch.Tensor:
        args = self.args
        if "teacher_topk_logprobs" not in inputs:  # evaluation batches skip get_batch_samples
            self._score_with_server([inputs])
        topk_logprobs, topk_ids = inputs["teacher_topk_logprobs"], inputs["teacher_topk_ids"]
        if args.beta > 0:
            return sparse_top1_loss(
                student_logits,
                labels,
                topk_ids[..., 0],
                topk_logprobs[..., 0],
                inputs["teacher_token_logprobs"],
                args.beta,
                args.temperature,
                args.loss_add_tail,
                reduction="sum",
            )
        return topk_forward_kl_loss(
            student_logits, labels, topk_ids, topk_logprobs, args.temperature, args.loss_add_tail, reduction="sum"
        )

    def _liger_divergence_sum(self, model, student_hidden, teacher_hidden, labels, tokens):
        student_head = self.accelerator.unwrap_model(model).get_output_embeddings()
        teacher_head = self.accelerator.unwrap_model(self.teacher_model).get_output_embeddings()
        hidden_size = student_hidden.shape[-1]
        mean = self._liger_loss(
            student_hidden.reshape(-1, hidden_size),
            student_head.weight[: self.vocab_size],
            teacher_hidden.reshape(-1, teacher_hidden.shape[-1]),
            teacher_head.weight[: self.vocab_size],
            labels.reshape(-1),
        )
        return mean * tokens.clamp(min=1)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation is off-policy on the dataset completions: the loss only, no logits gathered."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ----- Logging -----

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and not any(k.startswith("eval_") for k in logs):
            for key, values in self._metrics.items():
                if values:
                    logs[key] = sum(values) / len(values)
            sums = self.accelerator.reduce(self._loss_sums.to(self.args.device, torch.float32), "sum").double()
            if sums[1] > 0:
                logs["on_policy_loss"] = round((sums[0] / sums[1]).item(), 6)
            if sums[3] > 0:
                logs["off_policy_loss"] = round((sums[2] / sums[3]).item(), 6)
            logs["time/teacher_s"] = self._window["teacher_s"] / max(len(self._metrics["time/generation_s"]), 1)
            logs["completion_tokens"] = self._window["tokens"]  # trained since the last log, all ranks
            if self._window["start"] is not None:
                elapsed = time.perf_counter() - self._window["start"]
                logs["completion_tokens_per_second"] = self._window["tokens"] / max(elapsed, 1e-9)
            self._maybe_print_completions()
            self._metrics.clear()
            self._loss_sums.zero_()
            self._window = {"start": time.perf_counter(), "tokens": 0, "teacher_s": 0.0}
        super().log(logs, start_time)

    def _maybe_print_completions(self) -> None:
        args = self.args
        step = self.state.global_step
        if not (args.log_completions and self._last_samples and step % args.log_completions_steps == 0):
            return
        if self.accelerator.is_main_process:
            from rich.console import Console
            from rich.table import Table

            table = Table(title=f"Completions at step {step}", show_lines=True)
            table.add_column("prompt", overflow="fold")
            table.add_column("completion", overflow="fold")
            samples = self._last_samples[: args.num_completions_to_print or len(self._last_samples)]
            for prompt, completion in samples:
                table.add_row(prompt, completion)
            Console().print(table)
        self._last_samples = []

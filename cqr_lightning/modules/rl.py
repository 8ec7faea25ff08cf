"""RLModule: GRPO with the retrieval reward, manual optimisation (SPEC.md "Stage 2").

One training step = one rollout batch:
1. sample G responses per prompt (temperature, top_p, stop at </rewrite>);
2. score them with the retrieval reward (`self.scorer`, the RetrievalScorer given to the constructor);
3. group-normalised advantages;
4. for `updates_per_rollout` passes, over micro-batches: reference log-probs (frozen warm-up adapter,
   or the base with adapters disabled), policy log-probs with gradient, the clipped surrogate + k3 KL
   (- entropy bonus), backward; then clip, optimizer step, scheduler step. A step whose gradient norm is not
   finite changes nothing (cqr_lightning/modules/gradient_guard.py).
With one update per rollout the "old" log-probs equal the current ones (ratio 1), so they are taken
from the same forward pass; with more, they are computed once, without gradient, before updating.

Under DDP each process samples and scores whole groups for its share of the step's prompts; the loss is
normalised by the token and sequence counts of the whole global batch (summed over the processes), and scaled by
the number of processes because DDP averages the gradients, so the update is the one a single process would make
on the global batch. Each generation call is seeded from `seed` and its first prompt's place in the stream, so
with `generation_batch_size` dividing the per-process batch, one process and DDP draw the same samples.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import replace

import torch

from cqr_lightning.distributed import sample_seed
from cqr_lightning.grpo.losses import advantage_scale_name, group_advantages, grpo_loss
from cqr_lightning.grpo.rollout import Rollout, pack_rollout, response_log_probs
from cqr_lightning.memory_errors import checkpointing_on, loss_pass_hints, out_of_memory_named
from cqr_lightning.models.generation import generate
from cqr_lightning.modules.gradient_guard import NonFiniteGradientGuard
from cqr_lightning.modules.policy import PolicyModule
from cqr_lightning.optim import build_optimizer, build_scheduler
from cqr_lightning.scoring import reward_statistics

REFERENCE_ADAPTER = "reference"


class RLModule(PolicyModule):
    stage_name = "rl"

    def __init__(
        self,
        policy,
        tokenizer,
        group_size: int = 8,
        temperature: float = 0.7,
        top_p: float = 1.0,
        clip_eps: float = 0.2,
        kl_beta: float = 0.001,
        entropy_coef: float = 0.0,
        loss_aggregation: str = "token_mean",
        loss_constant: float | None = None,
        scale_advantages: str | bool = "group",
        updates_per_rollout: int = 1,
        micro_batch_size: int = 8,
        micro_batch_tokens: int | None = None,
        max_grad_norm: float = 1.0,
        max_nonfinite_updates: int = 3,
        optimizer: str = "adamw",
        lr: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        generation_batch_size: int | None = None,
        min_new_tokens: int = 0,
        fast_sampling: bool = False,
        release_sampling_copy: bool = False,
        static_decoding: bool = False,
        static_prompt_bucket: int | None = None,
        static_cache_at_full_length: bool = False,
        static_decoding_loop: bool = False,
        logprob_chunk_size: int | None = None,
        shared_prompt_passes: bool = False,
        seed: int = 0,
        **policy_kwargs,
    ):
        super().__init__(policy, tokenizer, **policy_kwargs)
        self.automatic_optimization = False
        self.group_size = group_size
        self.temperature = temperature
        self.top_p = top_p
        self.clip_eps = clip_eps
        self.kl_beta = kl_beta
        self.entropy_coef = entropy_coef
        self.loss_aggregation = loss_aggregation
        self.loss_constant = loss_constant
        self.scale_advantages = advantage_scale_name(scale_advantages)  # fails early, naming the setting
        self.updates_per_rollout = updates_per_rollout
        self.micro_batch_size = micro_batch_size
        if micro_batch_tokens is not None and (isinstance(micro_batch_tokens, bool) or micro_batch_tokens < 1):
            raise ValueError(f"rl.micro_batch_tokens={micro_batch_tokens} must be a positive integer or null")
        self.micro_batch_tokens = micro_batch_tokens
        self.max_grad_norm = max_grad_norm
        self.gradient_guard = NonFiniteGradientGuard(max_nonfinite_updates, "rl")
        self.generation_batch_size = generation_batch_size
        self.min_new_tokens = min_new_tokens  # > 0 only to force response lengths in benchmarks
        self.fast_sampling = fast_sampling
        self.release_sampling_copy = release_sampling_copy  # free the copy's merged linears during the loss passes
        self.static_decoding = static_decoding
        if static_prompt_bucket is not None and static_prompt_bucket < 1:
            raise ValueError(
                f"rl.static_prompt_bucket must be a positive token count or null, got {static_prompt_bucket}"
            )
        self.static_prompt_bucket = static_prompt_bucket  # None: pad to max_prompt_length (one shape)
        # with a bucket: this process's first generate call pads to max_prompt_length, so the static cache is built
        # at its full length once and later (bucketed) calls reuse it instead of growing it and recompiling
        self.static_cache_at_full_length = static_cache_at_full_length
        self._full_static_cache_built = False
        if static_decoding_loop and not static_decoding:
            raise ValueError("rl.static_decoding_loop decodes over a static cache: set rl.static_decoding=true too")
        self.static_decoding_loop = static_decoding_loop  # our own loop instead of transformers' generate
        self._widest_generation_call = 0  # prompts in this process's largest generate call
        if logprob_chunk_size is not None and logprob_chunk_size < 1:
            raise ValueError(f"rl.logprob_chunk_size must be a positive token count or null, got {logprob_chunk_size}")
        self.logprob_chunk_size = logprob_chunk_size  # None: all of a micro-batch's logits at once
        self.shared_prompt_passes = shared_prompt_passes  # the loss passes run each group's prompt once
        self.seed = seed
        self._sampler = None
        self._sampler_step = -1
        self.optimizer_settings = {"name": optimizer, "lr": lr, "betas": tuple(betas), "weight_decay": weight_decay}
        self.warmup_steps = warmup_steps
        self.trainable_names = [name for name, p in policy.named_parameters() if p.requires_grad]
        self.timings: dict[str, float] = {}
        disable_dropout(policy)

    # reference policy
    @property
    def has_reference_adapter(self) -> bool:
        return REFERENCE_ADAPTER in getattr(self.policy, "peft_config", {})

    @contextmanager
    def reference_policy(self):
        """The frozen reference: the warm-up adapter kept as `reference`, else the base without adapters."""
        if not self.has_reference_adapter:
            with self.policy.disable_adapter():
                yield self.policy
            return
        active = self.policy.active_adapter
        self.policy.set_adapter(REFERENCE_ADAPTER)
        try:
            yield self.policy
        finally:
            self.policy.set_adapter(active)
            self._restore_trainable()

    def _restore_trainable(self) -> None:
        """peft's set_adapter toggles requires_grad; put back exactly the trained set."""
        trainable = set(self.trainable_names)
        for name, param in self.policy.named_parameters():
            param.requires_grad_(name in trainable)

    # rollout
    def generation_model(self):
        """With `fast_sampling`, a bf16 copy of the policy with the LoRA merged in, synced to the current step."""
        if not self.fast_sampling:
            return self.policy
        from cqr_lightning.models.merged_sampler import MergedSampler

        if self._sampler is None:
            self._sampler = MergedSampler(self.policy)
        elif self._sampler_step != self.global_step or self._sampler.released:
            self._sampler.sync()
        self._sampler_step = self.global_step
        return self._sampler.model

    def sample(self, turns, indices=None, epoch: int = 0):
        """G samples per turn, group-contiguous; each generation call seeded from the stream index of its first
        turn (`indices`, the turns' places in epoch `epoch` of the stream)."""
        indices = list(range(len(turns))) if indices is None else list(indices)
        prompts = self.prompts(turns)
        step = self.generation_batch_size or len(turns)
        samples = []
        for start in range(0, len(turns), step):
            part = prompts[start : start + step]
            chunk = generate(
                self.generation_model(),
                self.tokenizer,
                self.static_batch_prompts(part),
                max_new_tokens=self.max_new_tokens,
                min_new_tokens=self.min_new_tokens,
                do_sample=True,
                temperature=self.temperature,
                top_p=self.top_p,
                num_return_sequences=self.group_size,
                seed=sample_seed(self.seed, epoch, indices[start]),
                static_cache_width=self.max_prompt_length if self.static_decoding else None,
                static_cache_bucket=self.next_static_prompt_bucket(),
                decode_loop=self.static_decoding_loop,
            )
            samples += [replace(s, prompt_index=start + s.prompt_index) for s in chunk if s.prompt_index < len(part)]
        return sorted(samples, key=lambda s: s.prompt_index)  # group-contiguous

    def static_batch_prompts(self, prompts: list[str]) -> list[str]:
        """With static decoding, `prompts` filled up to the most prompts a generate call of this process has had so far
        by repeating the last one (the caller drops the filler's samples): a short batch, such as the last one of an
        epoch, keeps the static cache's batch size, so decoding is not compiled again for one step."""
        if not self.static_decoding:
            return prompts
        self._widest_generation_call = max(self._widest_generation_call, len(prompts))
        return prompts + [prompts[-1]] * (self._widest_generation_call - len(prompts))

    def next_static_prompt_bucket(self) -> int | None:
        """The bucket for the next generate call: none (full width) for this process's first call when the static
        cache is to be built at full length, the configured bucket otherwise."""
        if self.static_decoding and self.static_cache_at_full_length and not self._full_static_cache_built:
            self._full_static_cache_built = True
            return None
        return self.static_prompt_bucket

    def micro_batches(self, rollout: Rollout) -> list[torch.Tensor]:
        """Row indices of each micro-batch, by prompt length, of at most `rl.micro_batch_size` rows and
        `rl.micro_batch_tokens` tokens (`Rollout.micro_batches`; a group's samples share their prompt and stay
        together). The loss is a sum over micro-batches, so their make-up does not change the gradient. Under DDP a
        token budget can give the processes different counts, so all take the largest (each backward all-reduces)."""
        batches = list(rollout.micro_batches(self.micro_batch_size, self.micro_batch_tokens))
        if self.micro_batch_tokens is None or self.world_size == 1:
            return batches
        count = self.global_max(len(batches))
        return list(rollout.micro_batches(self.micro_batch_size, self.micro_batch_tokens, at_least=count))

    @torch.no_grad()
    def log_probs_no_grad(self, model, rollout: Rollout) -> torch.Tensor:
        width = rollout.response_mask.shape[1]
        out = torch.zeros(rollout.response_mask.shape, dtype=torch.float32, device=self.device)
        for index in self.micro_batches(rollout):
            part = rollout.select(index)
            logp, _ = response_log_probs(
                model,
                part,
                self.temperature,
                chunk_size=self.logprob_chunk_size,
                shared_prompts=self.shared_prompt_passes,
            )
            out[index, : part.response_mask.shape[1]] = logp.float()
        return out[:, :width]

    @contextmanager
    def timed(self, name: str):
        """Wall time of one phase of the step (GPU work included), logged as time/<name>; a profiler sees the
        phase as the range `phase/<name>` (bench/profile_step.py)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        out_of_memory = out_of_memory_named(self.stage_name, name, lambda: self.memory_hints(name))
        with out_of_memory, torch.profiler.record_function(f"phase/{name}"):
            yield
            if self.device.type == "cuda":  # inside the range, so that a profiler's range covers the phase's kernels
                torch.cuda.synchronize(self.device)
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    def memory_hints(self, phase: str) -> list[str]:
        """The settings that lower the memory of `phase` of the GRPO step, with their values in this run."""
        if phase == "generation":
            calls = self.generation_batch_size or "null (the whole batch)"
            hints = [
                f"rl.generation_batch_size={calls} (prompts per generate call, each sampled rl.group_size="
                f"{self.group_size} times)",
                f"rl.max_new_tokens={self.max_new_tokens}",
                f"model.max_prompt_length={self.max_prompt_length}",
            ]
            if self.static_decoding and self.static_prompt_bucket is None:
                hints.append("rl.static_prompt_bucket=256 (a static cache only as long as the prompts need)")
            if self.fast_sampling:
                hints.append("rl.fast_sampling=false (no merged bf16 copy of the model for sampling)")
            return hints
        backward = phase == "forward_backward"
        hints = loss_pass_hints("rl.micro_batch_size", self.micro_batch_size, backward, checkpointing_on(self.policy))
        if self.micro_batch_tokens is not None:
            budget = self.micro_batch_tokens
            hints.insert(0, f"rl.micro_batch_tokens={budget} (tokens a pass holds at once; e.g. {max(1, budget // 2)})")
        if self.logprob_chunk_size is None:
            hints.append("rl.logprob_chunk_size=1024 (no micro-batch's full-vocabulary logits at once)")
        if self.fast_sampling and not self.release_sampling_copy:
            hints.append("rl.release_sampling_copy=true (free the sampling copy during the loss passes)")
        return hints

    def training_step(self, batch, batch_idx: int):
        self.timings = {}
        turns = batch.turns
        with self.timed("generation"):
            samples = self.sample(turns, batch.indices, batch.position.epoch)
            if self.release_sampling_copy and self._sampler is not None:
                self._sampler.release()
        with self.timed("reward"):
            rewards = self.scorer.score([turns[s.prompt_index] for s in samples], [s.text for s in samples])
        self.update(samples, rewards, n_prompts=len(turns))

    @property
    def world_size(self) -> int:
        return self._trainer.world_size if self._trainer is not None else 1

    def global_max(self, value: int) -> int:
        """The largest of `value` over the DDP processes."""
        largest = self.trainer.strategy.reduce(
            torch.tensor(value, device=self.device), reduce_op=torch.distributed.ReduceOp.MAX
        )
        return int(largest)

    def global_sum(self, value: float) -> float:
        """`value` summed over the DDP processes (itself on one process)."""
        if self.world_size == 1:
            return value
        total = self.trainer.strategy.reduce(torch.tensor(value, device=self.device), reduce_op="sum")
        return float(total)

    def accumulate_gradients(self, rollout: Rollout, advantages, old_logp, ref_logp) -> dict[str, float]:
        """Backward the GRPO loss over micro-batches; the sum of their losses is the whole batch's loss. Under DDP
        the counts are the global batch's and each process's stats are its share of the global values."""
        n = len(rollout)
        total_tokens = self.global_sum(float(rollout.response_mask.sum())) or 1.0
        total_sequences = self.global_sum(float(n))
        totals: dict[str, float] = {}
        for _ in range(self.updates_per_rollout):
            for index in self.micro_batches(rollout):
                part = rollout.select(index)
                width = part.response_mask.shape[1]
                with_entropy = bool(self.entropy_coef)
                logp, entropy = response_log_probs(
                    self.policy,
                    part,
                    self.temperature,
                    with_entropy=with_entropy,
                    chunk_size=self.logprob_chunk_size,
                    shared_prompts=self.shared_prompt_passes,
                )
                loss, stats = grpo_loss(
                    logp,
                    old_logp[index, :width] if old_logp is not None else logp.detach(),
                    ref_logp[index, :width] if ref_logp is not None else None,
                    advantages[index],
                    part.response_mask,
                    clip_eps=self.clip_eps,
                    kl_beta=self.kl_beta,
                    entropy_coef=self.entropy_coef,
                    entropy=entropy,
                    mode=self.loss_aggregation,
                    constant=self.loss_constant,
                    num_tokens_total=total_tokens,
                    num_sequences_total=total_sequences,
                )
                self.manual_backward(loss * self.world_size / self.updates_per_rollout)  # DDP averages gradients
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0.0) + value / self.updates_per_rollout
        return totals

    def update(self, samples, rewards, n_prompts: int) -> dict[str, float]:
        """One GRPO optimizer step on group-contiguous `samples` with their `rewards` (a RewardBatch)."""
        reward_tensor = torch.tensor(rewards.rewards, dtype=torch.float32, device=self.device)
        advantages = group_advantages(
            reward_tensor, self.group_size, scale=self.scale_advantages, reduce_sum=self.global_sum
        )  # [N]
        pad = self.tokenizer.pad_token_id
        rollout = pack_rollout([s.prompt_ids for s in samples], [s.response_ids for s in samples], pad).to(self.device)
        n, total_tokens = len(rollout), rollout.response_mask.sum().clamp(min=1)
        self.policy.train()
        ref_logp = old_logp = None
        if self.kl_beta:
            with self.timed("reference_logprobs"), self.reference_policy() as reference:
                ref_logp = self.log_probs_no_grad(reference, rollout)
        if self.updates_per_rollout > 1:
            with self.timed("old_logprobs"):
                old_logp = self.log_probs_no_grad(self.policy, rollout)

        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        with self.timed("forward_backward"):
            totals = self.accumulate_gradients(rollout, advantages, old_logp, ref_logp)
        with self.timed("optimizer"):
            grad_norm = self.gradient_guard.check_step(self.policy, optimizer, self.trainer)
            self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()

        # loss terms: this process's share of the global value, summed over processes; the rest: means
        summed = {f"train/{k}": v for k, v in totals.items()}
        summed["train/generated_tokens"] = float(rollout.response_mask.sum())
        self.log_dict(summed, batch_size=n_prompts, sync_dist=True, reduce_fx="sum")
        metrics = {f"train/{k}": v for k, v in reward_statistics(rewards, self.group_size).items()}
        metrics["train/response_tokens"] = float(total_tokens) / n
        metrics["train/grad_norm"] = grad_norm  # before clipping
        metrics["train/skipped_updates"] = float(self.gradient_guard.skipped)
        metrics["train/lr"] = optimizer.param_groups[0]["lr"]
        metrics.update({f"time/{k}": v for k, v in self.timings.items()})
        self.log_dict(metrics, batch_size=n_prompts, sync_dist=True)
        reward = metrics["train/reward_mean"]
        self.log("reward", reward, prog_bar=True, logger=False, batch_size=n_prompts, sync_dist=True)
        return {**metrics, **summed}

    def configure_optimizers(self):
        optimizer = build_optimizer(self.policy.parameters(), **self.optimizer_settings)
        scheduler = build_scheduler(optimizer, self.warmup_steps, None, "constant")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def disable_dropout(model: torch.nn.Module) -> None:
    """Sampling, old, reference and trained log-probs must come from one function: no dropout in RL."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0

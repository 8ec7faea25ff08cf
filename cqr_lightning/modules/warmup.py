"""WarmupModule: QLoRA supervised fine-tuning on the self-distilled (prompt, response) pairs."""

from __future__ import annotations

from cqr_lightning.memory_errors import checkpointing_on, loss_pass_hints, out_of_memory_named
from cqr_lightning.modules.gradient_guard import NonFiniteGradientGuard
from cqr_lightning.modules.policy import PolicyModule
from cqr_lightning.optim import build_optimizer, build_scheduler
from cqr_lightning.sft import build_sft_batch, response_token_loss


class WarmupModule(PolicyModule):
    """Automatic optimisation; the Trainer clips gradients and accumulates. Batches hold distilled rows. A step whose
    gradient is not finite applies no update (cqr_lightning/modules/gradient_guard.py)."""

    stage_name = "warmup"

    def __init__(
        self,
        policy,
        tokenizer,
        max_length: int = 3072,
        optimizer: str = "adamw",
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        total_steps: int | None = None,
        schedule: str = "cosine",
        max_nonfinite_updates: int = 3,
        **policy_kwargs,
    ):
        super().__init__(policy, tokenizer, **policy_kwargs)
        self.max_length = max_length
        self.optimizer_settings = {"name": optimizer, "lr": lr, "betas": tuple(betas), "weight_decay": weight_decay}
        self.schedule_settings = {"warmup_steps": warmup_steps, "total_steps": total_steps, "schedule": schedule}
        self.gradient_guard = NonFiniteGradientGuard(max_nonfinite_updates, "warmup")
        self._rows_per_step = 0  # rows of the current step over all processes (training_step sets it)

    def training_step(self, batch, batch_idx: int):
        rows = batch.turns
        tensors = build_sft_batch(
            self.tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows], self.max_length
        )
        tensors = {k: v.to(self.device) for k, v in tensors.items()}
        self._rows_per_step = len(rows) * self.trainer.world_size  # for memory_hints
        with out_of_memory_named(self.stage_name, "the SFT forward pass", self.memory_hints):
            logits = self.policy(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits
            loss = response_token_loss(logits, tensors["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(rows))
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=len(rows))
        return loss

    def backward(self, loss, *args, **kwargs) -> None:
        with out_of_memory_named(self.stage_name, "the SFT backward pass", self.memory_hints):
            super().backward(loss, *args, **kwargs)

    def memory_hints(self) -> list[str]:
        """The settings that lower the SFT passes' memory, with their values in this run."""
        hints = loss_pass_hints("warmup.batch_size", self._rows_per_step, True, checkpointing_on(self.policy))
        return [*hints, f"warmup.max_length={self.max_length} (prompt and response tokens per row)"]

    def on_before_optimizer_step(self, optimizer) -> None:
        """Before the Trainer clips (gradients accumulated, and all-reduced under DDP): drop a non-finite step."""
        self.gradient_guard.check_step(self.policy, optimizer, self.trainer)
        self.log("train/skipped_updates", float(self.gradient_guard.skipped), batch_size=1)

    def configure_optimizers(self):
        optimizer = build_optimizer(self.policy.parameters(), **self.optimizer_settings)
        scheduler = build_scheduler(optimizer, **self.schedule_settings)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

"""GRPO on the real model through TRL's GRPOTrainer, to set beside ours (issue 16, time to quality).

Takes the same Hydra overrides as `train.py`, so both trainers read one configuration: the same base model (4-bit
with LoRA), the same warm-up adapter as the starting policy (`model.adapter`), the same training turns (the
training split less the held-out conversations and the turns GRPO leaves out), the same prompts, the same
reward (our `RetrievalScorer`: `rl.rewards` on the `search.query_mode` search), and the same G, prompts a step,
steps, learning rate and warm-up, clip range, KL weight, temperature and response budget, with the token-mean loss
("dapo" in TRL). The trained adapter is then evaluated by the pipeline's own table code on `eval.splits`.

    python bench/trl_real_model.py experiment=pack_smollm2 seed=0 data.dir=DATA \
        model.adapter=RUN/warmup/adapter run_dir=OUT/trl-seed0

Writes `<run_dir>/trl_summary.json` (wall time of training, per-step seconds and rewards, the evaluation tables)
and the usual `<run_dir>/eval/` tables. What differs from ours and cannot be matched: TRL's KL reference is the
base model with the adapter switched off (ours: the warm-up adapter), TRL has no entropy bonus (ours 0.001),
and TRL samples from the 4-bit policy (ours from a merged bf16 copy with `rl.fast_sampling`).

`--train-only` (anywhere among the overrides) stops after training: the adapter and a summary without tables;
run again with the same overrides, it only evaluates that adapter (so that two trainers can train back to back in
one device call and their tables follow).

`--unsloth` (anywhere among the overrides) trains the same way through Unsloth: its 4-bit loading of the same base
(the folder `model.*` resolves to, the converted GGUF for the pack), its LoRA with the configuration's rank and
alpha on the attention and MLP projections (dropout 0: our GRPO turns dropout off too), the warm-up adapter's weights
put into that LoRA, and its gradient checkpointing when `model.gradient_checkpointing`; the trainer is TRL's
GRPOTrainer as Unsloth patches it. It needs the wheels of `bash bench/prepare_device_carry.sh --unsloth-wheels`
ahead of the others on PYTHONPATH; the row is "after Unsloth GRPO".
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

UNSLOTH_FLAG = "--unsloth"
TRAIN_ONLY_FLAG = "--train-only"
if UNSLOTH_FLAG in sys.argv:
    import unsloth  # noqa: F401  (before transformers: it patches TRL, transformers and peft as they are imported)

from transformers import TrainerCallback  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


LLAMA_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # all-linear


class StepRecorder(TrainerCallback):
    """Seconds, mean reward and gradient norm of every optimizer step."""

    def __init__(self, label: str = "TRL"):
        self.label = label
        self.seconds: list[float] = []
        self.rewards: list[float] = []
        self.grad_norms: list[float] = []

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.seconds.append(time.perf_counter() - self.start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "grad_norm" in logs:
            self.grad_norms.append(float(logs["grad_norm"]))
        if logs and "reward" in logs:
            self.rewards.append(float(logs["reward"]))
            print(f"{self.label} step {state.global_step}: reward {logs['reward']:.3f}", flush=True)


def training_turns(cfg: DictConfig, retriever, run_dir: Path) -> list:
    """The turns our GRPO trains on: the training split (held-out conversations already removed by the reader)
    less the turns `skipped_rl_turns` leaves out."""
    from cqr_lightning.readers import turn_reader
    from cqr_lightning.stages import skipped_rl_turns

    skipped = skipped_rl_turns(cfg, run_dir, retriever)
    return [t for t in turn_reader(cfg.data, cfg.data.train_split)() if t.id not in skipped]


def trl_scale_rewards(scale_advantages) -> str:
    """TRL's `scale_rewards` for our `rl.scale_advantages`; TRL's "batch" divides by the std of the raw rewards,
    not of the group-centred ones, so our "pooled" has no TRL equivalent."""
    from cqr_lightning.grpo.losses import advantage_scale_name

    scale = advantage_scale_name(scale_advantages)
    if scale == "pooled":
        raise ValueError("rl.scale_advantages=pooled has no TRL equivalent; compare with group or none")
    return scale


def grpo_config(cfg: DictConfig, out: Path, unsloth: bool = False):
    from trl import GRPOConfig

    r = cfg.rl
    sequences = int(r.batch_size) * int(r.group_size)
    micro = min(int(r.micro_batch_size), sequences)
    if sequences % micro:
        raise SystemExit(f"rl.batch_size x rl.group_size ({sequences}) must be a multiple of rl.micro_batch_size")
    return GRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=sequences // micro,
        num_generations=int(r.group_size),
        max_completion_length=int(r.max_new_tokens),
        temperature=float(r.temperature),
        top_p=float(r.top_p),
        learning_rate=float(r.lr),
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=int(r.warmup_steps),
        adam_beta1=float(r.betas[0]),
        adam_beta2=float(r.betas[1]),
        weight_decay=float(r.weight_decay),
        max_grad_norm=float(r.max_grad_norm),
        beta=float(r.kl_beta),
        epsilon=float(r.clip_eps),
        loss_type="dapo",
        scale_rewards=trl_scale_rewards(r.scale_advantages),
        num_iterations=int(r.updates_per_rollout),
        # Unsloth's LoRA brings its own checkpointing (unsloth_policy)
        gradient_checkpointing=bool(cfg.model.get("gradient_checkpointing", False)) and not unsloth,
        bf16=torch.cuda.is_available(),
        max_steps=int(r.max_steps),
        seed=int(cfg.seed),
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_vllm=False,
        use_cpu=not torch.cuda.is_available(),
    )


def unsloth_policy(cfg: DictConfig):
    """Unsloth's 4-bit base and LoRA, shaped as `cfg.model` says, holding the warm-up adapter's weights."""
    from unsloth import FastLanguageModel

    from cqr_lightning.models.loading import load_adapter, resolve_model_dir

    model, _ = FastLanguageModel.from_pretrained(
        model_name=resolve_model_dir(cfg.model),
        max_seq_length=int(cfg.model.max_prompt_length) + int(cfg.rl.max_new_tokens),
        dtype=torch.bfloat16 if torch.cuda.is_available() else None,
        load_in_4bit=bool(cfg.model.load_in_4bit),
        fast_inference=False,  # no vLLM, as for ours and TRL's
    )
    targets = cfg.model.lora.target_modules
    model = FastLanguageModel.get_peft_model(
        model,
        r=int(cfg.model.lora.r),
        lora_alpha=int(cfg.model.lora.alpha),
        lora_dropout=0.0,
        target_modules=LLAMA_LORA_TARGETS if targets == "all-linear" else list(targets),
        use_gradient_checkpointing="unsloth" if cfg.model.get("gradient_checkpointing", False) else False,
        random_state=int(cfg.seed),
    )
    if cfg.model.get("adapter"):  # into the LoRA just made: every weight must fit, or this stops naming the file
        model = load_adapter(model, cfg.model.adapter, adapter_name="default")
    return model


def main(overrides: list[str]) -> dict:
    from datasets import Dataset
    from trl import GRPOTrainer

    from cqr_lightning.config import compose_train_config
    from cqr_lightning.models.loading import load_policy, load_tokenizer, save_adapter
    from cqr_lightning.prompts import render_prompt
    from cqr_lightning.rewriter_card import rewriter_card
    from cqr_lightning.stages import open_stage_retriever, stage_scorer

    unsloth, train_only = UNSLOTH_FLAG in overrides, TRAIN_ONLY_FLAG in overrides
    overrides = [o for o in overrides if o not in (UNSLOTH_FLAG, TRAIN_ONLY_FLAG)]
    label, trainer_name = ("Unsloth", "unsloth GRPOTrainer") if unsloth else ("TRL", "trl.GRPOTrainer")
    cfg = compose_train_config(overrides)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    trained = trained_summary(run_dir)
    if trained is not None:  # an earlier --train-only run: its adapter only gets its tables
        return evaluate_trained(cfg, run_dir, trained, label)
    torch.manual_seed(int(cfg.seed))
    tokenizer = load_tokenizer(cfg.model)
    if unsloth:
        policy = unsloth_policy(cfg)
    else:
        policy = load_policy(cfg.model, adapter=cfg.model.get("adapter"), trainable=True)
    with open_stage_retriever(cfg) as retriever:  # the retriever and scorer our RL stage builds
        turns = training_turns(cfg, retriever, run_dir)
        scorer = stage_scorer(cfg, retriever, rewards=cfg.rl.get("rewards"))
        prompts = [render_prompt(tokenizer, t, cfg.model.max_prompt_length, False, cfg.response_format) for t in turns]
        dataset = Dataset.from_list([{"prompt": p, "turn_index": i} for i, p in enumerate(prompts)])

        def retrieval_reward(completions, turn_index, **kwargs) -> list[float]:
            return scorer.score([turns[i] for i in turn_index], list(completions)).rewards

        recorder = StepRecorder(label)
        trainer = GRPOTrainer(
            model=policy,
            reward_funcs=retrieval_reward,
            args=grpo_config(cfg, run_dir / "trl", unsloth),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[recorder],
        )
        started = time.perf_counter()
        try:
            trainer.train()
        except Exception as error:  # e.g. NaN weights stopping sampling: a result too, recorded before exiting
            summary = {
                "trainer": trainer_name,
                "overrides": overrides,
                "failed_at_step": len(recorder.seconds) + 1,
                "error": f"{type(error).__name__}: {error}"[:2000],
                "seconds_until_failure": time.perf_counter() - started,
                "step_seconds": recorder.seconds,
                "reward_mean": recorder.rewards,
                "grad_norms": recorder.grad_norms,
            }
            (run_dir / "trl_summary.json").write_text(json.dumps(summary, indent=2))
            raise
        train_seconds = time.perf_counter() - started
    save_adapter(policy, trained_adapter(run_dir), tokenizer=tokenizer, card=rewriter_card(cfg, cfg.rl.max_new_tokens))
    summary = {
        "trainer": trainer_name,
        "overrides": overrides,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "training_turns": len(turns),
        "train_seconds": train_seconds,
        "step_seconds": recorder.seconds,
        "reward_mean": recorder.rewards,
        "grad_norms": recorder.grad_norms,
    }
    (run_dir / "trl_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    if train_only:
        return summary
    del trainer, policy  # the tables load the adapter afresh
    return evaluate_trained(cfg, run_dir, summary, label)


def trained_adapter(run_dir: Path) -> Path:
    return run_dir / "rl" / "adapter"


def trained_summary(run_dir: Path) -> dict | None:
    """The summary of a finished training whose tables are still to come (a `--train-only` run), else None."""
    path = run_dir / "trl_summary.json"
    if not (trained_adapter(run_dir) / "adapter_model.safetensors").is_file() or not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if "train_seconds" in summary and "tables" not in summary else None


def evaluate_trained(cfg: DictConfig, run_dir: Path, summary: dict, label: str) -> dict:
    """The pipeline's tables for the trained adapter, added to `summary` (written again)."""
    from cqr_lightning.pipeline_tables import evaluate_rewriters

    eval_cfg = OmegaConf.merge(cfg, {"eval": {"untuned_row": False, "warmup_row": False}})
    tables = evaluate_rewriters(eval_cfg, run_dir, {f"after {label} GRPO": str(trained_adapter(run_dir))})
    summary = {**summary, "tables": tables}
    (run_dir / "trl_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])

"""The training stages behind `train.py`: warm-up, RL, and the pipeline that chains them (its closing tables:
cqr_lightning/pipeline_tables.py).

Each stage works in its own folder of the run directory:

    <run_dir>/warmup/  distilled.jsonl, distill_stats.json, checkpoints/, adapter/, curves.*
    <run_dir>/rl/      checkpoints/, best_adapter/, adapter/, curves.*
    <run_dir>/eval/    per evaluation split, one folder per compared rewriter; summary.json

A stage whose final adapter exists is not run again; a stage with checkpoints resumes from the newest one that
loads (`resume: true`), in the same MLflow run.

Under DDP (`trainer=ddp`) every process runs these stages: each builds its Trainer first and loads its own model
on that Trainer's device; the main process alone logs to MLflow and writes the run folder's files, and the others
wait for it (`strategy.barrier`) where they read what it wrote. The final evaluation runs on the main process.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from cqr_lightning.builders import build_datamodule, build_module, build_sampler
from cqr_lightning.checkpointing import AtomicCheckpointIO, read_checkpoint_extras
from cqr_lightning.distributed import gather_objects, is_main_process, per_rank_batch
from cqr_lightning.errors import ConfigError
from cqr_lightning.io_utils import write_json, write_jsonl
from cqr_lightning.observers import build_callbacks, build_logger
from cqr_lightning.pipeline_tables import evaluate_rewriters, pipeline_rows
from cqr_lightning.preflight import check_training_inputs
from cqr_lightning.rewriter_card import rewriter_card
from cqr_lightning.run_control.step_progress import step_progress_bar
from cqr_lightning.run_control.stop_on_sigterm import StopOnSigterm
from cqr_lightning.run_control.stream_position import StreamPositionCallback
from cqr_lightning.run_control.validation_on_resume import ValidationOnResume
from cqr_lightning.trainer_flags import trainer_flags

log = logging.getLogger(__name__)
LAST_CHECKPOINT = "last.ckpt"


def checkpoint_to_resume(cfg: DictConfig, stage_dir: Path) -> str | None:
    """`ckpt_path`, else the newest checkpoint that loads (cqr_lightning/resume.py); `resume=false` starts over."""
    from cqr_lightning.resume import checked_checkpoint, checkpoint_files, choose_checkpoint, set_aside

    if cfg.get("ckpt_path"):
        return checked_checkpoint(cfg.ckpt_path)
    if not cfg.get("resume", True):
        if is_main_process():  # under DDP the main process moves the old checkpoints once
            set_aside(stage_dir / "checkpoints")
        return None
    chosen = choose_checkpoint(checkpoint_files(stage_dir / "checkpoints"))
    return str(chosen) if chosen else None


def make_trainer(cfg: DictConfig, stage_cfg: DictConfig, stage_dir: Path, logger, callbacks: list, **kwargs):
    checkpoint = ModelCheckpoint(
        dirpath=stage_dir / "checkpoints",
        every_n_train_steps=int(stage_cfg.checkpoint_every_n_steps),
        save_last=True,
        save_top_k=1,
    )
    flags = trainer_flags(cfg)
    return L.Trainer(
        **flags,
        default_root_dir=stage_dir,
        logger=logger if logger is not None else False,
        callbacks=[
            *callbacks,
            *(step_progress_bar() if flags.get("enable_progress_bar", True) else []),
            StreamPositionCallback(),
            StopOnSigterm(stage_dir / "checkpoints" / LAST_CHECKPOINT),
            ValidationOnResume(),
            checkpoint,
        ],
        plugins=[AtomicCheckpointIO()],
        num_sanity_val_steps=0,
        enable_model_summary=False,
        val_check_interval=int(stage_cfg.val_every_n_steps),
        check_val_every_n_epoch=None,
        **kwargs,
    )


def remember_run(module, logger) -> None:
    """Store the MLflow run id with the checkpoints, so a resumed stage logs into the same run."""
    if logger is not None:
        module.extras["mlflow_run_id"] = logger.run_id


def load_policy_on(cfg: DictConfig, trainer: L.Trainer, adapter: str | None):
    """The LoRA policy on this process's device (`trainer.strategy.root_device`: under DDP, the local rank's)."""
    from cqr_lightning.models.loading import load_policy

    return load_policy(OmegaConf.merge(cfg.model, {"device": str(trainer.strategy.root_device)}), adapter=adapter)


def open_stage_retriever(cfg: DictConfig):
    """The retriever used for training rewards: queries cut to `train_max_query_words` (SPEC: 1,024)."""
    from cqr_lightning.scoring import open_reward_retriever

    return open_reward_retriever(cfg.retriever, cfg.data.corpus, cfg.train_max_query_words)


def stage_scorer(cfg: DictConfig, retriever, rewards=None):
    """The RetrievalScorer a stage judges rewrites with: its retriever, `search` plan and reward terms
    (`rl.rewards` entries; None: SPEC's reward)."""
    from cqr_lightning.grpo.reward_terms import weighted_terms
    from cqr_lightning.scoring import RetrievalScorer
    from cqr_lightning.search import SearchPlan

    return RetrievalScorer(
        retriever,
        SearchPlan.from_config(cfg.get("search")),
        rewards=weighted_terms(OmegaConf.to_container(rewards, resolve=True)) if rewards is not None else None,
        response_format=cfg.response_format,
        depth=int(cfg.retriever.get("k", 100)),
    )


def log_artifacts(logger, *paths: Path) -> None:
    if logger is None:
        return
    for path in paths:
        if path.is_dir():
            logger.experiment.log_artifacts(logger.run_id, str(path), artifact_path=path.name)
        elif path.exists():
            logger.experiment.log_artifact(logger.run_id, str(path))


def final_adapter(stage_dir: Path) -> Path:
    return stage_dir / "adapter"


@dataclass
class StageStart:
    dir: Path
    ckpt: str | None  # checkpoint to resume from
    logger: object | None  # MLflow logger: the checkpoint's own run when resuming


def start_stage(cfg: DictConfig, run_dir: Path, name: str) -> StageStart | None:
    """None when the stage already finished (its adapter exists); else where it works and what it resumes."""
    stage_dir = run_dir / name
    if final_adapter(stage_dir).is_dir():
        log.info("%s already finished: %s", name, final_adapter(stage_dir))
        return None
    stage_dir.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint_to_resume(cfg, stage_dir)
    run_id = read_checkpoint_extras(ckpt).get("mlflow_run_id") if ckpt else None
    logger = build_logger(cfg, name, run_dir, run_id) if is_main_process() else None  # DDP: the main process logs
    return StageStart(stage_dir, ckpt, logger)


# --- warm-up ---------------------------------------------------------------------------------------


def self_distill(cfg: DictConfig, stage_dir: Path, trainer: L.Trainer, policy, tokenizer, scorer, logger) -> Path:
    """Sample, filter by retrieval and write `distilled.jsonl` (reused when present unless told not to).

    Under DDP each process samples its share of the turns (`trainer`'s predict loop); the main process gathers
    them in file order, filters and writes the files while the others wait, so the file is the one a single
    process writes (sampling is seeded per batch, cqr_lightning/distributed.py)."""
    w = cfg.warmup
    distilled_path = stage_dir / "distilled.jsonl"
    if distilled_path.exists() and w.reuse_distilled:
        if count_lines(distilled_path) > 0:
            log.info("reusing %s", distilled_path)
            return distilled_path
        log.warning("%s is empty (left by an earlier run that kept nothing): sampling again", distilled_path)
    sampler = build_sampler(cfg, policy, tokenizer)
    datamodule = build_datamodule(
        cfg, "warmup", "sampling_datamodule", eval_batch_size=w.sampling_batch_size, train_limit=w.sample_limit
    )
    batches = trainer.predict(sampler, datamodule=datamodule)
    indexed = gather_objects([pair for batch in batches for pair in batch])
    if trainer.is_global_zero:
        sampled = [pair for _, pair in sorted(indexed, key=lambda item: item[0])]
        write_distilled(cfg, stage_dir, sampled, tokenizer, scorer, logger)
    trainer.strategy.barrier("distilled.jsonl written")
    return distilled_path


def write_distilled(cfg: DictConfig, stage_dir: Path, sampled: list, tokenizer, scorer, logger) -> None:
    """Filter the sampled turns by retrieval; write `distilled.jsonl` and `distill_stats.json`, log the yield."""
    from cqr_lightning.distill import distill
    from cqr_lightning.prompts import render_prompt

    w = cfg.warmup
    distilled_path = stage_dir / "distilled.jsonl"

    def prompt_for(turn):
        return render_prompt(tokenizer, turn, cfg.model.max_prompt_length, False, cfg.response_format)

    kept, stats = distill(
        sampled, scorer.best_ranks, prompt_for, w.keep_rank, cfg.response_format, w.lenient_format,
        w.solved_turn_target, scorer.question_ranks,
    )  # fmt: skip
    write_jsonl(distilled_path, (example.to_json() for example in kept))
    write_json(stage_dir / "distill_stats.json", stats)
    log.info(
        "self-distillation kept %d of %d turns (yield %.3f; %d with their question as the target)",
        stats["kept"], stats["turns"], stats["yield"], stats["question_targets"],
    )  # fmt: skip
    if logger is not None:
        logger.log_metrics({f"distill/{k}": float(v) for k, v in stats.items() if not isinstance(v, dict)})
        for bucket, count in stats["rank_histogram"].items():
            logger.log_metrics({f"distill/{bucket}": float(count)})
        log_artifacts(logger, distilled_path, stage_dir / "distill_stats.json")


def count_lines(path: Path) -> int:
    with path.open(encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip())


def run_warmup(cfg: DictConfig, run_dir: Path) -> Path:
    from cqr_lightning.models.loading import load_tokenizer

    check_training_inputs(cfg)  # settings, corpus and splits, before any model loads (cqr_lightning/preflight.py)
    stage = start_stage(cfg, run_dir, "warmup")
    if stage is None:
        return final_adapter(run_dir / "warmup")
    stage_dir, ckpt, logger = stage.dir, stage.ckpt, stage.logger
    w = cfg.warmup
    sampling = L.Trainer(**trainer_flags(cfg), logger=False, enable_model_summary=False, callbacks=[StopOnSigterm()])
    batch_size = per_rank_batch(w.batch_size, sampling.world_size, "warmup.batch_size")
    tokenizer = load_tokenizer(cfg.model)
    policy = load_policy_on(cfg, sampling, cfg.model.get("adapter"))
    with open_stage_retriever(cfg) as retriever:
        scorer = stage_scorer(cfg, retriever)
        distilled = self_distill(cfg, stage_dir, sampling, policy, tokenizer, scorer, logger)
        n_examples = count_lines(distilled)
        if n_examples == 0:
            stats_path = stage_dir / "distill_stats.json"
            if json.loads(stats_path.read_text(encoding="utf-8")).get("turns") == 0:
                raise ConfigError(
                    f"self-distillation kept no sample ({stats_path}): the training split is empty "
                    f"(data.train_split={cfg.data.train_split}, warmup.sample_limit={w.sample_limit})"
                )
            raise ConfigError(
                f"self-distillation kept no sample ({stats_path}): raise warmup.num_samples, "
                "loosen warmup.keep_rank, or for a small model use response_format=rewrite_only with "
                "warmup.prefill_response=true and warmup.lenient_format=true"
            )
        # under DDP an epoch's last global batch is left out when it cannot give every process a full share
        batches = n_examples // w.batch_size if sampling.world_size > 1 else math.ceil(n_examples / w.batch_size)
        if batches == 0:
            raise ConfigError(
                f"warmup.batch_size={w.batch_size} (the global batch) is more than the {n_examples} distilled "
                f"examples: lower it, or use fewer processes"
            )
        steps_per_epoch = math.ceil(batches / w.accumulate_grad_batches)
        total_steps = steps_per_epoch * w.epochs
        warmup_steps = int(w.warmup_ratio * total_steps)
        module = build_module(
            cfg, "warmup", policy, tokenizer, scorer, warmup_steps=warmup_steps, total_steps=total_steps
        )
        remember_run(module, logger)
        datamodule = build_datamodule(
            cfg,
            "warmup",
            distilled_path=distilled,
            batch_size=batch_size,
            eval_batch_size=w.val_batch_size,
            val_limit=w.val_limit,
        )
        card = rewriter_card(cfg, w.max_new_tokens)
        trainer = make_trainer(
            cfg,
            w,
            stage_dir,
            logger,
            build_callbacks(cfg, "warmup", dirpath=str(stage_dir), tokenizer=tokenizer, card=card),
            max_steps=total_steps,
            gradient_clip_val=w.gradient_clip_val,
            accumulate_grad_batches=w.accumulate_grad_batches,
        )
        if w.validate_before and ckpt is None:
            before = trainer.validate(module, datamodule=datamodule, verbose=False)
            if trainer.is_global_zero:
                write_json(stage_dir / "val_before.json", before[0] if before else {})
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
        after = trainer.validate(module, datamodule=datamodule, verbose=False)
        if trainer.is_global_zero:
            write_json(stage_dir / "val_after.json", after[0] if after else {})
    from cqr_lightning.models.loading import save_adapter

    if trainer.is_global_zero:
        save_adapter(policy, final_adapter(stage_dir), tokenizer=tokenizer, card=card)
        log_artifacts(logger, final_adapter(stage_dir), stage_dir / "best_adapter")
    trainer.strategy.barrier("warm-up adapter written")  # the RL stage of every process reads it
    return final_adapter(stage_dir)


# --- RL --------------------------------------------------------------------------------------------


def run_rl(cfg: DictConfig, run_dir: Path, adapter: str | None) -> Path:
    from cqr_lightning.models.loading import load_adapter, load_tokenizer, save_adapter
    from cqr_lightning.modules.rl import REFERENCE_ADAPTER

    check_training_inputs(cfg)
    stage = start_stage(cfg, run_dir, "rl")
    if stage is None:
        return final_adapter(run_dir / "rl")
    stage_dir, ckpt, logger = stage.dir, stage.ckpt, stage.logger
    r = cfg.rl
    tokenizer = load_tokenizer(cfg.model)
    card = rewriter_card(cfg, r.max_new_tokens)
    trainer = make_trainer(
        cfg,
        r,
        stage_dir,
        logger,
        build_callbacks(cfg, "rl", dirpath=str(stage_dir), tokenizer=tokenizer, card=card),
        max_steps=r.max_steps,
    )
    batch_size = per_rank_batch(r.batch_size, trainer.world_size, "rl.batch_size")
    policy = load_policy_on(cfg, trainer, adapter)
    if adapter:
        load_adapter(policy, adapter, trainable=False, adapter_name=REFERENCE_ADAPTER)
        policy.set_adapter("default")
    with open_stage_retriever(cfg) as retriever:  # one retriever for the turn filter, rewards and validation
        scorer = stage_scorer(cfg, retriever, rewards=r.rewards)
        module = build_module(cfg, "rl", policy, tokenizer, scorer)
        remember_run(module, logger)
        datamodule = build_datamodule(
            cfg,
            "rl",
            batch_size=batch_size,
            eval_batch_size=r.val_batch_size,
            val_limit=r.val_limit,
            skip_train_ids=skipped_rl_turns(cfg, stage_dir, retriever, trainer.world_size),
        )
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    if trainer.is_global_zero:
        save_adapter(policy, final_adapter(stage_dir), adapter_name="default", tokenizer=tokenizer, card=card)
        log_artifacts(logger, final_adapter(stage_dir), stage_dir / "best_adapter")
    trainer.strategy.barrier("RL adapter written")
    return final_adapter(stage_dir)


def skipped_rl_turns(cfg: DictConfig, stage_dir: Path, retriever, world_size: int = 1) -> frozenset[str]:
    """The training turns GRPO leaves out, written to `skipped_turns.json`: first turns when
    `search.first_turn_as_asked` (their rewrite is never searched, so every sample earns the same reward and the
    group teaches nothing), and the turns `rl.skip_turns_solved_at_rank` names. Retrieval is deterministic, so a
    resumed run leaves out the same turns."""
    from cqr_lightning.readers import turn_reader
    from cqr_lightning.search import SearchPlan
    from cqr_lightning.turn_filter import turns_solved_by_question

    max_rank = int(cfg.rl.get("skip_turns_solved_at_rank") or 0)
    plan = SearchPlan.from_config(cfg.get("search"))
    turns = list(turn_reader(cfg.data, cfg.data.train_split)())
    if max_rank <= 0 and not plan.first_turn_as_asked:
        check_global_batch(len(turns), int(cfg.rl.batch_size), world_size)
        return frozenset()
    first_turns = {t.id for t in turns if not t.history} if plan.first_turn_as_asked else set()
    solved: set[str] = set()
    if max_rank > 0:
        later = (t for t in turns if t.id not in first_turns)
        solved, _ = turns_solved_by_question(later, retriever, max_rank, k=int(cfg.retriever.get("k", 100)))
    skipped = first_turns | solved
    if turns and len(skipped) == len(turns):
        raise ConfigError(
            f"GRPO has no training turn left in '{cfg.data.train_split}': of {len(turns)} turns, {len(first_turns)} "
            f"are first turns searched as asked (search.first_turn_as_asked) and {len(solved)} are already solved "
            f"by the question (rl.skip_turns_solved_at_rank={max_rank}); turn one of them off"
        )
    log.info(
        "RL leaves out %d of %d training turns: %d first turns, %d that the question alone solves (rank <= %d)",
        len(skipped),
        len(turns),
        len(first_turns),
        len(solved),
        max_rank,
    )
    check_global_batch(len(turns) - len(skipped), int(cfg.rl.batch_size), world_size)
    summary = {"max_rank": max_rank, "turns": len(turns), "first_turns": len(first_turns), "solved": len(solved)}
    if is_main_process():
        write_json(stage_dir / "skipped_turns.json", {**summary, "skipped": sorted(skipped)})
    return frozenset(skipped)


def check_global_batch(n_turns: int, global_batch: int, world_size: int) -> None:
    """Under DDP an epoch's last global batch is left out when it cannot give every process a full share, so
    fewer training turns than one global batch would leave every epoch empty."""
    if world_size > 1 and n_turns < global_batch:
        raise ConfigError(
            f"rl.batch_size={global_batch} (the global batch) is more than the {n_turns} training turns GRPO "
            "trains on: lower it"
        )


# --- the pipeline ----------------------------------------------------------------------------------


def run_pipeline(cfg: DictConfig, run_dir: Path) -> dict[str, dict]:
    """Warm-up, GRPO, then the comparison tables (cqr_lightning/pipeline_tables.py)."""
    warm = run_warmup(cfg, run_dir) if cfg.pipeline.warmup else cfg.model.get("adapter")
    trained = run_rl(cfg, run_dir, str(warm) if warm else None)
    if not is_main_process():  # under DDP the main process evaluates; the others are done
        return {}
    adapters, row_rewriter = pipeline_rows(cfg, warm, trained)
    return evaluate_rewriters(cfg, run_dir, adapters, row_rewriter)

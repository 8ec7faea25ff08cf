"""Warm-up stage: the retrieval filter, response-only loss, SFT learning, and exact resume."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from cqr_lightning.checkpointing import AtomicCheckpointIO
from cqr_lightning.distill import best_sample, distill
from cqr_lightning.errors import ConfigError
from cqr_lightning.models.loading import load_policy, load_tokenizer
from cqr_lightning.modules.warmup import WarmupModule
from cqr_lightning.prompts import render_prompt
from cqr_lightning.readers import read_jsonl_turns
from cqr_lightning.retrieval.base import best_gold_rank
from cqr_lightning.retrieval.factory import open_retriever
from cqr_lightning.run_control.stream_position import StreamPositionCallback
from cqr_lightning.scoring import RetrievalScorer
from cqr_lightning.sft import IGNORE_INDEX, build_sft_batch, response_token_loss
from data_modules.distilled import DistilledDataModule


@pytest.fixture(scope="module")
def retriever(bm25s_cfg, data_cfg):
    with open_retriever(bm25s_cfg, data_cfg.corpus, show_progress=False) as r:
        yield r


@pytest.fixture(scope="module")
def tokenizer(tiny_model_cfg):
    return load_tokenizer(tiny_model_cfg)


def response(rewrite: str) -> str:
    return f"<think> resolve the reference </think>\n<rewrite> {rewrite} </rewrite>"


def test_best_sample_prefers_best_rank_then_earliest():
    assert best_sample([3, 1, 1], [True, True, True], keep_rank=1) == 1
    assert best_sample([1, 1], [False, True], keep_rank=1) == 1
    assert best_sample([2, None], [True, True], keep_rank=1) is None
    assert best_sample([2, 5], [True, True], keep_rank=3) == 0


def test_filter_keeps_exactly_the_samples_that_rank_a_gold_passage_first(retriever, data_cfg, tokenizer):
    turns = list(read_jsonl_turns(f"{data_cfg.dir}/train.jsonl"))
    # A scripted generator: per turn a good rewrite, the raw question, junk and a badly formatted answer.
    scripted = [
        (turn, [response(turn.rewrite), response(turn.question), response("zebra violin"), turn.rewrite])
        for turn in turns
    ]
    scorer = RetrievalScorer(retriever)
    kept, stats = distill(scripted, scorer.best_ranks, lambda t: render_prompt(tokenizer, t, 256), keep_rank=1)
    expected = {}
    for turn, responses in scripted:
        for text, query in zip(responses[:3], [turn.rewrite, turn.question, "zebra violin"], strict=True):
            rank = best_gold_rank(retriever.search([query], k=100)[0], turn.positives)
            if rank == 1:
                expected[turn.id] = text
                break
    assert expected, "the fixture must have turns whose rewrite ranks first"
    assert {e.turn_id: e.response for e in kept} == expected
    assert all(e.rank == 1 for e in kept)
    assert stats["kept"] == len(expected) and stats["turns"] == len(turns)
    assert stats["format_ok_rate"] == pytest.approx(3 / 4)
    assert sum(stats["rank_histogram"].values()) == 4 * len(turns)
    assert stats["rank_histogram"]["bad_format"] == len(turns)
    assert all("Here is an example" not in e.prompt for e in kept), "SFT prompts carry no few-shot example"


def test_a_turn_the_question_solves_is_kept_with_the_question_when_asked(retriever, data_with_vague_turns):
    turns = list(read_jsonl_turns(data_with_vague_turns / "train.jsonl"))
    helpful = {"vague_1": "When did the Tokyo Tower open?", "vague_2": "How do bees tell nest mates where food is?"}
    scorer = RetrievalScorer(retriever)

    def rank_of(query, turn):
        return best_gold_rank(retriever.search([query], k=100)[0], turn.positives)

    solved = {t.id for t in turns if rank_of(t.question, t) == 1}
    assert solved and not solved & helpful.keys(), "the fixture must have turns of both kinds"
    assert all(rank_of(helpful[t.id], t) == 1 for t in turns if t.id in helpful)
    # per turn: a rewrite that ranks gold first (a paraphrase, on the turns the question solves) and junk
    scripted = [
        (t, [f"<rewrite> {helpful.get(t.id, t.rewrite)} </rewrite>", "<rewrite> zebra violin </rewrite>"])
        for t in turns
    ]
    plain, _ = distill(scripted, scorer.best_ranks, lambda t: "p", 1, "rewrite_only")
    kept, stats = distill(
        scripted, scorer.best_ranks, lambda t: "p", 1, "rewrite_only",
        solved_turn_target="question", question_ranks=scorer.question_ranks,
    )  # fmt: skip
    assert {e.turn_id for e in kept} == {e.turn_id for e in plain} == solved | helpful.keys()
    by_id = {t.id: t for t in turns}
    for example in kept:
        if example.turn_id in solved:
            question = by_id[example.turn_id].question
            target = f"<rewrite> {question} </rewrite>"
            assert (example.rewrite, example.response, example.rank) == (question, target, 1)
    assert [e for e in kept if e.turn_id in helpful] == [e for e in plain if e.turn_id in helpful]
    assert stats["question_targets"] == len(solved)
    assert sum(stats["rank_histogram"].values()) == 2 * len(turns), "the question's own search is not a sample"


def test_the_question_as_target_is_refused_where_it_cannot_work(retriever, data_cfg):
    turn = next(iter(read_jsonl_turns(f"{data_cfg.dir}/train.jsonl")))
    scorer = RetrievalScorer(retriever)
    with pytest.raises(ConfigError, match="warmup.solved_turn_target=question works with response_format=rewrite_only"):
        distill([(turn, [response(turn.rewrite)])], scorer.best_ranks, lambda t: "p", 1, solved_turn_target="question")
    with pytest.raises(ConfigError, match="warmup.solved_turn_target must be one of sample, question, got 'copy'"):
        distill([(turn, [])], scorer.best_ranks, lambda t: "p", 1, "rewrite_only", solved_turn_target="copy")


def test_only_response_tokens_carry_loss(tokenizer):
    batch = build_sft_batch(tokenizer, ["prompt words here", "a much longer prompt with more words"], ["yes", "no"], 64)
    labels = batch["labels"]
    for row, prompt in enumerate(["prompt words here", "a much longer prompt with more words"]):
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert (labels[row, :n_prompt] == IGNORE_INDEX).all()
        assert labels[row, n_prompt] != IGNORE_INDEX
    logits = torch.randn(*labels.shape, 50, requires_grad=True)
    labels = labels.clamp(max=49).masked_fill(labels == IGNORE_INDEX, IGNORE_INDEX)
    response_token_loss(logits, labels).backward()
    trained_positions = labels[:, 1:] != IGNORE_INDEX  # logits[t] predicts labels[t + 1]
    grad_per_position = logits.grad[:, :-1].abs().sum(-1)
    assert (grad_per_position[trained_positions] > 0).all()
    assert (grad_per_position[~trained_positions] == 0).all()
    assert (logits.grad[:, -1] == 0).all()


def write_distilled(path, tokenizer, n: int = 4):
    rows = [
        {
            "turn_id": f"t{i}",
            "prompt": tokenizer.apply_chat_template(
                [{"role": "user", "content": f"Query: question {i}\nRewrite:"}],
                tokenize=False,
                add_generation_prompt=True,
            ),
            "response": response(f"what is the answer to question {i}"),
            "rewrite": f"what is the answer to question {i}",
            "rank": 1,
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_module(tiny_model_cfg, tokenizer, total_steps: int, lr: float = 5e-3):
    torch.manual_seed(0)
    policy = load_policy(tiny_model_cfg)
    module = WarmupModule(
        policy, tokenizer, max_length=128, lr=lr, warmup_steps=2, total_steps=total_steps, schedule="cosine"
    )
    return module


def lora_state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.policy.named_parameters() if v.requires_grad}


def trainer(tmp_path, max_steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        default_root_dir=tmp_path,
        plugins=[AtomicCheckpointIO()],
        **kwargs,
    )


class FailingFirstStep(WarmupModule):
    """The first step's loss times `factor` (1e38: the gradient norm overflows float32; NaN: NaN gradients)."""

    factor = 1e38

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * self.factor if self.global_step == 0 else loss


class LoraAfterEachStep(L.Callback):
    def __init__(self):
        self.states = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states.append(lora_state(pl_module))


@pytest.mark.parametrize("factor", [1e38, float("nan")], ids=["overflow", "nan"])
def test_a_warmup_step_with_a_non_finite_gradient_changes_nothing(
    factor, tmp_path, tiny_model_cfg, tokenizer, data_cfg
):
    distilled = write_distilled(tmp_path / "distilled.jsonl", tokenizer)
    torch.manual_seed(0)
    module = FailingFirstStep(load_policy(tiny_model_cfg), tokenizer, max_length=128, lr=5e-3, schedule="constant")
    module.factor = factor
    before, after_step = lora_state(module), LoraAfterEachStep()
    run = trainer(tmp_path, 2, callbacks=[after_step], enable_checkpointing=False)
    run.fit(module, datamodule=DistilledDataModule(distilled, data_cfg, batch_size=2))
    first, second = after_step.states
    assert all(torch.equal(before[name], first[name]) for name in before), "the failing step moved the adapter"
    assert any(not torch.equal(first[name], second[name]) for name in first), "the next step did not train"
    assert all(torch.isfinite(v).all() for v in second.values())
    assert run.callback_metrics["train/skipped_updates"] == 1


def test_warmup_stops_naming_its_settings_after_too_many_non_finite_steps(
    tmp_path, tiny_model_cfg, tokenizer, data_cfg
):
    from cqr_lightning.errors import TrainingDiverged

    distilled = write_distilled(tmp_path / "distilled.jsonl", tokenizer)
    module = FailingFirstStep(load_policy(tiny_model_cfg), tokenizer, max_length=128, max_nonfinite_updates=0)
    with pytest.raises(TrainingDiverged, match=r"warmup step 1: .*warmup\.lr.*warmup\.max_nonfinite_updates"):
        trainer(tmp_path, 2, enable_checkpointing=False).fit(
            module, datamodule=DistilledDataModule(distilled, data_cfg, batch_size=2)
        )


class OutOfMemoryInBackward(torch.autograd.Function):
    """Identity forward; backward raises CUDA's out-of-memory error, which a CPU cannot raise itself."""

    @staticmethod
    def forward(ctx, value):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB.")


class FailingBackward(WarmupModule):
    def training_step(self, batch, batch_idx):
        return OutOfMemoryInBackward.apply(super().training_step(batch, batch_idx))


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_running_out_of_memory_in_sft_names_the_batch_and_length_settings(
    where, tmp_path, tiny_model_cfg, tokenizer, data_cfg
):
    from test_memory_errors import fail_for_memory, out_of_memory_lines

    distilled = write_distilled(tmp_path / "distilled.jsonl", tokenizer)
    policy = load_policy(tiny_model_cfg)
    if where == "forward":
        fail_for_memory(policy, "forward")
    module = (WarmupModule if where == "forward" else FailingBackward)(policy, tokenizer, max_length=128)
    run = trainer(tmp_path, 1, enable_checkpointing=False)
    datamodule = DistilledDataModule(distilled, data_cfg, batch_size=2)
    message = "\n".join(out_of_memory_lines(lambda: run.fit(module, datamodule=datamodule)))
    assert message.startswith(f"warmup: the device ran out of memory during the SFT {where} pass (CUDA out of memory.")
    assert "warmup.batch_size=2 (sequences a pass holds at once; e.g. 1)" in message
    assert message.endswith("warmup.max_length=128 (prompt and response tokens per row)")


@pytest.mark.slow
def test_sft_loss_falls_when_overfitting_a_few_pairs(tmp_path, tiny_model_cfg, tokenizer, data_cfg):
    distilled = write_distilled(tmp_path / "distilled.jsonl", tokenizer)
    module = make_module(tiny_model_cfg, tokenizer, total_steps=30)
    datamodule = DistilledDataModule(distilled, data_cfg, batch_size=4)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer(tmp_path, 30, callbacks=[Record()]).fit(module, datamodule=datamodule)
    assert len(losses) == 30
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3


@pytest.mark.slow
def test_resume_continues_with_the_same_state(tmp_path, tiny_model_cfg, tokenizer, data_cfg):
    distilled = write_distilled(tmp_path / "distilled.jsonl", tokenizer, n=6)

    def fit(max_steps: int, root, ckpt_path=None):
        module = make_module(tiny_model_cfg, tokenizer, total_steps=8)
        datamodule = DistilledDataModule(distilled, data_cfg, batch_size=2)
        checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_last=True)
        run = trainer(root, max_steps, callbacks=[StreamPositionCallback(), checkpoint])
        run.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        return module, run

    straight, straight_run = fit(8, tmp_path / "straight")
    fit(5, tmp_path / "interrupted")
    last = tmp_path / "interrupted" / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert all("lora_" in key for key in saved["state_dict"]), "checkpoints hold only the LoRA weights"
    assert saved["global_step"] == 5
    resumed, resumed_run = fit(8, tmp_path / "interrupted", ckpt_path=str(last))
    assert resumed_run.global_step == straight_run.global_step == 8
    for name, value in lora_state(straight).items():
        torch.testing.assert_close(lora_state(resumed)[name], value, rtol=0, atol=0)
    straight_opt = straight_run.optimizers[0].state_dict()["state"]
    resumed_opt = resumed_run.optimizers[0].state_dict()["state"]
    for key in straight_opt:
        torch.testing.assert_close(resumed_opt[key]["exp_avg"], straight_opt[key]["exp_avg"], rtol=0, atol=0)
    assert resumed_run.lr_scheduler_configs[0].scheduler.last_epoch == 8


def test_lenient_format_keeps_readable_rewrites_and_trains_on_the_canonical_form(retriever, data_cfg, tokenizer):
    turns = [t for t in read_jsonl_turns(f"{data_cfg.dir}/train.jsonl") if t.id == "tokyo_2"]
    broken = "<rewrite> When did the Tokyo Tower open? </revisedrewrite>\nQ2: more text"
    scorer = RetrievalScorer(retriever)
    strict, _ = distill([(turns[0], [broken])], scorer.best_ranks, lambda t: "p", 1, "rewrite_only")
    kept, stats = distill([(turns[0], [broken])], scorer.best_ranks, lambda t: "p", 1, "rewrite_only", lenient=True)
    assert strict == []
    assert [(e.rewrite, e.response) for e in kept] == [
        ("When did the Tokyo Tower open?", "<rewrite> When did the Tokyo Tower open? </rewrite>")
    ]
    assert stats["format_ok_rate"] == 0.0 and stats["readable_rate"] == 1.0


def test_lenient_rewrite_reads_the_first_line_after_the_tag_up_to_a_prompt_echo():
    from cqr_lightning.formatting import lenient_rewrite

    assert lenient_rewrite("<rewrite> a b </rewrite>") == "a b"
    assert lenient_rewrite("<rewrite> a b </rewritten>\nmore") == "a b"
    assert lenient_rewrite("<rewrite> a b\nQ2: c") == "a b"
    assert lenient_rewrite("<rewrite>  </rewrite>") is None
    assert lenient_rewrite("<rewrite> how to pick a card Rewrite: ### Context Begin ###") == "how to pick a card"
    assert lenient_rewrite("<rewrite> drive in CA? A1: at 16") == "drive in CA?"
    assert lenient_rewrite("<rewrite> ### Context Begin ### Q1: who") is None
    assert lenient_rewrite("no tag") is None


def test_running_out_of_memory_while_self_distilling_names_the_sampling_settings(tiny_model_cfg, tokenizer, data_cfg):
    from test_memory_errors import fail_for_memory, out_of_memory_lines

    from cqr_lightning.distill import RewriteSampler
    from data_modules.conversations import TurnBatch

    policy = load_policy(tiny_model_cfg, trainable=False)
    fail_for_memory(policy, "generate")
    sampler = RewriteSampler(policy, tokenizer, max_prompt_length=1024, num_samples=4, max_new_tokens=8)
    batch = TurnBatch(list(read_jsonl_turns(f"{data_cfg.dir}/train.jsonl"))[:3], position=None)
    lines = out_of_memory_lines(lambda: sampler.predict_step(batch, 0))
    assert lines[0].startswith("warmup: the device ran out of memory during self-distillation sampling (CUDA out")
    assert lines[2:] == [
        "  warmup.sampling_batch_size=3 (turns per generate call, each sampled warmup.num_samples=4 times)",
        "  warmup.max_new_tokens=8",
        "  model.max_prompt_length=1024",
    ]

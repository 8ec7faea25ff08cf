"""GRPO stage on CPU: the tiny model with real 4-bit layers, scripted rollouts where the test needs control."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from cqr_lightning.errors import RetrievalError
from cqr_lightning.grpo.rollout import pack_rollout, response_log_probs
from cqr_lightning.models.generation import GeneratedSample
from cqr_lightning.models.loading import load_adapter, load_policy, load_tokenizer, save_adapter
from cqr_lightning.modules.rl import REFERENCE_ADAPTER, RLModule
from cqr_lightning.readers import turn_reader
from cqr_lightning.retrieval.factory import open_retriever
from cqr_lightning.scoring import RetrievalScorer, RewardBatch
from data_modules.conversations import ConversationDataModule

GOOD = "<think> it is the Nile </think>\n<rewrite> Nile river delta </rewrite>"
BAD = "<think> no idea </think>\n<rewrite> delta </rewrite>"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_cfg):
    return load_tokenizer(tiny_model_cfg)


@pytest.fixture(scope="module")
def retriever(bm25s_cfg, data_cfg):
    with open_retriever(bm25s_cfg, data_cfg.corpus, show_progress=False) as r:
        yield r


class ScriptedScorer(L.Callback):
    """Rewards from a table keyed by response text (the retriever is tested separately below)."""

    def __init__(self, rewards: dict[str, float]):
        self.rewards = rewards
        self.depth = 100

    def setup(self, trainer, pl_module, stage):
        pl_module.scorer = self

    def score(self, turns, responses):
        return RewardBatch(
            [self.rewards[r] for r in responses], [1] * len(responses), [True] * len(responses), responses
        )


class ScriptedRollouts(RLModule):
    """Samples a fixed set of responses instead of generating (so the test knows what was rewarded)."""

    responses: list[str] = []

    def sample(self, turns, indices=None, epoch=0):
        samples = []
        for index, prompt in enumerate(self.prompts(turns)):
            prompt_ids = tuple(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            for text in self.responses:
                response_ids = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
                samples.append(GeneratedSample(index, prompt_ids, response_ids, text, "stop"))
        return samples


def policy_with_random_lora_b(cfg, seed: int = 0):
    """peft starts LoRA B at zero, which gives every A a zero gradient on the first step."""
    torch.manual_seed(seed)
    policy = load_policy(cfg)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    return policy


def lora_state(policy) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in policy.named_parameters() if "lora_" in k and v.requires_grad}


def fit(module, data_cfg, callbacks, steps: int, tmp_path, batch_size: int = 1, **trainer_kwargs):
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **{"enable_checkpointing": False, **trainer_kwargs},
    )
    trainer.fit(module, datamodule=ConversationDataModule(data_cfg, batch_size=batch_size))
    return trainer


def scripted_module(policy, tokenizer, responses, **kwargs):
    module = ScriptedRollouts(
        policy, tokenizer, group_size=len(responses), lr=kwargs.pop("lr", 1e-2), max_prompt_length=256, **kwargs
    )
    module.responses = responses
    return module


def response_logp(module, turn, text: str) -> float:
    prompt = module.prompts([turn])[0]
    prompt_ids = module.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = module.tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp, _ = response_log_probs(module.policy, pack_rollout([prompt_ids], [ids], module.tokenizer.pad_token_id))
    return logp.sum().item()


def test_one_grpo_step_changes_every_lora_parameter(tiny_model_cfg, tokenizer, data_cfg, tmp_path):
    policy = policy_with_random_lora_b(tiny_model_cfg)
    before = lora_state(policy)
    module = scripted_module(policy, tokenizer, [GOOD, BAD, GOOD, BAD], kl_beta=0.001, entropy_coef=0.001)
    trainer = fit(module, data_cfg, [ScriptedScorer({GOOD: 2.0, BAD: 0.0})], 1, tmp_path)
    assert trainer.global_step == 1
    after = lora_state(policy)
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged, f"{len(unchanged)} LoRA parameters did not move, e.g. {unchanged[:2]}"
    assert trainer.callback_metrics["train/grad_norm"] > 0


def test_the_advantage_scale_reaches_the_gradient(tiny_model_cfg, tokenizer, data_cfg, tmp_path):
    # one group, rewards 2, 0, 2, 0: centred +-1; its sample std is sqrt(4 / 3), the pooled (population) std is 1
    norms = {}
    for scale in ("group", "pooled"):
        policy = policy_with_random_lora_b(tiny_model_cfg)
        module = scripted_module(policy, tokenizer, [GOOD, BAD, GOOD, BAD], kl_beta=0.0, entropy_coef=0.0,
                                 scale_advantages=scale, max_grad_norm=1e9)  # fmt: skip
        trainer = fit(module, data_cfg, [ScriptedScorer({GOOD: 2.0, BAD: 0.0})], 1, tmp_path / scale)
        norms[scale] = float(trainer.callback_metrics["train/grad_norm"])
    # without KL and entropy the gradient is linear in the advantages (to the rounding of the 4-bit layers' compute)
    assert norms["pooled"] / norms["group"] == pytest.approx(math.sqrt(4 / 3), rel=2e-3)


def test_group_with_equal_rewards_gives_no_policy_gradient(tiny_model_cfg, tokenizer, data_cfg, tmp_path):
    policy = policy_with_random_lora_b(tiny_model_cfg)
    before = lora_state(policy)
    module = scripted_module(policy, tokenizer, [GOOD, BAD, GOOD, BAD], kl_beta=0.0, entropy_coef=0.0)
    trainer = fit(module, data_cfg, [ScriptedScorer({GOOD: 1.0, BAD: 1.0})], 1, tmp_path)
    assert trainer.callback_metrics["train/grad_norm"] == 0
    assert trainer.callback_metrics["train/flat_group_share"] == 1.0
    after = lora_state(policy)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_kl_is_zero_when_the_reference_equals_the_policy(tiny_model_cfg, tokenizer, data_cfg, tmp_path):
    policy = policy_with_random_lora_b(tiny_model_cfg)
    save_adapter(policy, tmp_path / "warm")
    load_adapter(policy, tmp_path / "warm", trainable=False, adapter_name=REFERENCE_ADAPTER)
    policy.set_adapter("default")
    module = scripted_module(policy, tokenizer, [GOOD, BAD], kl_beta=0.1)
    trainer = fit(module, data_cfg, [ScriptedScorer({GOOD: 2.0, BAD: 0.0})], 1, tmp_path)
    assert trainer.callback_metrics["train/kl"] == pytest.approx(0.0, abs=1e-6)
    assert sorted(n for n, p in policy.named_parameters() if p.requires_grad) == sorted(module.trainable_names)
    assert not any(REFERENCE_ADAPTER in n for n in module.trainable_names)


def test_kl_against_the_base_is_positive_once_the_policy_moved(tiny_model_cfg, tokenizer, data_cfg, tmp_path):
    policy = policy_with_random_lora_b(tiny_model_cfg)  # non-zero B: policy differs from the base
    module = scripted_module(policy, tokenizer, [GOOD, BAD], kl_beta=0.1)
    trainer = fit(module, data_cfg, [ScriptedScorer({GOOD: 2.0, BAD: 0.0})], 1, tmp_path)
    assert trainer.callback_metrics["train/kl"] > 1e-6


def test_scripted_rewards_raise_the_probability_of_the_best_response(tiny_model_cfg, tokenizer, data_cfg, tmp_path):
    torch.manual_seed(0)
    policy = load_policy(tiny_model_cfg)
    module = scripted_module(policy, tokenizer, [GOOD, BAD, GOOD, BAD], kl_beta=0.0, lr=5e-3)
    turn = next(iter(ConversationDataModule(data_cfg).ordered_stream("train", 1)))[0]
    good_before, bad_before = response_logp(module, turn, GOOD), response_logp(module, turn, BAD)
    fit(module, data_cfg, [ScriptedScorer({GOOD: 2.0, BAD: 0.0})], 6, tmp_path)
    assert response_logp(module, turn, GOOD) > good_before + 0.5
    assert response_logp(module, turn, BAD) < bad_before


class RewardsPerStep(ScriptedScorer):
    """Scripted rewards that change from one step to the next (the last table repeats)."""

    def __init__(self, tables: list[dict[str, float]]):
        super().__init__(tables[0])
        self.tables = tables
        self.calls = 0

    def score(self, turns, responses):
        self.rewards = self.tables[min(self.calls, len(self.tables) - 1)]
        self.calls += 1
        return super().score(turns, responses)


class LoraAfterEachStep(L.Callback):
    def __init__(self):
        self.states = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states.append(lora_state(pl_module.policy))


# advantages of +-1e38 (no scaling): the gradient's norm overflows float32 (each entry stays finite)
OVERFLOW = {GOOD: 1e38, BAD: -1e38}
# an infinite reward (which the scorer's reward terms refuse, but a scripted scorer does not): NaN advantages and
# gradients, which clipping would spread into every LoRA weight
NAN_GRADIENT = {GOOD: float("inf"), BAD: 0.0}


@pytest.mark.parametrize("failing", [OVERFLOW, NAN_GRADIENT], ids=["overflow", "nan"])
def test_a_step_with_a_non_finite_gradient_changes_nothing_and_training_goes_on(
    failing, tiny_model_cfg, tokenizer, data_cfg, tmp_path
):
    policy = policy_with_random_lora_b(tiny_model_cfg)
    before = lora_state(policy)
    module = scripted_module(policy, tokenizer, [GOOD, BAD], kl_beta=0.0, scale_advantages="none")
    after_step = LoraAfterEachStep()
    trainer = fit(module, data_cfg, [RewardsPerStep([failing, {GOOD: 1.0, BAD: 0.0}]), after_step], 2, tmp_path)
    assert trainer.global_step == 2
    first, second = after_step.states
    assert all(torch.equal(before[name], first[name]) for name in before), "the overflowing step moved the adapter"
    assert all(torch.isfinite(v).all() for v in second.values())
    assert any(not torch.equal(first[name], second[name]) for name in first), "the next step did not train"
    assert trainer.callback_metrics["train/skipped_updates"] == 1
    assert module.gradient_guard.in_a_row == 0


def test_non_finite_gradients_step_after_step_stop_training_naming_the_settings(
    tiny_model_cfg, tokenizer, data_cfg, tmp_path
):
    from cqr_lightning.errors import TrainingDiverged

    policy = policy_with_random_lora_b(tiny_model_cfg)
    before = lora_state(policy)
    module = scripted_module(
        policy, tokenizer, [GOOD, BAD], kl_beta=0.0, scale_advantages="none", max_nonfinite_updates=1
    )
    named = r"rl step 2: .* for 2 steps in a row.*rl\.lr.*rl\.max_nonfinite_updates"
    with pytest.raises(TrainingDiverged, match=named):
        fit(module, data_cfg, [RewardsPerStep([OVERFLOW])], 4, tmp_path)
    assert all(torch.equal(before[name], param) for name, param in lora_state(policy).items())


def test_reward_callback_gives_spec_values_on_the_fixture_corpus(retriever, data_cfg):
    from cqr_lightning.readers import read_jsonl_turns

    turn = next(t for t in read_jsonl_turns(f"{data_cfg.dir}/train.jsonl") if t.positives == ("tokyo-2",))
    scorer = RetrievalScorer(retriever)
    responses = [
        "<think> the tower in Tokyo </think>\n<rewrite> When did the Tokyo Tower open? </rewrite>",
        "<think> x </think>\n<rewrite> zebra violin quartz </rewrite>",
        "When did the Tokyo Tower open?",
        "<think> Japan </think>\n<rewrite> Tokyo capital of Japan inhabitants metropolitan </rewrite>",
    ]
    batch = scorer.score([turn] * 4, responses)
    hits = retriever.search(["Tokyo capital of Japan inhabitants metropolitan"], k=100)[0]
    rank_4 = [h.passage_id for h in hits].index("tokyo-2") + 1
    assert batch.ranks[:3] == [1, None, None]
    assert batch.format_ok == [True, True, False, True]
    assert batch.rewards[:3] == [2.0, 0.0, -0.1]
    assert rank_4 > 1 and batch.ranks[3] == rank_4
    assert batch.rewards[3] == pytest.approx(2 - (rank_4 - 1) / 9)


def test_reward_statistics_count_rewrites_that_repeat_the_question(retriever, data_cfg):
    from cqr_lightning.readers import read_jsonl_turns
    from cqr_lightning.scoring import reward_statistics

    turn = next(t for t in read_jsonl_turns(f"{data_cfg.dir}/train.jsonl") if t.positives == ("tokyo-2",))
    responses = [
        f"<rewrite> {turn.question.lower()} </rewrite>",
        "<rewrite> When did the Tokyo Tower open? </rewrite>",
        "no tags",
        f"<rewrite> {turn.question} </rewrite>",
    ]
    batch = RetrievalScorer(retriever, response_format="rewrite_only").score([turn] * 4, responses)
    assert turn.question != "When did the Tokyo Tower open?"
    assert batch.copies == [True, False, False, True]
    assert reward_statistics(batch, group_size=4)["copy_rate"] == 0.5


class FailingRetriever:
    def search(self, queries, k=100):
        raise ConnectionError("retrieval server unreachable")

    def close(self):
        pass


def test_retrieval_failure_stops_training_and_keeps_the_last_checkpoint(tiny_model_cfg, tokenizer, data_cfg, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from cqr_lightning.checkpointing import AtomicCheckpointIO

    torch.manual_seed(0)
    module = scripted_module(load_policy(tiny_model_cfg), tokenizer, [GOOD, BAD])
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    good = ScriptedScorer({GOOD: 2.0, BAD: 0.0})
    fit(module, data_cfg, [good, checkpoint], 2, tmp_path, plugins=[AtomicCheckpointIO()], enable_checkpointing=True)
    last = tmp_path / "ckpt" / "last.ckpt"
    saved = last.read_bytes()
    module = scripted_module(load_policy(tiny_model_cfg), tokenizer, [GOOD, BAD])
    module.scorer = RetrievalScorer(FailingRetriever())
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    with pytest.raises(RetrievalError, match="retrieval server unreachable.*last checkpoint is intact"):
        fit(module, data_cfg, [checkpoint], 4, tmp_path, plugins=[AtomicCheckpointIO()],
            enable_checkpointing=True)  # fmt: skip
    assert last.read_bytes() == saved


def test_fast_sampling_path_trains_and_resyncs_after_each_step(
    tiny_model_cfg, tokenizer, data_cfg, retriever, tmp_path
):
    policy = policy_with_random_lora_b(tiny_model_cfg)
    module = RLModule(
        policy, tokenizer, group_size=2, max_new_tokens=6, max_prompt_length=256, fast_sampling=True,
        scorer=RetrievalScorer(retriever),
    )  # fmt: skip
    trainer = fit(module, data_cfg, [], 2, tmp_path)
    assert trainer.global_step == 2
    assert module._sampler is not None and module._sampler_step == 1, "synced before the second rollout"
    assert "time/generation" in trainer.callback_metrics


def fit_seeded(policy, tokenizer, retriever, data_cfg, steps: int, run_dir, **options) -> RLModule:
    """GRPO on the tiny policy with seeded sampling, for tests that train twice and compare the adapters."""
    module = RLModule(
        policy, tokenizer, group_size=2, max_new_tokens=6, max_prompt_length=256, scorer=RetrievalScorer(retriever),
        seed=3, **options,
    )  # fmt: skip
    fit(module, data_cfg, [], steps, run_dir)
    return module


def test_releasing_the_sampling_copy_between_rollouts_trains_the_same_adapter(
    tiny_model_cfg, tokenizer, data_cfg, retriever, tmp_path
):
    adapters, released = [], []
    for release in (False, True):
        policy = policy_with_random_lora_b(tiny_model_cfg)
        module = fit_seeded(policy, tokenizer, retriever, data_cfg, 3, tmp_path / str(release), fast_sampling=True,
                            release_sampling_copy=release)  # fmt: skip
        adapters.append(lora_state(policy))
        released.append(module._sampler.released)
    assert released == [False, True], "the copy is released after the last rollout only when asked"
    assert adapters[0].keys() == adapters[1].keys()
    for name, value in adapters[0].items():
        assert torch.equal(value, adapters[1][name]), name


def test_static_decoding_with_a_prompt_bucket_trains_the_same_adapter(
    tiny_model_cfg, tokenizer, data_cfg, retriever, tmp_path
):
    adapters = []
    for bucket in (None, 16):
        policy = policy_with_random_lora_b(tiny_model_cfg)
        policy.base_model.model.__dict__.pop("_previous_max_cache_length", None)  # a fresh run's model
        fit_seeded(policy, tokenizer, retriever, data_cfg, 2, tmp_path / str(bucket), static_decoding=True,
                   static_prompt_bucket=bucket)  # fmt: skip
        adapters.append(lora_state(policy))
        cache_length = policy.base_model.model._previous_max_cache_length
        assert cache_length < 256 if bucket else cache_length >= 256, "the bucket shortens the static cache"
    for name, value in adapters[0].items():
        assert torch.allclose(value, adapters[1][name], atol=1e-6), name


def test_a_static_cache_at_full_length_is_built_by_the_first_rollout_and_later_rollouts_keep_their_bucket(
    tiny_model_cfg, tokenizer, data_cfg, retriever, tmp_path
):
    adapters, widths = [], []
    for full_length in (False, True):
        policy = policy_with_random_lora_b(tiny_model_cfg)
        policy.base_model.model.__dict__.pop("_previous_max_cache_length", None)  # a fresh run's model
        seen: list[int] = []
        generate_once = policy.generate

        def recording_generate(*args, _seen=seen, _generate=generate_once, **kwargs):
            _seen.append(kwargs["input_ids"].shape[1])
            return _generate(*args, **kwargs)

        policy.generate = recording_generate
        fit_seeded(policy, tokenizer, retriever, data_cfg, 3, tmp_path / str(full_length), static_decoding=True,
                   static_prompt_bucket=16, static_cache_at_full_length=full_length)  # fmt: skip
        adapters.append(lora_state(policy))
        widths.append(seen)
        cache_length = policy.base_model.model._previous_max_cache_length
        assert cache_length >= 256 if full_length else cache_length < 256
    assert all(width % 16 == 0 and width < 256 for width in widths[0]), widths[0]
    assert widths[1][0] == 256, "the first rollout pads to max_prompt_length and so builds the whole cache"
    assert widths[1][1:] == widths[0][1:], "later rollouts pad only to their bucket"
    for name, value in adapters[0].items():
        assert torch.allclose(value, adapters[1][name], atol=1e-6), name


def test_static_decoding_fills_a_short_batch_to_the_widest_call_and_returns_only_its_own_samples(
    tiny_model_cfg, tokenizer, data_cfg, retriever
):
    turns = list(turn_reader(data_cfg, "train")())[:5]
    rows_by_mode = {}
    for static in (False, True):
        policy = load_policy(tiny_model_cfg)
        rows: list[int] = []  # prompts in each generate call
        generate_once = policy.generate

        def recording_generate(*args, _rows=rows, _generate=generate_once, **kwargs):
            _rows.append(kwargs["input_ids"].shape[0])
            return _generate(*args, **kwargs)

        policy.generate = recording_generate
        module = RLModule(policy, tokenizer, group_size=2, max_new_tokens=4, max_prompt_length=256,
                          scorer=RetrievalScorer(retriever), seed=3, static_decoding=static)  # fmt: skip
        module.sample(turns[:3])
        short = module.sample(turns[3:], indices=[3, 4])
        rows_by_mode[static] = rows
        assert [s.prompt_index for s in short] == [0, 0, 1, 1], "two samples for each of the two turns, no filler"
        prompt_ids = [tuple(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in module.prompts(turns[3:])]
        assert [s.prompt_ids for s in short] == [prompt_ids[0]] * 2 + [prompt_ids[1]] * 2
    assert rows_by_mode[False] == [3, 2], "without a static cache each call samples its own batch"
    assert rows_by_mode[True] == [3, 3], "the short batch keeps the static cache's batch size"


@pytest.mark.parametrize("tokens", [None, 512])
def test_running_out_of_memory_in_the_loss_pass_names_the_settings_that_lower_it(
    tiny_model_cfg, tokenizer, data_cfg, retriever, tmp_path, tokens
):
    from test_memory_errors import fail_for_memory, out_of_memory_lines

    from cqr_lightning.memory_errors import checkpointing_on

    policy = policy_with_random_lora_b(tiny_model_cfg)
    fail_for_memory(policy, "forward", when=torch.is_grad_enabled)  # sampling and the reference pass still run
    module = RLModule(
        policy, tokenizer, group_size=2, max_new_tokens=6, max_prompt_length=256, micro_batch_size=4,
        micro_batch_tokens=tokens, scorer=RetrievalScorer(retriever),
    )  # fmt: skip
    message = "\n".join(out_of_memory_lines(lambda: fit(module, data_cfg, [], 1, tmp_path)))
    assert message.startswith("rl: the device ran out of memory during forward_backward (CUDA out of memory.")
    assert "rl.micro_batch_size=4 (sequences a pass holds at once; e.g. 2)" in message
    budget_hint = "rl.micro_batch_tokens=512 (tokens a pass holds at once; e.g. 256)"
    assert (budget_hint in message) is (tokens is not None)
    assert "rl.logprob_chunk_size=1024" in message
    assert ("model.gradient_checkpointing=true" in message) is not checkpointing_on(policy)


def test_running_out_of_memory_while_sampling_names_the_generation_settings(
    tiny_model_cfg, tokenizer, data_cfg, retriever, tmp_path
):
    from test_memory_errors import fail_for_memory, out_of_memory_lines

    policy = policy_with_random_lora_b(tiny_model_cfg)
    fail_for_memory(policy, "generate")
    module = RLModule(
        policy, tokenizer, group_size=2, max_new_tokens=6, max_prompt_length=256, scorer=RetrievalScorer(retriever)
    )
    lines = out_of_memory_lines(lambda: fit(module, data_cfg, [], 1, tmp_path))
    assert lines[0].startswith("rl: the device ran out of memory during generation (CUDA out of memory.")
    assert lines[2:] == [
        "  rl.generation_batch_size=null (the whole batch) (prompts per generate call, each sampled rl.group_size=2 "
        "times)",
        "  rl.max_new_tokens=6",
        "  model.max_prompt_length=256",
    ]


def test_turns_solved_by_question_are_those_whose_question_ranks_gold_high_enough(retriever, data_with_vague_turns):
    from cqr_lightning.readers import read_jsonl_turns
    from cqr_lightning.turn_filter import turns_solved_by_question

    turns = list(read_jsonl_turns(data_with_vague_turns / "train.jsonl"))
    ranks = retriever.best_gold_ranks([t.question for t in turns], [t.positives for t in turns], k=100)
    first = {t.id for t, rank in zip(turns, ranks, strict=True) if rank == 1}
    top_three = {t.id for t, rank in zip(turns, ranks, strict=True) if rank is not None and rank <= 3}
    assert first and len(first) < len(turns), "the fixture must have turns on both sides"
    assert turns_solved_by_question(iter(turns), retriever, 1, batch_size=3) == (first, len(turns))
    assert turns_solved_by_question(iter(turns), retriever, 3, batch_size=5)[0] == top_three
    with pytest.raises(ValueError, match="max_rank"):
        turns_solved_by_question(turns, retriever, 0)


def test_running_out_of_memory_while_validating_names_the_validation_batch(
    tiny_model_cfg, tokenizer, data_cfg, retriever
):
    from test_memory_errors import fail_for_memory, out_of_memory_lines

    from cqr_lightning.readers import read_jsonl_turns
    from data_modules.conversations import TurnBatch

    policy = policy_with_random_lora_b(tiny_model_cfg)
    fail_for_memory(policy, "generate")
    module = RLModule(
        policy, tokenizer, max_new_tokens=6, max_prompt_length=256, val_batch_size=5, scorer=RetrievalScorer(retriever)
    )
    batch = TurnBatch(list(read_jsonl_turns(f"{data_cfg.dir}/dev.jsonl"))[:2], position=None)
    lines = out_of_memory_lines(lambda: module.validation_step(batch, 0))
    assert lines[0].startswith("rl: the device ran out of memory during validation (CUDA out of memory.")
    assert lines[2:] == [
        "  rl.val_batch_size=5 (turns a validation generate call holds)",
        "  model.max_prompt_length=256",
    ]


def test_our_decoding_loop_replaces_generate_in_rollouts_and_the_adapter_trains(
    tiny_model_cfg, tokenizer, data_cfg, retriever, tmp_path
):
    policy = policy_with_random_lora_b(tiny_model_cfg)
    before = lora_state(policy)

    def no_generate(*args, **kwargs):
        raise AssertionError("transformers' generate was called")

    policy.generate = no_generate
    module = fit_seeded(policy, tokenizer, retriever, data_cfg, 2, tmp_path, static_decoding=True,
                        static_decoding_loop=True)  # fmt: skip
    assert module.global_step == 2
    after = lora_state(policy)
    assert any(not torch.equal(before[name], after[name]) for name in before), "no LoRA weight changed"
    with pytest.raises(ValueError, match="rl.static_decoding=true"):
        RLModule(policy, tokenizer, scorer=RetrievalScorer(retriever), static_decoding_loop=True)

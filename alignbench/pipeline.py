"""The pipeline of one experiment config: its data source, its stage cache, and the run context.

    source (world | hf) -> SFT -> preference labels -> reward models -> reference samples -> RunContext

`Pipeline` is the public interface to the shared stages: each stage is a function in
alignbench.stages (one small module each), cached under `OUT/cache/<stage>-<hash>/` by
alignbench.stage_cache and built from the data source (alignbench.sources), which holds
everything that differs between the built-in world and real datasets. Methods with stages of
their own (the AI labeler, SL-CAI, ...) call those stage functions with `context.stages`, the
pipeline that built their run context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from alignbench.data import Rows, preference_rows
from alignbench.records import environment
from alignbench.evaluation import EvalConfig, Evaluator, PolicyResponses
from alignbench.judges import GoldJudge
from alignbench.log import log  # noqa: F401  (re-exported: `from alignbench.pipeline import log` still works)
from alignbench.models import AdapterDisabledReference, RewardModel, TextCodec, freeze, load_pretrained_policy, prepare_for_training, weights_dtype
from alignbench.reward import ProxyReward
from alignbench.seeding import with_run_seed
from alignbench.sources import DataSource, make_source
from alignbench.stage_cache import StageCache, StageReads, read_jsonl, versioned_key
from alignbench.stages import ai_labeler, labels, reference_samples, reward_models, sft
from alignbench.stages.versions import version
from alignbench.training import Budget
from alignbench.world import AssistantWorld


@dataclass
class RunContext:
    """Everything a method may use: shared artifacts, evaluation, budget. Built by `Pipeline.context`."""

    config: Any
    seed: int
    codec: TextCodec
    source: DataSource
    world: AssistantWorld | None
    sft_dir: Path
    reference: torch.nn.Module
    proxy: ProxyReward
    preferences: Rows
    reward_model_labels: int
    rm_metrics: dict[str, float]
    train_prompts: list[str]
    evaluator: Evaluator
    eval_config: EvalConfig
    gold_judge: GoldJudge | None
    budget: Budget = field(default_factory=Budget)
    stages: "Pipeline | None" = None
    """The stages' public interface: a method with stages of its own (the AI labeler, SL-CAI)
    builds and caches them by calling alignbench.stages functions with it."""

    def load_policy(self, trainable: bool = True):
        """A fresh copy of the SFT policy (frozen when the method does not train).

        With LoRA a trainable policy gets fresh adapters, and the reference (a view of the
        policy with its adapters disabled) is bound to the first policy a run loads.
        """
        model = self.config.model
        policy = load_pretrained_policy(str(self.sft_dir / "policy"), trust_remote_code=model.trust_remote_code, dtype=weights_dtype(self.config.trainer.precision))
        policy = prepare_for_training(policy, model.lora, model.gradient_checkpointing, seed=self.seed) if trainable else freeze(policy)
        if isinstance(self.reference, AdapterDisabledReference):
            self.reference.bind(policy)
        return policy

    def harmful_of(self, prompt: str) -> bool:
        return self.source.harmful_of(prompt)

    def sample_train_prompts(self, n: int, seed: int) -> list[str]:
        """Fresh training prompts for methods that sample (disjoint from evaluation prompts):
        the world's, or drawn from the dataset's training prompts (`train_prompts`)."""
        return self.source.sample_train_prompts(self.train_prompts, n, seed)


class Pipeline:
    """Builds (or reuses) the stages of one experiment config at one run seed (validated by
    alignbench.experiment): the config's `seed`, or the first of its `seeds`. Stage seeds left at
    None take that seed (alignbench.seeding), so each run seed has stages of its own unless pinned."""

    def __init__(self, config, out: Path):
        seed = config.seed if config.seed is not None else config.seeds[0]
        self.config, self.out = with_run_seed(config, seed), Path(out)
        self.source = make_source(self.config)
        self.world = self.source.world
        self.codec = TextCodec(self.source.tokenizer())
        self.device = self.source.device  # where stages sample and score outside training
        self.cache = StageCache(self.out, built_with=lambda: environment(self.device, self.config.trainer.accelerator))

    def stage(self, name: str, key: dict, build: Callable[[Path], dict], version: int = 1) -> tuple[Path, dict]:
        """Stage `name`'s folder and summary: read from the cache, or built by `build(tmp_dir)`."""
        return self.cache.stage(name, key, build, version)

    # --- the shared stages (alignbench.stages) ------------------------------------------------
    # A stage's key as the stages built from it embed it: with its build version, so that bumping
    # the version rebuilds them too instead of reusing what was built from the old stage.
    def sft_key(self) -> dict:
        return versioned_key(sft.key(self), version("sft"))

    def labels_key(self) -> dict:
        return versioned_key(labels.key(self), version("labels"))

    def reward_key(self) -> dict:
        return versioned_key(reward_models.key(self), version("reward_models"))

    def sft(self) -> tuple[Path, dict]:
        return sft.sft(self)

    def labels(self) -> tuple[Path, dict]:
        return labels.labels(self)

    def reward_models(self) -> tuple[Path, dict]:
        return reward_models.reward_models(self)

    def reference_samples(self, seed: int) -> tuple[Path, dict]:
        return reference_samples.reference_samples(self, seed)

    def eval_prompts(self) -> dict[str, list[str]]:
        return self.source.eval_prompts(self)

    def holdout(self) -> list[dict]:
        """The labels stage's held-out prompts and their responses (never trained on)."""
        labels_dir, _ = self.labels()
        return read_jsonl(labels_dir / "holdout.jsonl")

    def proxy(self) -> ProxyReward:
        """The shared reward models, combined as Llama 2 does (the proxy reward)."""
        rm_dir, _ = self.reward_models()
        return ProxyReward(self.codec, RewardModel.load(rm_dir / "helpfulness"), RewardModel.load(rm_dir / "safety") if (rm_dir / "safety").exists() else None,
                           max_length=self.config.reward_model.max_length)

    # --- the context of one run ----------------------------------------------------------
    def context(self, seed: int | None = None) -> RunContext:
        c = self.config
        if seed is not None and seed != c.seed:
            raise ValueError(f"this pipeline's stages are run seed {c.seed}'s, not seed {seed}'s: build a Pipeline of the config at seed {seed}")
        seed = c.seed
        reads_from = StageReads.mark()  # the stages every run starts from, which its budget leaves out
        sft_dir, _ = self.sft()
        labels_dir, label_summary = self.labels()
        _, rm_summary = self.reward_models()
        ref_dir, _ = self.reference_samples(seed)
        if c.model.lora.enabled:
            reference = AdapterDisabledReference()  # bound to the run's policy by load_policy
        else:
            reference = freeze(load_pretrained_policy(str(sft_dir / "policy"), trust_remote_code=c.model.trust_remote_code, dtype=weights_dtype(c.trainer.precision)))
        proxy = self.proxy().to(self.device)
        prompts = self.eval_prompts()
        reference_responses = {}
        for split in prompts:
            rows = read_jsonl(ref_dir / f"{split}.jsonl")
            reference_responses[split] = PolicyResponses([r["response_ids"] for r in rows], [r["text"] for r in rows])
        overall = read_jsonl(labels_dir / "overall.jsonl")
        judges = self.source.judges(proxy)
        if c.eval.judge == "lm":
            judges["lm"] = ai_labeler.ai_judge(self)  # the AI labeler (ai_labeler.*): a world labeler or any HF model
        harmful_of = self.source.harmful_of if self.world is not None else None
        evaluator = Evaluator(c.eval, prompts, reference_responses, judges[c.eval.judge], world=self.world, proxy=proxy, harmful_of=harmful_of)
        return RunContext(
            config=c, seed=seed, codec=self.codec, source=self.source, world=self.world, sft_dir=sft_dir, reference=reference,
            proxy=proxy, preferences=preference_rows(overall, allow_empty_responses=True), reward_model_labels=label_summary["human_labels"],
            rm_metrics={k: v for k, v in rm_summary.items() if k.startswith("rm/")}, train_prompts=self.source.train_prompts(self, overall),
            evaluator=evaluator, eval_config=c.eval, gold_judge=self.source.gold_judge, stages=self,
            budget=Budget(excluded=frozenset(StageReads.since(reads_from).stages)),
        )

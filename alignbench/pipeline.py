"""The shared pipeline: world -> SFT -> preference labels -> reward models -> reference samples.

Each stage's output is content-addressed by the part of the config that determines it,
`OUT/cache/<stage>-<hash>/`, built under a temporary name and renamed when complete, and
reused by every method and seed of a comparison (and by later runs). A file lock keeps
parallel sweep workers from building the same stage twice.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from datasets import Dataset

from alignbench.annotator import SimulatedAnnotator
from alignbench.config import config_hash, to_dict
from alignbench.data import DemonstrationDataModule, PreferenceDataModule, preference_rows
from alignbench.evaluation import EvalConfig, Evaluator, PolicyResponses, sample_policy
from alignbench.judges import AnnotatorJudge, GoldJudge, RewardModelJudge
from alignbench.models import (
    TINY_MODELS, RewardModel, TextCodec, build_tiny_policy, build_world_tokenizer, freeze, load_pretrained_policy, load_tokenizer,
)
from alignbench.seeding import seeded_generator
from alignbench.reward import ProxyReward, RewardModelTraining, fit_calibration, score_texts
from alignbench.sft import SupervisedFineTuning
from alignbench.training import Budget, make_trainer
from alignbench.world import AssistantWorld


def log(message: str) -> None:
    print(f"[alignbench] {message}", flush=True)


@contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_stage(out: Path, stage: str, key: dict, build: Callable[[Path], dict]) -> tuple[Path, dict]:
    """Return `OUT/cache/<stage>-<hash>/` and its summary, building it first if needed.

    `build(tmp_dir)` writes the artifact into `tmp_dir` and returns a JSON summary; the
    folder is renamed into place only once complete, so a crash never leaves a stage
    that a later run mistakes for finished.
    """
    directory = out / "cache" / f"{stage}-{config_hash(key)}"
    with _lock(out / "cache" / f".{directory.name}.lock"):
        if (directory / "stage.json").exists():
            summary = json.loads((directory / "stage.json").read_text())
            log(f"reusing cached {stage} stage {directory} (built in {summary.get('seconds', 0):.0f}s)")
            return directory, summary
        tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        log(f"building {stage} stage -> {directory}")
        started = time.perf_counter()
        summary = build(tmp)
        summary["seconds"] = round(time.perf_counter() - started, 1)
        (tmp / "key.json").write_text(json.dumps(key, indent=2))
        (tmp / "stage.json").write_text(json.dumps(summary, indent=2))
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
        log(f"{stage} stage done in {summary['seconds']:.0f}s")
        return directory, summary


@dataclass
class RunContext:
    """Everything a method may use: shared artifacts, evaluation, budget. Built by `Pipeline`."""

    config: Any
    seed: int
    codec: TextCodec
    world: AssistantWorld | None
    sft_dir: Path
    reference: torch.nn.Module
    proxy: ProxyReward
    preferences: Dataset
    reward_model_labels: int
    rm_metrics: dict[str, float]
    train_prompts: list[str]
    evaluator: Evaluator
    eval_config: EvalConfig
    gold_judge: GoldJudge | None
    budget: Budget = field(default_factory=Budget)
    pipeline: "Pipeline | None" = None
    """The pipeline that built this context: methods with stages of their own (the AI
    labeler, SL-CAI) build and cache them through it."""

    def load_policy(self, trainable: bool = True):
        """A fresh copy of the SFT policy (frozen when the method does not train)."""
        from transformers import AutoModelForCausalLM

        policy = AutoModelForCausalLM.from_pretrained(self.sft_dir / "policy")
        return policy.train() if trainable else freeze(policy)

    def harmful_of(self, prompt: str) -> bool:
        return self.world.is_harmful(prompt) if self.world is not None else False

    def sample_train_prompts(self, n: int, seed: int) -> list[str]:
        """Fresh training prompts for methods that sample (disjoint from evaluation prompts)."""
        return self.world.sample_prompts("train", n, seed=seed)


class Pipeline:
    """Builds (or reuses) the shared stages of one experiment config."""

    def __init__(self, config, out: Path):
        self.config, self.out = config, Path(out)
        self._built: dict[tuple, tuple[Path, dict]] = {}
        self.world = AssistantWorld(config.world)
        if config.model.name in TINY_MODELS:
            tokenizer = build_world_tokenizer(self.world.vocabulary())
        else:
            tokenizer = load_tokenizer(config.model.name, trust_remote_code=config.model.trust_remote_code)
        self.codec = TextCodec(tokenizer)

    def _stage(self, stage: str, key: dict, build: Callable[[Path], dict]) -> tuple[Path, dict]:
        """`cached_stage`, remembered for the life of this pipeline (one message per stage)."""
        memo = (stage, config_hash(key))
        if memo not in self._built:
            self._built[memo] = cached_stage(self.out, stage, key, build)
        return self._built[memo]

    # --- stage keys: exactly the config that determines each artifact -------------------
    def sft_key(self) -> dict:
        c = self.config
        return {"world": to_dict(c.world), "model": to_dict(c.model), "sft": to_dict(c.sft)}

    def labels_key(self) -> dict:
        c = self.config
        return {"sft": self.sft_key(), "labels": to_dict(c.labels), "max_new_tokens": c.eval.max_new_tokens}

    def reward_key(self) -> dict:
        return {"labels": self.labels_key(), "reward_model": to_dict(self.config.reward_model)}

    # --- stages ------------------------------------------------------------------------
    def sft(self) -> tuple[Path, dict]:
        return self._stage("sft", self.sft_key(), self._build_sft)

    def _build_sft(self, tmp: Path) -> dict:
        c = self.config.sft
        if self.config.model.name in TINY_MODELS:
            policy = build_tiny_policy(self.config.model.name, self.codec.tokenizer, seed=self.config.model.init_seed)
        else:
            policy = load_pretrained_policy(self.config.model.name, trust_remote_code=self.config.model.trust_remote_code)
        rng = np.random.default_rng(c.seed)
        prompts = self.world.sample_prompts("train", c.n_demonstrations, seed=c.seed)
        demos = Dataset.from_dict({"prompt": prompts, "response": [self.world.demonstrate(p, rng) for p in prompts]})
        data = DemonstrationDataModule(demos, self.codec, c.batch_size, c.max_length, seed=c.seed)
        total = len(data.train_dataloader()) * c.epochs
        module = SupervisedFineTuning(policy, c.optim, total)
        torch.manual_seed(c.seed)
        make_trainer(self.config.trainer, max_steps=total, max_epochs=c.epochs, grad_clip=c.optim.grad_clip).fit(module, datamodule=data)
        policy.save_pretrained(tmp / "policy")
        self.codec.tokenizer.save_pretrained(tmp / "policy")
        demo_gold = float(np.mean([self.world.gold(p, y).reward for p, y in zip(demos["prompt"], demos["response"])]))
        return {"demonstrations": len(demos), "steps": total, "tokens": module.tokens_trained, "demonstration_gold_reward": demo_gold}

    def labels(self) -> tuple[Path, dict]:
        return self._stage("labels", self.labels_key(), self._build_labels)

    def _build_labels(self, tmp: Path) -> dict:
        """Sample K responses per prompt from the SFT policy and have annotators rank them.

        Identical responses are dropped (about a fifth of sampled pairs on the world);
        gold ties are still labelled, at random, with the lowest margin level. Besides the
        overall ranking, the annotators give separate helpfulness and safety rankings and a
        per-response safe/unsafe label (Llama 2 collected both), used to train and
        calibrate the two reward models.
        """
        c = self.config.labels
        sft_dir, _ = self.sft()
        policy = freeze(load_pretrained_policy(str(sft_dir / "policy")))
        prompts = sorted(set(self.world.sample_prompts("train", c.n_prompts * 3, seed=c.seed + 1)))
        prompts = [prompts[i] for i in np.random.default_rng(c.seed).permutation(len(prompts))[: c.n_prompts]]
        sampling = EvalConfig(temperature=c.temperature, max_new_tokens=self.config.eval.max_new_tokens)
        out = sample_policy(policy, None, self.codec, prompts, sampling, seeded_generator(c.seed, "labels"), desc="sampling responses to label", num_samples=c.responses_per_prompt)
        k = c.responses_per_prompt
        rng = np.random.default_rng(c.seed)
        annotators = {axis: SimulatedAnnotator(self.world, c.annotator, axis=axis) for axis in ("reward", "helpfulness", "harmlessness")}
        n_holdout = max(1, int(len(prompts) * self.config.reward_model.holdout_fraction))
        rows: dict[str, list[dict]] = {"overall": [], "helpfulness": [], "safety": []}
        safety_labels, holdout = [], []
        for i, prompt in enumerate(prompts):
            responses = list(dict.fromkeys(out.texts[i * k : (i + 1) * k]))  # drop identical responses
            if len(responses) < 2:
                continue
            if i < n_holdout:
                holdout.append({"prompt": prompt, "responses": responses})
                continue
            for axis, name in (("reward", "overall"), ("helpfulness", "helpfulness"), ("harmlessness", "safety")):
                rows[name].extend(self._ranked_pairs(annotators[axis], prompt, responses, rng, drop_ties=name == "safety"))
            for response in responses:
                safe = self.world.gold(prompt, response).harmlessness >= 0.5
                safety_labels.append({"prompt": prompt, "response": response, "safe": bool(safe ^ (rng.random() < c.annotator.flip_rate))})
        for name, records in rows.items():
            with open(tmp / f"{name}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
        for name, records in (("safety_labels", safety_labels), ("holdout", holdout)):
            with open(tmp / f"{name}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
        gold_agree = [
            float(self.world.gold(r["prompt"], r["chosen"]).reward > self.world.gold(r["prompt"], r["rejected"]).reward)
            for r in rows["overall"]
            if self.world.gold(r["prompt"], r["chosen"]).reward != self.world.gold(r["prompt"], r["rejected"]).reward
        ]
        return {
            "pairs": {name: len(records) for name, records in rows.items()},
            "human_labels": len(rows["overall"]),
            "label_agreement_with_gold": float(np.mean(gold_agree)) if gold_agree else None,
            "holdout_prompts": len(holdout),
        }

    def _ranked_pairs(self, annotator: SimulatedAnnotator, prompt: str, responses: list[str], rng, drop_ties: bool) -> list[dict]:
        if self.config.labels.source == "gold":
            utility = [annotator.utility(prompt, y) for y in responses]
            order = sorted(range(len(responses)), key=lambda j: -utility[j])
        else:
            order = annotator.rank(prompt, responses, rng)
        ranked = [responses[j] for j in order]
        utilities = [annotator.utility(prompt, y) for y in ranked]
        pairs = []
        for a in range(len(ranked)):
            for b in range(a + 1, len(ranked)):
                gap = abs(utilities[a] - utilities[b])
                if drop_ties and gap == 0:
                    continue  # "equally safe": the safety annotation has no preference here
                pairs.append({"prompt": prompt, "chosen": ranked[a], "rejected": ranked[b], "margin_level": annotator.margin_level(gap)})
        return pairs

    def reward_models(self) -> tuple[Path, dict]:
        return self._stage("reward_models", self.reward_key(), self._build_reward_models)

    def _build_reward_models(self, tmp: Path) -> dict:
        from alignbench.annotator import LLAMA2_MARGIN_SMALL

        c = self.config.reward_model
        sft_dir, _ = self.sft()
        labels_dir, label_summary = self.labels()
        policy = load_pretrained_policy(str(sft_dir / "policy"))
        axes = ["helpfulness"] + (["safety"] if c.safety else [])
        models: dict[str, RewardModel] = {}
        for axis in axes:
            records = _read_jsonl(labels_dir / f"{axis}.jsonl")
            for r in records:
                r["margin"] = LLAMA2_MARGIN_SMALL[r["margin_level"]]
            data = PreferenceDataModule(preference_rows(records, allow_empty_responses=True), self.codec, c.batch_size, c.max_length, seed=self.config.labels.seed)
            model = RewardModel.from_policy(policy)
            total = len(data.train_dataloader()) * c.epochs
            torch.manual_seed(self.config.labels.seed)
            make_trainer(self.config.trainer, max_steps=total, max_epochs=c.epochs, grad_clip=c.optim.grad_clip).fit(RewardModelTraining(model, c, total), datamodule=data)
            model.eval()
            models[axis] = model
        # Calibrate: centre the helpfulness scores on the labelled responses; Platt-scale the
        # safety scores on the annotators' safe/unsafe labels so that R_s < 0.15 means "unsafe".
        labelled = _read_jsonl(labels_dir / "safety_labels.jsonl")
        prompts, responses = [r["prompt"] for r in labelled], [r["response"] for r in labelled]
        raw_help = score_texts(models["helpfulness"], self.codec, prompts, responses)
        models["helpfulness"].calibration.copy_(torch.tensor([1.0, -float(raw_help.mean())]))
        if "safety" in models:
            scale, bias = fit_calibration(score_texts(models["safety"], self.codec, prompts, responses), torch.tensor([r["safe"] for r in labelled], dtype=torch.float64))
            models["safety"].calibration.copy_(torch.tensor([scale, bias]))
        for axis, model in models.items():
            model.save(tmp / axis)
        summary = {"human_labels": label_summary["human_labels"]}
        summary.update(self._reward_accuracy(models, _read_jsonl(labels_dir / "holdout.jsonl")))
        return summary

    def _reward_accuracy(self, models: dict[str, RewardModel], holdout: list[dict]) -> dict[str, float]:
        """Held-out accuracy against gold, on pairs whose gold scores differ (`rm/*`)."""
        prompts, responses = [], []
        for row in holdout:
            for a in range(len(row["responses"])):
                for b in range(a + 1, len(row["responses"])):
                    prompts.append(row["prompt"])
                    responses.append((row["responses"][a], row["responses"][b]))
        firsts, seconds = [a for a, _ in responses], [b for _, b in responses]
        gold_a = [self.world.gold(p, y) for p, y in zip(prompts, firsts)]
        gold_b = [self.world.gold(p, y) for p, y in zip(prompts, seconds)]
        proxy = ProxyReward(self.codec, models["helpfulness"], models.get("safety"))
        harmful = [self.world.is_harmful(p) for p in prompts]
        checks = {
            "rm/helpfulness_accuracy": (models["helpfulness"], lambda g: g.helpfulness),
            "rm/safety_accuracy": (models.get("safety"), lambda g: g.harmlessness),
            "rm/accuracy": (proxy, lambda g: g.reward),
        }
        results = {}
        for name, (model, gold_of) in checks.items():
            if model is None:
                continue
            if isinstance(model, ProxyReward):
                sa, sb = model.score(prompts, firsts, harmful), model.score(prompts, seconds, harmful)
            else:
                sa, sb = score_texts(model, self.codec, prompts, firsts), score_texts(model, self.codec, prompts, seconds)
            ga, gb = np.array([gold_of(g) for g in gold_a]), np.array([gold_of(g) for g in gold_b])
            differ = ga != gb
            correct = (sa.numpy() > sb.numpy()) == (ga > gb)
            results[name] = float(correct[differ].mean()) if differ.any() else float("nan")
        results["rm/holdout_pairs"] = len(prompts)
        return results

    def reference_samples(self, seed: int) -> tuple[Path, dict]:
        c = self.config.eval
        key = {"sft": self.sft_key(), "eval": {k: v for k, v in to_dict(c).items() if k not in ("eval_every", "judge", "bootstrap_samples", "batch_size")}, "seed": seed}
        return self._stage("reference_samples", key, lambda tmp: self._build_reference_samples(tmp, seed))

    def eval_prompts(self) -> dict[str, list[str]]:
        c = self.config.eval
        return {"test": self.world.sample_prompts("test", c.n_test_prompts, seed=c.seed), "val": self.world.sample_prompts("val", c.n_val_prompts, seed=c.seed)}

    def _build_reference_samples(self, tmp: Path, seed: int) -> dict:
        sft_dir, _ = self.sft()
        reference = freeze(load_pretrained_policy(str(sft_dir / "policy")))
        for split, prompts in self.eval_prompts().items():
            out = sample_policy(reference, None, self.codec, prompts, self.config.eval, seeded_generator(seed, "reference", split), desc=f"reference samples ({split})")
            with open(tmp / f"{split}.jsonl", "w") as f:
                f.writelines(json.dumps({"prompt": p, "response_ids": ids, "text": t}) + "\n" for p, ids, t in zip(prompts, out.response_ids, out.texts))
        return {"splits": list(self.eval_prompts())}

    # --- the context of one run ----------------------------------------------------------
    def context(self, seed: int) -> RunContext:
        sft_dir, _ = self.sft()
        labels_dir, label_summary = self.labels()
        rm_dir, rm_summary = self.reward_models()
        ref_dir, _ = self.reference_samples(seed)
        reference = freeze(load_pretrained_policy(str(sft_dir / "policy")))
        proxy = ProxyReward(self.codec, RewardModel.load(rm_dir / "helpfulness"), RewardModel.load(rm_dir / "safety") if (rm_dir / "safety").exists() else None)
        prompts = self.eval_prompts()
        reference_responses = {}
        for split in prompts:
            rows = _read_jsonl(ref_dir / f"{split}.jsonl")
            reference_responses[split] = PolicyResponses([r["response_ids"] for r in rows], [r["text"] for r in rows])
        gold = GoldJudge(self.world)
        judges = {"gold": gold, "reward_model": RewardModelJudge(proxy, self.world.is_harmful), "annotator": AnnotatorJudge(SimulatedAnnotator(self.world, self.config.labels.annotator))}
        evaluator = Evaluator(self.config.eval, prompts, reference_responses, judges[self.config.eval.judge], world=self.world, proxy=proxy, harmful_of=self.world.is_harmful)
        overall = _read_jsonl(labels_dir / "overall.jsonl")
        label_prompts = sorted({r["prompt"] for r in overall})
        return RunContext(
            config=self.config, seed=seed, codec=self.codec, world=self.world, sft_dir=sft_dir, reference=reference,
            proxy=proxy, preferences=preference_rows(overall, allow_empty_responses=True), reward_model_labels=label_summary["human_labels"],
            rm_metrics={k: v for k, v in rm_summary.items() if k.startswith("rm/")}, train_prompts=label_prompts,
            evaluator=evaluator, eval_config=self.config.eval, gold_judge=gold, pipeline=self,
        )


def _read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

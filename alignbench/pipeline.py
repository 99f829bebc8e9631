"""The shared pipeline: world -> SFT -> preference labels -> reward models -> reference samples.

Each stage's output is content-addressed by the part of the config that determines it,
`OUT/cache/<stage>-<hash>/`, built under a temporary name and renamed when complete, and
reused by every method and seed of a comparison (and by later runs). A file lock keeps
parallel sweep workers from building the same stage twice.

The data source is the built-in world or real datasets (`data.source=hf`, see
alignbench.hf_data); the stages and the run context are the same for both. With real data the
SFT stage trains on the dataset's demonstrations, the labels stage reads its preference pairs
(holding some out), the reward model is trained on them and checked against the dataset's own
labels, prompts come from its prompt sets, and there is no world and no gold judge: the
evaluation judge is the reward model.
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

from alignbench import hf_data
from alignbench.annotator import SimulatedAnnotator
from alignbench.config import ConfigError, config_hash, to_dict
from alignbench.data import DemonstrationDataModule, PreferenceDataModule, preference_rows
from alignbench.evaluation import EvalConfig, Evaluator, PolicyResponses, sample_policy
from alignbench.judges import AnnotatorJudge, GoldJudge, RewardModelJudge
from alignbench.models import (
    TINY_MODELS, AdapterDisabledReference, RewardModel, TextCodec, build_tiny_policy, build_world_tokenizer, freeze,
    load_pretrained_policy, load_tokenizer, merge_lora, prepare_for_training, weights_dtype,
)
from alignbench.reward import ProxyReward, RewardModelTraining, fit_calibration, score_texts
from alignbench.seeding import preserved_global_random_state, seeded_generator
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


# A stage's key is the config that determines it; when a fix changes what the same config builds,
# this number goes up so that caches built before the fix are not reused. 2: the safety RM's
# Platt calibration no longer diverges (`fit_calibration`).
REWARD_MODELS_BUILD = 2


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
        with preserved_global_random_state():  # built here or read from the cache, the caller's random stream is the same
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
        return self.world.is_harmful(prompt) if self.world is not None else False

    def sample_train_prompts(self, n: int, seed: int) -> list[str]:
        """Fresh training prompts for methods that sample (disjoint from evaluation prompts):
        the world's, or drawn from the dataset's training prompts (`train_prompts`)."""
        if self.world is not None:
            return self.world.sample_prompts("train", n, seed=seed)
        return hf_data.draw_prompts(self.train_prompts, n, seed)


class Pipeline:
    """Builds (or reuses) the shared stages of one experiment config."""

    def __init__(self, config, out: Path):
        self.config, self.out = config, Path(out)
        self._built: dict[tuple, tuple[Path, dict]] = {}
        self.data = config.data
        if self.data.source == "hf":
            _check_real_data_config(config)
            self.world = None
            tokenizer = load_tokenizer(config.model.name, trust_remote_code=config.model.trust_remote_code)
        else:
            self.world = AssistantWorld(config.world)
            if config.model.name in TINY_MODELS:
                tokenizer = build_world_tokenizer(self.world.vocabulary())
            else:
                tokenizer = load_tokenizer(config.model.name, trust_remote_code=config.model.trust_remote_code)
        self.codec = TextCodec(tokenizer)
        # Where stages sample and score outside training: a real model's on the training GPU;
        # the world's on the CPU, where they always ran (its caches do not record the device).
        self.device = inference_device(config.trainer) if self.world is None else torch.device("cpu")
        self._eval_prompt_sets: dict[str, list[str]] | None = None

    def _stage(self, stage: str, key: dict, build: Callable[[Path], dict]) -> tuple[Path, dict]:
        """`cached_stage`, remembered for the life of this pipeline (one message per stage)."""
        memo = (stage, config_hash(key))
        if memo not in self._built:
            self._built[memo] = cached_stage(self.out, stage, key, build)
        return self._built[memo]

    # --- stage keys: exactly the config that determines each artifact -------------------
    def sft_key(self) -> dict:
        c = self.config
        if self.world is None:
            # Demonstrations from the SFT dataset, or the preferred responses of the training pairs.
            source = {"sft": to_dict(c.data.sft)} if c.data.sft is not None else {"preferred_responses": self.labels_key()}
            return {"data": source, "model": _model_key(c.model), "sft": to_dict(c.sft), "weights": str(weights_dtype(c.trainer.precision))}
        return {"world": to_dict(c.world), "model": _model_key(c.model), "sft": to_dict(c.sft)}

    def labels_key(self) -> dict:
        c = self.config
        if self.world is None:
            # Read, not sampled: the pairs do not depend on the SFT policy; the tokenizer decides
            # which prompts are too long, and the seed and fraction which prompts are held out.
            return {
                "preferences": to_dict(c.data.preferences), "max_prompt_tokens": c.data.max_prompt_tokens, "tokenizer": c.model.name,
                "seed": c.labels.seed, "holdout_fraction": c.reward_model.holdout_fraction,
            }
        return {"sft": self.sft_key(), "labels": to_dict(c.labels), "max_new_tokens": c.eval.max_new_tokens}

    def reward_key(self) -> dict:
        key = {"labels": self.labels_key(), "reward_model": _reward_model_key(self.config.reward_model), "build": REWARD_MODELS_BUILD}
        if self.world is None:
            key["sft"] = self.sft_key()  # the world's labels key holds it already
        return key

    # --- stages ------------------------------------------------------------------------
    def sft(self) -> tuple[Path, dict]:
        return self._stage("sft", self.sft_key(), self._build_sft)

    def _build_sft(self, tmp: Path) -> dict:
        c = self.config.sft
        if self.config.model.name in TINY_MODELS:
            policy = build_tiny_policy(self.config.model.name, self.codec.tokenizer, seed=self.config.model.init_seed)
        else:
            policy = load_pretrained_policy(self.config.model.name, trust_remote_code=self.config.model.trust_remote_code, dtype=weights_dtype(self.config.trainer.precision))
        if self.world is not None:
            rng = np.random.default_rng(c.seed)
            prompts = self.world.sample_prompts("train", c.n_demonstrations, seed=c.seed)
            demos = Dataset.from_dict({"prompt": prompts, "response": [self.world.demonstrate(p, rng) for p in prompts]})
            summary = {}
        else:
            records, summary = self._dataset_demonstrations()
            demos = Dataset.from_list(records)
        policy = prepare_for_training(policy, self.config.model.lora, self.config.model.gradient_checkpointing, seed=c.seed)
        data = DemonstrationDataModule(demos, self.codec, c.batch_size, c.max_length, seed=c.seed)
        total = len(data.train_dataloader()) * c.epochs
        module = SupervisedFineTuning(policy, c.optim, total)
        torch.manual_seed(c.seed)
        make_trainer(self.config.trainer, max_steps=total, max_epochs=c.epochs, grad_clip=c.optim.grad_clip).fit(module, datamodule=data)
        policy = merge_lora(policy)  # methods start from the SFT policy with its adapters folded in
        policy.save_pretrained(tmp / "policy")
        self.codec.tokenizer.save_pretrained(tmp / "policy")
        summary = {"demonstrations": len(demos), "steps": total, "tokens": module.tokens_trained, **summary}
        if self.world is not None:
            summary["demonstration_gold_reward"] = float(np.mean([self.world.gold(p, y).reward for p, y in zip(demos["prompt"], demos["response"])]))
        return summary

    def _dataset_demonstrations(self) -> tuple[list[dict], dict]:
        """The SFT dataset's demonstrations, or the preferred responses of the training pairs
        (the DPO paper's "Preferred-FT" where no SFT data exists); prompts that are too long are left out."""
        if self.data.sft is not None:
            records, report = hf_data.demonstrations(self.data.sft, "data.sft")
            summary = {f"sft_data/{k}": v for k, v in report.summary().items()}
        else:
            labels_dir, _ = self.labels()
            pairs = _read_jsonl(labels_dir / "overall.jsonl")
            records = [{"prompt": p, "response": y} for p, y in dict.fromkeys((r["prompt"], r["chosen"]) for r in pairs)]
            summary = {"sft_data/preferred_responses": len(records)}
        kept = [r for r in records if self._prompt_fits(r["prompt"])]
        summary["sft_data/prompts_too_long"] = len(records) - len(kept)
        if not kept:
            raise ConfigError(f"no demonstrations left for the SFT stage: {len(records)} read, every prompt longer than data.max_prompt_tokens={self.data.max_prompt_tokens}")
        return kept, summary

    def _prompt_fits(self, prompt: str) -> bool:
        return len(self.codec.encode_prompt(prompt)) <= self.data.max_prompt_tokens

    def labels(self) -> tuple[Path, dict]:
        return self._stage("labels", self.labels_key(), self._build_labels)

    def _build_labels(self, tmp: Path) -> dict:
        """Sample K responses per prompt from the SFT policy and have annotators rank them.

        Identical responses are dropped (about a fifth of sampled pairs on the world);
        gold ties are still labelled, at random, with the lowest margin level. Besides the
        overall ranking, the annotators give separate helpfulness and safety rankings and a
        per-response safe/unsafe label (Llama 2 collected both), used to train and
        calibrate the two reward models. With real data the pairs are read instead
        (`_read_dataset_labels`).
        """
        if self.world is None:
            return self._read_dataset_labels(tmp)
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

    def _read_dataset_labels(self, tmp: Path) -> dict:
        """The preference dataset's pairs, split by prompt: a `holdout_fraction` of the prompts
        (chosen with labels.seed) is held out to measure the reward model, the rest trains it
        and the preference methods. Human labels are the training pairs read."""
        c = self.config
        records, report = hf_data.preference_records(c.data.preferences, "data.preferences")
        kept = [r for r in records if self._prompt_fits(r["prompt"])]
        prompts = sorted({r["prompt"] for r in kept})
        if len(prompts) < 2:
            raise ConfigError(
                f"data.preferences ({c.data.preferences.path}): {len(prompts)} usable prompt(s) of {report.rows} rows "
                f"({len(records) - len(kept)} pairs with prompts over data.max_prompt_tokens={c.data.max_prompt_tokens}); "
                "at least 2 are needed to train and hold out"
            )
        order = np.random.default_rng(c.labels.seed).permutation(len(prompts))
        n_holdout = max(1, int(len(prompts) * c.reward_model.holdout_fraction))
        held_out = {prompts[i] for i in order[:n_holdout]}
        train = [r for r in kept if r["prompt"] not in held_out]
        holdout_pairs = [r for r in kept if r["prompt"] in held_out]
        holdout = {}  # the world's layout: each held-out prompt with its distinct responses
        for r in holdout_pairs:
            responses = holdout.setdefault(r["prompt"], [])
            responses += [y for y in (r["chosen"], r["rejected"]) if y not in responses]
        files = {
            "overall": train, "helpfulness": train, "holdout_pairs": holdout_pairs,
            "holdout": [{"prompt": p, "responses": ys} for p, ys in holdout.items()],
        }
        for name, rows in files.items():
            with open(tmp / f"{name}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        return {
            "pairs": {"overall": len(train), "helpfulness": len(train)}, "human_labels": len(train),
            "holdout_prompts": len(holdout), "holdout_pairs": len(holdout_pairs),
            "prompts_too_long": len(records) - len(kept), **report.summary(),
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
        policy = load_pretrained_policy(str(sft_dir / "policy")) if c.architecture == "backbone_head" else None
        axes = ["helpfulness"] + (["safety"] if c.safety and self.world is not None else [])
        if c.safety and self.world is None:
            log("reward_model.safety: a preference dataset has one preference axis, so the proxy reward is its one reward model")
        models: dict[str, RewardModel] = {}
        for axis in axes:
            records = _read_jsonl(labels_dir / f"{axis}.jsonl")
            for r in records:
                if "margin_level" in r:  # the world's annotators give Llama 2's margin levels
                    r["margin"] = LLAMA2_MARGIN_SMALL[r["margin_level"]]
            data = PreferenceDataModule(preference_rows(records, allow_empty_responses=True), self.codec, c.batch_size, c.max_length, seed=self.config.labels.seed)
            torch.manual_seed(self.config.labels.seed)  # before the head's initialisation: not whatever ran before in this process
            model = self._new_reward_model(policy, sft_dir)
            total = len(data.train_dataloader()) * c.epochs
            make_trainer(self.config.trainer, max_steps=total, max_epochs=c.epochs, grad_clip=c.optim.grad_clip).fit(RewardModelTraining(model, c, total), datamodule=data)
            model.backbone = merge_lora(model.backbone)
            model.eval()
            models[axis] = model
        if self.world is not None:
            # Calibrate: centre the helpfulness scores on the labelled responses; Platt-scale the
            # safety scores on the annotators' safe/unsafe labels so that R_s < 0.15 means "unsafe".
            labelled = _read_jsonl(labels_dir / "safety_labels.jsonl")
            prompts, responses = [r["prompt"] for r in labelled], [r["response"] for r in labelled]
            raw_help = score_texts(models["helpfulness"], self.codec, prompts, responses)
            models["helpfulness"].calibration.copy_(torch.tensor([1.0, -float(raw_help.mean())]))
            if "safety" in models:
                scale, bias = fit_calibration(score_texts(models["safety"], self.codec, prompts, responses), torch.tensor([r["safe"] for r in labelled], dtype=torch.float64))
                models["safety"].calibration.copy_(torch.tensor([scale, bias]))
        else:
            # Centre the scores on (up to CALIBRATION_RESPONSES of) the training pairs' responses.
            model = models["helpfulness"].to(self.device)
            pairs = _read_jsonl(labels_dir / "overall.jsonl")
            scored = list(dict.fromkeys((r["prompt"], y) for r in pairs for y in (r["chosen"], r["rejected"])))[:CALIBRATION_RESPONSES]
            raw_help = score_texts(model, self.codec, [p for p, _ in scored], [y for _, y in scored])
            model.calibration.copy_(torch.tensor([1.0, -float(raw_help.mean())]))
        for axis, model in models.items():
            model.save(tmp / axis)
        summary = {"human_labels": label_summary["human_labels"]}
        if self.world is not None:
            summary.update(self._reward_accuracy(models, _read_jsonl(labels_dir / "holdout.jsonl")))
        else:
            summary.update(self._dataset_reward_accuracy(models["helpfulness"], _read_jsonl(labels_dir / "holdout_pairs.jsonl")))
        return summary

    def _new_reward_model(self, policy, sft_dir: Path) -> RewardModel:
        """A reward model initialised from the SFT policy (InstructGPT), ready to train."""
        c = self.config
        if c.reward_model.architecture == "sequence_classification":
            from transformers import AutoModelForSequenceClassification

            classifier = AutoModelForSequenceClassification.from_pretrained(sft_dir / "policy", num_labels=1, dtype=torch.float32, trust_remote_code=c.model.trust_remote_code)
            classifier.config.pad_token_id = self.codec.pad_token_id  # transformers pools its own forward at the last non-pad token
            model = RewardModel.from_sequence_classifier(classifier)
        else:
            model = RewardModel.from_policy(policy, likelihood=c.reward_model.likelihood)
        model.backbone = prepare_for_training(model.backbone, c.model.lora, c.model.gradient_checkpointing, seed=c.labels.seed, causal_lm=False)
        if c.model.lora.enabled and model.lm_head is not None:
            model.lm_head.requires_grad_(False)  # an untied LM head is as large as the embeddings LoRA leaves frozen
        return model

    def _reward_accuracy(self, models: dict[str, RewardModel], holdout: list[dict]) -> dict[str, float]:
        """Held-out accuracy against gold, on pairs whose gold scores differ (`rm/*`)."""
        prompts, firsts, seconds = holdout_pairs(holdout)
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

    def _dataset_reward_accuracy(self, model: RewardModel, pairs: list[dict]) -> dict[str, float]:
        """Held-out accuracy against the dataset's own labels (`rm/*`): there is no gold reward.
        The proxy reward is this one model, so `rm/accuracy` is the same number."""
        prompts = [r["prompt"] for r in pairs]
        chosen = score_texts(model, self.codec, prompts, [r["chosen"] for r in pairs])
        rejected = score_texts(model, self.codec, prompts, [r["rejected"] for r in pairs])
        accuracy = float((chosen > rejected).float().mean()) if pairs else float("nan")
        return {"rm/helpfulness_accuracy": accuracy, "rm/accuracy": accuracy, "rm/holdout_pairs": len(pairs)}

    def reference_samples(self, seed: int) -> tuple[Path, dict]:
        c = self.config.eval
        key = {"sft": self.sft_key(), "eval": {k: v for k, v in to_dict(c).items() if k not in ("eval_every", "judge", "bootstrap_samples", "batch_size", "temperatures")}, "seed": seed}
        if self.world is None:
            key["prompts"] = self._eval_prompts_key()
        return self._stage("reference_samples", key, lambda tmp: self._build_reference_samples(tmp, seed))

    def eval_prompts(self) -> dict[str, list[str]]:
        c = self.config.eval
        if self.world is None:
            return self._dataset_eval_prompts()
        return {"test": self.world.sample_prompts("test", c.n_test_prompts, seed=c.seed), "val": self.world.sample_prompts("val", c.n_val_prompts, seed=c.seed)}

    def _eval_prompts_key(self) -> dict:
        if self.data.eval_prompts is None:
            return {"held_out_from": self.labels_key()}
        return {"eval_prompts": to_dict(self.data.eval_prompts), "max_prompt_tokens": self.data.max_prompt_tokens, "tokenizer": self.config.model.name}

    def _dataset_eval_prompts(self) -> dict[str, list[str]]:
        """Test and validation prompts from data.eval_prompts, or else the prompts held out from
        the preference pairs. In a random order (eval.seed), up to n_val_prompts of them (at most a
        fifth) go to validation and up to n_test_prompts of the rest to test."""
        if self._eval_prompt_sets is None:
            c = self.config.eval
            if self.data.eval_prompts is not None:
                pool = hf_data.prompts(self.data.eval_prompts, "data.eval_prompts")
            else:
                labels_dir, _ = self.labels()
                pool = [r["prompt"] for r in _read_jsonl(labels_dir / "holdout.jsonl")]
            pool = [p for p in pool if self._prompt_fits(p)]
            if len(pool) < 2:
                where = "data.eval_prompts" if self.data.eval_prompts is not None else "the prompts held out from data.preferences"
                raise ConfigError(f"{where}: {len(pool)} usable evaluation prompt(s); at least 2 are needed (one for validation, one for test)")
            order = np.random.default_rng(c.seed).permutation(len(pool))
            n_val = min(c.n_val_prompts, max(1, len(pool) // 5))
            self._eval_prompt_sets = {
                "test": [pool[i] for i in order[n_val : n_val + c.n_test_prompts]],
                "val": [pool[i] for i in order[:n_val]],
            }
        return self._eval_prompt_sets

    def _dataset_train_prompts(self, overall: list[dict]) -> list[str]:
        """Training prompts for methods that sample: data.prompts, or the training pairs'
        prompts; never an evaluation prompt, nor one longer than data.max_prompt_tokens."""
        pool = hf_data.prompts(self.data.prompts, "data.prompts") if self.data.prompts is not None else sorted({r["prompt"] for r in overall})
        evaluation = {p for split in self.eval_prompts().values() for p in split}
        kept = [p for p in pool if p not in evaluation and self._prompt_fits(p)]
        if not kept:
            raise ConfigError(f"no training prompts left: {len(pool)} read, each an evaluation prompt or longer than data.max_prompt_tokens={self.data.max_prompt_tokens}")
        return kept

    def _build_reference_samples(self, tmp: Path, seed: int) -> dict:
        sft_dir, _ = self.sft()
        reference = freeze(load_pretrained_policy(str(sft_dir / "policy"), trust_remote_code=self.config.model.trust_remote_code, dtype=weights_dtype(self.config.trainer.precision))).to(self.device)
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
        if self.config.model.lora.enabled:
            reference = AdapterDisabledReference()  # bound to the run's policy by load_policy
        else:
            reference = freeze(load_pretrained_policy(str(sft_dir / "policy"), trust_remote_code=self.config.model.trust_remote_code, dtype=weights_dtype(self.config.trainer.precision)))
        proxy = ProxyReward(self.codec, RewardModel.load(rm_dir / "helpfulness"), RewardModel.load(rm_dir / "safety") if (rm_dir / "safety").exists() else None).to(self.device)
        prompts = self.eval_prompts()
        reference_responses = {}
        for split in prompts:
            rows = _read_jsonl(ref_dir / f"{split}.jsonl")
            reference_responses[split] = PolicyResponses([r["response_ids"] for r in rows], [r["text"] for r in rows])
        overall = _read_jsonl(labels_dir / "overall.jsonl")
        if self.world is not None:
            gold, harmful_of = GoldJudge(self.world), self.world.is_harmful
            judges = {"gold": gold, "reward_model": RewardModelJudge(proxy, harmful_of), "annotator": AnnotatorJudge(SimulatedAnnotator(self.world, self.config.labels.annotator))}
            train_prompts = sorted({r["prompt"] for r in overall})
        else:
            # No gold reward: the reward model judges (the LM judge is the other option for real data).
            gold, harmful_of = None, None
            judges = {"reward_model": RewardModelJudge(proxy)}
            train_prompts = self._dataset_train_prompts(overall)
        if self.config.eval.judge == "lm":
            from alignbench.ai_feedback import load_ai_judge

            judges["lm"] = load_ai_judge(self)  # the AI labeler (ai_labeler.*): a world labeler or any HF model
        evaluator = Evaluator(self.config.eval, prompts, reference_responses, judges[self.config.eval.judge], world=self.world, proxy=proxy, harmful_of=harmful_of)
        return RunContext(
            config=self.config, seed=seed, codec=self.codec, world=self.world, sft_dir=sft_dir, reference=reference,
            proxy=proxy, preferences=preference_rows(overall, allow_empty_responses=True), reward_model_labels=label_summary["human_labels"],
            rm_metrics={k: v for k, v in rm_summary.items() if k.startswith("rm/")}, train_prompts=train_prompts,
            evaluator=evaluator, eval_config=self.config.eval, gold_judge=gold, pipeline=self,
        )


# Responses scored to centre a real dataset's reward model (enough for a stable mean).
CALIBRATION_RESPONSES = 4096


def inference_device(trainer) -> torch.device:
    """Where stages sample and score outside Lightning's fit: the GPU when training runs on one."""
    wants_gpu = trainer.accelerator in ("gpu", "cuda") or trainer.accelerator == "auto"
    return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")


def _model_key(model) -> dict:
    """The model section as stage keys hold it. Options added for real models enter a key only
    when used, so the keys (and caches) of configs that do not use them stay what they were;
    gradient checkpointing never does: it changes memory, not results."""
    key = to_dict(model)
    key.pop("gradient_checkpointing")
    if not model.lora.enabled:
        key.pop("lora")
    return key


def _reward_model_key(reward_model) -> dict:
    key = to_dict(reward_model)
    if reward_model.architecture == "backbone_head":  # the original architecture: keys as before it was an option
        key.pop("architecture")
    return key


def _check_real_data_config(config) -> None:
    """Refuse, before anything is built, what needs the world or cannot work with real data."""
    import dataclasses

    from alignbench.experiment import method_config
    from alignbench.registry import METHODS, get_method

    if config.model.name in TINY_MODELS:
        raise ConfigError(
            f"model.name={config.model.name!r} is a world model, whose tokenizer knows only the world's words; "
            "with data.source=hf use a Hugging Face causal LM (a hub name or a local path)"
        )
    if config.eval.judge in ("gold", "annotator"):
        raise ConfigError(f"eval.judge={config.eval.judge!r} needs the built-in world's gold reward; with data.source=hf use eval.judge=reward_model or eval.judge=lm (the AI labeler as judge)")
    on_cpu = config.trainer.accelerator == "cpu" or (config.trainer.accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and config.trainer.precision not in ("32-true", "32", "64-true"):
        raise ConfigError(f"trainer.precision={config.trainer.precision!r} on the CPU: half precision there is very slow; use 32-true on the CPU and bf16-mixed on a GPU")
    for name in [config.method] if config.method else list(config.methods):
        if get_method(name).feedback == "gold":
            usable = [m for m, cls in METHODS.items() if cls.feedback != "gold"]
            raise ConfigError(
                f"method {name!r} learns from or chooses by the world's gold reward (feedback='gold'); with data.source=hf there is none. "
                f"Methods that run on real data: {', '.join(usable)}"
            )
    lengths = [("sft.max_length", config.sft.max_length), ("reward_model.max_length", config.reward_model.max_length)]
    for name in [config.method] if config.method else list(config.methods):
        section = method_config(dataclasses.replace(config, method=name))
        if hasattr(section, "max_length"):
            lengths.append((f"{name}.max_length", section.max_length))
        if getattr(section, "reward", None) == "gold":  # online methods' oracle reward source
            raise ConfigError(f"{name}.reward='gold' needs the built-in world's gold reward; with data.source=hf use {name}.reward=proxy")
    for key, value in lengths:
        if value <= config.data.max_prompt_tokens:
            raise ConfigError(f"{key}={value} must be larger than data.max_prompt_tokens={config.data.max_prompt_tokens}, so that the longest prompt kept leaves room for a response")


def holdout_pairs(holdout: list[dict]) -> tuple[list[str], list[str], list[str]]:
    """Every pair of distinct responses of the held-out labelled prompts (`holdout.jsonl` rows):
    prompts, first responses, second responses."""
    prompts, firsts, seconds = [], [], []
    for row in holdout:
        for i, a in enumerate(row["responses"]):
            for b in row["responses"][i + 1 :]:
                prompts.append(row["prompt"])
                firsts.append(a)
                seconds.append(b)
    return prompts, firsts, seconds


def read_holdout(pipeline: "Pipeline") -> list[dict]:
    """The labels stage's held-out prompts and their sampled responses."""
    labels_dir, _ = pipeline.labels()
    return _read_jsonl(labels_dir / "holdout.jsonl")


def _read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

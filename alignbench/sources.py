"""Data sources: where demonstrations, preference labels, prompts and gold come from.

One interface, two implementations, chosen by `data.source`:

- `WorldSource` (`world`): the built-in assistant world. Demonstrations are the noisy
  demonstrator's; preference labels are the simulated annotators' rankings of SFT samples;
  prompts are drawn from the world's train / val / test splits; the gold judge is the world's
  gold reward, and every accuracy is measured against it.
- `DatasetSource` (`hf`, see alignbench.hf_data): real datasets. Demonstrations come from the
  SFT dataset or the preferred responses of the training pairs; preference labels are the
  dataset's pairs (a share of prompts held out); prompts come from its prompt sets; there is
  no gold judge, so the reward model is checked against the dataset's own labels and the
  evaluation judge is the reward model (or the LM judge).

The stages (alignbench.stages) call the source for everything that differs between the two,
and are otherwise written once. `p` below is the run's `Pipeline`: a source reads the stages
it depends on (the SFT policy, the labels) through it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from alignbench import hf_data
from alignbench.annotator import LLAMA2_MARGIN_SMALL, SimulatedAnnotator
from alignbench.config import ConfigError, to_dict
from alignbench.evaluation import EvalConfig, sample_policy
from alignbench.judges import AnnotatorJudge, GoldJudge, RewardModelJudge
from alignbench.log import log
from alignbench.models import TINY_MODELS, RewardModel, build_world_tokenizer, freeze, load_pretrained_policy, load_tokenizer, weights_dtype
from alignbench.reward import fit_calibration, score_texts
from alignbench.seeding import seeded_generator
from alignbench.stage_cache import read_jsonl, write_jsonl
from alignbench.stages.training import agreement_where_gold_differs, centre, holdout_pairs
from alignbench.world import AssistantWorld

if TYPE_CHECKING:
    from alignbench.pipeline import Pipeline

# The world labels stage's hold-out share before it entered the stage key (see `WorldSource.labels_key`).
WORLD_KEY_HOLDOUT_FRACTION = 0.1
# Responses scored to centre a real dataset's reward model (enough for a stable mean).
CALIBRATION_RESPONSES = 4096


def model_key(model) -> dict:
    """The model section as stage keys hold it. Options added for real models enter a key only
    when used, so the keys (and caches) of configs that do not use them stay what they were;
    gradient checkpointing never does: it changes memory, not results."""
    key = to_dict(model)
    key.pop("gradient_checkpointing")
    if not model.lora.enabled:
        key.pop("lora")
    return key


def precision_key(trainer) -> dict:
    """The training precision as stage keys hold it: absent at full precision (the keys of every
    cache built before it entered them), else e.g. {"precision": "bf16-mixed"}."""
    return {} if trainer.precision in ("32-true", "32") else {"precision": trainer.precision}


def reward_model_key(reward_model) -> dict:
    key = to_dict(reward_model)
    if reward_model.architecture == "backbone_head":  # the original architecture: keys as before it was an option
        key.pop("architecture")
    return key


def inference_device(trainer) -> torch.device:
    """Where stages sample and score outside Lightning's fit: the GPU when training runs on one."""
    wants_gpu = trainer.accelerator in ("gpu", "cuda") or trainer.accelerator == "auto"
    return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")


def make_source(config) -> "DataSource":
    return DatasetSource(config) if config.data.source == "hf" else WorldSource(config)


class DataSource(ABC):
    """What differs between the world and real datasets; see the module docstring."""

    world: AssistantWorld | None = None
    gold_judge: GoldJudge | None = None
    device: torch.device

    def __init__(self, config):
        self.config = config

    def tokenizer(self):
        model = self.config.model
        return load_tokenizer(model.name, trust_remote_code=model.trust_remote_code, key="model.name")

    def harmful_of(self, prompt: str) -> bool:
        """Whether a prompt asks for harm (Llama 2's safety prompts); no dataset says so."""
        return False

    def gold_scores(self, prompts: Sequence[str], responses: Sequence[str], axis: str = "reward") -> np.ndarray | None:
        """Gold `reward`, `helpfulness` or `harmlessness` of each response; None without gold."""
        return None

    def agreement_with_gold(self, prompts, firsts, seconds, first_better, axis: str = "reward") -> float | None:
        """Accuracy of the decisions `first_better` against gold where gold differs (None without gold)."""
        gold_a = self.gold_scores(prompts, firsts, axis)
        if gold_a is None:
            return None
        return agreement_where_gold_differs(np.asarray(first_better), gold_a, self.gold_scores(prompts, seconds, axis))

    # --- per stage: each returns what its stage needs ------------------------------------
    @abstractmethod
    def sft_key(self, p: "Pipeline") -> dict:
        """The SFT stage's key: the demonstrations' origin, the model and sft sections."""

    @abstractmethod
    def demonstrations(self, p: "Pipeline") -> tuple[list[str], list[str], dict]:
        """SFT prompts, responses and a summary of where they came from."""

    @abstractmethod
    def labels_key(self, p: "Pipeline") -> dict:
        """The labels stage's key."""

    @abstractmethod
    def build_labels(self, p: "Pipeline", tmp: Path) -> dict:
        """Write the labels stage's files into `tmp`; return its summary (with `human_labels`)."""

    @abstractmethod
    def reward_key(self, p: "Pipeline") -> dict:
        """The reward-models stage's key (its build version is added by the stage)."""

    @abstractmethod
    def reward_axes(self) -> list[str]:
        """The reward models to train: `helpfulness`, and `safety` where the labels have it."""

    @abstractmethod
    def calibrate(self, p: "Pipeline", models: dict[str, RewardModel], labels_dir: Path) -> None:
        """Set each trained reward model's calibration in place."""

    @abstractmethod
    def reward_accuracy(self, p: "Pipeline", models: dict[str, RewardModel], labels_dir: Path) -> dict:
        """The reward models' held-out `rm/*` metrics."""

    @abstractmethod
    def eval_prompts(self, p: "Pipeline") -> dict[str, list[str]]:
        """The evaluation prompts: {"test": [...], "val": [...]}."""

    @abstractmethod
    def eval_prompts_key(self, p: "Pipeline") -> dict | None:
        """What decides the evaluation prompts beyond the eval section (None: nothing)."""

    @abstractmethod
    def train_prompts(self, p: "Pipeline", pairs: list[dict]) -> list[str]:
        """The pool of training prompts for methods that sample (never an evaluation prompt)."""

    @abstractmethod
    def sample_train_prompts(self, pool: list[str], n: int, seed: int) -> list[str]:
        """n seeded training prompts (from `pool` where the source has no prompt generator)."""

    @abstractmethod
    def judges(self, proxy) -> dict:
        """The evaluation judges by `eval.judge` name (the LM judge is added by the pipeline)."""


class WorldSource(DataSource):
    def __init__(self, config):
        super().__init__(config)
        self.world = AssistantWorld(config.world)
        self.gold_judge = GoldJudge(self.world)
        self.device = torch.device("cpu")  # where the world's stages always ran (its caches do not record the device)

    def tokenizer(self):
        return build_world_tokenizer(self.world.vocabulary()) if self.config.model.name in TINY_MODELS else super().tokenizer()

    def harmful_of(self, prompt: str) -> bool:
        return self.world.is_harmful(prompt)

    def gold_scores(self, prompts, responses, axis: str = "reward") -> np.ndarray:
        return np.array([getattr(self.world.gold(p, y), axis) for p, y in zip(prompts, responses)])

    def sft_key(self, p) -> dict:
        c = self.config
        return {"world": to_dict(c.world), "model": model_key(c.model), "sft": to_dict(c.sft), **precision_key(c.trainer)}

    def demonstrations(self, p):
        c = self.config.sft
        rng = np.random.default_rng(c.seed)
        prompts = self.world.sample_prompts("train", c.n_demonstrations, seed=c.seed)
        responses = [self.world.demonstrate(x, rng) for x in prompts]
        return prompts, responses, {"demonstration_gold_reward": float(np.mean(self.gold_scores(prompts, responses)))}

    def labels_key(self, p) -> dict:
        c = self.config
        key = {"sft": p.sft_key(), "labels": to_dict(c.labels), "max_new_tokens": c.eval.max_new_tokens}
        # The hold-out share decides which prompts are held out; at the value every cache before it
        # entered the key was built with, it stays out of the key, so those caches are reused.
        if c.reward_model.holdout_fraction != WORLD_KEY_HOLDOUT_FRACTION:
            key["holdout_fraction"] = c.reward_model.holdout_fraction
        return key

    def build_labels(self, p, tmp: Path) -> dict:
        """Sample K responses per prompt from the SFT policy and have annotators rank them.

        Identical responses are dropped (about a fifth of sampled pairs on the world);
        gold ties are still labelled, at random, with the lowest margin level. Besides the
        overall ranking, the annotators give separate helpfulness and safety rankings and a
        per-response safe/unsafe label (Llama 2 collected both), used to train and
        calibrate the two reward models.
        """
        c = self.config.labels
        sft_dir, _ = p.sft()
        policy = freeze(load_pretrained_policy(str(sft_dir / "policy")))
        prompts = sorted(set(self.world.sample_prompts("train", c.n_prompts * 3, seed=c.seed + 1)))
        prompts = [prompts[i] for i in np.random.default_rng(c.seed).permutation(len(prompts))[: c.n_prompts]]
        sampling = EvalConfig(temperature=c.temperature, max_new_tokens=self.config.eval.max_new_tokens)
        out = sample_policy(policy, None, p.codec, prompts, sampling, seeded_generator(c.seed, "labels"), desc="sampling responses to label", num_samples=c.responses_per_prompt)
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
        for name, records in [*rows.items(), ("safety_labels", safety_labels), ("holdout", holdout)]:
            write_jsonl(tmp / f"{name}.jsonl", records)
        overall = rows["overall"]
        agreement = self.agreement_with_gold([r["prompt"] for r in overall], [r["chosen"] for r in overall], [r["rejected"] for r in overall], np.ones(len(overall), dtype=bool))
        return {
            "pairs": {name: len(records) for name, records in rows.items()},
            "human_labels": len(overall),
            "label_agreement_with_gold": agreement if agreement == agreement else None,  # None: gold ties on every pair
            "holdout_prompts": len(holdout),
        }

    def _ranked_pairs(self, annotator: SimulatedAnnotator, prompt: str, responses: list[str], rng, drop_ties: bool) -> list[dict]:
        """The labelled pairs of one prompt's ranking: by gold (`labels.source: gold`), or by the
        annotator, whose label flips reach the pairs. A pair's margin level is the gold gap's."""
        utilities = [annotator.utility(prompt, y) for y in responses]
        if self.config.labels.source == "gold":
            order = sorted(range(len(responses)), key=lambda j: -utilities[j])
            indices = [(order[a], order[b]) for a in range(len(order)) for b in range(a + 1, len(order))]
        else:
            indices = annotator.ranked_pairs(prompt, responses, rng)
        pairs = []
        for chosen, rejected in indices:
            gap = abs(utilities[chosen] - utilities[rejected])
            if drop_ties and gap == 0:
                continue  # "equally safe": the safety annotation has no preference here
            pairs.append({"prompt": prompt, "chosen": responses[chosen], "rejected": responses[rejected], "margin_level": annotator.margin_level(gap)})
        return pairs

    def reward_key(self, p) -> dict:
        return {"labels": p.labels_key(), "reward_model": reward_model_key(self.config.reward_model)}  # the labels key holds the SFT key

    def reward_axes(self) -> list[str]:
        return ["helpfulness"] + (["safety"] if self.config.reward_model.safety else [])

    def calibrate(self, p, models, labels_dir: Path) -> None:
        """Centre the helpfulness scores on the labelled responses; Platt-scale the safety scores
        on the annotators' safe/unsafe labels so that R_s < 0.15 means "unsafe"."""
        labelled = read_jsonl(labels_dir / "safety_labels.jsonl")
        prompts, responses = [r["prompt"] for r in labelled], [r["response"] for r in labelled]
        length = self.config.reward_model.max_length
        centre(models["helpfulness"], p.codec, prompts, responses, length)
        if "safety" in models:
            scale, bias = fit_calibration(score_texts(models["safety"], p.codec, prompts, responses, max_length=length), torch.tensor([r["safe"] for r in labelled], dtype=torch.float64))
            models["safety"].calibration.copy_(torch.tensor([scale, bias]))

    def reward_accuracy(self, p, models, labels_dir: Path) -> dict:
        """Held-out accuracy against gold, on pairs whose gold scores differ (`rm/*`)."""
        from alignbench.reward import ProxyReward

        prompts, firsts, seconds = holdout_pairs(read_jsonl(labels_dir / "holdout.jsonl"))
        length = self.config.reward_model.max_length
        proxy = ProxyReward(p.codec, models["helpfulness"], models.get("safety"), max_length=length)
        harmful = [self.world.is_harmful(x) for x in prompts]
        checks = {"rm/helpfulness_accuracy": ("helpfulness", "helpfulness"), "rm/safety_accuracy": ("safety", "harmlessness"), "rm/accuracy": (None, "reward")}
        results = {}
        for name, (axis, gold_axis) in checks.items():
            if axis is None:
                sa, sb = proxy.score(prompts, firsts, harmful), proxy.score(prompts, seconds, harmful)
            elif axis in models:
                sa, sb = score_texts(models[axis], p.codec, prompts, firsts, max_length=length), score_texts(models[axis], p.codec, prompts, seconds, max_length=length)
            else:
                continue
            results[name] = self.agreement_with_gold(prompts, firsts, seconds, sa.numpy() > sb.numpy(), gold_axis)
        results["rm/holdout_pairs"] = len(prompts)
        return results

    def eval_prompts(self, p) -> dict[str, list[str]]:
        c = self.config.eval
        return {"test": self.world.sample_prompts("test", c.n_test_prompts, seed=c.seed), "val": self.world.sample_prompts("val", c.n_val_prompts, seed=c.seed)}

    def eval_prompts_key(self, p) -> dict | None:
        return None  # the world's splits: the eval section (in the key) decides them

    def train_prompts(self, p, pairs: list[dict]) -> list[str]:
        return sorted({r["prompt"] for r in pairs})

    def sample_train_prompts(self, pool, n: int, seed: int) -> list[str]:
        return self.world.sample_prompts("train", n, seed=seed)

    def judges(self, proxy) -> dict:
        return {"gold": self.gold_judge, "reward_model": RewardModelJudge(proxy, self.harmful_of),
                "annotator": AnnotatorJudge(SimulatedAnnotator(self.world, self.config.labels.annotator))}


class DatasetSource(DataSource):
    def __init__(self, config):
        super().__init__(config)
        self.device = inference_device(config.trainer)
        self._eval_prompt_sets: dict[str, list[str]] | None = None

    def _prompt_fits(self, p, prompt: str) -> bool:
        return len(p.codec.encode_prompt(prompt)) <= self.config.data.max_prompt_tokens

    def sft_key(self, p) -> dict:
        c = self.config
        # Demonstrations from the SFT dataset, or the preferred responses of the training pairs.
        source = {"sft": hf_data.dataset_key(c.data.sft)} if c.data.sft is not None else {"preferred_responses": p.labels_key()}
        return {"data": source, "model": model_key(c.model), "sft": to_dict(c.sft), "weights": str(weights_dtype(c.trainer.precision)), **precision_key(c.trainer)}

    def demonstrations(self, p):
        """The SFT dataset's demonstrations, or the preferred responses of the training pairs
        (the DPO paper's "Preferred-FT" where no SFT data exists); prompts that are too long are left out."""
        data = self.config.data
        if data.sft is not None:
            records, report = hf_data.demonstrations(data.sft, "data.sft")
            summary = {f"sft_data/{k}": v for k, v in report.summary().items()}
        else:
            labels_dir, _ = p.labels()
            pairs = read_jsonl(labels_dir / "overall.jsonl")
            records = [{"prompt": x, "response": y} for x, y in dict.fromkeys((r["prompt"], r["chosen"]) for r in pairs)]
            summary = {"sft_data/preferred_responses": len(records)}
        kept = [r for r in records if self._prompt_fits(p, r["prompt"])]
        summary["sft_data/prompts_too_long"] = len(records) - len(kept)
        if not kept:
            raise ConfigError(f"no demonstrations left for the SFT stage: {len(records)} read, every prompt longer than data.max_prompt_tokens={data.max_prompt_tokens}")
        return [r["prompt"] for r in kept], [r["response"] for r in kept], summary

    def labels_key(self, p) -> dict:
        c = self.config
        # Read, not sampled: the pairs do not depend on the SFT policy; the tokenizer decides
        # which prompts are too long, and the seed and fraction which prompts are held out.
        return {
            "preferences": hf_data.dataset_key(c.data.preferences), "max_prompt_tokens": c.data.max_prompt_tokens, "tokenizer": c.model.name,
            "seed": c.labels.seed, "holdout_fraction": c.reward_model.holdout_fraction,
        }

    def build_labels(self, p, tmp: Path) -> dict:
        """The preference dataset's pairs, split by prompt: a `holdout_fraction` of the prompts
        (chosen with labels.seed) is held out to measure the reward model, the rest trains it
        and the preference methods. Human labels are the training pairs read."""
        c = self.config
        records, report = hf_data.preference_records(c.data.preferences, "data.preferences")
        kept = [r for r in records if self._prompt_fits(p, r["prompt"])]
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
        held_pairs = [r for r in kept if r["prompt"] in held_out]
        holdout: dict[str, list[str]] = {}  # the world's layout: each held-out prompt with its distinct responses
        for r in held_pairs:
            responses = holdout.setdefault(r["prompt"], [])
            responses += [y for y in (r["chosen"], r["rejected"]) if y not in responses]
        files = {"overall": train, "helpfulness": train, "holdout_pairs": held_pairs, "holdout": [{"prompt": x, "responses": ys} for x, ys in holdout.items()]}
        for name, rows in files.items():
            write_jsonl(tmp / f"{name}.jsonl", rows)
        return {
            "pairs": {"overall": len(train), "helpfulness": len(train)}, "human_labels": len(train),
            "holdout_prompts": len(holdout), "holdout_pairs": len(held_pairs),
            "prompts_too_long": len(records) - len(kept), **report.summary(),
        }

    def reward_key(self, p) -> dict:
        return {"labels": p.labels_key(), "reward_model": reward_model_key(self.config.reward_model), "sft": p.sft_key()}

    def reward_axes(self) -> list[str]:
        if self.config.reward_model.safety:
            log("reward_model.safety: a preference dataset has one preference axis, so the proxy reward is its one reward model")
        return ["helpfulness"]

    def calibrate(self, p, models, labels_dir: Path) -> None:
        """Centre the scores on (up to CALIBRATION_RESPONSES of) the training pairs' responses."""
        model = models["helpfulness"].to(self.device)
        pairs = read_jsonl(labels_dir / "overall.jsonl")
        scored = list(dict.fromkeys((r["prompt"], y) for r in pairs for y in (r["chosen"], r["rejected"])))[:CALIBRATION_RESPONSES]
        centre(model, p.codec, [x for x, _ in scored], [y for _, y in scored], self.config.reward_model.max_length)

    def reward_accuracy(self, p, models, labels_dir: Path) -> dict:
        """Held-out accuracy against the dataset's own labels (`rm/*`): there is no gold reward.
        The proxy reward is this one model, so `rm/accuracy` is the same number."""
        pairs = read_jsonl(labels_dir / "holdout_pairs.jsonl")
        prompts, model = [r["prompt"] for r in pairs], models["helpfulness"]
        length = self.config.reward_model.max_length
        chosen = score_texts(model, p.codec, prompts, [r["chosen"] for r in pairs], max_length=length)
        rejected = score_texts(model, p.codec, prompts, [r["rejected"] for r in pairs], max_length=length)
        accuracy = float((chosen > rejected).float().mean()) if pairs else float("nan")
        return {"rm/helpfulness_accuracy": accuracy, "rm/accuracy": accuracy, "rm/holdout_pairs": len(pairs)}

    def eval_prompts(self, p) -> dict[str, list[str]]:
        """Test and validation prompts from data.eval_prompts, or else the prompts held out from
        the preference pairs. In a random order (eval.seed), up to n_val_prompts of them (at most a
        fifth) go to validation and up to n_test_prompts of the rest to test."""
        if self._eval_prompt_sets is None:
            c, data = self.config.eval, self.config.data
            if data.eval_prompts is not None:
                pool = hf_data.prompts(data.eval_prompts, "data.eval_prompts")
            else:
                labels_dir, _ = p.labels()
                pool = [r["prompt"] for r in read_jsonl(labels_dir / "holdout.jsonl")]
            pool = [x for x in pool if self._prompt_fits(p, x)]
            if len(pool) < 2:
                where = "data.eval_prompts" if data.eval_prompts is not None else "the prompts held out from data.preferences"
                raise ConfigError(f"{where}: {len(pool)} usable evaluation prompt(s); at least 2 are needed (one for validation, one for test)")
            order = np.random.default_rng(c.seed).permutation(len(pool))
            n_val = min(c.n_val_prompts, max(1, len(pool) // 5))
            self._eval_prompt_sets = {"test": [pool[i] for i in order[n_val : n_val + c.n_test_prompts]], "val": [pool[i] for i in order[:n_val]]}
        return self._eval_prompt_sets

    def eval_prompts_key(self, p) -> dict | None:
        data = self.config.data
        if data.eval_prompts is None:
            return {"held_out_from": p.labels_key()}
        return {"eval_prompts": hf_data.dataset_key(data.eval_prompts), "max_prompt_tokens": data.max_prompt_tokens, "tokenizer": self.config.model.name}

    def train_prompts(self, p, pairs: list[dict]) -> list[str]:
        """Training prompts for methods that sample: data.prompts, or the training pairs'
        prompts; never an evaluation prompt, nor one longer than data.max_prompt_tokens."""
        data = self.config.data
        pool = hf_data.prompts(data.prompts, "data.prompts") if data.prompts is not None else sorted({r["prompt"] for r in pairs})
        evaluation = {x for split in self.eval_prompts(p).values() for x in split}
        kept = [x for x in pool if x not in evaluation and self._prompt_fits(p, x)]
        if not kept:
            raise ConfigError(f"no training prompts left: {len(pool)} read, each an evaluation prompt or longer than data.max_prompt_tokens={data.max_prompt_tokens}")
        return kept

    def sample_train_prompts(self, pool, n: int, seed: int) -> list[str]:
        return hf_data.draw_prompts(pool, n, seed)

    def judges(self, proxy) -> dict:
        return {"reward_model": RewardModelJudge(proxy)}  # no gold reward: the reward model judges (or the LM judge)

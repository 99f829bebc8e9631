"""The experiment config: one typed tree for world, model, stages, evaluation and methods.

Each registered method contributes a section named after it (`dpo: {beta: 0.1}`), so an
override such as `dpo.beta=0.2` is type-checked like any other key.

An experiment is loaded and validated here, once (`load_experiment`): types and ranges in each
section's `__post_init__`, and here what needs the data source (`validate_for_source`: what
cannot run on real data is refused before anything is built). A run is resolved here, once,
into a `RunSpec` (its config with one method and one seed, the method's class and config
section, its name), which the runner uses without looking the method up again.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Sequence

from alignbench.ai_feedback import AILabelerConfig
from alignbench.annotator import AnnotatorConfig
from alignbench.config import ConfigError, apply_overrides, config_hash, deep_merge, did_you_mean, flatten, from_dict, load_yaml, parse_overrides, to_dict
from alignbench.evaluation import EvalConfig
from alignbench.hf_data import DataConfig, missing_local_path
from alignbench.models import TINY_MODELS, LoRAConfig
from alignbench.registry import METHODS, get_method
from alignbench.reward import RewardModelConfig
from alignbench.seeding import STAGE_SEEDS, get_dotted, stage_seeds_following, with_run_seed
from alignbench.sft import SFTConfig
from alignbench.stage_cache import CACHE_FOLDER
from alignbench.tracking import TrackingConfig
from alignbench.training import TrainerConfig
from alignbench.world import AssistantWorld, WorldConfig


@dataclass
class ModelConfig:
    """The policy every method starts from (before SFT)."""

    name: str = "world-small"
    """A named world model (world-tiny, world-mini, world-small, world-base) or any HF causal LM (hub name or local path)."""
    trust_remote_code: bool = False
    """Allow a hub model's own Python code to run. Off unless you trust the model's authors."""
    init_seed: int | None = None
    """Seed of a named world model's random initialisation (None: the run's seed)."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """Low-rank adapters instead of full fine-tuning (SFT, reward models and every trained method)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory for long sequences, ~30% more time."""


@dataclass
class LabelConfig:
    """How the preference labels shared by reward models and preference methods are collected."""

    n_prompts: int = 3000
    """Training prompts whose sampled responses are labelled."""
    responses_per_prompt: int = 4
    """K responses sampled from the SFT policy per prompt and ranked (all K-choose-2 pairs are used)."""
    temperature: float = 1.0
    """Sampling temperature for the responses to label."""
    source: Literal["annotator", "gold"] = "annotator"
    """Who labels: the simulated human annotator, or the gold reward (noise-free oracle labels)."""
    annotator: AnnotatorConfig = field(default_factory=AnnotatorConfig)
    """The simulated annotators' noise (Bradley–Terry temperature, flips, biases)."""
    seed: int | None = None
    """Seed of prompt choice, sampling and labelling, and of the reward models' training (None: the run's seed)."""

    def __post_init__(self):
        if self.n_prompts < 10:
            raise ValueError(f"labels.n_prompts={self.n_prompts} must be >= 10")
        if not 2 <= self.responses_per_prompt <= 9:
            raise ValueError(f"labels.responses_per_prompt={self.responses_per_prompt} must be in 2..9")
        if not self.temperature > 0:  # at 0 (greedy) the K responses of a prompt are one response: nothing to compare
            raise ValueError(f"labels.temperature={self.temperature} must be > 0")


@dataclass
class ExperimentBase:
    name: str = "experiment"
    """The experiment's name: its folder under --out and its W&B project."""
    methods: list[str] = field(default_factory=lambda: ["sft", "best_of_n", "dpo"])
    """Methods compared by `quickstart` / `sweep` (registry names)."""
    method: str | None = None
    """The method of a single `alignbench run` (default: the only entry of `methods`)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds compared by `quickstart` / `sweep`."""
    seed: int | None = None
    """The seed of a single run (default: the first of `seeds`)."""
    world: WorldConfig = field(default_factory=WorldConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ai_labeler: AILabelerConfig = field(default_factory=AILabelerConfig)

    def __post_init__(self):
        check_folder_name("name", self.name)
        if self.name == CACHE_FOLDER:  # its runs would land among the stages, where results never look
            raise ValueError(f"name={self.name!r} is the folder of the stage cache under --out; give the experiment another name")


def check_folder_name(key: str, value: str) -> None:
    """`value` (the setting `key`) names one folder under --out: no path separator, no '..', not
    absolute, not empty, so that what a run writes stays inside --out (ValueError otherwise)."""
    if (not isinstance(value, str) or not value.strip() or value in (".", "..") or any(c in value for c in "/\\")
            or not value.isprintable() or value != value.strip()):
        raise ValueError(f"{key}={value!r} must be a plain folder name (not empty, no '/' or '\\', not '.' or '..', no leading or "
                         "trailing spaces, no line breaks or other control characters): it names a folder under --out, and what a run writes stays inside --out")


def output_folder(out: Path, *names: str) -> Path:
    """OUT/<names...>, checked to resolve to a folder inside OUT (a symlink or a name that
    points elsewhere is refused with a ConfigError): nothing a run writes lands outside --out."""
    root = Path(out).resolve()
    path = Path(out).joinpath(*names)
    resolved = path.resolve()
    if resolved == root or not resolved.is_relative_to(root):
        raise ConfigError(f"{path} resolves to {resolved}, which is not a folder inside --out {root}; "
                          "check the experiment's name and any symbolic link under --out")
    return path


_SHARED_SECTIONS = {f.name for f in dataclasses.fields(ExperimentBase)}
# A method named like a shared section (the `sft` baseline) has no options of its own: its
# behaviour is the shared section's.
ExperimentConfig = dataclasses.make_dataclass(
    "ExperimentConfig",
    [(name, cls.config_class, field(default_factory=cls.config_class)) for name, cls in METHODS.items() if name not in _SHARED_SECTIONS],
    bases=(ExperimentBase,),
)
ExperimentConfig.__doc__ = "A whole experiment: shared stages, evaluation, tracking and every method's section."

# Keys that change how a run is executed or shown, never its numbers.
_NOT_IN_RUN_IDENTITY = ("methods", "seeds", "tracking", "trainer.progress_bar", "trainer.threads", "trainer.checkpoint_every")


# Sections that `alignbench sweep` and `alignbench tune` read. Every other command runs such
# a file as the experiment its runs share and ignores them, so that
# `alignbench run head_to_head method=dpo seed=1` runs one run of the head-to-head sweep.
DRIVER_SECTIONS = ("sweep", "tune")


def is_wandb_sweep(data: dict) -> bool:
    """A W&B sweep config (started with `wandb sweep FILE`), not an experiment."""
    return isinstance(data.get("parameters"), dict) and ("command" in data or "program" in data)


def shipped_experiments() -> dict[str, Path]:
    """Every experiment shipped with alignbench: its path under the name it is run by (the file's
    stem, and its path below `experiments/` without the suffix). W&B sweep configs are left out."""
    return dict(_shipped_experiments())


@functools.lru_cache(maxsize=1)
def _shipped_experiments() -> dict[str, Path]:
    # Read once a process (the package's files do not change while it runs): a sweep looks its
    # experiment up for each run, and parsing every shipped file each time took ~15 s of the 24-27 s
    # a dry run of the 228-run frontier sweep took (10 s now).
    root = resources.files("alignbench.experiments")
    found = {}
    for path in sorted(Path(str(root)).rglob("*.yaml")):
        if is_wandb_sweep(load_yaml(path)):  # W&B's agent runs it, not alignbench
            continue
        found.setdefault(path.stem, path)
        found[str(path.relative_to(Path(str(root))).with_suffix(""))] = path
    return found


def find_experiment(name_or_path: str) -> Path:
    """A YAML path, or a bare name of a shipped experiment (`quickstart`)."""
    path = Path(name_or_path)
    # A folder of that name (`--out .` writes OUT/<experiment>/) does not hide the shipped experiment.
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"experiment file not found: {name_or_path}")
        return path
    shipped = shipped_experiments()
    key = name_or_path.removesuffix(".yaml")
    if key in shipped:
        return shipped[key]
    raise ConfigError(
        f"no experiment named {name_or_path!r};{did_you_mean(key, shipped)} shipped experiments: {', '.join(sorted(shipped))} "
        "(or give a path to a YAML file)"
    )


def load_experiment_data(name_or_path: str, _chain: tuple[Path, ...] = ()) -> dict:
    """An experiment file's mapping, with its `base:` experiment merged under it (this file's
    keys win, section by section). `base` is a shipped experiment's name or a YAML path
    (relative to this file's folder); a base's own sweep / tune sections are not inherited."""
    path = find_experiment(name_or_path).resolve()
    if path in _chain:
        raise ConfigError(f"'base' loops back to {path}: {' -> '.join(p.stem for p in _chain + (path,))}")
    data = load_yaml(path, allow_empty=False)
    if is_wandb_sweep(data):
        raise ConfigError(f"{path} is a W&B sweep config, not an experiment: start it with `wandb sweep {path}`, then `wandb agent SWEEP_ID`")
    data.setdefault("name", path.stem)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"'base' in {path} must be a shipped experiment's name or a YAML path, got {base!r}")
    beside = path.parent / base
    base_data = load_experiment_data(str(beside) if beside.is_file() else base, _chain + (path,))
    for section in DRIVER_SECTIONS:
        base_data.pop(section, None)
    return deep_merge(base_data, data)


def load_experiment(name_or_path: str, overrides: Sequence[str] = ()):
    """Load, override and validate an experiment; every user error is a ConfigError.
    A sweep or tune file loads as the experiment its runs share (see DRIVER_SECTIONS)."""
    data = apply_overrides(load_experiment_data(name_or_path), parse_overrides(overrides))
    for section in DRIVER_SECTIONS:
        data.pop(section, None)
    return experiment_from_data(data)


def experiment_from_data(data: dict):
    """Build and validate an experiment from its (merged, overridden) mapping."""
    config = from_dict(ExperimentConfig, data)
    for name in config.methods:
        get_method(name)
    if config.method is not None:
        get_method(config.method)
    if not config.methods or not config.seeds:
        raise ConfigError("an experiment needs at least one entry in 'methods' and in 'seeds'")
    for key, values in (("methods", config.methods), ("seeds", config.seeds)):
        # A run is one (method, seed): a repeat would be merged, and [0, 1, 1] meant for three seeds give two.
        if repeated := sorted({str(v) for v in values if values.count(v) > 1}):
            raise ConfigError(f"{key}={values} lists {', '.join(repeated)} more than once; each entry must be distinct")
    for key, value in [("seeds", s) for s in config.seeds] + [("seed", config.seed)] + [(k, get_dotted(config, k)) for k in STAGE_SEEDS]:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ConfigError(f"{key}={value!r}: a seed must be an integer >= 0" + (" (or null: the run's seed)" if key in STAGE_SEEDS else ""))
    validate_for_source(config)
    return config


def validate_for_source(config) -> None:
    """Refuse, before anything is built, what needs the world or cannot work with real data
    (`data.source=hf`): for the run's method, or for every method compared when none is chosen;
    and, with any source, a model or data file named by a local path that does not exist."""
    data_paths = [(f"data.{name}.path", spec.path) for name, spec in config.data.datasets().items()]
    for key, path in [("model.name", config.model.name), ("ai_labeler.model", config.ai_labeler.model), *data_paths]:
        if missing_local_path(path):
            raise ConfigError(f"{key}={path!r}: there is no such file or folder")
    if config.data.source != "hf":
        # The world's prompts are short, but a max_length below the longest one failed only once the
        # stages were built, naming no key. A prompt is its words between BOS and the separator
        # (models.WORLD_CHAT_TEMPLATE; the tokenizer is word-level).
        longest = len(AssistantWorld(config.world).longest_prompt().split()) + 2
        _check_max_lengths(config, longest, f"the world's longest prompt ({longest} tokens)")
        return
    import torch

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
        cls, section = get_method(name), method_config(dataclasses.replace(config, method=name))
        if cls.feedback_of(section) == "gold":
            if cls.feedback != "gold":  # gold by its settings: the online methods' oracle reward source
                raise ConfigError(f"{name}.reward={getattr(section, 'reward', 'gold')!r} needs the built-in world's gold reward; with data.source=hf use {name}.reward=proxy")
            usable = [m for m, other in METHODS.items() if other.feedback != "gold"]
            raise ConfigError(
                f"method {name!r} learns from or chooses by the world's gold reward (feedback='gold'); with data.source=hf there is none. "
                f"Methods that run on real data: {', '.join(usable)}"
            )
    _check_max_lengths(config, config.data.max_prompt_tokens, f"data.max_prompt_tokens={config.data.max_prompt_tokens}")


def _check_max_lengths(config, longest_prompt: int, what: str) -> None:
    """Every max_length the run (or each method compared) trains or scores with must leave the
    longest prompt (`what`) room for a response."""
    lengths = [("sft.max_length", config.sft.max_length), ("reward_model.max_length", config.reward_model.max_length)]
    for name in [config.method] if config.method else list(config.methods):
        section = method_config(dataclasses.replace(config, method=name))
        if hasattr(section, "max_length"):
            lengths.append((f"{name}.max_length", section.max_length))
    for key, value in lengths:
        if value <= longest_prompt:
            raise ConfigError(f"{key}={value} must be larger than {what}, so that the longest prompt kept leaves room for a response")


@dataclass(frozen=True)
class RunSpec:
    """One run, resolved once: its config (one method, one seed), the method's class and its
    config section, and the run's name."""

    config: Any
    method_class: type
    method_config: Any
    name: str
    seed_follows: tuple[str, ...] = ()
    """The stage seeds that took the run's seed (alignbench.seeding.STAGE_SEEDS left at None):
    the run is a full replicate in those stages. Results pool such runs over their seeds."""

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def seed(self) -> int:
        return self.config.seed


def resolve_run(config, method: str | None = None, seed: int | None = None) -> RunSpec:
    """The `RunSpec` of one run of `config` (method and seed default as in `for_run`)."""
    follows = tuple(stage_seeds_following(config))
    config = for_run(config, method, seed)
    cls = get_method(config.method)
    section = cls.config_class() if config.method in _SHARED_SECTIONS else getattr(config, config.method)
    return RunSpec(config, cls, section, run_name(config), follows)


def for_run(config, method: str | None = None, seed: int | None = None):
    """The config of one run: one method and one seed resolved, and every stage seed left at
    None set to that seed (alignbench.seeding.with_run_seed: a seed is a full replicate)."""
    method = method or config.method
    if method is None:
        if len(config.methods) != 1:
            raise ConfigError(f"experiment {config.name!r} compares {len(config.methods)} methods; choose one with method=NAME ({', '.join(config.methods)})")
        method = config.methods[0]
    get_method(method)
    seed = seed if seed is not None else (config.seed if config.seed is not None else config.seeds[0])
    return with_run_seed(dataclasses.replace(config, method=method), seed)


def method_config(config):
    """The config section of the run's method (default options where it has none)."""
    if config.method in _SHARED_SECTIONS:
        return get_method(config.method).config_class()
    return getattr(config, config.method)


def unread_overrides(overrides: Sequence[str], methods: Sequence[str]) -> list[str]:
    """The override keys that set an option of a method none of `methods` is: no run of them reads
    it (`alignbench run quickstart method=dpo ppo.clip_range=0.9`), which a user would want to know."""
    return [key for key in parse_overrides(overrides)
            if (section := key.split(".")[0]) in METHODS and section not in _SHARED_SECTIONS and section not in methods]


def run_config_dict(config) -> dict[str, Any]:
    """The resolved config of one run: shared sections plus its own method's section only."""
    data = to_dict(config)
    for name in METHODS:
        if name != config.method and name not in _SHARED_SECTIONS:
            data.pop(name, None)
    return data


def run_identity(config) -> str:
    """The hash in a run's name: of its settings that differ from the defaults (the run's method
    and seed resolved the same way), so that a release adding a field with a default keeps the
    names of finished runs. A changed default is caught where a finished run is reused: its
    recorded config must agree with today's (`finished_config_mismatch`)."""
    config = with_run_seed(config, config.seed)  # (a no-op on a config from for_run)
    defaults = flatten(run_config_dict(with_run_seed(dataclasses.replace(ExperimentConfig(), method=config.method), config.seed)))
    differs = {key: value for key, value in flatten(run_config_dict(config)).items()
               if key not in _NOT_IN_RUN_IDENTITY and key.split(".")[0] not in _NOT_IN_RUN_IDENTITY and defaults.get(key, _MISSING) != value}
    return config_hash(differs, length=8)


_MISSING = object()


def finished_config_mismatch(recorded: dict, config) -> list[str]:
    """The settings a finished run was made with (`recorded`, from its metrics.json) that differ
    from `config`'s (a default changed since): 'key: recorded -> now' each. Keys one of them lacks
    (a field added or removed since) are not compared."""
    now, then = flatten(run_config_dict(config)), flatten({k: v for k, v in recorded.items() if k != "seed_follows"})
    return [f"{key}: {then[key]!r} -> {now[key]!r}" for key in sorted(set(now) & set(then))
            if key not in _NOT_IN_RUN_IDENTITY and key.split(".")[0] not in _NOT_IN_RUN_IDENTITY and then[key] != now[key]]


def run_name(config) -> str:
    return f"{config.method}-seed{config.seed}-{run_identity(config)}"

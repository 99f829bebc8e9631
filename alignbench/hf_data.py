"""Real preference, demonstration and prompt datasets, read with `datasets` from the hub or
from local json / jsonl / parquet / csv files, and turned into the records the pipeline uses.

Every source comes down to three kinds of record:
- preference pairs {prompt, chosen, rejected} (the labels stage; human labels = pairs read),
- demonstrations {prompt, response} (the SFT stage),
- prompts (what sampling methods and the evaluation ask).

Formats (`format`, and the columns each reads; `columns` maps these names to a dataset's own):

| format | columns | example datasets |
|---|---|---|
| pairs | prompt, chosen, rejected | trl-lib/tldr-preference, HuggingFaceH4/ultrafeedback_binarized |
| dialogue | chosen, rejected: whole dialogues; the shared turns before the last assistant turn are the prompt | Anthropic/hh-rlhf, trl-lib/ultrafeedback_binarized |
| scored | prompt, completions, scores (or completions as dicts, read with completion_text / completion_score) | openbmb/UltraFeedback |
| summarization | info, summaries, choice (summaries as dicts, read with summary_text) | openai/summarize_from_feedback (comparisons) |
| prompt_response | prompt, response | instruction-tuning sets |
| messages | messages (chat messages; the last, an assistant turn, is the response) | HuggingFaceH4/ultrachat_200k |
| prompts | prompt | any prompt set |

A text column may hold a string, or chat messages ({role, content}) as conversational
datasets do; a dialogue may also be text in the hh-rlhf form ("\\n\\nHuman: …\\n\\nAssistant: …").
A multi-turn prompt becomes one prompt string in that form (`alignbench.models.render_conversation`),
which the codec turns back into chat messages for the tokenizer's chat template.

A bad row (a missing value, an empty response, a malformed dialogue) stops loading with a
ConfigError naming its row and column, unless `drop_invalid_rows` says to drop such rows.
"""

from __future__ import annotations

import functools
import hashlib
import re

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from alignbench.config import ConfigError, to_dict
from alignbench.models import render_conversation, split_dialogue
from alignbench.records import file_sha256

PREFERENCE_FORMATS = ("pairs", "dialogue", "scored", "summarization")
DEMONSTRATION_FORMATS = ("prompt_response", "messages")

# The columns each format reads (canonical name -> required), and the keys read inside
# list-of-dict columns (canonical name -> default key).
FORMAT_COLUMNS: dict[str, dict[str, bool]] = {
    "pairs": {"prompt": True, "chosen": True, "rejected": True},
    "dialogue": {"chosen": True, "rejected": True},
    "scored": {"prompt": True, "completions": True, "scores": False},
    "summarization": {"info": True, "summaries": True, "choice": True},
    "prompt_response": {"prompt": True, "response": True},
    "messages": {"messages": True},
    "prompts": {"prompt": True},
}
INNER_KEYS: dict[str, dict[str, str]] = {
    "scored": {"completion_text": "response", "completion_score": "overall_score"},
    "summarization": {"summary_text": "text"},
}
TLDR_PROMPT = "SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"
"""Stiennon et al. 2020's summarisation prompt, filled from a comparison's `info`."""

_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def check_prompt_template(template: str) -> None:
    """A summarisation prompt template is a format string of the `info` fields each row has, all
    text: one that cannot be read, or that names a field by position or formats it as a number,
    would fail on the first row after the SFT stage trained (ValueError now, naming it)."""
    import string

    fix = "fields are written {name} with a key of each row's info (e.g. {title}), a literal brace as {{ or }}"
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ValueError(f"prompt_template={template!r} cannot be read ({err}); {fix}") from None
    positional = [name for name in names if not name or name[0].isdigit()]
    if positional:
        raise ValueError(f"prompt_template={template!r} has a field without a name ({{{positional[0]}}}); {fix}")
    try:
        template.format(**{name: "text" for name in _template_fields(template)})
    except (ValueError, AttributeError, IndexError, KeyError, TypeError) as err:
        raise ValueError(f"prompt_template={template!r} cannot be filled with text ({err}); {fix}") from None


@dataclass
class DatasetSpec:
    """One dataset: where it is, how it is laid out, and how much of it to use."""

    path: str = ""
    """A hub dataset name (Anthropic/hh-rlhf), a local .json / .jsonl / .parquet / .csv file, or a
    local folder (of data files, or saved with `Dataset.save_to_disk`)."""
    format: str = "pairs"
    """How rows are laid out (see alignbench.hf_data)."""
    subset: str | None = None
    """The hub dataset's configuration name (e.g. 'comparisons' for openai/summarize_from_feedback)."""
    data_dir: str | None = None
    """A folder inside the hub dataset (e.g. 'helpful-base' for Anthropic/hh-rlhf)."""
    split: str = "train"
    """The split to read (hub datasets and saved folders; a local file is one split)."""
    columns: dict[str, str] = field(default_factory=dict)
    """The dataset's own name for each column the format reads, e.g. {prompt: instruction}."""
    limit: int | None = None
    """Use only the first this many rows (None: all)."""
    drop_invalid_rows: bool = False
    """Drop rows with a missing or empty value (counted in the stage summary) instead of stopping."""
    scored_pairs: Literal["ranking", "best_vs_worst"] = "ranking"
    """Scored completions: 'ranking' gives every pair whose scores differ (InstructGPT's K-choose-2,
    kept together per prompt); 'best_vs_worst' one pair per prompt."""
    prompt_template: str = TLDR_PROMPT
    """Summarisation: the prompt, formatted with the fields of each row's `info`."""

    def __post_init__(self):
        if not self.path:
            raise ValueError("path is required: a hub dataset name or a local data file")
        accepted = set(FORMAT_COLUMNS.get(self.format, {})) | set(INNER_KEYS.get(self.format, {}))
        for name in self.columns:
            if name not in accepted:
                raise ValueError(f"columns.{name}: the {self.format} format reads no column '{name}'; it reads {', '.join(sorted(accepted))}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit={self.limit} must be >= 1, or null for every row")
        check_prompt_template(self.prompt_template)

    def column(self, name: str) -> str:
        return self.columns.get(name, name)

    def inner_key(self, name: str) -> str:
        return self.columns.get(name, INNER_KEYS[self.format][name])


@dataclass
class PreferenceDatasetSpec(DatasetSpec):
    """A preference dataset: pairs, dialogues, scored completions or summary comparisons."""

    format: Literal["pairs", "dialogue", "scored", "summarization"] = "pairs"
    """How rows are laid out (see alignbench.hf_data)."""


@dataclass
class DemonstrationDatasetSpec(DatasetSpec):
    """Demonstrations for SFT; a preference format gives each row's preferred response."""

    format: Literal["prompt_response", "messages", "pairs", "dialogue", "scored", "summarization"] = "prompt_response"
    """How rows are laid out (see alignbench.hf_data)."""


@dataclass
class PromptDatasetSpec(DatasetSpec):
    """Prompts only; any other format gives each row's prompt."""

    format: Literal["prompts", "prompt_response", "messages", "pairs", "dialogue", "scored", "summarization"] = "prompts"
    """How rows are laid out (see alignbench.hf_data)."""


@dataclass
class DataConfig:
    """Where the data comes from: the built-in world, or real (Hugging Face) datasets."""

    source: Literal["world", "hf"] = "world"
    """'world': the built-in assistant world (gold reward known); 'hf': the datasets below, with
    model.name a Hugging Face causal LM. There is no gold reward: the evaluation judge is a
    reward model (eval.judge=reward_model), rm/* accuracy is against the dataset's labels."""
    preferences: PreferenceDatasetSpec | None = None
    """The preference pairs behind the reward models and preference methods (needed with source=hf)."""
    sft: DemonstrationDatasetSpec | None = None
    """Demonstrations for the SFT stage (None: the preferred responses of the training pairs)."""
    prompts: PromptDatasetSpec | None = None
    """Training prompts for methods that sample (None: the prompts of the training pairs)."""
    eval_prompts: PromptDatasetSpec | None = None
    """Test and validation prompts (None: the prompts held out from the preference pairs)."""
    max_prompt_tokens: int = 256
    """Prompts longer than this many tokens (chat template included) are left out of every set."""

    def __post_init__(self):
        if self.max_prompt_tokens < 1:
            raise ValueError(f"data.max_prompt_tokens={self.max_prompt_tokens} must be >= 1")
        given = self.datasets()
        if self.source == "hf" and self.preferences is None:
            raise ValueError("data.source=hf needs data.preferences: a preference dataset (data.preferences.path and data.preferences.format)")
        if self.source == "world" and given:
            raise ValueError(f"data.{next(iter(given))} is only read with data.source=hf (the world writes its own data); set data.source=hf")

    def datasets(self) -> dict[str, DatasetSpec]:
        """The datasets given, by their key under `data` (preferences, sft, prompts, eval_prompts)."""
        return {name: spec for name in ("preferences", "sft", "prompts", "eval_prompts") if (spec := getattr(self, name)) is not None}


def missing_local_path(path: str) -> bool:
    """Whether `path` names a local file or folder that does not exist: it starts with /, . or ~,
    or ends like a data file (.jsonl, ...). Checked when a config loads, so that a typo fails
    before the SFT stage trains, not after; a hub name (org/name) is left to the loader."""
    return (path.startswith(("/", ".", "~")) or Path(path).suffix in _LOCAL_BUILDERS) and not Path(path).expanduser().exists()


def dataset_key(spec: DatasetSpec) -> dict[str, Any]:
    """What a stage built from `spec` depends on: its settings and, for a local file or folder, a
    checksum of its content (`content_sha256`): a file edited in place keeps its path, and a stage
    keyed on the path alone would be reused with the old rows. A hub dataset is keyed by name."""
    key = to_dict(spec)
    path = Path(spec.path).expanduser()
    if path.is_file() or path.is_dir():
        key["content_sha256"] = _content_sha256(path.resolve())
    return key


def _content_sha256(path: Path) -> str:
    """SHA-256 over a file's bytes, or over every file of a folder (relative names and bytes)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if file != path else ''}\0".encode())
        digest.update(_file_sha256(file, stat.st_size, stat.st_mtime_ns).encode())
    return digest.hexdigest()


@functools.lru_cache(maxsize=256)
def _file_sha256(path: Path, size: int, mtime_ns: int) -> str:
    """A file's SHA-256, read once a process while its size and modification time stay (stage
    keys are computed many times a run)."""
    return file_sha256(path)


# --- loading ---------------------------------------------------------------------------
def load_rows(spec: DatasetSpec, where: str):
    """The dataset's rows (a `datasets.Dataset`), at most `spec.limit` of them."""
    import datasets

    path = Path(spec.path).expanduser()
    try:
        if path.suffix in _LOCAL_BUILDERS or path.is_file():
            if not path.is_file():
                raise ConfigError(f"{where}.path={spec.path!r}: no such file")
            builder = _LOCAL_BUILDERS.get(path.suffix)
            if builder is None:
                raise ConfigError(f"{where}.path={spec.path!r}: cannot read {path.suffix or 'a file without a suffix'}; local files may be {', '.join(_LOCAL_BUILDERS)}")
            if builder != "parquet":
                check_utf8(path, where)
                if not path.read_bytes().strip():  # the json builder's message is "StopIteration: "
                    raise ConfigError(f"{where}.path={spec.path!r}: the file is empty; it needs one row per line (or a JSON list of rows)")
            rows = datasets.load_dataset(builder, data_files=str(path), split="train")
        elif path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            rows = datasets.load_from_disk(str(path))
            if isinstance(rows, datasets.DatasetDict):
                if spec.split not in rows:
                    raise ConfigError(f"{where}.split={spec.split!r}: {spec.path} has splits {', '.join(rows)}")
                rows = rows[spec.split]
        else:
            rows = datasets.load_dataset(str(path) if path.is_dir() else spec.path, spec.subset, data_dir=spec.data_dir, split=spec.split)
    except ConfigError:
        raise
    except Exception as err:  # the hub or the builder says what is wrong; the user needs the key too
        raise ConfigError(f"{where}.path={spec.path!r}: cannot load the dataset ({type(err).__name__}: {err})") from err
    if spec.limit is not None:
        rows = rows.select(range(min(spec.limit, len(rows))))
    return rows


def check_utf8(path: Path, where: str) -> None:
    """Refuse a text data file with a line that is not UTF-8, naming the line: the json builder
    reads such a file and fails only later, on the row, with no file or row in its message."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ConfigError(
                    f"{where}.path={str(path)!r}: line {number} is not UTF-8 text (byte {err.start} of the line: "
                    f"{line[err.start:err.start + 1]!r}); save the file as UTF-8"
                ) from None


class BadValue(Exception):
    """A row's value that cannot be used: the column it is in and what is wrong."""

    def __init__(self, column: str, problem: str):
        super().__init__(problem)
        self.column, self.problem = column, problem


@dataclass
class Example:
    """What one row gives: its prompt, the response to imitate (if any), and its preference pairs."""

    prompt: str
    best: str | None = None
    pairs: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class LoadReport:
    rows: int = 0
    dropped_rows: int = 0
    rows_without_preference: int = 0

    def summary(self) -> dict[str, int]:
        return {"rows": self.rows, "dropped_rows": self.dropped_rows, "rows_without_preference": self.rows_without_preference}


def examples(spec: DatasetSpec, where: str) -> tuple[list[Example], LoadReport]:
    """Each row's `Example`, after checking the columns the format reads."""
    rows = load_rows(spec, where)
    for name, required in FORMAT_COLUMNS[spec.format].items():
        if required and spec.column(name) not in rows.column_names:
            hint = f"; map it with {where}.columns.{name}=NAME" if name not in spec.columns else ""
            raise ConfigError(
                f"{where} ({spec.path}): the dataset has no column '{spec.column(name)}', which the {spec.format} format reads "
                f"as '{name}' (its columns: {', '.join(rows.column_names)}){hint}"
            )
    extract = _EXTRACTORS[spec.format]
    report, found = LoadReport(rows=len(rows)), []
    for index, row in enumerate(rows):
        try:
            example = extract(spec, row)
        except BadValue as bad:
            if spec.drop_invalid_rows:
                report.dropped_rows += 1
                continue
            raise ConfigError(
                f"{where} ({spec.path}): row {index}, column '{spec.column(bad.column)}': {bad.problem} "
                f"(fix the row, or drop such rows with {where}.drop_invalid_rows=true)"
            ) from None
        found.append(example)
    return found, report


def preference_records(spec: DatasetSpec, where: str) -> tuple[list[dict], LoadReport]:
    """Flat pair records {prompt, chosen, rejected}; pairs of identical responses are left out."""
    found, report = examples(spec, where)
    records = []
    for example in found:
        pairs = [(c, r) for c, r in example.pairs if c != r]
        report.rows_without_preference += not pairs
        records += [{"prompt": example.prompt, "chosen": c, "rejected": r} for c, r in pairs]
    return records, report


def demonstrations(spec: DatasetSpec, where: str) -> tuple[list[dict], LoadReport]:
    """Demonstration records {prompt, response}: each row's response, or preferred response."""
    found, report = examples(spec, where)
    return [{"prompt": e.prompt, "response": e.best} for e in found if e.best is not None], report


def prompts(spec: DatasetSpec, where: str) -> list[str]:
    """The distinct prompts of the rows, in row order."""
    return list(dict.fromkeys(e.prompt for e in examples(spec, where)[0]))


def draw_prompts(pool: Sequence[str], n: int, seed: int) -> list[str]:
    """`n` prompts from `pool`, seeded: a random order of the pool, repeated (each time
    reshuffled) when `n` is larger than the pool."""
    if not pool:
        raise ConfigError("no training prompts to sample from: every prompt was held out or too long (data.max_prompt_tokens)")
    rng, drawn = np.random.default_rng(seed), []
    while len(drawn) < n:
        drawn += [pool[i] for i in rng.permutation(len(pool))]
    return drawn[:n]


# --- values ----------------------------------------------------------------------------
def _text(value: Any, column: str) -> str:
    if value is None:
        raise BadValue(column, "missing")
    if not isinstance(value, str):
        raise BadValue(column, f"must be text or chat messages, got {type(value).__name__}")
    if not value.strip():
        raise BadValue(column, "empty")
    return value.strip()


def _messages(value: Any, column: str) -> list[dict[str, str]]:
    """Chat messages, checked: a non-empty list of {role, content} with known roles and text."""
    if not isinstance(value, list) or not value:
        raise BadValue(column, "missing" if value is None else "must be a non-empty list of chat messages")
    messages = []
    for k, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise BadValue(column, f"message {k} must be {{role: system | user | assistant, content: text}}, got {message!r:.80}")
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            raise BadValue(column, f"message {k} ({message['role']}) is empty")
        messages.append({"role": message["role"], "content": content.strip()})
    return messages


def _prompt(value: Any, column: str) -> str:
    """A prompt given as text or as chat messages (ending with a user turn)."""
    if isinstance(value, list):
        messages = _messages(value, column)
        if messages[-1]["role"] != "user":
            raise BadValue(column, "the prompt's messages must end with a user turn")
        return render_conversation(messages)
    return _text(value, column)


def _response(value: Any, column: str) -> str:
    """A response given as text or as chat messages (whose last turn, an assistant's, is it)."""
    if isinstance(value, list):
        messages = _messages(value, column)
        if messages[-1]["role"] != "assistant":
            raise BadValue(column, "the last message must be the assistant's response")
        return messages[-1]["content"]
    return _text(value, column)


def _dialogue(value: Any, column: str) -> tuple[list[dict[str, str]], str]:
    """(the turns before the last assistant turn, that turn's text) of a whole dialogue."""
    if isinstance(value, str):
        turns = split_dialogue(value)
        if turns is None:
            raise BadValue(column, "is not a dialogue ('\\n\\nHuman: …\\n\\nAssistant: …') nor chat messages")
    elif value is None:
        raise BadValue(column, "missing")
    elif isinstance(value, list) and value and isinstance(value[-1], dict):
        turns = [dict(m) for m in value]
    else:
        raise BadValue(column, "must be a dialogue: text in the hh-rlhf form or a list of chat messages")
    if turns[-1].get("role") != "assistant":
        raise BadValue(column, "the dialogue must end with an assistant turn (the response)")
    if not str(turns[-1].get("content") or "").strip():
        raise BadValue(column, "empty (its last assistant turn has no text)")
    context = _messages(turns[:-1], column) if len(turns) > 1 else []
    if not context or context[-1]["role"] != "user":
        raise BadValue(column, "the turns before the response must end with a user turn")
    return context, str(turns[-1]["content"]).strip()


# --- one extractor per format ------------------------------------------------------------
def _pairs_row(spec: DatasetSpec, row: dict) -> Example:
    prompt = _prompt(row.get(spec.column("prompt")), "prompt")
    chosen = _response(row.get(spec.column("chosen")), "chosen")
    rejected = _response(row.get(spec.column("rejected")), "rejected")
    return Example(prompt, chosen, [(chosen, rejected)])


def _dialogue_row(spec: DatasetSpec, row: dict) -> Example:
    context, chosen = _dialogue(row.get(spec.column("chosen")), "chosen")
    rejected_context, rejected = _dialogue(row.get(spec.column("rejected")), "rejected")
    if rejected_context != context:
        raise BadValue("rejected", "its turns before the response differ from those of 'chosen' (the two must share the prompt)")
    return Example(render_conversation(context), chosen, [(chosen, rejected)])


def _scored_row(spec: DatasetSpec, row: dict) -> Example:
    prompt = _prompt(row.get(spec.column("prompt")), "prompt")
    completions = row.get(spec.column("completions"))
    if not isinstance(completions, list) or not completions:
        raise BadValue("completions", "missing" if completions is None else "must be a non-empty list")
    if isinstance(completions[0], dict):
        text_key, score_key = spec.inner_key("completion_text"), spec.inner_key("completion_score")
        texts = [_text(c.get(text_key) if isinstance(c, dict) else None, "completions") for c in completions]
        scores = [c.get(score_key) if isinstance(c, dict) else None for c in completions]
    else:
        texts = [_text(c, "completions") for c in completions]
        scores = row.get(spec.column("scores"))
        if not isinstance(scores, list) or len(scores) != len(texts):
            raise BadValue("scores", f"must be a list of one number per completion ({len(texts)}), got {scores!r:.80}")
    for k, score in enumerate(scores):
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not np.isfinite(score):
            raise BadValue("completions" if isinstance(completions[0], dict) else "scores", f"completion {k} has no numeric score (got {score!r})")
    best_score: dict[str, float] = {}
    for text, score in zip(texts, scores):  # a completion that appears twice counts once, at its best score
        best_score[text] = max(score, best_score.get(text, -np.inf))
    ranked = sorted(best_score, key=lambda t: -best_score[t])
    if spec.scored_pairs == "best_vs_worst":
        pairs = [(ranked[0], ranked[-1])] if best_score[ranked[0]] > best_score[ranked[-1]] else []
    else:
        pairs = [(a, b) for i, a in enumerate(ranked) for b in ranked[i + 1 :] if best_score[a] > best_score[b]]
    return Example(prompt, ranked[0], pairs)


def _summarization_row(spec: DatasetSpec, row: dict) -> Example:
    info = row.get(spec.column("info"))
    if not isinstance(info, dict):
        raise BadValue("info", "missing" if info is None else "must be a mapping of the post's fields")
    for name in _template_fields(spec.prompt_template):
        if info.get(name) is None:
            raise BadValue("info", f"'{name}' is missing (the prompt template reads it; info has {', '.join(info)})")
    prompt = spec.prompt_template.format(**info).strip()
    summaries = row.get(spec.column("summaries"))
    if not isinstance(summaries, list) or len(summaries) < 2:
        raise BadValue("summaries", "missing" if summaries is None else "must list at least two summaries")
    text_key = spec.inner_key("summary_text")
    texts = [_text(s.get(text_key) if isinstance(s, dict) else s, "summaries") for s in summaries]
    choice = row.get(spec.column("choice"))
    if isinstance(choice, bool) or not isinstance(choice, int) or not 0 <= choice < len(texts):
        raise BadValue("choice", f"must be the index of the preferred summary (0..{len(texts) - 1}), got {choice!r}")
    chosen = texts[choice]
    return Example(prompt, chosen, [(chosen, t) for k, t in enumerate(texts) if k != choice])


def _prompt_response_row(spec: DatasetSpec, row: dict) -> Example:
    prompt = _prompt(row.get(spec.column("prompt")), "prompt")
    return Example(prompt, _response(row.get(spec.column("response")), "response"))


def _messages_row(spec: DatasetSpec, row: dict) -> Example:
    context, response = _dialogue(row.get(spec.column("messages")), "messages")
    return Example(render_conversation(context), response)


def _prompts_row(spec: DatasetSpec, row: dict) -> Example:
    return Example(_prompt(row.get(spec.column("prompt")), "prompt"))


def _template_fields(template: str) -> list[str]:
    """The info fields a template reads: {title}, and {post.title} or {post[0]} read `post`."""
    import string

    return [re.split(r"[.\[]", name, maxsplit=1)[0] for _, name, _, _ in string.Formatter().parse(template) if name]


_EXTRACTORS: dict[str, Callable[[DatasetSpec, dict], Example]] = {
    "pairs": _pairs_row, "dialogue": _dialogue_row, "scored": _scored_row, "summarization": _summarization_row,
    "prompt_response": _prompt_response_row, "messages": _messages_row, "prompts": _prompts_row,
}

"""Real models and real preference datasets, offline: a tiny Llama and a word-level tokenizer
with a chat template, built and saved here, and tiny dataset files in every supported format,
run through `alignbench run` with the shipped real-data example and local paths as overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignbench.cli import main

FRUITS = ["apple", "pear", "plum", "fig", "lime", "kiwi"]
THINGS = ["fruit", "color", "animal", "tool", "city", "drink", "flower", "metal", "planet", "sport", "tree", "bird"]
ANSWERS = {"fruit": "apple", "color": "red", "animal": "cat", "tool": "hammer", "city": "paris", "drink": "tea",
           "flower": "rose", "metal": "iron", "planet": "mars", "sport": "golf", "tree": "oak", "bird": "owl"}
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _prompts() -> list[str]:
    return [f"{verb} a {thing}" for verb in ("name", "please name") for thing in THINGS]  # 24 distinct prompts


def _dialogue_rows() -> list[dict]:
    rows = []
    for i, prompt in enumerate(_prompts()):
        thing = prompt.split()[-1]
        context = f"\n\nHuman: hello\n\nAssistant: hello there\n\nHuman: {prompt}" if i % 3 == 0 else f"\n\nHuman: {prompt}"
        rows.append({"chosen": f"{context}\n\nAssistant: a good {thing} is {ANSWERS[thing]}", "rejected": f"{context}\n\nAssistant: no"})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _vocabulary(texts: list[str]) -> list[str]:
    words = {w for text in texts for w in text.split()}
    return sorted(words | {"<user>", "<assistant>", "<system>", "SUBREDDIT:", "TITLE:", "POST:", "TL;DR:"})


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict[str, Path]:
    """A saved tiny causal LM + tokenizer (with a chat template) and one data file per format."""
    from datasets import Dataset
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("real")
    files = {}
    files["dialogue"] = _write_jsonl(root / "hh.jsonl", _dialogue_rows())
    # trl / H4 conversational pairs: the prompt as text, the responses as chat messages, in a .json file.
    pairs = [{"question": p, "chosen": [{"role": "user", "content": p}, {"role": "assistant", "content": f"the {p.split()[-1]} {ANSWERS[p.split()[-1]]}"}],
              "rejected": [{"role": "user", "content": p}, {"role": "assistant", "content": "i do not know"}]} for p in _prompts()]
    files["pairs"] = root / "pairs.json"
    files["pairs"].write_text(json.dumps(pairs))
    scored = [{"prompt": p, "completions": [ANSWERS[p.split()[-1]], "no", f"maybe {FRUITS[i % 6]}"], "scores": [9.0, 1.0, 5.0]} for i, p in enumerate(_prompts())]
    files["scored"] = root / "scored.parquet"
    Dataset.from_list(scored).to_parquet(str(files["scored"]))
    files["summarization"] = _write_jsonl(root / "tldr.jsonl", [
        {"info": {"subreddit": "cats", "title": f"my {t}", "post": f"i have a {t}"}, "summaries": [{"text": f"a {t}"}, {"text": "nothing"}], "choice": i % 2}
        for i, t in enumerate(THINGS * 2)
    ])
    files["messages"] = _write_jsonl(root / "sft.jsonl", [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": f"a good {p.split()[-1]} is {ANSWERS[p.split()[-1]]}"}]} for p in _prompts()
    ])
    files["prompts"] = _write_jsonl(root / "prompts.jsonl", [{"prompt": f"tell me a {t}"} for t in THINGS])

    texts = [json.dumps(json.loads(line)) for f in files.values() if f.suffix == ".jsonl" for line in f.read_text().splitlines()]
    texts += [json.dumps(pairs), json.dumps(scored)]
    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", "<bos>", "<eos>"])}
    for word in _vocabulary([t.replace('"', " ").replace("\\n", " ") for t in texts]):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="\x00", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")
    tokenizer.chat_template = TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    files["model"] = root / "tiny-chat-llama"
    LlamaForCausalLM(config).save_pretrained(files["model"])
    tokenizer.save_pretrained(files["model"])
    return files


def _run_args(real: dict[str, Path], out: Path, *overrides: str) -> list[str]:
    """`alignbench run real_hh_rlhf` on the tiny model and local files, sized for a CPU test."""
    return [
        "run", "real_hh_rlhf", "--out", str(out),
        f"model.name={real['model']}", f"data.preferences.path={real['dialogue']}", "data.preferences.data_dir=null",
        "data.eval_prompts=null", f"data.sft.path={real['messages']}", "data.sft.format=messages", "data.max_prompt_tokens=24",
        "model.gradient_checkpointing=false", "model.lora.enabled=false",
        "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.progress_bar=false", "trainer.log_every_n_steps=1",
        "tracking.wandb=disabled",
        "sft.batch_size=8", "sft.max_length=40", "sft.optim.lr=3e-3",
        "reward_model.batch_size=4", "reward_model.max_length=40", "reward_model.holdout_fraction=0.3", "reward_model.optim.lr=1e-3",
        "eval.n_test_prompts=6", "eval.n_val_prompts=1", "eval.max_new_tokens=5", "eval.bootstrap_samples=50", "eval.batch_size=16",
        "dpo.batch_size=4", "dpo.max_length=40", "dpo.kl_every=2", "dpo.kl_prompts=4",
        "ppo.iterations=2", "ppo.batch_size=4", "ppo.minibatch_size=2", "ppo.max_length=40", "ppo.kl_prompts=4",
        "best_of_n.n=2",
        *overrides,
    ]


def _result(out: Path, method: str) -> dict:
    found = [json.loads(p.read_text()) for p in (out / "real_hh_rlhf").glob("*/metrics.json")]
    return next(r for r in found if r["method"] == method)


# --- datasets: every format, hand-checked ----------------------------------------------
def test_each_format_gives_the_pairs_demonstrations_and_prompts_it_holds(real):
    from alignbench.experiment import load_experiment
    from alignbench.hf_data import demonstrations, preference_records, prompts

    def spec(name: str, path: Path, fmt: str, *extra: str):
        config = load_experiment("real_hh_rlhf", [f"data.{name}.path={path}", f"data.{name}.format={fmt}", "data.eval_prompts=null", *extra])
        return getattr(config.data, name)

    dialogue, report = preference_records(spec("preferences", real["dialogue"], "dialogue", "data.preferences.data_dir=null"), "data.preferences")
    assert report.rows == 24 and len(dialogue) == 24
    # the shared turns before the last assistant turn are the prompt, in the hh-rlhf form when multi-turn
    assert dialogue[0] == {"prompt": "Human: hello\n\nAssistant: hello there\n\nHuman: name a fruit", "chosen": "a good fruit is apple", "rejected": "no"}
    assert dialogue[1] == {"prompt": "name a color", "chosen": "a good color is red", "rejected": "no"}

    pairs, _ = preference_records(spec("preferences", real["pairs"], "pairs", "data.preferences.columns.prompt=question"), "data.preferences")
    assert pairs[0] == {"prompt": "name a fruit", "chosen": "the fruit apple", "rejected": "i do not know"}

    ranking, _ = preference_records(spec("preferences", real["scored"], "scored"), "data.preferences")
    assert ranking[:3] == [  # scores 9, 1, 5: every pair whose scores differ, better first
        {"prompt": "name a fruit", "chosen": "apple", "rejected": "maybe apple"},
        {"prompt": "name a fruit", "chosen": "apple", "rejected": "no"},
        {"prompt": "name a fruit", "chosen": "maybe apple", "rejected": "no"},
    ]
    assert len(ranking) == 72
    best_worst, _ = preference_records(spec("preferences", real["scored"], "scored", "data.preferences.scored_pairs=best_vs_worst"), "data.preferences")
    assert best_worst[0] == {"prompt": "name a fruit", "chosen": "apple", "rejected": "no"} and len(best_worst) == 24

    tldr, _ = preference_records(spec("preferences", real["summarization"], "summarization"), "data.preferences")
    assert tldr[0] == {"prompt": "SUBREDDIT: r/cats\nTITLE: my fruit\nPOST: i have a fruit\nTL;DR:", "chosen": "a fruit", "rejected": "nothing"}
    assert tldr[1]["chosen"] == "nothing" and tldr[1]["rejected"] == "a color"  # choice 1

    demos, _ = demonstrations(spec("sft", real["messages"], "messages"), "data.sft")
    assert demos[0] == {"prompt": "name a fruit", "response": "a good fruit is apple"} and len(demos) == 24
    best, _ = demonstrations(spec("sft", real["scored"], "scored"), "data.sft")  # a preference format: the best response
    assert best[0] == {"prompt": "name a fruit", "response": "apple"}
    assert prompts(spec("prompts", real["prompts"], "prompts"), "data.prompts")[:2] == ["tell me a fruit", "tell me a color"]


def test_multi_turn_prompts_go_through_the_chat_template_as_messages(real):
    from alignbench.models import TextCodec, conversation_messages, load_tokenizer, render_conversation

    tokenizer = load_tokenizer(str(real["model"]))
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "name a fruit"}]
    prompt = render_conversation(messages)
    assert conversation_messages(prompt) == messages
    ids = TextCodec(tokenizer).encode_prompt(prompt)
    assert tokenizer.convert_ids_to_tokens(ids) == "<bos> <user> hello <assistant> hello there <user> name a fruit <assistant>".split()
    assert conversation_messages("name a fruit") == [{"role": "user", "content": "name a fruit"}]


# --- bad input: exit code 2, the row and the column named --------------------------------
@pytest.mark.parametrize("bad_row, column, what", [
    ({"chosen": "\n\nHuman: name a fig\n\nAssistant: a fig"}, "rejected", "missing"),
    ({"chosen": "\n\nHuman: name a fig\n\nAssistant: a fig", "rejected": "\n\nHuman: name a fig\n\nAssistant:"}, "rejected", "empty"),
    ({"chosen": "\n\nHuman: name a fig\n\nAssistant:   ", "rejected": "\n\nHuman: name a fig\n\nAssistant: no"}, "chosen", "empty"),
])
def test_a_bad_row_fails_naming_its_row_and_column(real, tmp_path, capsys, bad_row, column, what):
    rows = _dialogue_rows()
    rows.insert(3, bad_row)
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    args = _run_args(real, tmp_path / "runs", f"data.preferences.path={path}", "method=dpo")
    assert main([*args, "data.preferences.drop_invalid_rows=false"]) == 2
    err = capsys.readouterr().err
    assert f"row 3, column '{column}'" in err and what in err and "data.preferences" in err, err
    assert not list((tmp_path / "runs").glob("real_hh_rlhf/*/metrics.json"))
    # The shipped example drops such rows instead (hh-rlhf has a few), and counts them.
    from alignbench.experiment import load_experiment
    from alignbench.pipeline import Pipeline

    _, summary = Pipeline(load_experiment(args[1], args[4:]), tmp_path / "runs").labels()
    assert summary["dropped_rows"] == 1 and summary["rows"] == 25


def test_a_row_that_is_not_utf8_fails_naming_its_line(real, tmp_path, capsys):
    path = _write_jsonl(tmp_path / "latin1.jsonl", _dialogue_rows())
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"Assistant", "Assist\u00e4nt".encode("latin-1"), 1)
    path.write_bytes(b"\n".join(lines))
    assert main(_run_args(real, tmp_path / "runs", f"data.preferences.path={path}", "method=dpo")) == 2
    err = capsys.readouterr().err
    assert f"data.preferences.path='{path}': line 3 is not UTF-8 text" in err and "save the file as UTF-8" in err, err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("metrics.json"))


def test_an_empty_data_file_fails_naming_it(real, tmp_path, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    assert main(_run_args(real, tmp_path / "runs", f"data.preferences.path={path}", "method=dpo")) == 2
    assert f"data.preferences.path={str(path)!r}: the file is empty" in capsys.readouterr().err


def test_a_missing_column_fails_naming_it(real, tmp_path, capsys):
    path = _write_jsonl(tmp_path / "no_rejected.jsonl", [{"chosen": r["chosen"]} for r in _dialogue_rows()])
    assert main(_run_args(real, tmp_path / "runs", f"data.preferences.path={path}", "method=dpo")) == 2
    err = capsys.readouterr().err
    assert "no column 'rejected'" in err and "data.preferences.columns.rejected" in err, err


@pytest.mark.parametrize("key", ["model.name", "data.preferences.path", "data.sft.path"])
def test_a_local_path_that_does_not_exist_fails_before_anything_is_built(real, tmp_path, capsys, key):
    missing = tmp_path / "typo" / ("model" if key == "model.name" else "rows.jsonl")
    assert main(_run_args(real, tmp_path / "runs", f"{key}={missing}", "method=dpo")) == 2
    assert f"{key}={str(missing)!r}: there is no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # refused as the config loads: no SFT stage trained first
    relative = "data/typo.jsonl"  # a relative data file is checked too; a hub name (org/name) is not
    assert main(_run_args(real, tmp_path / "runs", f"data.preferences.path={relative}", "method=dpo")) == 2
    assert f"data.preferences.path={relative!r}: there is no such file or folder" in capsys.readouterr().err


@pytest.mark.parametrize("template, problem", [
    ("{title", "cannot be read (expected '}' before end of string)"),
    ("{title:>5d} {post}", "cannot be filled with text (Unknown format code 'd'"),
    ("{0} {title}", "has a field without a name ({0})"),
])
def test_a_summarisation_prompt_template_that_cannot_work_is_refused_as_the_config_loads(real, tmp_path, capsys, template, problem):
    """Once found only on the first row, after the SFT stage had trained (and '{0}' blamed on the row)."""
    args = _run_args(real, tmp_path / "runs", "data.preferences.format=summarization", f"data.preferences.prompt_template={template!r}", "method=dpo")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"data.preferences" in err and f"prompt_template={template!r} {problem}" in err and "fields are written {name}" in err, err
    assert not (tmp_path / "runs").exists()


def test_what_needs_the_world_fails_with_a_config_error(real, tmp_path, capsys):
    assert main(_run_args(real, tmp_path, "method=best_of_n_gold")) == 2
    assert "best_of_n_gold" in capsys.readouterr().err
    assert main(_run_args(real, tmp_path, "method=ppo", "ppo.reward=gold")) == 2
    assert "ppo.reward='gold'" in capsys.readouterr().err
    assert main(_run_args(real, tmp_path, "method=hir", "hir.max_length=40")) == 2
    assert "hir" in capsys.readouterr().err
    assert main(_run_args(real, tmp_path, "method=dpo", "eval.judge=gold")) == 2
    assert "eval.judge='gold'" in capsys.readouterr().err
    assert main(_run_args(real, tmp_path, "method=dpo", "trainer.precision=bf16-mixed")) == 2
    assert "32-true" in capsys.readouterr().err
    assert main(_run_args(real, tmp_path, "method=dpo", "dpo.max_length=20")) == 2
    assert "dpo.max_length=20" in capsys.readouterr().err


# --- SFT -> RM -> methods -> evaluation, through `alignbench run` -------------------------
def test_sft_rm_dpo_and_ppo_run_on_a_real_model_and_dataset(real, tmp_path):
    out = tmp_path / "runs"
    for method in ("sft", "dpo", "ppo"):
        assert main(_run_args(real, out, f"method={method}")) == 0
    sft, dpo, ppo = (_result(out, m) for m in ("sft", "dpo", "ppo"))
    for result in (sft, dpo, ppo):
        m = result["metrics"]
        assert not any("gold" in key for key in m)  # no gold reward on real data
        assert 0 <= m["eval/win_rate_ci_low"] <= m["eval/win_rate"] <= m["eval/win_rate_ci_high"] <= 1
        assert 0 < m["eval/proxy_reward"] < 1 and m["eval/length"] > 0
        # 24 prompts, 30% held out: the RM is checked on the 7 held-out pairs against the dataset's labels
        assert m["rm/holdout_pairs"] == 7 and 0 <= m["rm/helpfulness_accuracy"] <= 1
        assert m["rm/accuracy"] == m["rm/helpfulness_accuracy"] and "rm/safety_accuracy" not in m
        samples = [json.loads(line) for line in (out / "real_hh_rlhf" / result["run_name"] / "samples.jsonl").read_text().splitlines()]
        assert len(samples) == 6 and "proxy_reward" in samples[0] and "gold_reward" not in samples[0]
    assert abs(sft["metrics"]["eval/kl"]) < 1e-4  # the SFT baseline is its own reference
    assert sft["metrics"]["budget/human_labels"] == 0
    assert dpo["metrics"]["budget/human_labels"] == 17  # the 17 training pairs read (human labels)
    assert ppo["metrics"]["budget/human_labels"] == 17 and ppo["metrics"]["budget/policy_samples"] == 8  # 2 iterations x 4
    for result in (dpo, ppo):
        history = [json.loads(line) for line in (out / "real_hh_rlhf" / result["run_name"] / "history.jsonl").read_text().splitlines()]
        losses = [row["train/loss"] for row in history if "train/loss" in row]
        assert losses and all(loss == loss for loss in losses)
    stages = {p.name.split("-")[0]: json.loads((p / "stage.json").read_text()) for p in (out / "cache").glob("*-*") if (p / "stage.json").exists()}
    assert stages["sft"]["demonstrations"] == 24 and stages["sft"]["sft_data/rows"] == 24
    assert stages["labels"]["human_labels"] == 17 and stages["labels"]["holdout_prompts"] == 7


def test_lora_trains_adapters_and_the_reference_is_the_base_model(real, tmp_path):
    from peft import PeftModel

    from alignbench.experiment import load_experiment
    from alignbench.generation import sample
    from alignbench.logprobs import pack_sequences, sequence_logprobs
    from alignbench.models import freeze, load_pretrained_policy
    from alignbench.pipeline import Pipeline

    out = tmp_path / "runs"
    lora = ["model.lora.enabled=true", "model.lora.r=4", "model.gradient_checkpointing=true", "ppo.value_init=policy"]
    for method in ("dpo", "ppo"):
        args = _run_args(real, out, f"method={method}", *lora)
        assert main(args) == 0
        assert _result(out, method)["metrics"]["eval/kl"] != 0.0  # the adapters moved the policy off its reference
    sft_dir = next((out / "cache").glob("sft-*")) / "policy"
    assert not (sft_dir / "adapter_config.json").exists()  # SFT's adapters are merged into the SFT policy

    context = Pipeline(load_experiment(args[1], args[4:]), out).context(0)
    assert context.world is None and context.gold_judge is None
    policy = context.load_policy()
    assert isinstance(policy, PeftModel)
    assert all("lora_" in name for name, p in policy.named_parameters() if p.requires_grad)
    # The reference owns no weights of its own: it is the policy with its adapters disabled.
    assert {id(p) for p in context.reference.parameters()} == {id(p) for p in policy.parameters()}
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # trained adapters
    base = freeze(load_pretrained_policy(str(sft_dir)))
    prompts = context.sample_train_prompts(4, seed=1)
    batch = pack_sequences(context.codec.encode_prompts(prompts), context.codec.encode_responses(["a good fruit is apple"] * 4), context.codec.pad_token_id)
    reference_logps, base_logps = sequence_logprobs(context.reference, batch)[0], sequence_logprobs(base, batch)[0]
    assert torch.allclose(reference_logps, base_logps, atol=1e-6)
    assert not torch.allclose(sequence_logprobs(policy, batch)[0], base_logps, atol=1e-3)
    assert policy.training and all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)
    # and it samples what the base model samples
    ids = context.codec.encode_prompts(prompts)
    kwargs = {"max_new_tokens": 5, "eos_token_id": context.codec.eos_token_id, "pad_token_id": context.codec.pad_token_id}
    assert sample(context.reference, ids, generator=torch.Generator().manual_seed(3), **kwargs).response_ids == \
        sample(base, ids, generator=torch.Generator().manual_seed(3), **kwargs).response_ids

    # Training prompts for sampling methods: seeded, from the training pool, never an evaluation prompt.
    drawn = context.sample_train_prompts(50, seed=2)
    assert drawn == context.sample_train_prompts(50, seed=2) and len(drawn) == 50
    assert set(drawn) <= set(context.train_prompts)
    assert not set(drawn) & {p for split in context.evaluator.prompts.values() for p in split}


@pytest.mark.parametrize("fmt, extra", [
    ("pairs", ["data.preferences.columns.prompt=question"]),
    ("scored", ["data.preferences.scored_pairs=best_vs_worst"]),
    ("summarization", ["data.max_prompt_tokens=32", "sft.max_length=48", "reward_model.max_length=48", "dpo.max_length=48"]),
])
def test_dpo_trains_on_every_preference_format(real, tmp_path, fmt, extra):
    # No SFT dataset: the SFT stage trains on the preferred responses of the training pairs.
    args = _run_args(real, tmp_path, "method=dpo", f"data.preferences.path={real[fmt]}", f"data.preferences.format={fmt}", "data.sft=null", *extra)
    assert main(args) == 0
    m = _result(tmp_path, "dpo")["metrics"]
    assert m["budget/human_labels"] > 0 and 0 <= m["eval/win_rate"] <= 1
    sft_stage = json.loads((next((tmp_path / "cache").glob("sft-*")) / "stage.json").read_text())
    assert sft_stage["sft_data/preferred_responses"] == sft_stage["demonstrations"] > 0


def test_a_sequence_classification_reward_model_loads_in_transformers(real, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from alignbench.experiment import load_experiment
    from alignbench.models import RewardModel, TextCodec, load_tokenizer
    from alignbench.pipeline import Pipeline
    from alignbench.reward import score_texts

    args = _run_args(real, tmp_path, "method=sft", "reward_model.architecture=sequence_classification", "reward_model.likelihood=none")
    rm_dir, summary = Pipeline(load_experiment(args[1], args[4:]), tmp_path).reward_models()
    assert 0 <= summary["rm/helpfulness_accuracy"] <= 1
    classifier = AutoModelForSequenceClassification.from_pretrained(rm_dir / "helpfulness" / "classifier").eval()
    reward_model = RewardModel.load(rm_dir / "helpfulness").eval()
    assert reward_model.architecture == "sequence_classification"
    codec = TextCodec(load_tokenizer(str(real["model"])))
    for prompt, response in [("name a fruit", "a good fruit is apple"), ("name a city", "no")]:
        ids = torch.tensor([codec.encode_prompt(prompt) + codec.encode_responses([response])[0]])
        with torch.no_grad():
            expected = classifier(input_ids=ids).logits[0, 0]
        assert score_texts(reward_model, codec, [prompt], [response], max_length=512)[0] == pytest.approx(float(expected), abs=1e-5)


@pytest.fixture(scope="module")
def shared_runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shared-runs")


@pytest.mark.parametrize("method", ["best_of_n", "cpl", "cpl_kl", "rejection_sampling", "rest"])
def test_methods_that_sample_or_need_no_reference_run_without_a_world(real, shared_runs, method):
    sizes = [f"{method}.{key}" for key in ("max_length=40", "kl_prompts=4", "kl_every=2")] if method != "best_of_n" else []
    if method in ("rejection_sampling", "rest"):
        sizes += [f"{method}.prompts_per_round=8", f"{method}.samples_per_prompt=2", f"{method}.rounds=1", f"{method}.batch_size=4"]
    assert main(_run_args(real, shared_runs, f"method={method}", *sizes)) == 0
    m = _result(shared_runs, method)["metrics"]
    assert 0 <= m["eval/win_rate"] <= 1 and "eval/gold_reward" not in m
    if method in ("rejection_sampling", "rest", "best_of_n"):
        assert m["budget/policy_samples"] > 0 and m["budget/human_labels"] == 17  # scored by the reward model


def test_saved_datasets_and_their_splits_load_too(real, tmp_path):
    from datasets import Dataset, DatasetDict

    from alignbench.config import ConfigError
    from alignbench.hf_data import PromptDatasetSpec, prompts

    rows = [{"prompt": f"name a {t}"} for t in THINGS]
    DatasetDict({"train": Dataset.from_list(rows[:8]), "test": Dataset.from_list(rows[8:])}).save_to_disk(str(tmp_path / "saved"))
    assert prompts(PromptDatasetSpec(path=str(tmp_path / "saved"), split="test"), "data.eval_prompts") == [r["prompt"] for r in rows[8:]]
    assert prompts(PromptDatasetSpec(path=str(tmp_path / "saved"), limit=3), "data.prompts") == [r["prompt"] for r in rows[:3]]
    with pytest.raises(ConfigError, match="split='validation'.*train, test"):
        prompts(PromptDatasetSpec(path=str(tmp_path / "saved"), split="validation"), "data.eval_prompts")
    with pytest.raises(ConfigError, match="no such file"):
        prompts(PromptDatasetSpec(path=str(tmp_path / "absent.jsonl")), "data.prompts")


def test_a_local_data_file_edited_in_place_gives_its_stages_new_keys(real, tmp_path):
    """The stages built from a local file are keyed by its content, not only its path: an edited
    file (chosen and rejected swapped, say) must not reuse the labels and reward models of the old
    rows. A hub dataset is keyed by its name and settings alone."""
    import shutil

    from alignbench.experiment import load_experiment
    from alignbench.hf_data import PreferenceDatasetSpec, dataset_key
    from alignbench.pipeline import Pipeline

    data = tmp_path / "hh.jsonl"
    shutil.copy(real["dialogue"], data)
    args = [a for a in _run_args(real, tmp_path / "runs") if "=" in a and not a.startswith("--")]
    keys = lambda: Pipeline(load_experiment("real_hh_rlhf", [*args, f"data.preferences.path={data}"]), tmp_path / "runs").labels_key()  # noqa: E731
    before = keys()
    assert keys() == before  # the same file, read again
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_text("".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n" for r in rows))
    assert keys() != before
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "part.jsonl").write_text("{}")
    folder = dataset_key(PreferenceDatasetSpec(path=str(saved)))
    (saved / "part.jsonl").write_text("{} ")
    assert dataset_key(PreferenceDatasetSpec(path=str(saved)))["content_sha256"] != folder["content_sha256"]
    assert "content_sha256" not in dataset_key(PreferenceDatasetSpec(path="Anthropic/hh-rlhf"))


def test_rlaif_reward_model_honours_sequence_classification_and_lora(real, tmp_path):
    """RLAIF's own reward model is trained by the one reward-model fit, so it is the architecture
    and the adapters the config asks for: a transformers sequence classifier, whose LoRA adapters
    (merged at the end) leave the SFT embeddings as they were and move the adapted layers."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from alignbench.models import RewardModel

    out = tmp_path / "runs"
    args = _run_args(
        real, out, "method=rlaif", "reward_model.architecture=sequence_classification", "reward_model.likelihood=none",
        "model.lora.enabled=true", "model.lora.r=4", f"ai_labeler.model={real['model']}", "ai_labeler.principles=[good]",
        "ai_labeler.answer_words=[apple,red]", "rlaif.n_labels=8", "rlaif.iterations=1", "rlaif.batch_size=4", "rlaif.minibatch_size=2",
        "rlaif.max_length=40", "rlaif.kl_prompts=4", "rlaif.kl_every=0", "rlaif.value_init=policy",
    )
    assert main(args) == 0
    m = _result(out, "rlaif")["metrics"]
    assert m["budget/ai_labels"] == 8 and m["budget/human_labels"] == 0
    rm_dir = next((out / "cache").glob("ai_reward_model-*")) / "reward_model"
    reward_model = RewardModel.load(rm_dir)
    assert reward_model.architecture == "sequence_classification"
    AutoModelForSequenceClassification.from_pretrained(rm_dir / "classifier")  # loads in transformers as it is
    assert not any("lora_" in name for name, _ in reward_model.named_parameters())  # the adapters are merged
    sft = load_file(next((out / "cache").glob("sft-*")) / "policy" / "model.safetensors")
    trained = dict(reward_model.backbone.named_parameters())
    assert torch.equal(trained["embed_tokens.weight"], sft["model.embed_tokens.weight"])  # LoRA trains no embedding
    assert not torch.equal(trained["layers.0.self_attn.q_proj.weight"], sft["model.layers.0.self_attn.q_proj.weight"])

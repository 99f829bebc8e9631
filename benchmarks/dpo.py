"""DPO training: alignbench's `dpo` against TRL's `DPOTrainer`, in optimizer steps per second.

Same tiny world model (same initial weights), same preference pairs, same pairs per step, same
token sequences (checked: TRL's tokenization of each prompt and response equals alignbench's),
same maximum length, fp32 on CPU, AdamW with gradient clipping 1.0, β = 0.1, with and without
precomputed reference log-probs. TRL 1.x defaults to bf16 and gradient checkpointing; both are
switched off (half precision on CPU is many times slower; checkpointing recomputes the forward).
Neither side logs to an experiment tracker; alignbench keeps its local history file (as in every
run) and runs without its periodic KL estimate (`kl_every=0`: TRL has none).

Two data shapes: one pair per prompt (each response in one pair: the training loops alone), and
the quickstart's rankings of 4 responses (all 6 pairs of a prompt in the same step, as InstructGPT
batches them): there alignbench scores each distinct response once (4 sequences for 6 pairs)
where TRL scores both sides of every pair (12). alignbench runs twice: as configured by default,
a prompt's responses in one row with the prompt once (`share_prompts`), and one row per response.

Steps per second are timed from the end of the warm-up steps to the last step (data loading,
forward, backward, optimizer and logging included; tokenization and the reference precomputation
are reported apart, as setup seconds).

Needs TRL: `pip install -e ".[bench]"`, then

    python -m benchmarks.dpo [--quick] [--steps 40] [--prompts-per-step 8]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    World,
    add_common_arguments,
    machine_line,
    print_table,
    setup,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--warmup-steps", type=int, default=5, help="first steps left out of the timing")
    parser.add_argument("--prompts-per-step", type=int, default=8, help="prompts per step (the quickstart's dpo.batch_size)")
    parser.add_argument("--max-length", type=int, default=48, help="longest prompt + response (alignbench's default)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup_steps, args.prompts_per_step = 6, 2, 4
    repeats = args.repeats or (1 if args.quick else 3)
    setup(args)
    try:
        import trl
    except ImportError:
        raise SystemExit('TRL is not installed: pip install -e ".[bench]"') from None

    world = World.build(args.model)
    initial = world.policy(seed=0).state_dict()
    print(f"## DPO training: {args.model}, {args.prompts_per_step} prompts per step, max length {args.max_length}, "
          f"{args.steps} steps ({args.warmup_steps} warm-up), median of {repeats} interleaved repeats; TRL {trl.__version__}")
    print(machine_line())
    print()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for responses_per_prompt in (2, 4):
            records = preference_records(world, args.steps * args.prompts_per_step, responses_per_prompt)
            pairs_per_step = args.prompts_per_step * responses_per_prompt * (responses_per_prompt - 1) // 2
            shape = "1 pair per prompt" if responses_per_prompt == 2 else f"rankings of {responses_per_prompt} ({pairs_per_step // args.prompts_per_step} pairs per prompt)"
            for precompute in (True, False):
                runs = {"TRL DPOTrainer": [], "alignbench dpo": [], "alignbench dpo, one row per response": []}
                for _ in range(repeats):
                    runs["TRL DPOTrainer"].append(trl_run(world, initial, records, args, pairs_per_step, precompute, Path(scratch)))
                    runs["alignbench dpo"].append(alignbench_run(world, initial, records, args, precompute, Path(scratch), share_prompts=True))
                    runs["alignbench dpo, one row per response"].append(alignbench_run(world, initial, records, args, precompute, Path(scratch), share_prompts=False))
                medians = {name: _median(results) for name, results in runs.items()}
                baseline = medians["TRL DPOTrainer"]["steps_per_s"]
                for name, m in medians.items():
                    rows.append([
                        shape, "precomputed" if precompute else "on the fly", name, pairs_per_step, m["sequences"],
                        m["setup_s"], m["steps_per_s"], m["steps_per_s"] / baseline,
                    ])
    print_table(["data", "reference log-probs", "trainer", "pairs / step", "sequences / step", "setup s", "steps / s", "x TRL"], rows)


def preference_records(world: World, n_prompts: int, responses_per_prompt: int) -> list[dict]:
    """Pairs from the world's noisy demonstrator: `responses_per_prompt` distinct responses per
    prompt, ranked by gold reward, all pairs of each ranking (prompts with fewer are skipped)."""
    import numpy as np

    rng = np.random.default_rng(0)
    records: list[dict] = []
    prompts = world.world.sample_prompts("train", 4 * n_prompts, seed=0)
    used = 0
    for prompt in prompts:
        if used == n_prompts:
            break
        responses: list[str] = []
        for _ in range(20):
            response = world.world.demonstrate(prompt, rng)
            if response.strip() and response not in responses:
                responses.append(response)
            if len(responses) == responses_per_prompt:
                break
        if len(responses) < responses_per_prompt:
            continue
        ranked = sorted(responses, key=lambda y: -world.world.gold(prompt, y).reward)
        for a in range(len(ranked)):
            for b in range(a + 1, len(ranked)):
                records.append({"prompt": prompt, "chosen": ranked[a], "rejected": ranked[b]})
        used += 1
    if used < n_prompts:
        raise SystemExit(f"only {used} of {n_prompts} prompts had {responses_per_prompt} distinct demonstrations")
    return records


class _TrainingContext:
    """What `dpo` reads from a run context to train (the pipeline's shared stages are not needed)."""

    def __init__(self, world: World, initial: dict, preferences, seed: int = 0):
        from alignbench.models import freeze
        from alignbench.training import Budget

        self.world, self.initial = world, initial
        self.codec, self.preferences, self.seed = world.codec, preferences, seed
        self.reference = freeze(self._fresh())
        self.budget = Budget()

    def _fresh(self):
        policy = self.world.policy()
        policy.load_state_dict(self.initial)
        return policy

    def load_policy(self, trainable: bool = True):
        return self._fresh().train()


class _StepClock:
    """Wall-clock time at the end of every optimizer step."""

    def __init__(self):
        self.times: list[float] = []

    def steps_per_second(self, warmup: int) -> float:
        return (len(self.times) - warmup) / (self.times[-1] - self.times[warmup - 1])


def alignbench_run(world: World, initial: dict, records: list[dict], args, precompute: bool, scratch: Path, share_prompts: bool) -> dict:
    from alignbench.methods.dpo import DPO, DPOConfig
    from lightning.pytorch.callbacks import Callback

    from alignbench.data import preference_rows
    from alignbench.tracking import HistoryLogger, HistoryWriter
    from alignbench.training import TrainerConfig, make_trainer

    clock = _StepClock()

    class Clock(Callback):
        def on_train_batch_end(self, *unused):
            clock.times.append(time.perf_counter())

    started = time.perf_counter()
    context = _TrainingContext(world, initial, preference_rows(records))
    config = DPOConfig(batch_size=args.prompts_per_step, max_length=args.max_length, precompute_reference=precompute, kl_every=0, share_prompts=share_prompts)
    module = DPO(config, context)
    data = module.datamodule()  # tokenises, and precomputes the reference log-probs if asked
    history = HistoryLogger(HistoryWriter(scratch / "history.jsonl"))
    trainer = make_trainer(
        TrainerConfig(progress_bar=False), max_steps=args.steps, max_epochs=1, grad_clip=config.optim.grad_clip,
        loggers=[history], callbacks=[Clock()],
    )
    setup_s = time.perf_counter() - started
    sequences = _mean_sequences_per_step(data, args.steps)
    trainer.fit(module, datamodule=data)
    return {"setup_s": setup_s, "steps_per_s": clock.steps_per_second(args.warmup_steps), "sequences": sequences}


def trl_run(world: World, initial: dict, records: list[dict], args, pairs_per_step: int, precompute: bool, scratch: Path) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    clock = _StepClock()

    class Clock(TrainerCallback):
        def on_step_end(self, *unused, **kwargs):
            clock.times.append(time.perf_counter())

    started = time.perf_counter()
    tokenizer = copy.deepcopy(world.tokenizer)
    tokenizer.padding_side = "right"
    model, reference = world.policy(), world.policy()
    model.load_state_dict(initial)
    reference.load_state_dict(initial)  # TRL would load its reference from the model's hub name, which it has not
    dataset = Dataset.from_list([{"prompt": _rendered_prompt(world, r["prompt"]), "chosen": r["chosen"], "rejected": r["rejected"]} for r in records])
    _check_same_tokens(world, records[0], dataset[0])
    config = DPOConfig(
        output_dir=str(scratch / "trl"), per_device_train_batch_size=pairs_per_step, max_steps=args.steps,
        learning_rate=1e-4, lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 10), max_grad_norm=1.0, beta=0.1,
        max_length=args.max_length, precompute_ref_log_probs=precompute,
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,  # fp32, no recomputation (see the docstring)
        report_to="none", logging_steps=10, log_level="error", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    trainer = DPOTrainer(
        model=model, ref_model=reference, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[Clock()],
    )
    if precompute:
        # TRL computes them when the training dataloader is first built; count that as setup, as for alignbench.
        trainer.get_train_dataloader()
    setup_s = time.perf_counter() - started
    with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints its final metrics dict
        trainer.train()
    return {"setup_s": setup_s, "steps_per_s": clock.steps_per_second(args.warmup_steps), "sequences": 2.0 * pairs_per_step}


def _rendered_prompt(world: World, prompt: str) -> str:
    """The prompt as alignbench feeds it (the world tokenizer's chat template), as text for TRL."""
    text = world.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return text + " "  # the response's first word starts after a space


def _check_same_tokens(world: World, record: dict, trl_row: dict) -> None:
    tokenizer, codec = world.tokenizer, world.codec
    prompt_ids = tokenizer(trl_row["prompt"], add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(trl_row["prompt"] + record["chosen"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    expected = codec.encode_prompt(record["prompt"]) + codec.encode_responses([record["chosen"]])[0]
    if prompt_ids != codec.encode_prompt(record["prompt"]) or full_ids != expected:
        raise RuntimeError(f"TRL would see other tokens than alignbench: {full_ids} vs {expected}")


def _mean_sequences_per_step(data, steps: int) -> float:
    counts = [batch.responses.input_ids.shape[0] for _, batch in zip(range(steps), data.train_dataloader())]
    return sum(counts) / len(counts)


def _median(results: list[dict]) -> dict:
    import statistics

    return {key: statistics.median(r[key] for r in results) for key in results[0]}


if __name__ == "__main__":
    main()

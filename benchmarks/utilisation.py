"""Utilisation: training FLOP/s (6 x parameters x tokens) against the machine's measured fp32 matmul FLOP/s.

The peak is the best of several large square fp32 matmuls (what this CPU and torch's BLAS reach);
a second reference is a matmul of the shape the tiny model's training actually multiplies (all the
tokens of a step through the MLP's up-projection), which shows how much of the gap is the model's
narrowness rather than the training loop. Training rows: the shared SFT stage's step (Lightning,
as the pipeline runs it), the same step in a bare PyTorch loop (no Lightning: what the framework
costs), and alignbench's DPO step with precomputed reference log-probs. Tokens are the real
(unpadded) prompt + response tokens a step trains on; 6 x parameters per token is the forward and
backward of every weight (Kaplan et al. 2020), the embedding table included (it is also the head).

    python -m benchmarks.utilisation [--quick] [--steps 30]
"""

from __future__ import annotations

import argparse
import time

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
    parser.add_argument("--steps", type=int, default=30, help="training steps per measurement")
    parser.add_argument("--warmup-steps", type=int, default=5, help="first steps left out of the timing")
    parser.add_argument("--batch", type=int, default=64, help="SFT demonstrations per step (the quickstart's)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup_steps = 6, 2
    repeats = args.repeats or (1 if args.quick else 3)
    setup(args)
    import statistics

    from alignbench.models import count_parameters

    world = World.build(args.model)
    parameters = count_parameters(world.policy())
    peak = max(matmul_flops(2048 if not args.quick else 512) for _ in range(repeats))
    measurements = {"SFT step (Lightning, as the pipeline)": [], "SFT step (bare PyTorch loop)": [], "DPO step (alignbench dpo, precomputed reference)": []}
    shape_flops = []
    for _ in range(repeats):
        sft = sft_tokens_per_second(world, args, lightning=True)
        measurements["SFT step (Lightning, as the pipeline)"].append(sft)
        measurements["SFT step (bare PyTorch loop)"].append(sft_tokens_per_second(world, args, lightning=False))
        measurements["DPO step (alignbench dpo, precomputed reference)"].append(dpo_tokens_per_second(world, args))
        tokens_per_step = sft[1]
        hidden = world.policy().config.hidden_size
        intermediate = world.policy().config.intermediate_size
        shape_flops.append(matmul_flops(int(tokens_per_step), hidden, intermediate))

    print(f"## Utilisation: {args.model} ({parameters:,} parameters), {args.steps} steps ({args.warmup_steps} warm-up), "
          f"median of {repeats} repeats; FLOPs = 6 x parameters x tokens")
    print(machine_line())
    print()
    shape = statistics.median(shape_flops)
    rows = [
        ["fp32 matmul, large square (the peak)", "", peak / 1e9, 1.0],
        [f"fp32 matmul at the model's shape ([{int(tokens_per_step)}, {hidden}] x [{hidden}, {intermediate}])", "", shape / 1e9, shape / peak],
    ]
    for name, results in measurements.items():
        tokens_per_s = statistics.median(r[0] for r in results)
        flops = 6 * parameters * tokens_per_s
        rows.append([name, tokens_per_s, flops / 1e9, flops / peak])
    print_table(["what", "tokens / s", "GFLOP/s", "of peak"], rows)


def matmul_flops(m: int, k: int | None = None, n: int | None = None, seconds: float = 0.5) -> float:
    """FLOP/s of an fp32 [m, k] x [k, n] matmul (square if k, n are not given), over ~`seconds`."""
    import torch

    k, n = k or m, n or m
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b  # warm-up
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        a @ b
        calls += 1
    return 2 * m * k * n * calls / elapsed


def _demonstrations(world: World, n: int):
    import numpy as np
    from datasets import Dataset

    rng = np.random.default_rng(0)
    prompts = world.world.sample_prompts("train", n, seed=0)
    return Dataset.from_dict({"prompt": prompts, "response": [world.world.demonstrate(p, rng) for p in prompts]})


def sft_tokens_per_second(world: World, args, lightning: bool) -> tuple[float, float]:
    """(trained tokens per second, tokens per step) of SFT steps after the warm-up."""
    import torch
    from lightning.pytorch.callbacks import Callback

    from alignbench.data import DemonstrationDataModule
    from alignbench.sft import SFTConfig, SupervisedFineTuning, response_nll
    from alignbench.training import TrainerConfig, adamw_with_schedule, make_trainer

    config = SFTConfig(batch_size=args.batch)
    data = DemonstrationDataModule(_demonstrations(world, args.steps * args.batch + args.batch), world.codec, config.batch_size, config.max_length, seed=0)
    policy = world.policy().train()
    tokens, times = [], []
    if lightning:
        module = SupervisedFineTuning(policy, config.optim, args.steps)

        class Clock(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                tokens.append(batch.num_tokens)
                times.append(time.perf_counter())

        trainer = make_trainer(TrainerConfig(progress_bar=False), max_steps=args.steps, max_epochs=1, grad_clip=config.optim.grad_clip, callbacks=[Clock()])
        trainer.fit(module, datamodule=data)
    else:
        optimizer = adamw_with_schedule(policy.parameters(), config.optim, args.steps)["optimizer"]
        for _, batch in zip(range(args.steps), data.train_dataloader()):
            loss, _ = response_nll(policy, batch.batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), config.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens.append(batch.num_tokens)
            times.append(time.perf_counter())
    w = args.warmup_steps
    return sum(tokens[w:]) / (times[-1] - times[w - 1]), sum(tokens[w:]) / len(tokens[w:])


def dpo_tokens_per_second(world: World, args) -> tuple[float, float]:
    """(trained tokens per second, tokens per step) of alignbench's DPO steps after the warm-up."""
    from alignbench.methods.dpo import DPO, DPOConfig
    from lightning.pytorch.callbacks import Callback

    from alignbench.data import preference_rows
    from alignbench.training import TrainerConfig, make_trainer
    from benchmarks.dpo import _TrainingContext, preference_records

    prompts_per_step = 8
    records = preference_records(world, args.steps * prompts_per_step, 4)
    context = _TrainingContext(world, world.policy().state_dict(), preference_rows(records))
    config = DPOConfig(batch_size=prompts_per_step, precompute_reference=True, kl_every=0)
    module = DPO(config, context)
    data = module.datamodule()
    tokens, times = [], []

    class Clock(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            tokens.append(int(batch.responses.attention_mask.sum()))
            times.append(time.perf_counter())

    trainer = make_trainer(TrainerConfig(progress_bar=False), max_steps=args.steps, max_epochs=1, grad_clip=config.optim.grad_clip, callbacks=[Clock()])
    trainer.fit(module, datamodule=data)
    w = args.warmup_steps
    return sum(tokens[w:]) / (times[-1] - times[w - 1]), sum(tokens[w:]) / len(tokens[w:])


if __name__ == "__main__":
    main()

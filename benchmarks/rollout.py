"""Rollout: alignbench's sampling engine against Hugging Face `generate`, in new tokens per second.

Both sample the same prompts from the same tiny world model (batch 64, 32 new tokens, temperature 1,
no top-k, no top-p, KV cache on), ending a row at EOS. alignbench is measured as methods and the
evaluator call it (`alignbench.evaluation.sample_policy`), and once more with its direct Llama
decoder switched off (the model's own forward and a `DynamicCache`), which shows what each part
contributes. Tokens are counted up to and including each row's EOS, for both. `generate` is
called as users call it (it turns gradients off itself); it is also timed inside
`torch.inference_mode`, as alignbench's sampler runs, a stronger baseline the ratio is not taken to.

    python -m benchmarks.rollout [--quick] [--batch 64] [--new-tokens 32] [--policy DIR]
"""

from __future__ import annotations

import argparse
import contextlib

from benchmarks.common import (
    World,
    add_common_arguments,
    interleaved,
    machine_line,
    median_rate,
    median_seconds,
    print_table,
    setup,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--batch", type=int, default=64, help="prompts sampled together")
    parser.add_argument("--new-tokens", type=int, default=32, help="most new tokens per prompt")
    parser.add_argument("--policy", default=None, help="a saved policy directory (e.g. OUT/cache/sft-*/policy) instead of a fresh world model")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.new_tokens = 16, 8
    repeats = args.repeats or (2 if args.quick else 7)
    setup(args)
    import torch

    from alignbench import generation
    from alignbench.evaluation import EvalConfig, sample_policy

    world = World.build(args.model)
    if args.policy:
        from alignbench.models import load_pretrained_policy

        model = load_pretrained_policy(args.policy)
    else:
        model = world.policy()
    model.eval()
    codec, tokenizer = world.codec, world.tokenizer
    prompts = world.world.sample_prompts("test", args.batch, seed=0)
    prompt_ids = codec.encode_prompts(prompts)
    settings = EvalConfig(temperature=1.0, top_p=1.0, max_new_tokens=args.new_tokens, batch_size=args.batch)

    def hf_generate(mode=torch.no_grad) -> float:
        batch = tokenizer.pad({"input_ids": prompt_ids}, padding=True, return_tensors="pt")  # left padding
        with mode():
            output = model.generate(
                **batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.new_tokens,
                eos_token_id=codec.eos_token_id, pad_token_id=codec.pad_token_id, use_cache=True,
            )
        return float(sum(_tokens_through_eos(row, codec.eos_token_id) for row in output[:, batch["input_ids"].shape[1] :].tolist()))

    def alignbench_sample() -> float:
        out = sample_policy(model, None, codec, prompts, settings, torch.Generator().manual_seed(0))
        return float(sum(len(ids) for ids in out.response_ids))

    def alignbench_transformers_forward() -> float:
        with _without_direct_decoder(generation):
            return alignbench_sample()

    candidates = {
        "transformers generate (KV cache)": hf_generate,
        "transformers generate, inside torch.inference_mode": lambda: hf_generate(torch.inference_mode),
        "alignbench sample, transformers forward": alignbench_transformers_forward,
        "alignbench sample": alignbench_sample,
    }
    results = interleaved(candidates, repeats)
    baseline = median_rate(results["transformers generate (KV cache)"])
    print(f"## Rollout: batch {args.batch}, up to {args.new_tokens} new tokens, temperature 1, {args.model}"
          f"{' (' + args.policy + ')' if args.policy else ' (fresh weights)'}, median of {repeats} interleaved repeats")
    print(machine_line())
    print()
    rows = []
    for name, samples in results.items():
        rate = median_rate(samples)
        rows.append([name, int(samples[0][0]), median_seconds(samples), rate, rate / baseline])
    print_table(["sampler", "new tokens", "seconds", "new tokens / s", "x generate"], rows)


def _tokens_through_eos(row: list[int], eos: int) -> int:
    return row.index(eos) + 1 if eos in row else len(row)


@contextlib.contextmanager
def _without_direct_decoder(generation):
    """Sample through the model's own forward (the path every non-Llama model takes)."""
    original = generation._LlamaDecoder.__dict__["of"]
    generation._LlamaDecoder.of = classmethod(lambda cls, *args: None)
    try:
        yield
    finally:
        generation._LlamaDecoder.of = original


if __name__ == "__main__":
    main()

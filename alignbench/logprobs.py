"""Packing prompt+response sequences and scoring them with a causal language model.

Every method (policy-gradient, preference losses, KL estimates) and the evaluator score responses
through :func:`sequence_logprobs`, so padding, position ids and the prompt/response boundary are
handled in exactly one place.

Shape conventions: ``B`` rows, ``T`` padded sequence length, ``V`` vocabulary size.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "PackedBatch", "pack_sequences", "position_ids_from_mask", "token_logprobs", "target_logprobs",
    "sampling_logprobs", "sequence_logprobs", "evaluation_mode",
]


@contextmanager
def evaluation_mode(model: nn.Module):
    """`model` in eval mode (dropout off) for the block, its own mode restored after: log-probs
    scored for evaluation or as a reference must not depend on dropout's random masks."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@dataclass
class PackedBatch:
    """Prompt+response sequences padded into one batch.

    Attributes:
        input_ids: ``LongTensor [B, T]``, prompt tokens followed by response tokens, padded.
        attention_mask: ``LongTensor [B, T]``, 1 on prompt and response tokens, 0 on padding.
        response_mask: ``BoolTensor [B, T]``, True exactly at positions holding a response token.
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor

    def to(self, device: torch.device | str) -> PackedBatch:
        """Return a copy of the batch with every tensor on ``device``."""
        return PackedBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device)
        )

    @staticmethod
    def concat(batches: list[PackedBatch]) -> PackedBatch:
        """Stack batches row-wise (``[sum B_i, max T_i]``), e.g. chosen and rejected in one forward.

        Narrower batches get extra padding on the right whatever their own padding side: the
        padding layout never matters here because positions come from the attention mask. The
        extra ``input_ids`` are 0 (masked, so any valid id works).
        """
        width = max(b.input_ids.shape[1] for b in batches)

        def widen(tensor: Tensor) -> Tensor:
            return nn.functional.pad(tensor, (0, width - tensor.shape[1]))

        return PackedBatch(
            torch.cat([widen(b.input_ids) for b in batches]),
            torch.cat([widen(b.attention_mask) for b in batches]),
            torch.cat([widen(b.response_mask) for b in batches]),
        )


def pack_sequences(
    prompt_ids: list[list[int]],
    response_ids: list[list[int]],
    pad_token_id: int,
    padding_side: str = "right",
    max_length: int | None = None,
) -> PackedBatch:
    """Concatenate each prompt with its response and pad the rows into a :class:`PackedBatch`.

    Args:
        prompt_ids: ``B`` non-empty token lists.
        response_ids: ``B`` token lists; they already end with EOS where the response ended.
        pad_token_id: token placed at padding positions (they are masked, so any id works).
        padding_side: ``"right"`` (training) or ``"left"`` (sampling-style layout).
        max_length: if given, a row longer than this loses the END of its response; the prompt is
            never cut.

    Returns:
        A batch with ``T = `` the longest (possibly truncated) row.

    Raises:
        ValueError: on mismatched list lengths, an empty batch, an unknown ``padding_side``, an
            empty prompt (its first response token would have no context to be scored in), or a
            prompt that alone exceeds ``max_length`` (the row index is named).
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    if not prompt_ids:
        raise ValueError("cannot pack an empty batch")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")

    rows: list[tuple[list[int], list[int]]] = []
    for i, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        if not prompt:
            raise ValueError(f"row {i}: empty prompt; every response token needs a context")
        if max_length is not None:
            if len(prompt) > max_length:
                raise ValueError(
                    f"row {i}: prompt has {len(prompt)} tokens, more than max_length={max_length}"
                )
            response = response[: max_length - len(prompt)]
        rows.append((list(prompt), list(response)))

    width = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (prompt, response) in enumerate(rows):
        length = len(prompt) + len(response)
        start = 0 if padding_side == "right" else width - length
        input_ids[i, start : start + length] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[i, start : start + length] = 1
        response_mask[i, start + len(prompt) : start + length] = True
    return PackedBatch(input_ids, attention_mask, response_mask)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Position of each token among the real tokens of its row.

    Passing these explicitly makes left and right padding give identical results for every
    architecture (some, e.g. GPT-2 in transformers 5, do not derive positions from the mask).

    Args:
        attention_mask: ``[B, T]``, nonzero on real tokens.

    Returns:
        ``LongTensor [B, T]``: ``cumsum(mask) - 1``, clamped at 0 on leading padding.
    """
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp_min(0)


def token_logprobs(logits: Tensor, input_ids: Tensor) -> Tensor:
    """Log-probability of each token given the tokens before it.

    Computed as ``logit[token] - logsumexp(logits)`` in float32: stable, and unlike
    ``log_softmax`` it keeps no extra ``[B, T, V]`` tensor alive for the backward pass (for a
    float32 model the only full-vocabulary tensor saved is the logits themselves).

    Args:
        logits: ``[B, T, V]``, the model output at every input position.
        input_ids: ``LongTensor [B, T]``.

    Returns:
        ``float32 [B, T-1]``; entry ``[b, t-1]`` is ``log p(input_ids[b, t] | input_ids[b, :t])``.
    """
    return target_logprobs(logits[:, :-1], input_ids[:, 1:])


def target_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """``float32 [...]``: ``log p(targets)`` under ``logits [..., V]``, as ``logit[target] -
    logsumexp(logits)`` (see `token_logprobs` for why not ``log_softmax``)."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sampling_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0, top_p: float = 1.0) -> Tensor:
    """``float32 [...]``: ``log p_{T,top_p}(targets)``, the log-probability of each target under the
    distribution that :func:`alignbench.generation.sample` draws from at ``temperature`` and ``top_p``.

    That distribution is ``softmax(logits / T)`` restricted to its top-p nucleus and renormalised
    there: sorted by probability, a token is kept while the tokens ranked above it hold less than
    ``top_p`` (the top one always stays), the rule of the sampler. A target outside the nucleus gets
    ``-inf``. ``temperature == 0`` is greedy decoding, a point mass on the argmax: 0 there, ``-inf``
    elsewhere. At ``T = 1, top_p = 1`` this is :func:`target_logprobs`.

    Args:
        logits: ``[..., V]``, unscaled.
        targets: ``LongTensor [...]``.
    """
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
    logits = logits.float()
    if temperature == 0:
        hit = logits.argmax(dim=-1) == targets
        return torch.zeros(hit.shape, device=logits.device).masked_fill(~hit, float("-inf"))
    if top_p >= 1:
        return target_logprobs(logits / temperature if temperature != 1 else logits, targets)
    # The sampler's probabilities, computed as it computes them, so that the nucleus has the same edge.
    probs = torch.log_softmax(logits, dim=-1).exp() if temperature == 1 else torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
    outside = torch.empty_like(outside_sorted).scatter_(-1, order, outside_sorted)
    kept = torch.log_softmax(logits / temperature, dim=-1).masked_fill(outside, float("-inf"))
    return kept.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(kept, dim=-1)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def sequence_logprobs(
    model: nn.Module, batch: PackedBatch, *, average: bool = False, temperature: float = 1.0, top_p: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Score the response tokens of ``batch`` under ``model``; gradients flow to the model.

    Args:
        model: any Hugging Face causal LM (its output has ``.logits``). It runs in its own dtype;
            the results are float32. Its train/eval mode is left alone (dropout is the caller's
            choice).
        batch: see :func:`pack_sequences`; moved to the model's device. Position 0 of a row must
            not be a response token (it has no context).
        average: return the mean instead of the sum over response tokens.
        temperature, top_p: score under the distribution sampled at these settings (see
            :func:`sampling_logprobs`; a token outside the nucleus scores ``-inf``). The defaults
            give the model's own distribution.

    Returns:
        ``per_token``: ``float32 [B, T]``, ``log p(token | prefix)`` at response positions, 0 elsewhere.
        ``per_sequence``: ``float32 [B]``, sum of ``per_token`` over the row, or its mean over the
        response tokens if ``average`` (0 for a row without response tokens).
    """
    batch = batch.to(_model_device(model))
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=position_ids_from_mask(batch.attention_mask),
        use_cache=False,
    ).logits
    response_mask = batch.response_mask.bool()
    # Left-pad one column so scores line up with the input positions of the tokens they score.
    if temperature == 1 and top_p >= 1:
        scores = token_logprobs(logits, batch.input_ids)
    else:
        scores = sampling_logprobs(logits[:, :-1], batch.input_ids[:, 1:], temperature, top_p)
    scores = nn.functional.pad(scores, (1, 0))
    # `where` rather than multiplying by the mask: padding logits never leak in, even as NaN * 0.
    per_token = torch.where(response_mask, scores, torch.zeros_like(scores))
    per_sequence = per_token.sum(dim=-1)
    if average:
        per_sequence = per_sequence / response_mask.sum(dim=-1).clamp_min(1)
    return per_token, per_sequence

"""Packing prompt+response sequences and scoring them with a causal language model.

Every method (policy-gradient, preference losses, KL estimates) and the evaluator score responses
through :func:`sequence_logprobs`, so padding, position ids and the prompt/response boundary are
handled in exactly one place.

Shape conventions: ``B`` rows, ``T`` padded sequence length, ``V`` vocabulary size.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "PackedBatch", "pack_sequences", "SharedPromptBatch", "pack_shared_prompts", "position_ids_from_mask",
    "token_logprobs", "target_logprobs", "sampling_logprobs", "sequence_logprobs", "shared_prompt_logprobs",
    "evaluation_mode",
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


@dataclass
class SharedPromptBatch:
    """Responses packed with their prompt: the prompt's tokens once, then each of its responses.

    A block attention mask lets a response attend to the prompt and to its own earlier tokens only,
    and its positions continue from the prompt's end, so each response is scored as it would be
    after the prompt alone (:func:`pack_sequences`' layout) while the prompt goes through the model
    once instead of once per response: on rankings of 4 responses, about half the tokens.

    A prompt with its responses is a *group*. By default each group has a row of its own; packed
    (``pack_width``), several groups share a row, each attending only within itself, so a batch of
    short sequences carries little padding.

    Attributes:
        input_ids: ``LongTensor [N, T]``, right-padded rows.
        position_ids: ``LongTensor [N, T]``, each response's positions continue from its prompt's end.
        group: ``LongTensor [N, T]``, which group of its row a token belongs to (0, 1, ...), -1 at
            padding.
        segment: ``LongTensor [N, T]``, 0 at prompt tokens, ``k + 1`` at the group's k-th
            response's, -1 at padding.
        owner: ``LongTensor [N, T]``, the response (0..R-1, numbered prompt by prompt in the input order) a token belongs to,
            -1 at prompt tokens and padding.
        source: ``LongTensor [N, T]``, the position whose logits predict the token here: the previous
            one, or for a response's first token the prompt's last.
        ends: ``LongTensor [R, 2]``, (row, column) of each response's last token, or of its prompt's
            last for an empty response: where a reward model reads the sequence's final state.
        num_responses: R.
    """

    input_ids: Tensor
    position_ids: Tensor
    group: Tensor
    segment: Tensor
    owner: Tensor
    source: Tensor
    ends: Tensor
    num_responses: int

    def to(self, device: torch.device | str) -> SharedPromptBatch:
        """Return a copy of the batch with every tensor on ``device``."""
        move = lambda t: t.to(device)  # noqa: E731
        tensors = (self.input_ids, self.position_ids, self.group, self.segment, self.owner, self.source, self.ends)
        return SharedPromptBatch(*map(move, tensors), self.num_responses)

    def response_tokens(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Every response token, in row-major order: the flat index (row x width + column) of the
        position whose output predicts it (read a ``[N, T, ...]`` tensor with
        :func:`select_positions`), its id, its response (owner) and its position id. A prompt's
        last position predicts the first token of each of its responses, so it is listed once per
        response."""
        scored = self.owner >= 0
        rows = torch.arange(self.input_ids.shape[0], device=self.input_ids.device)[:, None].expand_as(self.source)[scored]
        return rows * self.input_ids.shape[1] + self.source[scored], self.input_ids[scored], self.owner[scored], self.position_ids[scored]

    def attention_mask(self, dtype: torch.dtype, config=None) -> Tensor | dict[str, Tensor]:
        """``[N, 1, T, T]`` additive mask (0 where a query attends to a key, the dtype's minimum
        elsewhere), in the form transformers takes a custom 4D mask for both SDPA and eager attention:
        a key at or before the query, in the query's group, that is a prompt token or in the query's
        own segment. Padding queries see the padding up to themselves, so no row of the softmax is
        empty.

        transformers uses a custom mask as it is, so a model `config` with sliding-window attention
        (Mistral, Qwen2, Gemma 2 and 3, Phi-3) gets the window here: a key less than
        `sliding_window` positions (position ids) before the query, as each sequence alone would
        see. Where its layers mix windowed and full attention (`config.layer_types`), a mask per
        layer type, the form those models take."""
        width = self.input_ids.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool, device=self.input_ids.device).tril()
        query, key = self.segment[:, :, None], self.segment[:, None, :]
        same_group = self.group[:, :, None] == self.group[:, None, :]
        allowed = causal & same_group & ((key == 0) | (key == query))

        def additive(allowed: Tensor) -> Tensor:
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]

        window = getattr(config, "sliding_window", None)
        if not window:
            return additive(allowed)
        within = (self.position_ids[:, :, None] - self.position_ids[:, None, :]) < window
        windowed = additive(allowed & within)  # a query keeps itself: no row is empty
        layer_types = getattr(config, "layer_types", None)
        if not layer_types:
            return windowed
        full = additive(allowed)
        return {kind: windowed if kind == "sliding_attention" else full for kind in set(layer_types)}


PACKED_TOKENS_WORTH_IT = 0.9
"""Groups are packed only where that leaves at most this share of the tokens of one group per row
(the AI labeler's 22-55-token requests, packed into rows of 64, trained 0.93x as fast as a row each;
`DemonstrationDataModule` packs them into rows twice as wide instead)."""


def select_positions(values: Tensor, positions: Tensor) -> Tensor:
    """``values[N, T, ...]`` read at flat positions (row x T + column), as
    :meth:`SharedPromptBatch.response_tokens` lists them: ``[len(positions), ...]``.

    Why not ``values[rows, columns]``: its backward adds the gradients of a position listed more
    than once (a prompt's last position, once per response) with atomic adds from several threads
    on the CPU, in whatever order the threads run, so the same run trained to other weights from
    one time to the next (seen with two threads, more often on a busy machine). ``index_select``'s
    backward adds them in the order listed."""
    return values.flatten(0, 1).index_select(0, positions)


def pack_shared_prompts(
    prompt_ids: list[list[int]], response_ids: list[list[list[int]]], pad_token_id: int, max_length: int | None = None,
    pack_width: int | Sequence[int] | None = None,
) -> SharedPromptBatch:
    """Pack each prompt with all of its responses (:class:`SharedPromptBatch`): one row per prompt,
    or with ``pack_width`` as few rows as fit.

    Args:
        prompt_ids: ``G`` non-empty token lists.
        response_ids: for each prompt, its responses' token lists (they end with EOS where the
            response ended); responses are numbered in this order, prompt by prompt.
        pad_token_id: token placed at padding positions (never attended to from a real token).
        max_length: if given, each response is cut to ``max_length - len(prompt)`` tokens, as
            :func:`pack_sequences` cuts a prompt + response row.
        pack_width: if given, the groups (a prompt and its responses) are placed longest first,
            each into the first row with room for it, in rows of this many tokens (or of the
            longest group's, if wider). The tokens of a batch of short sequences then fill the rows
            instead of padding to the longest: for the world's demonstrations, 95% of the tokens
            are real at 48 against 66% one per row. Where the packed rows would hold more than
            ``PACKED_TOKENS_WORTH_IT`` of the tokens of one group per row, the groups keep a row
            each. Several widths: the first at which the groups pack (``(64, 128)``: groups too
            long to share a row of 64 go two or more to a row of 128). Scores are the same up to
            float rounding.

    Raises:
        ValueError: as :func:`pack_sequences` (names the prompt).
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} lists of responses")
    if not prompt_ids:
        raise ValueError("cannot pack an empty batch")
    groups = []
    for i, (prompt, responses) in enumerate(zip(prompt_ids, response_ids)):
        if not prompt:
            raise ValueError(f"prompt {i}: empty prompt; every response token needs a context")
        if max_length is not None:
            if len(prompt) > max_length:
                raise ValueError(f"prompt {i}: prompt has {len(prompt)} tokens, more than max_length={max_length}")
            responses = [response[: max_length - len(prompt)] for response in responses]
        groups.append((list(prompt), [list(r) for r in responses]))
    sizes = [len(p) + sum(map(len, rs)) for p, rs in groups]
    rows = [[g] for g in range(len(groups))]
    widths = [] if pack_width is None else [pack_width] if isinstance(pack_width, int) else list(pack_width)
    for width in widths:
        packed = _first_fit(sizes, max(max(sizes), width))
        # Groups near the width fill almost as many rows as they are, each wider: no packing then.
        if len(packed) * max(sum(sizes[g] for g in row) for row in packed) <= PACKED_TOKENS_WORTH_IT * len(groups) * max(sizes):
            rows = packed
            break
    first_response = [0]  # responses are numbered in the input's order, whatever row a group lands in
    for _, responses in groups:
        first_response.append(first_response[-1] + len(responses))
    width = max(sum(sizes[g] for g in row) for row in rows)
    # Built as Python lists, a row at a time, and made tensors once (a tensor write per span costs more).
    columns: dict[str, list[list[int]]] = {name: [] for name in ("input_ids", "position_ids", "group", "segment", "owner", "source")}
    ends = [[0, 0] for _ in range(first_response[-1])]
    for n, row in enumerate(rows):
        ids, positions, group, segment, owner, source = [], [], [], [], [], []
        for place, g in enumerate(row):
            prompt, responses = groups[g]
            prompt_end = len(ids) + len(prompt) - 1
            ids += prompt
            positions += range(len(prompt))
            segment += [0] * len(prompt)
            owner += [-1] * len(prompt)
            source += [0] * len(prompt)
            for k, tokens in enumerate(responses):
                # Each token is predicted from the one before it; the first from the prompt's end.
                source += [prompt_end] + list(range(len(ids), len(ids) + len(tokens) - 1)) if tokens else []
                ids += tokens
                ends[first_response[g] + k] = [n, len(ids) - 1 if tokens else prompt_end]
                positions += range(len(prompt), len(prompt) + len(tokens))
                segment += [k + 1] * len(tokens)
                owner += [first_response[g] + k] * len(tokens)
            group += [place] * sizes[g]
        padding = width - len(ids)
        for name, values, fill in (("input_ids", ids, pad_token_id), ("position_ids", positions, 0), ("group", group, -1),
                                   ("segment", segment, -1), ("owner", owner, -1), ("source", source, 0)):
            columns[name].append(values + [fill] * padding)
    input_ids, position_ids, group, segment, owner, source = (torch.tensor(columns[name], dtype=torch.long) for name in columns)
    return SharedPromptBatch(input_ids, position_ids, group, segment, owner, source, torch.tensor(ends, dtype=torch.long).view(-1, 2), first_response[-1])


def _first_fit(sizes: list[int], width: int) -> list[list[int]]:
    """First-fit decreasing: items (by index) into as few bins of ``width`` as it finds, each bin's
    items in input order."""
    bins: list[list[int]] = []
    room: list[int] = []
    for item in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        for b, free in enumerate(room):
            if sizes[item] <= free:
                bins[b].append(item)
                room[b] -= sizes[item]
                break
        else:
            bins.append([item])
            room.append(width - sizes[item])
    return [sorted(b) for b in bins]


@dataclass(frozen=True)
class ForwardKeywords:
    """Keyword names of a causal LM's forward that differ between transformers versions (PEFT
    wrappers looked through), detected once per model: the sampler and the LM judge read them."""

    cache: str  # "cache" in transformers >= 5.24, "past_key_values" before (removed in 5.40)
    logits_to_keep: bool  # the forward can skip the LM head on positions we do not need

    @classmethod
    def of(cls, model: nn.Module) -> ForwardKeywords:
        params = inspect.signature(model.forward).parameters
        if "cache" not in params and "past_key_values" not in params and hasattr(model, "get_base_model"):
            # PEFT wrappers take **kwargs and pass them on to the wrapped transformers model.
            params = inspect.signature(model.get_base_model().forward).parameters
        return cls(
            cache="cache" if "cache" in params else "past_key_values",
            logits_to_keep="logits_to_keep" in params,
        )


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


def shared_prompt_logprobs(model: nn.Module, batch: SharedPromptBatch, *, row_width: int | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Score every response of ``batch`` under ``model`` (gradients flow), as
    :func:`sequence_logprobs` scores the same responses packed one per row.

    Args:
        row_width: also return the per-token log-probs laid out as :func:`pack_sequences` lays the
            responses out one per row, right-padded to this width (a response's k-th token sits at
            column len(prompt) + k, which is its position id).

    Returns:
        ``per_sequence``: ``float32 [R]``, Σ_t log p(y_t | x, y_<t) of each response.
        ``lengths``: ``LongTensor [R]``, its tokens.
        ``per_token``: ``float32 [R, row_width]`` (0 off the responses), or None without ``row_width``.
    """
    device = _model_device(model)
    batch = batch.to(device)
    dtype = next(model.parameters()).dtype
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask(dtype, model.config), position_ids=batch.position_ids, use_cache=False
    ).logits
    predicting, targets, owners, positions = batch.response_tokens()
    per_token = target_logprobs(select_positions(logits, predicting), targets)
    per_sequence = torch.zeros(batch.num_responses, device=device, dtype=torch.float32).index_add(0, owners, per_token)
    lengths = torch.zeros(batch.num_responses, device=device, dtype=torch.long).index_add(0, owners, torch.ones_like(owners))
    if row_width is None:
        return per_sequence, lengths, None
    per_row = torch.zeros(batch.num_responses, row_width, device=device, dtype=torch.float32)
    return per_sequence, lengths, per_row.index_put((owners, positions), per_token)


def scoring_batch_rows(device: torch.device, batch_size: int | None = None) -> int:
    """Rows per batch for scoring sequences without gradients: `batch_size` if given; else 64 on the
    CPU, where small batches score faster and leaner (their activations stay in cache: 8,192 world
    responses under a world-small reward model in 3.6 s at 64 rows against 3.9 s at 512, and a
    reference's log-probs of them with ~140 MB less peak memory), 512 elsewhere."""
    return batch_size or (64 if device.type == "cpu" else 512)


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

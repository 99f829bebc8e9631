"""The one batched sampling engine used by every method and by the evaluator.

Design notes:

* Prompts (each repeated ``num_samples`` times) are sorted by length and cut into batches, so a
  batch holds prompts of similar length and needs little left padding; results are put back in
  the caller's order.
* Positions are passed explicitly (see :func:`alignbench.logprobs.position_ids_from_mask`), so a
  left-padded row is computed exactly like the same row alone.
* All per-step work is vectorised over the batch; the only Python loop is over decoding steps.
* Rows that have produced EOS are dropped from the batch (and from the KV cache) once enough of
  them have accumulated, so a batch with a long tail costs only as much as its unfinished rows.
* Sampling runs under ``torch.inference_mode`` (no autograd bookkeeping: ~8% of a tiny model's
  decoding time against ``no_grad``); only Python lists leave it, so nothing it creates reaches a
  later training step.
* Randomness comes from ``generator`` alone: one uniform number per row and step, turned into a
  token by inverse-CDF sampling, which works whatever devices the model and the generator are on.
* Llama-architecture models (the world's tiny models among them) decode through
  :class:`_LlamaDecoder`: the operations of the transformers forward without its Python layers,
  and a key/value cache written once into buffers sized for the batch instead of concatenated
  anew at every step (``benchmarks/rollout.py`` measures it against ``generate``). Any other
  model, or a Llama whose layers were replaced (LoRA, quantised), uses the model's own forward
  with a ``DynamicCache``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from alignbench.logprobs import position_ids_from_mask, sampling_logprobs

__all__ = ["SampleOutput", "sample"]

# Drop finished rows from the batch once at least this fraction of the rows still in it have
# finished. Each drop copies the KV cache, so dropping after every single EOS would cost more than
# it saves; at a quarter, the copies cost at most a few decoding steps per batch.
_COMPACT_FRACTION = 0.25

# transformers 5 builds a cache with the right layer kinds (e.g. sliding-window) from the config;
# older versions take no config and only ever have one layer kind.
_CACHE_TAKES_CONFIG = "config" in inspect.signature(DynamicCache.__init__).parameters


@dataclass
class SampleOutput:
    """Samples in the order ``prompt 0 sample 0, prompt 0 sample 1, ..., prompt 1 sample 0, ...``.

    Attributes:
        response_ids: generated tokens per sample, including the final EOS when one was
            generated, nothing after it, no padding.
        logprobs: sum over the generated tokens of ``log pi(token | context)`` under the model's
            own distribution at temperature 1 (unscaled logits, no top-p), whatever temperature
            and top_p were used to sample.
        finished: whether the sample ended with EOS (otherwise it hit ``max_new_tokens``).
        sampling_logprobs: sum over the generated tokens of the log-probability under the
            distribution actually sampled from: tempered, top-p truncated and renormalised (see
            :func:`alignbench.logprobs.sampling_logprobs`; 0 for greedy decoding). Equal to
            ``logprobs`` at temperature 1 and top_p 1. The evaluation's KL at any (T, top_p) and
            best-of-n's KL are computed from these.
    """

    response_ids: list[list[int]]
    logprobs: list[float]
    finished: list[bool]
    sampling_logprobs: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class _ForwardKeywords:
    """Keyword names that differ between transformers versions, detected once per call."""

    cache: str  # "cache" in transformers >= 5.24, "past_key_values" before (removed in 5.40)
    logits_to_keep: bool  # the forward can skip the LM head on positions we do not need

    @classmethod
    def of(cls, model: nn.Module) -> _ForwardKeywords:
        params = inspect.signature(model.forward).parameters
        if "cache" not in params and "past_key_values" not in params and hasattr(model, "get_base_model"):
            # PEFT wrappers take **kwargs and pass them on to the wrapped transformers model.
            params = inspect.signature(model.get_base_model().forward).parameters
        return cls(
            cache="cache" if "cache" in params else "past_key_values",
            logits_to_keep="logits_to_keep" in params,
        )


@torch.inference_mode()
def sample(
    model: nn.Module,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_samples: int = 1,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    progress: bool | str = False,
) -> SampleOutput:
    """Sample ``num_samples`` continuations of every prompt with a Hugging Face causal LM.

    Args:
        model: a causal LM; put in eval mode while sampling and then returned to its previous mode.
        prompt_ids: non-empty token lists, any lengths.
        max_new_tokens: most tokens generated per sample (including EOS).
        eos_token_id: a sample ends right after this token.
        pad_token_id: fills the left padding of prompts (masked, so any id works).
        temperature: divides the logits before sampling; 0 means greedy argmax.
        top_p: nucleus sampling; keeps the most likely tokens until their probability (after
            temperature) reaches ``top_p``; 1 keeps all.
        num_samples: samples per prompt.
        batch_size: rows (prompt-sample pairs) decoded together.
        generator: source of all randomness; same seed, same inputs -> same samples. It may live
            on a different device than the model. ``None`` uses torch's global RNG.
        progress: show a tqdm bar over batches; a string is used as its description.

    Returns:
        A :class:`SampleOutput` with ``len(prompt_ids) * num_samples`` samples, prompt-major.
    """
    if max_new_tokens < 1 or num_samples < 1 or batch_size < 1:
        raise ValueError("max_new_tokens, num_samples and batch_size must be positive")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")

    rows = [prompt for prompt in prompt_ids for _ in range(num_samples)]
    # Longest first (a batch that does not fit in memory fails at once); Python's sort is stable,
    # so the samples of one prompt stay together.
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]), reverse=True)
    keywords = _ForwardKeywords.of(model)

    response_ids: list[list[int]] = [[] for _ in rows]
    logprobs = [0.0] * len(rows)
    sampled_logprobs = [0.0] * len(rows)
    finished = [False] * len(rows)
    was_training = model.training
    model.eval()
    try:
        starts = range(0, len(rows), batch_size)
        for start in tqdm(starts, desc=progress if isinstance(progress, str) else None, disable=not progress):
            batch_rows = order[start : start + batch_size]
            batch = _sample_batch(
                model,
                [rows[i] for i in batch_rows],
                keywords=keywords,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
                temperature=temperature,
                top_p=top_p,
                generator=generator,
            )
            for i, response, logprob, done, sampled_logprob in zip(batch_rows, *batch):
                response_ids[i], logprobs[i], finished[i], sampled_logprobs[i] = response, logprob, done, sampled_logprob
    finally:
        model.train(was_training)
    return SampleOutput(response_ids, logprobs, finished, sampled_logprobs)


def _sample_batch(
    model: nn.Module,
    prompts: list[list[int]],
    *,
    keywords: _ForwardKeywords,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
) -> tuple[list[list[int]], list[float], list[bool], list[float]]:
    """Decode one left-padded batch; returns (responses, logprob sums, finished, sampling logprob sums) per row."""
    device = next(model.parameters()).device
    num_rows, prompt_width = len(prompts), max(len(p) for p in prompts)

    input_ids = torch.full((num_rows, prompt_width), pad_token_id, dtype=torch.long)
    # One mask buffer for prompt and generated tokens, so each step only flips a column to 1.
    mask = torch.zeros((num_rows, prompt_width + max_new_tokens), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, prompt_width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, prompt_width - len(prompt) : prompt_width] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    position_ids = position_ids_from_mask(mask[:, :prompt_width])
    next_position = position_ids[:, -1] + 1  # [R] position of the token about to be generated

    # Results, indexed by the row's place in `prompts`.
    generated = torch.full((num_rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    lengths = torch.zeros(num_rows, dtype=torch.long, device=device)
    logprob_sums = torch.zeros(num_rows, dtype=torch.float32, device=device)
    sampling_sums = torch.zeros(num_rows, dtype=torch.float32, device=device)
    finished = torch.zeros(num_rows, dtype=torch.bool, device=device)

    # The rows still in the batch (R of them): their place in `prompts`, and whether they are done
    # (finished but not yet dropped; they keep decoding padding that is thrown away).
    live = torch.arange(num_rows, device=device)
    done = torch.zeros(num_rows, dtype=torch.bool, device=device)

    decoder = _LlamaDecoder.of(model, num_rows, prompt_width + max_new_tokens) or _TransformersDecoder(model, keywords)
    for step in range(max_new_tokens):
        logits = decoder(input_ids, position_ids, mask[:, : prompt_width + step]).float()  # [R, V]
        token, token_logprob, token_sampling_logprob = _next_token(logits, temperature, top_p, generator)
        token = token.masked_fill(done, pad_token_id)

        generated[live, step] = token
        logprob_sums[live] += token_logprob.masked_fill(done, 0.0)
        sampling_sums[live] += token_sampling_logprob.masked_fill(done, 0.0)
        lengths[live] += (~done).long()
        ended = (token == eos_token_id) & ~done
        finished[live] |= ended
        done = done | ended
        if bool(done.all()):
            break

        if done.sum() >= _COMPACT_FRACTION * len(done):
            keep = (~done).nonzero().squeeze(1)
            decoder.select_rows(keep)
            live, done, token = live[keep], done[keep], token[keep]
            next_position, mask = next_position[keep], mask[keep]

        mask[:, prompt_width + step] = 1
        input_ids = token.unsqueeze(1)
        position_ids = next_position.unsqueeze(1)
        next_position = next_position + 1

    responses = [tokens[:length] for tokens, length in zip(generated.tolist(), lengths.tolist())]
    return responses, logprob_sums.tolist(), finished.tolist(), sampling_sums.tolist()


class _TransformersDecoder:
    """Decoding steps through the model's own forward and a transformers ``DynamicCache``."""

    def __init__(self, model: nn.Module, keywords: _ForwardKeywords):
        self.model, self.keywords = model, keywords
        self.cache = DynamicCache(config=model.config) if _CACHE_TAKES_CONFIG else DynamicCache()
        self.extra = {"logits_to_keep": 1} if keywords.logits_to_keep else {}

    def __call__(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Feed ``input_ids [R, S]`` (after everything fed before); logits ``[R, V]`` at the last position.

        ``attention_mask [R, K]`` covers everything fed so far, these tokens included.
        """
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.keywords.cache: self.cache},
            **self.extra,
        ).logits[:, -1]

    def select_rows(self, keep: Tensor) -> None:
        """Keep only rows ``keep`` (indices into the current rows) in the cache."""
        self.cache.batch_select_indices(keep)


class _LlamaDecoder:
    """Decoding steps of a transformers ``LlamaForCausalLM`` with SDPA attention, computed directly.

    The operations are those of transformers' ``modeling_llama`` (RMSNorm in float32, the model's
    own rotary module, q/k/v projections, SwiGLU), without the Python layers around them (mask
    builders, cache and output objects, decorators). What differs is the cache: transformers
    concatenates every layer's keys and values anew at each step (a copy of the whole cache, the
    largest cost after the matmuls on the world's models); here they are written once into zeroed
    buffers sized for the batch, and attention reads each buffer whole, the positions not yet
    written masked (SDPA copies a strided slice of a buffer, which costs as much as the
    concatenation). A decoding step's attention is two batched matmuls (see :meth:`_attention`).

    Attending over the whole buffer adds exact zeros to the softmax sums, but the sums are taken
    in another order, so logits differ from the transformers forward in the last bits (~1e-7):
    samples are the same unless a uniform draw falls within that distance of a boundary of the
    inverse CDF (the tests compare the two paths sample for sample).
    """

    def __init__(self, model: nn.Module, num_rows: int, max_length: int):
        base = model.model
        self.layers, self.embed, self.norm, self.rotary = base.layers, base.embed_tokens, base.norm, base.rotary_emb
        self.lm_head = model.lm_head
        attention = self.layers[0].self_attn
        self.num_heads, self.head_dim = model.config.num_attention_heads, attention.head_dim
        self.scaling = getattr(attention, "scaling", self.head_dim**-0.5)  # an attribute since transformers 4.48
        weight = self.embed.weight
        shape = (len(self.layers), num_rows, self.num_heads, max_length, self.head_dim)
        self.keys = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.values = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.length = 0  # positions written in the buffers

    @classmethod
    def of(cls, model: nn.Module, num_rows: int, max_length: int) -> _LlamaDecoder | None:
        """A decoder for ``model``, or None unless its forward is the one mirrored here (a plain
        Llama with SDPA attention: no LoRA or quantised layers, no grouped-query attention, no hooks)."""
        from transformers.models.llama import modeling_llama as llama

        if type(model) is not llama.LlamaForCausalLM:
            return None
        config, base = model.config, model.model
        if (
            config._attn_implementation != "sdpa"
            or config.num_key_value_heads != config.num_attention_heads
            or getattr(config, "pretraining_tp", 1) != 1
            or not hasattr(base, "rotary_emb")  # transformers before 4.45 keeps it in each layer
            or type(model.lm_head) is not nn.Linear
            or type(base.embed_tokens) is not nn.Embedding
            or type(base.norm) is not llama.LlamaRMSNorm
            or any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())
        ):
            return None
        for layer in base.layers:
            attention, mlp = layer.self_attn, layer.mlp
            linears = (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
            if (
                type(layer) is not llama.LlamaDecoderLayer
                or type(mlp) is not llama.LlamaMLP
                or any(type(linear) is not nn.Linear for linear in linears)
                or any(type(norm) is not llama.LlamaRMSNorm for norm in (layer.input_layernorm, layer.post_attention_layernorm))
            ):
                return None
        return cls(model, num_rows, max_length)

    def __call__(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """As :meth:`_TransformersDecoder.__call__`."""
        rows, new = input_ids.shape
        start, end = self.length, self.length + new
        split = (rows, new, self.num_heads, self.head_dim)
        hidden = self.embed(input_ids)
        cos, sin = self.rotary(hidden, position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        # Key padding, causal within the tokens fed now, and the positions not yet written, masked.
        width = self.keys.shape[3]
        key_mask = F.pad(attention_mask.bool(), (0, width - end))[:, None, None, :]  # [R, 1, 1, W]
        if new > 1:
            arange = torch.arange(width, device=input_ids.device)
            key_mask = key_mask & (arange[None, :] <= arange[start:end, None])
            key_mask = key_mask.expand(rows, 1, new, width).contiguous()
        else:  # as an additive bias per (row, head), the input of `baddbmm`
            bias = torch.zeros(key_mask.shape, dtype=hidden.dtype, device=hidden.device).masked_fill_(~key_mask, float("-inf"))
            key_mask = bias.expand(rows, self.num_heads, 1, width).reshape(rows * self.num_heads, 1, width)
        for index, layer in enumerate(self.layers):
            attention, mlp = layer.self_attn, layer.mlp
            residual = hidden
            hidden = _rms_norm(layer.input_layernorm, hidden)
            query = attention.q_proj(hidden).view(split).transpose(1, 2)
            key = attention.k_proj(hidden).view(split).transpose(1, 2)
            self.values[index, :, :, start:end] = attention.v_proj(hidden).view(split).transpose(1, 2)
            query = (query * cos) + (_rotate_half(query) * sin)
            self.keys[index, :, :, start:end] = (key * cos) + (_rotate_half(key) * sin)
            output = self._attention(query, self.keys[index], self.values[index], key_mask)
            hidden = residual + attention.o_proj(output.transpose(1, 2).reshape(rows, new, -1))
            residual = hidden
            hidden = _rms_norm(layer.post_attention_layernorm, hidden)
            hidden = residual + mlp.down_proj(mlp.act_fn(mlp.gate_proj(hidden)) * mlp.up_proj(hidden))
        self.length = end
        # RMSNorm and the head act on each position alone: only the last one is needed.
        return self.lm_head(_rms_norm(self.norm, hidden[:, -1:]))[:, -1]

    def _attention(self, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
        """Attention of ``query [R, H, S, D]`` over a whole buffer ``[R, H, W, D]``; ``[R, H, S, D]``.

        The prompt (S > 1) goes through SDPA with the boolean ``mask [R, 1, S, W]`` (its padding
        rows attend to nothing; SDPA returns zeros for them). A decoding step (S = 1) is two
        batched matmuls with the additive ``mask [R*H, 1, W]`` (transformers' eager formulation):
        for one query over a short cache they cost about two thirds of SDPA's CPU kernel.
        """
        rows, heads, new, dim = query.shape
        if new > 1:
            return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, dropout_p=0.0, scale=self.scaling, is_causal=False)
        width = keys.shape[2]
        scores = torch.baddbmm(mask, query.reshape(rows * heads, 1, dim), keys.reshape(rows * heads, width, dim).transpose(1, 2), alpha=self.scaling)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
        return torch.bmm(weights, values.reshape(rows * heads, width, dim)).view(rows, heads, 1, dim)

    def select_rows(self, keep: Tensor) -> None:
        """As :meth:`_TransformersDecoder.select_rows`."""
        self.keys, self.values = self.keys[:, keep], self.values[:, keep]


def _rms_norm(norm: nn.Module, hidden: Tensor) -> Tensor:
    """``LlamaRMSNorm.forward``: the same operations in the same order (the casts are no-ops in float32)."""
    dtype = hidden.dtype
    if dtype != torch.float32:
        hidden = hidden.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + norm.variance_epsilon)
    return norm.weight * (hidden if dtype == torch.float32 else hidden.to(dtype))


def _rotate_half(x: Tensor) -> Tensor:
    """transformers' ``rotate_half`` for rotary embeddings."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _next_token(
    logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Pick the next token of every row.

    Args:
        logits: ``float32 [R, V]``, unscaled.

    Returns:
        ``token``: ``LongTensor [R]``; ``logprob``: ``float32 [R]``, its log-probability under the
        unscaled logits (temperature 1, no top-p); ``sampling_logprob``: ``float32 [R]``, its
        log-probability under the distribution it was drawn from (temperature and top-p applied).
    """
    logprobs = torch.log_softmax(logits, dim=-1)
    if temperature == 0:
        token = logits.argmax(dim=-1)
    else:
        probs = logprobs.exp() if temperature == 1 else torch.softmax(logits / temperature, dim=-1)
        token = _sample_top_p(probs, top_p, generator)
    logprob = logprobs.gather(-1, token.unsqueeze(-1)).squeeze(-1)
    sampling_logprob = logprob if temperature == 1 and top_p >= 1 else sampling_logprobs(logits, token, temperature, top_p)
    return token, logprob, sampling_logprob


def _sample_top_p(probs: Tensor, top_p: float, generator: torch.Generator | None) -> Tensor:
    """Draw one token per row of ``probs [R, V]`` from its top-p nucleus; returns ``[R]``."""
    if top_p >= 1:
        return _inverse_cdf(probs, generator)
    sorted_probs, sorted_tokens = probs.sort(dim=-1, descending=True)
    # Keep a token while the tokens ranked above it hold less than top_p; the top one always stays.
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
    choice = _inverse_cdf(sorted_probs.masked_fill(outside, 0.0), generator)
    return sorted_tokens.gather(-1, choice.unsqueeze(-1)).squeeze(-1)


def _inverse_cdf(weights: Tensor, generator: torch.Generator | None) -> Tensor:
    """Draw index ``j`` of each row of ``weights [R, V]`` (unnormalised, >= 0) w.p. ``weights[j] / sum``.

    Uses one uniform number per row, drawn on the generator's device and then moved, so a CPU
    generator can drive a model on an accelerator without copying ``[R, V]`` tensors around.
    """
    cdf = weights.cumsum(dim=-1)
    total = cdf[:, -1:].contiguous()
    rand_device = generator.device if generator is not None else cdf.device
    uniform = torch.rand((len(cdf), 1), generator=generator, device=rand_device).to(cdf.device)
    choice = torch.searchsorted(cdf, uniform * total, right=True)
    # Rounding can make uniform * total == total; never step past the last token with mass
    # (tokens with zero weight, e.g. outside the nucleus, add nothing to the cdf and are skipped).
    return torch.minimum(choice, torch.searchsorted(cdf, total)).squeeze(-1)

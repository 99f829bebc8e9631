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
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from alignbench.logprobs import ForwardKeywords, position_ids_from_mask, sampling_logprobs

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
    max_length = max((len(row) for row in rows), default=0) + max_new_tokens
    decoder = _LlamaDecoder.of(model, max_length) or _TransformersDecoder(model)

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
                decoder,
                [rows[i] for i in batch_rows],
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
    decoder: _LlamaDecoder | _TransformersDecoder,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
) -> tuple[list[list[int]], list[float], list[bool], list[float]]:
    """Decode one left-padded batch; returns (responses, logprob sums, finished, sampling logprob sums) per row."""
    device = decoder.device
    num_rows, prompt_width = len(prompts), max(len(p) for p in prompts)

    input_ids = torch.full((num_rows, prompt_width), pad_token_id, dtype=torch.long)
    # One mask buffer for prompt and generated tokens, so each step only flips a column to 1.
    mask = torch.zeros((num_rows, prompt_width + max_new_tokens), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, prompt_width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, prompt_width - len(prompt) : prompt_width] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    position_ids = position_ids_from_mask(mask[:, :prompt_width])

    # Results, indexed by the row's place in `prompts`, copied from the rows still in the batch
    # when rows are dropped and at the end.
    generated = torch.full((num_rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    lengths = torch.zeros(num_rows, dtype=torch.long, device=device)
    sums = torch.zeros((num_rows, 2), dtype=torch.float32, device=device)  # logprob, sampling logprob
    finished = torch.zeros(num_rows, dtype=torch.bool, device=device)

    # The rows still in the batch (R of them): their place in `prompts`, what they generated so far,
    # and whether they are done (finished, i.e. produced EOS, but not yet dropped; they keep
    # decoding padding that is thrown away).
    live = torch.arange(num_rows, device=device)
    live_generated, live_lengths, live_sums = generated.clone(), lengths.clone(), sums.clone()
    done = finished.clone()

    def copy_out() -> None:
        generated[live], lengths[live], sums[live], finished[live] = live_generated, live_lengths, live_sums, done

    decoder.start(num_rows, prompt_width + max_new_tokens)
    for step in range(max_new_tokens):
        logits = decoder(input_ids, position_ids, mask[:, : prompt_width + step]).float()  # [R, V]
        token, token_logprob, token_sampling_logprob = _next_token(logits, temperature, top_p, generator)
        token.masked_fill_(done, pad_token_id)
        live_generated[:, step] = token
        live_sums += torch.stack((token_logprob, token_sampling_logprob), dim=1).masked_fill_(done[:, None], 0.0)
        live_lengths += ~done
        done |= token == eos_token_id
        num_done = int(done.sum())
        if num_done == len(done):
            break
        if num_done >= _COMPACT_FRACTION * len(done):
            copy_out()
            keep = (~done).nonzero().squeeze(1)
            decoder.select_rows(keep)
            live, live_generated, live_lengths, live_sums, done = live[keep], live_generated[keep], live_lengths[keep], live_sums[keep], done[keep]
            token, position_ids, mask = token[keep], position_ids[keep], mask[keep]

        mask[:, prompt_width + step] = 1
        input_ids = token.unsqueeze(1)
        position_ids = position_ids[:, -1:] + 1
    copy_out()

    responses = [tokens[:length] for tokens, length in zip(generated.tolist(), lengths.tolist())]
    logprobs, sampled_logprobs = sums.T.tolist()
    return responses, logprobs, finished.tolist(), sampled_logprobs


class _TransformersDecoder:
    """Decoding steps through the model's own forward and a transformers ``DynamicCache``."""

    def __init__(self, model: nn.Module):
        self.model, self.keywords = model, ForwardKeywords.of(model)
        self.device = next(model.parameters()).device
        self.extra = {"logits_to_keep": 1} if self.keywords.logits_to_keep else {}
        self.cache = None

    def start(self, num_rows: int, max_length: int) -> None:
        """An empty cache for a new batch."""
        self.cache = DynamicCache(config=self.model.config) if _CACHE_TAKES_CONFIG else DynamicCache()

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

    The operations are those of transformers' ``modeling_llama`` (RMSNorm in float32, rotary
    embeddings, SwiGLU), called on the weights without the Python layers around them (module
    calls, mask builders, cache and output objects, decorators). On the world's models each
    operation costs more to launch than to compute, so fewer, larger ones are what make decoding
    fast (``benchmarks/rollout.py``):

    * the q/k/v projections are one matmul, on weights stacked once per :func:`sample` call (for
      models whose stacked copies would take more than ``_STACKED_WEIGHTS_MAX_BYTES``, one matmul
      each, their outputs concatenated);
    * rotary embeddings are looked up in a cos/sin table of every position, computed once, and
      applied to queries and keys together;
    * keys and values are written once into buffers sized for the batch, where transformers
      concatenates every layer's cache anew at each step (a copy of the whole cache). The buffers
      are position-major, so a step writes one block and attention reads one block: on the CPU a
      decoding step's attention is bound by memory traffic, and this layout is ~20% faster than
      rows first. Attention is two batched matmuls with an additive mask that each step extends
      by a column (see :meth:`_attention`).

    Logits differ from the transformers forward in the last bits (~1e-7; the matmuls' and
    attention's sums are split differently): samples are the same unless a uniform draw falls
    within that distance of a boundary of the inverse CDF (the tests compare the two paths sample
    for sample). Where one does, the rows after it draw differently too: a row that ends a step
    earlier or later changes when rows are dropped, hence which uniform each later row gets from
    the one generator (benchmarks/README.md, section 1).
    """

    def __init__(self, model: nn.Module, max_length: int):
        base, config = model.model, model.config
        attention = base.layers[0].self_attn
        self.num_heads, self.head_dim = config.num_attention_heads, attention.head_dim
        self.scaling = getattr(attention, "scaling", self.head_dim**-0.5)  # an attribute since transformers 4.48
        self.min_width = -(-_NAIVE_BATCHED_MATMUL_BELOW // self.head_dim)  # positions attention reads at least
        self.embed, self.norm = base.embed_tokens.weight, (base.norm.weight, base.norm.variance_epsilon)
        self.device = self.embed.device
        self.lm_head = (model.lm_head.weight, model.lm_head.bias)
        stack = sum(
            p.numel() * p.element_size()
            for layer in base.layers
            for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)
            for p in linear.parameters()
        ) <= _STACKED_WEIGHTS_MAX_BYTES
        self.layers = [_LlamaLayer.of(layer, stack) for layer in base.layers]
        # cos and sin of every position a row can reach ([W, D]); transformers computes each
        # position's value alone (an elementwise product, then cos/sin), so the table is exact.
        # sin's first half is negated here, which turns rotate_half's negation into a swap of halves.
        positions = torch.arange(max_length, device=self.device)[None]
        cos, sin = base.rotary_emb(self.embed[:1], positions)
        half = self.head_dim // 2
        self.cos, self.sin = cos[0], torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)
        self.cache = self.bias = torch.empty(0)
        self.length = 0

    @classmethod
    def of(cls, model: nn.Module, max_length: int) -> _LlamaDecoder | None:
        """A decoder for ``model`` and sequences of at most ``max_length`` tokens, or None unless its
        forward is the one mirrored here (a plain Llama with SDPA attention and static rotary
        frequencies: no LoRA or quantised layers, no grouped-query attention, no hooks)."""
        from transformers.models.llama import modeling_llama as llama

        if type(model) is not llama.LlamaForCausalLM:
            return None
        config, base = model.config, model.model
        if (
            config._attn_implementation != "sdpa"
            or config.num_key_value_heads != config.num_attention_heads
            or getattr(config, "pretraining_tp", 1) != 1
            or not hasattr(base, "rotary_emb")  # transformers before 4.45 keeps it in each layer
            or type(base.rotary_emb) is not llama.LlamaRotaryEmbedding
            # These rope types change their frequencies with the sequence length.
            or "dynamic" in getattr(base.rotary_emb, "rope_type", "default")
            or getattr(base.rotary_emb, "rope_type", "default") == "longrope"
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
        return cls(model, max_length)

    def start(self, num_rows: int, max_length: int) -> None:
        """Empty buffers for a batch of ``num_rows`` rows of at most ``max_length`` tokens."""
        # Keys and values [layer, key or value, W, R, H, D], position-major (see the class docstring).
        # Attention reads the positions written so far, and at least the first `min_width`: only
        # those can be read before they are written.
        shape = (len(self.layers), 2, max_length, num_rows, self.num_heads, self.head_dim)
        self.cache = torch.empty(shape, dtype=self.embed.dtype, device=self.device)
        self.cache[:, :, : self.min_width].zero_()
        # The additive attention mask of a decoding step, per (row, head): -inf until a position is fed.
        self.bias = torch.full((num_rows, self.num_heads, 1, max_length), float("-inf"), dtype=self.embed.dtype, device=self.device)
        self.length = 0

    def __call__(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """As :meth:`_TransformersDecoder.__call__`."""
        rows, new = input_ids.shape
        start, end = self.length, self.length + new
        heads, dim = self.num_heads, self.head_dim
        fed = attention_mask[:, None, None, start:end].bool()  # [R, 1, 1, S]
        self.bias[..., start:end].masked_fill_(fed, 0.0)
        if new > 1:  # the prompt: causal, and key padding, except that a padding position sees itself
            # (a query seeing no key has no softmax: some SDPA kernels return NaN, which the padding
            # positions' keys and values of the next layer would carry into the cache; masked as keys,
            # their finite values get an exact zero weight).
            itself = torch.eye(new, dtype=torch.bool, device=fed.device)
            prompt_mask = (fed | itself) & torch.ones_like(itself).tril_()
        # [R, S, 1, 1, D], to broadcast over queries/keys and heads
        cos, sin = self.cos[position_ids][:, :, None, None], self.sin[position_ids][:, :, None, None]
        hidden = F.embedding(input_ids.view(-1), self.embed)  # [R * S, E]: one row per token
        for index, layer in enumerate(self.layers):
            qkv = _project(_rms_norm(hidden, *layer.attention_norm), layer.qkv).view(rows, new, 3, heads, dim)
            query_key = qkv[:, :, :2]
            # rotate_half(x) * sin == swap_halves(x) * sin with sin's first half negated
            query_key = query_key.roll(dim // 2, dims=-1).mul_(sin).add_(query_key * cos)  # [R, S, 2, H, D]
            keys_values = self.cache[index]  # [2, W, R, H, D]
            keys_values[0, start:end] = query_key[:, :, 1].transpose(0, 1)
            keys_values[1, start:end] = qkv[:, :, 2].transpose(0, 1)
            query = query_key[:, :, 0].transpose(1, 2)  # [R, H, S, D]
            if new > 1:  # start is 0: the keys and values are this prompt's own
                output = F.scaled_dot_product_attention(
                    query, query_key[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2),
                    attn_mask=prompt_mask, dropout_p=0.0, scale=self.scaling, is_causal=False,
                )
            else:
                output = self._attention(query, keys_values, end)
            hidden = F.linear(output.transpose(1, 2).reshape(rows * new, -1), *layer.output).add_(hidden)
            normed = _rms_norm(hidden, *layer.mlp_norm)
            hidden = F.linear(layer.act(F.linear(normed, *layer.gate)).mul_(F.linear(normed, *layer.up)), *layer.down).add_(hidden)
        self.length = end
        # RMSNorm and the head act on each position alone: only the last one is needed.
        return F.linear(_rms_norm(hidden.view(rows, new, -1)[:, -1], *self.norm), *self.lm_head)

    def _attention(self, query: Tensor, keys_values: Tensor, end: int) -> Tensor:
        """One query per row ``[R, H, 1, D]`` over the first ``end`` positions of ``keys_values [2, W, R, H, D]``.

        Two batched matmuls with the additive mask (transformers' eager formulation): for one query
        over a short cache they cost about two thirds of SDPA's CPU kernel. The buffers' slices are
        strided views, which the matmuls read in place (SDPA would copy them). They read at least
        ``min_width`` positions (zeros, masked, where not yet written): with fewer, torch's CPU
        matmuls would take their naive loop (``_NAIVE_BATCHED_MATMUL_BELOW``).
        """
        rows, heads, _, dim = query.shape
        end = min(keys_values.shape[1], max(end, self.min_width))
        keys, values = keys_values[:, :end].view(2, end, rows * heads, dim).transpose(1, 2)  # [RH, end, D] each
        bias = self.bias.view(rows * heads, 1, -1)[:, :, :end]
        scores = torch.baddbmm(bias, query.reshape(rows * heads, 1, dim), keys.transpose(1, 2), alpha=self.scaling)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
        return torch.bmm(weights, values).view(rows, heads, 1, dim)

    def select_rows(self, keep: Tensor) -> None:
        """As :meth:`_TransformersDecoder.select_rows`."""
        self.cache, self.bias = self.cache[:, :, :, keep], self.bias[keep]


# torch's CPU batched matmul computes products of fewer than this many multiply-adds per batch
# entry in a naive loop, about twice as slow as its wider kernel (see _LlamaDecoder._attention).
_NAIVE_BATCHED_MATMUL_BELOW = 400

# Stack a Llama layer's q/k/v weights into one matmul only while the stacked copies stay this
# small: on the world's models the saved operation launches are the gain, and on a large model
# copying its weights would cost memory for no measurable speed. (Stacking gate and up too was
# no faster: the activation then reads a strided half, which costs what the saved launch saves.)
_STACKED_WEIGHTS_MAX_BYTES = 64 * 2**20

_Linear = tuple[Tensor, "Tensor | None"]


@dataclass(frozen=True)
class _LlamaLayer:
    """One decoder layer's weights, as the direct decoder uses them: (weight, bias) pairs, eps."""

    attention_norm: tuple[Tensor, float]
    qkv: list[_Linear]  # one stacked (weight, bias), or q, k, v separately
    output: _Linear
    mlp_norm: tuple[Tensor, float]
    gate: _Linear
    up: _Linear
    down: _Linear
    act: Callable[[Tensor], Tensor]

    @classmethod
    def of(cls, layer: nn.Module, stack: bool) -> _LlamaLayer:
        attention, mlp = layer.self_attn, layer.mlp
        return cls(
            attention_norm=(layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
            qkv=_stacked([attention.q_proj, attention.k_proj, attention.v_proj], stack),
            output=(attention.o_proj.weight, attention.o_proj.bias),
            mlp_norm=(layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon),
            gate=(mlp.gate_proj.weight, mlp.gate_proj.bias),
            up=(mlp.up_proj.weight, mlp.up_proj.bias),
            down=(mlp.down_proj.weight, mlp.down_proj.bias),
            act=mlp.act_fn,
        )


def _stacked(linears: list[nn.Linear], stack: bool) -> list[_Linear]:
    """``linears`` as one (weight, bias) with their outputs side by side, or as they are."""
    if not stack:
        return [(linear.weight, linear.bias) for linear in linears]
    biases = [linear.bias for linear in linears]
    bias = None if biases[0] is None else torch.cat(biases)
    return [(torch.cat([linear.weight for linear in linears]), bias)]


def _project(hidden: Tensor, linears: list[_Linear]) -> Tensor:
    """The outputs of ``linears`` on ``hidden``, side by side."""
    if len(linears) == 1:
        return F.linear(hidden, *linears[0])
    return torch.cat([F.linear(hidden, *linear) for linear in linears], dim=-1)


def _rms_norm(hidden: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``LlamaRMSNorm.forward``: normalised in float32, then cast back and scaled.

    ``F.rms_norm`` computes ``x * rsqrt(mean(x**2) + eps) * weight`` as transformers does, to the
    bit in float32 (tested), in one call instead of six.
    """
    if hidden.dtype == torch.float32:
        return F.rms_norm(hidden, weight.shape, weight, eps)
    return weight * F.rms_norm(hidden.float(), weight.shape, None, eps).to(hidden.dtype)


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

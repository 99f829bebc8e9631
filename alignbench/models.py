"""Policies, tokenizers and reward models.

A policy is any Hugging Face causal LM. For the built-in world there are named tiny
Llama-style configurations, built from a config with no download, and a word-level tokenizer
built from the world's vocabulary; both save and load with the ordinary HF API, so the
rest of alignbench never needs to know whether it runs on the world or on a real model.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>"}
SEPARATOR = "<sep>"
# The world's prompt format is a one-turn chat template, so the world takes the same
# code path as a real instruct model whose tokenizer carries a chat template.
WORLD_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %} {{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %} <sep>{% endif %}"
)


@dataclass(frozen=True)
class TinyModelSize:
    n_layer: int
    n_embd: int
    n_head: int


# Named sizes for scaling plots (InstructGPT Fig. 1 analogue); parameter counts are for
# the world's ~230-word vocabulary.
TINY_MODELS: dict[str, TinyModelSize] = {
    "world-tiny": TinyModelSize(n_layer=2, n_embd=64, n_head=2),  # ~0.12M parameters
    "world-mini": TinyModelSize(n_layer=2, n_embd=128, n_head=4),  # ~0.45M
    "world-small": TinyModelSize(n_layer=4, n_embd=128, n_head=4),  # ~0.85M
    "world-base": TinyModelSize(n_layer=6, n_embd=256, n_head=8),  # ~4.8M
}
MAX_POSITIONS = 64


def build_world_tokenizer(vocabulary: Sequence[str]):
    """A word-level `PreTrainedTokenizerFast` over the world's words (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values()) + [SEPARATOR]
    vocab = {token: i for i, token in enumerate(specials)}
    for word in vocabulary:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # WordPiece's decoder with an impossible prefix joins words with single spaces.
    backend.decoder = decoders.WordPiece(prefix="\x00", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)
    tokenizer.add_special_tokens({"additional_special_tokens": [SEPARATOR]})
    tokenizer.chat_template = WORLD_CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


class TextCodec:
    """Turns prompts and responses into token ids and back, the same way for every method.

    Prompts go through the tokenizer's chat template when it has one (the world's
    tokenizer does), otherwise they are encoded as plain text. Responses end in EOS.
    Encoded prompts are memoised: the same prompts are encoded many times per run.
    """

    def __init__(self, tokenizer, use_chat_template: bool = True):
        self.tokenizer = tokenizer
        self.use_chat_template = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_token_id: int = tokenizer.pad_token_id
        self.eos_token_id: int = tokenizer.eos_token_id
        self._prompt_cache: dict[str, list[int]] = {}

    def encode_prompt(self, prompt: str) -> list[int]:
        ids = self._prompt_cache.get(prompt)
        if ids is None:
            if self.use_chat_template:
                ids = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
                )
                if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                    ids = ids["input_ids"]
                ids = list(ids)
            else:
                ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            self._prompt_cache[prompt] = ids
        return ids

    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        return [self.encode_prompt(p) for p in prompts]

    def encode_responses(self, responses: Sequence[str]) -> list[list[int]]:
        encoded = self.tokenizer(list(responses), add_special_tokens=False)["input_ids"]
        return [ids + [self.eos_token_id] for ids in encoded]

    def decode_responses(self, response_ids: Sequence[Sequence[int]]) -> list[str]:
        trimmed = [[t for t in ids if t != self.eos_token_id and t != self.pad_token_id] for ids in response_ids]
        return [text.strip() for text in self.tokenizer.batch_decode(trimmed, skip_special_tokens=True)]


def build_tiny_policy(name: str, tokenizer, seed: int = 0):
    """A randomly initialised Llama-style causal LM of one of the named sizes, built without a download.

    Rotary position embeddings learn the world's copying families (reverse, sort, "say
    something positive about the X") faster than GPT-2's learned absolute positions: on
    the quickstart, SFT gold 0.52 against 0.49 at the same size, in less time.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    size = TINY_MODELS[name]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.n_embd,
        intermediate_size=int(size.n_embd * 8 / 3 / 8) * 8 + 8,  # SwiGLU width with GPT-2's MLP parameter count
        num_hidden_layers=size.n_layer,
        num_attention_heads=size.n_head,
        num_key_value_heads=size.n_head,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def load_pretrained_policy(path: str, *, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32):
    """Load any HF causal LM by hub name or local path (weights via safetensors where offered)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, dtype=dtype)


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def freeze(model: nn.Module) -> nn.Module:
    """Frozen copy semantics for reference models: eval mode, no gradients."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class RewardModel(nn.Module):
    """A causal-LM backbone with a scalar head read at the last non-padding token.

    InstructGPT initialises the reward model from the SFT policy; `from_policy` does the
    same. `calibration` holds an affine map (scale, bias) applied to the raw score before
    the sigmoid, so that `probability` can be thresholded as Llama 2 does (safety < 0.15).
    """

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("calibration", torch.tensor([1.0, 0.0]))

    @classmethod
    def from_policy(cls, policy) -> "RewardModel":
        backbone = copy.deepcopy(policy.base_model)
        return cls(backbone, policy.config.get_text_config().hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Raw scores, shape [B], for sequences [B, T] padded on either side."""
        from alignbench.logprobs import position_ids_from_mask

        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
        ).last_hidden_state
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = (attention_mask.bool() * positions).argmax(dim=1)  # last real token, left or right padded
        return self.head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last]).squeeze(-1).float()

    def probability(self, raw: torch.Tensor) -> torch.Tensor:
        scale, bias = self.calibration
        return torch.sigmoid(raw * scale + bias)

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(directory / "backbone")
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()} | {"calibration": self.calibration}, directory / "head.safetensors")
        (directory / "reward_model.json").write_text(json.dumps({"hidden_size": self.head.in_features}))

    @classmethod
    def load(cls, directory: Path) -> "RewardModel":
        from safetensors.torch import load_file
        from transformers import AutoModel

        meta = json.loads((directory / "reward_model.json").read_text())
        model = cls(AutoModel.from_pretrained(directory / "backbone"), meta["hidden_size"])
        tensors = load_file(directory / "head.safetensors")
        model.calibration.copy_(tensors.pop("calibration"))
        model.head.load_state_dict(tensors)
        return model

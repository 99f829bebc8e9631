"""Policies, tokenizers and reward models.

A policy is any Hugging Face causal LM. For the built-in world there are named tiny
Llama-style configurations, built from a config with no download, and a word-level tokenizer
built from the world's vocabulary; both save and load with the ordinary HF API, so the
rest of alignbench never needs to know whether it runs on the world or on a real model.

Real models add three things, all optional: low-rank adapters (LoRA, via peft), where the
frozen reference is the same weights run with the adapters disabled (no second copy);
gradient checkpointing; and the dtype weights are loaded in, from the trainer's precision.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from alignbench.config import ConfigError

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
    "world-mini": TinyModelSize(n_layer=2, n_embd=128, n_head=4),  # ~0.43M
    "world-small": TinyModelSize(n_layer=4, n_embd=128, n_head=4),  # ~0.82M
    "world-base": TinyModelSize(n_layer=6, n_embd=256, n_head=8),  # ~4.8M
}
MAX_POSITIONS = 64
# The reward model's optional likelihood term (RewardModel).
LIKELIHOOD_TERMS = ("none", "mean", "sum")


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


# A prompt is one string everywhere (datasets, judges, samples.jsonl). A multi-turn prompt is
# stored in the hh-rlhf dialogue form, "Human: …\n\nAssistant: …\n\nHuman: …", and turned
# back into chat messages when the tokenizer's chat template is applied.
_SPEAKERS = {"system": "System", "user": "Human", "assistant": "Assistant"}
_ROLES = {speaker: role for role, speaker in _SPEAKERS.items()}
_TURN_MARKER = re.compile(r"\n\n(Human|Assistant|System):")


def split_dialogue(text: str) -> list[dict[str, str]] | None:
    """Chat messages of a dialogue in the hh-rlhf form ("\n\nHuman: …\n\nAssistant: …"),
    or None when the text is not one. Contents are stripped; an empty last turn stays empty."""
    parts = _TURN_MARKER.split(text if text.startswith("\n\n") else "\n\n" + text)
    if len(parts) < 3 or parts[0].strip():
        return None
    return [{"role": _ROLES[speaker], "content": content.strip()} for speaker, content in zip(parts[1::2], parts[2::2])]


def render_conversation(messages: Sequence[dict[str, str]]) -> str:
    """The prompt string of chat messages: a lone user message is its text; anything longer
    is written in the hh-rlhf dialogue form that `conversation_messages` reads back."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{_SPEAKERS[m['role']]}: {m['content']}" for m in messages)


def conversation_messages(prompt: str) -> list[dict[str, str]]:
    """The chat messages a prompt string stands for (see `render_conversation`)."""
    if prompt.startswith(("Human:", "System:")):
        messages = split_dialogue(prompt)
        if messages is not None:
            return messages
    return [{"role": "user", "content": prompt}]


class TextCodec:
    """Turns prompts and responses into token ids and back, the same way for every method.

    Prompts go through the tokenizer's chat template when it has one (the world's
    tokenizer does; a multi-turn prompt becomes its chat messages), otherwise they are
    encoded as plain text. Responses end in EOS.
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
                    conversation_messages(prompt), add_generation_prompt=True, tokenize=True
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


def load_pretrained_policy(path: str, *, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32, key: str | None = None):
    """Load any HF causal LM by hub name or local path (weights via safetensors where offered).
    `key`: the config key that named it (e.g. "model.name"); a model that cannot be found or read
    is then a ConfigError naming the key (see `named_model`)."""
    from transformers import AutoModelForCausalLM

    with named_model(key, path):
        return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, dtype=dtype)


def load_tokenizer(path: str, *, trust_remote_code: bool = False, key: str | None = None):
    """A model's tokenizer, left-padded (pad = EOS where it has none); `key` as in `load_pretrained_policy`."""
    from transformers import AutoTokenizer

    with named_model(key, path):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


@contextlib.contextmanager
def named_model(key: str | None, name: str):
    """Where a config key (`key`) names the model `name`, turn transformers' errors for a model that
    cannot be found or read (OSError: not on the hub, no network, not a repo id; ValueError: a folder
    that holds no model) into a ConfigError that names the key, the value and what is accepted,
    instead of a traceback. The folders alignbench writes itself load with `key` None: a damaged one
    is not the user's input, and its error is left as it is."""
    if key is None:
        yield
        return
    try:
        yield
    except (OSError, ValueError) as error:
        from huggingface_hub import is_offline_mode

        reason = " ".join(str(error).split())
        # (A local path that does not exist is refused earlier, as the config loads: validate_for_source.)
        folder = Path(name).expanduser()
        if folder.is_dir() and not (folder / "config.json").is_file():
            reason = f"the folder {name} holds no config.json, so no model saved with save_pretrained"
        if "trust_remote_code" in reason:
            reason += f" (set {key.rpartition('.')[0]}.trust_remote_code=true if you trust that code)"
        offline = " (the hub is offline here: HF_HUB_OFFLINE is set, so a hub model loads only if it is in the local cache)" if is_offline_mode() else ""
        sft = "'sft' (the SFT checkpoint), " if key == "ai_labeler.model" else ""
        raise ConfigError(
            f"{key}={name!r} cannot be loaded: {reason} -- {key} takes {sft}a world model ({', '.join(TINY_MODELS)}), a local folder "
            f"saved with save_pretrained, or a Hugging Face hub name{offline}"
        ) from error


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def freeze(model: nn.Module) -> nn.Module:
    """Frozen copy semantics for reference models: eval mode, no gradients."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def disable_dropout(model: nn.Module) -> nn.Module:
    """Every dropout of `model` set to 0, in train mode too (TRL's `disable_dropout`): `nn.Dropout`
    modules and the attention dropout that Llama-style attention keeps as a float attribute. For RL
    from the policy's own samples: the rollouts, their log-probs π_old and each update's π must be
    the same function, or the importance ratio starts away from 1 and the KL measures dropout noise."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    return model


# --- real models: precision, LoRA, gradient checkpointing ---------------------------------
_HALF_WEIGHTS = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}


def weights_dtype(precision: str) -> torch.dtype:
    """The dtype to load weights in for a Lightning precision: half only for the '-true'
    settings; mixed precision keeps float32 master weights and computes in half under autocast."""
    return _HALF_WEIGHTS.get(precision, torch.float32)


@dataclass
class LoRAConfig:
    """Low-rank adapters (Hu et al. 2021, arXiv 2106.09685) through peft: W + (α/r)·B·A with
    B initialised to zero, so a freshly adapted model computes exactly what its base does."""

    enabled: bool = False
    """Train adapters instead of all weights: the SFT stage merges its adapters into the SFT
    policy; each method trains fresh adapters on it, and its reference is the same weights
    with the adapters disabled (no second copy of the model)."""
    r: int = 16
    """Rank of each adapter."""
    alpha: float = 32.0
    """Scale α of the adapters' output (α / r multiplies B·A)."""
    dropout: float = 0.0
    """Dropout on the adapters' input (0 keeps the policy equal to its reference at step 0)."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt (e.g. [q_proj, v_proj]); ['all-linear']: every linear layer but the output head."""

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"model.lora.r={self.r} must be >= 1")
        if not self.alpha > 0:
            raise ValueError(f"model.lora.alpha={self.alpha} must be > 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.lora.dropout={self.dropout} must be in [0, 1)")
        if not self.target_modules:
            raise ValueError("model.lora.target_modules must name at least one module, or be ['all-linear']")


def add_lora(model: nn.Module, config: LoRAConfig, causal_lm: bool = True) -> nn.Module:
    """`model` wrapped with fresh trainable adapters; only the adapters require gradients."""
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if list(config.target_modules) == ["all-linear"] else list(config.target_modules)
    lora = LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets,
        task_type="CAUSAL_LM" if causal_lm else None,
    )
    return get_peft_model(model, lora)


def merge_lora(model: nn.Module) -> nn.Module:
    """The plain model with its adapters folded into the weights (unchanged without adapters)."""
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def prepare_for_training(model: nn.Module, lora: LoRAConfig, gradient_checkpointing: bool, seed: int, causal_lm: bool = True) -> nn.Module:
    """Turn on gradient checkpointing and add adapters (initialised from `seed`, without
    touching the global random stream), as the model config asks."""
    if gradient_checkpointing:
        # Non-reentrant checkpointing also works when only adapters (not the inputs) need gradients.
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora.enabled:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = add_lora(model, lora, causal_lm=causal_lm)
    return model.train()


class AdapterDisabledReference(nn.Module):
    """The frozen reference policy as a view of the trained one: the policy's own weights,
    run with its LoRA adapters disabled, in eval mode and without gradients.

    With LoRA the SFT weights stay frozen under the adapters, so "the policy without its
    adapters" is exactly the SFT policy and no second copy is needed. The view is bound to
    the first policy a run loads (`RunContext.load_policy`); a policy without adapters (a
    method that does not train) is its own reference.
    """

    def __init__(self):
        super().__init__()
        self.policy = None

    def bind(self, policy: nn.Module) -> None:
        if self.policy is None:
            self.policy = policy

    def _bound(self) -> nn.Module:
        if self.policy is None:
            raise RuntimeError("the reference is a view of the run's policy; load the policy first (RunContext.load_policy)")
        return self.policy

    @property
    def config(self):
        return self._bound().config

    def get_base_model(self) -> nn.Module:
        """The transformers model under the adapters (the sampler reads its forward's keywords)."""
        policy = self._bound()
        return policy.get_base_model() if hasattr(policy, "get_base_model") else policy

    def forward(self, *args, **kwargs):
        from peft import PeftModel

        policy = self._bound()
        was_training = policy.training
        policy.eval()
        try:
            disabled = policy.disable_adapter() if isinstance(policy, PeftModel) else contextlib.nullcontext()
            with torch.no_grad(), disabled:
                return policy(*args, **kwargs)
        finally:
            policy.train(was_training)

    def train(self, mode: bool = True) -> AdapterDisabledReference:
        return self  # the policy's mode belongs to its training loop; `forward` runs it in eval mode

    def requires_grad_(self, requires_grad: bool = True) -> AdapterDisabledReference:
        return self  # never freeze the policy through its reference view


class RewardModel(nn.Module):
    """A causal-LM backbone with a scalar head read at the last non-padding token, and
    optionally a likelihood term.

    InstructGPT initialises the reward model from the SFT policy; `from_policy` does the
    same. `calibration` holds an affine map (scale, bias) applied to the raw score before
    the sigmoid, so that `probability` can be thresholded as Llama 2 does (safety < 0.15).

    The likelihood term (`likelihood="mean"` or `"sum"`) adds w · log p(y | x), the response's
    log-likelihood (mean or sum over its tokens) under the backbone's own language-model head,
    with w a learned scalar (initial value 1). The ranking loss trains the head, the backbone
    and w together, so the term is SimPO's reference-free implicit reward (Meng et al. 2024)
    beside InstructGPT's head; with w → 0 it is the plain InstructGPT reward model. Why: a head
    read at one token of a small backbone does not learn to check an answer against its prompt
    (is 19 the sum of 10 and 9?) from a few thousand comparisons, but the SFT policy it starts
    from already predicts such answers token by token. On the quickstart's 3,000 labelled prompts
    held-out accuracy against gold went from 0.68 to 0.77; a likelihood score alone got 0.66.

    Two architectures, scored the same way: alignbench's backbone + head (`from_policy`), or
    a Hugging Face `AutoModelForSequenceClassification` with one label (`from_sequence_classifier`),
    which is saved as one, so that transformers loads the trained reward model as it is (it
    has no language-model head, so no likelihood term).
    """

    def __init__(self, backbone: nn.Module, hidden_size: int, head: nn.Linear | None = None, likelihood: str = "none", lm_head: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        if head is None:
            head = nn.Linear(hidden_size, 1)
            nn.init.normal_(head.weight, std=1.0 / (hidden_size + 1) ** 0.5)
            nn.init.zeros_(head.bias)
        self.head = head
        if likelihood not in LIKELIHOOD_TERMS:
            raise ValueError(f"likelihood={likelihood!r}: expected one of {', '.join(LIKELIHOOD_TERMS)}")
        self.likelihood = likelihood
        self.lm_head = lm_head if likelihood != "none" else None  # None with a term: tied to the backbone's input embeddings
        if likelihood != "none":
            self.likelihood_weight = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("calibration", torch.tensor([1.0, 0.0]))
        # The whole classifier (whose modules are `backbone` and `head`), kept unregistered so
        # that its parameters are not counted twice; deepcopy keeps the sharing.
        self.__dict__["_classifier"] = None

    @classmethod
    def from_policy(cls, policy, likelihood: str = "none") -> RewardModel:
        """A reward model initialised from a causal-LM policy (a copy: the policy is left alone).
        With a likelihood term it keeps the policy's language-model head: as the backbone's
        input embeddings when the policy ties them (the world's models do), else as a copy."""
        from peft import PeftModel

        if isinstance(policy, PeftModel):  # a LoRA policy's backbone is its merged weights
            policy = merge_lora(copy.deepcopy(policy))
            backbone = policy.base_model
        else:
            backbone = copy.deepcopy(policy.base_model)
        lm_head = None
        if likelihood != "none":
            output = policy.get_output_embeddings()
            if output is None:
                raise ValueError(f"{type(policy).__name__} has no language-model head, so its reward model cannot have a likelihood term: set reward_model.likelihood=none")
            if output.weight is not policy.get_input_embeddings().weight:
                lm_head = copy.deepcopy(output)
        return cls(backbone, policy.config.get_text_config().hidden_size, likelihood=likelihood, lm_head=lm_head)

    @classmethod
    def from_sequence_classifier(cls, classifier) -> RewardModel:
        """A reward model from an `AutoModelForSequenceClassification` with one label."""
        head = getattr(classifier, "score", None)
        if not isinstance(head, nn.Linear) or head.out_features != 1:
            raise ValueError(f"{type(classifier).__name__} has no one-label linear 'score' head; a reward model needs num_labels=1")
        model = cls(classifier.base_model, head.in_features, head=head)
        model.__dict__["_classifier"] = classifier
        return model

    @property
    def architecture(self) -> str:
        return "backbone_head" if self._classifier is None else "sequence_classification"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Raw scores, shape [B], for sequences [B, T] padded on either side. `response_mask`
        [B, T] (True at response tokens) is needed by a reward model with a likelihood term."""
        from alignbench.logprobs import position_ids_from_mask

        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
        ).last_hidden_state
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = (attention_mask.bool() * positions).argmax(dim=1)  # last real token, left or right padded
        score = self.head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last]).squeeze(-1).float()
        if self.likelihood == "none":
            return score
        if response_mask is None:
            raise ValueError("this reward model has a likelihood term: pass the response_mask of the batch (PackedBatch.response_mask)")
        return score + self.likelihood_weight * self.response_loglikelihood(hidden, input_ids, response_mask)

    def score_shared(self, batch) -> torch.Tensor:
        """Raw scores [R] of the R responses of a `SharedPromptBatch`: each as `forward` scores its
        prompt + response alone (up to float rounding), with the prompt through the model once and
        several prompts to a row when the batch is packed."""
        from alignbench.logprobs import select_positions

        dtype = next(self.backbone.parameters()).dtype
        batch = batch.to(self.head.weight.device)
        hidden = self.backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask(dtype, self.backbone.config), position_ids=batch.position_ids).last_hidden_state
        score = self.head(hidden[batch.ends[:, 0], batch.ends[:, 1]]).squeeze(-1).float()
        if self.likelihood == "none":
            return score
        predicting, targets, owners, _ = batch.response_tokens()
        likelihood = self._loglikelihood(select_positions(hidden, predicting), targets, owners, batch.num_responses)
        return score + self.likelihood_weight * likelihood

    def response_loglikelihood(self, hidden: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        """[B] float32: log p(response | prompt) under the language-model head, the sum or the mean
        over response tokens."""
        targets = response_mask[:, 1:].bool()  # position t predicts token t + 1
        rows = targets.nonzero(as_tuple=True)[0]
        return self._loglikelihood(hidden[:, :-1][targets], input_ids[:, 1:][targets], rows, input_ids.shape[0])

    def _loglikelihood(self, states: torch.Tensor, targets: torch.Tensor, owners: torch.Tensor, num_sequences: int) -> torch.Tensor:
        """[num_sequences] float32: the sum (or mean) of log p(target | state) over each sequence's
        tokens; `owners` says which sequence a (state, target) pair belongs to. Logits are computed
        at these states only (a [tokens, vocab] tensor, not [B, T, vocab])."""
        from alignbench.logprobs import target_logprobs

        weight = self.lm_head.weight if self.lm_head is not None else self.backbone.get_input_embeddings().weight
        logits = nn.functional.linear(states, weight, self.lm_head.bias if self.lm_head is not None else None)
        logprobs = target_logprobs(logits, targets)
        total = torch.zeros(num_sequences, device=states.device, dtype=torch.float32).index_add(0, owners, logprobs)
        if self.likelihood == "mean":
            counts = torch.zeros(num_sequences, device=states.device, dtype=torch.long).index_add(0, owners, torch.ones_like(owners))
            total = total / counts.clamp(min=1)
        return total

    def probability(self, raw: torch.Tensor) -> torch.Tensor:
        scale, bias = self.calibration
        return torch.sigmoid(raw * scale + bias)

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        meta = {"hidden_size": self.head.in_features, "architecture": self.architecture}
        if self._classifier is None:
            self.backbone.save_pretrained(directory / "backbone")
            tensors = {k: v.contiguous() for k, v in self.head.state_dict().items()} | {"calibration": self.calibration}
            if self.likelihood != "none":
                tensors["likelihood_weight"] = self.likelihood_weight.detach()
                if self.lm_head is not None:
                    tensors |= {f"lm_head.{k}": v.contiguous() for k, v in self.lm_head.state_dict().items()}
                meta |= {"likelihood": self.likelihood, "lm_head": "tied" if self.lm_head is None else "own"}
            save_file(tensors, directory / "head.safetensors")
        else:
            self._classifier.save_pretrained(directory / "classifier")
            save_file({"calibration": self.calibration}, directory / "calibration.safetensors")
        (directory / "reward_model.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: Path) -> RewardModel:
        """A saved reward model, in float32 (its head is float32 whatever the backbone was saved in)."""
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoModelForSequenceClassification

        meta = json.loads((directory / "reward_model.json").read_text())
        if meta.get("architecture", "backbone_head") == "sequence_classification":
            model = cls.from_sequence_classifier(AutoModelForSequenceClassification.from_pretrained(directory / "classifier", dtype=torch.float32))
            model.calibration.copy_(load_file(directory / "calibration.safetensors")["calibration"])
            return model
        tensors = load_file(directory / "head.safetensors")
        likelihood, lm_head = meta.get("likelihood", "none"), None
        if meta.get("lm_head") == "own":
            weight = tensors.pop("lm_head.weight")
            bias = tensors.pop("lm_head.bias", None)
            lm_head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
            lm_head.load_state_dict({"weight": weight} | ({"bias": bias} if bias is not None else {}))
        model = cls(AutoModel.from_pretrained(directory / "backbone", dtype=torch.float32), meta["hidden_size"], likelihood=likelihood, lm_head=lm_head)
        model.calibration.copy_(tensors.pop("calibration"))
        if likelihood != "none":
            model.likelihood_weight.data.copy_(tensors.pop("likelihood_weight"))
        model.head.load_state_dict(tensors)
        return model

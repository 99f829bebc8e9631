"""One judge interface for every source of feedback and every evaluation.

A judge answers two questions: `prefer(prompt, a, b)`, the probability that response a
is better than response b, and `score(prompt, y)`, a scalar quality. Batched versions
exist because evaluation asks thousands of times. Which judge labels training data and
which judge evaluates are separate settings of an experiment.
"""

from __future__ import annotations

import hashlib
from typing import Protocol, Sequence

import numpy as np
import torch

from alignbench.annotator import SimulatedAnnotator
from alignbench.logprobs import ForwardKeywords, position_ids_from_mask
from alignbench.reward import ProxyReward
from alignbench.world import AssistantWorld, preference_from_scores  # noqa: F401  (judges' public name too)


class Judge(Protocol):
    name: str

    def prefer(self, prompt: str, a: str, b: str) -> float: ...

    def score(self, prompt: str, response: str) -> float: ...

    def prefer_batch(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> np.ndarray: ...

    def score_batch(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray: ...


class GoldJudge:
    """The world's exact gold reward (Llama 2 combination of helpfulness and harmlessness)."""

    name = "gold"

    def __init__(self, world: AssistantWorld):
        self.world = world

    def score(self, prompt: str, response: str) -> float:
        return self.world.gold(prompt, response).reward

    def score_batch(self, prompts, responses) -> np.ndarray:
        return np.array([self.world.gold(p, y).reward for p, y in zip(prompts, responses)])

    def prefer(self, prompt: str, a: str, b: str) -> float:
        return float(preference_from_scores(self.score(prompt, a), self.score(prompt, b)))

    def prefer_batch(self, prompts, a, b) -> np.ndarray:
        return preference_from_scores(self.score_batch(prompts, a), self.score_batch(prompts, b))


class AnnotatorJudge:
    """A simulated annotator's choice probability (noise, flips and biases included)."""

    name = "annotator"

    def __init__(self, annotator: SimulatedAnnotator):
        self.annotator = annotator

    def score(self, prompt: str, response: str) -> float:
        return self.annotator.utility(prompt, response)

    def score_batch(self, prompts, responses) -> np.ndarray:
        return np.array([self.score(p, y) for p, y in zip(prompts, responses)])

    def prefer(self, prompt: str, a: str, b: str) -> float:
        return self.annotator.prob_first_better(prompt, a, b)

    def prefer_batch(self, prompts, a, b) -> np.ndarray:
        return np.array([self.prefer(p, x, y) for p, x, y in zip(prompts, a, b)])


class RewardModelJudge:
    """A (proxy) reward model as a judge: Bradley–Terry probability of its scores."""

    name = "reward_model"

    def __init__(self, proxy: ProxyReward, harmful_of=None):
        self.proxy = proxy
        self.harmful_of = harmful_of  # prompt -> bool, where the data says which prompts are safety prompts

    def score_batch(self, prompts, responses) -> np.ndarray:
        harmful = None if self.harmful_of is None else [self.harmful_of(p) for p in prompts]
        return self.proxy.score(list(prompts), list(responses), harmful).numpy()

    def score(self, prompt: str, response: str) -> float:
        return float(self.score_batch([prompt], [response])[0])

    def prefer_batch(self, prompts, a, b) -> np.ndarray:
        logit = lambda p: torch.logit(torch.as_tensor(p, dtype=torch.float64), eps=1e-6)  # noqa: E731
        return torch.sigmoid(logit(self.score_batch(prompts, a)) - logit(self.score_batch(prompts, b))).numpy()

    def prefer(self, prompt: str, a: str, b: str) -> float:
        return float(self.prefer_batch([prompt], [a], [b])[0])


@torch.no_grad()
def next_token_logprobs(model, codec, requests: Sequence[str], token_ids: Sequence[int], batch_size: int = 256) -> torch.Tensor:
    """[N, k] log-probabilities of `token_ids` as the first token of the model's reply to each
    request (the request goes through the chat template, as any prompt does).

    Requests of similar length are batched together (less padding), and where the model can
    (`logits_to_keep`, every transformers causal LM of 5.x) only the last position's logits are
    computed: [B, vocabulary], not [B, T, vocabulary]."""
    device = next(model.parameters()).device
    encoded = codec.encode_prompts(requests)
    index = torch.tensor(list(token_ids), device=device)
    last_only = {"logits_to_keep": 1} if ForwardKeywords.of(model).logits_to_keep else {}
    out = torch.zeros(len(encoded), len(index))
    by_length = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    for start in range(0, len(encoded), batch_size):
        batch = by_length[start : start + batch_size]
        rows = [encoded[i] for i in batch]
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), codec.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, ids in enumerate(rows):  # left padding: every row's next token is read in the last column
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            attention_mask[i, width - len(ids) :] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask), **last_only).logits[:, -1]
        out[batch] = torch.log_softmax(logits.float(), dim=-1)[:, index].cpu()
    return out


def answer_token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """The first token of each answer word; a ValueError names a word the tokenizer cannot
    represent, or two words that share their first token (the answer would be ambiguous)."""
    ids = []
    for word in words:
        encoded = tokenizer(word, add_special_tokens=False)["input_ids"]
        if not encoded or encoded[0] == tokenizer.unk_token_id:
            raise ValueError(f"answer word {word!r} is not in the judge's vocabulary; choose answer words that the tokenizer encodes")
        ids.append(encoded[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"answer words {list(words)} share a first token; choose words whose first tokens differ")
    return ids


class LMJudge:
    """A language model asked which of two responses is better by a principle (Lee et al. 2023).

    The request names the principle, the prompt and both responses; the judge's preference is
    the probability of the first answer word ("A"/"a") against the second, read from the
    log-probs of the model's first reply token, with each pair asked in both orders and
    averaged so that position bias cancels:

        prefer(a, b) = ½ [P(first | a, b) + 1 − P(first | b, a)],   so prefer(a, b) + prefer(b, a) = 1.

    With several principles the judge averages over all of them, or asks one principle per pair
    (drawn from a hash of the pair, so both orders get the same one: Bai et al. 2022's RL-CAI).
    Where the model puts less than `min_answer_mass` on the answer words in one order (it does not
    answer the question), that order counts as undecided (½) and `abstentions` is incremented.

    `score` (direct RLAIF) asks for a rating instead and returns the expected rating over the
    rating words, scaled to [0, 1] — the likelihood-weighted score of Lee et al.'s d-RLAIF.
    """

    name = "lm"

    def __init__(
        self, model, codec, principles: Sequence[str], comparison_template: str, answer_words: Sequence[str] = ("A", "B"),
        rating_template: str | None = None, rating_words: Sequence[str] = (), principle_sampling: str = "all",
        min_answer_mass: float = 1e-3, batch_size: int = 256, max_response_chars: int | None = None,
    ):
        if not principles:
            raise ValueError("an LM judge needs at least one principle")
        if principle_sampling not in ("all", "random"):
            raise ValueError(f"principle_sampling={principle_sampling!r} must be one of all, random")
        if len(answer_words) != 2:
            raise ValueError(f"answer_words={list(answer_words)} must name exactly two words (first, second)")
        self.model, self.codec, self.principles = model.eval(), codec, list(principles)
        self.comparison_template, self.rating_template = comparison_template, rating_template
        self.principle_sampling, self.min_answer_mass, self.batch_size = principle_sampling, min_answer_mass, batch_size
        # A response is cut before it enters a request, so that no response (a 20 MB dataset row)
        # makes the judge tokenise and attend over it whole; None: responses go in as they are.
        self.max_response_chars = max_response_chars
        self.answer_ids = answer_token_ids(codec.tokenizer, answer_words)
        # Rating words are checked against the vocabulary when a rating is first asked for: a
        # judge that only compares (RLAIF's labeler) works on a tokenizer without the numbers.
        self.rating_words = list(rating_words)
        self._rating_ids: list[int] | None = None
        self.abstentions = 0
        self.queries = 0

    def _cut(self, response: str) -> str:
        return response if self.max_response_chars is None else response[: self.max_response_chars]

    # --- one order ---------------------------------------------------------------------
    def first_preferred(self, prompts: Sequence[str], firsts: Sequence[str], seconds: Sequence[str], principles: Sequence[str]) -> np.ndarray:
        """P(the response shown first is better) for each request, in one presentation order."""
        cut = self._cut
        requests = [self.comparison_template.format(rule=r, prompt=p, a=cut(a), b=cut(b)) for p, a, b, r in zip(prompts, firsts, seconds, principles)]
        self.queries += len(requests)
        logprobs = next_token_logprobs(self.model, self.codec, requests, self.answer_ids, self.batch_size)
        mass = logprobs.exp().sum(-1)
        p_first = torch.softmax(logprobs, dim=-1)[:, 0]
        undecided = mass < self.min_answer_mass
        self.abstentions += int(undecided.sum())
        return torch.where(undecided, torch.full_like(p_first, 0.5), p_first).double().numpy()

    def principles_for(self, prompts, a, b) -> list[list[str]]:
        """The principles asked for each pair: all of them, or one drawn from the unordered pair."""
        if self.principle_sampling == "all":
            return [self.principles] * len(prompts)
        picks = []
        for p, x, y in zip(prompts, a, b):
            digest = hashlib.blake2b("\x1f".join([p, *sorted((x, y))]).encode(), digest_size=8).digest()
            picks.append([self.principles[int.from_bytes(digest, "little") % len(self.principles)]])
        return picks

    # --- the judge interface -----------------------------------------------------------
    def prefer_batch(self, prompts, a, b) -> np.ndarray:
        prompts, a, b = list(prompts), list(a), list(b)
        chosen = self.principles_for(prompts, a, b)
        # Flatten (pair, principle) so that every request of a call runs in shared batches.
        rows = [(i, r) for i, rules in enumerate(chosen) for r in rules]
        idx = [i for i, _ in rows]
        rules = [r for _, r in rows]
        ps, xs, ys = [prompts[i] for i in idx], [a[i] for i in idx], [b[i] for i in idx]
        forward = self.first_preferred(ps, xs, ys, rules)
        backward = self.first_preferred(ps, ys, xs, rules)
        per_row = 0.5 * (forward + 1.0 - backward)
        totals = np.zeros(len(prompts))
        np.add.at(totals, idx, per_row)
        return totals / np.array([len(r) for r in chosen], dtype=float)

    def prefer(self, prompt: str, a: str, b: str) -> float:
        return float(self.prefer_batch([prompt], [a], [b])[0])

    def score_batch(self, prompts, responses) -> np.ndarray:
        if self.rating_template is None or not self.rating_words:
            raise ValueError("this LM judge has no rating template and rating words, so it cannot score single responses")
        if self._rating_ids is None:
            self._rating_ids = answer_token_ids(self.codec.tokenizer, self.rating_words)
        values = torch.tensor([float(w) for w in self.rating_words])
        prompts, responses = list(prompts), list(responses)
        requests = [self.rating_template.format(rule=r, prompt=p, response=self._cut(y)) for p, y in zip(prompts, responses) for r in self.principles]
        self.queries += len(requests)
        probs = torch.softmax(next_token_logprobs(self.model, self.codec, requests, self._rating_ids, self.batch_size), dim=-1)
        expected = (probs * values).sum(-1) / values.max()
        return expected.view(len(prompts), len(self.principles)).mean(-1).double().numpy()

    def score(self, prompt: str, response: str) -> float:
        return float(self.score_batch([prompt], [response])[0])

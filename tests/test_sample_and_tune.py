"""Rejection sampling and ReST: what they keep from their samples, and their configs."""

import numpy as np
import pytest

from alignbench.methods.rejection_sampling import RejectionSamplingConfig, best_per_prompt
from alignbench.methods.rest import ReSTConfig, filter_by_threshold


def test_rejection_sampling_keeps_exactly_the_argmax_per_prompt():
    scores = np.array([[0.1, 0.9, 0.3], [0.7, 0.2, 0.8], [0.5, 0.5, 0.4]])
    assert best_per_prompt(scores).tolist() == [1, 2, 0]  # the first of tied maxima


def test_rest_filter_keeps_exactly_the_samples_at_or_above_tau():
    scores = np.array([0.2, 0.5, 0.49999, 0.9, 0.5])
    assert filter_by_threshold(scores, 0.5).tolist() == [False, True, False, True, True]
    # rising thresholds keep nested, shrinking sets
    kept = [filter_by_threshold(scores, t) for t in (0.3, 0.5, 0.8)]
    assert [k.sum() for k in kept] == [4, 3, 1]
    assert all((b <= a).all() for a, b in zip(kept, kept[1:]))


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (ReSTConfig, {"thresholds": [0.7, 0.5]}, "strictly rising"),
        (ReSTConfig, {"thresholds": []}, "non-empty"),
        (RejectionSamplingConfig, {"samples_per_prompt": 1}, "samples_per_prompt=1"),
        (RejectionSamplingConfig, {"rounds": 3, "temperatures": [1.0, 0.8]}, "one positive temperature per round"),
        (RejectionSamplingConfig, {"rounds": 0}, "rounds=0"),
    ],
)
def test_bad_configs_name_the_key(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)

"""train_segmenter's helpers that need no training run."""

import warnings

import pandas as pd
import torch

from cts_stages.train_segmenter import class_frequencies


def test_class_frequencies_reads_the_csv_without_a_non_writable_array_warning(tmp_path):
    # pandas returns read-only arrays; wrapping them with torch.as_tensor warned in every
    # train_segmenter run ("The given NumPy array is not writable").
    path = tmp_path / "train_classes.csv"
    pd.DataFrame({"class_id": [0, 2], "frequency": [0.75, 0.25]}).to_csv(path, index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frequencies = class_frequencies(path, 4)
    assert frequencies.dtype == torch.float64
    assert frequencies.tolist() == [0.75, 0.0, 0.25, 0.0]


def test_token_reduction_picks_sharing_merging_or_neither():
    import yaml
    from helpers import REPO

    from cts_stages.common import segmenter_config

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.update(num_tokens_shared=103, policy="policy_net", tome_r=64, algm_threshold=0.9)
    picked = {}
    for reduction in ("cts", "tome", "algm", "none"):
        config = segmenter_config({**params, "token_reduction": reduction}, 12)
        picked[reduction] = (
            config.policy,
            config.num_tokens_shared,
            config.tome_r,
            config.algm_threshold,
        )
        assert config.algm_layers == (1, 2)  # kept for the sweep's ALGM rows
    assert picked == {
        "cts": ("policy_net", 103, 0, 0.0),
        "tome": ("none", 0, 64, 0.0),
        "algm": ("none", 0, 0, 0.9),
        "none": ("none", 0, 0, 0.0),
    }

"""The training-memory estimate's arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onebox.memory import estimate_training_memory
from onebox.presets import preset

RESULTS = Path(__file__).resolve().parents[1] / "results" / "h100"


def test_static_parts_are_sixteen_bytes_per_parameter_with_adamw():
    config = preset("1b-A")
    estimate = estimate_training_memory(config, batch=1)
    n = config.num_params()
    assert (estimate.weights, estimate.gradients, estimate.optimizer) == (4 * n, 4 * n, 8 * n)
    assert estimate_training_memory(config, 1, optimizer="muon").optimizer == 4 * n


def test_activations_scale_with_batch_and_shrink_with_checkpointing():
    config = preset("600m-A")
    one, four = estimate_training_memory(config, 1), estimate_training_memory(config, 4)
    assert four.activations == 4 * one.activations and four.weights == one.weights
    checkpointed = estimate_training_memory(config, 4, activation_checkpointing=True)
    assert checkpointed.activations < four.activations / 4
    assert estimate_training_memory(config, 4, mixed=False).activations > four.activations
    assert estimate_training_memory(config, 4, compiled=False).activations > four.activations
    assert four.total == max(
        four.weights + four.optimizer + four.low_precision_weights + four.activations,
        four.weights + four.gradients + four.optimizer,
    )


@pytest.mark.parametrize("path", sorted(RESULTS.glob("sweep-*.json")), ids=lambda p: p.name)
def test_estimate_is_within_ten_percent_of_the_peaks_measured_on_the_h100(path):
    entries = [e for e in json.loads(path.read_text())["entries"] if e["result"]["status"] == "ok"]
    assert len(entries) >= 5
    for entry in entries:
        predicted = estimate_training_memory(preset(entry["config"]["name"]), entry["batch"]).total
        measured = entry["result"]["peak_memory_bytes"]
        assert abs(predicted - measured) / measured < 0.10, (entry["config"]["name"], predicted / 1e9, measured / 1e9)

"""Profiles read back from the database keep their column order (12+ features)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kiln.tracking import compare_profiles, compute_profile


@pytest.mark.parametrize("drop_order", [False, True])  # True: a profile stored before the fix
def test_same_data_is_healthy_after_a_json_round_trip(drop_order):
    rng = np.random.default_rng(0)
    # Twelve columns with different ranges: pairing them by sorted name would mismatch.
    x = np.stack([rng.normal(loc=j * 3.0, scale=1.0 + j, size=2000) for j in range(12)], axis=1)
    profile = compute_profile(x)
    stored = json.loads(json.dumps(profile, sort_keys=True))
    if drop_order:
        stored.pop("feature_order")
    assert list(stored["features"])[:3] == ["feature_0", "feature_1", "feature_10"]
    drift = compare_profiles(stored, x)
    assert drift.status == "healthy", drift.affected_features
    assert compare_profiles(stored, x + 50.0).status == "critical"

"""Shared test setup: hypothesis profiles and deterministic torch."""

import os

import torch
from hypothesis import HealthCheck, settings

# "ci": more examples, derandomized so a red run reproduces; "dev": quick local runs.
settings.register_profile(
    "ci", max_examples=100, derandomize=True, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev", max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

torch.set_num_threads(min(2, torch.get_num_threads()))

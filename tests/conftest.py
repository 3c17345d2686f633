import os

import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(int(os.environ.get("REPFUSE_TEST_THREADS", "2")))

settings.register_profile(
    "ci", max_examples=200, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "dev", max_examples=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("REPFUSE_HYPOTHESIS_PROFILE",
                                     "ci" if os.environ.get("CI") else "dev"))

"""Shared pytest setup: the test machines have few cores, so every test runs torch on one thread."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _single_thread_torch() -> None:
    # Set again per session in case something imported during collection changed it.
    torch.set_num_threads(1)

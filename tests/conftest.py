"""Shared pytest setup: the test machines have few cores, so every test runs torch on one thread."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _single_thread_torch() -> None:
    # Set again per session in case something imported during collection changed it.
    torch.set_num_threads(1)


def pytest_configure(config: pytest.Config) -> None:
    # Where the check below fails, xdist's workers end in an INTERNALERROR that hides its message: say it here first.
    if config.getoption("dist", "no") == "loadgroup" and tuple(map(int, pytest.__version__.split(".")[:2])) >= (9, 2):
        raise pytest.UsageError(
            f"--dist loadgroup does not group tests with pytest {pytest.__version__} (pytest-xdist issue 1386): "
            "pip install 'pytest<9.2' (the dev extra pins it)"
        )


def pytest_collection_finish(session: pytest.Session) -> None:
    """Under ``--dist loadgroup``, refuse to run if xdist's grouping did not take effect.

    pytest-xdist marks a grouped test by appending ``@group`` to its node id; with pytest 9.2 that no longer takes
    effect and grouped tests (the vLLM engines, the CLI processes) silently run on every worker, doubling the suite.
    """
    if getattr(session.config.option, "loadgroup", False):
        lost = [i.nodeid for i in session.items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
        if lost:
            raise pytest.UsageError(
                f"pytest-xdist's loadgroup did not group {lost[0]} (pytest {pytest.__version__}); install pytest<9.2"
            )

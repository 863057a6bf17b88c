import os
import sys

import pytest
import torch

# Triton kernels run in Triton's interpreter on machines without a GPU; set before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    import dataclasses

    from triton.runtime import interpreter

    # The interpreter widens every integer op to int64 to build an overflow condition that only
    # device_assert reads, and device_assert does nothing unless debug is on: a third of the
    # interpreter's time for no check. Off unless debugging (TRITON_DEBUG=1 keeps it).
    _builder = interpreter.interpreter_builder
    if not _builder.options.debug:
        _builder.options = dataclasses.replace(_builder.options, sanitize_overflow=False)

sys.path.insert(0, os.path.dirname(__file__))
# One intra-op thread: the suite's tiny models gain little from a second one, and on a busy 2-core
# machine two threads waiting for each other made it several times slower (48 vs 13 minutes).
torch.set_num_threads(1)


# The extended suite: tests marked slow (torch.compile of whole families, the benchmark harnesses'
# compile/graph variants, the GPU round's dry run) repeat what cheaper tests check and would take the
# default run past its 10-minute budget on 2 cores; `--run-slow` (or FRKERN_SLOW=1) runs them too.
def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow (the extended suite)")


def slow_enabled(config) -> bool:
    return bool(config.getoption("--run-slow") or os.environ.get("FRKERN_SLOW") == "1")


def skip_unless_slow(request, why: str) -> None:
    """For one case of a parametrised matrix (a marker cannot name it): the extended tier only."""
    if not slow_enabled(request.config):
        pytest.skip(f"slow: the extended suite runs it (python -m pytest --run-slow): {why}")


def pytest_collection_modifyitems(config, items):
    if slow_enabled(config):
        return
    skip = pytest.mark.skip(reason="slow: the extended suite runs it (python -m pytest --run-slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

import os
import sys

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

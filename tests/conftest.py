import os
import sys

import torch

# Triton kernels run in Triton's interpreter on machines without a GPU; set before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))
# One intra-op thread: the suite's tiny models gain little from a second one, and on a busy 2-core
# machine two threads waiting for each other made it several times slower (48 vs 13 minutes).
torch.set_num_threads(1)

"""frkern: feature reuse for diffusion UNets.

    handle = frkern.patch(pipe, frkern.FRDiff(interval=2))
    images = pipe(...).images
    frkern.unpatch(pipe)
"""
import importlib.util as _ilu
import os as _os
import sys as _sys

# Installed, kernels/ is the subpackage frkern.kernels; in a source tree it sits beside frkern/.
if _ilu.find_spec(__name__ + ".kernels") is None:  # pragma: no cover - depends on the install
    _src = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
    _spec = _ilu.spec_from_file_location(
        __name__ + ".kernels", _os.path.join(_src, "__init__.py"), submodule_search_locations=[_src]
    )
    _mod = _ilu.module_from_spec(_spec)
    _sys.modules[_spec.name] = _mod
    _spec.loader.exec_module(_mod)

from .policies import (  # noqa: E402
    Adaptive,
    Clockwork,
    DeepCache,
    EncoderPropagation,
    FRDiff,
    Keyframes,
    NoReuse,
    Policy,
    StepPlan,
    from_json,
    load_policy,
    save_policy,
    score_mix_lambda,
    SkipConv,
    TGate,
)
from .cache_format import CacheFormat  # noqa: E402
from .dispatch import Handle, handle_of, patch, unpatch  # noqa: E402
from .family import FAMILIES, find_model, register_family  # noqa: E402
from .install import INSTALLERS, register_installer  # noqa: E402
from .ops import kernel_report  # noqa: E402

__all__ = [
    "patch", "unpatch", "Handle", "handle_of", "kernel_report", "CacheFormat",
    "FAMILIES", "find_model", "register_family", "INSTALLERS", "register_installer",
    "Policy", "StepPlan", "NoReuse", "FRDiff", "Keyframes", "Clockwork", "DeepCache", "SkipConv", "Adaptive", "EncoderPropagation", "TGate",
    "from_json", "load_policy", "save_policy", "score_mix_lambda",
]
__version__ = "0.1.0"

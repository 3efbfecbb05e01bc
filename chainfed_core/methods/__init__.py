"""Every federated fine-tuning method, one module each, on one registry (see :mod:`.base`).

    from chainfed_core.methods import get_method, method_names
    get_method("full_adapters").label          # 'Full Adapters'

Importing this package registers the built-in methods (in the order tables list them), then
every other module of this folder, by name: adding a method is adding one module here whose
:class:`Method` subclass carries :func:`register`. Methods defined elsewhere (an experiment,
a test) register themselves the same way.
"""

import importlib
import pkgutil

from .base import Method, get_method, method_names, plan_for, register, unregister
from . import no_ft, linear_probe, fft, full_adapters, chainfed  # noqa: F401,E402  (the built-ins, in order)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["Method", "get_method", "method_names", "plan_for", "register", "unregister"]

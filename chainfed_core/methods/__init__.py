"""Every federated fine-tuning method, one module each, on one registry (see :mod:`.base`).

    from chainfed_core.methods import get_method, method_names
    get_method("full_adapters").label          # 'Full Adapters'

Importing this package registers the built-in methods; a new method is a new module here
(imported below) or, for experiments outside the package, any module that applies
:func:`register` to a :class:`Method` subclass.
"""

from .base import Method, get_method, method_names, plan_for, register, unregister
from . import no_ft, linear_probe, fft, full_adapters, chainfed  # noqa: F401,E402  (registers them)

__all__ = ["Method", "get_method", "method_names", "plan_for", "register", "unregister"]

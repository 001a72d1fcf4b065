"""autotune: fit Qwen3 LoRA/QLoRA fine-tuning to the GPU you have, by measurement.

The Python API, `from autotune import probe, estimate, solve, train, export` (autotune/api.py), is reached through
this package's class below: importing autotune imports none of it (nor torch), and the first use of one of the names
imports autotune.api. Three of the names are also the names of modules (autotune.solve, autotune.estimate,
autotune.export), which Python binds on the package when it imports them: the class's attributes win over those
bindings, so `autotune.solve` is always the function. The modules stay importable by their dotted names (`from
autotune.solve import plan`, `from autotune.estimate.fit import report`), as autotune.estimate.fit is beside the
package's fit(); only `import autotune.solve.plan as plan`, which walks the attributes, reaches the function.
"""

import sys
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what type checkers see; at run time the class below answers
    from autotune.api import estimate, export, probe, solve, train

__version__ = "0.1.0"

API = ("probe", "estimate", "solve", "train", "export")


def _api_attribute(name: str) -> property:
    def get(package: types.ModuleType):
        from autotune import api

        return getattr(api, name)

    def set_(package: types.ModuleType, value) -> None:
        """The import system binds a submodule of that name here; the function keeps the name."""

    return property(get, set_)


class _Package(types.ModuleType):
    """The autotune package, whose API names are read from autotune.api when first asked for."""


for _name in API:
    setattr(_Package, _name, _api_attribute(_name))

sys.modules[__name__].__class__ = _Package
__all__ = ["__version__", "estimate", "export", "probe", "solve", "train"]

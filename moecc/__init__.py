"""moecc: a compiler that makes Mixture-of-Experts models written in plain PyTorch train and run fast.

model = moecc.compile(model)             # or @moecc.compile() on the model class
out = model(batch); out.sum().backward()
"""

import os as _os

# passes/, backends/ and examples/ sit at the top level of the repository and install as moecc.passes,
# moecc.backends and moecc.examples (pyproject maps them). When moecc is imported straight from a checkout
# (the checkout on sys.path ahead of the installed copy, as under `python -m pytest`), find them there too.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "passes", "__init__.py")) and _checkout not in __path__:
    __path__.append(_checkout)

from moecc import ops  # noqa: E402, F401  (registers the moecc custom ops)
from moecc.api import CompiledModule, compile, register_dynamo_backend  # noqa: E402
from moecc.artifact import load  # noqa: E402
from moecc.graphs import GraphStep, graph_step  # noqa: E402
from moecc.options import CompileOptions, MoeccError  # noqa: E402
from moecc.profile import profile_step  # noqa: E402

register_dynamo_backend()

__all__ = [
    "CompiledModule",
    "CompileOptions",
    "GraphStep",
    "MoeccError",
    "compile",
    "graph_step",
    "load",
    "profile_step",
]
__version__ = "0.1.0"

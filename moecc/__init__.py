"""moecc: a compiler that makes Mixture-of-Experts models written in plain PyTorch train and run fast.

model = moecc.compile(model)             # or @moecc.compile() on the model class
out = model(batch); out.sum().backward()
"""

from moecc import ops  # noqa: F401  (registers the moecc custom ops)
from moecc.api import CompiledModule, compile, register_dynamo_backend
from moecc.options import CompileOptions, MoeccError

register_dynamo_backend()

__all__ = ["CompiledModule", "CompileOptions", "MoeccError", "compile"]
__version__ = "0.1.0"

"""Published methods behind one interface (pyengine.methods.base), found by name, driven by one
generic runner (pyengine.methods.runner)::

    from pyengine.methods import RunConfig, run
    report = run(RunConfig(model="resnet18", method="egp", options={"zeta": 0.5}))
"""
from pyengine.methods.base import EntropySpec, Method, StepCallback, get_method, list_methods, register
from pyengine.methods.runner import Run, RunConfig, RunContext, run

__all__ = ["EntropySpec", "Method", "Run", "RunConfig", "RunContext", "StepCallback", "get_method", "list_methods",
           "register", "run"]

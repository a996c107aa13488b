"""Speech continuation: listen, then keep speaking in the same voice and style."""

from streamgen.pipeline.policies import Continuation
from streamgen.pipeline.tasks import TaskPlugin


plugin = TaskPlugin(
    name="continuation",
    description="Listen, then keep speaking in the same voice and style once the input ends (VAD or stop); "
    "options: max_units, min_units (at most max_units: a smaller max_units lowers it), emit_every.",
    policy=Continuation,
    options={"max_units": 250, "min_units": 25, "emit_every": 10},
    ranges={"max_units": (1, None), "min_units": (0, None), "emit_every": (1, None)},
    sampling={"greedy": False, "temperature": 0.8, "top_k": 20},
)

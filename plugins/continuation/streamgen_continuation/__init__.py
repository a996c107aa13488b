"""Speech continuation: listen, then keep speaking in the same voice and style."""

from streamgen.pipeline.policies import Continuation
from streamgen.pipeline.tasks import TaskPlugin

plugin = TaskPlugin(
    name="continuation",
    description="Listen, then keep speaking in the same voice and style once the input ends (VAD or stop); "
    "options: max_units, min_units, emit_every.",
    policy=Continuation,
    options={"max_units": 250, "min_units": 25, "emit_every": 10},
    sampling={"greedy": False, "temperature": 0.8, "top_k": 20},
)

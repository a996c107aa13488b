"""Speech inpainting: regenerate an utterance with a masked time span filled in."""

from streamgen.pipeline.policies import Inpainting
from streamgen.pipeline.tasks import TaskPlugin

plugin = TaskPlugin(
    name="inpainting",
    description="Fill a masked span given the audio before and after it; options: mask_start, mask_end "
    "(seconds into the input), emit_every.",
    policy=Inpainting,
    options={"mask_start": 0.0, "mask_end": 0.0, "emit_every": 25},
)

"""Speech inpainting: regenerate an utterance with a masked time span filled in."""

from streamgen.pipeline.policies import Inpainting
from streamgen.pipeline.tasks import TaskPlugin, check_source_timing


def validate(options: dict, input_s, bundle) -> None:
    """A mask inside the input, and an input the model can regenerate in one pass."""
    start, end = options["mask_start"], options["mask_end"]
    if end <= start:
        raise ValueError("task 'inpainting' needs the span to fill: --opt mask_start=S --opt mask_end=E "
                         f"(seconds into the input, S < E), got {start}..{end}")
    if options["context"] == "keep" and options["durations"] == "source":
        check_source_timing("inpainting", bundle)
    if input_s is not None and end > input_s:
        raise ValueError(f"task 'inpainting': the mask {start}..{end} s ends after the input ({input_s:.2f} s)")
    if input_s is not None and bundle is not None:
        # the whole utterance is regenerated at once: at most one unit per encoder frame must fit the context
        rate = bundle.sample_rate / bundle.unit_hop
        longest = (bundle.need("mbart").cfg.max_positions - 2) / rate
        if input_s > longest:
            raise ValueError(f"task 'inpainting' regenerates the whole input within the model's context: at most "
                             f"{longest:.1f} s, this input is {input_s:.1f} s; cut out the part around the gap")


plugin = TaskPlugin(
    name="inpainting",
    description="Fill a masked span given the audio before and after it; options: mask_start, mask_end "
    "(seconds into the input), emit_every, context (keep: only the gap is new; regenerate: the model says it all again), "
    "durations (source: the kept context in the talker's timing; predicted: timed by the vocoder).",
    policy=Inpainting,
    options={"mask_start": 0.0, "mask_end": 0.0, "emit_every": 25, "context": "keep", "durations": "source"},
    choices={"context": ("keep", "regenerate"), "durations": ("source", "predicted")},
    ranges={"mask_start": (0.0, 86400.0), "mask_end": (0.0, 86400.0), "emit_every": (1, 1_000_000)},  # a day: no session is longer
    validate=validate,
)

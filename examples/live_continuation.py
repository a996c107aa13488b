"""Live speech continuation: listen to the microphone until you pause, then keep talking.

    python examples/live_continuation.py [--bundle DIR] [--seconds 8]

Same as `streamgen run --task continuation --in mic --out speaker --vad --stats`.
"""

import argparse
import asyncio

import streamgen
from streamgen.io.device import AudioDevice, MicSource, SpeakerSink
from streamgen.pipeline.runner import Pipeline, build_engine
from streamgen.pipeline.stats import Stats

ap = argparse.ArgumentParser()
ap.add_argument("--bundle", help="bundle directory (default: the one shipped with streamgen)")
ap.add_argument("--seconds", type=float, default=8.0, help="listen at most this long")
args = ap.parse_args()

bundle = streamgen.load_bundle(args.bundle)  # None: the bundled default model
device = AudioDevice(bundle.sample_rate)
source, sink = MicSource(device, duration_s=args.seconds), SpeakerSink(device)
stages = build_engine(bundle, "continuation", {"max_units": 200}, vad=True)  # a pause ends your turn
stats = asyncio.run(Pipeline(source, stages, sink, Stats(bundle.sample_rate)).run())
print(stats.table())

"""Run a task over every audio file in a folder, one output WAV each, with a latency table.

    python examples/batch_files.py IN_DIR OUT_DIR [--task continuation] [--bundle DIR]
"""

import argparse
import asyncio
from pathlib import Path

import streamgen
from streamgen.io.files import FileSink, FileSource
from streamgen.pipeline.runner import Pipeline, build_engine
from streamgen.pipeline.stats import Stats

ap = argparse.ArgumentParser()
ap.add_argument("inputs", type=Path)
ap.add_argument("outputs", type=Path)
ap.add_argument("--task", default="continuation")
ap.add_argument("--bundle")
args = ap.parse_args()

bundle = streamgen.load_bundle(args.bundle)  # None: the bundled default model
stats = Stats(bundle.sample_rate)
for path in sorted(p for p in args.inputs.iterdir() if p.suffix.lower() in (".wav", ".flac", ".ogg")):
    source = FileSource(path, bundle.sample_rate, session=path.stem)
    sink = FileSink(args.outputs / f"{path.stem}.wav", bundle.sample_rate)
    asyncio.run(Pipeline(source, build_engine(bundle, args.task), sink, stats).run())
print(stats.table())

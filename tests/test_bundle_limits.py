"""A bundle directory is input too (issue 8): its configs are checked against sane limits and
against the weights' declared shapes before any module is built, files are size-checked before
they are read, and prompt names are names, not paths."""

import json
import re
import resource
import shutil
import struct
import subprocess
import sys

import pytest
import torch

from streamgen.bundle import BundleError, default_bundle_path, load_bundle, save_prompt
from streamgen.models.checkpoints import CheckpointError, read_kmeans
from streamgen.models.kmeans import KMeansQuantizer
from streamgen.models.logmel_units import LogMelUnits, LogMelUnitsConfig
from streamgen.models.phone_units import PhoneUnits, PhoneUnitsConfig
from streamgen.models.source_filter_vocoder import SourceFilterConfig, SourceFilterVocoder
from streamgen.testing import random_bundle


@pytest.fixture
def bundle_dir(tmp_path):
    return random_bundle(seed=0).save(tmp_path / "b")


def edit_meta(path, change):
    meta = json.loads((path / "bundle.json").read_text())
    change(meta)
    (path / "bundle.json").write_text(json.dumps(meta))


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_an_absurd_layer_count_is_refused_before_anything_is_built(bundle_dir):
    edit_meta(bundle_dir, lambda m: m["parts"]["mbart"].update(encoder_layers=1e6))
    with pytest.raises(BundleError, match=r"part mbart: encoder_layers = 1000000.0 is outside the sane range \(at most 64\)"):
        load_bundle(bundle_dir)


def test_a_config_that_disagrees_with_its_weights_is_refused_without_building_it(bundle_dir):
    """Within the limits, but 64 layers of 8192 x 65536 would be ~340 GB: the shapes are compared
    on a module built on the meta device, so nothing that size is ever allocated."""
    edit_meta(bundle_dir, lambda m: m["parts"]["mbart"].update(encoder_layers=64, dim=8192, ffn_dim=65536, heads=64))
    before = rss_mib()
    with pytest.raises(BundleError, match=r"mbart.safetensors: weights do not match the config in bundle.json \(\d+ tensors differ"):
        load_bundle(bundle_dir)
    assert rss_mib() - before < 1024


@pytest.mark.parametrize("part, key, value", [("logmel_units", "num_units", 499), ("source_filter", "dim", 96),
                                              ("phone_units", "recogniser.dim", 128)])
def test_every_part_of_the_default_bundle_is_checked_against_its_weights_before_it_is_built(tmp_path, part, key, value):
    """Parts whose constructors compute tables (filterbanks, STFT kernels) are built for their shapes on the
    meta device like the others: a config that disagrees with the weights is named tensor by tensor."""
    b = shutil.copytree(default_bundle_path(), tmp_path / "b")

    def change(meta):
        *path, last = key.split(".")
        cfg = meta["parts"][part]
        for name in path:
            cfg = cfg[name]
        cfg[last] = value

    edit_meta(b, change)
    with pytest.raises(BundleError, match=rf"{part}.safetensors: weights do not match the config in bundle.json \(\d+ tensors? differ"):
        load_bundle(b)


def test_loading_a_bundle_of_every_part_type_runs_no_python_meta_kernel(bundle_dir):
    """The shape-check skeletons are not initialised and build their tables on the CPU: a Python meta kernel's
    first use imports torch._dynamo (1.5 s of every command's start), some import sympy. The test bundle has
    the HuBERT encoder, k-means, Unit mBART and CodeHiFiGAN; the default bundle's parts are the demo's test."""
    code = ("import sys; from streamgen import load_bundle; load_bundle(sys.argv[1])\n"
            "print([m for m in ('torch._dynamo', 'sympy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code, str(bundle_dir)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_parts_fixed_tables_are_made_where_the_part_is_built():
    """Filterbanks, STFT kernels and the vocoder's grids are computed on the CPU (no meta kernel runs) and
    placed on the device the part is built under, as its parameters are."""
    parts = json.loads((default_bundle_path() / "bundle.json").read_text())["parts"]
    with torch.device("meta"):
        built = [LogMelUnits(LogMelUnitsConfig.from_dict(parts["logmel_units"])), PhoneUnits(PhoneUnitsConfig.from_dict(parts["phone_units"])),
                 SourceFilterVocoder(SourceFilterConfig.from_dict(parts["source_filter"]))]
    for m in built:
        assert {t.device.type for t in [*m.parameters(), *m.buffers()]} == {"meta"}, type(m).__name__


def test_prompt_names_are_names_not_paths(bundle_dir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    edit_meta(bundle_dir, lambda m: m["prompts"].update({"../../outside/x": {"length": 4, "stacks": ["encoder"]}}))
    with pytest.raises(BundleError, match=r"prompt name '../../outside/x' must be a plain name"):
        load_bundle(bundle_dir)
    with pytest.raises(BundleError, match="must be a plain name"):
        save_prompt(bundle_dir, "../evil", None)


def test_oversized_and_malformed_files_are_refused_before_they_are_read(bundle_dir, tmp_path):
    meta = bundle_dir / "bundle.json"
    with open(meta, "r+b") as f:  # a 2 GiB sparse bundle.json
        f.truncate(2 << 30)
    before = rss_mib()
    with pytest.raises(BundleError, match="a bundle.json is at most 1048576"):
        load_bundle(bundle_dir)
    assert rss_mib() - before < 100

    fresh = random_bundle(seed=0).save(tmp_path / "c")
    part = fresh / "vocoder.safetensors"
    part.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")  # a header that claims a terabyte
    with pytest.raises(BundleError, match="not a readable safetensors file .its header claims 1099511627776 bytes"):
        load_bundle(fresh)
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1 << 30]}}).encode()
    part.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(BundleError, match="truncated: its header places data beyond the end"):
        load_bundle(fresh)
    with open(part, "r+b") as f:  # a 9 GiB sparse part
        f.truncate(9 << 30)
    with pytest.raises(BundleError, match="9.0 GiB is over the 8 GiB limit for one part"):
        load_bundle(fresh)


def test_a_huge_kmeans_bin_is_refused_unread(tmp_path):
    big = tmp_path / "km.bin"
    with open(big, "wb") as f:
        f.write(b"\x80")
        f.truncate(2 << 30)
    before = rss_mib()
    with pytest.raises(CheckpointError, match="2048 MiB is over the 256 MiB a k-means file may have"):
        read_kmeans(big)
    assert rss_mib() - before < 100


def test_weights_that_declare_more_than_they_hold_are_refused_before_anything_is_built(bundle_dir):
    """A few kilobytes of header can declare the config's exact shapes with every tensor at 4 bytes:
    the shapes matched and the whole model (gigabytes, for a config within the limits) was built
    before the file was read. Each tensor's bytes must be as many as its shape holds, one after
    another, to the end of the file; a part that is not a regular file is refused too."""
    from streamgen.bundle import _Skeleton
    from streamgen.models.unit_mbart import UnitMBart, UnitMBartConfig

    cfg = {}
    edit_meta(bundle_dir, lambda m: (m["parts"]["mbart"].update(dim=2048, ffn_dim=8192, heads=16), cfg.update(m["parts"]["mbart"])))
    with _Skeleton():
        shapes = {k: list(v.shape) for k, v in UnitMBart(UnitMBartConfig.from_dict(cfg)).state_dict().items()}
    header = json.dumps({k: {"dtype": "F32", "shape": s, "data_offsets": [0, 4]} for k, s in shapes.items()}).encode()
    (bundle_dir / "mbart.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    before = rss_mib()
    with pytest.raises(BundleError, match=r"mbart.safetensors: not a readable safetensors file \(tensor .*: its shape .* does not match its 4 bytes at offset 0\)"):
        load_bundle(bundle_dir)
    assert rss_mib() - before < 100
    (bundle_dir / "mbart.safetensors").unlink()
    (bundle_dir / "mbart.safetensors").mkdir()
    with pytest.raises(BundleError, match="mbart.safetensors: not a regular file"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("change, message", [
    (lambda m: m["parts"]["mbart"].update(heads=0), "part mbart: heads = 0 must be a whole number of at least 1"),
    (lambda m: m["parts"]["kmeans"].update(num_units=-1), "part kmeans: num_units = -1 must be a whole number of at least 1"),
    (lambda m: m["parts"]["mbart"].update(dim=64.5), "part mbart: dim = 64.5 must be a whole number of at least 1"),
    (lambda m: m.update(sample_rate="abc"), "sample_rate = 'abc' must be a whole number of Hz from 1000 to 384000"),
    (lambda m: m.update(sample_rate=0), "sample_rate = 0 must be a whole number of Hz from 1000 to 384000"),
    (lambda m: m["parts"].update(hubert="x"), "part 'hubert' must be a config object, got str"),
], ids=["zero-heads", "negative-units", "fractional-dim", "text-rate", "zero-rate", "part-not-object"])
def test_a_malformed_bundle_json_is_named_in_one_line(bundle_dir, change, message):
    """Values that passed the sanity ranges and broke later: a division by zero, a negative shape, a rate
    of 0 that failed only when audio came."""
    edit_meta(bundle_dir, change)
    with pytest.raises(BundleError, match=re.escape(message)):
        load_bundle(bundle_dir)


def test_parts_that_disagree_on_the_units_are_refused_at_load(tmp_path):
    """A k-means of more units than the speech LM knows loaded fine and failed mid-session with an index error."""
    b = random_bundle(seed=0)
    b.quantizer = KMeansQuantizer(torch.randn(b.mbart.cfg.num_units + 5, b.quantizer.dim))
    b.save(tmp_path / "b")
    with pytest.raises(BundleError, match=f"the unit encoder gives {b.mbart.cfg.num_units + 5} units, mbart knows {b.mbart.cfg.num_units}"):
        load_bundle(tmp_path / "b")

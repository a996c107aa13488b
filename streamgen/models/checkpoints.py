"""Read the public fairseq checkpoints without importing fairseq and without running pickled code.

- PyTorch files (mHuBERT `.pt`, Unit mBART `checkpoint.pt`, CodeHiFiGAN `g_*`) load with
  `torch.load(weights_only=True)` and an explicit allow-list of the plain types fairseq stores in its
  configs (argparse.Namespace, OmegaConf containers). Anything else is refused, naming the type.
- The k-means `.bin` is a scikit-learn MiniBatchKMeans saved by joblib: a pickle whose arrays follow
  their wrappers as raw bytes. A restricted unpickler maps the few classes such a file names to inert
  stand-ins and reads `cluster_centers_`; no scikit-learn code (or any other) runs.

Each reader returns (config, state dict in streamgen's names); `streamgen.bundle` saves them as
safetensors, which is what everything else loads.
"""

from __future__ import annotations

import argparse
import ast
import codecs
import collections
import io
import json
import pickle
import re
import typing
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .hubert import HubertConfig
from .unit_mbart import UnitMBartConfig
from .vocoder import VocoderConfig


class CheckpointError(ValueError):
    """A checkpoint file that cannot (or must not) be loaded."""


# --- PyTorch files --------------------------------------------------------------------------------


def _allow_list() -> list:
    allowed = [argparse.Namespace, typing.Any, dict, list, int, float, bool, tuple, collections.defaultdict, collections.OrderedDict]
    try:
        import omegaconf
        from omegaconf import base, nodes

        allowed += [omegaconf.DictConfig, omegaconf.ListConfig, base.ContainerMetadata, base.Metadata]
        allowed += [getattr(nodes, n) for n in ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "EnumNode")]
    except ImportError:  # files with OmegaConf configs are then refused, naming the class
        pass
    return allowed


def torch_load(path: str | Path) -> dict:
    """Load a PyTorch checkpoint with weights_only=True; clear errors for refused or broken files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals(_allow_list()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        if m is None:  # not a refusal: the bytes are no pickle a checkpoint would hold
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (no pickled tensors in it; is it the right file?)") from None
        raise CheckpointError(
            f"{path}: refused: it asks to unpickle `{m.group(1)}`, which is not on streamgen's allow-list of "
            "plain data types (loading it could run arbitrary code)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError, MemoryError) as e:
        first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt, or another kind of file?): {first}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    return obj


def _plain(obj):
    """OmegaConf containers / Namespaces -> plain dicts, recursively."""
    if type(obj).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return _plain(OmegaConf.to_container(obj, resolve=False))
    if isinstance(obj, argparse.Namespace):
        return _plain(vars(obj))
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def training_args(ckpt: dict) -> tuple[dict, dict]:
    """(model args, task args) from a fairseq checkpoint: `cfg` as a dict or OmegaConf container,
    possibly with a Namespace under cfg["model"] (legacy-args models), or a legacy `args` Namespace."""
    if ckpt.get("cfg") is not None:
        cfg = _plain(ckpt["cfg"])
        return cfg.get("model") or {}, cfg.get("task") or {}
    if ckpt.get("args") is not None:
        args = _plain(ckpt["args"])
        return args, args
    return {}, {}


def _state_dict(ckpt: dict, key: str, path) -> dict[str, Tensor]:
    sd = ckpt.get(key)
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: no `{key}` state dict (keys: {sorted(ckpt)})")
    return {k: v for k, v in sd.items() if isinstance(v, Tensor)}


def fold_weight_norm(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Replace weight-norm pairs (`weight_g`/`weight_v`, or parametrizations' `original0`/`original1`)
    by the plain `weight` = g * v / |v|, the norm taken over the dims where g has size 1."""
    pairs = {".weight_g": ".weight_v", ".parametrizations.weight.original0": ".parametrizations.weight.original1"}
    out = {}
    for key, t in sd.items():
        for g_suffix, v_suffix in pairs.items():
            if key.endswith(g_suffix):
                base = key[: -len(g_suffix)]
                g, v = t.double(), sd[base + v_suffix].double()
                dims = [i for i in range(v.dim()) if g.shape[i] == 1]
                out[base + ".weight"] = (v * (g / torch.linalg.vector_norm(v, dim=dims, keepdim=True))).to(t.dtype)
                break
            if key.endswith(v_suffix):
                break
        else:
            out[key] = t
    return out


def _layer_count(sd: dict, prefix: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def _drop_buffers(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.endswith((".version", "._float_tensor"))}


# --- Unit mBART -----------------------------------------------------------------------------------


def read_unit_mbart(path, num_units: int = 1000) -> tuple[UnitMBartConfig, dict[str, Tensor]]:
    ckpt = torch_load(path)
    sd = _drop_buffers(_state_dict(ckpt, "model", path))
    args, _ = training_args(ckpt)
    if "encoder.embed_tokens.weight" not in sd:
        raise CheckpointError(f"{path}: no encoder.embed_tokens.weight: not a fairseq (m)BART checkpoint")
    emb = sd.pop("encoder.embed_tokens.weight")
    for tied in ("decoder.embed_tokens.weight", "decoder.output_projection.weight"):
        if tied in sd and not torch.equal(sd.pop(tied), emb):
            raise CheckpointError(f"{path}: {tied} differs from encoder.embed_tokens.weight; streamgen's Unit mBART shares all embeddings")
    act = args.get("activation_fn", "gelu")
    if act != "gelu":
        raise CheckpointError(f"{path}: activation_fn={act!r}; Unit mBART uses exact gelu")
    enc_pre = bool(args.get("encoder_normalize_before", False))  # fairseq's bart_large default is post-norm
    dec_pre = bool(args.get("decoder_normalize_before", False))
    if enc_pre != dec_pre:
        raise CheckpointError(f"{path}: encoder_normalize_before={enc_pre} but decoder_normalize_before={dec_pre}")
    arch = str(args.get("arch") or args.get("_name") or "")
    no_scale = args.get("no_scale_embedding", not arch.startswith("mbart"))
    vocab, dim = emb.shape
    if vocab < 4 + num_units:
        raise CheckpointError(f"{path}: vocabulary of {vocab} cannot hold 4 special tokens and {num_units} units")
    cfg = UnitMBartConfig(
        vocab_size=vocab,
        num_units=num_units,
        dim=dim,
        ffn_dim=sd["encoder.layers.0.fc1.weight"].shape[0],
        heads=int(args.get("encoder_attention_heads", 16)),
        encoder_layers=_layer_count(sd, "encoder.layers."),
        decoder_layers=_layer_count(sd, "decoder.layers."),
        max_positions=sd["encoder.embed_positions.weight"].shape[0] - 2,
        normalize_before=enc_pre,
        scale_embedding=not no_scale,
        layernorm_embedding="encoder.layernorm_embedding.weight" in sd,
        dropout=float(args.get("dropout", 0.1)),
    )
    sd["embed_tokens.weight"] = emb
    return cfg, sd


# --- HuBERT ---------------------------------------------------------------------------------------


def parse_conv_layers(spec: str) -> list[tuple[int, int, int]]:
    """fairseq's `conv_feature_layers` string, e.g. "[(512,10,5)] + [(512,3,2)] * 4", evaluated
    without eval(): only list/tuple literals of ints, `+` and `*`."""

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Tuple):
            return tuple(ev(e) for e in node.elts)
        if isinstance(node, ast.List):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Mult) and isinstance(a, (list, tuple)) and isinstance(b, int) and len(a) * b > 64:
                raise CheckpointError(f"conv_feature_layers {spec[:80]!r}: more than 64 layers")
            return a + b if isinstance(node.op, ast.Add) else a * b
        raise CheckpointError(f"conv_feature_layers {spec!r}: unsupported expression")

    try:
        layers = ev(ast.parse(spec, mode="eval"))
    except SyntaxError:
        raise CheckpointError(f"conv_feature_layers {spec!r} is not a valid expression") from None
    if not isinstance(layers, list) or not all(isinstance(t, tuple) and len(t) == 3 for t in layers):
        raise CheckpointError(f"conv_feature_layers {spec!r} is not a list of (dim, kernel, stride)")
    if len(layers) > 64 or not all(isinstance(v, int) and 1 <= v <= 8192 for t in layers for v in t):
        raise CheckpointError(f"conv_feature_layers {spec[:80]!r}: at most 64 layers of (dim, kernel, stride), each 1..8192")
    return layers


def read_hubert(path, output_layer: int = 11) -> tuple[HubertConfig, dict[str, Tensor]]:
    """A fairseq HuBERT / mHuBERT checkpoint, keeping the layers up to `output_layer` only."""
    ckpt = torch_load(path)
    sd = fold_weight_norm(_drop_buffers(_state_dict(ckpt, "model", path)))
    args, task = training_args(ckpt)
    for key, want in (("extractor_mode", "default"), ("layer_norm_first", False), ("activation_fn", "gelu")):
        if args.get(key, want) != want:
            raise CheckpointError(f"{path}: {key}={args[key]!r}; only HuBERT base-style models ({key}={want!r}) are supported")
    if int(args.get("pos_conv_depth", 1)) != 1:
        raise CheckpointError(f"{path}: pos_conv_depth={args['pos_conv_depth']} is not supported")
    n_layers = _layer_count(sd, "encoder.layers.")
    if not 1 <= output_layer <= n_layers:
        raise CheckpointError(f"{path}: output layer {output_layer} is outside 1..{n_layers}")
    cfg = HubertConfig(
        conv_layers=parse_conv_layers(args.get("conv_feature_layers", "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2")),
        conv_bias=bool(args.get("conv_bias", False)),
        dim=sd["encoder.layers.0.fc1.weight"].shape[1],
        ffn_dim=sd["encoder.layers.0.fc1.weight"].shape[0],
        heads=int(args.get("encoder_attention_heads", 12)),
        layers=output_layer,
        conv_pos=int(args.get("conv_pos", 128)),
        conv_pos_groups=int(args.get("conv_pos_groups", 16)),
        normalize_wave=bool(task.get("normalize", False)),
        output_layer=output_layer,
        sample_rate=int(task.get("sample_rate", 16000)),
    )
    out = {}
    for k, v in sd.items():
        if k.startswith(("feature_extractor.", "layer_norm.", "post_extract_proj.")):
            out[k] = v
        elif k.startswith("encoder.pos_conv.0."):
            out["pos_conv.conv." + k.removeprefix("encoder.pos_conv.0.")] = v
        elif k.startswith("encoder.layer_norm."):
            out["encoder_layer_norm." + k.removeprefix("encoder.layer_norm.")] = v
        elif m := re.match(r"encoder\.layers\.(\d+)\.(.*)", k):
            if int(m.group(1)) < output_layer:
                out[f"layers.{m.group(1)}.{m.group(2)}"] = v
        elif k.startswith(("mask_emb", "final_proj.", "label_embs_concat")):
            continue  # pretraining-only
        else:
            raise CheckpointError(f"{path}: unexpected parameter {k!r} for a HuBERT base model")
    return cfg, out


# --- CodeHiFiGAN ----------------------------------------------------------------------------------


def read_codehifigan(path, config_path) -> tuple[VocoderConfig, dict[str, Tensor]]:
    config_path = Path(config_path)
    try:
        raw = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{config_path}: no such file") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path}: not valid JSON: {e}") from None
    try:
        cfg = VocoderConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    ckpt = torch_load(path)
    return cfg, fold_weight_norm(_state_dict(ckpt, "generator", path))


# --- k-means --------------------------------------------------------------------------------------


class _Inert:
    """Stands in for a scikit-learn estimator: keeps the pickled attribute dict, runs nothing."""


class _ArrayWrapper:
    """Stands in for joblib's NumpyArrayWrapper; replaced by the array read after it."""


def _scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise CheckpointError("k-means file holds an object-typed numpy scalar")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _reconstruct(cls, shape, typecode):
    if cls is not np.ndarray:
        raise CheckpointError("k-means file holds a numpy array subclass")
    return np.ndarray.__new__(np.ndarray, shape, typecode)


def _latin1(text, encoding="utf-8", errors="strict"):
    """`_codecs.encode` as pickle protocol 2 uses it for bytes (latin-1 text -> bytes), and nothing else: a
    chain of other codecs ("hex" doubles its input) let a file of a few hundred bytes ask for gigabytes."""
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused: _codecs.encode with {str(encoding)[:20]!r} (only latin1 text, as bytes are pickled)")
    return codecs.encode(text, "latin1", errors)


_KMEANS_GLOBALS = {
    ("sklearn.cluster._kmeans", "MiniBatchKMeans"): _Inert,
    ("sklearn.cluster._kmeans", "KMeans"): _Inert,
    ("sklearn.cluster.k_means_", "MiniBatchKMeans"): _Inert,
    ("sklearn.cluster.k_means_", "KMeans"): _Inert,
    ("joblib.numpy_pickle", "NumpyArrayWrapper"): _ArrayWrapper,
    ("sklearn.externals.joblib.numpy_pickle", "NumpyArrayWrapper"): _ArrayWrapper,
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("_codecs", "encode"): _latin1,
}


class _KMeansUnpickler(pickle._Unpickler):  # the pure-Python unpickler, so BUILD can be intercepted
    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        try:
            return _KMEANS_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"{self.path}: refused: it asks to unpickle `{module}.{name}`, which a k-means file "
                "does not need (loading it could run arbitrary code)"
            ) from None

    def load_build(self):
        pickle._Unpickler.load_build(self)
        if isinstance(self.stack[-1], _ArrayWrapper):
            self.stack[-1] = self._read_array(self.stack[-1])

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = load_build

    def _read_array(self, w: _ArrayWrapper) -> np.ndarray:
        dtype, shape = w.dtype, tuple(int(s) for s in w.shape)
        if not isinstance(dtype, np.dtype) or dtype.hasobject:
            raise CheckpointError(f"{self.path}: holds an object array; refused")
        if getattr(w, "numpy_array_alignment_bytes", None) is not None:  # joblib >= 1.2 pads to alignment
            self._file_read(self._file_read(1)[0])
        n = int(np.prod(shape)) * dtype.itemsize
        data = self._file_read(n)
        if len(data) != n:
            raise CheckpointError(f"{self.path}: truncated: an array of {n} bytes has only {len(data)}")
        arr = np.frombuffer(data, dtype=dtype).copy()
        return arr.reshape(shape[::-1]).T if w.order == "F" else arr.reshape(shape)


MAX_KMEANS_BYTES = 256 << 20  # public ones (K <= 2000, D <= 1280, float32) are under 11 MiB


def read_kmeans(path) -> Tensor:
    """Cluster centres [K, D] from a joblib-saved MiniBatchKMeans `.bin` or a `.npy` array."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".npy":
        try:
            centers = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise CheckpointError(f"{path}: not a plain numpy array: {e}") from None
    else:
        size = path.stat().st_size
        if size > MAX_KMEANS_BYTES:  # read whole below: refuse what no k-means model needs
            raise CheckpointError(f"{path}: {size / 2**20:.0f} MiB is over the {MAX_KMEANS_BYTES >> 20} MiB a k-means file may have; is it the right file?")
        raw = path.read_bytes()
        if not raw.startswith(b"\x80"):
            raise CheckpointError(f"{path}: not an uncompressed joblib/pickle file (compressed joblib files are not supported)")
        try:
            obj = _KMeansUnpickler(io.BytesIO(raw), path).load()
        except CheckpointError:
            raise
        except Exception as e:  # malformed pickle streams raise many kinds of errors
            raise CheckpointError(f"{path}: not a readable k-means file (truncated or corrupt?): {type(e).__name__}: {e}") from None
        centers = getattr(obj, "cluster_centers_", None)
        if centers is None:
            raise CheckpointError(f"{path}: the pickled object has no cluster_centers_")
    centers = np.asarray(centers)
    if centers.ndim != 2 or not np.issubdtype(centers.dtype, np.floating):
        raise CheckpointError(f"{path}: cluster centres must be a float [K, D] array, got {centers.dtype} {centers.shape}")
    return torch.from_numpy(centers.astype(np.float32))

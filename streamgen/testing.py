"""Test fixtures: tiny model sizes (the same code paths as the full models) and a random bundle
built from them, for tests, examples and benchmarks that need a bundle in a second."""

from __future__ import annotations

import torch

from .bundle import Bundle
from .models.hubert import HubertConfig, HubertEncoder
from .models.kmeans import KMeansQuantizer
from .models.unit_mbart import EOS, UnitMBart, UnitMBartConfig
from .models.vocoder import CodeHiFiGAN, DurationConfig, VocoderConfig

TINY_HUBERT = HubertConfig(
    conv_layers=[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2, dim=48, ffn_dim=96, heads=4, layers=2,
    conv_pos=16, conv_pos_groups=4, output_layer=2,
)
TINY_UNITS = 100
TINY_MBART = UnitMBartConfig(
    vocab_size=TINY_UNITS + 8, num_units=TINY_UNITS, dim=64, ffn_dim=128, heads=4, encoder_layers=2,
    decoder_layers=2, max_positions=1024, dropout=0.0, mask_token=TINY_UNITS + 4,
)
TINY_VOCODER = VocoderConfig(
    num_embeddings=TINY_UNITS, embedding_dim=32, model_in_dim=32, upsample_initial_channel=64,
    resblock_kernel_sizes=(3, 7), resblock_dilation_sizes=((1, 3), (1, 3)),
    dur_predictor_params=DurationConfig(encoder_embed_dim=32, var_pred_hidden_dim=32),
)


def random_bundle(seed: int = 0) -> Bundle:
    """A tiny, randomly initialised bundle: exercises every part, generates noise, not speech."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    b = Bundle(
        hubert=HubertEncoder(TINY_HUBERT),
        quantizer=KMeansQuantizer(torch.randn(TINY_UNITS, TINY_HUBERT.dim, generator=g)),
        mbart=UnitMBart(TINY_MBART),
        vocoder=CodeHiFiGAN(TINY_VOCODER),
    )
    for m in b.modules().values():
        m.eval()
    b.mbart.requires_grad_(False)
    return b


def public_size_bundle(seed: int = 0, streaming_translation: bool = False) -> Bundle:
    """Random weights at the public model sizes (mHuBERT base to layer 11 + 1000 k-means units,
    Unit mBART large, CodeHiFiGAN V1): what speed benchmarks run at when no checkpoint is at hand.
    streaming_translation: translation on its own Unit mBART large that streams (a causal encoder under
    wait-k 30, as the shipped bundle's translation backbone: a decision encodes only its new source)."""
    torch.manual_seed(seed)
    b = Bundle(hubert=HubertEncoder(HubertConfig(layers=11, output_layer=11)), quantizer=KMeansQuantizer(torch.randn(1000, 768)),
               mbart=UnitMBart(UnitMBartConfig(dropout=0.0)), vocoder=CodeHiFiGAN(VocoderConfig()))
    if streaming_translation:
        b.backbones["translation"] = UnitMBart(UnitMBartConfig(dropout=0.0, wait_k=30, wait_ratio=1.0))
    for m in b.modules().values():
        m.eval()
    for m in [b.mbart, *b.backbones.values()]:
        m.eval().requires_grad_(False)
        with torch.no_grad():  # an untrained decoder ends at once; a zero </s> embedding keeps it talking
            m.embed_tokens.weight[EOS].zero_()
    return b

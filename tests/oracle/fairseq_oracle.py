"""Run by a Python that has fairseq (never by streamgen itself): build fairseq's own Unit mBART
(mbart_large), HuBERT and CodeHiFiGAN at tiny sizes with random weights, save them as checkpoint
files in fairseq's layout, and record their outputs on fixed inputs.

usage: python fairseq_oracle.py OUT_DIR
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
results = {}

# --- Unit mBART: fairseq's BARTModel with the mbart_large architecture, pre-norm as the mBART recipe
from fairseq.data import Dictionary
from fairseq.models.bart.model import BARTModel, mbart_large_architecture

NUM_UNITS = 60
d = Dictionary()
for i in range(NUM_UNITS):
    d.add_symbol(str(i))
for lang in ("en", "es"):
    d.add_symbol(f"[{lang}]")
d.add_symbol("<mask>")
d.pad_to_multiple_(8)


class Task:
    source_dictionary = target_dictionary = d


args = argparse.Namespace(
    arch="mbart_large", encoder_layers=2, decoder_layers=2, encoder_embed_dim=32, decoder_embed_dim=32,
    encoder_ffn_embed_dim=64, decoder_ffn_embed_dim=64, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_normalize_before=True, decoder_normalize_before=True, max_source_positions=256, max_target_positions=256,
    task="translation_from_pretrained_bart", langs="en,es",
)
mbart_large_architecture(args)
model = BARTModel.build_model(args, Task()).eval()
with torch.no_grad():  # fairseq zero-inits some parts; give every parameter a visible value
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.05)
src = torch.cat([torch.randint(4, 4 + NUM_UNITS, (2, 15)), torch.full((2, 1), d.eos())], dim=1)
prev = torch.cat([torch.full((2, 1), d.eos()), torch.randint(4, 4 + NUM_UNITS, (2, 9))], dim=1)
with torch.no_grad():
    logits = model(src, torch.tensor([16, 16]), prev)[0]
# fairseq's own save: legacy-args models keep the Namespace under cfg["model"]
torch.save({"cfg": {"model": args, "task": {"_name": args.task}}, "model": model.state_dict(),
            "optimizer_history": [], "extra_state": {}, "last_optimizer_state": None}, out / "mbart.pt")
results.update(mbart_src=src, mbart_prev=prev, mbart_logits=logits, mbart_vocab=torch.tensor(len(d)))

# --- HuBERT (base layout, tiny)
from fairseq.models.hubert.hubert import HubertConfig, HubertModel
from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig

hcfg = HubertConfig(encoder_layers=3, encoder_embed_dim=48, encoder_ffn_embed_dim=96, encoder_attention_heads=4,
                    conv_feature_layers="[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2", conv_pos=16, conv_pos_groups=4, label_rate=50)
tcfg = HubertPretrainingConfig(data="/nonexistent", labels=["km"], normalize=False)
label_dict = Dictionary()
for i in range(20):
    label_dict.add_symbol(str(i))
hubert = HubertModel(hcfg, tcfg, [label_dict]).eval()
with torch.no_grad():
    for p in hubert.parameters():
        p.add_(torch.randn_like(p) * 0.02)
wave = torch.randn(1, 12000) * 0.1
with torch.no_grad():
    feats = hubert.extract_features(wave, padding_mask=None, mask=False, output_layer=2)[0]
torch.save({"cfg": {"model": OmegaConf.to_container(OmegaConf.structured(hcfg), enum_to_str=True),
                    "task": OmegaConf.to_container(OmegaConf.structured(tcfg), enum_to_str=True)},
            "model": hubert.state_dict(), "optimizer_history": []}, out / "hubert.pt")
results.update(hubert_wave=wave, hubert_layer2=feats)

# --- CodeHiFiGAN with a duration predictor
from fairseq.models.text_to_speech.codehifigan import CodeGenerator

vcfg = {"resblock": "1", "upsample_rates": [5, 4, 4, 2, 2], "upsample_kernel_sizes": [11, 8, 8, 4, 4],
        "upsample_initial_channel": 64, "resblock_kernel_sizes": [3, 7, 11],
        "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]], "num_embeddings": NUM_UNITS, "embedding_dim": 32,
        "model_in_dim": 32, "sampling_rate": 16000, "code_hop_size": 320,
        "dur_predictor_params": {"encoder_embed_dim": 32, "var_pred_hidden_dim": 32, "var_pred_kernel_size": 3,
                                 "var_pred_dropout": 0.5}}
gen = CodeGenerator(vcfg).eval()
with torch.no_grad():
    for name, p in gen.named_parameters():
        if name.startswith("dur_predictor.proj.bias"):
            p.fill_(1.2)  # durations of a few frames, not all 1
units = torch.randint(0, NUM_UNITS, (1, 25))
with torch.no_grad():
    audio = gen(code=units, dur_prediction=True)
torch.save({"generator": gen.state_dict()}, out / "g_00000100")
(out / "config.json").write_text(json.dumps(vcfg))
results.update(vocoder_units=units[0], vocoder_audio=audio.reshape(-1))

torch.save(results, out / "outputs.pt")
print("fairseq oracle wrote", sorted(p.name for p in out.iterdir()))

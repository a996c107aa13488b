"""Write tiny checkpoints in the public fairseq layouts (key names, nesting, cfg styles)."""

import argparse
import json

import torch
from omegaconf import OmegaConf


def weight_norm_split(w: torch.Tensor, dim: int):
    """(g, v) such that fairseq's weight_norm(dim) rebuilds w: v = w, g = |w| over the other dims."""
    dims = [i for i in range(w.dim()) if i != dim]
    return w.norm(dim=dims, keepdim=True), w.clone()


def mbart_state(model) -> dict:
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    emb = sd.pop("embed_tokens.weight")
    sd.update({"encoder.embed_tokens.weight": emb, "decoder.embed_tokens.weight": emb.clone(),
               "decoder.output_projection.weight": emb.clone(), "encoder.version": torch.tensor([3.0]),
               "decoder.version": torch.tensor([3.0])})
    return sd


def mbart_args(cfg) -> dict:
    return {
        "_name": "mbart_large", "arch": "mbart_large", "encoder_layers": cfg.encoder_layers, "decoder_layers": cfg.decoder_layers,
        "encoder_embed_dim": cfg.dim, "encoder_ffn_embed_dim": cfg.ffn_dim, "encoder_attention_heads": cfg.heads,
        "decoder_attention_heads": cfg.heads, "encoder_normalize_before": cfg.normalize_before,
        "decoder_normalize_before": cfg.normalize_before, "no_scale_embedding": not cfg.scale_embedding,
        "layernorm_embedding": cfg.layernorm_embedding, "activation_fn": "gelu", "dropout": 0.1,
        "share_all_embeddings": True, "max_source_positions": cfg.max_positions,
    }


def save_mbart(path, model, style: str):
    """style: "dict" (recent fairseq: plain cfg), "omegaconf" (cfg a DictConfig),
    "namespace" (legacy-args model: cfg["model"] a Namespace), "args" (old files: top-level args)."""
    args = mbart_args(model.cfg)
    ckpt = {"model": mbart_state(model), "optimizer_history": [{"criterion_name": "x", "num_updates": 7}],
            "extra_state": {"epoch": 3}, "last_optimizer_state": None, "task_state": {}}
    task = {"_name": "translation_from_pretrained_bart", "langs": "en,es"}
    if style == "dict":
        ckpt["cfg"] = {"model": args, "task": task, "common": {"fp16": True}}
    elif style == "omegaconf":
        ckpt["cfg"] = OmegaConf.create({"model": args, "task": task, "common": {"fp16": True}})
    elif style == "namespace":
        ckpt["cfg"] = {"model": argparse.Namespace(**args, task="translation"), "task": task}
    elif style == "args":
        ckpt["args"] = argparse.Namespace(**args)
    torch.save(ckpt, path)


def save_hubert(path, model, parametrizations: bool = False, extra_layers: int = 1):
    """fairseq HubertModel layout; `extra_layers` beyond the model's (as in a 12-layer file read at 11)."""
    c = model.cfg
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("pos_conv.conv.weight"):
            g, w = weight_norm_split(v, dim=2)
            if parametrizations:
                sd["encoder.pos_conv.0.parametrizations.weight.original0"], sd["encoder.pos_conv.0.parametrizations.weight.original1"] = g, w
            else:
                sd["encoder.pos_conv.0.weight_g"], sd["encoder.pos_conv.0.weight_v"] = g, w
        elif k.startswith("pos_conv.conv."):
            sd["encoder.pos_conv.0." + k.removeprefix("pos_conv.conv.")] = v
        elif k.startswith("encoder_layer_norm."):
            sd["encoder.layer_norm." + k.removeprefix("encoder_layer_norm.")] = v
        elif k.startswith("layers."):
            sd["encoder." + k] = v
        else:
            sd[k] = v
    for i in range(c.layers, c.layers + extra_layers):  # layers past the output layer: must be dropped
        for k, v in model.layers[0].state_dict().items():
            sd[f"encoder.layers.{i}.{k}"] = torch.randn_like(v)
    sd["mask_emb"] = torch.randn(c.dim)
    sd["final_proj.weight"], sd["final_proj.bias"] = torch.randn(16, c.dim), torch.randn(16)
    sd["label_embs_concat"] = torch.randn(20, 16)
    spec = " + ".join(f"[({ch}, {k}, {s})]" for ch, k, s in c.conv_layers)
    cfg = {
        "model": {"_name": "hubert", "extractor_mode": "default", "encoder_layers": c.layers + extra_layers,
                  "encoder_embed_dim": c.dim, "encoder_ffn_embed_dim": c.ffn_dim, "encoder_attention_heads": c.heads,
                  "activation_fn": "gelu", "layer_norm_first": False, "conv_feature_layers": spec, "conv_bias": c.conv_bias,
                  "conv_pos": c.conv_pos, "conv_pos_groups": c.conv_pos_groups, "label_rate": 50},
        "task": {"_name": "hubert_pretraining", "normalize": c.normalize_wave, "sample_rate": 16000, "labels": ["km"]},
    }
    torch.save({"model": sd, "cfg": OmegaConf.create(cfg), "optimizer_history": []}, path)


def save_codehifigan(path, config_path, model):
    sd = {}
    for k, v in model.state_dict().items():
        is_conv = k.endswith(".weight") and v.dim() == 3 and not k.startswith("dur_predictor")
        if is_conv:
            sd[k[:-7] + ".weight_g"], sd[k[:-7] + ".weight_v"] = weight_norm_split(v, dim=0)
        else:
            sd[k] = v
    torch.save({"generator": sd}, path)
    c = model.cfg
    cfg = {"resblock": "1", "upsample_rates": list(c.upsample_rates), "upsample_kernel_sizes": list(c.upsample_kernel_sizes),
           "upsample_initial_channel": c.upsample_initial_channel, "resblock_kernel_sizes": list(c.resblock_kernel_sizes),
           "resblock_dilation_sizes": [list(d) for d in c.resblock_dilation_sizes], "num_embeddings": c.num_embeddings,
           "embedding_dim": c.embedding_dim, "model_in_dim": c.model_in_dim, "segment_size": 8960, "code_hop_size": 320,
           "sampling_rate": 16000, "num_workers": 4,
           "dur_predictor_params": {"encoder_embed_dim": c.embedding_dim, "var_pred_hidden_dim": c.dur_predictor_params.var_pred_hidden_dim,
                                    "var_pred_kernel_size": 3, "var_pred_dropout": 0.5}}
    with open(config_path, "w") as f:
        json.dump(cfg, f)

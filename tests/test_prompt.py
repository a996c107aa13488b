"""Prompt tuning: only the prompt learns; sizes are what the config says; initialisation and caching."""

import torch
import torch.nn.functional as F
from conftest import TINY, random_units

from streamgen.models.prompt import DeepPrompt, PromptConfig, count_parameters
from streamgen.models.unit_mbart import EOS, UNIT_OFFSET, units_to_source


def test_only_prompt_parameters_get_gradients(mbart):
    prompt = DeepPrompt(TINY, PromptConfig(length=5))
    src = units_to_source(random_units(15))[None]
    tgt = random_units(10, seed=3) + UNIT_OFFSET
    prev = torch.cat([torch.tensor([EOS]), tgt[:-1]])[None]
    loss = F.cross_entropy(mbart(src, prev, prompt.kv(mbart))[0], tgt)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in mbart.parameters())
    for name, p in prompt.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_trainable_count_is_what_the_config_says(mbart):
    L, d = 7, TINY.dim
    both = DeepPrompt(TINY, PromptConfig(length=L))
    dec = DeepPrompt(TINY, PromptConfig(length=L, stacks=("decoder",)))
    assert count_parameters(both, trainable_only=True) == 2 * L * d * (TINY.encoder_layers + TINY.decoder_layers)
    assert count_parameters(dec, trainable_only=True) == 2 * L * d * TINY.decoder_layers
    assert count_parameters(mbart, trainable_only=True) == 0
    assert dec.kv(mbart).encoder == (None,) * TINY.encoder_layers


def test_init_takes_real_key_value_inputs(mbart, monkeypatch):
    import streamgen.models.attention as attention

    units = torch.stack([random_units(20, seed=s) for s in range(2)])
    seen, product, k_proj = [], attention.linear, mbart.decoder.layers[1].self_attn.k_proj

    def spy(x, weight, bias=None):  # what decoder layer 1's key projection is given
        if weight is k_proj.weight:
            seen.append(x.reshape(-1, TINY.dim))
        return product(x, weight, bias)

    monkeypatch.setattr(attention, "linear", spy)
    prompt = DeepPrompt(TINY, PromptConfig(length=6)).init_from_model(mbart, units)
    monkeypatch.undo()
    acts = seen[0]
    for vec in prompt.decoder_k[1]:
        assert torch.isclose(acts, vec).all(-1).any()  # each prompt vector is a real activation
    # LayerNorm-scale vectors (|x| ~ sqrt(d)), not N(0,1) noise or zeros
    norms = prompt.encoder_v.norm(dim=-1)
    assert torch.all(norms > 0.2 * TINY.dim**0.5) and torch.all(norms < 5 * TINY.dim**0.5)


def test_shared_kv_is_computed_once_and_refreshed_after_an_update(mbart):
    prompt = DeepPrompt(TINY, PromptConfig(length=4)).init_from_model(mbart, torch.stack([random_units(10)]))
    a = prompt.shared_kv(mbart)
    assert prompt.shared_kv(mbart) is a
    opt = torch.optim.SGD(prompt.parameters(), lr=0.1)
    prompt.kv(mbart).decoder[0][0].sum().backward()
    opt.step()
    b = prompt.shared_kv(mbart)
    assert b is not a and not torch.equal(a.decoder[0][0], b.decoder[0][0])
    assert not b.decoder[0][0].requires_grad

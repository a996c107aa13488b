import pytest
import torch

from streamgen.models.unit_mbart import UnitMBart, UnitMBartConfig

TINY = UnitMBartConfig(
    vocab_size=72, num_units=60, dim=32, ffn_dim=64, heads=4, encoder_layers=2, decoder_layers=3,
    max_positions=512, dropout=0.0,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _threads():
    """`streamgen run` and `serve` set torch's thread count for their process (`options.set_engine_threads`);
    commands the tests invoke in-process must not change it for the tests after them."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def held_in_float16(m: torch.nn.Module) -> torch.nn.Module:
    """Every weight rounded to what float16 holds, as a bundle packed in float16 ships them: the speech LM's products
    then read float16 copies on a CPU (`models.half_weights`), so the tests run on both kinds of weights."""
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.half().float())
    return m


@pytest.fixture(params=["float32", "float16-held"])
def mbart(request) -> UnitMBart:
    m = UnitMBart(TINY).eval().requires_grad_(False)
    return held_in_float16(m) if request.param == "float16-held" else m


def random_units(n: int, k: int = TINY.num_units, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=["float32", "float16-held"])
def lively_mbart(request) -> UnitMBart:
    """Larger random weights: a fresh N(0, 0.02) model greedily repeats one unit forever, which
    would make "same greedy units" trivially true; with these, greedy paths vary."""
    m = UnitMBart(TINY).eval().requires_grad_(False)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
    return held_in_float16(m) if request.param == "float16-held" else m


@pytest.fixture
def test_bundle():
    """The tiny random bundle, with decoder weights that do not pick </s> at once (an untrained
    N(0, 0.02) decoder ends every sequence immediately), so every task produces audio."""
    from streamgen.testing import random_bundle
    from streamgen.models.unit_mbart import EOS

    b = random_bundle(seed=1)
    with torch.no_grad():
        for p in b.mbart.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
        b.mbart.embed_tokens.weight[EOS].zero_()
    return b


@pytest.fixture
def broker(tmp_path):
    """A real Mosquitto on a free port of 127.0.0.1, anonymous, for the test's duration."""
    from services import Mosquitto

    b = Mosquitto(tmp_path)
    b.start()
    yield b
    b.stop()

"""Registries: names, aliases, suggestions; tokenizer metadata agrees with the tokenizers."""

import pytest
import torch

from raebench.errors import UnknownNameError
from raebench.metrics import METRICS
from raebench.registry import Registry
from raebench.tokenizers import TOKENIZERS, build_tokenizer, get_tokenizer_spec


def test_suggestions_for_close_names():
    with pytest.raises(UnknownNameError) as e:
        get_tokenizer_spec("bicubic-f9")
    assert "bicubic-f8" in str(e.value) and "raebench ls tokenizers" in str(e.value)
    with pytest.raises(UnknownNameError, match="psnr"):
        METRICS.get("psnrr")


def test_registry_rules():
    r: Registry[int] = Registry("thing")
    r.register("a-b", 1, aliases=("ab",))
    assert r.get("AB") == 1 and r.canonical("ab") == "a-b" and "ab" in r
    with pytest.raises(ValueError):
        r.register("a-b", 2)
    with pytest.raises(ValueError):
        r.register("Bad_Name", 3)


def _weightless():
    return [s.name for s in TOKENIZERS if not s.weights]


@pytest.mark.parametrize("name", _weightless())
def test_weightless_tokenizers_contract(name):
    spec = get_tokenizer_spec(name)
    tok = build_tokenizer(name)
    x = torch.rand(2, 3, 64, 64)
    z = tok.encode(x)
    assert tuple(z.shape[1:]) == spec.latent_shape(64) == tok.latent_shape(64)
    y = tok.decode(z)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert tok.name == name


def test_pixels_is_identity_and_bicubic_f8_dims():
    x = torch.rand(1, 3, 32, 32)
    assert torch.allclose(build_tokenizer("pixels").reconstruct(x), x, atol=1e-6)
    assert get_tokenizer_spec("bicubic-f8").latent_dims(256) == 3072
    # a constant image survives box-down / bicubic-up exactly
    c = torch.full((1, 3, 32, 32), 0.3)
    assert torch.allclose(build_tokenizer("bicubic-f16").reconstruct(c), c, atol=1e-6)


def test_listing_needs_no_weights():
    for spec in TOKENIZERS:
        assert len(spec.latent_shape(256)) >= 1


def test_unknown_name_hints_only_at_listings_that_exist():
    from raebench.errors import UnknownNameError
    from raebench.stage2.models import MODELS

    with pytest.raises(UnknownNameError, match=r"Unknown stage-2 model 'tiny'\. Did you mean 'ditdh-tiny'.*Known: .*ditdh-xl") as e:
        MODELS.get("tiny")
    assert "raebench ls" not in str(e.value)  # `raebench ls` has no stage-2 model listing
    with pytest.raises(UnknownNameError, match="Run `raebench ls tokenizers` to list them"):
        TOKENIZERS.get("no-such-tokenizer")


def test_spreads_have_no_direction():
    """kid-std and is-std are spreads of kid and is: no arrow in the eval/score tables, no best."""
    from raebench.metrics.base import higher_is_better

    assert higher_is_better("kid") is False and higher_is_better("is") is True
    assert higher_is_better("kid-std") is None and higher_is_better("is-std") is None

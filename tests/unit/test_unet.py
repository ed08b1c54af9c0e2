"""UNet backbones: full-resolution output, sizes, input checks, gradients, deterministic init."""
from __future__ import annotations

import json

import pytest
import torch

from screener_nb.errors import ConfigError, InputError
from screener_nb.models.unet import UNET_SIZES, build_unet, count_parameters


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("window,in_channels", [((48, 48, 32), 1), ((96, 96, 64), 2)])
def test_tiny_output_has_the_input_resolution(window, in_channels):
    torch.manual_seed(0)
    net = build_unet("tiny", in_channels=in_channels, out_channels=32).eval()
    with torch.no_grad():
        out = net(torch.rand(1, in_channels, *window))
    assert out.shape == (1, 32, *window)
    # no output activation: a raw linear head gives both signs
    assert out.min() < 0 < out.max()


def test_small_and_paper_output_shapes():
    torch.manual_seed(0)
    with torch.no_grad():
        small = build_unet("small", out_channels=8).eval()
        assert small(torch.rand(1, 1, 48, 48, 32)).shape == (1, 8, 48, 48, 32)
        paper = build_unet("paper", out_channels=32).eval()  # 6 levels: sides multiples of 32
        assert paper(torch.rand(1, 1, 64, 32, 32)).shape == (1, 32, 64, 32, 32)


def test_parameter_counts_per_size():
    counts = {s: count_parameters(build_unet(s)) for s in UNET_SIZES}
    # independent count: the distinct tensors of the state dict (DynUNet lists its blocks twice, once
    # under skip_layers; instance norm keeps no buffers, so every tensor is a trainable parameter)
    net = build_unet("tiny")
    unique = {v.data_ptr(): v.numel() for v in net.state_dict().values()}
    assert counts["tiny"] == sum(unique.values())
    assert counts["tiny"] < 1_000_000
    assert 1_000_000 < counts["small"] < 10_000_000
    assert counts["paper"] > 10_000_000
    # frozen parameters are not counted
    net.input_block.requires_grad_(False)
    frozen = sum(p.numel() for p in net.input_block.parameters())
    assert count_parameters(net) == counts["tiny"] - frozen


def test_config_is_json_and_describes_the_architecture():
    net = build_unet("tiny", in_channels=2, out_channels=16, features=(4, 8, 16))
    cfg = json.loads(json.dumps(net.config))
    assert cfg["size"] == "tiny" and cfg["in_channels"] == 2 and cfg["out_channels"] == 16
    assert cfg["features"] == [4, 8, 16] and cfg["levels"] == 3 and cfg["multiple"] == 4
    with torch.no_grad():
        assert net.eval()(torch.rand(2, 2, 12, 8, 8)).shape == (2, 16, 12, 8, 8)
    assert build_unet("tiny").config != build_unet("small").config


def test_unknown_size_lists_known_sizes():
    with pytest.raises(ConfigError) as e:
        build_unet("huge")
    msg = str(e.value)
    assert "'huge'" in msg and all(s in msg for s in ("tiny", "small", "paper"))


def test_unknown_override_is_a_config_error():
    with pytest.raises(ConfigError, match="widht"):
        build_unet("tiny", widht=3)


@pytest.mark.parametrize("shape,found", [
    ((1, 1, 48, 40, 32), "Y=40 not a multiple of 16"),
    ((1, 1, 48, 48, 30), "Z=30 not a multiple of 16"),
    ((1, 2, 48, 48, 32), "2 channels"),
    ((1, 48, 48, 32), "4 dimensions"),
    ((1, 1, 16, 16, 16), "coarsest grid (1, 1, 1)"),
])
def test_wrong_input_shape_names_axis_and_multiple(shape, found):
    net = build_unet("tiny")
    with pytest.raises(InputError) as e:
        net(torch.zeros(shape))
    assert found in str(e.value) and "multiples of 16" in str(e.value)


def test_paper_needs_multiples_of_32():
    net = build_unet("paper")
    with pytest.raises(InputError, match="X=48 not a multiple of 32"):
        net(torch.zeros(1, 1, 48, 64, 64))


def test_gradient_reaches_the_first_layer():
    torch.manual_seed(0)
    net = build_unet("tiny")
    out = net(torch.rand(2, 1, 32, 32, 16))
    out.square().mean().backward()
    first = net.input_block.conv1.conv.weight
    assert first.grad is not None and torch.isfinite(first.grad).all() and first.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.parameters())


def test_deterministic_given_the_seed():
    torch.manual_seed(3)
    a = build_unet("tiny")
    torch.manual_seed(3)
    b = build_unet("tiny")
    torch.manual_seed(4)
    c = build_unet("tiny")
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    x = torch.rand(1, 1, 32, 32, 16)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))

"""ResNet-50: torchvision's parameter names and shapes (written out here), forward shapes and gradients."""

from __future__ import annotations

import pytest
import torch

from fm_engine.models.resnet import ResNet50, resnet50

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{k}": ((c,) if k != "num_batches_tracked" else ()) for k in BN}


def _first_block(layer: int, in_ch: int, width: int) -> dict[str, tuple[int, ...]]:
    p, out = f"layer{layer}.0", 4 * width
    d = {
        f"{p}.conv1.weight": (width, in_ch, 1, 1),
        f"{p}.conv2.weight": (width, width, 3, 3),
        f"{p}.conv3.weight": (out, width, 1, 1),
        f"{p}.downsample.0.weight": (out, in_ch, 1, 1),
    }
    d |= _bn(f"{p}.bn1", width) | _bn(f"{p}.bn2", width) | _bn(f"{p}.bn3", out) | _bn(f"{p}.downsample.1", out)
    return d


# torchvision resnet50: stem, the first Bottleneck of every layer in full, and the classifier
EXPECTED = (
    {"conv1.weight": (64, 3, 7, 7)}
    | _bn("bn1", 64)
    | _first_block(1, 64, 64)
    | _first_block(2, 256, 128)
    | _first_block(3, 512, 256)
    | _first_block(4, 1024, 512)
    | {"fc.weight": (1000, 2048), "fc.bias": (1000,)}
)


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return resnet50().state_dict()


def test_state_dict_matches_torchvision_layout(state: dict[str, torch.Tensor]) -> None:
    assert len(state) == 320
    for name, shape in EXPECTED.items():
        assert name in state, name
        assert tuple(state[name].shape) == shape, (name, tuple(state[name].shape), shape)
    blocks = {k.split(".")[0]: set() for k in state if k.startswith("layer")}
    for k in state:
        if k.startswith("layer"):
            blocks[k.split(".")[0]].add(int(k.split(".")[1]))
    assert {k: len(v) for k, v in blocks.items()} == {"layer1": 3, "layer2": 4, "layer3": 6, "layer4": 3}
    # later blocks: no downsample, same inner shapes
    assert "layer3.5.conv2.weight" in state and tuple(state["layer3.5.conv2.weight"].shape) == (256, 256, 3, 3)
    assert not any(k.startswith("layer1.1.downsample") for k in state)
    params = sum(
        v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var", "batches_tracked"))
    )
    assert params == 25_557_032  # torchvision resnet50
    assert state["layer2.0.conv2.weight"].shape[-1] == 3


def test_strides_and_forward() -> None:
    m = ResNet50(num_classes=10, base_width=8)
    assert m.layer2[0].conv2.stride == (2, 2) and m.layer2[0].conv1.stride == (1, 1)  # stride on the 3x3
    assert m.layer2[0].downsample[0].stride == (2, 2) and m.conv1.bias is None
    x = torch.rand(2, 3, 32, 32)
    assert m(x).shape == (2, 10) and m.forward_features(x).shape == (2, 256)
    m(x).sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    feats = ResNet50(num_classes=None, base_width=8)
    assert feats(x).shape == (2, 256) and feats.feature_dim == 256
    with pytest.raises(ValueError, match="images"):
        m(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="base_width"):
        ResNet50(base_width=0)

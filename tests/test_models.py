"""Every registered architecture: output shape, input normalization inside, rebuild from config."""

import pytest
import torch

from trainable.config import TrainConfig
from trainable.model.networks import ARCHITECTURES, MelNorm, build_model, count_parameters


@pytest.fixture(autouse=True)
def one_thread():
    """Small forwards gain nothing from threads; on a busy 2-core box spinning threads cost seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("shape", [(3, 40, 50), (3, 1, 40, 50)])
def test_forward_shape(arch, shape):
    torch.manual_seed(0)
    model = build_model(TrainConfig(arch=arch, width=4, depth=3), n_mels=40)
    model.eval()
    out = model(torch.randn(*shape) * 20 - 40)
    assert out.shape == (3, 50)
    assert torch.isfinite(out).all()


def test_seed_resnet_structure():
    model = build_model(TrainConfig.preset("seed"), n_mels=64)
    assert model.stem[0].kernel_size == (7, 7) and model.stem[0].stride == (2, 2)
    assert model.stem[0].out_channels == 16
    assert [b.conv2.out_channels for b in model.blocks] == [16, 32, 32, 32, 64, 64, 64, 128]
    assert model.fc.out_features == 50
    # the seed's dropout lives inside each block
    assert all(b.drop.p == 0.2 for b in model.blocks)


def test_width_and_depth_change_the_network():
    small = count_parameters(build_model(TrainConfig(arch="cnn", width=4, depth=2), 64))
    wide = count_parameters(build_model(TrainConfig(arch="cnn", width=8, depth=2), 64))
    deep = count_parameters(build_model(TrainConfig(arch="cnn", width=4, depth=3), 64))
    assert small < wide and small < deep


def test_smoke_preset_is_tiny():
    assert count_parameters(build_model(TrainConfig.preset("smoke"), 64)) < 5000


def test_input_normalization_is_per_mel_bin_and_saved_in_the_state_dict():
    norm = MelNorm(8)
    x = torch.randn(16, 8, 30) * torch.arange(1, 9).view(1, 8, 1) + torch.arange(8).view(1, 8, 1) * 10
    y = norm(x)
    assert y.shape == (16, 1, 8, 30)
    assert torch.allclose(y.mean(dim=(0, 1, 3)), torch.zeros(8), atol=1e-4)
    assert torch.allclose(y.std(dim=(0, 1, 3)), torch.ones(8), atol=1e-2)
    model = build_model(TrainConfig(arch="cnn", width=4, depth=2), 8)
    assert "norm.bn.running_mean" in model.state_dict()


def test_unknown_arch():
    class C:
        arch, width, depth, dropout = "nope", 4, 2, 0.0

    with pytest.raises(ValueError, match="unknown arch"):
        build_model(C(), 64)


def test_config_and_registry_name_the_same_architectures():
    from trainable.config import ARCHS

    assert set(ARCHS) == set(ARCHITECTURES)

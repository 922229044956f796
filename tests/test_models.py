"ssl_book.models: shapes, parameter counts, the encoder/head split, bad names."
import numpy as np
import pytest
import torch

from ssl_book.models import MODELS, Classifier, build_model, channel_stats, count_parameters, wide_resnet

def test_wrn28_2_has_about_1_47_million_parameters():
    n = count_parameters(wide_resnet(28, 2))
    assert 1_460_000 <= n <= 1_480_000

@pytest.mark.parametrize("name, kwargs, size, channels", [
    ("cnn", {"width": 8}, 8, 1), ("cnn", {"width": 8}, 32, 3), ("wrn28_2", {}, 32, 3), ("resnet18", {}, 32, 3)])
def test_encoder_head_and_output_shapes(name, kwargs, size, channels):
    m = build_model(name, in_channels=channels, n_classes=7, **kwargs)
    assert isinstance(m, Classifier)
    x = torch.rand(3, channels, size, size)
    feats = m.encoder(x)
    assert feats.shape == (3, m.feature_dim)
    assert m(x).shape == (3, 7)
    m.eval()
    assert torch.allclose(m.head(m.encoder(x)), m(x), atol=1e-6)         # logits = head(encoder(x))

def test_normalisation_is_part_of_the_model():
    images = torch.randint(0, 256, (20, 3, 4, 4), dtype=torch.uint8)
    mean, std = channel_stats(images)
    m = build_model("cnn", width=4, mean=mean, std=std)
    assert torch.allclose(m.state_dict()["encoder.0.mean"].flatten(), torch.tensor(mean))
    z = m.encoder[0](images.float() / 255)
    assert torch.allclose(z.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(z.transpose(0, 1).reshape(3, -1).std(1), torch.ones(3), atol=1e-4)

def test_mean_std_as_tensors_and_wrong_length():
    m = build_model("cnn", width=4, mean=torch.tensor([0.1, 0.2, 0.3]), std=np.array([0.2, 0.2, 0.2]))
    assert m(torch.rand(2, 3, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="one value per channel"):
        build_model("cnn", width=4, mean=[0.5, 0.5])

def test_bad_names():
    with pytest.raises(ValueError, match="cnn, wrn28_2, resnet18"):
        build_model("vgg16")
    with pytest.raises(ValueError, match="6n \\+ 4"):
        wide_resnet(depth=27)

def test_wrn_shortcut_sees_the_activated_input_only_in_the_first_stage():
    "As google-research/fixmatch libml/models.py: activate_before_residual only for the first block of stage 1."
    import torch.nn.functional as F
    from ssl_book.models import wide_resnet
    m = wide_resnet(28, 2).eval()
    blocks = [b for b in m.encoder if hasattr(b, "activate_before_residual")]
    projecting = [b for b in blocks if b.shortcut is not None]
    assert [b.activate_before_residual for b in projecting] == [True, False, False]
    seen = {}
    for i, b in enumerate(projecting):
        b.shortcut.register_forward_hook(lambda mod, inp, out, i=i: seen.update({i: inp[0]}))
        b.register_forward_hook(lambda mod, inp, out, i=i: seen.update({f"in{i}": inp[0]}))
    m(torch.rand(2, 3, 32, 32))
    for i, b in enumerate(projecting):
        act = F.leaky_relu(b.bn1(seen[f"in{i}"]), 0.1)
        assert torch.equal(seen[i], act if i == 0 else seen[f"in{i}"])

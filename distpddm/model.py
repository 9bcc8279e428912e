"""Embedding networks: a backbone from the registry (:mod:`distpddm.backbones`: ``small_cnn``,
EfficientNet-Lite, torchvision's classifiers, ``timm/<name>``) + an embedding layer + L2 norm, and the exported
``model.pt`` that rebuilds one without DeepSpeed or Ray.
"""

from __future__ import annotations

import os
import pickle

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import (
    EFFICIENTNET_LITE,
    NORMS,
    EfficientNetLite,
    GlobalPool,
    SmallCNN,
    convert_sync_batchnorm,
    create_backbone,
    freeze_batchnorm,
    load_state_dict_file,
    packaged_weights,
    resolve_pretrained,
)
from .config import ModelConfig
from .durable import fsync_dir, fsync_file

__all__ = [
    "ModelConfig",
    "EmbeddingNet",
    "create_model",
    "export_model",
    "load_exported",
    "exported_image_size",
    "load_exported_metric",
    # defined in distpddm.backbones, importable from here as before
    "SmallCNN",
    "NORMS",
    "GlobalPool",
    "EfficientNetLite",
    "EFFICIENTNET_LITE",
    "freeze_batchnorm",
    "load_state_dict_file",
    "packaged_weights",
    "resolve_pretrained",
]


class EmbeddingNet(nn.Module):
    """Backbone features -> linear embedding -> L2 normalisation (unit vectors, as searched at test time).

    ``backbone_dtype=torch.bfloat16`` runs the backbone under autocast; the weights stay fp32 (the master copy
    the optimiser updates and :func:`export_model` writes), and the embedding layer and normalisation run in
    fp32 on the upcast features, so what the miner and the loss see is fp32.
    """

    def __init__(self, cfg: ModelConfig, backbone_dtype: torch.dtype | None = None):
        super().__init__()
        self.cfg, self.backbone_dtype = cfg, backbone_dtype
        self.backbone, width = create_backbone(
            cfg.backbone,
            pretrained=cfg.pretrained,
            pooling=cfg.pooling,
            in_channels=cfg.in_channels,
            small_cnn_width=cfg.small_cnn_width,
        )
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
        model = convert_sync_batchnorm(model)
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
    fsync_file(tmp)  # complete on disk before it takes the name, which then is made durable too
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def _load_blob(path: str | os.PathLike, map_location="cpu") -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no exported model at {path} (a run writes model.pt when it finishes)")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:  # truncated, or not torch.save's at all
        raise ValueError(f"{path} is not a distpddm exported model, or is damaged ({type(e).__name__})") from None
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

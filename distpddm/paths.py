"""How a config's values name files and folders: which keys hold paths, the one rule for relative paths
(relative to the config file's folder when written there, to the current folder when given on the command
line), and what is not a local path (URLs, ``pipe:`` specs, torchvision weights names)."""

from __future__ import annotations

import re
from pathlib import Path

# The keys that name local files or folders: relative values resolve by the rule of :func:`load_config`.
PATH_KEYS = ("data.train_shards", "data.val_shards", "model.pretrained", "train.deepspeed", "ray.storage_path")


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def run_location(storage_path: str, name: str) -> str:
    """The run folder: a local path, or a URL for a remote storage path."""
    if is_remote(storage_path):
        return f"{storage_path.rstrip('/')}/{name}"
    return str(Path(storage_path.removeprefix("file://")) / name)


def is_weights_name(value) -> bool:
    """``model.pretrained`` naming torchvision weights (``IMAGENET1K_V1``, ``ResNet50_Weights.DEFAULT``), not a file."""
    return isinstance(value, str) and re.fullmatch(r"([A-Za-z0-9_]+_Weights\.)?[A-Z][A-Z0-9_]*", value) is not None


def is_local(path: str) -> bool:
    return "://" not in path and not path.startswith("pipe:")


def anchor_paths(tree: dict, folder: Path) -> None:
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
        if isinstance(value, str) and value and is_local(value):
            expanded = Path(value).expanduser()
            if not expanded.is_absolute():
                node[key] = str(folder / expanded)


def absolute(path: str | None) -> str | None:
    if not path or not is_local(path):
        return path
    return str(Path(path).expanduser().resolve())

import json
import os
from pathlib import Path

import pytest
import yaml

import distpddm.config
from distpddm.config import ConfigError, deepspeed_config, from_dict, load_config, save_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def shards(tmp_path):
    d = tmp_path / "shards" / "train"
    d.mkdir(parents=True)
    counts = [10] * 17 + [3] * 20  # 17 classes can fill a group of K = 4 (and 37 one of K = 3)
    index = {"shards": [], "classes": [str(c) for c in range(37)], "samples": sum(counts), "class_counts": counts}
    (d / "index.json").write_text(json.dumps(index))
    return d


@pytest.fixture
def config_file(tmp_path, shards):
    def write(**sections):
        tree = {
            "data": {"train_shards": str(shards)},
            "train": {"deepspeed": str(REPO / "configs/deepspeed/zero1_cpu.json")},
        }
        for k, v in sections.items():
            tree.setdefault(k, {}).update(v)
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(tree))
        return path

    return write


def test_valid_config_loads_with_overrides_and_round_trips(config_file, tmp_path):
    cfg = load_config(
        config_file(), ["train.steps=7", "data.images_per_class=3", "loss.alpha=0.25", "name=x", "optim.lr=1e-3"]
    )
    assert (cfg.train.steps, cfg.data.images_per_class, cfg.loss.args["alpha"], cfg.name) == (7, 3, 0.25, "x")
    assert cfg.optim.lr == 0.001  # YAML 1.1 reads 1e-3 as a string; float keys accept it
    assert cfg.local_batch == 16 * 3
    assert Path(cfg.data.train_shards).is_absolute() and Path(cfg.train.deepspeed).is_absolute()
    save_config(cfg, tmp_path / "saved.yaml")
    assert from_dict(yaml.safe_load((tmp_path / "saved.yaml").read_text())) == cfg
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 48 and ds["train_batch_size"] == 192


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.clases_per_batch=4"], r"unknown key 'data.clases_per_batch'; did you mean data.classes_per_batch"),
        (["optimizer.lr=1"], r"unknown key 'optimizer'; did you mean optim"),
        (["train.steps=ten"], r"train.steps must be int, got 'ten'"),
        (["optim.lr=fast"], r"optim.lr must be float, got 'fast'"),
        (["model.freeze_bn=1"], r"model.freeze_bn must be bool"),
        (["data.images_per_class=1"], r"data.images_per_class must be >= 2"),
        (["data.classes_per_batch=18"], r"only 17 of its 37 classes have >= 4 images .* needs 18 such classes"),
        (["train.seed=-1"], r"train.seed must be >= 0"),
        (
            ["data.batch_size=10"],
            r"data.batch_size=10 but data.classes_per_batch x data.images_per_class = 16 x 4 = 64",
        ),
        (["data.train_shards=/nonexistent/shards"], r"data.train_shards: no shards at '/nonexistent/shards'"),
        (["model.sync_bn=true"], r"model.sync_bn needs GPUs"),
        (["loss.metric=cosine"], r"loss \(PDDMLoss\): metric must be one of"),
        (["loss.name=multisimilarity"], r"loss.name 'multisimilarity' is not known; did you mean 'multi_similarity'"),
        (["loss.alpah=0.1"], r"unknown key loss.alpah for PDDMLoss; did you mean loss.alpha"),
        (["loss.alpha=big"], r"loss.alpha must be float, got 'big'"),
        (["miner.name=hard", "miner.positives=easiest"], r"miner \(HardQuadrupletMiner\): positives must be one of"),
        (["miner.name=hard", "miner.negatives=0"], r"miner \(HardQuadrupletMiner\): negatives must be an int >= 1"),
        (["miner.positives=all"], r"miner must be a mapping with a name and the part's arguments"),
        (["miner.name=semihard", "miner.negatives=2"], r"unknown key miner.negatives for SemiHardQuadrupletMiner"),
        (["miner.name=batch_hard"], r"miner 'batch_hard' does not mine quadruplets: loss pddm takes miner.name"),
        (["loss.name=multi_similarity", "miner.name=hard"], r"miner 'hard' mines quadruplets for loss pddm"),
        (["loss.soft=-0.1"], r"loss \(PDDMLoss\): soft must be finite and >= 0"),
        (["reducer.name=sum"], r"reducer.name 'sum' is not known \(one of mean, nonzero\)"),
        (["miner.name=hard", "miner.negatives=4", "miner.candidates=2"], r"candidates must be >= negatives \(4\)"),
        (["train.val_every=10"], r"train.val_every is set but data.val_shards is not"),
        (["model.pretrained=/no/weights.pt"], r"model.pretrained: no file at"),
        (
            ["loss.metric_grad=true", "loss.metric_grad_after=100"],
            r"loss \(PDDMLoss\): metric_grad_after=100 switches .* metric_grad=False",
        ),
        (["loss.mode=batch"], r"loss.mode is now miner.name \(hard, or batch_hardest"),
        (["loss.positives=all"], r"loss.positives is now miner.positives \(docs/launching.md"),
        (["loss.name=multi_similarity", "loss.alpha=fast"], r"loss.alpha must be int \| float, got 'fast'"),
        (["loss.name=pml.NTXentLoss"], r"loss.name 'pml.NTXentLoss' is not known"),
        (["loss.name=triplet_margin", "loss.swap=true"], r"loss 'triplet_margin': TripletMarginLoss\(swap=True\)"),
        (
            ["loss.name=contrastive", "loss.distance=cosine"],
            r"loss 'contrastive' fails on a test batch \(TypeError: 'str' object is not callable\)",
        ),
        (["memory.size=-5"], r"memory \(CrossBatchMemory\): memory size must be an int >= 0"),
        (["train.deepspeed=/no/ds.json"], r"train.deepspeed: no DeepSpeed config"),
        (["ray.storage_path=/no/such/folder/runs"], r"ray.storage_path: neither /no/such/folder/runs nor its parent"),
        (["steps"], r"override 'steps' must look like section.key=value"),
        (["train.precision=fp16"], r"train.precision must be one of \('fp32', 'bf16'\), got 'fp16'"),
        (["ray.placement_strategy=spread"], r"ray.placement_strategy must be one of \('PACK', .*got 'spread'"),
        (["ray.resources_timeout_s=0"], r"ray.resources_timeout_s must be > 0 seconds, or null to wait for ever"),
    ],
)
def test_bad_config_names_the_key_and_the_fix(config_file, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(config_file(), overrides)


def test_deepspeed_file_disagreeing_with_the_batch_is_named(config_file, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 32, "optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu=32 but the local batch is 64") as e:
        load_config(config_file(), [f"train.deepspeed={ds}"])
    assert "remove the 'optimizer' section" in str(e.value)  # every problem is listed at once


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"gradient_accumulation_steps": 4}, r"gradient_accumulation_steps=4 is not supported: every step mines"),
        ({"zero_optimization": {"stage": 3}}, r"ZeRO stage 3 is not supported: .* use stage 1 or 2"),
        ({"fp16": {"enabled": True}}, r"fp16 is not supported: .* use train.precision: bf16"),
        ({"bf16": {"enabled": True}}, r"bf16.enabled is not used: .* set train.precision: bf16"),
        ({"bfloat16": {"enabled": True}}, r"bf16.enabled is not used"),  # DeepSpeed's older spelling
        ({"float16": {"enabled": True}}, r"fp16 is not supported"),
        ({"zero_optimization": {"stage": 3, "offload_param": {}}}, r"ZeRO stage 3"),
        ({"torch_autocast": {"enabled": True}}, r"torch_autocast is not used"),
        ({"scheduler": {"type": "WarmupLR"}}, r"remove the 'scheduler' section: the learning rate follows optim"),
        ({"communication_data_type": "bf16"}, r"communication_data_type='bf16': gradients are reduced in fp32"),
        ({"data_types": {"grad_accum_dtype": "bf16"}}, r"grad_accum_dtype='bf16': gradients are kept in fp32"),
        ({"train_batch_size": 512}, r"remove train_batch_size"),
    ],
)
def test_unsupported_deepspeed_settings_are_refused_with_the_reason(config_file, tmp_path, settings, message):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", **settings}))
    with pytest.raises(ConfigError, match=message):
        load_config(config_file(), [f"train.deepspeed={ds}"])
    cfg = load_config(config_file(), [f"train.deepspeed={ds}"], check_paths=False)  # built by hand, say
    with pytest.raises(ConfigError, match=message):
        deepspeed_config(cfg, world_size=2)


def test_deepspeed_spellings_it_accepts_are_accepted(config_file, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": True, "communication_data_type": "FP32", "bf16": {}}))
    assert load_config(config_file(), [f"train.deepspeed={ds}"]).train.deepspeed == str(ds)


def test_supported_deepspeed_settings_pass_and_reduce_in_fp32(config_file):
    for name in ("zero0_cpu", "zero1_cpu", "zero2_cpu", "zero1_gpu", "zero2_gpu"):
        cfg = load_config(config_file(), [f"train.deepspeed={REPO}/configs/deepspeed/{name}.json"])
        ds = deepspeed_config(cfg, world_size=2)
        assert ds["communication_data_type"] == "fp32" and ds["gradient_accumulation_steps"] == 1, name


def test_config_is_a_leaf_module():
    import subprocess
    import sys

    code = "import sys, distpddm.config; print(sorted(m for m in sys.modules if m.startswith(('distpddm', 'torch'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # no torch, nothing of train/: only the leaves it reads values and paths with
    assert eval(out) == ["distpddm", "distpddm.coerce", "distpddm.config", "distpddm.errors", "distpddm.paths"]


def test_shipped_configs_parse_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository: the configs' paths are relative to configs/
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path, check_paths=False)
        assert cfg.local_batch == cfg.data.classes_per_batch * cfg.data.images_per_class, path
        assert Path(cfg.train.deepspeed).is_file(), path
        assert Path(cfg.data.train_shards).is_relative_to(REPO / "shards" / "out"), path
        assert cfg.ray.storage_path in (str(REPO / "runs"), "/shared/distpddm-runs"), path


def test_shipped_configs_build_their_loss_and_from_scratch_ones_switch_to_a_baseline_with_one_key():
    """From scratch the configs carry the loss's defaults (the setting chosen on validation classes) and
    ``loss.name=contrastive`` alone is the baseline that led there (docs/results.md)."""
    from pytorch_metric_learning import losses

    from distpddm.criterion import build_loss, check_criterion
    from distpddm.loss import PDDMLoss

    library = PDDMLoss(8)
    scratch = scratch_one_key = 0
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path, check_paths=False)
        assert check_criterion(cfg) == [], path
        if cfg.model.pretrained:
            continue
        scratch += 1
        one_key = yaml.safe_load(path.read_text()).get("miner") is None  # imagenet10k: a chunked miner to drop
        built = build_loss(cfg)
        assert (built.alpha, built.beta, built.lam, built.metric_grad) == (
            library.alpha, library.beta, library.lam, library.metric_grad), path  # fmt: skip
        assert (built.miner.positives, built.miner.negatives) == ("all", 1), path
        scratch_one_key += one_key
        switch = ["loss.name=contrastive"] if one_key else ["loss.name=contrastive", "miner=null"]
        switched = load_config(path, switch, check_paths=False)
        assert check_criterion(switched) == [], path
        contrastive = build_loss(switched)
        assert isinstance(contrastive.loss, losses.ContrastiveLoss) and contrastive.miner is None, path
    assert scratch >= 4 and scratch_one_key >= 3  # fonts, smoke, rehearsal; imagenet10k


def _project(root: Path, shards: Path) -> Path:
    """root/configs/run.yaml with relative paths, beside root/shards/train and root/configs/ds/zero.json."""
    (root / "shards").mkdir(parents=True)
    (root / "shards" / "train").symlink_to(shards, target_is_directory=True)
    (root / "configs" / "ds").mkdir(parents=True)
    (root / "configs" / "ds" / "zero.json").write_text((REPO / "configs/deepspeed/zero1_cpu.json").read_text())
    tree = {
        "data": {"train_shards": "../shards/train", "val_shards": "../shards/train"},
        "train": {"deepspeed": "ds/zero.json"},
        "ray": {"storage_path": "../runs"},
    }
    (root / "configs" / "run.yaml").write_text(yaml.safe_dump(tree))
    return root / "configs" / "run.yaml"


def test_paths_in_a_config_file_are_relative_to_its_folder_from_any_cwd(tmp_path, shards, monkeypatch):
    config = _project(tmp_path / "proj", shards)
    seen = []
    for cwd in (tmp_path, tmp_path / "proj" / "configs", tmp_path / "proj" / "shards"):
        monkeypatch.chdir(cwd)
        seen.append(load_config(config))
        seen.append(load_config(os.path.relpath(config, cwd)))  # the file named relative to the cwd
    first = seen[0]
    assert all(cfg == first for cfg in seen)  # the same absolute paths whatever the current directory
    proj = (tmp_path / "proj").resolve()
    assert first.data.train_shards == first.data.val_shards == str(shards.resolve())  # symlink resolved
    assert first.train.deepspeed == str(proj / "configs" / "ds" / "zero.json")
    assert first.ray.storage_path == str(proj / "runs")


def test_paths_given_as_overrides_are_relative_to_the_current_directory(tmp_path, shards, monkeypatch):
    config = _project(tmp_path / "proj", shards)
    work = tmp_path / "work"
    (work / "mine").mkdir(parents=True)
    (work / "mine" / "ds.json").write_text("{}")
    monkeypatch.chdir(work)
    cfg = load_config(config, ["train.deepspeed=mine/ds.json", "ray.storage_path=out", "data.val_shards=null"])
    assert cfg.train.deepspeed == str(work.resolve() / "mine" / "ds.json")
    assert cfg.ray.storage_path == str(work.resolve() / "out")
    with pytest.raises(ConfigError, match=r"data.train_shards: no shards at '.*/work/shards/train'"):
        load_config(config, ["data.train_shards=shards/train"])  # the file's folder does not apply to overrides
    # URLs and pipe: specs stay as written, in the file and on the command line.
    remote = load_config(
        config, ["ray.storage_path=s3://bucket/runs", "data.train_shards=pipe:cat x.tar"], check_paths=False
    )
    assert (remote.ray.storage_path, remote.data.train_shards) == ("s3://bucket/runs", "pipe:cat x.tar")


def test_the_default_deepspeed_config_is_found_from_any_folder(tmp_path, shards, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"data": {"train_shards": str(shards)}}))
    cfg = load_config(tmp_path / "run.yaml")  # no train.deepspeed: the package's own file
    assert Path(cfg.train.deepspeed) == Path(distpddm.config.__file__).with_name("deepspeed_zero1_cpu.json")
    same = json.loads((REPO / "configs/deepspeed/zero1_cpu.json").read_text())
    assert json.loads(Path(cfg.train.deepspeed).read_text()) == same  # the package's copy of zero1_cpu.json


def test_a_missing_storage_folder_is_fine_when_its_parent_exists(config_file, tmp_path):
    assert load_config(config_file(), [f"ray.storage_path={tmp_path}/new"]).ray.storage_path == f"{tmp_path}/new"
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match=r"ray.storage_path: .*afile is a file, not a folder"):
        load_config(config_file(), [f"ray.storage_path={tmp_path}/afile"])


def test_the_criterion_is_built_from_its_parts_as_the_config_names_them(config_file):
    from pytorch_metric_learning import losses, miners

    from distpddm.criterion import build_loss
    from distpddm.loss import PDDMLoss
    from distpddm.miners import BatchHardestQuadrupletMiner, HardQuadrupletMiner
    from distpddm.pml import PMLLoss
    from distpddm.reducers import AvgNonZeroReducer, MeanReducer
    from distpddm.wrappers import CrossBatchMemory

    default = build_loss(load_config(config_file()))
    assert isinstance(default, PDDMLoss) and isinstance(default.miner, HardQuadrupletMiner)
    assert (default.miner.positives, default.alpha, default.beta, default.metric_grad) == ("all", 0.25, 0.5, False)
    assert default.dim == 128
    assert isinstance(default.reducer, MeanReducer)
    parts = [
        "loss.alpha=0.1", "loss.metric_grad=false", "miner.name=batch_hardest", "miner.chunk=512",
        "reducer.name=nonzero", "memory.size=64", "memory.warmup=5", "model.embed_dim=32",
    ]  # fmt: skip
    cfg = load_config(config_file(), parts)
    built = build_loss(cfg)
    assert isinstance(built, CrossBatchMemory) and (built.size, built.warmup) == (64, 5)
    pddm = built.loss
    assert (pddm.alpha, pddm.metric_grad, pddm.dim) == (0.1, False, 32)
    assert isinstance(pddm.miner, BatchHardestQuadrupletMiner) and pddm.miner.chunk == 512
    assert isinstance(pddm.reducer, AvgNonZeroReducer)
    ms = build_loss(
        load_config(config_file(), ["loss.name=multi_similarity", "loss.alpha=3", "miner.name=multi_similarity"])
    )
    assert isinstance(ms, PMLLoss) and isinstance(ms.loss, losses.MultiSimilarityLoss) and ms.loss.alpha == 3
    assert isinstance(ms.miner, miners.MultiSimilarityMiner) and isinstance(ms.reducer, MeanReducer)
    ntx = build_loss(load_config(config_file(), ["loss.name=ntxent", "loss.temperature=1e-1"]))
    assert isinstance(ntx.loss, losses.NTXentLoss) and ntx.miner is None
    assert ntx.loss.temperature == 0.1  # YAML 1.1 reads 1e-1 as a string: the argument's default type converts it
    ms_miner = build_loss(load_config(config_file(), ["loss.name=multi_similarity", "miner.name=multi_similarity",
                                                      "miner.epsilon=2e-1"]))  # fmt: skip
    assert ms_miner.miner.epsilon == 0.2
    # the saved config names the parts as it was given them, and loads back to the same config
    tree = cfg.to_dict()
    assert tree["miner"] == {"name": "batch_hardest", "chunk": 512} and tree["memory"] == {"size": 64, "warmup": 5}
    assert from_dict(tree) == cfg


def test_workers_take_the_deepspeed_settings_the_driver_read(config_file):
    """On Ray the driver ships the DeepSpeed file's contents: a worker on another node need not see its path
    (a Ray job's working folder differs per node)."""
    import dataclasses

    cfg = load_config(config_file())
    base = {"zero_optimization": {"stage": 1}, "gradient_clipping": 2.0}
    moved = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, deepspeed="/nowhere/zero1.json"))
    ds = deepspeed_config(moved, 2, base)
    assert ds["zero_optimization"] == {"stage": 1} and ds["gradient_clipping"] == 2.0
    assert ds["train_batch_size"] == 2 * cfg.local_batch
    assert "train_batch_size" not in base  # the shipped dict is not changed in place
    with pytest.raises(FileNotFoundError):
        deepspeed_config(moved, 2)
    with pytest.raises(ConfigError, match="ZeRO-3|stage 3"):
        deepspeed_config(moved, 2, {"zero_optimization": {"stage": 3}})


def test_pretrained_takes_true_a_weights_name_or_a_file(config_file, tmp_path):
    """true and torchvision weights names are kept as given (not made into paths, not checked on disk);
    anything else is a file that must exist. (A backbone that has such weights: small_cnn has none.)"""
    assert load_config(config_file(), ["model.backbone=resnet50", "model.pretrained=true"]).model.pretrained is True
    for name in ("IMAGENET1K_V1", "ResNet50_Weights.DEFAULT"):
        assert (
            load_config(config_file(), ["model.backbone=resnet50", f"model.pretrained={name}"]).model.pretrained == name
        )
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    assert load_config(
        config_file(), ["model.backbone=resnet50", f"model.pretrained={weights}"]
    ).model.pretrained == str(weights)
    with pytest.raises(ConfigError, match="model.pretrained: no file at .*weights.pth"):
        load_config(config_file(), ["model.backbone=resnet50", "model.pretrained=weights.pth"])
    # Written in a config file, a weights name is not a path relative to the file's folder either.
    assert (
        load_config(config_file(model={"backbone": "resnet50", "pretrained": "IMAGENET1K_V1"})).model.pretrained
        == "IMAGENET1K_V1"
    )
    (tmp_path / "mine.pth").write_bytes(b"")
    assert load_config(config_file(model={"backbone": "resnet50", "pretrained": "mine.pth"})).model.pretrained == str(
        tmp_path / "mine.pth"
    )


def test_a_null_part_section_takes_overrides(config_file):
    """A saved config.yaml writes ``miner: null``; an override of one of its keys must still work."""
    path = config_file()
    path.write_text(path.read_text() + "miner: null\nreducer: null\n")
    cfg = load_config(path, ["miner.name=hard", "miner.positives=all", "reducer.name=nonzero"])
    assert (cfg.miner.name, cfg.miner.args, cfg.reducer.name) == ("hard", {"positives": "all"}, "nonzero")


def test_a_split_whose_build_was_interrupted_is_refused_as_such(config_file, shards):
    (shards / "index.incomplete").write_text("")  # distpddm shards build leaves it while it rebuilds the split
    with pytest.raises(ConfigError, match=r"holds an interrupted `distpddm shards build`: rerun it"):
        load_config(config_file())

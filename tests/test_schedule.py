"""Parameter groups (no weight decay on biases and norms) and the learning-rate schedule across resumes."""

import dataclasses

import pytest
import torch

from distpddm.config import ModelConfig, OptimConfig, RunConfig, TrainConfig
from distpddm.loss import PDDMLoss
from distpddm.model import create_model
from distpddm.train.schedule import Schedule, apply_config, param_groups, set_learning_rates


def _cfg(steps=110, warmup=10, floor=0.1, lr=1e-3, **optim):
    return RunConfig(
        optim=OptimConfig(lr=lr, warmup_steps=warmup, min_lr_ratio=floor, **optim), train=TrainConfig(steps=steps)
    )


def test_schedule_warms_up_then_decays_to_the_floor():
    f = Schedule.from_config(_cfg())
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 110))


def test_an_unchanged_resume_keeps_the_saved_schedule_exactly():
    saved = Schedule.from_config(_cfg())
    for step in (0, 5, 60, 110):
        assert saved.resumed(_cfg(), step) is saved
    assert saved.resumed(_cfg(lr=5e-3), 60) is saved  # base rates are not part of the multiplier


@pytest.mark.parametrize("new_steps", [200, 80, 61])
def test_changed_steps_recompute_from_the_resumed_step_without_a_jump(new_steps):
    saved = Schedule.from_config(_cfg(steps=110))
    resumed = saved.resumed(_cfg(steps=new_steps), 60)
    assert resumed(60) == pytest.approx(saved(60))  # continuous at the resumed step
    assert resumed(new_steps) == pytest.approx(0.1) and resumed(new_steps + 50) == pytest.approx(0.1)
    values = [resumed(s) for s in range(60, new_steps + 1)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))  # decays monotonically
    again = resumed.resumed(_cfg(steps=new_steps + 100), new_steps - 1)  # a second change chains on
    assert again(new_steps - 1) == pytest.approx(resumed(new_steps - 1))
    assert Schedule.from_dict(resumed.to_dict()) == resumed


def test_a_raised_floor_or_a_resume_during_warm_up():
    saved = Schedule.from_config(_cfg(steps=110))
    higher = saved.resumed(_cfg(steps=110, floor=0.5), 100)
    assert higher(100) == pytest.approx(saved(100)) and higher(110) == pytest.approx(0.5)
    warm = saved.resumed(_cfg(steps=300), 4)  # still warming up: a ramp to 1 at the warm-up's end, the cosine
    assert [warm(s) for s in (4, 10)] == pytest.approx([saved(4), 1.0])
    assert all(warm(s) < warm(s + 1) for s in range(4, 10)) and warm(300) == pytest.approx(0.1)


@pytest.mark.parametrize(("saved_warmup", "step", "new_warmup"), [(10, 50, 100), (100, 50, 200), (100, 10, 20)])
def test_a_changed_warm_up_continues_without_a_jump(saved_warmup, step, new_warmup):
    saved = Schedule.from_config(_cfg(steps=1000, warmup=saved_warmup))
    resumed = saved.resumed(_cfg(steps=1000, warmup=new_warmup), step)
    assert resumed(step) == pytest.approx(saved(step))  # continuous
    assert resumed(new_warmup) == pytest.approx(1.0) and resumed(1000) == pytest.approx(0.1)
    values = [resumed(s) for s in range(step, new_warmup + 1)]
    assert all(b - a <= 1.0 / (new_warmup - step) + 1e-12 for a, b in zip(values, values[1:], strict=False))


def _names(groups, kind):
    return {id(p) for g in groups if g["name"].endswith("/" + kind) for p in g["params"]}


@pytest.mark.parametrize("backbone", ["small_cnn", "resnet18", "vit_b_16"])
def test_biases_and_norm_parameters_get_no_weight_decay(backbone):
    cfg = dataclasses.replace(
        _cfg(weight_decay=0.05), model=ModelConfig(backbone=backbone, embed_dim=16, pooling="avg")
    )
    net = create_model(cfg.model)
    crit = PDDMLoss(16)
    groups = param_groups(cfg, net, crit)
    named = {
        **{f"net.{n}": p for n, p in net.named_parameters()},
        **{f"crit.{n}": p for n, p in crit.named_parameters()},
    }
    decay, no_decay = _names(groups, "decay"), _names(groups, "no_decay")
    assert not decay & no_decay and decay | no_decay == {id(p) for p in named.values()}  # each once, all there
    norms = (torch.nn.BatchNorm2d, torch.nn.LayerNorm, torch.nn.GroupNorm)
    for module in [*net.modules(), *crit.modules()]:
        for name, p in module.named_parameters(recurse=False):
            if name == "bias" or isinstance(module, norms):
                assert id(p) in no_decay, (type(module).__name__, name)
            elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and name == "weight":
                assert id(p) in decay, (type(module).__name__, name)
    if backbone == "vit_b_16":  # offsets, not projections
        assert id(net.backbone.class_token) in no_decay and id(net.backbone.encoder.pos_embedding) in no_decay
    for g in groups:
        assert g["weight_decay"] == (0.05 if g["name"].endswith("/decay") else 0.0)
        assert g["base_lr"] == (1e-3 if g["name"].startswith("backbone/") else 1e-2)  # head_lr: 10 x lr


def test_config_hyperparameters_replace_a_checkpoints_and_set_the_rates():
    cfg = _cfg(weight_decay=0.05)
    net, crit = create_model(ModelConfig(embed_dim=8)), PDDMLoss(8)
    groups = param_groups(cfg, net, crit)
    opt = torch.optim.AdamW(groups, lr=1e-3)
    saved = opt.state_dict()
    new = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=4e-3, weight_decay=0.2, betas=(0.8, 0.9)))
    opt.load_state_dict(saved)  # the checkpoint brings the old hyperparameters back
    apply_config(opt, param_groups(new, net, crit), new)
    set_learning_rates(opt, 0.5)
    by = {g["name"]: g for g in opt.param_groups}
    assert by["backbone/decay"]["lr"] == pytest.approx(2e-3) and by["heads/decay"]["lr"] == pytest.approx(2e-2)
    assert by["backbone/decay"]["weight_decay"] == 0.2 and by["backbone/no_decay"]["weight_decay"] == 0.0
    assert all(g["betas"] == (0.8, 0.9) for g in opt.param_groups)

"""Trainer pieces that need no model: config merging/validation, LR schedules, the data stream."""

import math

import pytest
import torch

from greg import config
from greg.config import ConfigError, deep_merge, parse_set
from greg.optim.registry import lr_multiplier, make_optimizer
from greg.stream import StreamSampler


def test_parse_set_nested_and_yaml_values():
    assert parse_set(["a.b=1", "a.c=[1, 2]", "d=null", "e=cosine", "f=1e-4"]) == {
        "a": {"b": 1, "c": [1, 2]},
        "d": None,
        "e": "cosine",
        "f": 1e-4,
    }
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set(["novalue"])


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"'optim\.lrr'.*known here: .*lr"):
        deep_merge(config.DEFAULTS, {"optim": {"lrr": 0.1}})
    with pytest.raises(ConfigError, match=r"'sed'"):
        deep_merge(config.DEFAULTS, {"sed": 1})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"'optim\.lr' must be a number > 0, got str \('fast'\)"):
        deep_merge(config.DEFAULTS, {"optim": {"lr": "fast"}})
    with pytest.raises(ConfigError, match=r"'train\.epochs' must be an integer >= 0, got bool"):
        deep_merge(config.DEFAULTS, {"train": {"epochs": True}})
    with pytest.raises(ConfigError, match=r"'data' must be a mapping"):
        deep_merge(config.DEFAULTS, {"data": 3})
    # ints are fine where floats are expected; free-form kwargs mappings accept any key
    cfg = deep_merge(config.DEFAULTS, {"optim": {"lr": 1}, "model": {"kwargs": {"stem": "imagenet"}}})
    assert cfg["optim"]["lr"] == 1 and cfg["model"]["kwargs"] == {"stem": "imagenet"}
    assert config.DEFAULTS["model"]["kwargs"] == {}  # defaults are not mutated


def test_load_config_files_then_sets(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("seed: 3\noptim: {lr: 0.5}\n")
    b = tmp_path / "b.yaml"
    b.write_text("optim: {lr: 0.25, name: adam}\n")
    cfg = config.load_config([a, b], ["seed=7"])
    assert (cfg["seed"], cfg["optim"]["lr"], cfg["optim"]["name"]) == (7, 0.25, "adam")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {momentun: 0.9}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key 'optim\.momentun'"):
        config.load_config([bad])
    with pytest.raises(ConfigError, match="not found"):
        config.load_config([tmp_path / "missing.yaml"])


def test_cosine_multiplier_matches_energy_code():
    # Energy-OOD: lr_min + (lr_max - lr_min) * 0.5 * (1 + cos(step / total * pi)), lr_max = 1.
    s = {"name": "cosine", "lr_min_ratio": 0.001}
    assert lr_multiplier(0, 100, 10, s) == pytest.approx(1.0)
    assert lr_multiplier(50, 100, 10, s) == pytest.approx(0.001 + 0.999 * 0.5)
    assert lr_multiplier(25, 100, 10, s) == pytest.approx(0.001 + 0.999 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_multiplier(100, 100, 10, s) == pytest.approx(0.001)


def test_multistep_multiplier_by_epoch():
    # GReg+: 50 epochs at 0.1 then 10 at 0.01 -> milestones [50], gamma 0.1
    s = {"name": "multistep", "milestones": [50], "gamma": 0.1}
    assert lr_multiplier(499, 600, 10, s) == 1.0  # epoch 49
    assert lr_multiplier(500, 600, 10, s) == pytest.approx(0.1)  # epoch 50
    s2 = {"name": "multistep", "milestones": [2, 4], "gamma": 0.5}
    assert [lr_multiplier(e * 3, 18, 3, s2) for e in range(6)] == [1, 1, 0.5, 0.5, 0.25, 0.25]


def test_each_key_is_declared_once_and_its_default_passes_its_own_check():
    flat = config.flatten(config.DEFAULTS)
    assert set(flat) == set(config.KEYS)
    assert all(flat[k] == config.KEYS[k].default for k in flat)
    config.validate(config.DEFAULTS)
    # a method's name is its registry key (set by the registry, not repeated in the class)
    from greg import methods

    assert all(methods.METHODS.get(n).name == n for n in methods.METHODS.names())


def test_optimizer_names_come_from_the_registry():
    # A name the trainer cannot build is refused at load (it used to fall through to Adam).
    with pytest.raises(ConfigError, match=r"'optim\.name' must be one of adam, sgd, got 'rmsprop'"):
        config.load_config([], ["optim.name=rmsprop"])
    with pytest.raises(ConfigError, match=r"'schedule\.name' must be one of constant, cosine, multistep"):
        config.load_config([], ["schedule.name=linear"])
    w = [torch.nn.Parameter(torch.zeros(2))]
    opt = make_optimizer(w, {**config.DEFAULTS["optim"], "name": "adam", "lr": 0.5, "betas": [0.5, 0.25]})
    assert type(opt) is torch.optim.Adam and opt.defaults["betas"] == (0.5, 0.25)
    opt = make_optimizer(w, {**config.DEFAULTS["optim"], "momentum": 0.0})
    assert type(opt) is torch.optim.SGD and opt.defaults["nesterov"] is False  # nesterov needs momentum
    with pytest.raises(KeyError, match="unknown optimizer 'rmsprop'"):
        make_optimizer(w, {"name": "rmsprop"})


def _take(sampler, n):
    out = []
    for item in sampler:
        out.append(item)
        if len(out) == n:
            break
    return out


def test_stream_is_a_function_of_position():
    full = list(StreamSampler(10, 8, seed=1, stream=1, start=0, stop=24))
    assert len(full) == 24
    # each pass of 8 is a prefix of a permutation of 10: no repeats inside a pass
    for p in range(3):
        idx = [i for _, i in full[8 * p : 8 * p + 8]]
        assert len(set(idx)) == 8
    # passes differ, and resuming at any position gives the same tail
    assert [i for _, i in full[:8]] != [i for _, i in full[8:16]]
    for start in (0, 5, 8, 13):
        assert list(StreamSampler(10, 8, 1, 1, start, 24)) == full[start:]
    # a different stream or seed gives a different order
    assert list(StreamSampler(10, 8, 1, 2, 0, 24)) != full
    assert list(StreamSampler(10, 8, 2, 1, 0, 24)) != full


def test_stream_longer_than_data_cycles_through_all():
    # a pass of 12 over 5 items concatenates permutations: every item appears at least twice
    items = [i for _, i in StreamSampler(5, 12, 0, 2, 0, 12)]
    assert sorted(set(items)) == [0, 1, 2, 3, 4]
    assert all(items.count(i) >= 2 for i in range(5))
    assert len(_take(StreamSampler(5, 12, 0, 2, 0, None), 30)) == 30


def test_free_form_mappings_merge_key_by_key():
    base = deep_merge(config.DEFAULTS, {"method": {"name": "greg_plus", "hparams": {"n_clusters": 8}}})
    cfg = deep_merge(base, parse_set(["method.hparams.lambda_grad=0", "model.kwargs.stem=imagenet"]))
    assert cfg["method"]["hparams"] == {"n_clusters": 8, "lambda_grad": 0}
    assert cfg["model"]["kwargs"] == {"stem": "imagenet"}
    # ... and their owner rejects a typo, naming it
    cfg = deep_merge(base, parse_set(["method.hparams.n_clusterz=4"]))
    with pytest.raises(ConfigError, match="n_clusterz"):
        config.validate(cfg)


def test_stream_pool_per_pass_is_a_seeded_subset():
    # n=20 items, a pool of 6 per pass, passes of 4: each pass walks 4 distinct items of its own 6-subset,
    # which is the first 6 of the pass's permutation (the pool=None stream's first pass starts with it).
    s = StreamSampler(20, 4, seed=3, stream=2, start=0, stop=12, pool=6)
    full = [i for _, i in s]
    plain = [i for _, i in StreamSampler(20, 20, 3, 2, 0, 20)]
    assert full[:4] == plain[:4]
    assert set(full[:4]) <= set(plain[:6])
    passes = [full[4 * p : 4 * p + 4] for p in range(3)]
    assert all(len(set(p)) == 4 for p in passes)
    assert [s._order(r)[:4].tolist() for r in range(3)] == passes
    assert all(len(set(s._order(r).tolist())) == 6 for r in range(3))
    assert len({tuple(sorted(s._order(r).tolist())) for r in range(3)}) == 3  # a fresh pool each pass
    # the same seed gives the same pools; another seed other ones; resuming mid-pass gives the same tail
    assert [i for _, i in StreamSampler(20, 4, 3, 2, 0, 12, pool=6)] == full
    assert [i for _, i in StreamSampler(20, 4, 4, 2, 0, 12, pool=6)] != full
    for start in (1, 4, 7):
        assert [i for _, i in StreamSampler(20, 4, 3, 2, start, 12, pool=6)] == full[start:]


def test_stream_pass_longer_than_pool_reuses_only_the_pool():
    s = StreamSampler(50, 10, seed=0, stream=2, start=0, stop=10, pool=4)
    items = [i for _, i in s]
    pool = set(s._order(0)[:4].tolist())
    assert len(pool) == 4 and set(items) == pool
    assert sorted(items[:8]) == sorted(list(pool) * 2)  # each repetition is a permutation of the pool
    # pool >= n is the plain stream; pool outside [1, n] is refused
    assert list(StreamSampler(5, 12, 0, 2, 0, 12, pool=5)) == list(StreamSampler(5, 12, 0, 2, 0, 12))
    for bad in (0, 6):
        with pytest.raises(ValueError, match="pool"):
            StreamSampler(5, 4, 0, 2, 0, 4, pool=bad)


def test_aux_pool_and_ratio_candidates():
    from greg.stream import aux_pool_size, ratio_candidates

    assert aux_pool_size(1_000, None) == 1_000
    assert aux_pool_size(1_000, 700) == 700
    assert aux_pool_size(1_000, 5_000) == 1_000  # capped at the set, as released
    assert ratio_candidates(300_000, 50_000, 64) == 384  # CIFAR: 6 * 64
    # ImageNet-10 (13000 ID images, batch 32): 600000 / 13000 * 32 = 1476.92 -> 1476 (floor, as released)
    assert ratio_candidates(600_000, 13_000, 32) == 1476
    assert ratio_candidates(10, 50_000, 64) == 1


def test_aux_pool_per_epoch_validated():
    base = config.deep_merge(config.DEFAULTS, {"data": {"aux_pool_per_epoch": 600000}})
    config.check(base)
    for bad in (0, -5, "all", 1.5):
        with pytest.raises(ConfigError, match="aux_pool_per_epoch"):
            config.deep_merge(config.DEFAULTS, {"data": {"aux_pool_per_epoch": bad}})

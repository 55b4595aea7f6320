"""LoraConfig and LoraPlan: PEFT's matching semantics, patterns, scaling and errors."""

import math

import pytest

import qlora_jax as qj
from qlora_jax.lora import ModuleSite, resolve

NAMES = [f"model.layers.{i}.{m}" for i in range(2)
         for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj")]


def sites():
    mods = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj")
    out = [ModuleSite(("model", "layers") + tuple(m.split(".")),
                      tuple(f"model.layers.{i}.{m}" for i in range(2))) for m in mods]
    out.append(ModuleSite(("lm_head",), ("lm_head",), "head"))
    out.append(ModuleSite(("model", "norm"), ("model.norm",), "other"))
    return out


def test_list_targets_match_by_suffix():
    cfg = qj.LoraConfig(target_modules=["q_proj", "mlp.up_proj"])
    assert cfg.matches("model.layers.0.self_attn.q_proj")
    assert cfg.matches("model.layers.1.mlp.up_proj")
    assert not cfg.matches("model.layers.0.self_attn.k_proj")
    assert not cfg.matches("model.layers.0.self_attn.xq_proj")  # suffix means a whole name part


def test_string_target_is_full_regex():
    cfg = qj.LoraConfig(target_modules=r".*\.(q|v)_proj")
    assert cfg.matches("model.layers.0.self_attn.q_proj")
    assert not cfg.matches("model.layers.0.self_attn.q_proj.extra")
    assert not qj.LoraConfig(target_modules="q_proj").matches("model.layers.0.self_attn.q_proj")


def test_all_linear_excludes_head():
    plan = resolve(qj.LoraConfig(target_modules="all-linear"), sites())
    paths = {"/".join(p) for p in plan.adapted_paths}
    assert paths == {"model/layers/self_attn/q_proj", "model/layers/self_attn/k_proj",
                     "model/layers/self_attn/v_proj", "model/layers/mlp/up_proj"}


def test_default_targets_follow_family():
    plan = resolve(qj.LoraConfig(), sites(), default_targets=("q_proj", "v_proj"))
    assert {p[-1] for p in plan.adapted_paths} == {"q_proj", "v_proj"}


@pytest.mark.parametrize("rslora", [False, True])
def test_scaling_and_patterns(rslora):
    cfg = qj.LoraConfig(r=8, alpha=16, use_rslora=rslora, target_modules="all-linear",
                        rank_pattern={"up_proj": 4}, alpha_pattern={r"self_attn\.k_proj": 2})
    up = cfg.spec("model.layers.0.mlp.up_proj")
    k = cfg.spec("model.layers.0.self_attn.k_proj")
    q = cfg.spec("model.layers.0.self_attn.q_proj")
    assert (up.r, up.alpha) == (4, 16) and (k.r, k.alpha) == (8, 2) and (q.r, q.alpha) == (8, 16)
    norm = math.sqrt if rslora else (lambda r: r)
    assert up.scaling == pytest.approx(16 / norm(4))
    assert k.scaling == pytest.approx(2 / norm(8))


def test_unmatched_targets_are_named():
    with pytest.raises(ValueError, match=r"\['qkv_proj'\] match no linear module"):
        resolve(qj.LoraConfig(target_modules=["q_proj", "qkv_proj"]), sites())
    with pytest.raises(ValueError, match="regex"):
        resolve(qj.LoraConfig(target_modules=r"nothing\..*"), sites())
    with pytest.raises(ValueError, match="modules_to_save entry 'classifier'"):
        resolve(qj.LoraConfig(modules_to_save=("classifier",)), sites())


def test_per_layer_selection_is_refused_clearly():
    with pytest.raises(ValueError, match="every layer must get the same adapter"):
        resolve(qj.LoraConfig(target_modules=r"model\.layers\.0\.self_attn\.q_proj"), sites())
    with pytest.raises(ValueError, match="rank_pattern"):
        resolve(qj.LoraConfig(target_modules=["q_proj"], rank_pattern={r"layers\.1\.self_attn\.q_proj": 2}),
                sites())


def test_modules_to_save_resolves_to_paths():
    plan = resolve(qj.LoraConfig(target_modules=["q_proj"], modules_to_save=("lm_head", "norm")),
                   sites())
    assert plan.saves(("lm_head",)) and plan.saves(("model", "norm"))
    assert not plan.saves(("model", "layers", "self_attn", "q_proj"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "positive integer"),
    (dict(dropout=1.5), "dropout"),
    (dict(init="pissa_svd"), "not supported"),
    (dict(rank_pattern={"q_proj": 0}), "rank_pattern"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        qj.LoraConfig(**kwargs)


def test_peft_bool_init_values():
    assert qj.LoraConfig(init=True).init == "default"
    assert qj.LoraConfig(init=False).init == "random"


def test_config_is_hashable_and_frozen():
    cfg = qj.LoraConfig(rank_pattern={"q_proj": 4})
    hash(cfg)
    with pytest.raises(TypeError):
        cfg.rank_pattern["k_proj"] = 2

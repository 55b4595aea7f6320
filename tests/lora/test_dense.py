"""LoraDense against PEFT's LoRA layer (float and bitsandbytes 4-bit bases), structure and init."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import qlora_jax as qj
from qlora_jax.lora import tree as lora_tree
from qlora_jax.lora import LoraDense, ModuleSite, resolve
from tests.lora.toy import ToyModel


class Wrap(nn.Module):
    features: int
    plan: object = None
    use_bias: bool = True

    @nn.compact
    def __call__(self, x, deterministic=True):
        spec = None if self.plan is None else self.plan.spec_at(("lin",))
        return LoraDense(self.features, use_bias=self.use_bias, lora=spec, name="lin",
                         impl="xla")(x, deterministic)


def plan_for(cfg):
    return resolve(cfg, [ModuleSite(("lin",), ("lin",))], default_targets=("lin",))


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def peft_linear(w, b, cfg_kwargs):
    peft = pytest.importorskip("peft")

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(w.shape[1], w.shape[0])
            self.lin.weight.data = torch.from_numpy(w)
            self.lin.bias.data = torch.from_numpy(b)

        def forward(self, x):
            return self.lin(x)

    return peft.get_peft_model(M(), peft.LoraConfig(target_modules=["lin"], **cfg_kwargs))


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_equals_peft(rslora, rng):
    d_in, d_out, r, alpha = 48, 40, 4, 12
    w = rng.standard_normal((d_out, d_in)).astype(np.float32) / math.sqrt(d_in)
    b = rng.standard_normal(d_out).astype(np.float32)
    pm = peft_linear(w, b, dict(r=r, lora_alpha=alpha, use_rslora=rslora, init_lora_weights=False))
    lin = pm.base_model.model.lin
    a_t = lin.lora_A["default"].weight.detach().numpy()  # [r, in]
    b_t = lin.lora_B["default"].weight.detach().numpy()  # [out, r]
    assert np.abs(b_t).max() > 0
    x = rng.standard_normal((3, 5, d_in)).astype(np.float32)
    ref = pm(torch.from_numpy(x)).detach().numpy()

    cfg = qj.LoraConfig(r=r, alpha=alpha, use_rslora=rslora, target_modules=["lin"])
    params = {"lin": {"kernel": jnp.asarray(w.T), "bias": jnp.asarray(b),
                      "lora_a": jnp.asarray(a_t.T), "lora_b": jnp.asarray(b_t.T)}}
    out = Wrap(d_out, plan_for(cfg)).apply({"params": params}, jnp.asarray(x))
    assert rel(out, ref) < 1e-6, rel(out, ref)


def test_4bit_base_equals_peft_on_bnb_linear4bit(rng):
    bnb = pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    d_in, d_out, r = 128, 64, 8
    w = rng.standard_normal((d_out, d_in)).astype(np.float32) * 0.05

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = bnb.nn.Linear4bit(d_in, d_out, bias=False, compute_dtype=torch.float32,
                                         compress_statistics=True, quant_type="nf4")
            self.lin.weight = bnb.nn.Params4bit(torch.from_numpy(w), requires_grad=False,
                                                compress_statistics=True, quant_type="nf4")
            self.lin = self.lin.to("cpu")

        def forward(self, x):
            return self.lin(x)

    pm = peft.get_peft_model(M(), peft.LoraConfig(target_modules=["lin"], r=r, lora_alpha=16,
                                                  init_lora_weights=False))
    pm.train()  # keep bitsandbytes' CPU weight layout (see formats.md harness traps)
    lin = pm.base_model.model.lin
    q_bnb = lin.base_layer.weight
    sd = {"weight": q_bnb.data}
    sd.update({"weight." + k: v for k, v in q_bnb.quant_state.as_dict(packed=True).items()})
    q = qj.quant.from_bnb_state_dict(sd)
    ours = qj.quant.quantize(jnp.asarray(w), "nf4", 64, double_quant=True)
    np.testing.assert_array_equal(np.asarray(ours.packed), np.asarray(q.packed))

    a_t = lin.lora_A["default"].weight.detach().numpy()
    b_t = lin.lora_B["default"].weight.detach().numpy()
    x = rng.standard_normal((4, d_in)).astype(np.float32)
    with torch.no_grad():
        ref = pm(torch.from_numpy(x)).numpy()
    cfg = qj.LoraConfig(r=r, alpha=16, target_modules=["lin"])
    params = {"lin": {"kernel": q, "lora_a": jnp.asarray(a_t.T), "lora_b": jnp.asarray(b_t.T)}}
    out = Wrap(d_out, plan_for(cfg), use_bias=False).apply({"params": params}, jnp.asarray(x))
    assert rel(out, ref) < 1e-5, rel(out, ref)


def test_exact_param_tree():
    x = jnp.ones((2, 64))
    model = ToyModel(lora=qj.LoraConfig(r=4, target_modules=["q_proj"]),
                     quant=qj.QuantConfig())
    params = model.init(jax.random.key(0), x)["params"]
    shapes = {"/".join(p): ("QTensor" if isinstance(v, qj.quant.QTensor) else "Array", tuple(v.shape))
              for p, v in lora_tree.flatten(params).items()}
    assert shapes == {
        "layers/q_proj/kernel": ("QTensor", (3, 64, 64)),
        "layers/q_proj/lora_a": ("Array", (3, 64, 4)),
        "layers/q_proj/lora_b": ("Array", (3, 4, 64)),
        "layers/v_proj/kernel": ("QTensor", (3, 64, 64)),
        "layers/v_proj/bias": ("Array", (3, 64)),
        "lm_head/kernel": ("Array", (64, 5)),
    }
    q = params["layers"]["q_proj"]["kernel"]
    assert q.qtype == "nf4" and q.block_size == 64 and q.double_quant
    assert q.packed.shape == (3, 64 * 64 // 2) and q.packed.dtype == jnp.uint8


@pytest.mark.parametrize("quant", [None, qj.QuantConfig()])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_zero_adapter_is_bit_identical(quant, dtype, rng):
    x = jax.random.normal(jax.random.key(int(rng.integers(1 << 30))), (4, 64), dtype)
    base = ToyModel(quant=quant)
    p_base = base.init(jax.random.key(1), x)["params"]
    lora = base.clone(lora=qj.LoraConfig(r=8, target_modules="all-linear"))
    p_lora = lora.init(jax.random.key(2), x)["params"]
    # The same frozen weights, freshly initialised (zero-B) adapters.
    p = qj.lora.combine(qj.lora.adapters(p_lora), p_base)
    assert float(jnp.abs(p["layers"]["q_proj"]["lora_a"]).max()) > 0
    y0 = np.asarray(base.apply({"params": p_base}, x))
    y1 = np.asarray(lora.apply({"params": p}, x))
    assert y0.tobytes() == y1.tobytes()


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_adapter_init_distributions(init, rng):
    d_in, r = 256, 16
    plan = plan_for(qj.LoraConfig(r=r, target_modules=["lin"], init=init))
    p = Wrap(32, plan).init(jax.random.key(int(rng.integers(1 << 30))), jnp.ones((1, d_in)))["params"]
    a, b = np.asarray(p["lin"]["lora_a"]), np.asarray(p["lin"]["lora_b"])
    assert a.shape == (d_in, r) and b.shape == (r, 32)
    assert not b.any()
    if init == "default":  # Kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in))
        bound = 1 / math.sqrt(d_in)
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound
        assert abs(a.std() - bound / math.sqrt(3)) < 0.05 * bound
    else:  # N(0, std 1/r) as PEFT's "gaussian"
        assert abs(a.std() - 1 / r) < 0.05 / r


def test_dropout_only_on_adapter_path_and_only_in_training():
    cfg = qj.LoraConfig(r=4, target_modules=["lin"], dropout=0.5, init="random")
    model = Wrap(16, plan_for(cfg))
    x = jax.random.normal(jax.random.key(3), (8, 32))
    p = model.init(jax.random.key(0), x)["params"]
    y_eval = model.apply({"params": p}, x)
    y_eval2 = model.apply({"params": p}, x, deterministic=True)
    np.testing.assert_array_equal(y_eval, y_eval2)
    y_a = model.apply({"params": p}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    y_b = model.apply({"params": p}, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(y_a, y_b)
    # Without the adapter, dropout cannot change anything: the base path never sees it.
    p_zero = dict(p["lin"], lora_b=jnp.zeros_like(p["lin"]["lora_b"]))
    y_z = model.apply({"params": {"lin": p_zero}}, x, deterministic=False,
                      rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(y_z, Wrap(16).apply(
        {"params": {"lin": {"kernel": p["lin"]["kernel"], "bias": p["lin"]["bias"]}}}, x))

"""Peer: the reference QLoRA stack (transformers + bitsandbytes NF4 + PEFT) on a Llama shape.

Same setup as ``benchmarks.train_step``'s own model: random weights quantized to NF4 + double
quantization on the GPU one tensor at a time, LoRA rank R on q, k, v, o, gate, up, down, full
activation checkpointing, bf16 compute, sdpa attention, paged AdamW 32-bit on the adapters (the
reference recipe's optimizer). Needs torch with CUDA, transformers, peft and bitsandbytes.
"""

from __future__ import annotations

import time
from typing import Any

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _build(shape: Any, seq: int, dev: str):
    import torch
    import bitsandbytes as bnb
    import transformers
    from transformers.models.llama import modeling_llama

    cfg = transformers.LlamaConfig(
        hidden_size=shape.hidden, intermediate_size=shape.inter, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        vocab_size=shape.vocab, max_position_embeddings=max(seq, 2048), rope_theta=500000.0)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    gen = torch.Generator(device=dev).manual_seed(0)
    # Linear layers of the decoder: NF4 + double quant, built one at a time on the GPU.
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in TARGETS:
                lin = getattr(parent, name, None)
                if lin is None:
                    continue
                w = torch.randn(lin.out_features, lin.in_features, device=dev, generator=gen,
                                dtype=torch.bfloat16) / lin.in_features ** 0.5
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False,
                                      compute_dtype=torch.bfloat16, quant_type="nf4",
                                      compress_statistics=True, device="meta")
                q.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True, blocksize=64).to(dev)
                setattr(parent, name, q)
                del w
    # Everything else (embeddings, norms, head) in bf16, materialised from meta.
    for mod in model.modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            if p.is_meta:
                if "norm" in type(mod).__name__.lower():
                    data = torch.ones(p.shape, device=dev, dtype=torch.bfloat16)
                else:
                    data = torch.randn(p.shape, device=dev, generator=gen,
                                       dtype=torch.bfloat16) * 0.02
                mod._parameters[pname] = torch.nn.Parameter(data, requires_grad=False)
    model.model.rotary_emb = modeling_llama.LlamaRotaryEmbedding(cfg, device=dev)
    return model


def with_lora(model: Any, r: int) -> tuple[Any, Any]:
    """The reference recipe on a built model: gradient checkpointing, PEFT LoRA rank r on
    TARGETS (float32 adapters), paged AdamW 32-bit. Returns (peft model, optimizer)."""
    import bitsandbytes as bnb
    import peft

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=r, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        target_modules=TARGETS))
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()
    return model, bnb.optim.PagedAdamW32bit(trainable, lr=2e-4)


def run(shape: Any, batch: int, seq: int, r: int, steps: int) -> dict[str, Any]:
    import torch
    import bitsandbytes as bnb
    import peft
    import transformers

    dev = "cuda"
    t0 = time.perf_counter()
    model = _build(shape, seq, dev)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    weights = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model, opt = with_lora(model, r)
    ids = torch.randint(0, shape.vocab, (batch, seq + 1), device=dev)
    x, y = ids[:, :-1], ids[:, 1:]
    times, loss0, loss = [], None, None
    for i in range(steps + 2):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=x)
            loss = torch.nn.functional.cross_entropy(
                out.logits.float().reshape(-1, shape.vocab), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        loss0 = float(loss) if loss0 is None else loss0
    timed = sorted(times[2:])
    med = timed[len(timed) // 2]
    return dict(system="transformers+bitsandbytes+peft", remat="full",
                step_s=round(med, 4), tokens_per_s=round(batch * seq / med, 1),
                compile_s=round(times[0], 1), build_s=round(build_s, 1),
                weights_gib=round(weights / 2**30, 3),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3),
                loss_first=round(loss0, 4), loss_last=round(float(loss), 4),
                device=torch.cuda.get_device_name(), torch=torch.__version__,
                transformers=transformers.__version__, peft=peft.__version__,
                bitsandbytes=bnb.__version__)

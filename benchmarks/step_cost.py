"""Step cost: time and peak memory of one training step, Block-LoRA against its floor and its peers.

CLIP ViT-B/16 architecture with random weights (no download), 224 px, batch 8 images, C class prompts
("a photo of a {}." over open_clip's IMAGENET_CLASSNAMES), both towers adapted on q, k, v of every block.
One step = forward of both towers + cross-entropy over the C classes + backward + AdamW step (forward and loss under
--precision's autocast, backward through the runtime's GradScaler, as the training loop runs them). The time is the
median over --steps steps after --warmup steps; peak memory is the peak RSS (CPU) or max allocated (CUDA) of a
fresh process per configuration.

The "timm" family (--families timm) is a non-CLIP model: a timm ViT-S/16 ImageNet classifier (random weights,
1000 classes) whose step is forward + cross-entropy on C labels + backward + AdamW; blocklora places its adapters
by name (TIMM_TARGETING: q, k, v of every block, as row blocks of the fused qkv Linear); PEFT's LoRA adapts the
fused qkv Linear as one (3E, E) matrix (PEFT has no per-projection LoRA on it: one factor pair, 2/3 of blocklora
LoRA's parameters).

Configurations (per backbone family: "open_clip" = open_clip.create_model, "transformers" = CLIPModel built from
a CLIPConfig equivalent to ViT-B/16):
  floor       the same model and attention code as the adapted runs, frozen, one trainable scalar at the input of
              each tower's first block (so the backward runs through every block, as it must for any adapter)
  block_lora  blocklora.inject, AdapterConfig(method="block_lora", n_blocks=8, r=2, alpha=1, dropout=0.25)
  lora        blocklora.inject, AdapterConfig(method="lora", r=2, alpha=1, dropout=0.25)
  peft_lora   PEFT LoraConfig(r=2, lora_alpha=1, lora_dropout=0.25, use_rslora, q_proj/k_proj/v_proj): transformers
  dense_lora  CLIP-LoRA's formulation (separate q/k/v Linears, dropout, x_drop @ (B @ A).T), scaled_dot_product
              attention as ours: open_clip
  full        fine-tuning of every attention projection (in_proj / q,k,v,out_proj weights and biases)
  vision_only Block-LoRA on the vision tower only, text features computed once and cached (open_clip)
  block_lora_ckpt  block_lora with train.grad_checkpointing (every residual block recomputed in backward; open_clip)
  zs_probe, tip_adapter_f, coop  the baselines of methods/ (prepare_baseline: their step reads frozen features, K=16)
Also: text-tower time (forward, no grad, C=1000) with and without prompt truncation, and the bytes each adapter
branch keeps for backward (counted with torch.autograd.graph.saved_tensors_hooks).

Usage:
  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/step_cost.py --threads 1 --output benchmarks/results/step_cost.json
  .venv/bin/python benchmarks/step_cost.py --only floor,block_lora --classes 100 --steps 1   # a quick look
  .venv/bin/python benchmarks/step_cost.py --device cuda --precision fp16 --model ViT-L-14
  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/step_cost.py --families timm --batch-size 32 --no-extras \
      --output benchmarks/results/step_cost_timm.json   # the non-CLIP row (BENCHMARKS.md)
(benchmarks/gpu_check.py measures these configurations on a GPU inside one time budget, from prepare() below.)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_PLAN = {
    # (family, config): the class counts it runs at by default. C = 1000 steps take tens of seconds each on a CPU
    # core, so only the floor, block_lora and lora of the open_clip family (and the vision-only mode) run there.
    ("open_clip", "floor"): (100, 1000),
    ("open_clip", "block_lora"): (100, 1000),
    ("open_clip", "lora"): (100, 1000),
    ("open_clip", "dense_lora"): (100,),
    ("open_clip", "full"): (100,),
    ("open_clip", "vision_only"): (1000,),
    ("open_clip", "block_lora_ckpt"): (100,),
    # the baselines of methods/ (their step reads frozen features: no image tower in it)
    ("open_clip", "zs_probe"): (100, 1000),
    ("open_clip", "tip_adapter_f"): (100, 1000),
    ("open_clip", "coop"): (100,),
    ("transformers", "floor"): (100,),
    ("transformers", "block_lora"): (100,),
    ("transformers", "lora"): (100,),
    ("transformers", "peft_lora"): (100,),
    ("transformers", "full"): (100,),
    # a non-CLIP model (--families timm): a timm ViT-S/16 classifier, C = its head's classes, adapted by name
    ("timm", "floor"): (100,),
    ("timm", "block_lora"): (100,),
    ("timm", "lora"): (100,),
    ("timm", "peft_lora"): (100,),
}
TIMM_MODEL = "vit_small_patch16_224"
# blocklora's q, k, v of every block, as row blocks of timm's fused qkv Linear (adapters/targeting.py)
TIMM_TARGETING = {"target_modules": ["attn.qkv"], "fused": {"qkv": "qkv"}}
CONFIGS = ("floor", "block_lora", "lora", "peft_lora", "dense_lora", "full", "vision_only", "block_lora_ckpt",
           "zs_probe", "tip_adapter_f", "coop")
BASELINES = ("zs_probe", "tip_adapter_f", "coop")
BASELINE_SHOTS = 16  # the baselines' steps depend on the number of shots N = C K (features, cache keys)
TEMPLATE = "a photo of a {}."
R, ALPHA, DROPOUT, N_BLOCKS = 2, 1.0, 0.25, 8


# -- models -------------------------------------------------------------------------------------------------------
def hf_config(open_clip_name: str):
    """A transformers CLIPConfig with the architecture of an open_clip ViT model (QuickGELU, as OpenAI's CLIP);
    "tiny-clip" is blocklora's tiny test architecture."""
    import open_clip
    from transformers import CLIPConfig

    from blocklora.backbones.openclip import TINY_CLIP

    oc = TINY_CLIP if open_clip_name == "tiny-clip" else open_clip.get_model_config(open_clip_name)
    v, t = oc["vision_cfg"], oc["text_cfg"]
    vw, tw = v["width"], t["width"]
    return CLIPConfig(
        text_config=dict(hidden_size=tw, intermediate_size=int(tw * t.get("mlp_ratio", 4.0)),
                         num_attention_heads=t.get("heads", tw // 64), num_hidden_layers=t["layers"],
                         vocab_size=t["vocab_size"], max_position_embeddings=t["context_length"],
                         hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=vw, intermediate_size=int(vw * v.get("mlp_ratio", 4.0)),
                           num_attention_heads=vw // v.get("head_width", 64), num_hidden_layers=v["layers"],
                           image_size=v["image_size"], patch_size=v["patch_size"], hidden_act="quick_gelu"),
        projection_dim=oc["embed_dim"],
    )


def prompts(classes: int) -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    names = list(IMAGENET_CLASSNAMES)
    return [TEMPLATE.format(names[i % len(names)]) for i in range(classes)]


def _dense_lora_attention_cls():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class DenseLoRAProj(nn.Module):
        """CLIP-LoRA's LinearLoRA with dropout on: W x + b + s * drop(x) @ (B @ A).T, every call."""

        def __init__(self, weight, bias, r, alpha, p):
            super().__init__()
            self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
            d_out, d_in = weight.shape
            self.lora_A = nn.Parameter(torch.empty(r, d_in))
            self.lora_B = nn.Parameter(torch.zeros(d_out, r))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.dropout = nn.Dropout(p)
            self.scaling = alpha / math.sqrt(r)

        def forward(self, x):
            out = F.linear(x, self.weight, self.bias)
            x = self.dropout(x)
            return out + torch.matmul(x, (self.lora_B @ self.lora_A).T) * self.scaling

    class DenseLoRAAttention(nn.Module):
        """CLIP-LoRA's PlainMultiheadAttentionLoRA (batch-first self-attention): separate q/k/v projections."""

        def __init__(self, mha, r, alpha, p):
            super().__init__()
            e = mha.in_proj_weight.shape[1]
            self.e, self.h = e, mha.num_heads
            w, b = mha.in_proj_weight, mha.in_proj_bias
            self.q_proj, self.k_proj, self.v_proj = (
                DenseLoRAProj(w[i * e:(i + 1) * e], b[i * e:(i + 1) * e] if b is not None else None, r, alpha, p)
                for i in range(3))
            self.out_proj = mha.out_proj
            self.batch_first = getattr(mha, "batch_first", True)

        def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None, **_):
            x = query if self.batch_first else query.transpose(0, 1)
            n, l, e = x.shape
            q, k, v = (proj(x).view(n, l, self.h, e // self.h).transpose(1, 2)
                       for proj in (self.q_proj, self.k_proj, self.v_proj))
            if attn_mask is not None and attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill_(attn_mask, float("-inf"))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
            out = self.out_proj(out.transpose(1, 2).reshape(n, l, e))
            return (out if self.batch_first else out.transpose(0, 1)), None

    return DenseLoRAAttention


def _add_input_scalars(towers) -> list:
    """One trainable scalar (init 1) multiplying the input of each tower's first block."""
    import torch

    scalars = []
    for block in towers:
        s = torch.nn.Parameter(torch.ones((), device=next(block.parameters()).device))

        def hook(module, args, kwargs, s=s):
            if args:
                return (args[0] * s, *args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = kwargs["hidden_states"] * s
            return args, kwargs

        block.register_forward_pre_hook(hook, with_kwargs=True)
        scalars.append(s)
    return scalars


def base_model(family: str, model_name: str, pretrained: str | None = None):
    """The frozen model every configuration of a family starts from, built once on the CPU (build() copies it).

    "open_clip": a blocklora Backbone of an open_clip architecture (or tiny-clip), random weights;
    "backbone": any model blocklora.load_backbone knows, with `pretrained` (e.g. the demo's effnet-minilm);
    "transformers": a CLIPModel with the open_clip architecture's shapes (hf_config), random weights.
    """
    import torch

    torch.manual_seed(0)
    if family == "timm":
        import timm

        return timm.create_model(TIMM_MODEL, pretrained=False)
    if family == "transformers":
        from transformers import CLIPModel

        return CLIPModel(hf_config(model_name))
    from blocklora.backbones import load_backbone

    return load_backbone(model_name, pretrained if family == "backbone" else None)


def build(family: str, config: str, model_name: str, device: str, base=None, pretrained: str | None = None):
    """(model, encode_images, encode_texts(tokens), tokens for prompts fn, trainable params, info).

    `base`: a base_model() to copy instead of building one (building ViT-L/14 takes seconds, a copy a fraction).
    The "backbone" family knows block_lora, lora and vision_only only (the others reach into open_clip modules).
    """
    import torch

    from blocklora.adapters.config import AdapterConfig
    from blocklora.adapters.inject import adapter_layers, inject

    if base is None:
        base = base_model(family, model_name, pretrained)
    torch.manual_seed(0)
    info: dict[str, Any] = {}
    if family in ("open_clip", "backbone"):
        if family == "backbone" and config not in ("block_lora", "lora", "vision_only"):
            raise ValueError(f"config {config} needs an open_clip model (family open_clip)")
        bb = copy.copy(base)  # the Backbone's tokenizer and preprocessing, shared; its model, copied
        bb.model = model = copy.deepcopy(base.model)
        if config == "dense_lora":
            cls = _dense_lora_attention_cls()
            for p in model.parameters():
                p.requires_grad_(False)
            for tower in (model.visual.transformer, model.transformer):
                for block in tower.resblocks:
                    block.attn = cls(block.attn, R, ALPHA, DROPOUT)
        elif config in ("block_lora", "lora", "vision_only", "block_lora_ckpt"):
            method = "lora" if config == "lora" else "block_lora"
            towers_sel = ("vision",) if config == "vision_only" else ("vision", "text")
            inject(model, AdapterConfig(method=method, r=R, alpha=ALPHA, dropout=DROPOUT, towers=towers_sel,
                                        **({"n_blocks": N_BLOCKS} if method == "block_lora" else {})))
            if config == "block_lora_ckpt":  # train.grad_checkpointing: every residual block recomputed in backward
                bb.set_grad_checkpointing(True)
        else:  # floor and full: the same attention module as the adapted runs, adapters off and frozen
            inject(model, AdapterConfig(r=R, alpha=ALPHA, dropout=DROPOUT))
            for _, layer in adapter_layers(model):
                layer.adapter_enabled = False
            for p in model.parameters():
                p.requires_grad_(False)
            if config == "full":
                for _, layer in adapter_layers(model):
                    for p in (layer.in_proj_weight, layer.in_proj_bias, layer.out_proj.weight, layer.out_proj.bias):
                        if p is not None:
                            p.requires_grad_(True)
        model.to(device)
        towers = [model.visual.transformer.resblocks[0], model.transformer.resblocks[0]] if config == "floor" else []
        scalars = _add_input_scalars(towers)
        tokenize = bb.tokenize
        encode_images, encode_texts = bb.encode_images, bb.encode_texts
        info["image_size"] = bb.image_size
        if family == "open_clip":
            info["attention"] = "CLIP-LoRA-style separate q/k/v (scaled_dot_product_attention)" \
                if config == "dense_lora" else "blocklora MHA replacement (scaled_dot_product_attention)"
    elif family == "timm":
        model = copy.deepcopy(base)
        for p in model.parameters():
            p.requires_grad_(False)
        if config in ("block_lora", "lora"):
            inject(model, AdapterConfig(method=config, r=R, alpha=ALPHA, dropout=DROPOUT, **TIMM_TARGETING,
                                        **({"n_blocks": N_BLOCKS} if config == "block_lora" else {})))
        elif config == "peft_lora":
            import peft

            peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, use_rslora=True,
                                                       target_modules=["qkv"]))
        elif config != "floor":
            raise ValueError(f"config {config} is not measured on the timm family")
        model.to(device)
        scalars = _add_input_scalars([model.blocks[0]]) if config == "floor" else []
        encode_images, encode_texts, tokenize = model, None, None
        info["classifier"] = True  # the step is a classifier's: cross-entropy on the model's logits
        info["attention"] = f"timm {type(model.blocks[0].attn).__name__} (fused qkv Linear)"
        info["image_size"] = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    else:
        import open_clip

        from blocklora.backbones.hf import _tensor

        model = copy.deepcopy(base)
        oc_tok = open_clip.get_tokenizer("ViT-B-32" if model_name == "tiny-clip" else model_name)
        eos = model.config.text_config.eos_token_id

        def tokenize(texts):  # what the tokenizer gives with padding=True: cut after the longest prompt
            ids = oc_tok(list(texts))
            last = (ids == eos).int().argmax(-1)
            length = int(last.max()) + 1
            ids = ids[:, :length]
            return {"input_ids": ids, "attention_mask": (torch.arange(length)[None] <= last[:, None]).long()}

        for p in model.parameters():
            p.requires_grad_(False)
        if config in ("block_lora", "lora"):
            inject(model, AdapterConfig(method=config, r=R, alpha=ALPHA, dropout=DROPOUT,
                                        **({"n_blocks": N_BLOCKS} if config == "block_lora" else {})))
        elif config == "peft_lora":
            import peft

            peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, use_rslora=True,
                                                       target_modules=["q_proj", "k_proj", "v_proj"]))
        elif config == "full":
            for name, p in model.named_parameters():
                if ".self_attn." in name:
                    p.requires_grad_(True)
        model.to(device)
        towers = [model.vision_model.encoder.layers[0], model.text_model.encoder.layers[0]]
        scalars = _add_input_scalars(towers) if config == "floor" else []

        def encode_images(x):
            return _tensor(model.get_image_features(pixel_values=x))

        def encode_texts(tok):
            return _tensor(model.get_text_features(**{k: v.to(device) for k, v in tok.items()}))

        info["attention"] = f"transformers CLIPAttention ({model.config._attn_implementation})"
        info["image_size"] = model.config.vision_config.image_size
    params = [p for p in model.parameters() if p.requires_grad] + scalars
    info["trainable"] = sum(p.numel() for p in params)
    return model, encode_images, encode_texts, tokenize, params, info


# -- measurement in a fresh process --------------------------------------------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def prepare(spec: dict, base=None):
    """Build one configuration and its training step: (step function, info).

    spec["precision"] (default fp32) runs the step as the project's training loop does: forward and loss under
    Runtime.autocast(), backward through Runtime.grad_scaler() (a real scaler for fp16 on CUDA, a no-op otherwise).
    """
    import torch
    import torch.nn.functional as F

    from blocklora.engine.runtime import make_runtime

    if spec["config"] in BASELINES:
        return prepare_baseline(spec, base)
    device, classes, batch = spec["device"], spec["classes"], spec["batch_size"]
    rt = make_runtime(device, spec.get("precision", "fp32"))
    scaler = rt.grad_scaler()
    model, enc_img, enc_txt, tokenize, params, info = build(spec["family"], spec["config"], spec["model"], device,
                                                            base, spec.get("pretrained"))
    model.train()
    size = info["image_size"]
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    labels = torch.randint(0, classes, (batch,), generator=g).to(device)
    classifier = info.get("classifier", False)
    if not classifier:
        tokens = tokenize(prompts(classes))
        tokens = {k: v.to(device) for k, v in tokens.items()} if isinstance(tokens, dict) else tokens.to(device)
        info["text_length"] = int(tokens["input_ids"].shape[1]) if isinstance(tokens, dict) \
            else int(tokens.argmax(-1).max()) + 1
    info["precision"] = rt.precision
    opt = torch.optim.AdamW(params, lr=1e-5)
    cached = None
    if spec["config"] == "vision_only":  # text features computed once (no graph), reused every step
        with torch.no_grad(), rt.autocast():
            cached = F.normalize(enc_txt(tokens).float(), dim=-1)

    def step():
        with rt.autocast():
            if classifier:
                loss = F.cross_entropy(enc_img(images).float(), labels)
            else:
                img = F.normalize(enc_img(images).float(), dim=-1)
                txt = cached if cached is not None else F.normalize(enc_txt(tokens).float(), dim=-1)
                loss = F.cross_entropy(100.0 * img @ txt.T, labels)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return float(loss.detach())

    return step, info


def prepare_baseline(spec: dict, base=None):
    """A baseline's training step (methods/), on random unit features standing for the frozen image features of
    C x BASELINE_SHOTS shots (computed once per run, not per step):
      zs_probe       one L-BFGS function evaluation (loss and gradient) over all N = C K features (probe.py)
      tip_adapter_f  one AdamW step of the cache keys on a batch of min(256, N) features (tip_adapter.py)
      coop           one SGD step of the 16 context vectors: the text tower forward and backward over the C prompts,
                     a batch of 32 features (coop.py)"""
    import torch
    import torch.nn.functional as F

    from blocklora.methods import coop, tip_adapter
    from blocklora.methods.base import FitData
    from blocklora.methods.fit import build

    if spec["family"] != "open_clip":
        raise ValueError(f"config {spec['config']} runs on the open_clip family")
    device, c = spec["device"], spec["classes"]
    if base is None:
        base = base_model("open_clip", spec["model"])
    bb = copy.copy(base)
    bb.model = copy.deepcopy(base.model).to(device)
    for p in bb.model.parameters():
        p.requires_grad_(False)
    names = prompts(c)
    g = torch.Generator().manual_seed(0)
    size = bb.image_size
    with torch.no_grad():
        d = bb.encode_images(torch.zeros(1, 3, size, size, device=device)).shape[-1]
    n = c * BASELINE_SHOTS
    feats = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(device)
    labels = (torch.arange(n) % c).to(device)
    text = F.normalize(torch.randn(c, d, generator=g), dim=-1).to(device)
    from blocklora.config.run_config import BaselineConfig

    data = FitData(feats, labels, feats[None], feats[:0], labels[:0], text, 100.0, [f"c{i}" for i in range(c)],
                   TEMPLATE, BaselineConfig(), BASELINE_SHOTS, 1, bb)
    info: dict[str, Any] = {"image_size": size, "features": n, "feature_dim": int(d), "precision": "fp32"}
    if spec["config"] == "zs_probe":
        w = (100.0 * text).clone().requires_grad_(True)
        b = torch.zeros(c, device=device, requires_grad=True)
        params = [w, b]

        def step():
            for p in params:
                p.grad = None
            loss = F.cross_entropy(feats @ w.T + b, labels) + ((w - 100.0 * text) ** 2).sum() / (2 * n)
            loss.backward()
            return float(loss.detach())
    elif spec["config"] == "tip_adapter_f":
        head = build("tip_adapter_f", data)
        opt = torch.optim.AdamW([head.keys], lr=tip_adapter.LR, eps=tip_adapter.EPS)
        batch = min(tip_adapter.BATCH, n)
        params = [head.keys]

        def step():
            loss = F.cross_entropy(head.logits(feats[:batch]), labels[:batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            return float(loss.detach())
    else:
        head = coop.CoOpHead(bb, names, 100.0, 16)
        opt = torch.optim.SGD([head.ctx], lr=coop.LR, momentum=coop.MOMENTUM, weight_decay=coop.WEIGHT_DECAY)
        params = [head.ctx]
        info["text_length"] = int(coop.ids_of(head.tokens(names)).argmax(-1).max()) + 1

        def step():
            loss = F.cross_entropy(100.0 * feats[:coop.BATCH] @ head.text_features().T, labels[:coop.BATCH])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            return float(loss.detach())

    info["trainable"] = sum(p.numel() for p in params)
    return step, info


def _timed(step) -> float:
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def worker(spec: dict) -> dict:
    """One configuration: build, warm up, time `steps` steps. Runs in its own process (peak memory is per process)."""
    import torch

    torch.set_num_threads(spec["threads"])
    device = spec["device"]
    step, info = prepare(spec)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_mb = _rss_mb() if not device.startswith("cuda") else torch.cuda.memory_allocated() / 2**20
    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        t = _timed(step)
        if i >= spec["warmup"]:
            times.append(t)
        print(f"    step {i + 1}/{spec['warmup'] + spec['steps']}: {t:.2f} s", file=sys.stderr, flush=True)
    peak = _peak_mb(device)
    return {"step_s": statistics.median(times), "times_s": times, "peak_mb": round(peak, 1),
            "base_mb": round(base_mb, 1), "activation_mb": round(peak - base_mb, 1), "classes": spec["classes"],
            **info}


def interleaved(spec: dict) -> dict:
    """Time ratios robust to a shared machine: every config of a family built in ONE process, their steps taken in
    turn (round-robin), so load changes hit all of them alike. Time only (memory comes from the fresh processes)."""
    import torch

    torch.set_num_threads(spec["threads"])
    steps = {cfg: prepare({**spec, "config": cfg})[0] for cfg in spec["configs"]}
    times: dict[str, list[float]] = {cfg: [] for cfg in steps}
    for i in range(spec["warmup"] + spec["steps"]):
        for cfg, step in steps.items():
            t = _timed(step)
            if i >= spec["warmup"]:
                times[cfg].append(t)
        print(f"    round {i + 1}/{spec['warmup'] + spec['steps']}: " +
              ", ".join(f"{c} {v[-1]:.2f} s" for c, v in times.items() if v), file=sys.stderr, flush=True)
    med = {cfg: statistics.median(v) for cfg, v in times.items()}
    out: dict[str, Any] = {"classes": spec["classes"], "rounds": spec["steps"], "step_s": med, "times_s": times}
    if "floor" in med:
        out["time_vs_floor"] = {cfg: round(v / med["floor"], 3) for cfg, v in med.items()}
    if "block_lora" in med:
        out["block_lora_time_vs"] = {cfg: round(med["block_lora"] / v, 3) for cfg, v in med.items()}
    return out


def shared_fold_cost(spec: dict) -> dict:
    """One transformers CLIPAttention (ViT-B/16 vision width, batch 8 x 197 tokens, sdpa) with Block-LoRA on
    q_proj, k_proj, v_proj: forward + backward time and saved bytes with the three Linears folding their common
    input once (SharedFold, the default) against each folding its own copy, and with the adapters off. Interleaved
    reps; saved bytes counted once per storage (the shared folded tensor is saved by three products)."""
    import torch
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPAttention

    from blocklora.adapters.config import AdapterConfig
    from blocklora.adapters.layers import BlockLoRALinear, SharedFold

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=768, num_attention_heads=12)
    cfg._attn_implementation = "sdpa"
    attn = CLIPAttention(cfg)
    for p in attn.parameters():
        p.requires_grad_(False)
    share = SharedFold()
    layers = []
    for name in ("q_proj", "k_proj", "v_proj"):
        layer = BlockLoRALinear(getattr(attn, name), AdapterConfig(r=R, n_blocks=N_BLOCKS, alpha=ALPHA,
                                                                    dropout=DROPOUT))
        setattr(attn, name, layer)
        layers.append(layer)
    attn.train()
    x = torch.randn(8, 197, 768, requires_grad=True)

    def set_mode(mode: str) -> None:
        for layer in layers:
            layer.shared_fold = share if mode == "shared" else None
            layer.adapter_enabled = mode != "off"

    modes = ("shared", "unshared", "off")
    times: dict[str, list[float]] = {m: [] for m in modes}
    saved_b: dict[str, int] = {}
    for rep in range(3 + spec["reps"]):
        for mode in modes:
            set_mode(mode)
            if rep == 0:
                saved_b[mode] = saved_bytes(lambda: attn(x)[0])
            t0 = time.perf_counter()
            attn(x)[0].sum().backward()
            if rep >= 3:
                times[mode].append(time.perf_counter() - t0)
    ms = {m: round(1e3 * statistics.median(v), 2) for m, v in times.items()}
    return {"input_shape": list(x.shape), "reps": spec["reps"], "module_ms": ms,
            "adapter_ms": {m: round(ms[m] - ms["off"], 2) for m in ("shared", "unshared")},
            "adapter_saved_bytes_per_element_of_x": {m: round((saved_b[m] - saved_b["off"]) / x.numel(), 3)
                                                     for m in ("shared", "unshared")}}


def text_truncation(spec: dict) -> dict:
    """Text-tower forward (no grad: the zero-shot / cached-feature path) for C prompts, cut after the longest
    end-of-text token (our backbone's encode_texts) against the stock 77-token encode_text. Block-LoRA injected."""
    import torch

    torch.set_num_threads(spec["threads"])
    model, _, enc_txt, tokenize, _, _ = build("open_clip", "block_lora", spec["model"], spec["device"])
    model.eval()
    tokens = tokenize(prompts(spec["classes"])).to(spec["device"])
    out: dict[str, Any] = {"classes": spec["classes"], "tokens": int(tokens.shape[1]),
                           "cut_length": int(tokens.argmax(-1).max()) + 1}
    with torch.no_grad():
        runs = (("truncated_s", lambda: enc_txt(tokens)), ("full_length_s", lambda: model.encode_text(tokens)))
        for name, fn in runs:
            ts = []
            for _ in range(spec["reps"]):
                t0 = time.perf_counter()
                fn()
                if spec["device"].startswith("cuda"):
                    torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
            out[name] = statistics.median(ts)
            print(f"    {name}: {out[name]:.2f} s", file=sys.stderr, flush=True)
    with torch.no_grad():
        a, b = enc_txt(tokens[:50]), model.encode_text(tokens[:50])
    out["max_abs_diff"] = float((a - b).abs().max())
    out["speedup"] = out["full_length_s"] / out["truncated_s"]
    return out


def saved_bytes(fn, skip: set[int] | frozenset = frozenset()) -> int:
    """Bytes autograd keeps for backward while `fn()` runs, each storage counted once (a tensor saved by several
    products is kept once), storages whose data_ptr is in `skip` (parameters) left out."""
    import torch

    seen: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in skip:
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def saved_tensor_costs(spec: dict) -> dict:
    """Bytes each adapter keeps for backward, per element of its input x, counted with saved_tensors_hooks.

    For one open_clip attention (vision width, batch 8 x 197 tokens) and one transformers q_proj Linear: the bytes
    saved by the adapted module minus those of the same module with the adapter off (parameters not counted).
    Also the old path (F.dropout then fold) and the mask stored as bits / bools instead of a seed, and the time of the
    adapter branch's forward + backward for each.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    import blocklora.adapters.core as core
    from blocklora.adapters.config import AdapterConfig
    from blocklora.adapters.fused import BlockLoRAMultiheadAttention
    from blocklora.adapters.layers import BlockLoRALinear

    StoredMaskFold = _stored_mask_fold()
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    e = 768
    x = torch.randn(8, 197, e, requires_grad=True)
    params: set[int] = set()

    def old_folded_input(layer):
        def f(inp, like):  # the previous implementation: F.dropout (mask kept full width) then fold
            return core.fold(F.dropout(inp, layer.dropout_p, layer.training), layer.n_blocks).to(like.dtype)
        return f

    def stored_mask_folded_input(layer, storage):
        def f(inp, like):  # the mask kept for backward as bools or packed bits instead of drawn again from a seed
            return StoredMaskFold.apply(inp, layer.dropout_p, layer.n_blocks, core.draw_seed(), storage).to(like.dtype)
        return f

    out: dict[str, Any] = {"input_shape": list(x.shape), "bytes_per_element_of_x": {}, "branch_ms": {}}
    mha = nn.MultiheadAttention(e, 12, batch_first=True)
    for method in ("block_lora", "lora"):
        for kind in ("mha", "linear"):
            if kind == "mha":
                layer = BlockLoRAMultiheadAttention(copy.deepcopy(mha), AdapterConfig(method=method, dropout=DROPOUT))

                def run(layer=layer):
                    return layer(x, x, x, need_weights=False)[0]
            else:
                layer = BlockLoRALinear(nn.Linear(e, e), AdapterConfig(
                    r=R, n_blocks=N_BLOCKS if method == "block_lora" else 1, dropout=DROPOUT))

                def run(layer=layer):
                    return layer(x)
            layer.train()
            params.clear()
            params.update(p.data_ptr() for p in layer.parameters())
            for name, p in layer.named_parameters():
                p.requires_grad_("lora_" in name)
            layer.adapter_enabled = False
            base = saved_bytes(run, params)
            layer.adapter_enabled = True
            for storage in ("old", "seed", "bits", "bool"):
                if storage == "old":
                    layer._folded_input = old_folded_input(layer)
                elif storage == "seed":  # blocklora's own path
                    layer.__dict__.pop("_folded_input", None)
                else:
                    layer._folded_input = stored_mask_folded_input(layer, storage)
                key = f"{method}/{kind}/{storage}"
                out["bytes_per_element_of_x"][key] = round((saved_bytes(run, params) - base) / x.numel(), 3)
                if kind == "mha":  # time of the adapter branch alone (fold + down-projection, fwd + bwd)
                    a = torch.cat([layer.lora_A[p] for p in "qkv"])
                    ts = []
                    for _ in range(spec["reps"] * 4 + 1):
                        t0 = time.perf_counter()
                        F.linear(layer._folded_input(x, a), a).sum().backward()
                        ts.append(time.perf_counter() - t0)
                    out["branch_ms"][key] = round(statistics.median(ts[1:]) * 1e3, 2)
            layer.__dict__.pop("_folded_input", None)
    return out


def _pack_bits(mask):
    import torch

    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    return (flat.view(-1, 8).to(torch.uint8) << shifts).sum(-1, dtype=torch.uint8)


def _unpack_bits(packed, shape):
    import math

    import torch

    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 1).reshape(-1)[: math.prod(shape)].view(shape).bool()


def _stored_mask_fold():
    """fold_n(dropout(x)) keeping its mask for backward as bools (1 byte per element of x) or packed bits (1/8):
    the alternatives measured against blocklora's seed (which keeps nothing of x's size)."""
    import torch

    from blocklora.adapters import core

    class StoredMaskFold(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, p, n_blocks, seed, storage):
            mask = core.dropout_mask(x.shape, p, seed, x.device)
            ctx.p, ctx.n_blocks, ctx.shape, ctx.storage = p, n_blocks, x.shape, storage
            ctx.save_for_backward(_pack_bits(mask) if storage == "bits" else mask)
            return core.fold(x * mask, n_blocks) * (1.0 / (1.0 - p))

        @staticmethod
        def backward(ctx, grad_h):
            (saved,) = ctx.saved_tensors
            mask = _unpack_bits(saved, ctx.shape) if ctx.storage == "bits" else saved
            return core.unfold_grad(grad_h * (1.0 / (1.0 - ctx.p)), mask, ctx.n_blocks, -1), None, None, None, None

    return StoredMaskFold


# -- orchestration -------------------------------------------------------------------------------------------------
def run_in_subprocess(kind: str, spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]),
               TOKENIZERS_PARALLELISM="false")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, json.dumps(spec)], env=env,
                          stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        return {"error": f"exit code {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plan(args) -> list[tuple[str, str, int]]:
    only = set(args.only.split(",")) if args.only else None
    classes = [int(c) for c in args.classes.split(",")] if args.classes else None
    families = args.families.split(",")
    jobs = []
    for (family, config), cs in DEFAULT_PLAN.items():
        if family not in families or (only and config not in only):
            continue
        for c in (classes if classes else cs):
            if classes and family == "transformers" and config == "vision_only":
                continue
            jobs.append((family, config, c))
    return sorted(jobs, key=lambda j: (j[2], j[0] != "open_clip", CONFIGS.index(j[1])))


def ratios(results: dict) -> dict:
    """results[family][(config, C)] -> {"family/config@C/what": ratio}."""
    out: dict[str, Any] = {}
    for family, fam in results.items():
        for (cfg, c), res in fam.items():
            if "step_s" not in res:
                continue
            peers = ["floor"] + (["lora", "peft_lora", "dense_lora", "full"] if cfg == "block_lora" else [])
            for peer in peers:
                other = fam.get((peer, c), {})
                if peer == cfg or "step_s" not in other:
                    continue
                out[f"{family}/{cfg}@{c}/time_vs_{peer}"] = round(res["step_s"] / other["step_s"], 3)
                out[f"{family}/{cfg}@{c}/peak_vs_{peer}"] = round(res["peak_mb"] / other["peak_mb"], 3)
                out[f"{family}/{cfg}@{c}/activation_vs_{peer}"] = round(
                    res["activation_mb"] / max(other["activation_mb"], 1.0), 3)
    return out


def table(results: dict) -> str:
    lines = ["| family | config | C | step s | peak MB | activation MB | x floor time | x floor peak | trainable |",
             "|---|---|---|---|---|---|---|---|---|"]
    for family, fam in results.items():
        for (cfg, c), r in fam.items():
            if "error" in r:
                lines.append(f"| {family} | {cfg} | {c} | error: {r['error']} | | | | | |")
                continue
            floor = fam.get(("floor", c), {})
            tf = f"{r['step_s'] / floor['step_s']:.3f}" if "step_s" in floor else ""
            pf = f"{r['peak_mb'] / floor['peak_mb']:.3f}" if "peak_mb" in floor else ""
            lines.append(f"| {family} | {cfg} | {c} | {r['step_s']:.2f} | {r['peak_mb']:.0f} | "
                         f"{r['activation_mb']:.0f} | {tf} | {pf} | {r['trainable']:,} |")
    return "\n".join(lines)


def by_config(fam: dict) -> dict:
    """{(config, C): result} -> {config: {**result at its smallest C, "by_classes": {C: result}}}."""
    out: dict[str, Any] = {}
    for (cfg, c), res in sorted(fam.items(), key=lambda kv: kv[0][1]):
        entry = out.setdefault(cfg, {**res, "by_classes": {}})
        entry["by_classes"][str(c)] = res
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ViT-B-16", help="open_clip architecture (random weights)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"),
                    help="autocast dtype of the step (fp16: CUDA, with GradScaler), as train.precision")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--classes", default="", help="comma list of class counts for every config (default: plan)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps at C < 1000 (median)")
    ap.add_argument("--steps-1000", type=int, default=3, help="timed steps at C >= 1000 (median)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--families", default="open_clip,transformers")
    ap.add_argument("--only", default="", help=f"comma list of configs among {', '.join(CONFIGS)}")
    ap.add_argument("--interleaved-rounds", type=int, default=3,
                    help="rounds of the one-process round-robin timing at C=100 (0: skip)")
    ap.add_argument("--no-extras", action="store_true", help="skip text truncation and saved-tensor accounting")
    ap.add_argument("--extras", default="truncation,saved,shared_fold",
                    help="which extras to run: truncation, saved (saved-tensor bytes), shared_fold")
    ap.add_argument("--truncation-classes", type=int, default=1000)
    ap.add_argument("--output", default="")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        kind, spec = args.worker[0], json.loads(args.worker[1])
        fn = {"step": worker, "truncation": text_truncation, "saved": saved_tensor_costs,
              "interleaved": interleaved, "shared_fold": shared_fold_cost}[kind]
        print(json.dumps(fn(spec)))
        return {}
    import torch

    config = {"model": args.model, "device": args.device, "precision": args.precision, "threads": args.threads,
              "batch_size": args.batch_size,
              "image_size": 224, "steps": args.steps, "steps_at_1000": args.steps_1000, "warmup": args.warmup,
              "r": R, "alpha": ALPHA, "dropout": DROPOUT, "n_blocks": N_BLOCKS, "template": TEMPLATE,
              "adapted": "q,k,v of every block of both towers", "torch": torch.__version__,
              "machine": f"{platform.machine()} {os.cpu_count()} cores" if args.device == "cpu" else args.device,
              "date": time.strftime("%Y-%m-%d"), "timing": "median of the timed steps after warm-up",
              "memory": "peak RSS of a fresh process (ru_maxrss)" if args.device == "cpu" else
              "torch.cuda.max_memory_allocated of a fresh process",
              "plan": "C=1000 only for open_clip floor/block_lora/lora and vision_only; all configs at C=100, each "
                      "in a fresh process; then per family all C=100 configs in one process, round-robin (time only)"}
    if args.device.startswith("cuda"):
        config["machine"] = torch.cuda.get_device_name() if torch.cuda.is_available() else args.device
    results: dict[str, dict[str, Any]] = {}
    jobs = plan(args)
    t_start = time.perf_counter()
    for i, (family, cfg, c) in enumerate(jobs, 1):
        spec = {"family": family, "config": cfg, "classes": c, "model": args.model, "device": args.device,
                "threads": args.threads, "batch_size": args.batch_size, "warmup": args.warmup,
                "steps": args.steps_1000 if c >= 1000 else args.steps, "precision": args.precision}
        print(f"[{i}/{len(jobs)}] {family} {cfg} C={c} ({time.perf_counter() - t_start:.0f} s elapsed)",
              file=sys.stderr, flush=True)
        res = run_in_subprocess("step", spec)
        results.setdefault(family, {})[(cfg, c)] = res
        if "step_s" in res:
            print(f"    -> {res['step_s']:.2f} s/step, peak {res['peak_mb']:.0f} MB", file=sys.stderr, flush=True)
    extras: dict[str, Any] = {}
    if args.interleaved_rounds > 0:
        extras["time_interleaved"] = {}
        for family in args.families.split(","):
            cfgs = [cfg for (fam, cfg), cs in DEFAULT_PLAN.items() if fam == family and min(cs) < 1000
                    and (not args.only or cfg in args.only.split(","))]
            c = int(args.classes.split(",")[0]) if args.classes else 100
            print(f"[interleaved] {family} C={c}: {', '.join(cfgs)}", file=sys.stderr, flush=True)
            res = run_in_subprocess("interleaved", {
                "family": family, "configs": cfgs, "classes": c, "model": args.model, "device": args.device,
                "threads": args.threads, "batch_size": args.batch_size, "warmup": args.warmup,
                "steps": args.interleaved_rounds, "precision": args.precision})
            extras["time_interleaved"][family] = res
            if "time_vs_floor" in res:
                print(f"    -> time x floor: {res['time_vs_floor']}", file=sys.stderr, flush=True)
    if not args.no_extras:
        base = {"model": args.model, "device": args.device, "threads": args.threads, "reps": 1}
        wanted = set(args.extras.split(","))
        if "truncation" in wanted:
            print("[extra] text tower with / without prompt truncation", file=sys.stderr, flush=True)
            extras["text_truncation"] = run_in_subprocess("truncation", {**base, "classes": args.truncation_classes})
        if "saved" in wanted:
            print("[extra] saved-tensor bytes of the adapter branch", file=sys.stderr, flush=True)
            extras["saved_tensors"] = run_in_subprocess("saved", {**base, "reps": 3})
        if "shared_fold" in wanted:
            print("[extra] transformers attention: q/k/v folding once vs each its own", file=sys.stderr, flush=True)
            extras["shared_fold"] = run_in_subprocess("shared_fold", {**base, "reps": 20})
    out = {"config": config, "results": by_config(results.get("open_clip", {})),
           "transformers": {"results": by_config(results.get("transformers", {}))},
           **({"timm": {"model": TIMM_MODEL, "targeting": TIMM_TARGETING, "results": by_config(results["timm"])}}
              if "timm" in results else {}),
           "ratios": ratios(results),
           **extras}
    out["config"]["wall_s"] = round(time.perf_counter() - t_start, 1)
    print(table(results))
    for k, v in out["ratios"].items():
        print(f"{k}: {v}")
    tt = extras.get("text_truncation", {})
    if "speedup" in tt:
        print(f"text tower C={tt['classes']}: {tt['full_length_s']:.2f} s at 77 tokens, {tt['truncated_s']:.2f} s "
              f"cut at {tt['cut_length']} -> {tt['speedup']:.2f}x")
    if "bytes_per_element_of_x" in extras.get("saved_tensors", {}):
        for k, v in extras["saved_tensors"]["bytes_per_element_of_x"].items():
            ms = extras["saved_tensors"]["branch_ms"].get(k)
            print(f"saved by adapter {k}: {v} B per element of x" + (f", branch {ms} ms" if ms else ""))
    sf = extras.get("shared_fold", {})
    if "module_ms" in sf:
        print(f"transformers attention fwd+bwd: adapters off {sf['module_ms']['off']} ms; q/k/v adapter overhead "
              f"{sf['adapter_ms']['shared']} ms folding once, {sf['adapter_ms']['unshared']} ms folding thrice; "
              f"saved {sf['adapter_saved_bytes_per_element_of_x']} B per element of x")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.output}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()

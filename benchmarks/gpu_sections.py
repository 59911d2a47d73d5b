"""The correctness sections of benchmarks/gpu_check.py (its docstring says what each checks and why) and the
helpers gpu_cost.py shares. Each section returns a dict for the JSON with "status": pass / fail, or done (env)."""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

TEMPLATE = "a photo of a {}."
# Relative error of (loss, adapter-gradient vector) against the float32 step. Measured on the CPU (ViT-B/16,
# random weights, batch 4, 100 classes): fp16 4.9e-4 / 2.7e-3, bf16 4.5e-3 / 2.8e-2; the bounds leave 5-10x.
TOLERANCES = {"fp16": (5e-3, 2e-2), "bf16": (3e-2, 1e-1)}
MERGE_TOLERANCE = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 5e-2}  # ||merged - unmerged|| / ||unmerged||
B_STD = 0.05  # adapters' B drawn N(0, B_STD^2) for the gradient and merge checks (B = 0 at init: A's gradient is 0)


# -- helpers ---------------------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


@contextlib.contextmanager
def ieee_fp32():
    """A float32 reference: no TF32 in matrix products or cuDNN convolutions, attention by the math kernel."""
    import warnings

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy allow_tf32 flags warn about the newer fp32_precision API
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def adapted(base, device: str, randomize: bool = False, seed: int = 1):
    """A copy of the open_clip base Backbone with the default Block-LoRA injected (B random if `randomize`)."""
    import torch

    from blocklora.adapters.config import AdapterConfig
    from blocklora.adapters.inject import inject

    bb = copy.copy(base)
    bb.model = copy.deepcopy(base.model)
    inject(bb.model, AdapterConfig())
    if randomize:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in bb.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * B_STD)
    return bb.to(device)


def classnames(n: int) -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return [IMAGENET_CLASSNAMES[i % 1000] + ("" if i < 1000 else f" {i // 1000}") for i in range(n)]


@dataclass(frozen=True)
class NoiseImages:
    """Item.path -> a random RGB image that depends only on the path (a reader for the real training loop)."""

    size: int = 256

    def __call__(self, path: str):
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(zlib.crc32(path.encode()))
        return Image.fromarray(rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8))


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


# -- sections ----------------------------------------------------------------------------------------------------------
def env_section(plan) -> dict[str, Any]:
    import torch

    import blocklora

    out: dict[str, Any] = {"status": "done", "python": platform.python_version(), "torch": torch.__version__,
                           "blocklora": blocklora.__version__, "cuda": torch.version.cuda,
                           "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    for pkg in ("open_clip_torch", "transformers", "peft", "timm", "safetensors"):
        with contextlib.suppress(Exception):
            import importlib.metadata as md

            out[pkg] = md.version(pkg)
    if plan.device == "cuda":
        torch.cuda.init()
        torch.empty(1, device="cuda")
        free_b, total_b = torch.cuda.mem_get_info()
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability())),
                   gpu_memory_gib=round(total_b / 2**30, 1), multiprocessors=props.multi_processor_count,
                   cudnn=torch.backends.cudnn.version(),
                   cuda_context_mib=round((total_b - free_b - torch.cuda.memory_reserved()) / 2**20),
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32,
                   sdpa={k: getattr(torch.backends.cuda, f"{k}_sdp_enabled")()
                         for k in ("flash", "mem_efficient", "math", "cudnn") if hasattr(torch.backends.cuda,
                                                                                        f"{k}_sdp_enabled")})
        with contextlib.suppress(Exception):
            q = "name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,memory.used"
            out["nvidia_smi"] = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                                               capture_output=True, text=True, timeout=20).stdout.strip()
    return out


def train_amp_section(plan, base) -> dict[str, Any]:
    """The real loop (Trainer.fit: data stream, autocast, scaler, AdamW, cosine schedule) for train_steps steps."""
    import torch

    from blocklora.adapters.inject import adapter_state_dict
    from blocklora.config.run_config import RunConfig, TrainConfig
    from blocklora.data.types import Item
    from blocklora.engine.fit import Trainer
    from blocklora.engine.runtime import make_runtime

    torch.manual_seed(1)
    bb = adapted(base, plan.device)
    c = plan.classes[0]
    items = [Item(f"synthetic/{i}", i % c) for i in range(2 * c)]
    # the recipe keys the method decides (drop_last, frozen_dtype, ...) come from RunConfig.resolved()
    train = TrainConfig(batch_size=plan.batch, iters=plan.train_steps, checkpoint_every=0, template=TEMPLATE)
    cfg = RunConfig(train=train).resolved().train
    rt = make_runtime(plan.device, plan.amp)
    trainer = Trainer(bb, items, NoiseImages(), classnames(c), cfg, rt, seed=1, total_iters=plan.train_steps,
                      workers=plan.workers)
    before = {k: v.detach().clone() for k, v in adapter_state_dict(bb.model).items()}
    scale0, scaler_on = trainer.scaler.get_scale(), trainer.scaler.is_enabled()  # the initial scale (2**16)
    steps: list[dict[str, Any]] = []

    def on_step(m: dict[str, Any]) -> None:
        steps.append({"loss": m["loss"], "scale": trainer.scaler.get_scale(), "step_s": m["step_s"]})

    trainer.fit(on_step=on_step)
    after = adapter_state_dict(bb.model)
    losses = [s["loss"] for s in steps]
    scales = [scale0] + [s["scale"] for s in steps]
    drops = sum(b < a for a, b in zip(scales, scales[1:]))  # GradScaler halves its scale when it skips a step
    finite_losses = all(torch.isfinite(torch.tensor(losses)).tolist())
    finite_adapters = all(bool(torch.isfinite(v).all()) for v in after.values())
    moved = all(not torch.equal(before[k], after[k].detach()) for k in before if "lora_B" in k)
    ok = finite_losses and finite_adapters and moved and len(steps) == plan.train_steps and drops < len(steps) // 2
    return {"status": "pass" if ok else "fail", "precision": rt.precision, "model": plan.models[0],
            "classes": c, "batch": plan.batch, "steps": len(steps), "losses": [round(x, 5) for x in losses],
            "scaler_enabled": scaler_on, "scales": scales, "scale_drops": drops,
            "finite_losses": finite_losses, "finite_adapters": finite_adapters, "adapters_moved": moved,
            "median_step_s_with_data": round(statistics.median(s["step_s"] for s in steps[1:] or steps), 4)}


def first_step_grads(bb, rt, images, labels, names: list[str], init_scale: float = 2.0**16):
    """(loss, adapter gradients, finite) of one step as the training loop computes it (engine/fit.py: image and
    text features under autocast, logits = 100 * cos, cross-entropy), through a GradScaler enabled as the
    runtime's is (fp16 on CUDA), unscaled."""
    import torch
    import torch.nn.functional as F

    from blocklora.engine.evaluate import encode_classes

    params = [p for p in bb.model.parameters() if p.requires_grad]
    scaler = torch.amp.GradScaler(rt.device.type, init_scale=init_scale, enabled=rt.grad_scaler().is_enabled())
    opt = torch.optim.SGD(params, lr=0.0)  # unscale_ works on an optimizer's parameters; nothing is stepped
    torch.manual_seed(7)  # every dropout mask comes from a seed drawn here: the same masks in every precision
    with rt.autocast():
        img = F.normalize(bb.encode_images(images).float(), dim=-1)
        txt = encode_classes(bb, names, [TEMPLATE], rt)
        loss = F.cross_entropy(100.0 * img @ txt.T, labels)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    grads = torch.cat([p.grad.float().flatten() for p in params])
    opt.zero_grad(set_to_none=True)
    return float(loss), grads, bool(torch.isfinite(grads).all())


def first_step_section(plan, base) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from blocklora.adapters.inject import adapter_layers
    from blocklora.engine.runtime import make_runtime

    bb = adapted(base, plan.device, randomize=True)
    bb.model.eval()
    for _, layer in adapter_layers(bb.model):
        layer.train()  # as in training: frozen model in eval mode, adapter dropout on
    c = plan.classes[0]
    g = torch.Generator().manual_seed(3)
    images = torch.randn(plan.batch, 3, bb.image_size, bb.image_size, generator=g).to(plan.device)
    labels = torch.randint(0, c, (plan.batch,), generator=g).to(plan.device)
    names = classnames(c)
    with ieee_fp32():
        loss32, g32, _ = first_step_grads(bb, make_runtime(plan.device, "fp32"), images, labels, names)
    out: dict[str, Any] = {"model": plan.models[0], "batch": plan.batch, "classes": c, "fp32_loss": loss32,
                           "adapter_params": int(g32.numel()), "fp32_grad_norm": float(g32.norm())}
    ok = True
    for precision in ("fp16", "bf16"):
        if precision == "fp16" and plan.device != "cuda":
            out[precision] = {"status": "skipped", "note": "fp16 autocast runs on CUDA only"}
            continue
        rt, scale = make_runtime(plan.device, precision), 2.0**16
        loss, grads, finite = first_step_grads(bb, rt, images, labels, names, scale)
        while not finite and scale > 1:  # what GradScaler does over the next steps: halve the scale, try again
            scale /= 2
            loss, grads, finite = first_step_grads(bb, rt, images, labels, names, scale)
        tol_loss, tol_grad = TOLERANCES[precision]
        r_loss, r_grad = abs(loss - loss32) / abs(loss32), rel(grads, g32)
        passed = finite and r_loss <= tol_loss and r_grad <= tol_grad
        ok &= passed
        out[precision] = {"status": "pass" if passed else "fail", "loss": loss, "loss_rel_err": r_loss,
                          "grad_rel_err": r_grad, "grad_cosine": float(F.cosine_similarity(grads, g32, dim=0)),
                          "finite": finite, "loss_scale": scale if rt.grad_scaler().is_enabled() else None,
                          "tolerance": {"loss": tol_loss, "grad": tol_grad}}
    return {"status": "pass" if ok else "fail", **out}


def merge_section(plan, base) -> dict[str, Any]:
    import torch

    from blocklora.adapters.inject import merge, unmerge
    from blocklora.engine.runtime import make_runtime

    bb = adapted(base, plan.device, randomize=True)
    bb.model.eval()
    g = torch.Generator().manual_seed(4)
    images = torch.randn(plan.batch, 3, bb.image_size, bb.image_size, generator=g).to(plan.device)
    tokens = bb.tokenize([TEMPLATE.format(n) for n in classnames(plan.classes[0])]).to(plan.device)
    frozen = {k: v.detach().clone() for k, v in bb.model.state_dict().items() if "lora_" not in k}
    out: dict[str, Any] = {"model": plan.models[0]}
    ok = True
    for precision in ("fp32", plan.amp):
        rt = make_runtime(plan.device, precision)
        with torch.no_grad(), (ieee_fp32() if precision == "fp32" else contextlib.nullcontext()), rt.autocast():
            feats = [bb.encode_images(images), bb.encode_texts(tokens)]
            merge(bb.model)
            merged = [bb.encode_images(images), bb.encode_texts(tokens)]
            unmerge(bb.model)
        err = max(rel(m, f) for m, f in zip(merged, feats))
        passed = err <= MERGE_TOLERANCE[precision]
        ok &= passed
        out[precision] = {"status": "pass" if passed else "fail", "rel_err": err,
                          "tolerance": MERGE_TOLERANCE[precision]}
    state = bb.model.state_dict()
    restored = max(float((state[k].float() - v.float()).abs().max() / v.float().abs().max().clamp_min(1e-30))
                   for k, v in frozen.items() if v.is_floating_point())
    out["unmerge_max_rel_change"] = restored
    ok &= restored <= 1e-6
    return {"status": "pass" if ok else "fail", **out}


def deterministic_section(plan, left: Callable[[], float]) -> dict[str, Any]:
    """`blocklora train --deterministic` twice, at once, each in a fresh process (CUBLAS_WORKSPACE_CONFIG must be
    set before a process's first cuBLAS call, and blocklora must set it: it is removed from their environment):
    adapters bit-identical."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-det-") as tmp:
        work = Path(tmp)
        n_classes, shots = 10, 4
        for split, n in (("train", shots), ("test", 1)):
            for c in range(n_classes):
                folder = work / "data" / split / f"class{c:02d}"
                folder.mkdir(parents=True)
                for i in range(n):
                    NoiseImages(64)(f"{split}/{c}/{i}").save(folder / f"{i}.png")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), *filter(None, [
            os.environ.get("PYTHONPATH")])]), TQDM_DISABLE="1")
        env.pop("CUBLAS_WORKSPACE_CONFIG", None)
        if plan.device == "cpu":
            env["OMP_NUM_THREADS"] = "1"
        procs, t = {}, time.monotonic()
        for name in ("a", "b"):
            cmd = [sys.executable, "-m", "blocklora", "train", "--model", plan.models[0], "--pretrained", "none",
                   "--dataset", "folder", "--root", str(work / "data"), "--shots", str(shots), "--iters",
                   str(plan.det_iters), "--batch-size", str(plan.batch), "--precision", plan.amp, "--device",
                   plan.device, "--workers", str(min(plan.workers, 2)), "--no-zero-shot", "--deterministic",
                   "--output", str(work / name), "eval.limit=10"]
            procs[name] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        runs = []
        for proc in procs.values():
            try:
                _, err = proc.communicate(timeout=max(10.0, left() - 5))
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            runs.append({"rc": proc.returncode, "wall_s": round(time.monotonic() - t, 1),
                         "stderr_tail": err[-1500:] if proc.returncode else ""})
        if any(r["rc"] for r in runs):
            return {"status": "fail", "runs": runs, "note": "a run failed (see its stderr_tail)"}
        a, b = (load_adapter_tensors(work / n) for n in ("a", "b"))
        from blocklora.engine.rundir import RunDir

        losses = [[json.loads(x)["loss"] for x in RunDir(work / n).metrics.read_text().splitlines()]
                  for n in ("a", "b")]
    import torch

    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    diff = max((float((a[k].float() - b[k].float()).abs().max()) for k in a if k in b), default=0.0)
    return {"status": "pass" if same else "fail", "bit_identical": same, "tensors": len(a), "max_abs_diff": diff,
            "losses": losses, "runs": runs, "model": plan.models[0], "precision": plan.amp, "iters": plan.det_iters}


def load_adapter_tensors(run_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    from blocklora.adapters.io import WEIGHTS_FILE
    from blocklora.engine.rundir import RunDir

    return load_file(str(RunDir(run_dir).adapter / WEIGHTS_FILE))

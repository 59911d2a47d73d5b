"""Gradient checkpointing (train.grad_checkpointing): the blocks really are recomputed, and the adapters' gradients
equal the plain run's, dropout included (checkpoint restores the RNG state, so the recomputation draws the same
masks)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from blocklora import AdapterConfig, inject
from blocklora.backbones import load_backbone
from blocklora.cli.main import main
from conftest import make_hf_dir, randomize_adapters
from gen_data import make_folder_dataset

TEXTS = ["a photo of a cat.", "a photo of a dog, a type of pet.", "a striped texture."]


def _backbone(kind: str, tmp_path):
    spec = "tiny-clip" if kind == "open_clip" else f"hf:{make_hf_dir(tmp_path / 'hf')}"
    b = load_backbone(spec)
    torch.manual_seed(0)
    inject(b.model, AdapterConfig(dropout=0.25, projections="qkvo"))
    randomize_adapters(b.model)
    return b


def _blocks(b) -> list[torch.nn.Module]:
    """The attention module of every block: called again when its block is recomputed (transformers re-runs the
    layer's forward, not its __call__, so hooks on the layer itself would not see the recomputation)."""
    m = b.model
    if b.family == "open_clip":
        return [blk.attn for blk in (*m.visual.transformer.resblocks, *m.transformer.resblocks)]
    return [layer.self_attn for layer in (*m.vision_model.encoder.layers, *m.text_model.encoder.layers)]


def _step(b, images, tokens) -> tuple[float, dict[str, torch.Tensor], int]:
    """One training forward + backward with dropout on; (loss, adapter grads, block forward calls)."""
    calls = [0]
    # a pre-hook: the recomputation stops as soon as it has what backward needs, so a forward hook would not fire
    hooks = [blk.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for blk in _blocks(b)]
    b.model.train()
    b.model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # the dropout masks
    img = F.normalize(b.encode_images(images), dim=-1)
    txt = F.normalize(b.encode_texts(tokens), dim=-1)
    loss = F.cross_entropy(100 * img @ txt.T, torch.tensor([0, 1, 2]))
    loss.backward()
    loss = loss.detach()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.clone() for n, p in b.model.named_parameters() if p.requires_grad}
    return loss.item(), grads, calls[0]


@pytest.mark.parametrize("kind", ["open_clip", "transformers"])
def test_checkpointed_gradients_equal_the_plain_ones(kind, tmp_path):
    b = _backbone(kind, tmp_path)
    images = torch.randn(3, 3, b.image_size, b.image_size, generator=torch.Generator().manual_seed(0))
    tokens = b.tokenize(TEXTS)
    loss0, grads0, calls0 = _step(b, images, tokens)
    b.set_grad_checkpointing(True)
    loss1, grads1, calls1 = _step(b, images, tokens)
    n_blocks = len(_blocks(b))
    assert calls0 == n_blocks and calls1 == 2 * n_blocks  # every block ran again in backward
    assert loss1 == loss0
    assert grads1.keys() == grads0.keys() and len(grads0) > 0
    for name in grads0:
        assert grads0[name].abs().sum() > 0, name  # dropout and all, the adapters learn
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-7, msg=name)
    b.set_grad_checkpointing(False)
    assert _step(b, images, tokens)[2] == n_blocks


def test_train_with_grad_checkpointing_reaches_the_same_adapter(tmp_path):
    root = make_folder_dataset(tmp_path / "d", n_classes=3, train_per_class=4, test_per_class=2)
    adapters = []
    for name, extra in (("plain", []), ("ckpt", ["--grad-checkpointing"])):
        out = tmp_path / name
        assert main(["train", "--model", "tiny-clip", "--pretrained", "none", "--dataset", "folder", "--root",
                     str(root), "--shots", "2", "--iters", "6", "--batch-size", "4", "--lr", "1e-2", "--workers", "0",
                     "--no-zero-shot", "--output", str(out), *extra]) == 0
        adapters.append(load_file(out / "adapter" / "blocklora_adapter.safetensors"))
    plain, ckpt = adapters
    assert plain.keys() == ckpt.keys()
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-4, atol=1e-6, msg=k)

"""Shared fixtures: tiny random CLIP models of both families (no download), seeded."""

from __future__ import annotations

import os

import pytest
import torch

from families import make_clip


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """The suite never reads or writes the user's ~/.cache/blocklora (nor another checkout's): one cache per session,
    inherited by the CLI subprocesses the tests start."""
    old = os.environ.get("BLOCKLORA_CACHE")
    os.environ["BLOCKLORA_CACHE"] = str(tmp_path_factory.mktemp("blocklora-cache"))
    yield
    if old is None:
        os.environ.pop("BLOCKLORA_CACHE", None)
    else:
        os.environ["BLOCKLORA_CACHE"] = old


def make_openclip(seed: int = 0, batch_first: bool = True, quick_gelu: bool = False):
    return make_clip(seed, batch_first, quick_gelu, vocab=512)


def make_hf(seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_hidden_layers=3,
                         vocab_size=512, max_position_embeddings=16),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=3,
                           image_size=32, patch_size=8),
        projection_dim=32,
    )
    return CLIPModel(cfg).eval()


@pytest.fixture
def openclip_model():
    return make_openclip()


@pytest.fixture
def hf_model():
    return make_hf()


def randomize_adapters(model, seed: int = 1, std: float = 0.05) -> None:
    """Give B (zero at init) random values so adapters change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name or name.startswith("lora_"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def example_inputs(seed: int = 0, n_img: int = 3, n_txt: int = 4, ctx: int = 16, vocab: int = 512):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n_img, 3, 32, 32, generator=g)
    tokens = torch.randint(1, vocab - 1, (n_txt, ctx), generator=g)
    # end-of-text = the largest id (open_clip pools at argmax), at varied positions, zeros after it
    for i in range(n_txt):
        eot = 3 + i
        tokens[i, eot] = vocab - 1
        tokens[i, eot + 1:] = 0
    return images, tokens


def make_hf_dir(path, seed: int = 0):
    """A tiny transformers CLIP saved as a local directory with a real CLIP BPE tokenizer (from open_clip's vocab)."""
    import json
    from pathlib import Path

    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = SimpleTokenizer()
    renames = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    (path / "vocab.json").write_text(json.dumps({renames.get(k, k): v for k, v in tok.encoder.items()}))
    merges = sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m, _ in merges) + "\n")
    CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt")).save_pretrained(path)
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_hidden_layers=2,
                         vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=32,
    )
    CLIPModel(cfg).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and a shared CI core is not fought over): set, then restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hf_features(model):
    """(image, text) features of a transformers dual encoder on example_inputs() (transformers 5.x returns output
    objects with .pooler_output, 4.x tensors)."""
    images, tokens = example_inputs()
    with torch.no_grad():
        img = model.get_image_features(pixel_values=images)
        txt = model.get_text_features(input_ids=tokens)
    return getattr(img, "pooler_output", img), getattr(txt, "pooler_output", txt)

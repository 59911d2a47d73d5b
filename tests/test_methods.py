"""The few-shot baselines of methods/ (probe, Tip-Adapter, Tip-Adapter-F, CoOp): their formulas against an independent
reading of each paper, learning on real data, save / load round trips through the CLI, a sweep over two of them."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

from blocklora.cli.main import main
from blocklora.config.run_config import BaselineConfig
from blocklora.errors import BlockLoRAError, ConfigError
from blocklora.methods import coop, probe, tip_adapter
from blocklora.methods.base import FitData
from data_trees import make_zhou

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one thread is fastest on a shared machine
TINY = ["--model", "tiny-clip", "--pretrained", "none", "--workers", "0", "--device", "cpu"]


def _data(train, labels, text, val=None, val_labels=None, views=None, **cfg) -> FitData:
    val = train if val is None else val
    val_labels = labels if val_labels is None else val_labels
    return FitData(train, labels, views, val, val_labels, text, 100.0, [f"c{i}" for i in range(text.shape[0])],
                   "a photo of a {}.", BaselineConfig(**cfg), 1, 1)


# -- Tip-Adapter: exp(-beta (1 - cos)) on hand-made features ----------------------------------------------------------
def test_tip_adapter_logits_are_the_papers_formula_on_hand_made_features():
    s = 1 / math.sqrt(2)
    f = torch.tensor([[1.0, 0.0], [s, s]])  # two test features (unit norm)
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])  # three cached shots
    values = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # their classes: 0, 1, 1
    text = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    head = tip_adapter.TipAdapterHead(keys, values, text, 100.0, ["a", "b"], alpha=2.0, beta=3.0)
    got = head.logits(f)
    # by hand: cos(f0, keys) = 1, 0, 0.6; cos(f1, keys) = s, s, 1.4 s
    a0 = [1.0, math.exp(-3.0), math.exp(-3.0 * 0.4)]
    a1 = [math.exp(-3.0 * (1 - s)), math.exp(-3.0 * (1 - s)), math.exp(-3.0 * (1 - 1.4 * s))]
    want = torch.tensor([[100 * 0.8 + 2 * a0[0], 100 * 0.0 + 2 * (a0[1] + a0[2])],
                         [100 * (0.8 * s + 0.6 * s) + 2 * a1[0], 100 * s + 2 * (a1[1] + a1[2])]])
    torch.testing.assert_close(got, want)
    betas, alphas = tip_adapter.search_grid()  # configs/imagenet.yaml: search_scale [7, 3], search_step [200, 20]
    assert (len(betas), len(alphas)) == (200, 20)
    assert betas[0] == pytest.approx(0.1) and betas[-1] == pytest.approx(0.1 + 199 * 6.9 / 200)
    assert alphas[-1] == pytest.approx(0.1 + 19 * 2.9 / 20)


def test_tip_adapter_cache_keys_are_the_normalised_mean_of_the_raw_views_and_search_picks_val_best():
    views = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[0.0, 2.0], [0.0, 3.0]]])  # (V=2, N=2, D=2), raw
    labels = torch.tensor([0, 1])
    text = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # zero-shot gets both wrong
    data = _data(F.normalize(views.mean(0), dim=-1), labels, text, views=views)
    head = tip_adapter.TipAdapterHead.build(data)
    torch.testing.assert_close(head.keys, F.normalize(torch.tensor([[1.0, 1.0], [0.0, 2.0]]), dim=-1))
    torch.testing.assert_close(head.values, torch.eye(2))
    # zero-shot ties on shot 0 (which the cache decides for class 0, its own key) and is 100 logits wrong on shot 1
    # (no alpha <= 3 overturns that): every grid point reaches 50%, and the search keeps the first, Tip's order
    head.fit(data)
    betas, alphas = tip_adapter.search_grid()
    assert (head.alpha, head.beta) == (alphas[0], betas[0])
    assert (head.logits(data.val).argmax(-1) == labels).tolist() == [True, False]


# -- which config keys each method reads (methods.registry.reads) -----------------------------------------------------
def test_reads_says_which_keys_each_method_reads():
    from blocklora.methods.registry import METHODS, reads

    for key in ("model", "data.shots", "eval.split", "train.template", "adapter.method"):  # every run's
        assert all(reads(m, key) for m in METHODS), key
    for m in ("block_lora", "lora"):
        assert reads(m, "adapter.n_blocks") and reads(m, "train.lr") and not reads(m, "baseline.n_ctx")
    # LoRA is n_blocks = 1: the fold of one chunk and A's fan-in do not depend on fold or a_init
    from blocklora.adapters.core import fold_factor, init_factors

    assert reads("block_lora", "adapter.fold") and not reads("lora", "adapter.fold") and not reads("lora",
                                                                                                   "adapter.a_init")
    assert fold_factor(1, "sum") == fold_factor(1, "mean")
    inits = []
    for a_init in ("kaiming", "kaiming_full"):
        torch.manual_seed(0)
        a, b = torch.empty(2, 16), torch.empty(8, 2)
        init_factors(a, b, 1, a_init)
        inits.append(a)
    torch.testing.assert_close(inits[0], inits[1], rtol=0, atol=0)
    assert not any(reads("tip_adapter", k) for k in ("adapter.n_blocks", "adapter.r", "train.lr", "train.iters",
                                                      "baseline.method_lr", "baseline.epochs", "baseline.n_ctx"))
    assert reads("tip_adapter", "baseline.search") and reads("tip_adapter", "baseline.views")
    assert reads("tip_adapter_f", "baseline.method_lr") and reads("tip_adapter_f", "baseline.epochs")
    assert reads("probe", "baseline.search") and not reads("probe", "train.lr") and not reads("probe", "baseline.views")
    assert reads("coop", "baseline.n_ctx") and reads("coop", "baseline.ctx_init") and reads("coop", "baseline.views")
    assert not reads("coop", "adapter.n_blocks") and not reads("coop", "baseline.search")
    assert [m for m, r in METHODS.items() if r.searches] == ["probe", "tip_adapter", "tip_adapter_f"]
    assert reads("a_later_method", "train.lr")  # a results.json of another version: nothing hidden


def test_a_heads_fit_ignores_the_baseline_keys_its_method_does_not_read():
    """The record's keys are what fit() reads: changing every other baseline.* key gives the same head, exactly."""
    from blocklora.methods.registry import reads

    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    views = torch.randn(2, 6, 8, generator=g)
    train, labels = F.normalize(views.mean(0), dim=-1), torch.arange(6) % 3
    other = {"baseline.n_ctx": 4, "baseline.ctx_init": "a photo", "baseline.method_lr": 0.5, "baseline.epochs": 3,
             "baseline.views": 7, "baseline.search": False}
    for method, build in (("probe", lambda d: probe.ProbeHead(d.text, d.scale, d.classnames)),
                          ("tip_adapter", tip_adapter.TipAdapterHead.build),
                          ("tip_adapter_f", tip_adapter.TipAdapterFHead.build)):
        changed = {k.partition(".")[2]: v for k, v in other.items() if not reads(method, k)}
        assert changed, method
        heads = []
        for cfg in ({}, changed):
            torch.manual_seed(0)
            data = FitData(train, labels, views, train, labels, text, 100.0, ["a", "b", "c"], "a photo of a {}.",
                           BaselineConfig(**{"epochs": 2, **cfg}), 2, 1)
            head = build(data)
            head.fit(data)
            heads.append(head.tensors())
        for name in heads[0]:
            torch.testing.assert_close(heads[0][name], heads[1][name], rtol=0, atol=0, msg=f"{method} {name}")


# -- probe: zero-shot init, lpclip's objective ------------------------------------------------------------------------
def test_probe_starts_as_the_zero_shot_classifier_and_a_strong_pull_keeps_it():
    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    feats = F.normalize(torch.randn(12, 8, generator=g), dim=-1)
    head = probe.ProbeHead(text, 100.0, ["a", "b", "c"])
    torch.testing.assert_close(head.logits(feats), 100.0 * feats @ text.T)  # exactly the zero-shot logits
    labels = torch.arange(12) % 3
    w, b = probe.fit_weights(feats, labels, 100.0 * text, c_reg=1e-9)  # |W - W0|^2 weighted 1e9 / 24: stays
    torch.testing.assert_close(w, 100.0 * text, atol=1e-3, rtol=0)
    w, b = probe.fit_weights(feats, labels, torch.zeros_like(text), c_reg=1e6)  # nearly unregularised: fits
    assert ((feats @ w.T + b).argmax(-1) == labels).all()


# -- CoOp: the prompt embedding layout and the EOT position after truncation ------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip():
    from blocklora.backbones import load_backbone

    torch.manual_seed(0)
    return load_backbone("tiny-clip", None, text=True)


def test_coop_prompt_layout_and_text_features_match_coops_text_encoder_at_the_full_context(tiny_clip):
    m = tiny_clip.model
    torch.manual_seed(0)
    names = ["cat", "very " * 56 + "long dog"]  # 16 + 59 tokens: the second fills the 77-token context
    head = coop.CoOpHead(tiny_clip, names, 100.0, n_ctx=16)
    assert head.start == 1 and tuple(head.ctx.shape) == (16, 64)
    assert abs(float(head.ctx.detach().std()) - coop.INIT_STD) < 0.006  # N(0, 0.02^2)
    ids = tiny_clip.tokenize(coop.prompt_texts(names, " ".join(["X"] * 16)))
    assert ids.shape[1] == 77 and int(ids[1].argmax()) == 76  # EOT is the last of 77 tokens
    emb = head.prompt_embeddings(names)
    with torch.no_grad():
        plain = m.token_embedding(ids)
        torch.testing.assert_close(emb[:, :1], plain[:, :1])  # SOT
        torch.testing.assert_close(emb[:, 1:17], head.ctx.expand(2, -1, -1))  # the learned context
        torch.testing.assert_close(emb[:, 17:], plain[:, 17:])  # class name, ".", EOT, padding
        # CoOp's TextEncoder (trainers/coop.py), written out: x + pos, transformer, ln_final, x[EOT] @ proj
        x = emb + m.positional_embedding
        x = m.transformer(x, attn_mask=m.attn_mask)
        x = m.ln_final(x)
        want = x[torch.arange(2), ids.argmax(dim=-1)] @ m.text_projection
        torch.testing.assert_close(head.text_features(), F.normalize(want, dim=-1), atol=1e-5, rtol=1e-4)


def test_coop_ctx_init_takes_the_words_token_embeddings(tiny_clip):
    head = coop.CoOpHead(tiny_clip, ["cat", "dog"], 100.0, n_ctx=16, ctx_init="a photo of a")
    assert head.n_ctx == 4  # CoOp: n_ctx = the init's words
    ids = tiny_clip.tokenize(["a photo of a"])[0, 1:5]
    with torch.no_grad():
        torch.testing.assert_close(head.ctx, tiny_clip.model.token_embedding(ids))
    emb = head.prompt_embeddings(["cat"])
    with torch.no_grad():  # the init words in place: the prompt embeds as "a photo of a cat." itself
        torch.testing.assert_close(emb, tiny_clip.model.token_embedding(tiny_clip.tokenize(["a photo of a cat."])))


def test_coop_refuses_a_context_that_leaves_no_room_for_the_class_names(tiny_clip):
    # tiny-clip's context is 77 tokens, 75 besides SOT and EOT: CoOp's clip.tokenize raises on a longer prompt; cut,
    # the class name (and with CLIP's argmax pooling, where the feature is read) would go
    for n_ctx in (75, 100):
        with pytest.raises(ConfigError, match=rf"baseline.n_ctx={n_ctx} context tokens do not fit in tiny-clip's "
                                              r"text context \(at most 75 tokens"):
            coop.CoOpHead(tiny_clip, ["cat", "dog"], 100.0, n_ctx=n_ctx)
    head = coop.CoOpHead(tiny_clip, ["cat", "sea lion"], 100.0, n_ctx=73)  # "cat." fits in 2 tokens, "sea lion." not
    with pytest.raises(ConfigError, match="prompt for the class 'sea lion' does not fit in tiny-clip's text context: "
                                          "the name takes 3 tokens and 2 are left beside the 73 context tokens"):
        head.text_features()
    assert coop.CoOpHead(tiny_clip, ["cat", "sea lion"], 100.0, n_ctx=72).text_features().shape == (2, 64)
    with pytest.raises(ConfigError, match="does not fit"):  # another class list, as eval on another dataset asks
        head.for_classes(["cat", "very " * 80 + "long dog"])
    # a ctx_init of no words, or of characters the tokenizer drops, would be a context of 0 vectors
    for init, why in (("_", "has no words"), ("  ", "has no words"), ("\x07\x00", "gives no tokens")):
        with pytest.raises(ConfigError, match=f"baseline.ctx_init .* {why}"):
            coop.CoOpHead(tiny_clip, ["cat"], 100.0, n_ctx=16, ctx_init=init)


@pytest.mark.parametrize("family", ["open_clip", "transformers", "effnet-minilm"])
def test_coop_context_equal_to_the_placeholders_embeddings_gives_the_stock_text_features(tiny_clip, tmp_path, family):
    # Where the context goes, in every text tower: with the context set to the embedding of its placeholder token
    # ("X"), the hooked tower must return exactly the stock tower's features of the tokenized "X X ... X name.".
    # One position off (or a tower that pooled elsewhere after truncation) would change them.
    if family == "open_clip":
        backbone = tiny_clip
    elif family == "transformers":
        from blocklora.backbones import load_backbone
        from conftest import make_hf_dir

        backbone = load_backbone(f"hf:{make_hf_dir(tmp_path / 'hf')}", "auto", text=True)
    else:
        from families import effnet_backbone

        try:
            backbone = effnet_backbone()
        except BlockLoRAError as e:
            pytest.skip(str(e))
    names = ["cat", "very " * (coop.text_room(backbone) - 4 - 3) + "long dog"]  # fills the tower's context
    head = coop.CoOpHead(backbone, names, 100.0, n_ctx=4)
    tokens = head.tokens(names)
    ids = coop.ids_of(tokens)
    x_id = coop.ids_of(backbone.tokenize(["X"]))[0, head.start]
    assert (ids[:, head.start:head.start + 4] == x_id).all()  # the placeholders sit where the context goes
    with torch.no_grad():
        head.ctx.copy_(head.embedding.weight[x_id].expand(4, -1))
        torch.testing.assert_close(head.text_features(), F.normalize(backbone.encode_texts(tokens).float(), dim=-1))
        head.ctx.add_(1.0)  # and the context is what the tower reads
        assert not torch.allclose(head.text_features(), F.normalize(backbone.encode_texts(tokens).float(), dim=-1))


# -- learning on real data: every baseline beats zero-shot at K = 4 ---------------------------------------------------
def test_every_baseline_beats_zero_shot_on_fashion_mnist_at_4_shots():
    from blocklora.data import evenly_spaced, fashion_mnist, sample_few_shot
    from blocklora.engine.runtime import make_runtime
    from blocklora.methods import features
    from blocklora.methods.fit import build
    from families import effnet_backbone

    try:
        backbone, data = effnet_backbone(), fashion_mnist.load()
    except BlockLoRAError as e:
        pytest.skip(str(e))
    rt = make_runtime("cpu")
    shots = sample_few_shot(data, 4, 1)
    test = evenly_spaced(data.test, 100)
    read = data.image_reader
    train, val, tst = (features.plain(backbone, items, read, rt) for items in (shots.train, shots.val, test))
    views = features.views(backbone, shots.train, read, rt, 1, 1)
    labels, val_labels, test_labels = (torch.tensor([i.label for i in items]) for items in (shots.train, shots.val,
                                                                                                 test))
    with torch.no_grad():
        text = F.normalize(backbone.encode_prompts([data.template.format(c) for c in data.classnames]), dim=-1)
    zero_shot = float(((tst @ text.T).argmax(-1) == test_labels).float().mean())
    for method, cfg in (("probe", {}), ("tip_adapter", {}), ("tip_adapter_f", {}), ("coop", {"epochs": 20})):
        torch.manual_seed(1)
        fit = FitData(train, labels, views, val, val_labels, text, 100.0, list(data.classnames), data.template,
                      BaselineConfig(views=1, **cfg), 4, 1, backbone)
        head = build(method, fit)
        head.fit(fit)
        acc = float((head.logits(tst).argmax(-1) == test_labels).float().mean())
        assert acc > zero_shot + (0.0 if method == "tip_adapter" else 0.05), (method, acc, zero_shot)


# -- through the CLI: train, eval, predict, export, params, sweep + summarize -----------------------------------------
@pytest.fixture(scope="module")
def zhou(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_zhou(root, "dtd")
    return root


@pytest.mark.parametrize("method", ["probe", "tip_adapter_f", "coop"])
def test_train_saves_the_head_and_eval_predict_export_reload_it(zhou, tmp_path, capsys, method):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "dtd", "--root", str(zhou), "--shots", "2", "--output", str(out), *TINY,
                 "--method", method, "baseline.views=1", "baseline.epochs=2"]) == 0
    r = json.loads((out / "results.json").read_text())
    meta = json.loads((out / "adapter" / "blocklora_adapter.json").read_text())
    assert meta["config"]["method"] == method and meta["head"]["method"] == method
    assert meta["backbone"]["fingerprint"] == r["backbone"]["fingerprint"]
    assert meta["trainable_params"] == r["trainable_params"] > 0
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out), "--dataset", "dtd", "--root", str(zhou), "--device", "cpu",
                 "--workers", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == r["top1"]  # the reloaded head scores as trained
    image = next((zhou).rglob("*.jpg"))
    assert main(["predict", "--adapter", str(out), str(image), "--device", "cpu", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sum(t["prob"] for t in rows[0]["top"]) <= 1.0 + 1e-5 and rows[0]["probabilities"] == "softmax"
    assert main(["export", "--adapter", str(out), "--output", str(tmp_path / "merged.safetensors")]) == 0
    said = capsys.readouterr().out
    assert f"{method} does not merge into the encoders" in said and "merged checkpoint" not in said
    assert main(["export", "--adapter", str(out), "--output", str(tmp_path / "peft"), "--format", "peft"]) == 2
    assert "not a LoRA adapter" in capsys.readouterr().err


def test_a_damaged_head_is_one_error_line(zhou, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "dtd", "--root", str(zhou), "--shots", "1", "--output", str(out), *TINY,
                 "--method", "tip_adapter", "baseline.views=1"]) == 0
    from safetensors.torch import load_file, save_file

    weights = out / "adapter" / "blocklora_adapter.safetensors"
    tensors = load_file(weights)
    for damage in ({"tip.values": tensors["tip.values"][:, :2]},
                   # another feature width (another model's head): refused at load, not a matmul error at eval
                   {"tip.keys": tensors["tip.keys"][:, :32], "tip.text": tensors["tip.text"][:, :32]}):
        save_file({**tensors, **{k: v.contiguous() for k, v in damage.items()}}, weights)
        capsys.readouterr()
        assert main(["eval", "--adapter", str(out), "--dataset", "dtd", "--root", str(zhou), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and "does not fit" in err and "Traceback" not in err
    assert "image features of width 64" in err


def test_a_baselines_model_card_describes_the_baseline(zhou, tmp_path, capsys):
    """The export's README.md of a tip_adapter run: what it trains and its parameters, that it does not merge; no
    adapter shape (r, projections, towers) it never had, even with an ignored --n-blocks."""
    out = tmp_path / "run"
    assert main(["train", "--dataset", "dtd", "--root", str(zhou), "--shots", "1", "--output", str(out), *TINY,
                 "--method", "tip_adapter", "baseline.views=1", "--n-blocks", "4"]) == 0
    assert main(["export", "--adapter", str(out), "--output", str(tmp_path / "export")]) == 0
    card = (tmp_path / "export" / "README.md").read_text()
    assert card.startswith("# tiny-clip with a tip_adapter baseline from blocklora (frozen encoders)")
    assert "- method: tip_adapter, a baseline on the frozen encoders (Tip-Adapter, Zhang et al. 2022" in card
    assert "trains nothing (a cache of the K-shot features" in card and "- trainable parameters: 0" in card
    assert "does not merge into them" in card and "nothing of it merges into the encoder weights" in card
    for wrong in ("r = ", "n_blocks", "projections", "tower(s)", "adapter merged", "Block-LoRA"):
        assert wrong not in card, wrong


def test_probe_and_tip_adapter_refuse_other_classes(zhou, tmp_path, capsys):
    assert main(["train", "--dataset", "dtd", "--root", str(zhou), "--shots", "1", "--output", str(tmp_path / "r"),
                 *TINY, "--method", "probe", "data.classes=base"]) == 2
    assert "base-to-new" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_params_reports_each_baselines_size_and_step_cost(capsys):
    for method, params in (("probe", 10 * 64 + 10), ("tip_adapter", 0), ("tip_adapter_f", 40 * 64),
                           ("coop", 16 * 64)):
        assert main(["params", "--model", "tiny-clip", "--method", method, "--num-classes", "10", "--shots", "4",
                     "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert (report["method"], report["trainable_params"], report["merges"]) == (method, params, False)
        assert report["step_macs"] >= 0 and report["dims"]["feature_dim"] == 64
    # an adapter option the baseline never reads: the same count, and one warning line naming it
    assert main(["params", "--model", "tiny-clip", "--method", "probe", "--num-classes", "10", "--shots", "4",
                 "--r", "8", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["trainable_params"] == 10 * 64 + 10
    assert captured.err.startswith("warning: method probe does not read --r (") and len(captured.err.splitlines()) == 1


def test_sweep_over_two_baselines_then_summarize_keeps_them_apart(zhou, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", "--datasets", "dtd", "--shots", "1", "--seeds", "1", "--root", str(zhou), "--output", str(out),
            "--devices", "cpu:2", *TINY, "--methods", "probe,tip_adapter", "baseline.views=1"]
    assert main(args) == 0
    assert "2 cells: 2 done" in capsys.readouterr().out
    for method in ("probe", "tip_adapter"):
        r = json.loads((out / f"method={method}" / "dtd" / "shots1" / "seed1" / "results.json").read_text())
        assert r["config"]["adapter"]["method"] == method
    assert main(["summarize", str(out)]) == 0
    md = capsys.readouterr().out
    assert "2 runs of 2 configurations" in md
    rows = [line.split(" | ")[0].strip("| ") for line in md.split("## 1 shot")[1].split("###")[0].splitlines()
            if line.startswith("| ") and "---" not in line]
    assert rows == ["method", "zero-shot", "probe", "tip_adapter"]  # one row per method, never pooled


# -- faults: damaged records, other classes, non-finite scores, divergence, contexts that cannot be -------------------
def _one_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(zhou, tmp_path_factory):
    """One small run of each kind of head record (probe, Tip-Adapter, CoOp)."""
    root = tmp_path_factory.mktemp("heads")
    for method in ("probe", "tip_adapter", "coop"):
        assert main(["train", "--dataset", "dtd", "--root", str(zhou), "--shots", "1", "--output",
                     str(root / method), *TINY, "--method", method, "baseline.views=1", "baseline.epochs=1"]) == 0
    return root


def test_every_heads_record_declaration_names_the_tensors_the_registry_says_it_saves():
    from blocklora.methods import METHODS

    for name, rec in METHODS.items():
        if not rec.is_adapter:
            assert tuple(sorted(rec.head_class().record_shapes)) == rec.saves, name


@pytest.mark.parametrize(("method", "tensors", "head", "needles"), [
    ("coop", lambda t: {"coop.ctx": t["coop.ctx"][:, :32]}, None,
     ("blocklora_adapter.safetensors: coop.ctx has shape (16, 32)", "(n_ctx, token_width)", "text tower of width 64")),
    ("coop", lambda t: {"coop.ctx": t["coop.ctx"][:4]}, None, ("coop.ctx has shape (4, 64)", "head.n_ctx 16")),
    ("coop", lambda t: {"coop.ctx": t["coop.ctx"].half()}, {"n_ctx": 0}, ("blocklora_adapter.json: head.n_ctx must",)),
    ("coop", None, {"ctx_init": 7}, ("blocklora_adapter.json: head.ctx_init must be a string",)),
    ("coop", None, {"class_token_position": "middle"}, ("unknown class_token_position 'middle' for head",)),
    ("coop", lambda t: {"coop.ctx": torch.full_like(t["coop.ctx"], math.inf)}, None, ("coop.ctx holds NaN",)),
    ("probe", lambda t: {"probe.weight": t["probe.weight"].T.contiguous()}, None,
     ("probe.weight has shape (64, 3)", "(classes, feature_dim) for 3 classes, image features of width 64")),
    ("probe", lambda t: {"probe.weight": t["probe.weight"].long()}, None,
     ("blocklora_adapter.safetensors: probe.weight holds int64 values", "floating-point")),
    ("probe", None, {"C": -1.0}, ("blocklora_adapter.json: head.C must be a finite number > 0, got -1.0",)),
    ("tip_adapter", lambda t: {"tip.values": t["tip.values"][:-1].contiguous()}, None,
     ("tip.values has shape (2, 3), which does not fit (shots, classes) for shots 3 as in tip.keys, 3 classes",)),
    ("tip_adapter", lambda t: {"tip.keys": t["tip.keys"].to(torch.int32)}, None, ("tip.keys holds int32 values",)),
    ("tip_adapter", lambda t: {"tip.values": t["tip.values"] * 5}, None,
     ("tip.values row 0 is not a one-hot label",)),
    ("tip_adapter", None, {"alpha": -0.5}, ("blocklora_adapter.json: head.alpha must be a finite number >= 0",)),
    ("tip_adapter", None, {"beta": "1"}, ("head.beta must be a finite number", "got '1'")),
    # finite but overflowing: the head's logits are infinite, so no accuracy can be reported
    ("probe", lambda t: {"probe.bias": torch.full_like(t["probe.bias"], 3.4e38),
                         "probe.weight": torch.cat([t["probe.weight"][:1] * 0 + 3e38, t["probe.weight"][1:2] * 0 - 3e38,
                                                    t["probe.weight"][2:]])}, None,
     ("non-finite scores (NaN or infinite) for",)),
])
def test_a_damaged_or_hand_edited_head_record_is_one_error_line_naming_file_and_field(zhou, trained, tmp_path, capsys,
                                                                                       method, tensors, head, needles):
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(trained / method, run)
    adapter = run / "adapter"
    if tensors:
        saved = load_file(adapter / "blocklora_adapter.safetensors")
        save_file({k: v.contiguous() for k, v in {**saved, **tensors(saved)}.items()},
                  adapter / "blocklora_adapter.safetensors")
    if head:
        meta = json.loads((adapter / "blocklora_adapter.json").read_text())
        meta["head"].update(head)
        (adapter / "blocklora_adapter.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["eval", "--adapter", str(run), "--device", "cpu", "--workers", "0", "--output",
                 str(tmp_path / "out")]) == 2
    _one_error(capsys, *needles)
    assert not (tmp_path / "out").exists()
    if "non-finite" in needles[0]:  # predict refuses them too, rather than ranking classes by NaN
        assert main(["predict", "--adapter", str(run), "--device", "cpu", str(next(zhou.rglob("*.jpg")))]) == 2
        _one_error(capsys, "non-finite scores")


def test_a_head_of_other_classes_is_refused_before_any_image_is_read(trained, tmp_path, capsys):
    # two of the three classes, and every test image unreadable: the class check must come first
    other = make_zhou(tmp_path, "dtd", classes=["golden_retriever", "abbey"])
    for image in other["image_dir"].rglob("test_*.jpg"):
        image.write_bytes(b"not an image")
    for method in ("probe", "tip_adapter"):
        assert main(["eval", "--adapter", str(trained / method), "--dataset", "dtd", "--root", str(tmp_path),
                     "--device", "cpu", "--workers", "0"]) == 2
        _one_error(capsys, f"a {method} head has one row per trained class (3)", "(2 given)")


def test_coop_contexts_that_cannot_be_are_refused_before_any_image_is_read(zhou, tmp_path, capsys):
    for override, needles in (("baseline.ctx_init=_", ("baseline.ctx_init '_' has no words",)),
                              ("baseline.ctx_init=\x07", ("gives no tokens with tiny-clip's tokenizer",)),
                              # "Sea or Lake." is 4 tokens: 72 context tokens leave 3 of the 75
                              ("baseline.n_ctx=72", ("prompt for the class 'Sea or Lake' does not fit",
                                                     "the name takes 4 tokens and 3 are left beside the 72 context "
                                                     "tokens (75 in all)"))):
        out = tmp_path / "run"
        assert main(["train", "--dataset", "dtd", "--root", str(zhou), "--shots", "1", "--output", str(out), *TINY,
                     "--method", "coop", "baseline.views=1", override]) == 2
        _one_error(capsys, *needles)
        assert not out.exists()


def test_params_of_coop_counts_the_ctx_init_tokens(capsys):
    assert main(["params", "--model", "tiny-clip", "--method", "coop", "--num-classes", "10", "--shots", "4",
                 "baseline.ctx_init=a_photo_of_a", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["trainable_params"] == 4 * 64 and report["dims"]["n_ctx"] == 4  # CoOp: n_ctx = the init's tokens
    assert main(["params", "--model", "tiny-clip", "--method", "coop", "baseline.ctx_init=_"]) == 2
    _one_error(capsys, "baseline.ctx_init '_' has no words")
    # an explicit n_ctx that is not the init's token count would be silently replaced by it: refused
    assert main(["params", "--model", "tiny-clip", "--method", "coop", "baseline.ctx_init=a_photo_of_a",
                 "baseline.n_ctx=2"]) == 2
    _one_error(capsys, "baseline.n_ctx=2 and baseline.ctx_init 'a_photo_of_a' (4 tokens", "leave baseline.n_ctx out")


def test_a_diverging_baseline_is_named_with_its_step_and_leaves_nothing(zhou, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "dtd", "--root", str(zhou), "--shots", "2", "--output", str(out), *TINY,
                 "--method", "tip_adapter_f", "baseline.views=1", "baseline.epochs=30",
                 "baseline.method_lr=10"]) == 2
    line = _one_error(capsys, "tip_adapter_f diverged: the ", "lower baseline.method_lr (now 10)")
    assert re.search(r"(the loss became nan|the trained tensors became non-finite) at step \d+:", line), line
    assert not out.exists()

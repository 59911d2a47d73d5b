"""`blocklora params` and the CLI's error contract."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from blocklora.cli.main import main


def test_params_vit_b16_figures(capsys):
    assert main(["params", "--model", "ViT-B-16", "--pretrained", "none", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["trainable_params"] == 103_680 and len(report["adapted_modules"]) == 24
    # fold adds once per attention input; A: r*d/n, B: r*d per projection
    assert report["macs_per_token"] == 12 * 3 * (2 * 768 // 8 + 2 * 768) + 12 * 3 * (2 * 512 // 8 + 2 * 512)
    assert report["adds_per_token"] == 12 * (768 - 96) + 12 * (512 - 64)
    assert main(["params", "--model", "ViT-B-16", "--method", "lora", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["trainable_params"] == 184_320 and report["adds_per_token"] == 0


@pytest.mark.parametrize(("n", "proj", "towers"),
                         [(4, "q,v", "vision,text"), (2, "q,k,v,o", "text"), (16, "k", "vision")])
def test_params_formula_other_configs(capsys, n, proj, towers):
    assert main(["params", "--model", "ViT-B-16", "--n-blocks", str(n), "--projections", proj, "--towers", towers,
                 "--r", "4", "--blocks", "up", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    widths = {"vision": 768, "text": 512}
    expected = sum(4 * len(proj.split(",")) * (4 * widths[t] // n + 4 * widths[t]) for t in towers.split(","))
    assert report["trainable_params"] == expected


def test_params_table(capsys):
    assert main(["params", "--model", "tiny-clip"]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "vision" in out and "text" in out


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blocklora", *args], capture_output=True, text=True)


@pytest.mark.parametrize(("args", "message"), [
    (("params", "--model", "tiny-clip", "--n-blocks", "5"), "n_blocks=5 does not divide"),
    (("params", "--model", "no-such-model"), "unknown model 'no-such-model'"),
    (("params", "--model", "tiny-clip", "--projections", "q,z"), "unknown projection 'z'"),
    (("params", "--model", "ViT-B-16", "--pretrained", "/nope/x.safetensors"), "/nope/x.safetensors does not exist"),
    (("params", "--bogus"), "unrecognized arguments"),
])
def test_user_errors_are_one_line_without_traceback(args, message):
    out = _cli(*args)
    assert out.returncode == 2
    lines = [line for line in out.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr

"""benchmarks/gpu_check.py in --dry-run (the same code as on the GPU, on the CPU at tiny sizes): it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
CONFIGS = {("open_clip", c) for c in ("floor", "block_lora", "lora", "dense_lora", "full")} | \
    {("transformers", c) for c in ("floor", "block_lora", "peft_lora")}


def run_check(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TQDM_DISABLE="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=900)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = run_check("--dry-run", "--output", str(out), "--budget-s", "850")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "gpu_check.json").read_text()), proc.stdout


@pytest.mark.slow
def test_dry_run_passes_every_check(dry_run):
    _, result, _ = dry_run
    sections = result["sections"]
    assert list(sections) == ["env", "train_amp", "first_step", "merge", "deterministic", "cost_tiny-clip",
                              "eval_tiny-clip", "projection"]
    assert {s["status"] for s in sections.values()} <= {"pass", "done"}, {n: s["status"] for n, s in sections.items()}
    train = sections["train_amp"]
    # bf16 autocast through the real loop; on the CPU the GradScaler is the disabled (no-op) one
    assert train["precision"] == "bf16" and train["scaler_enabled"] is False and train["scale_drops"] == 0
    assert train["steps"] == 3 and train["finite_adapters"] and train["adapters_moved"]
    first = sections["first_step"]
    assert first["fp16"]["status"] == "skipped" and first["bf16"]["status"] == "pass"
    assert 0 < first["bf16"]["grad_rel_err"] <= first["bf16"]["tolerance"]["grad"]
    assert sections["merge"]["fp32"]["rel_err"] <= 1e-5
    det = sections["deterministic"]
    assert det["bit_identical"] and det["max_abs_diff"] == 0 and det["tensors"] > 0
    assert det["losses"][0] == det["losses"][1]


@pytest.mark.slow
def test_dry_run_measures_every_configuration(dry_run):
    out, result, stdout = dry_run
    rows = result["sections"]["cost_tiny-clip"]["rows"]
    measured = {(r["family"], r["config"], r["classes"]) for r in rows if r["step_ms"] > 0 and r["finite"]}
    assert measured == {(f, c, n) for f, c in CONFIGS for n in (10, 20)}
    block = next(r for r in rows if r["family"] == "open_clip" and r["config"] == "block_lora")
    assert block["trainable"] == 1728 and block["time_x_floor"] > 0
    ev = result["sections"]["eval_tiny-clip"]
    assert min(ev["frozen"], ev["block_lora"], ev["block_lora_merged"]) > 0
    proj = result["sections"]["projection"]
    assert {r["config"] for r in proj["rows"]} == {"floor", "block_lora", "lora", "dense_lora", "full"}
    assert "not a projection" in proj["note"]
    table = (out / "gpu_check.md").read_text()
    assert table in stdout  # printed last: the device call's output tail shows it
    for heading in ("## Correctness", "## cost_tiny-clip", "## Evaluation throughput", "## ImageNet 16-shot"):
        assert heading in table
    assert "| `train --deterministic` twice (tiny-clip, bf16, 3 steps) | 24 adapter tensors" in table


def test_budget_skips_sections_and_still_writes_everything(tmp_path):
    proc = run_check("--dry-run", "--output", str(tmp_path), "--budget-s", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert all(s["status"] == "skipped" for s in sections.values())
    assert "budget left" in sections["train_amp"]["note"]
    assert "- cost_tiny-clip: skipped: needs about" in (tmp_path / "gpu_check.md").read_text()


def test_bad_arguments_fail_cleanly(tmp_path):
    out = tmp_path / "out"
    proc = run_check("--dry-run", "--output", str(out), "--sections", "env,speed")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: unknown section(s) speed: use env, train_amp, first_step, merge, deterministic, cost, eval, "
        "projection"]
    assert not out.exists()
    if not torch.cuda.is_available():
        proc = run_check("--output", str(out))
        assert proc.returncode == 2 and proc.stderr.startswith("error: no CUDA device here")
        assert not out.exists()

"""The module boundaries: no import cycle among blocklora's modules, and a method library that knows no model family.

The import graph is read from the source (every import statement, also those inside functions), so a cycle cannot
hide behind a lazy import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import blocklora

SRC = Path(blocklora.__file__).parent


def import_graph() -> dict[str, set[str]]:
    """module -> the blocklora modules it imports (a package stands for its __init__)."""
    modules: dict[str, tuple[Path, bool]] = {}
    for path in SRC.rglob("*.py"):
        parts = ["blocklora", *path.relative_to(SRC).with_suffix("").parts]
        package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if package else parts)] = (path, package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, package) in modules.items():
        here = name if package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    graph[name].add(target if target in modules else base)
        graph[name] &= set(modules)
        graph[name].discard(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_reader_sees_lazy_imports_and_cycles():
    graph = import_graph()
    assert "blocklora.adapters.fused" in graph["blocklora.adapters.inject"]
    assert "blocklora.backbones.openclip" in graph["blocklora.backbones"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_among_blocklora_modules():
    assert cycles(import_graph()) == []


def test_the_method_library_imports_no_model_family():
    """adapters/ depends only on itself and leaf utilities (errors, value checks and choices, file ownership and
    reading, the version): placement comes in through adapters.targeting (by name, or a family's Targeting)."""
    allowed = ("blocklora.adapters", "blocklora.errors", "blocklora._version", "blocklora.checks", "blocklora.choices",
               "blocklora.ownership", "blocklora.reading")
    for name, targets in import_graph().items():
        if name.startswith("blocklora.adapters"):
            assert all(t.startswith(allowed) for t in targets), (name, targets)


def test_adapters_work_with_no_backbone_module_loaded():
    """In a fresh process: the whole method library on a model no family knows (a Placement handed in, then the
    same adapters placed by name), a save / load round trip, a merge; and not one blocklora.backbones module (nor
    open_clip, timm) is ever imported."""
    code = """
import sys, tempfile, torch
torch.manual_seed(0)
from blocklora.adapters import config, core, fused, inject, io, layers, report, sites, targeting
from blocklora.adapters.config import AdapterConfig
from blocklora.adapters.sites import Placement, Site

class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.proj = torch.nn.Linear(16, 48), torch.nn.Linear(16, 16)
    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return x + self.proj(torch.softmax(q @ k.transpose(-1, -2), -1) @ v)

model = torch.nn.Sequential(Block(), Block()).eval()
children = (("q", "qkv"), ("k", "qkv"), ("v", "qkv"), ("o", "proj"))
placement = Placement("toy", {"text": tuple(Site("text", i, str(i), sites.LINEARS, children) for i in range(2))})
cfg = AdapterConfig(towers="text", projections="qkvo", n_blocks=4)
x = torch.randn(2, 3, 16)
inject.inject(model, cfg, placement, probe=lambda: model(x))
for p in model.parameters():
    if p.requires_grad:
        torch.nn.init.normal_(p, std=0.05)
with torch.no_grad():
    y = model(x)
folder = tempfile.mkdtemp()
io.save_adapter(model, folder + "/a", backbone={"name": "toy"})
fresh = torch.nn.Sequential(Block(), Block()).eval()
fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k}, strict=False)
assert io.load_adapter(fresh, folder + "/a", placement=placement) == cfg
with torch.no_grad():
    assert torch.equal(fresh(x), y)
inject.merge(model)
with torch.no_grad():
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
assert report.adapter_cost(model)["total"]["params"] == inject.count_trainable(model)
by_name = AdapterConfig(target_modules=["qkv", "proj"], fused={"qkv": "qkv"}, projections="qkvo", n_blocks=4)
named = torch.nn.Sequential(Block(), Block()).eval()
assert [(t.path, t.kind) for t in inject.plan(named, by_name)] == [(f"{i}.{c}", k) for i in range(2) for c, k in
                                                                   (("qkv", "fused_qkv"), ("proj", "linear"))]
plain = torch.nn.Sequential(Block(), Block())
assert inject.expected_shapes(named, by_name) == inject.expected_shapes(plain, cfg, placement)  # the same adapters
loaded = sorted(m for m in sys.modules if m.startswith(("blocklora.backbones", "open_clip", "timm", "transformers")))
print("loaded:", loaded)
assert not loaded, loaded
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "loaded: []"


def test_the_application_sits_in_folders_and_old_module_paths_still_import():
    """The top of the package holds only what both products share; each module of an earlier version's flat layout
    (`blocklora.api`, `blocklora.peft_format`, ...) imports as the very module object at its new path."""
    import importlib

    top = sorted(p.stem for p in SRC.glob("*.py"))
    assert top == ["__init__", "__main__", "_version", "checks", "choices", "errors", "ownership", "reading"], top
    for old, new in blocklora._MOVED.items():
        assert importlib.import_module(f"blocklora.{old}") is importlib.import_module(f"blocklora.{new}"), old
    assert all(not n.startswith("_") or n == "__version__" for n in dir(blocklora)), dir(blocklora)
    assert {"inject", "AdapterConfig", "__version__"} <= set(dir(blocklora))

"""train/device.py: the process group's device, collective tensors, moving a batch once; and a scan of the whole
code base proving every tensor handed to a torch.distributed collective was built by (or passed through)
the device helper, so a NCCL run never reduces a CPU tensor."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import train.device as device_mod
from data.batch import PackedBatch
from train.device import comm_tensor, comm_zeros, group_device, move_batch, on_group_device

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("train", "launch", "data", "bench")
# torch.distributed collectives -> how many leading positional arguments are tensors (or lists of them).
COLLECTIVES = {"all_reduce": 1, "broadcast": 1, "reduce": 1, "send": 1, "recv": 1, "isend": 1, "irecv": 1,
               "all_gather": 2, "all_gather_into_tensor": 2, "reduce_scatter": 2, "reduce_scatter_tensor": 2,
               "all_to_all": 2, "all_to_all_single": 2, "gather": 2, "scatter": 2}
TENSOR_KEYWORDS = {"tensor", "tensor_list", "output", "input", "output_tensor", "input_tensor", "output_tensor_list",
                   "input_tensor_list", "gather_list", "scatter_list"}
# What the helper provides (the scan accepts only names imported from train.device).
HELPERS = {"comm_tensor", "comm_zeros", "comm_empty", "on_group_device"}
# Methods and torch functions whose result lives on their input's device.
SAME_DEVICE_METHODS = {"contiguous", "clone", "detach", "new_empty", "new_zeros", "new_full", "view", "reshape",
                       "chunk", "narrow", "flatten", "float", "double", "long", "int"}
SAME_DEVICE_FUNCTIONS = {"empty_like", "zeros_like", "ones_like"}


class _Module:
    """Import aliases of one source file and a parent map to find each call's enclosing function."""

    def __init__(self, tree: ast.Module) -> None:
        self.dist_aliases = {"torch.distributed"}
        self.direct_collectives: set[str] = set()
        self.helpers: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == "torch.distributed" and alias.asname:
                        self.dist_aliases.add(alias.asname)
            elif isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    local = alias.asname or alias.name
                    if node.module == "torch.distributed" and alias.name in COLLECTIVES:
                        self.direct_collectives.add(local)
                    elif node.module == "torch" and alias.name == "distributed":
                        self.dist_aliases.add(local)
                    elif node.module == "train.device" and alias.name in HELPERS:
                        self.helpers.add(local)
        self.parent = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def collective(self, call: ast.Call) -> str | None:
        func = call.func
        if isinstance(func, ast.Name) and func.id in self.direct_collectives:
            return func.id
        if isinstance(func, ast.Attribute) and func.attr in COLLECTIVES \
                and ast.unparse(func.value) in self.dist_aliases:
            return func.attr
        return None

    def scope(self, node: ast.AST) -> ast.AST:
        while node in self.parent:
            node = self.parent[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return node
        return node


def _assignments(scope: ast.AST, name: str) -> list[ast.expr]:
    values = []
    for node in ast.walk(scope):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            values.append(node.value)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            values.append(node.value)
    return values


def _built_by_helper(expr: ast.expr | None, module: _Module, scope: ast.AST,
                     seen: frozenset[str] = frozenset()) -> bool:
    """True when `expr` is a device-helper tensor, something derived from one on the same device, or a name
    every assignment of which (in the enclosing function) is such an expression."""
    if expr is None or (isinstance(expr, ast.Constant) and expr.value is None):
        return True
    if isinstance(expr, ast.Name):
        values = _assignments(scope, expr.id)
        return bool(values) and expr.id not in seen and all(
            _built_by_helper(v, module, scope, seen | {expr.id}) for v in values)
    if isinstance(expr, (ast.List, ast.Tuple)):
        return all(_built_by_helper(e, module, scope, seen) for e in expr.elts)
    if isinstance(expr, ast.ListComp):
        return _built_by_helper(expr.elt, module, scope, seen)
    if isinstance(expr, ast.Subscript):
        return _built_by_helper(expr.value, module, scope, seen)
    if isinstance(expr, ast.Call):
        func = expr.func
        if isinstance(func, ast.Name):
            return func.id in module.helpers
        if isinstance(func, ast.Attribute):
            if ast.unparse(func.value) == "torch" and func.attr in SAME_DEVICE_FUNCTIONS:
                return bool(expr.args) and _built_by_helper(expr.args[0], module, scope, seen)
            if func.attr in SAME_DEVICE_METHODS:
                return _built_by_helper(func.value, module, scope, seen)
    return False


def scan_source(source: str, filename: str) -> tuple[int, list[str]]:
    """(number of collective call sites, the ones whose tensor argument is not from the device helper)."""
    tree = ast.parse(source, filename)
    module = _Module(tree)
    sites, bad = 0, []
    for call in ast.walk(tree):
        if not isinstance(call, ast.Call) or (name := module.collective(call)) is None:
            continue
        sites += 1
        tensors = call.args[:COLLECTIVES[name]] + [k.value for k in call.keywords if k.arg in TENSOR_KEYWORDS]
        scope = module.scope(call)
        for arg in tensors:
            if not _built_by_helper(arg, module, scope):
                bad.append(f"{filename}:{call.lineno}: dist.{name}(... {ast.unparse(arg)} ...)")
    return sites, bad


def test_every_collective_in_the_code_base_gets_a_device_helper_tensor():
    sites, bad = 0, []
    for package in SCANNED:
        for path in sorted((ROOT / package).rglob("*.py")):
            found, wrong = scan_source(path.read_text(), str(path.relative_to(ROOT)))
            sites, bad = sites + found, bad + wrong
    assert not bad, "tensors handed to collectives without train.device:\n" + "\n".join(bad)
    assert sites >= 14, f"the scan found only {sites} collective call sites: it no longer sees the code"


@pytest.mark.parametrize("source", [
    "import torch\nimport torch.distributed as dist\ndef f():\n    dist.all_reduce(torch.tensor([1]))",
    "import torch\nfrom torch import distributed as d\ndef f(x):\n    y = x.contiguous()\n    d.broadcast(y, 0)",
    "import torch\nfrom torch.distributed import all_gather\ndef f(x):\n"
    "    parts = [torch.empty_like(x) for _ in range(2)]\n    all_gather(parts, x)",
    # the helper's name, but not the helper's: only names imported from train.device count
    "import torch\nimport torch.distributed as dist\ndef comm_tensor(v):\n    return torch.tensor(v)\n"
    "def f():\n    dist.all_reduce(comm_tensor([1]))",
])
def test_scan_flags_tensors_not_built_by_the_helper(source):
    sites, bad = scan_source(source, "snippet.py")
    assert sites == 1 and bad


def test_scan_accepts_helper_tensors_and_their_derivatives():
    source = ("import torch\nimport torch.distributed as dist\n"
              "from train.device import comm_zeros, on_group_device\n"
              "def f(x, g):\n    x = on_group_device(x, g)\n    parts = [torch.empty_like(x) for _ in range(2)]\n"
              "    dist.all_gather(parts, x, group=g)\n    t = comm_zeros(3, torch.float64)\n    t += 1\n"
              "    dist.all_reduce(t)\n    dist.gather(t, gather_list=None)")
    assert scan_source(source, "snippet.py") == (3, [])


def _pretend_group(monkeypatch, backend: str, cuda_index: int = 0):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: cuda_index)


@pytest.mark.parametrize("backend,expected", [("nccl", "cuda:3"), ("gloo", "cpu"), ("fake", "cpu"),
                                              ("cpu:gloo,cuda:nccl", "cuda:3")])
def test_group_device_follows_the_backend(monkeypatch, backend, expected):
    _pretend_group(monkeypatch, backend, cuda_index=3)
    assert group_device() == torch.device(expected)
    assert device_mod.compute_device() == torch.device(expected)


def test_without_a_group_the_compute_device_is_cuda_when_present(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert group_device() == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert group_device() == torch.device("cpu")


def test_constructors_build_on_the_group_device(monkeypatch):
    _pretend_group(monkeypatch, "gloo")
    flag = comm_tensor([1], dtype=torch.int32)
    assert flag.device.type == "cpu" and flag.dtype == torch.int32 and flag.tolist() == [1]
    assert comm_zeros((2, 3), torch.float64).shape == (2, 3)
    view = torch.arange(6.0).reshape(2, 3).t()
    moved = on_group_device(view)
    assert moved.is_contiguous() and torch.equal(moved, view)
    plain = torch.ones(3)
    assert on_group_device(plain) is plain  # already there: no copy


def _batch() -> PackedBatch:
    n = 6
    return PackedBatch(input_ids=torch.arange(n), position_ids=torch.arange(n).expand(3, n).clone(),
                       cu_seqlens=torch.tensor([0, 4, 6], dtype=torch.int32), labels=torch.arange(n),
                       loss_weights=torch.ones(n), source_ids=torch.zeros(n, dtype=torch.long))


def test_move_batch_moves_every_tensor_once():
    batch = _batch()
    assert move_batch(batch, "cpu") is batch  # already there: the same object, nothing copied
    moved = move_batch(batch, "meta")
    for name, value in vars(moved).items():
        if torch.is_tensor(value):
            assert value.device.type == "meta", name
    assert move_batch(moved, "meta") is moved

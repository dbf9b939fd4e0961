"""The megatron CPU compatibility layer: version gate, and CUDA placement landing on CPU once active.

Activation is process-wide (a TorchFunctionMode stays entered), so everything that activates it runs in a
child process: the pytest process itself must keep failing on device="cuda" like any CPU-only torch.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from train.backends.megatron import cpu_compat

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU stand-ins")


def run_child(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": REPO, **env})


def test_tested_series_passes_and_others_fail_with_one_line(monkeypatch):
    monkeypatch.delenv(cpu_compat.UNTESTED_OK_ENV, raising=False)
    assert cpu_compat.check_megatron_version("0.16.1") == "0.16.1"
    with pytest.raises(cpu_compat.MegatronVersionError) as err:
        cpu_compat.check_megatron_version("0.17.0")
    message = str(err.value)
    assert "\n" not in message and "0.17.0" in message and cpu_compat.UNTESTED_OK_ENV in message
    monkeypatch.setenv(cpu_compat.UNTESTED_OK_ENV, "1")
    assert cpu_compat.check_megatron_version("0.17.0") == "0.17.0"


def test_activate_refuses_an_untested_installed_version(monkeypatch):
    from megatron.core import package_info

    monkeypatch.delenv(cpu_compat.UNTESTED_OK_ENV, raising=False)
    monkeypatch.setattr(package_info, "__version__", "0.99.0")
    monkeypatch.setattr(cpu_compat, "_active_mode", None)
    # The gate runs before any patch is installed, so this process stays unpatched.
    with pytest.raises(cpu_compat.MegatronVersionError, match="megatron-core 0.99.0 is untested"):
        cpu_compat.activate()
    assert not cpu_compat.is_active()


UNDER_THE_MODE = """
    import torch
    from megatron.core import package_info
    package_info.__version__ = "0.99.0"  # untested, but the opt-out env var is set by the test
    from train.backends.megatron import cpu_compat
    try:
        torch.zeros(1, device="cuda")
        print("cuda factory worked before activation")
    except (AssertionError, RuntimeError):
        pass
    assert cpu_compat.activate() and cpu_compat.activate()  # idempotent
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.empty(2, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.arange(3, device="cuda:0").device.type == "cpu"
    t = torch.ones(3)
    assert t.cuda() is t and t.to("cuda").device.type == "cpu" and t.new_zeros(2, device="cuda").is_cpu
    assert t.type() == "torch.cuda.FloatTensor" and t.bfloat16().type() == "torch.cuda.BFloat16Tensor"
    assert t.type(torch.float64).dtype == torch.float64  # conversions still convert
    assert torch.cuda.current_device() == "cpu"
    torch.cuda.manual_seed(5); a = torch.rand(3)
    torch.cuda.manual_seed(5); assert torch.equal(a, torch.rand(3))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        stream.wait_stream(torch.cuda.current_stream())
    stream.record_event().synchronize()
    from megatron.core.transformer.moe import moe_utils, token_dispatcher
    assert moe_utils.te_general_gemm is None
    assert token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([3, 1]), as_numpy=True) == [3, 1]
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    tracker = get_cuda_rng_tracker()
    tracker.add("test-stream", 99)
    torch.manual_seed(1); outside = torch.get_rng_state()
    with tracker.fork("test-stream"):
        forked = torch.rand(2)
    assert torch.equal(torch.get_rng_state(), outside)  # the default stream is restored after fork
    torch.manual_seed(99); assert torch.equal(forked, torch.rand(2))  # the fork drew from its own seed
    print("MODE OK")
"""


def test_cuda_calls_land_on_cpu_after_activation():
    proc = run_child(UNDER_THE_MODE, **{cpu_compat.UNTESTED_OK_ENV: "1"})
    assert "MODE OK" in proc.stdout and "worked before" not in proc.stdout, proc.stdout + proc.stderr[-3000:]

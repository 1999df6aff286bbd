"""A 20M-parameter decoder, every layer palettized, a few training steps, each side in its own process: DKM's peak
memory stays near plain training's, and recomputing the palettized weights in backward is bit-identical to keeping
them. (Speed lives in benchmarks/model_scale.py, not here.)"""

import hashlib
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


def _peak_mib() -> float:
    """This process's peak RSS since its exec: VmHWM belongs to the new address space, whereas ``ru_maxrss`` keeps
    the high-water mark of the process before exec (the forked pytest parent, over 1.9 GiB late in the suite)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib / 1024


def _worker(mode: str) -> dict:
    import torch

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from scale_models import build, loss_of

    from dkm_palett import DKMPalettizer, DKMPalettizerConfig, FakePalettize, ModuleDKMPalettizerConfig
    from dkm_palett.palettizer import fake_palettizers

    cfg = ModuleDKMPalettizerConfig(n_bits=4, weight_threshold=0, kmeans_init="opt1d")
    # every side first trains a tiny layer with DKM: libraries imported and numba kernels compiled (fixed costs that
    # do not grow with the model) before the peak that is compared
    tiny = DKMPalettizer(torch.nn.Linear(300, 300), DKMPalettizerConfig(global_config=cfg)).prepare()
    tiny(torch.randn(2, 300, requires_grad=True)).sum().backward()
    torch.manual_seed(0)
    model, inputs, targets = build("20m", tokens=64)
    params = sum(p.numel() for p in model.parameters())
    pal = None
    if mode != "plain":
        FakePalettize.recompute = mode == "recompute"
        # what DKM holds, not glibc's heap policy (dkm_palett.heap would serve every tensor from the heap, keeping
        # freed memory for reuse; benchmarks/model_scale.py measures that): both sides under the fixed mmap threshold
        FakePalettize.trim_heap = False
        pal = DKMPalettizer(model, DKMPalettizerConfig(global_config=cfg))
        model = pal.prepare(inplace=True)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    digest = hashlib.sha256()
    for _ in range(STEPS):
        # gradients stay allocated between steps (as with gradient accumulation), so a palettized weight kept for
        # backward would add to them rather than fill the room they leave before backward
        opt.zero_grad(set_to_none=False)
        loss = loss_of(model, inputs, targets)
        loss.backward()
        for p in model.parameters():
            digest.update(p.grad.numpy().tobytes())
        opt.step()
        if pal is not None:
            pal.step()
        digest.update(loss.detach().numpy().tobytes())
    palettized = sum(math.prod(fp.shape) for *_, fp in fake_palettizers(model))
    matmul = sum(math.prod(fp.shape) for _, module, _, fp in fake_palettizers(model)
                 if isinstance(module, torch.nn.Linear))  # weights a matmul saves for backward (not the embedding)
    return {"peak_mib": _peak_mib(), "params": params,
            "palettized": palettized, "matmul": 0 if pal is None else matmul, "digest": digest.hexdigest()}


def _run(mode: str) -> dict:
    # a fixed glibc mmap threshold returns freed blocks to the system at once, so RSS shows what DKM holds rather
    # than how far the heap grew (the same setting on both sides)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "MALLOC_MMAP_THRESHOLD_": "1048576"}
    out = subprocess.run([sys.executable, __file__, mode], capture_output=True, text=True, timeout=900, env=env,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_20m_decoder_dkm_memory_near_plain_and_recompute_bit_identical():
    plain, rec, stored = _run("plain"), _run("recompute"), _run("stored")
    assert plain["params"] >= 20_000_000
    assert rec["palettized"] == stored["palettized"] >= 0.99 * plain["params"]  # every Linear and the embedding
    weight_mib = 4 * rec["palettized"] / 2 ** 20  # one fp32 copy of the palettized weights (~80 MiB)
    # generous: DKM may add at most one copy of the weights over plain training's peak (which holds the weights,
    # their gradients and the activations); keeping the palettized weights for backward alone costs that much
    assert rec["peak_mib"] - plain["peak_mib"] <= weight_mib, (rec, plain)
    # the stored path really keeps the Linear layers' palettized weights (~64 MiB): recomputing them saves at least
    # half of that at the peak
    assert stored["peak_mib"] - rec["peak_mib"] >= 0.5 * 4 * rec["matmul"] / 2 ** 20, (stored, rec)
    assert rec["digest"] == stored["digest"]  # losses and every gradient of every step, bit for bit


if __name__ == "__main__":
    print(json.dumps(_worker(sys.argv[1])))


def test_report_keeps_a_dkm_impl_cell_apart_from_the_default_one():
    """``model_scale.py --dkm-impl binned`` cells get their own key and their own row, labelled; the default
    cell's row and the plot's series are unchanged by them."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from model_scale import cell_key
    from model_scale_report import _main_table

    base = dict(model="125m", tokens=128, bits=4, steps=3, params=134_000_000, peak_mib=1700.0, first_s=10.0)
    plain = {**base, "impl": "plain", "step_s": 1.0, "peak_mib": 1400.0}
    ours = {**base, "impl": "ours", "iters": 1, "step_s": 4.0}
    binned = {**ours, "dkm_impl": "binned", "step_s": 3.0}
    results = {cell_key(c): c for c in (plain, ours, binned)}
    assert len(results) == 3 and cell_key(binned) == "125m/128/ours/4bit/1it/binned"
    rows = [r for r in _main_table(results) if r.startswith("| 125m |")]
    assert [r.split(" | ")[3] for r in rows] == ["4", "4 (binned)"]
    assert [r.split(" | ")[11] for r in rows] == ["4.00x", "3.00x"]
    assert [r.split(" | ")[5] for r in rows] == ["0.0001", "0.0001"]  # cells without palett_tau ran at 1e-4


def test_coremltools_table_gives_same_settings_and_defaults_ratios():
    """coremltools' row divides its step by our exact (``dense``) 3-iteration step (same settings) and by our exact
    1-iteration step (our default iterations), each in its own labelled column; our default-engine cells (binned at
    4 bits on large layers) are not compared with it; a failed coremltools cell keeps its error."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from model_scale import cell_key
    from model_scale_report import _ct_table

    base = dict(model="7m", tokens=128, bits=4, steps=3, params=7_300_000, first_s=1.0)
    plain = {**base, "impl": "plain", "step_s": 0.05, "peak_mib": 400.0}
    same = {**base, "impl": "ours", "iters": 3, "dkm_impl": "dense", "step_s": 0.4, "peak_mib": 500.0}
    default = {**base, "impl": "ours", "iters": 1, "dkm_impl": "dense", "step_s": 0.25, "peak_mib": 500.0}
    binned = {**base, "impl": "ours", "iters": 1, "step_s": 0.1, "peak_mib": 500.0}  # the default engine
    ct = {**base, "impl": "coremltools", "step_s": 10.0, "peak_mib": 2400.0}
    results = {cell_key(c): c for c in (plain, same, default, binned, ct)}
    header, _, row = _ct_table(results)
    cells = dict(zip([c.strip() for c in header.split("|")[1:-1]], [c.strip() for c in row.split("|")[1:-1]]))
    assert cells["ct/ours step, same settings"] == "25.00x"
    assert cells["ct/ours step, exact at our default iterations"] == "40.00x"
    assert cells["ct/ours extra memory"] == "20.00x"
    results[cell_key(ct)] = {**ct, "error": "timeout >900 s"}
    assert "| timeout >900 s |" in _ct_table(results)[2]
    results[cell_key(ct)] = {**ct, "cap_gib": 10.0, "wall_s": 626.8, "error": "rc=1: RuntimeError: [enforce fail at "
                             "alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried"}
    assert "| out of memory (address space capped at 10 GiB) after 627 s |" in _ct_table(results)[2]


def test_trim_table_divides_by_both_plain_baselines():
    """The heap table gives DKM's step and peak over plain training as users run it and over plain training with
    the same heap policy (``plain-trim`` cells), steps with their system time where recorded; DKM cells from before
    the policy are marked in the main table and left out of this one."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from model_scale import cell_key
    from model_scale_report import _main_table, _trim_table

    base = dict(model="125m", tokens=128, bits=8, steps=3, params=134_000_000, first_s=10.0, step_s=1.0)
    plain = {**base, "impl": "plain", "peak_mib": 1600.0, "step_s": 2.0, "step_sys_s": 1.5}
    trimmed = {**base, "impl": "plain-trim", "peak_mib": 1280.0, "heap_reuse": True, "step_s": 0.8}
    ours = {**base, "impl": "ours", "iters": 1, "peak_mib": 1760.0, "heap_trim": True, "heap_reuse": True,
            "step_s": 3.0, "step_sys_s": 0.25}
    results = {cell_key(c): c for c in (plain, trimmed, ours)}
    assert cell_key(trimmed) == "125m/128/plain-trim"
    header, _, row = _trim_table(results)
    cells = dict(zip([c.strip() for c in header.split("|")[1:-1]], [c.strip() for c in row.split("|")[1:-1]]))
    assert cells["DKM/plain peak"] == "1.10x" and cells["DKM/same-heap plain peak"] == "1.38x"
    assert cells["DKM/plain step"] == "1.50x" and cells["DKM/same-heap plain step"] == "3.75x"
    assert cells["plain step (system time)"] == "2.00 s (1.50 s)" and cells["DKM step"] == "3.00 s (0.25 s)"
    assert cells["plain step, heap as DKM keeps it"] == "0.80 s"  # no system time recorded
    assert len([r for r in _main_table(results) if r.startswith("| 125m |")]) == 1  # plain-trim is no DKM row
    del ours["heap_reuse"]  # the policy before 2026-12-07: marked, and not paired with today's plain-trim cell
    assert _trim_table(results) == [] and "(older heap policy)" in _main_table(results)[2]
    del ours["heap_trim"]
    assert "(no trim)" in _main_table(results)[2]

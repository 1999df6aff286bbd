"""DKM training keeps the C heap's memory for reuse and gives back what piles up during a backward (dkm_palett.heap)."""

import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dkm_palett import DKMPalettizer, DKMPalettizerConfig, ModuleDKMPalettizerConfig, heap
from dkm_palett.fake_palettize import FakePalettize


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(256, 32)
        self.head = nn.Linear(32, 128)

    def forward(self, tokens):
        return self.head(torch.relu(self.embed(tokens)))


class FakeGlibc:
    """Stands in for glibc: records trims and mallopt calls and reports a free-heap total the test sets."""

    def __init__(self, events):
        self.events, self.free, self.reads = events, 0, 0

    def trim(self, pad):
        self.events.append(("trim", self.free))

    def info(self):
        self.reads += 1
        return SimpleNamespace(fordblks=self.free)

    def opt(self, param, value):
        self.events.append(("mallopt", param, value))
        return 1


@pytest.fixture
def glibc(monkeypatch):
    fake = FakeGlibc([])
    monkeypatch.setattr(heap, "_glibc", lambda: (fake.trim, fake.info, fake.opt))
    monkeypatch.setattr(heap, "_state", {"free_after_trim": 0, "backward": True, "tuned": False, "step_bytes": 0,
                                         "unchecked": 0})
    monkeypatch.setattr(heap, "CHECK_FRACTION", 1 << 62)  # this tiny model's modules: the free heap read before each
    return fake


def _no_mallopt(events):
    return [e for e in events if e[0] != "mallopt"]


def _model(milestone=0):
    torch.manual_seed(0)
    cfg = ModuleDKMPalettizerConfig(n_bits=2, weight_threshold=1024, milestone=milestone)
    pal = DKMPalettizer(Net(), DKMPalettizerConfig(global_config=cfg))
    return pal, pal.prepare()


def _step(model, fake, grow=0):
    """One backward; each DKM module's gradient hook records itself, and the free heap grows by ``grow`` before
    each module's backward (the head's, then the embedding's)."""
    def grown(name):
        def hook(_g):
            fake.events.append((name, fake.free))
            fake.free += grow
        return hook

    tokens = torch.randint(0, 256, (4, 8), generator=torch.Generator().manual_seed(1))
    fake.free += grow
    model.head.parametrizations.weight.original.register_hook(grown("head grad"))
    model.embed.parametrizations.weight.original.register_hook(grown("embed grad"))
    model(tokens).square().mean().backward()


def test_trims_before_a_modules_backward_once_the_free_heap_grew_past_the_limit(glibc):
    _, model = _model()
    big = heap.FREE_HEAP_LIMIT + 1
    _step(model, glibc, grow=big)
    # the head's backward comes first: each module's check runs just before its own backward
    assert _no_mallopt(glibc.events) == [("trim", big), ("head grad", big), ("trim", 2 * big), ("embed grad", 2 * big)]
    assert heap._state["free_after_trim"] == 2 * big


def test_no_trim_while_the_growth_since_the_last_trim_is_under_the_limit(glibc):
    _, model = _model()
    limit = heap.FREE_HEAP_MIN  # this tiny model's limit (its weights / FREE_HEAP_FRACTION are less)
    heap._state["free_after_trim"] = glibc.free = 10 * limit  # trimmed there: its chunks stay free
    _step(model, glibc, grow=limit // 2)  # + 1/2 limit, then + 1: under the limit
    assert heap.trim_limit() == limit
    assert [e[0] for e in _no_mallopt(glibc.events)] == ["head grad", "embed grad"]
    glibc.free = 4 * limit  # trimmed chunks in use again (resident): the reference follows them down
    heap.trim_if_large()
    assert heap._state["free_after_trim"] == 4 * limit and glibc.events[-1][0] == "embed grad"
    glibc.free += limit + 1
    heap.trim_if_large()
    assert glibc.events[-1][0] == "trim"


def test_the_free_heap_is_read_once_enough_weights_went_through_backward(glibc, monkeypatch):
    """mallinfo2 walks every free list (1-2 ms a call at 350M): before a module's backward it is read only once the
    modules since the last read hold trim_limit() // CHECK_FRACTION bytes of DKM weights, or for a module glibc
    maps (always)."""
    monkeypatch.setattr(heap, "CHECK_FRACTION", 4)
    heap._state["step_bytes"] = 1 << 31  # a 2 GiB step: the limit is 128 MiB, a read every 32 MiB of weights
    every = heap.trim_limit() // 4
    assert every == 32 << 20
    glibc.free = 1 << 40  # far over the baseline: every read trims
    for _ in range(7):
        heap.trim_if_large(nbytes=every // 4)  # 8 MiB modules: every fourth one reads the free heap
    assert glibc.reads == 1 and [e[0] for e in glibc.events] == ["trim"]
    heap.trim_if_large(nbytes=every // 4)
    assert glibc.reads == 2 and heap._state["unchecked"] == 0
    heap.trim_if_large(nbytes=1, always=True)  # a module glibc maps: read (and trim) whatever came before
    assert glibc.reads == 3 and [e[0] for e in glibc.events] == ["trim"] * 2  # no growth at the second read


def test_the_limit_is_a_share_of_the_steps_dkm_weights_within_bounds(glibc):
    """What may pile up free before a trim scales with the model: a 1/16 of the DKM weights the step armed, at
    least FREE_HEAP_MIN and at most FREE_HEAP_LIMIT."""
    _, model = _model()
    _step(model, glibc)
    assert heap._state["step_bytes"] == (256 * 32 + 128 * 32) * 4  # the embedding's and the head's fp32 weights
    for step_bytes, limit in ((1 << 20, heap.FREE_HEAP_MIN), (1 << 31, (1 << 31) // heap.FREE_HEAP_FRACTION),
                              (1 << 36, heap.FREE_HEAP_LIMIT)):
        heap._state["step_bytes"] = step_bytes
        assert heap.trim_limit() == limit


def test_each_step_takes_its_baseline_at_its_first_dkm_forward(glibc, monkeypatch):
    """With the heap kept for reuse (REUSE_MIN_BYTES patched to 0), what the previous step and zero_grad freed (here
    10 limits: last step's gradients) is this step's to reuse, not trimmed; the baseline is taken once per step, at
    the first DKM forward after a backward."""
    monkeypatch.setattr(heap, "REUSE_MIN_BYTES", 0)
    _, model = _model()
    limit = heap.FREE_HEAP_MIN  # this tiny model's limit
    for _ in range(2):
        glibc.free += 10 * limit
        baseline = glibc.free + limit // 2  # _step grows the heap once before its forward, then per module
        _step(model, glibc, grow=limit // 2)
        assert heap._state["free_after_trim"] == baseline
    assert [e for e in glibc.events if e[0] == "trim"] == []
    glibc.free += 10 * limit
    model(torch.randint(0, 256, (4, 8)))  # a new step: a new baseline
    baseline = glibc.free
    glibc.free += 10 * limit
    model(torch.randint(0, 256, (4, 8)))  # a second forward before any backward keeps it
    assert heap._state["free_after_trim"] == baseline


def test_a_module_glibc_maps_always_trims_unless_the_heap_is_kept_for_reuse(glibc, monkeypatch):
    """Under glibc's defaults, modules of at least MMAP_THRESHOLD_MAX bytes of DKM weights (patched: the 32 KiB
    embedding, not the 16 KiB head) trim before their backward whatever the growth: their tensors never come from
    the heap. Once the heap serves everything (REUSE_MIN_BYTES reached), only the growth counts."""
    monkeypatch.setattr(heap, "MMAP_THRESHOLD_MAX", 24 << 10)
    _, model = _model()
    _step(model, glibc, grow=0)
    assert [e[0] for e in glibc.events] == ["head grad", "trim", "embed grad"]
    monkeypatch.setattr(heap, "REUSE_MIN_BYTES", 0)
    del glibc.events[:]
    _step(model, glibc, grow=0)
    assert [e for e in glibc.events if e[0] == "trim"] == []


def test_glibc_serves_everything_from_the_heap_while_dkm_trains_and_gets_its_defaults_back(glibc, monkeypatch):
    """From REUSE_MIN_BYTES of DKM weights a step (patched to this tiny model's 48 KiB; by default it stays under)."""
    pal, model = _model()
    _step(model, glibc)
    assert [e for e in glibc.events if e[0] == "mallopt"] == []  # under REUSE_MIN_BYTES: glibc's defaults
    monkeypatch.setattr(heap, "REUSE_MIN_BYTES", (256 * 32 + 128 * 32) * 4)
    _step(model, glibc)
    _step(model, glibc)
    tuned = [("mallopt", heap.M_MMAP_MAX, 0), ("mallopt", heap.M_TRIM_THRESHOLD, heap.TOP_TRIM_THRESHOLD)]
    assert [e for e in glibc.events if e[0] == "mallopt"] == tuned  # once, at the first DKM forward
    tuned_while_snapping = []
    snap = FakePalettize.to_palettized
    monkeypatch.setattr(FakePalettize, "to_palettized",
                        lambda self, w: tuned_while_snapping.append(heap._state["tuned"]) or snap(self, w))
    pal.finalize(inplace=True)  # finalize runs under glibc's defaults, the heap trimmed first
    assert tuned_while_snapping == [False, False]
    defaults = [("mallopt", p, v) for p, v in heap.GLIBC_DEFAULTS.items()]
    assert [e for e in glibc.events if e[0] in ("mallopt", "trim")][2:] == defaults + [("trim", glibc.free)]
    assert not heap._state["tuned"]


def test_no_check_in_eval_without_grad_before_the_milestone_or_switched_off(glibc, monkeypatch):
    big = heap.FREE_HEAP_LIMIT + 1
    _, model = _model()
    with torch.no_grad():
        model(torch.randint(0, 256, (4, 8)))
    model.eval()  # DKM snaps: no DKM backward
    model(torch.randint(0, 256, (4, 8))).sum().backward()
    model.train()
    _, late = _model(milestone=5)  # DKM not started: a plain module
    _step(late, glibc, grow=big)
    monkeypatch.setattr(FakePalettize, "trim_heap", False)
    _step(model, glibc, grow=big)
    assert [e for e in glibc.events if e[0] in ("trim", "mallopt")] == []


def test_gradients_are_unchanged(monkeypatch):
    """The hook only tunes glibc and trims (glibc's real mallopt and malloc_trim here, a trim at every module):
    gradients are bit-identical with it and without it; finalize gives glibc its defaults back."""
    grads = []
    for on in (True, False):
        monkeypatch.setattr(FakePalettize, "trim_heap", on)
        monkeypatch.setattr(heap, "FREE_HEAP_LIMIT", -1)
        pal, model = _model()
        model(torch.randint(0, 256, (4, 8), generator=torch.Generator().manual_seed(1))).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        pal.finalize(inplace=True)
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_finalize_removes_the_hook():
    pal, model = _model()
    assert any(fn is heap._arm for fn in model.embed._forward_hooks.values())
    pal.finalize(inplace=True)
    assert not any(fn is heap._arm for fn in model.embed._forward_hooks.values())


@pytest.mark.skipif(not sys.platform.startswith("linux") or heap._glibc() is None, reason="glibc 2.33+ only")
def test_release_returns_freed_heap_memory_to_the_os():
    """Freed chunks between live ones stay resident until malloc_trim: 64 MiB of holes (64 KiB chunks, under
    glibc's smallest mmap threshold, so on the heap) go back, and the free total counts them."""
    code = textwrap.dedent("""
        import torch
        from dkm_palett import heap
        def rss_mib():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096 / 2 ** 20
        chunks = [torch.ones(16384) for _ in range(2048)]  # 2048 x 64 KiB, touched
        free0 = heap.free_heap_bytes()
        del chunks[::2]  # 1024 holes between live chunks: free, still resident
        freed = (heap.free_heap_bytes() - free0) / 2 ** 20
        before = rss_mib()
        heap.release_free_heap()
        print(freed, before - rss_mib())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    freed, returned = map(float, out.stdout.split()[-2:])
    assert freed >= 64 and returned > 48  # of the 64 MiB freed (a page per hole stays)


@pytest.mark.skipif(not sys.platform.startswith("linux") or heap._glibc() is None, reason="glibc 2.33+ only")
def test_tuned_glibc_serves_a_large_tensor_from_the_heap_and_maps_it_again_after_finalize():
    """The real mallopt: while DKM trains past REUSE_MIN_BYTES (patched to 0) a 64 MiB tensor comes from the heap
    (glibc's mapped bytes, ``mallinfo2().hblkhd``, do not grow); after finalize glibc maps it again."""
    code = textwrap.dedent("""
        import torch
        from torch import nn
        from dkm_palett import DKMPalettizer, DKMPalettizerConfig, ModuleDKMPalettizerConfig, heap
        heap.REUSE_MIN_BYTES = 0
        def mapped_growth():
            before = heap._glibc()[1]().hblkhd
            big = torch.ones(16 << 20)  # 64 MiB (over glibc's largest automatic mmap threshold), alive while read
            return heap._glibc()[1]().hblkhd - before
        untouched = mapped_growth()
        cfg = ModuleDKMPalettizerConfig(n_bits=2, weight_threshold=0)
        pal = DKMPalettizer(nn.Sequential(nn.Linear(64, 64)), DKMPalettizerConfig(global_config=cfg))
        model = pal.prepare()
        model(torch.randn(4, 64)).sum().backward()
        tuned = mapped_growth()
        pal.finalize(inplace=True)
        print(untouched >> 20, tuned >> 20, mapped_growth() >> 20)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert list(map(int, out.stdout.split()[-3:])) == [64, 0, 64]


@pytest.mark.skipif(not sys.platform.startswith("linux") or heap._glibc() is None, reason="glibc 2.33+ only")
def test_tuned_glibc_keeps_a_freed_top_of_the_heap_resident_for_reuse():
    """The real mallopt: while tuned, glibc never trims the heap's top by itself. ``zero_grad`` frees a large model's
    gradients into the top, and the next backward needs them again; with a 1 GiB threshold glibc handed 1.25 GiB
    back on the free, to be faulted in again (measured at 1.1B: 3-4 GiB of faults, 8-12 s of system time a step)."""
    code = textwrap.dedent("""
        import torch
        from torch import nn
        from dkm_palett import DKMPalettizer, DKMPalettizerConfig, ModuleDKMPalettizerConfig, heap
        heap.REUSE_MIN_BYTES = 0
        def rss_mib():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096 / 2 ** 20
        cfg = ModuleDKMPalettizerConfig(n_bits=2, weight_threshold=0)
        pal = DKMPalettizer(nn.Sequential(nn.Linear(64, 64)), DKMPalettizerConfig(global_config=cfg))
        model = pal.prepare()
        model(torch.randn(4, 64)).sum().backward()  # tuned
        big = torch.ones(320 << 20)  # 1.25 GiB at the top of the heap, touched
        before = rss_mib()
        del big
        print(before - rss_mib())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout.split()[-1]) < 64  # MiB given back on the free: none (1280 with a 1 GiB threshold)

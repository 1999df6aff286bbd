"""dkm-palett-train's command line around Hydra: one clear line for bad keys and unwritable folders, what a failed
run leaves behind, and the console of a run whose output is not a terminal."""

from __future__ import annotations

import pytest

pytest.importorskip("hydra")
pytest.importorskip("lightning")

import torch  # noqa: E402

from test_recipes import FAST, NO_EXPORT, cli  # noqa: E402


def _error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


def test_typo_in_a_palettization_key_gets_the_did_you_mean_message_at_once(tmp_path):
    proc = cli("palettization.nbits=4", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2
    lines = _error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith(
        "error: palettization: unknown key(s) 'nbits' (did you mean 'n_bits'?). Allowed keys: ")
    assert "+palettization" not in proc.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, field", [("hydra.run.dir", "hydra.run.dir"), ("hydra.sweep.dir", "hydra.sweep.dir")])
def test_unwritable_hydra_output_dir_is_one_line(flag, field, tmp_path):
    args = ("-m",) if field == "hydra.sweep.dir" else ()
    proc = cli(*args, f"{flag}=/proc/forbidden/run", cwd=tmp_path)
    assert proc.returncode == 2
    lines = _error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith(f"error: {field}='/proc/forbidden/run' is not a writable folder (")
    assert "Traceback" not in proc.stderr


def test_failed_run_records_the_error_in_train_log(tmp_path):
    bad = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, bad)  # not this model's weights
    run_dir = tmp_path / "run"
    proc = cli(*FAST, *NO_EXPORT, f"baseline.checkpoint={bad}", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 2
    lines = _error_lines(proc)
    assert len(lines) == 1 and "does not match the model" in lines[0] and "train.log" in lines[0]
    log = (run_dir / "train.log").read_text()
    assert "run failed: ValueError: baseline.checkpoint=" in log and "Traceback" in log


def test_console_without_a_terminal_is_one_line_per_epoch_with_the_phase(tmp_path):
    fast = [o for o in FAST if o != "trainer.enable_progress_bar=false"]
    proc = cli(*fast, *NO_EXPORT, "plots=false", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "\r" not in out and "v_num" not in out and "Validation DataLoader" not in out
    epochs = [line for line in out.splitlines() if line.startswith("[")]
    assert [line.split(":")[0] for line in epochs] == ["[baseline] epoch 1/1", "[dkm 4-bit] epoch 1/1"]
    assert "train_loss=" in epochs[0]
    assert len(out) < 3000  # the summary and two epoch lines, no bar updates


def test_progress_bar_is_labelled_with_the_phase_and_drops_v_num():
    import lightning as L

    from dkm_palett.recipes.progress import PhaseProgressBar
    from helpers_lightning import DigitsClassifier, DigitsDataModule

    class Seen(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            self.description = bar.train_progress_bar.desc
            self.metrics = bar.get_metrics(trainer, pl_module)

    bar, seen = PhaseProgressBar("dkm 4-bit"), Seen()
    trainer = L.Trainer(accelerator="cpu", max_steps=2, callbacks=[bar, seen], logger=True, enable_checkpointing=False,
                        enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=0,
                        default_root_dir=None)
    trainer.fit(DigitsClassifier(), DigitsDataModule())
    assert seen.description.startswith("dkm 4-bit epoch 1/")
    assert "v_num" not in seen.metrics
    assert bar.init_validation_tqdm().leave is False  # a standalone validation leaves no finished bar behind
    assert bar.validation_description == "dkm 4-bit: validation"


def test_compare_plot_value_labels_do_not_overlap():
    from dkm_palett.recipes.plots import metric_vs_bits_figure

    series = {"post-training k-means": [(1, 0.10), (2, 0.62), (3, 0.951), (4, 0.962)],
              "DKM fine-tuning": [(1, 0.55), (2, 0.90), (3, 0.953), (4, 0.961)]}
    errors = {label: {b: 0.02 for b, _ in points} for label, points in series.items()}
    fig = metric_vs_bits_figure(series, "accuracy", 0.96, "t", {1: 20.0, 2: 12.0, 3: 9.0, 4: 7.0}, errors)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in fig.axes[0].texts]
    assert len(boxes) == 8
    overlaps = [(i, j) for i in range(len(boxes)) for j in range(i + 1, len(boxes)) if boxes[i].overlaps(boxes[j])]
    assert overlaps == []

"""The Hydra recipes: composed configs run end to end on bundled data, fail fast on bad overrides, and the CLI works."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hydra")
pytest.importorskip("lightning")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from dkm_palett.recipes.config import conf_dir  # noqa: E402
from dkm_palett.recipes.train import run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HAS_COREML = __import__("importlib").util.find_spec("coremltools") is not None
# Tiny runs: one epoch of a few batches per phase, no progress bar, the (fast) histogram DKM.
FAST = ["trainer.enable_progress_bar=false", "baseline.max_epochs=1", "trainer.max_epochs=1",
        "+trainer.limit_train_batches=3", "palettization.dkm_impl=binned"]
NO_EXPORT = ["export.coreml=false", "export.compressed=false"]


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)  # the installed package only: no path into the source tree
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "dkm_palett.recipes.train", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------- default run


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """The default experiment (digits CNN, 4 bits) with tiny epochs, exports on."""
    run_dir = tmp_path_factory.mktemp("digits")
    exports = [] if HAS_COREML else ["export.coreml=false"]
    report = run(compose_cfg(FAST + exports), run_dir)
    return run_dir, report


def test_default_run_writes_report_plots_logs_artifacts(digits_run):
    run_dir, report = digits_run
    on_disk = json.loads((run_dir / "report.json").read_text())
    assert {"baseline", "palettized", "compression", "layers", "config"} <= set(on_disk)
    assert on_disk["name"] == "digits_cnn"
    # the data-free post-training k-means reference at the same bits
    assert 0.0 <= on_disk["post_training"]["accuracy"] <= 1.0
    for phase in ("baseline", "palettized"):
        assert 0.0 <= on_disk[phase]["accuracy"] <= 1.0
        assert on_disk[phase]["loss"] > 0
    # one epoch of 3 batches already lifts the CNN well above chance (10%)
    assert on_disk["baseline"]["accuracy"] > 0.2
    # the uncertainty of each accuracy over the 360 validation images (95% interval, normal approximation)
    for phase in ("baseline", "post_training", "palettized"):
        acc = on_disk[phase]["accuracy"]
        assert on_disk[phase]["n"] == 360
        assert on_disk[phase]["accuracy_ci95"] == pytest.approx(1.96 * math.sqrt(acc * (1 - acc) / 360))
    from dkm_palett.recipes.report import summary

    text = summary(report, run_dir)
    ci = 100 * report["baseline"]["accuracy_ci95"]
    assert f"{100 * report['baseline']['accuracy']:.2f}% ±{ci:.2f}" in text
    assert "95% interval over n=360 validation samples" in text
    comp = on_disk["compression"]
    assert comp["float_bytes"] > comp["compressed_bytes"] > 0
    assert comp["compression_ratio"] == pytest.approx(comp["float_bytes"] / comp["compressed_bytes"])
    assert comp["n_palettized_weights"] == 3
    # conv2, conv3 and fc1 exceed weight_threshold=2048; the first conv and the head stay float
    layers = on_disk["layers"]
    palettized = {k: v for k, v in layers.items() if v.get("palettized")}
    assert set(palettized) == {"net.features.2.weight", "net.features.5.weight", "net.classifier.1.weight"}
    for row in palettized.values():
        assert row["n_bits"] == 4 and row["n_clusters"] == 16
        assert row["lut_entries_used_max"] <= 16
        assert row["compressed_bytes"] < row["float_bytes"]
        assert math.isfinite(row["rms_error"])
    assert layers["net.features.0.weight"]["palettized"] is False
    assert on_disk["config"]["palettization"]["n_bits"] == 4
    assert on_disk["config"]["model"]["net"]["num_classes"] == 10  # resolved interpolation
    assert is_png(run_dir / "weights.png")
    assert (run_dir / "baseline.ckpt").is_file()
    assert (run_dir / "logs" / "baseline" / "metrics.csv").is_file()
    assert (run_dir / "logs" / "dkm" / "metrics.csv").is_file()
    assert Path(on_disk["artifacts"]["compressed"]["path"]).is_file()
    if HAS_COREML:
        assert (run_dir / "artifacts" / "model.mlpackage").is_dir()


def test_default_run_model_is_really_palettized_and_portable_file_round_trips(digits_run):
    from dkm_palett.export import load_compressed
    from dkm_palett.palettized_weight import palettized_tensors
    from dkm_palett.recipes.models import SmallCNN

    run_dir, _ = digits_run
    net = load_compressed(run_dir / "artifacts" / "model.safetensors", SmallCNN())
    records = {name: rec for name, _, _, rec in palettized_tensors(net)}
    assert set(records) == {"features.2.weight", "features.5.weight", "classifier.1.weight"}
    for name, rec in records.items():
        weight = net.get_parameter(name)
        assert weight.unique().numel() <= 16
        torch.testing.assert_close(weight, rec.to_dense())


def test_baseline_checkpoint_and_grouped_2bit_override(digits_run, tmp_path):
    first_dir, first = digits_run
    overrides = FAST + NO_EXPORT + [
        f"baseline.checkpoint={first_dir / 'baseline.ckpt'}", "palettization.n_bits=2",
        "palettization.granularity=per_grouped_channel", "palettization.group_size=8", "plots=false"]
    report = run(compose_cfg(overrides), tmp_path)
    # the loaded baseline evaluates exactly as the run that wrote it
    assert report["baseline"]["accuracy"] == pytest.approx(first["baseline"]["accuracy"], abs=1e-6)
    assert not (tmp_path / "baseline.ckpt").exists()  # loaded, not trained
    conv3 = report["layers"]["net.features.5.weight"]
    assert conv3["n_bits"] == 2 and conv3["n_groups"] == 64 // 8
    assert report["layers"]["net.classifier.1.weight"]["n_groups"] == 128 // 8
    assert report["compression"]["compression_ratio"] > first["compression"]["compression_ratio"]


# ----------------------------------------------------------------------------------------------- fail fast


@pytest.mark.parametrize("overrides, exc, message", [
    (["palettization.n_bits=5"], ValueError,
     "palettization.n_bits=5 is not allowed; allowed values: 1, 2, 3, 4, 6, 8."),
    (["palettization.granularity=per_grouped_channel", "palettization.group_size=24"], ValueError,
     "palettization: net.features.2.weight: group_size=24 does not divide the 32 channels along axis 0 "
     "(shape (32, 16, 3, 3)); pick a divisor of 32."),
    (["baseline.checkpoint=does/not/exist.ckpt"], FileNotFoundError, "baseline.checkpoint='does/not/exist.ckpt' "
     "does not exist"),
    (["palettization.weight_threshold=100000"], ValueError, "palettization.weight_threshold=100000 leaves no weight "
     "to palettize (the largest supported weight has 32768 elements)"),
    (["experiment=custom"], ValueError, "model._target_ is not set"),
    (["export.dir=/proc/forbidden"], ValueError, "export.dir='/proc/forbidden' is not a writable folder"),
])
def test_bad_overrides_fail_before_training(overrides, exc, message, tmp_path):
    with pytest.raises(exc) as info:
        run(compose_cfg(FAST + overrides), tmp_path)
    assert message in str(info.value)
    assert not (tmp_path / "logs").exists() and not (tmp_path / "baseline.ckpt").exists()


def test_cli_bad_override_prints_one_error_line_and_exits_2(tmp_path):
    proc = cli("palettization.n_bits=5", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: palettization.n_bits=5 is not allowed; allowed values: 1, 2, 3, 4, 6, 8."]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "run").exists()  # a config error leaves no run folder behind


def test_cli_help_and_cfg_job(tmp_path):
    helped = cli("--help", cwd=tmp_path)
    assert helped.returncode == 0
    assert "dkm-palett-train" in helped.stdout
    assert "experiment: charlm, compare, custom, digits_cnn, mnist5k_cnn" in helped.stdout
    job = cli("--cfg", "job", "experiment=mnist5k_cnn", "palettization.n_bits=2", "trainer.max_epochs=3",
              cwd=tmp_path)
    assert job.returncode == 0, job.stderr
    import yaml

    cfg = yaml.safe_load(job.stdout)
    assert cfg["name"] == "mnist5k_cnn"
    assert cfg["palettization"]["n_bits"] == 2 and cfg["trainer"]["max_epochs"] == 3
    assert cfg["data"]["_target_"] == "dkm_palett.recipes.data.MNIST5kDataModule"
    assert cfg["callbacks"]["dkm"]["_target_"] == "dkm_palett.callbacks.DKMPalettizationCallback"


# ----------------------------------------------------------------------------------------------- other experiments


def test_charlm_reports_loss_and_perplexity(tmp_path):
    exports = [] if HAS_COREML else ["export.coreml=false"]
    overrides = FAST + exports + ["experiment=charlm", "+trainer.limit_val_batches=2", "data.val_chars=8192"]
    report = run(compose_cfg(overrides), tmp_path)
    for phase in ("baseline", "palettized"):
        metrics = report[phase]
        assert set(metrics) == {"loss", "perplexity", "n"}  # no accuracy, no interval for it
        assert metrics["n"] == (8192 - 1) // 64  # every validation window of 64 characters (2 batches of <= 64)
        # perplexity is exp(mean token NLL): equal batches make it exp(val_loss)
        assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-3)
        assert metrics["perplexity"] < 97  # better than uniform over the vocabulary
    kinds = {name.split(".")[-2] if name.endswith("in_proj_weight") else name for name in report["layers"]}
    palettized = [k for k, v in report["layers"].items() if v.get("palettized")]
    assert "net.tok.weight" in palettized and "net.head.weight" in palettized
    assert any(k.endswith("self_attn.in_proj_weight") for k in palettized), kinds
    assert any(k.endswith("self_attn.out_proj.weight") for k in palettized)
    assert is_png(tmp_path / "weights.png")
    if HAS_COREML:
        assert (tmp_path / "artifacts" / "model.mlpackage").is_dir()


def test_mnist5k_runs_on_bundled_images(tmp_path):
    report = run(compose_cfg(FAST + NO_EXPORT + ["experiment=mnist5k_cnn", "plots=false"]), tmp_path)
    assert report["config"]["data"]["_target_"] == "dkm_palett.recipes.data.MNIST5kDataModule"
    assert report["layers"]["net.classifier.1.weight"]["n_bits"] == 2
    assert report["layers"]["net.classifier.1.weight"]["n_params"] == 32 * 7 * 7 * 128
    assert report["baseline"]["accuracy"] > 0.1


def test_compare_mode_loops_over_bits_in_one_run(tmp_path):
    overrides = FAST + ["experiment=compare", "compare.bits=[1,4]", "palettization.n_bits=4"]
    report = run(compose_cfg(overrides), tmp_path)
    assert [row["n_bits"] for row in report["compare"]] == [1, 4]
    for row in report["compare"]:
        assert 0 <= row["post_training"]["accuracy"] <= 1 and 0 <= row["dkm"]["accuracy"] <= 1
    ratios = [row["compression"]["compression_ratio"] for row in report["compare"]]
    assert ratios[0] > ratios[1] > 1
    assert report["post_training"] == report["compare"][1]["post_training"]
    assert report["palettized"] == report["compare"][1]["dkm"]
    assert is_png(tmp_path / "compare.png")
    assert (tmp_path / "logs" / "dkm_1bit" / "metrics.csv").is_file()


class TinyData(L.LightningDataModule):
    """Two Gaussian blobs in 16-d (for the custom-experiment test)."""

    def setup(self, stage=None):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(512, 16, generator=gen)
        y = (x[:, 0] + x[:, 1] > 0).long()
        self.train, self.val = TensorDataset(x[:384], y[:384]), TensorDataset(x[384:], y[384:])

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=64, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=128)


class TinyLit(L.LightningModule):
    """A user's own module: no example_input_array, its own metric name."""

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    def forward(self, x):
        return self.body(x)

    def training_step(self, batch, _):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_accuracy", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_custom_experiment_takes_user_modules_by_target(tmp_path):
    overrides = FAST + ["experiment=custom", "model._target_=test_recipes.TinyLit", "+model.hidden=256",
                        "data._target_=test_recipes.TinyData", "palettization.weight_threshold=1024",
                        "export.coreml=false"]
    report = run(compose_cfg(overrides), tmp_path)
    assert report["layers"]["body.0.weight"]["n_params"] == 16 * 256
    assert report["layers"]["body.0.weight"]["palettized"] is True
    assert report["baseline"]["accuracy"] > 0.6
    assert Path(report["artifacts"]["compressed"]["path"]).is_file()


@pytest.mark.slow
def test_cli_multirun_gives_one_dir_per_bit_width_and_a_bits_plot(tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli("-m", "palettization.n_bits=2,4", *FAST, *NO_EXPORT, f"hydra.sweep.dir={sweep}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.parent for p in sweep.glob("*/report.json"))
    assert [p.name for p in runs] == ["0", "1"]
    bits = [json.loads((p / "report.json").read_text())["config"]["palettization"]["n_bits"] for p in runs]
    assert bits == [2, 4]
    assert is_png(sweep / "metric_vs_bits.png") and is_png(runs[-1] / "metric_vs_bits.png")
    assert "DKM 4-bit" in proc.stdout
    # the float baseline is trained by the first job only and reused (same metrics) by the second
    first, second = (json.loads((p / "report.json").read_text()) for p in runs)
    assert "trained" in first["baseline_source"] and (runs[0] / "baseline.ckpt").is_file()
    assert second["baseline_source"]["reused"].startswith(str(sweep / "baselines" / "baseline-"))
    assert second["baseline_source"]["saved_s"] == pytest.approx(first["baseline_source"]["train_s"])
    assert second["baseline"] == first["baseline"] and not (runs[1] / "baseline.ckpt").exists()
    assert "baseline:  reused" in proc.stdout


# ----------------------------------------------------------------------------------------------- pieces


def test_data_modules_load_bundled_data():
    from dkm_palett.recipes.data import CharLMDataModule, DigitsDataModule
    from dkm_palett.recipes.data.charlm import ALPHABET, VOCAB_SIZE, decode, encode

    digits = DigitsDataModule(batch_size=32)
    digits.setup()
    x, y = next(iter(digits.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and y.dtype == torch.int64
    assert len(digits.train_set) + len(digits.val_set) == 1797
    assert len(digits.val_set) == 360  # 20%, stratified
    lm = CharLMDataModule(seq_len=16, batch_size=4)
    lm.setup()
    ids, target = next(iter(lm.val_dataloader()))
    assert ids.shape == target.shape and torch.equal(ids[:, 1:], target[:, :-1])
    assert int(ids.max()) < VOCAB_SIZE == len(ALPHABET) + 1
    assert decode(encode("def f(x):\n    return x")) == "def f(x):\n    return x"


def test_config_dir_is_a_package_with_every_group():
    root = Path(conf_dir())
    assert (root / "__init__.py").is_file() and (root / "config.yaml").is_file()
    for group in ("model", "data", "palettization", "trainer", "callbacks", "export", "experiment", "baseline"):
        assert list((root / group).glob("*.yaml")), group
    names = {p.stem for p in (root / "experiment").glob("*.yaml")}
    assert names == {"digits_cnn", "mnist5k_cnn", "compare", "charlm", "custom"}


def test_the_recipes_palettization_defaults_are_the_configs_defaults():
    """conf/palettization/default.yaml restates ModuleDKMPalettizerConfig's defaults (n_bits aside: the recipes
    pick 4 bits where the config has no default); a default changed in one place only would make the CLI and the
    Python API train differently."""
    import dataclasses

    import yaml

    from dkm_palett import ModuleDKMPalettizerConfig

    named = yaml.safe_load((Path(conf_dir()) / "palettization" / "default.yaml").read_text())
    defaults = {f.name: f.default for f in dataclasses.fields(ModuleDKMPalettizerConfig)}
    checked = {k: v for k, v in named.items() if k in defaults and v is not None and k != "n_bits"}
    assert {"kmeans_max_iter", "palett_tau", "weight_threshold", "dkm_impl"} <= set(checked)
    assert {k: defaults[k] for k in checked} == checked

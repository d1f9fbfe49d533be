"""Evaluation metrics (hand-derived) and configuration parsing."""

import dataclasses

import numpy as np
import pytest

from ser.config import Config, load_config
from ser.errors import UserError
from ser.evaluate import bootstrap_ci, pair_metrics
from ser.experiment import SELF_LABELLING, method_config


def test_pair_metrics_hand_derived():
    m = pair_metrics([1, 0, 2, 1], [0, 0, 3, -1], ["a", "a", "b", "b"])
    # margins 1, 0, -1, 2: the tie is wrong (strict >)
    assert m["accuracy"] == 0.5 and m["ties"] == 1 and m["mean_margin"] == 0.5
    # P = σ(m) = .731059, .5, .268941, .880797; Brier = mean (1-P)^2
    assert m["brier"] == pytest.approx((0.268941**2 + 0.25 + 0.731059**2 + 0.119203**2) / 4, abs=1e-5)
    # confidences .5 (wrong), .731 (right), .731 (wrong), .881 (right) in bins 4, 7, 7, 8:
    # ECE = .25*|0-.5| + .5*|.5-.731059| + .25*|1-.880797|
    assert m["ece"] == pytest.approx(0.25 * 0.5 + 0.5 * 0.231059 + 0.25 * 0.119203, abs=1e-5)
    assert m["accuracy_by_source"] == {"a": 0.5, "b": 0.5}


def test_bootstrap_ci_brackets_mean():
    lo, hi = bootstrap_ci([1, 0] * 50, n_resamples=2000)
    assert lo < 0.5 < hi and hi - lo < 0.3


def test_hierarchical_bootstrap_counts_shared_test_pairs_once():
    """5 seeds that agree on every test pair (the pairs' difficulty is all there is): with shared pairs (a fixed
    data.test) the CI is that of one seed's 200 pairs, sqrt(p (1 - p) / 200) = 0.035 wide per side at p = 0.6; the
    nested bootstrap, drawing pairs anew per seed, would average 5 independent draws: about sqrt(5) = 2.2x narrower."""
    from ser.evaluate import hierarchical_bootstrap

    row = np.array([1.0] * 120 + [0.0] * 80)
    m = np.tile(row, (5, 1))
    lo, hi = hierarchical_bootstrap(m, 2000, shared_pairs=True)
    assert (hi - lo) / 2 == pytest.approx(1.96 * np.sqrt(0.6 * 0.4 / 200), rel=0.1)
    nested_lo, nested_hi = hierarchical_bootstrap(m, 2000)
    assert 1.8 < (hi - lo) / (nested_hi - nested_lo) < 2.7


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  seed_size: 200\nmodel:\n  max_length: 64\n")
    cfg = load_config(f, ["train.lr=1e-4", "data.test_size=0.2", "ser.keep_seed=false"])
    assert cfg.data.seed_size == 200 and isinstance(cfg.data.seed_size, int)
    assert cfg.data.test_size == 0.2 and cfg.model.max_length == 64
    assert cfg.train.lr == 1e-4 and cfg.ser.keep_seed is False


@pytest.mark.parametrize("text, needle", [
    ("data:\n  sede_size: 3\n", "unknown config key 'data.sede_size'"),
    ("trian:\n  lr: 1\n", "unknown config key 'trian.lr'"),
    ("train:\n  batch_size: many\n", "'train.batch_size' must be int"),
    ("train:\n  lr: [1]\n", "'train.lr' must be float"),
    ("model:\n  mode: half\n", "'model.mode' must be one of full, lora, head"),
    ("model:\n  max_length: 7\n", "'model.max_length' must be >= 8, got 7"),
    ("data: [1, 2]\n", "section 'data' must be a mapping"),
    ("data:\n  train: [\n", "not valid YAML"),
    ("ser:\n  target_precision: 0.3\n", "'ser.target_precision' must be 0 (off) or in [0.5, 1], got 0.3"),
    ("ser:\n  target_precision: 0.8\n  calibration: none\n", "with rule=paper it needs ser.calibration=temperature"),
    ("ppo:\n  batch_size: 2\n  mini_batch_size: 4\n", "'ppo.mini_batch_size' (4) must be <= 'ppo.batch_size' (2)"),
    ("ppo:\n  kl_coef: 0\n", "adaptive KL control cannot move a coefficient of 0"),
    # YAML 1.1 reads these as 64 and 90: refused, naming the line, not trained with silently
    ("train:\n  lr: 1e-4\n  seed: 0100\n", "bad.yaml:3: '0100' reads as an octal or base-60 number"),
    ("data:\n  seed_size: 1:30\n", "bad.yaml:2: '1:30' reads as an octal or base-60 number"),
])
def test_bad_config_names_the_key(tmp_path, text, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(UserError) as e:
        load_config(f)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_octal_and_base60_overrides_are_refused_quoted_ones_are_strings():
    for text in ("0100", "1:30"):
        with pytest.raises(UserError, match=f"override 'train.seed': '{text}' reads as an octal or base-60"):
            load_config(None, [f"train.seed={text}"])
    with pytest.raises(UserError, match="override 'experiment.seeds': '010' reads as an octal"):
        load_config(None, ["experiment.seeds=[010, 011]"])
    assert load_config(None, ["train.seed=100", "data.train='0100.jsonl'"]).train.seed == 100
    assert load_config(None, ["experiment.seeds=[10, 0]"]).experiment.seeds == [10, 0]
    assert load_config(None, ["data.train=\"1:30\""]).data.train == "1:30"


def test_presets_parse():
    from pathlib import Path

    for preset in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        load_config(preset)


def test_paper_scale_and_accelerate_presets_are_complete():
    """The GPU presets cannot run here; they must still parse and name real settings."""
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1] / "configs"
    cfg = load_config(root / "evolve-llama3-8b-hh-paper.yaml")
    assert cfg.model.mode == "lora" and cfg.model.lora_r == 8 and cfg.ser.min_pairs == 600
    assert cfg.data.train == "Anthropic/hh-rlhf" and cfg.train.mixed_precision == "bf16"
    from ser.data import resolve_data_spec

    assert resolve_data_spec(cfg.data.test) == "hub:Anthropic/hh-rlhf:test"
    kinds = {}
    for f in sorted((root / "accelerate").glob("*.yaml")):
        a = yaml.safe_load(f.read_text())
        assert {"distributed_type", "num_processes", "mixed_precision"} <= set(a), f.name
        kinds[f.stem] = a["distributed_type"]
    assert kinds == {"cpu-2proc": "MULTI_CPU", "deepspeed-zero2": "DEEPSPEED", "deepspeed-zero3": "DEEPSPEED",
                     "fsdp": "FSDP"}


def test_cpu_presets_pick_precision_by_hardware_and_yaml_no_is_fp32():
    """Every ser preset that names a precision uses `auto` (bf16 only where the hardware is fast at it), except the
    GPU preset. An unquoted `no` (YAML 1.1: false) still means fp32 for train.mixed_precision only."""
    from pathlib import Path

    import yaml

    for f in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        named = (yaml.safe_load(f.read_text()).get("train") or {}).get("mixed_precision")
        if named is not None and "paper" not in f.stem:  # evolve-llama3-8b-hh-paper.yaml: 8 GPUs, bf16
            assert named == "auto", f.name
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(UserError, match="'model.backbone' must be str, got False"):
        load_config(None, ["model.backbone=no"])


def test_experiment_variants_change_one_setting_of_their_base():
    """Each ser_ensemble_* method is its base (ser_ensemble, or ser_ensemble_unguarded for the _unguarded_*
    ones) with exactly the one option its name says changed, so a difference between two methods measures it."""
    cfg = Config()
    ser = {m: dataclasses.asdict(method_config(cfg, m).ser) for m in SELF_LABELLING}
    expected = {"soft": {"soft_labels"}, "relabel": {"relabel"}, "restart": {"restart"}, "threshold": {"budget"},
                "top10": {"budget"}, "precision80": {"target_precision"}, "unguarded": {"length_guard"}}
    for m in SELF_LABELLING:
        if not m.startswith("ser_ensemble_"):
            continue
        base, _, option = m.rpartition("_")
        changed = {k for k in ser[m] if ser[m][k] != ser[base][k]}
        assert changed == expected[option], (m, changed)
    assert (ser["ser_ensemble_unguarded"]["budget"], ser["ser_ensemble_unguarded_top10"]["budget"]) == (0.2, 0.1)
    assert ser["ser_ensemble_unguarded_precision80"]["target_precision"] == 0.8
    # ssrm_validated is ssrm with the ensemble's fold models (validation only): its selection is ssrm's own
    assert {k for k in ser["ssrm"] if ser["ssrm"][k] != ser["ssrm_validated"][k]} == {"folds"}
    assert ser["ssrm_validated"]["folds"] == ser["ser_ensemble"]["folds"] == 4
    assert {k for k in ser["ssrm"] if ser["ssrm"][k] != ser["ssrm_guarded"][k]} == {"length_guard"}


def test_the_plots_ci_band_widens_for_test_pairs_shared_by_all_seeds():
    """3 seeds at 0.6 on 100 test pairs: their own pairs, 1.96 sqrt(0.24 / 300) = 0.0554; data.test's same pairs for
    every seed (a crossed design, as hierarchical_bootstrap(shared_pairs=True)), 1.96 sqrt(0.24 / 100) = 0.0960."""
    from ser.experiment import _ci95_half_width

    assert abs(_ci95_half_width([0.6, 0.6, 0.6], 100) - 0.05543) < 1e-4
    assert abs(_ci95_half_width([0.6, 0.6, 0.6], 100, shared_pairs=True) - 0.09602) < 1e-4

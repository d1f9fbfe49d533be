"""A newcomer's first hour: `--help` lists every setting, the terminal shows the run (not library noise), and
the HTML reports are real pages (tables as tables, each plot under the heading of its section)."""

import base64
import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from ser.cli import READS, _yaml_value, build_parser, run
from ser.config import Config, field_help, load_config

ROOT = Path(__file__).resolve().parents[1]


# --- 1. --help lists every setting ------------------------------------------------------------------------

def test_every_config_field_and_section_is_documented():
    """A new field needs its one-line comment beside its default in ser/config.py (that is its --help line)."""
    docs = field_help()
    for section in dataclasses.fields(Config):
        doc, comments = docs[section.name]
        assert doc, f"section '{section.name}' has no docstring"
        names = [f.name for f in dataclasses.fields(section.default_factory)]
        assert list(comments) == names
        undocumented = [f"{section.name}.{n}" for n in names if not comments[n]]
        assert not undocumented, f"config fields without a comment beside their default: {undocumented}"


def test_field_help_reads_the_comment_beside_each_default():
    docs = field_help()
    assert docs["ser"][1]["tau_delta"].startswith("SER paper §3: status-2 needs")
    assert docs["experiment"][1]["methods"].startswith("compared by `ser experiment`")  # a field over two lines
    assert docs["ppo"][0].startswith("`ser ppo`: PPO of the policy")


def _subcommands_with_config():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {name for name, p in sub.choices.items() if any("--config" in a.option_strings for a in p._actions)}


def test_every_command_that_takes_a_config_says_what_it_reads():
    assert _subcommands_with_config() == set(READS)


@pytest.mark.parametrize("command", sorted(READS))
def test_help_lists_every_setting_the_command_reads(command, capsys):
    with pytest.raises(SystemExit) as e:
        run([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    defaults, docs = Config(), field_help()
    keys = []
    for entry in READS[command]:
        section, _, name = entry.partition(".")
        keys += [(section, name)] if name else [(section, f.name) for f in dataclasses.fields(getattr(defaults, section))]
    for section, name in keys:
        f = next(f for f in dataclasses.fields(getattr(defaults, section)) if f.name == name)
        line = f"  {section}.{name}: {f.type} = {_yaml_value(getattr(getattr(defaults, section), name))}\n"
        assert line + f"      {docs[section][1][name]}\n" in out, f"{command} --help lacks {section}.{name}"
    listed = re.findall(r"^  (\w+\.\w+): ", out, flags=re.MULTILINE)
    assert listed == [f"{s}.{n}" for s, n in keys]  # each once, and nothing the command does not read


def test_help_defaults_read_back_as_the_defaults():
    """Each default is printed as it would be written in an override: giving it back changes nothing."""
    defaults = Config()
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory):
            value = getattr(getattr(defaults, section.name), f.name)
            key = f"{section.name}.{f.name}"
            assert getattr(getattr(load_config(None, [f"{key}={_yaml_value(value)}"]), section.name), f.name) == value


# --- 2. the terminal shows the run, not library noise -------------------------------------------------------

NOISE = ["LOAD REPORT", "MISSING", "Loading weights", "Writing model shards", "Setting accelerator to CPU", "it/s]"]


def _train_rm(tiny_bert_dir, tmp_path, *flags):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}?", "chosen": f"a good answer {i}",
                                        "rejected": f"no {i}"}) + "\n" for i in range(24)))
    out = tmp_path / ("run" + "".join(flags))
    p = subprocess.run([sys.executable, "-m", "ser", *flags, "train-rm", f"--data.train={data}", "--data.seed_size=16",
                        "--data.test_size=8", f"--model.backbone={tiny_bert_dir}", "--model.max_length=32",
                        "--train.save_every=0", "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout + p.stderr  # DeepSpeed's logger writes to stdout


def test_train_rm_prints_the_run_not_library_noise(tiny_bert_dir, tmp_path):
    quiet = _train_rm(tiny_bert_dir, tmp_path)
    assert "INFO ser.pipeline: pairs: 16 train (seed), 8 test" in quiet and "test accuracy" in quiet
    assert [n for n in NOISE if n in quiet] == []  # no progress bars either: stderr is not a terminal
    verbose = _train_rm(tiny_bert_dir, tmp_path, "-v")
    assert "LOAD REPORT" in verbose and "MISSING" in verbose and "Loading weights" in verbose
    if importlib.util.find_spec("deepspeed"):  # imported by accelerate when it unwraps the model
        assert "Setting accelerator to CPU" in verbose


# --- 3. report.html is a web page ---------------------------------------------------------------------------

def _records(seed, method, accs, stop_at=None):
    """Metrics records as `ser evolve` writes them (iteration 0 = the seed RM)."""
    out = [{"iteration": 0, "rm/acc": accs[0]}]
    for it, acc in enumerate(accs[1:], 1):
        out.append({"iteration": it, "rm/acc": acc, "ser/status": "1", "ser/n_status1": 40 - 10 * it,
                    "ser/n_status2": 5, "ser/added": 12, "ser/pseudo_precision": 0.8 + 0.01 * seed,
                    "ser/expected_precision": 0.75})
    if stop_at is not None:
        out.append({"iteration": stop_at, "ser/status": "stop", "ser/n_status1": 1, "ser/n_status2": 0,
                    "ser/added": 0, "ser/stop": f"iteration {stop_at}: too few confident pairs"})
    if len(accs) > 2:  # a run killed after closing once and resumed: its earlier closing record stays in the file
        out.insert(2, {"iteration": 1, "ser/stop_reason": "an earlier close", "ser/final": 0})
    out.append({"iteration": len(accs) - 1, "ser/stop_reason": "iteration 3: too few | confident pairs",
                "ser/final": len(accs) - 1})
    return out


@pytest.fixture
def experiment_results(tmp_path):
    """A hand-made `per_seed` (what run_seed returns) for 2 seeds, 50 test pairs, and the pool scores on disk."""
    cfg = load_config(None, ["experiment.seeds=[0, 1]", "experiment.bootstrap=50",
                             "experiment.methods=[seed_only, full_label, ser_paper, ser_code, ssrm]"])
    rng = np.random.default_rng(0)
    per_seed = {}
    for s in (0, 1):
        per_seed[s] = {"seed_only": {"correct": (rng.random(50) < 0.6).astype(float), "metrics": _records(s, "", [0.6])},
                       "full_label": {"correct": (rng.random(50) < 0.75).astype(float), "metrics": []}}
        for m, accs in {"ser_paper": [0.6, 0.66, 0.7], "ser_code": [0.6, 0.62], "ssrm": [0.6, 0.58, 0.57]}.items():
            accs = [a + 0.02 * s for a in accs]
            per_seed[s][m] = {"correct": (rng.random(50) < accs[-1]).astype(float),
                              "metrics": _records(s, m, accs, stop_at=len(accs) if m == "ser_code" else None)}
        scores = tmp_path / f"seed{s}" / "ser_paper" / "scores"
        scores.mkdir(parents=True)
        for it in (1, 2):
            np.savez(scores / f"{it}.npz", r_a=rng.normal(size=30), r_b=rng.normal(size=30))
    from ser.experiment import summarise

    summary = summarise(per_seed, cfg) | {"commit": "abc1234", "wall_seconds": 60.0}
    return tmp_path, summary, per_seed, cfg


def test_a_non_finite_reward_counts_as_wrong_in_the_experiments_per_pair_correctness(monkeypatch):
    """r_chosen > r_rejected with both finite: +inf > 1 and 2 > -inf are not right answers, a NaN is neither."""
    import ser.experiment as experiment

    r_c, r_r = np.array([2.0, np.inf, 2.0, np.nan, 0.0]), np.array([1.0, 1.0, -np.inf, 1.0, 1.0])
    monkeypatch.setattr(experiment, "rm_scores", lambda rm, tok, pairs, cfg: (r_c, r_r))
    assert experiment._correct(None, None, [], None).tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_summary_paired_differences_and_the_gap_closed_only_where_the_gap_is_established():
    """One seed, 20 test pairs. seed_only right on 10, full_label on all 20: gap +0.5, every resample positive.
    ssrm right on the seed's 10 and 5 more: +0.25 over seed_only (each pair it adds is +1), half the gap. A
    full_label right on one pair more than seed_only (+0.05) has a gap whose CI reaches 0: no share reported."""
    from ser.experiment import summarise

    cfg = load_config(None, ["experiment.seeds=[0]", "experiment.bootstrap=500",
                             "experiment.methods=[seed_only, full_label, ssrm]"])
    seed, ssrm = np.array([1.0] * 10 + [0.0] * 10), np.array([1.0] * 15 + [0.0] * 5)
    out = summarise({0: {"seed_only": {"correct": seed}, "full_label": {"correct": np.ones(20)},
                         "ssrm": {"correct": ssrm}}}, cfg)
    m = out["methods"]
    assert out["gap"]["diff"] == 0.5 and out["gap"]["ci95"][0] > 0
    assert m["ssrm"]["vs_seed_only"]["diff"] == 0.25 and m["ssrm"]["gap_closed"] == 0.5
    assert 0 < m["ssrm"]["vs_seed_only"]["ci95"][0] <= 0.25 <= m["ssrm"]["vs_seed_only"]["ci95"][1]
    assert "vs_seed_only" not in m["seed_only"] and "vs_ssrm" not in m["full_label"]  # a baseline is not paired to ssrm
    assert m["full_label"]["gap_closed"] == 1.0 and m["seed_only"]["gap_closed"] == 0.0
    barely = np.array([1.0] * 11 + [0.0] * 9)
    out = summarise({0: {"seed_only": {"correct": seed}, "full_label": {"correct": barely},
                         "ssrm": {"correct": ssrm}}}, cfg)
    assert abs(out["gap"]["diff"] - 0.05) < 1e-12 and out["gap"]["ci95"][0] <= 0
    assert all(r["gap_closed"] is None for r in out["methods"].values())


def _page(path: Path) -> ET.Element:
    """The page parsed strictly (well-formed XHTML, or an error)."""
    text = path.read_text(encoding="utf-8")
    assert "<pre" not in text and "|---" not in text and "![" not in text
    return ET.fromstring(text)


def _headed(page: ET.Element) -> list[tuple[str, ET.Element]]:
    """(the text of the last heading before it, element) for each <table> and <img> in document order."""
    heading, out = None, []
    for el in page.find("body").iter():
        if el.tag in ("h1", "h2", "h3"):
            heading = "".join(el.itertext())
        elif el.tag in ("table", "img"):
            out.append((heading, el))
    return out


def _header_cells(table: ET.Element) -> list[str]:
    return ["".join(th.itertext()) for th in table.find("thead").iter("th")]


def _is_png(img: ET.Element) -> bool:
    src = img.get("src")
    return src.startswith("data:image/png;base64,") and base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG"


def test_experiment_report_is_a_web_page(experiment_results):
    from ser.experiment import write_report

    root, summary, per_seed, cfg = experiment_results
    write_report(root, summary, per_seed, cfg)
    page = _page(root / "report.html")
    items = _headed(page)
    tables = [(h, el) for h, el in items if el.tag == "table"]
    assert [(h, _header_cells(t)) for h, t in tables] == [
        ("Test accuracy", ["method", "test accuracy", "95% CI", "per seed", "vs seed_only", "vs ssrm", "gap closed"]),
        ("Pseudo-label precision per iteration (against the hidden human labels)",
         ["seed", "method", "iteration", "status", "status-1", "status-2", "added", "precision (expected)",
          "longer (seed)", "val acc / log-lik", "test acc", "acc L / acc S"])]
    methods = [t.find("tbody")[i][0].text for t, i in [(tables[0][1], i) for i in range(5)]]
    assert methods == ["seed_only", "full_label", "ser_paper", "ser_code", "ssrm"]
    stop_cells = ["".join(td.itertext()) for td in tables[1][1].iter("td")]
    assert "stop: iteration 3: too few | confident pairs" in stop_cells  # a '|' in a cell stays in its cell
    # one closing row per run (2 seeds x 3 methods), the last: a resumed run's earlier close is not shown
    assert stop_cells.count("stop: iteration 3: too few | confident pairs") == 6
    assert "stop: an earlier close" not in stop_cells
    assert "0.800 (0.750)" in stop_cells  # seed 0: the audited precision, the calibrated estimate in brackets
    images = [(h, el.get("alt")) for h, el in items if el.tag == "img"]
    assert images == [
        ("Test accuracy", "Test accuracy per iteration (mean over seeds, 95% CI)"),
        ("Pseudo-label precision per iteration (against the hidden human labels)",
         "Pseudo-label precision per iteration"),
        ("Pseudo-label precision per iteration (against the hidden human labels)", "Pairs selected per iteration"),
        ("Pseudo-label precision per iteration (against the hidden human labels)",
         "Status-1 / status-2 candidates per iteration (first seed)"),
        ("Pool rewards", "Pool rewards seen at each iteration (ser_paper, first seed)")]
    assert all(_is_png(el) for _, el in items if el.tag == "img")
    md = (root / "report.md").read_text()  # the Markdown keeps the images as files beside it
    assert "![Pairs selected per iteration](selected.png)" in md and (root / "selected.png").exists()


class _KeepFigures:
    """pyplot, but the figures stay open for the test to inspect."""

    def __init__(self):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plt, self.axes = plt, []

    def subplots(self, *args, **kwargs):
        fig, ax = self.plt.subplots(*args, **kwargs)
        self.axes.append(ax)
        return fig, ax

    def close(self, fig):
        pass


def test_accuracy_plot_has_ci_bands_and_a_labelled_full_label_line(experiment_results):
    from matplotlib.collections import PolyCollection

    from ser.experiment import _accuracy_plot

    root, summary, per_seed, _ = experiment_results
    keep = _KeepFigures()
    _accuracy_plot(root / "accuracy.png", summary, per_seed, ["ser_paper", "ser_code", "ssrm"], keep,
                   shared_pairs=False)
    ax = keep.axes[0]
    labels = ax.get_legend_handles_labels()[1]
    full = summary["methods"]["full_label"]["accuracy"]
    assert labels == ["ser_paper", "ser_code", "ssrm", f"full_label (all human labels): {full:.3f}"]
    assert ax.get_legend() is not None
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 3 and len(ax.patches) == 1  # a CI band per method (fill_between); the full-label RM's
    # ser_code's seeds stopped after iteration 1: the line ends there; ser_paper's ends at its table accuracy
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["ser_code"].get_xdata()) == [0, 1]
    assert lines["ser_paper"].get_ydata()[-1] == pytest.approx(np.mean([0.7, 0.72]))
    keep.plt.close("all")


def test_curve_report_is_a_web_page(tmp_path):
    from ser.experiment import write_curve_report

    cfg = load_config(None, ["experiment.seeds=[0, 1]"])
    points = [{"labels": n, "accuracy": a, "ci95": [a - 0.05, a + 0.05], "per_seed": [a - 0.01, a + 0.01]}
              for n, a in [(8, 0.55), (16, 0.6), (96, 0.7)]]
    write_curve_report(tmp_path, {"points": points, "all_labels": 96, "wall_seconds": 12.0, "commit": "abc1234"}, cfg)
    items = _headed(_page(tmp_path / "report.html"))
    assert [(h, el.tag) for h, el in items] == [("Learning curve", "table"), ("Learning curve", "img")]
    assert _header_cells(items[0][1]) == ["human labels", "test accuracy", "95% CI", "per seed"]
    assert [row[0].text for row in items[0][1].find("tbody")] == ["8", "16", "96"]
    assert _is_png(items[1][1])
    assert "| 96 | 0.7000 |" in (tmp_path / "curve.md").read_text()  # what `ser curve` prints

"""The MLflow UI in a real browser: runs shaped like a sweep (a parent run, trials nested under it with the
tags, names, params and metrics `rayflow.orchestrate.sweep` logs) on a real `mlflow server`, opened at the URLs
`track.ui_urls` gives, rendered by headless Chromium; the checks read the rendered DOM.

Needs a Chromium binary (Debian: `apt-get install chromium`; or set CHROMIUM=/path/to/chrome); skipped without.
MLflow's UI is a single-page app: the page is only complete once its API calls have answered, so every render
runs under --virtual-time-budget and is retried with a longer budget when the values are not there yet.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import pytest

from rayflow import track
from rayflow.orchestrate.report import KEYS_TAG, OVERRIDES_TAG, ROLE_TAG, STATUS_TAG, SWEEP_TAG, TRIAL_TAG
from rayflow.orchestrate.sweep import trial_key, trial_run_name
from tests.conftest import stop_process_group

CHROMIUM = os.environ.get("CHROMIUM") or next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary (apt-get install chromium, or set CHROMIUM=...): "
                       "the MLflow UI test renders the real UI in a headless browser"),
]

SWEEP = "ui-sweep"
EXPERIMENT = "rayflow-ui"
# (distill.steps, distill.lr_ratio) per trial, and the metrics each one logs: exact in binary and short in decimal,
# so the UI shows them as written here.
TRIALS = [(1, 0.5), (2, 0.5), (1, 2.0), (2, 2.0)]
WINDOW = (1920, 1600)
BUDGETS_MS = (15_000, 30_000, 60_000)


def _trial_metrics(i: int) -> dict[str, float]:
    return {"eval.student.fd": 0.875 + 0.25 * i, "eval.student.accuracy": 0.93 - 0.02 * i,
            "eval.student.precision": 0.81 + 0.01 * i, "eval.student.nfe": float(TRIALS[i][0])}


def _shown(value: float) -> str:
    return f"{value:g}"  # how the UI prints these numbers: 1.0 -> "1", 0.875 -> "0.875"


@pytest.fixture(scope="module")
def sweep_runs(mlflow_server: str) -> dict:
    """A finished sweep as `run_sweep`/`run_trial` leave it in MLflow (same helpers, tags and names)."""
    uri = mlflow_server
    parent = track.start_run(
        uri, SWEEP, {"distill.lr_student": 2e-06, "sweep.name": SWEEP},
        tags={SWEEP_TAG: SWEEP, ROLE_TAG: "parent", "rayflow.task": "sweep",
              KEYS_TAG: "distill.steps,distill.lr_ratio"},
        experiment=EXPERIMENT, run_key=f"sweep/{SWEEP}",
    )
    track.log_metrics(uri, parent, {"eval.teacher_ancestral.fd": 0.75, "eval.teacher_ancestral.nfe": 16}, step=0)
    for i, (steps, ratio) in enumerate(TRIALS):
        swept = {"distill.steps": steps, "distill.lr_ratio": ratio}
        trial_id = f"5e1f0_{i:05d}"  # Tune's trial id format
        run_id = track.start_run(
            uri, trial_run_name(swept), {**swept, "distill.lr_student": 2e-06, "data.source": "digits"},
            tags={SWEEP_TAG: SWEEP, ROLE_TAG: "trial", TRIAL_TAG: trial_id,
                  OVERRIDES_TAG: " ".join(f"{k}={v}" for k, v in sorted(swept.items()))},
            experiment=EXPERIMENT, run_key=trial_key(SWEEP, trial_id), parent_run_id=parent,
        )
        track.log_metrics(uri, run_id, {"eval.proxy_fd": 3.5 - i}, step=512)  # history: the UI shows the latest
        track.log_metrics(uri, run_id, {"eval.proxy_fd": 1.5 + 0.125 * i}, step=1024)
        track.log_metrics(uri, run_id, _trial_metrics(i), step=1024)
        track.set_tags(uri, run_id, {STATUS_TAG: "completed"})
        track.end_run(uri, run_id, "FINISHED")
    track.end_run(uri, parent, "FINISHED")
    children = track.child_runs(uri, parent)  # oldest first: the order of TRIALS
    experiment_id = track.client(uri).get_experiment_by_name(EXPERIMENT).experiment_id
    return {"uri": uri, "parent": parent, "children": children, "experiment_id": experiment_id,
            "urls": track.ui_urls(uri, experiment_id, [r.info.run_id for r in children])}


class _Texts(HTMLParser):
    """The visible text nodes of a rendered page, in document order (scripts and styles left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self._skip += tag in ("script", "style")

    def handle_endtag(self, tag: str) -> None:
        self._skip -= tag in ("script", "style")

    def handle_data(self, data: str) -> None:
        if not self._skip and data.strip():
            self.texts.append(data.strip())


def _texts(html: str) -> list[str]:
    parser = _Texts()
    parser.feed(html)
    return parser.texts


def _render(url: str, out: Path, budget_ms: int, profile: Path) -> str:
    """Load url in headless Chromium; returns the DOM after budget_ms of virtual time, writes a screenshot."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
           f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
           f"--virtual-time-budget={budget_ms}", f"--screenshot={out}", "--dump-dom", url]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        dom, err = proc.communicate(timeout=120 + budget_ms / 1000)
    finally:
        stop_process_group(proc)  # renderer and GPU helpers with it
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {err[-2000:]}"
    return dom


def _open(url: str, out: Path, ready: Callable[[list[str]], bool]) -> list[str]:
    """Render until ready(texts) holds, with longer virtual-time budgets; returns the last page's texts."""
    for budget in BUDGETS_MS:
        profile = out.parent / f"{out.stem}-profile-{budget}"  # a fresh profile: nothing cached or remembered
        texts = _texts(_render(url, out, budget, profile))
        if ready(texts):
            break
    return texts


def _section(texts: list[str], start: str, end: str) -> list[str]:
    """The texts between the collapsible section headers `start` and `end` of the compare page."""
    i = texts.index(start)
    return texts[i + 1 : texts.index(end, i + 1)]


def test_runs_table_url_lands_on_the_experiments_runs(sweep_runs: dict, tmp_path: Path) -> None:
    url = sweep_runs["urls"]["runs"]
    assert url == f"{sweep_runs['uri']}/#/experiments/{sweep_runs['experiment_id']}/runs"
    n = 1 + len(TRIALS)
    texts = _open(url, tmp_path / "runs.png", lambda t: SWEEP in t)
    page = " ".join(texts)
    # The runs table (not the GenAI overview a bare `mlflow ui` opens on): the sweep's parent run, its trials
    # counted (they sit collapsed under the parent until it is expanded).
    assert "Training runs" in texts and SWEEP in texts, page[:3000]
    assert re.search(rf"\b{n} matching runs\b", page), page[:3000]
    assert (tmp_path / "runs.png").stat().st_size > 10_000


def test_compare_view_shows_every_trial_with_its_params_and_metrics(sweep_runs: dict, tmp_path: Path) -> None:
    children, url = sweep_runs["children"], sweep_runs["urls"]["compare"]
    names = [trial_run_name({"distill.steps": s, "distill.lr_ratio": r}) for s, r in TRIALS]
    assert [c.info.run_name for c in children] == names
    shot = tmp_path / "compare.png"
    last_fd = _shown(_trial_metrics(len(TRIALS) - 1)["eval.student.fd"])
    texts = _open(url, shot, lambda t: "Run Name:" in t and last_fd in t and "Artifacts" in t)
    page = " ".join(texts)
    assert f"Comparing {len(TRIALS)} Runs from 1 Experiment" in texts, page[:3000]

    i = texts.index("Run Name:")
    assert texts[i + 1 : i + 1 + len(names)] == names, page[:3000]

    params = _section(texts, "Parameters", "Metrics")
    for key, column in (("distill.steps", 0), ("distill.lr_ratio", 1)):
        j = params.index(key)
        assert params[j + 1 : j + 1 + len(TRIALS)] == [str(t[column]) for t in TRIALS], params

    # The metrics grid lists the keys (alphabetically), then one row of values per key, a column per run.
    metrics = [t for t in _section(texts, "Metrics", "Artifacts") if t != "Show diff only"]
    keys = sorted({*_trial_metrics(0), "eval.proxy_fd"})
    assert metrics[: len(keys)] == keys, metrics
    values = metrics[len(keys) :]
    assert len(values) == len(keys) * len(TRIALS), metrics
    shown = {k: values[r * len(TRIALS) : (r + 1) * len(TRIALS)] for r, k in enumerate(keys)}
    for key in _trial_metrics(0):
        assert shown[key] == [_shown(_trial_metrics(i)[key]) for i in range(len(TRIALS))], (key, shown)
    assert shown["eval.proxy_fd"] == [_shown(1.5 + 0.125 * i) for i in range(len(TRIALS))]  # latest, not first

    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    print(f"compare view screenshot: {shot}")
    if os.environ.get("RAYFLOW_UI_SCREENSHOT"):  # how docs/mlflow-compare.png is made
        shutil.copyfile(shot, os.environ["RAYFLOW_UI_SCREENSHOT"])

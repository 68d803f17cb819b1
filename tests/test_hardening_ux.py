"""What a new user meets: readable plots, quiet ranks, a finished run left alone, results that say where."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np

from clip_tao.cli import main
from clip_tao.io.plots import rank_bins
from tests.conftest import REPO


def test_rank_histogram_bins_never_merge_small_ranks():
    counts, _ = np.histogram([1, 2, 2, 3, 3, 3], bins=rank_bins(3))
    assert counts.tolist() == [1, 2, 3]
    edges = rank_bins(5000)
    assert np.all(np.diff(edges) > 0) and edges[0] == 0.5 and edges[-1] == 5000.5
    counts, _ = np.histogram(np.arange(1, 5001), bins=edges)
    assert counts.sum() == 5000 and counts[:10].tolist() == [1] * 10


def test_only_rank_zero_logs_info():
    code = (
        "import logging; from clip_tao.cli import _setup_logging; _setup_logging(); "
        "log = logging.getLogger('clip_tao.check'); log.info('info line'); log.warning('warning line')"
    )
    for rank, info_shown in (("0", True), ("1", False)):
        env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": rank}
        err = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stderr
        assert ("info line" in err) is info_shown and "warning line" in err


def test_a_finished_run_is_left_alone_and_evaluate_says_where(tiny_spec, tmp_path, capsys, caplog):
    spec = tiny_spec(num_train=32, train={"num_epochs": 1, "precision": "fp32"})
    assert main(["train", "-e", str(spec)]) == 0
    assert "epoch 000 (1 of 1)" in capsys.readouterr().err  # the file index and the count, not "0/0"
    train = tmp_path / "results" / "train"
    events = sorted(p.name for p in (train / "tensorboard").iterdir())

    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["train", "-e", str(spec)]) == 0
    assert "nothing to do" in caplog.text and "random initialisation" not in caplog.text
    assert sorted(p.name for p in (train / "tensorboard").iterdir()) == events  # no empty event file
    assert "Training summary" in capsys.readouterr().out

    assert main(["evaluate", "-e", str(spec), f"evaluate.checkpoint={train / 'clip_latest.pth'}"]) == 0
    assert f"results: {tmp_path / 'results' / 'evaluate' / 'results.json'}" in capsys.readouterr().out


def test_hub_log_lines_are_printed_once():
    code = (
        "from clip_tao.cli import _setup_logging; _setup_logging(); "
        "from huggingface_hub.utils import logging; logging.get_logger('huggingface_hub.utils._http')"
        ".warning('Retrying in 1s [Retry 1/5].')"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    err = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stderr
    assert err.count("Retrying in 1s") == 1

"""The console: a compact resolved config, the known-noise filter in one place."""
from __future__ import annotations

import io
import warnings

from rich.console import Console

from shiftlab.trainers.console import KNOWN_NOISE, config_rows, print_config, quiet_known_noise


def test_compact_config_shows_choices_resolved_overrides_and_the_run_dir(run_cfg):
    cfg = run_cfg("optimizer=sgd", "optimizer.lr=0.05", "model.hidden=[32,16]")
    rows = config_rows(cfg, choices={"optimizer": "sgd", "model": "mlp", "experiment": None},
                       overrides=["optimizer=sgd", "optimizer.lr=0.05", "model.hidden=[32,16]",
                                  "paths.output_dir=${oc.env:HOME}"])
    assert ("group", "optimizer", "sgd") in rows and ("group", "model", "mlp") in rows
    assert ("override", "optimizer.lr", "0.05") in rows and ("override", "model.hidden", "[32, 16]") in rows
    assert not any("${" in value for _, _, value in rows)
    assert rows[-1] == ("run", "directory", str(cfg.paths.output_dir))
    buf = io.StringIO()
    print_config(cfg, Console(file=buf, width=120))
    assert len(buf.getvalue().splitlines()) < 30


def test_known_noise_is_hidden_and_other_warnings_are_not():
    assert all(len(why) > 10 for _, why in KNOWN_NOISE)  # every filter says why it is safe
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_known_noise()
        warnings.warn("The 'train_dataloader' does not have many workers which may be a bottleneck.")
        warnings.warn("something about the user's run")
    assert [str(w.message) for w in seen] == ["something about the user's run"]

"""trainer.precision: the values that run on CPU do, in both batching regimes; the rest are refused
up front in one line."""
from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from shiftlab.trainers.config_checks import ConfigError, check_config
from shiftlab.trainers.full_batch import accumulate_full_gradient
from shiftlab.trainers.summary import evaluate_split
from shiftlab.trainers.train import train

NO_GPU = not torch.cuda.is_available()


class _Dtypes(L.Callback):
    """Records the dtype of the model's weights and of the loss Lightning saw."""

    def __init__(self) -> None:
        self.weights: torch.dtype | None = None

    def on_train_end(self, trainer, pl_module) -> None:
        self.weights = next(pl_module.model.parameters()).dtype


@pytest.mark.parametrize("batching", ["mini", "full"])
@pytest.mark.parametrize("precision,dtype", [("64-true", torch.float64), ("32-true", torch.float32),
                                             ("bf16-mixed", torch.float32)])
def test_precision_runs_on_cpu(run_cfg, precision, dtype, batching):
    seen = _Dtypes()
    extra = ["optimizer=sgd", "optimizer.lr=0.5"] if batching == "full" else []
    summary = train(run_cfg(f"trainer.precision={precision}", f"batching={batching}", "trainer.max_epochs=2",
                            "callbacks=default", "callbacks.rich_progress_bar=null", "callbacks.model_summary=null",
                            *extra), extra_callbacks=[seen])
    assert summary["status"] == "completed", summary
    assert seen.weights == dtype
    # the final train-split evaluation (summary.evaluate_split) and the test ran in that precision
    for key in ("train/loss", "train/acc", "test/acc", "val/loss"):
        assert isinstance(summary[key], float) and math.isfinite(summary[key]), (key, summary[key])
    assert summary["train/acc"] > (0.5 if batching == "mini" else 0.2), summary


def test_float64_model_on_float32_data_matches_float32(tmp_path):
    """evaluate_split and the full-batch accumulation take float32 tensors from the data module:
    a float64 copy of a model gives the same loss / gradient to float32 precision."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 8, generator=g), torch.randint(0, 3, (300,), generator=g)
    m32 = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    m64 = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    m64.load_state_dict({k: v.double() for k, v in m32.state_dict().items()})
    e32, e64 = evaluate_split(m32, x, y, torch.device("cpu")), evaluate_split(m64, x, y, torch.device("cpu"), chunk=64)
    assert e64["loss"] == pytest.approx(e32["loss"], rel=1e-5) and e64["acc"] == e32["acc"]
    l32 = accumulate_full_gradient(m32, x, y, chunk_size=128, n_total=300, device="cpu")
    l64 = accumulate_full_gradient(m64, x, y, chunk_size=100, n_total=300, device="cpu")
    assert l64.dtype == torch.float64 and float(l64) == pytest.approx(float(l32), rel=1e-5)
    for p32, p64 in zip(m32.parameters(), m64.parameters()):
        assert p64.grad.dtype == torch.float64
        torch.testing.assert_close(p64.grad.float(), p32.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("value", ["16-true", "bf16-true", "transformer-engine", "32", "64", "16"])
def test_other_precisions_are_refused(run_cfg, value):
    with pytest.raises(ConfigError, match=rf"^trainer\.precision={value} is not allowed; allowed: 64-true, 32-true, "
                                          r"bf16-mixed, 16-mixed$"):
        check_config(run_cfg(f"trainer.precision='{value}'"))


@pytest.mark.skipif(not NO_GPU, reason="fp16 autocast runs on a GPU")
def test_16_mixed_is_refused_on_cpu(run_cfg):
    """Lightning would silently switch 16-mixed to bf16-mixed on CPU."""
    with pytest.raises(ConfigError, match="trainer.precision=16-mixed is not allowed on CPU"):
        check_config(run_cfg("trainer.precision=16-mixed"))


def test_64_true_with_a_float32_probe_is_refused(run_cfg):
    with pytest.raises(ConfigError, match=r"trainer.precision=64-true is not allowed with callbacks\.(memorization|noise_scale|sharpness) "):
        check_config(run_cfg("trainer.precision=64-true", "callbacks=batch_noise"))

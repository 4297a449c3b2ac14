"""Exact full-batch gradient descent: one step equals the analytic full-data gradient step."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from shiftlab.trainers.build import build_datamodule, build_module
from shiftlab.trainers.full_batch import accumulate_full_gradient, grad_norm_penalty_fd


def _one_full_batch_epoch(run_cfg, chunk: int):
    cfg = run_cfg("data=synthetic", "model.hidden=[]", "norm=none", "optimizer=sgd", "optimizer.lr=0.5",
                  "scheduler=constant", "batching=full", f"batching.chunk_size={chunk}", "trainer.max_epochs=1",
                  "test=false")
    L.seed_everything(cfg.seed, verbose=False)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    module = build_module(cfg, dm)
    linear = module.model.net[-1]
    w0, b0 = linear.weight.detach().clone(), linear.bias.detach().clone()
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    trainer.fit(module, datamodule=dm)
    x, y = dm.train_set.x.double(), dm.train_set.y
    p = torch.softmax(x @ w0.double().T + b0.double(), dim=1)
    residual = p - F.one_hot(y, p.shape[1]).double()
    grad_w, grad_b = residual.T @ x / x.shape[0], residual.mean(0)
    return linear, w0 - 0.5 * grad_w.float(), b0 - 0.5 * grad_b.float(), x.shape[0]


@pytest.mark.parametrize("chunk", [13, 100_000])
def test_full_batch_step_equals_analytic_gradient_step(run_cfg, chunk):
    linear, w_expected, b_expected, n = _one_full_batch_epoch(run_cfg, chunk)
    assert n % 13 != 0  # the 13-sample chunking ends with an uneven chunk
    torch.testing.assert_close(linear.weight.detach(), w_expected, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(linear.bias.detach(), b_expected, atol=2e-6, rtol=1e-5)


def test_accumulated_gradient_is_chunking_invariant_for_linear_regression():
    g = torch.Generator().manual_seed(0)
    x, w_true = torch.randn(101, 5, generator=g, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    y = x @ w_true + 0.1 * torch.randn(101, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(5, 1, bias=False).double()
    analytic = 2 * x.T @ (x @ model.weight.detach().T - y) / x.shape[0]  # grad of mean squared error
    for chunk in (1, 7, 101, 500):
        model.zero_grad()
        accumulate_full_gradient(model, x, y, chunk, x.shape[0], "cpu",
                                 loss_fn=lambda out, t: ((out - t) ** 2).sum(dim=1))
        torch.testing.assert_close(model.weight.grad, analytic.T, atol=1e-12, rtol=1e-10)


def test_grad_norm_penalty_matches_double_backprop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    params = list(model.parameters())
    alpha = 0.3

    def recompute() -> None:
        for p in params:
            p.grad = None
        F.cross_entropy(model(x), y).backward()

    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
    objective = F.cross_entropy(model(x), y) + alpha / 2 * sum((g ** 2).sum() for g in grads)
    exact = torch.autograd.grad(objective, params)
    recompute()
    grad_norm_penalty_fd(params, recompute, alpha, eps=1e-4)
    for p, e in zip(params, exact):
        torch.testing.assert_close(p.grad, e, atol=1e-5, rtol=1e-4)

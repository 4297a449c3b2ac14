"""Geiping et al.'s gradient-norm penalty in the full-batch step, against double backprop.

The regularized objective is ``L + (alpha/2) ||grad L||^2``; its gradient ``g + alpha H g`` is what
``shiftlab.trainers.full_batch.grad_norm_penalty_fd`` approximates with one extra gradient evaluation.
"""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from shiftlab.trainers.build import build_datamodule, build_module
from shiftlab.trainers.full_batch import grad_norm_penalty_fd


def _double_backprop_grad(model: nn.Module, x, y, alpha: float) -> list[torch.Tensor]:
    params = list(model.parameters())
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    objective = loss + alpha / 2 * sum((g**2).sum() for g in grads)
    return [g.detach() for g in torch.autograd.grad(objective, params)]


@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_full_batch_step_with_penalty_equals_double_backprop_step(run_cfg, alpha):
    lr, hidden = 0.2, 16
    cfg = run_cfg(
        "data=synthetic", "data.num_samples=300", f"model.hidden=[{hidden}]", "model.activation=tanh",
        "norm=none", "optimizer=sgd", f"optimizer.lr={lr}", "scheduler=constant", "batching=full",
        "batching.chunk_size=37", f"batching.grad_norm_penalty={alpha}", "batching.grad_penalty_eps=1e-3",
        "trainer.max_epochs=1", "test=false",
    )
    L.seed_everything(cfg.seed, verbose=False)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    module = build_module(cfg, dm)
    before = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    reference = type(module.model)(dm.input_shape, dm.num_classes, hidden=[hidden], activation="tanh")
    reference.load_state_dict(before)
    reference.double()
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    trainer.fit(module, datamodule=dm)
    expected_grads = _double_backprop_grad(reference, dm.train_set.x.double(), dm.train_set.y, alpha)
    for (name, p), g in zip(reference.named_parameters(), expected_grads):
        got = module.model.state_dict()[name].double()
        step = got - before[name].double()
        torch.testing.assert_close(step, -lr * g, atol=1e-5, rtol=2e-3, msg=name)
    # the penalty must change the step (else the test above could not fail for alpha > 0)
    if alpha:
        plain = _double_backprop_grad(reference, dm.train_set.x.double(), dm.train_set.y, 0.0)
        diff = max(float((a - b).abs().max()) for a, b in zip(plain, expected_grads))
        assert diff > 1e-3


def test_fd_error_shrinks_with_eps_and_restores_buffers():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 3))
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    model.train()
    params = list(model.parameters())
    buffers = [b for b in model.buffers() if b.is_floating_point()]

    def recompute() -> None:
        for p in params:
            p.grad = None
        F.cross_entropy(model(x), y).backward()

    # double backprop in float64 on a copy (train-mode BN: batch statistics, as in the FD passes)
    ref = nn.Sequential(nn.Linear(5, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 3)).double()
    ref.load_state_dict(model.state_dict())
    exact = _double_backprop_grad(ref, x.double(), y, alpha=1.0)
    errors = []
    for eps in (1e-1, 1e-2):
        recompute()
        params_before = [p.detach().clone() for p in params]
        buffers_before = [b.clone() for b in buffers]
        grad_norm_penalty_fd(params, recompute, 1.0, eps=eps, buffers=buffers)
        for p, q in zip(params, params_before):
            assert torch.equal(p.detach(), q)
        for b, c in zip(buffers, buffers_before):
            assert torch.equal(b, c)
        errors.append(max(float((p.grad.double() - e).abs().max()) for p, e in zip(params, exact)))
    assert errors[1] < errors[0]
    assert errors[1] < 5e-3

"""Framework overhead: shiftlab's epoch time vs a minimal hand-written PyTorch loop.

Both train the same model on the same data with the same batch size and optimizer, and run one
validation pass per epoch. shiftlab runs as users run it (Lightning Trainer, torchmetrics,
logging, divergence guard), with the progress bar off since the hand loop prints nothing.

    python -m shiftlab.experiments.bench_overhead [--config digits_mlp|mnist1d_cnn] [--epochs 8]

Prints the median epoch time of each and the ratio (target: <= 1.15).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from shiftlab.experiments import harness
from shiftlab.trainers.train import train

SETUPS = {
    "digits_mlp": ["data=digits", "model=mlp", "norm=batchnorm", "optimizer=adam", "batching.batch_size=64"],
    "mnist1d_cnn": ["experiment=mnist1d_cnn"],
}


def compose_cfg(setup: str, epochs: int, out: Path):
    overrides = SETUPS[setup] + [f"trainer.max_epochs={epochs}", "callbacks=none", "trainer.accelerator=cpu",
                                 "trainer.enable_checkpointing=false", "test=false", "logger=csv"]
    return harness.compose(overrides, out)


def shiftlab_epochs(cfg) -> list[float]:
    timer = harness.epoch_timer()  # wall time of each epoch: training batches plus the validation pass
    train(cfg, extra_callbacks=[timer])
    return timer.times


def hand_loop_epochs(cfg) -> list[float]:
    """The same work written by hand: shuffle, forward, backward, step; then one validation pass."""
    dm, module = harness.build(cfg)
    model = module.model
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optimizer.lr) if cfg.optimizer._target_ == "torch.optim.Adam" else \
        torch.optim.SGD(model.parameters(), lr=cfg.optimizer.lr)
    x, y, xv, yv = dm.train_set.x, dm.train_set.y, dm.val_set.x, dm.val_set.y
    bs, times = dm.batch_size, []
    history = []
    for epoch in range(cfg.trainer.max_epochs):
        t = time.perf_counter()
        model.train()
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(epoch))
        loss_sum, correct = torch.zeros(()), torch.zeros((), dtype=torch.long)
        for s in range(0, x.shape[0], bs):  # the same bookkeeping: epoch train loss and accuracy
            idx = perm[s:s + bs]
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * idx.numel()
            correct += (logits.detach().argmax(1) == y[idx]).sum()
        model.eval()
        val_loss, val_correct = 0.0, 0
        with torch.no_grad():
            for s in range(0, xv.shape[0], 1024):
                logits = model(xv[s:s + 1024])
                val_loss += float(F.cross_entropy(logits, yv[s:s + 1024], reduction="sum"))
                val_correct += int((logits.argmax(1) == yv[s:s + 1024]).sum())
        history.append((float(loss_sum) / x.shape[0], int(correct) / x.shape[0], val_loss / xv.shape[0],
                        val_correct / xv.shape[0]))
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(SETUPS), default="digits_mlp")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--out", default="outputs/bench_overhead")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both loops")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = compose_cfg(args.config, args.epochs, Path(args.out))
    ours = shiftlab_epochs(cfg)[1:]  # the first epoch includes one-off warm-up in both
    hand = hand_loop_epochs(cfg)[1:]
    m_ours, m_hand = statistics.median(ours), statistics.median(hand)
    result = {"config": args.config, "epochs_timed": len(ours), "batch_size": int(cfg.batching.batch_size),
              "shiftlab_epoch_s": round(m_ours, 4), "hand_loop_epoch_s": round(m_hand, 4),
              "ratio": round(m_ours / m_hand, 3), "target": 1.15, "threads": torch.get_num_threads(),
              "machine": harness.describe_machine()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

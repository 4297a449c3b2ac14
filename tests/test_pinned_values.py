"""The numbers shiftlab reports, pinned against computations that share no code with it.

Why: a reduction changed from ``sum`` to ``mean``, a transposed confusion matrix or a CRF loss
that lost its per-token normalization still trains and still passes "is a float in [0, 1]"
checks. Every figure here is recomputed with scikit-learn, numpy, a plain Python loop over
positions, or brute-force enumeration, from the final weights of a real (tiny) run.
"""
from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, log_loss, precision_recall_fscore_support

from shiftlab.callbacks.hessian import epsilon_sharpness
from shiftlab.trainers.models.chain import calibration, inference as chain
from shiftlab.trainers.models.crf import LinearChainCRF, PositionSoftmax
from shiftlab.trainers.models.chain.matching import confusion
from shiftlab.trainers.summary import evaluate_split
from shiftlab.trainers.train import train


class Capture(L.Callback):
    """Keeps the trained module and its data module for independent re-scoring."""

    def on_test_end(self, trainer, pl_module) -> None:
        self.module, self.dm = pl_module, trainer.datamodule


# --------------------------------------------------------------------------- classifier run
def _softmax64(logits: torch.Tensor) -> np.ndarray:
    z = logits.double().numpy()
    z = z - z.max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


def _train_and_capture(cfg, out):
    """Train ``cfg``; the returned summary, the saved summary.json, the final model (eval) and data."""
    cap = Capture()
    summary = train(cfg, extra_callbacks=[cap])
    saved = json.loads((out / "summary.json").read_text())
    return summary, saved, cap.module.model.eval(), cap.dm


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    from conftest import QUIET, compose_cfg

    out = tmp_path_factory.mktemp("clf") / "run"
    cfg = compose_cfg(QUIET + ["data=synthetic", "data.num_samples=700", "data.separation=0.6",
                               "data.label_noise=0.3", "model=mlp", "model.hidden=[16]", "norm=none",
                               "trainer.max_epochs=2", "batching.batch_size=64"], out)
    return _train_and_capture(cfg, out)


def test_classifier_train_val_figures_match_an_independent_loss(classifier_run):
    summary, saved, model, dm = classifier_run
    assert summary["status"] == "completed"
    with torch.no_grad():
        for split, key in ((dm.train_set, "train"), (dm.val_set, "val")):
            p = _softmax64(model(split.x))
            y = split.y.numpy()
            labels = list(range(dm.num_classes))
            # final weights: the summary's train figures are re-scored after training, the val
            # ones come from the last epoch's validation (run after its last step)
            assert saved[f"{key}/loss"] == pytest.approx(log_loss(y, p, labels=labels), rel=2e-5), key
            assert saved[f"{key}/acc"] == pytest.approx(accuracy_score(y, p.argmax(1)), abs=1e-6), key
        tr = dm.train_set
        assert int(tr.corrupted.sum()) == round(0.3 * len(tr))  # the noise really is in the train labels
        clean = accuracy_score(tr.y_true.numpy(), _softmax64(model(tr.x)).argmax(1))
        assert saved["train/acc_vs_true_labels"] == pytest.approx(clean, abs=1e-6)
        assert saved["train/acc_vs_true_labels"] != pytest.approx(saved["train/acc"], abs=1e-3)


def test_classifier_test_metrics_match_scikit_learn_both_confusion_axes(classifier_run):
    _, saved, model, dm = classifier_run
    with torch.no_grad():
        p = _softmax64(model(dm.test_set.x))
    y, pred = dm.test_set.y.numpy(), p.argmax(1)
    labels = list(range(dm.num_classes))
    assert saved["test/loss"] == pytest.approx(log_loss(y, p, labels=labels), rel=2e-5)
    assert saved["test/acc"] == pytest.approx(accuracy_score(y, pred), abs=1e-6)
    pm, rm, fm, _ = precision_recall_fscore_support(y, pred, labels=labels, average="macro", zero_division=0)
    pc, rc, _, _ = precision_recall_fscore_support(y, pred, labels=labels, average=None, zero_division=0)
    assert saved["test/precision_macro"] == pytest.approx(pm, abs=1e-6)
    assert saved["test/recall_macro"] == pytest.approx(rm, abs=1e-6)
    assert saved["test/f1_macro"] == pytest.approx(fm, abs=1e-6)
    assert saved["test/precision_per_class"] == pytest.approx(list(pc), abs=1e-6)
    assert saved["test/recall_per_class"] == pytest.approx(list(rc), abs=1e-6)
    cm = np.asarray(saved["test/confusion_matrix"])
    ref = confusion_matrix(y, pred, labels=labels)  # rows: true labels, columns: predictions
    assert (cm != cm.T).any()  # otherwise the orientation check below would be vacuous
    np.testing.assert_array_equal(cm, ref)
    np.testing.assert_array_equal(cm.sum(1), np.bincount(y, minlength=len(labels)))  # rows hold true labels


@pytest.mark.parametrize("overrides", [
    ["data=synthetic", "data.num_samples=300", "model=mlp", "model.hidden=[8]", "norm=none",
     "batching.batch_size=64"],  # 210 training samples: batches of 64, 64, 64 and 18
    ["experiment=pgm_crf", "data.num_sequences=80", "data.length=8", "data.min_length=3", "model.hidden=8",
     "model.embed_dim=4", "batching.batch_size=16"],  # sequences of unequal length: weight by tokens
    ["data=synthetic", "data.num_samples=300", "model=mlp", "model.hidden=[8]", "norm=none", "batching=full",
     "batching.chunk_size=50"],  # one full-batch step, loss accumulated over uneven chunks
], ids=["classifier", "crf", "classifier-full-batch"])
def test_logged_epoch_means_are_sample_weighted(tmp_path, overrides):
    """With a negligible learning rate the weights do not move, so the epoch means logged during
    training (``*_epoch_mean``, weighted by samples / tokens over uneven batches) must equal the
    final re-scored figures over the whole split."""
    from conftest import QUIET, compose_cfg

    cfg = compose_cfg(QUIET + overrides + ["optimizer=sgd", "optimizer.lr=1e-12", "scheduler=constant",
                                           "trainer.max_epochs=1", "test=false"], tmp_path / "run")
    s = train(cfg)
    assert s["train/loss_epoch_mean"] == pytest.approx(s["train/loss"], rel=1e-6)
    assert s["train/acc_epoch_mean"] == pytest.approx(s["train/acc"], abs=1e-6)  # logged in float32


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_evaluate_split_is_the_mean_loss_whatever_the_chunking(chunk):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(23, 5, generator=g), torch.randint(0, 3, (23,), generator=g)
    model = torch.nn.Linear(5, 3)
    got = evaluate_split(model, x, y, torch.device("cpu"), chunk=chunk)
    with torch.no_grad():
        p = _softmax64(model(x))
    assert got["loss"] == pytest.approx(log_loss(y.numpy(), p, labels=[0, 1, 2]), rel=1e-6)
    assert got["acc"] == pytest.approx(accuracy_score(y.numpy(), p.argmax(1)), abs=1e-12)
    assert model.training  # mode restored


# --------------------------------------------------------------------------- chain references
def _ref_forward_backward(u: torch.Tensor, trans, start, end):
    """Plain loops over positions (no log-matmul-exp): log alpha, log beta, log Z of one sequence."""
    T, K = u.shape
    alpha = [start + u[0]]
    for t in range(1, T):
        alpha.append(torch.stack([torch.logsumexp(alpha[-1] + trans[:, j], 0) for j in range(K)]) + u[t])
    beta = [end.clone()]
    for t in range(T - 2, -1, -1):
        beta.insert(0, torch.stack([torch.logsumexp(trans[i] + u[t + 1] + beta[0], 0) for i in range(K)]))
    log_z = torch.logsumexp(alpha[-1] + end, 0)
    return torch.stack(alpha), torch.stack(beta), log_z


def _ref_score(u, trans, start, end, tags) -> torch.Tensor:
    s = start[tags[0]] + end[tags[-1]] + sum(u[t, tags[t]] for t in range(len(tags)))
    return s + sum(trans[tags[t - 1], tags[t]] for t in range(1, len(tags)))


def _ref_viterbi(u, trans, start, end) -> list[int]:
    T, K = u.shape
    best = {(k,): float(start[k] + u[0, k]) for k in range(K)}
    for t in range(1, T):  # keep the best path ending in each state
        nxt = {}
        for j in range(K):
            path, score = max(((p, s + float(trans[p[-1], j])) for p, s in best.items()), key=lambda e: e[1])
            nxt[path + (j,)] = score + float(u[t, j])
        best = nxt
    return list(max(best.items(), key=lambda e: e[1] + float(end[e[0][-1]]))[0])


def _ref_crf_scores(model: LinearChainCRF, x: torch.Tensor, y: torch.Tensor, num_bins: int = 15) -> dict:
    """Per-token NLL, marginal-argmax accuracy, Viterbi sequence accuracy, ECE and the (true, pred)
    confusion of a CRF on (x, y), one sequence at a time in float64."""
    mask = x >= 0
    with torch.no_grad():
        u_all = model.unary(x, mask).double()
    trans, start, end = (p.detach().double() for p in (model.trans, model.start, model.end))
    nll, toks, hits, seq_hits, conf = 0.0, 0, 0, 0, []
    k = model.num_states
    cm = np.zeros((k, k), dtype=np.int64)
    for b in range(x.shape[0]):
        n = int(mask[b].sum())
        u, tags = u_all[b, :n], y[b, :n].tolist()
        a, be, log_z = _ref_forward_backward(u, trans, start, end)
        nll -= float(_ref_score(u, trans, start, end, tags) - log_z)
        marg = torch.exp(a + be - log_z)
        pred = marg.argmax(1).tolist()
        for t in range(n):
            cm[tags[t], pred[t]] += 1
            conf.append((float(marg[t].max()), pred[t] == tags[t]))
        hits += sum(p == q for p, q in zip(pred, tags))
        seq_hits += _ref_viterbi(u, trans, start, end) == tags
        toks += n
    ece = 0.0
    for lo in range(num_bins):
        inside = [(c, ok) for c, ok in conf if min(int(c * num_bins), num_bins - 1) == lo]
        if inside:
            ece += len(inside) / len(conf) * abs(np.mean([ok for _, ok in inside]) - np.mean([c for c, _ in inside]))
    return {"nll_per_token": nll / toks, "acc": hits / toks, "seq_acc": seq_hits / x.shape[0], "cm": cm,
            "ece": ece}


@pytest.fixture(scope="module")
def crf_run(tmp_path_factory):
    from conftest import QUIET, compose_cfg

    out = tmp_path_factory.mktemp("crf") / "run"
    cfg = compose_cfg(QUIET + ["experiment=pgm_crf", "data.num_sequences=150", "data.length=8",
                               "data.min_length=4", "trainer.max_epochs=2", "model.hidden=16",
                               "model.embed_dim=8", "data.label_noise=0.2"], out)
    return _train_and_capture(cfg, out)


def test_crf_run_train_figures_match_plain_loops(crf_run):
    summary, saved, model, dm = crf_run
    assert summary["status"] == "completed" and saved["model_kind"] == "supervised"
    tr = dm.train_set
    ref = _ref_crf_scores(model, tr.x, tr.y)  # against the given (noisy) labels
    assert saved["train/loss"] == pytest.approx(ref["nll_per_token"], rel=1e-5)
    assert saved["train/ll_per_token"] == pytest.approx(-ref["nll_per_token"], rel=1e-5)
    assert saved["train/acc"] == pytest.approx(ref["acc"], abs=1e-9)
    assert saved["train/seq_acc"] == pytest.approx(ref["seq_acc"], abs=1e-9)
    clean = _ref_crf_scores(model, tr.x, tr.y_true)
    assert saved["train/acc_vs_true_labels"] == pytest.approx(clean["acc"], abs=1e-9)


def test_crf_run_test_figures_and_confusion_axes_match_plain_loops(crf_run):
    _, saved, model, dm = crf_run
    te = dm.test_set
    ref = _ref_crf_scores(model, te.x, te.y)
    assert saved["test/loss"] == pytest.approx(ref["nll_per_token"], rel=1e-5)
    assert saved["test/ll_per_token"] == pytest.approx(-ref["nll_per_token"], rel=1e-5)
    assert saved["test/acc"] == pytest.approx(ref["acc"], abs=1e-9)
    assert saved["test/seq_acc"] == pytest.approx(ref["seq_acc"], abs=1e-9)
    assert saved["test/ece"] == pytest.approx(ref["ece"], abs=1e-6)
    cm = np.asarray(saved["test/confusion_matrix"])
    assert (ref["cm"] != ref["cm"].T).any()  # an asymmetric matrix, so a transpose is caught
    np.testing.assert_array_equal(cm, ref["cm"])  # rows: true states, columns: predicted
    y = te.y[te.x >= 0].numpy()
    np.testing.assert_array_equal(cm.sum(1), np.bincount(y, minlength=cm.shape[0]))


def test_unsupervised_hmm_confusion_rows_are_true_states_after_matching():
    """An HMM whose state ``s`` is true state ``perm[s]``: after Hungarian matching, the reported
    confusion must be the Bayes decoder's ``(true, predicted)`` matrix in the *true* labels."""
    from shiftlab.trainers.data.hmm_sequences import HMMSequenceDataModule
    from shiftlab.trainers.models.hmm import HMM
    from shiftlab.trainers.modules.sequence import SequenceModule
    from shiftlab.trainers.batching import MiniBatch

    dm = HMMSequenceDataModule(num_sequences=120, length=8, min_length=4, num_states=3, num_symbols=6,
                               emission_noise=0.4, seed=0)
    dm.setup()
    true = dm.true_params
    perm = [2, 0, 1]  # learned state s is true state perm[s]
    model = HMM.from_params(true.permuted(perm)).double()
    module = SequenceModule(model, None, None, MiniBatch(), num_classes=3)
    module.trainer = SimpleNamespace(datamodule=dm)
    scores, _ = module.evaluate_split(dm.test_set.x, dm.test_set.y)
    log_start, log_trans, log_emit = true.logs()
    k = 3
    cm = np.zeros((k, k), dtype=np.int64)
    for b in range(dm.test_set.x.shape[0]):
        x, y = dm.test_set.x[b], dm.test_set.y[b]
        n = int((x >= 0).sum())
        u = log_emit[:, x[:n]].T  # (n, K) log p(x_t | z_t = k)
        a, be, log_z = _ref_forward_backward(u, log_trans, log_start, torch.zeros(k, dtype=torch.float64))
        for t, p in enumerate((a + be).argmax(1).tolist()):  # Bayes decoder in true labels
            cm[int(y[t]), p] += 1
    assert (cm != cm.T).any()
    np.testing.assert_array_equal(np.asarray(scores["_confusion"]), cm)
    assert scores["acc"] == pytest.approx(np.trace(cm) / cm.sum(), abs=1e-12)
    # the model *is* the true model (relabelled): it sits exactly on the Bayes ceiling
    assert scores["bayes_acc"] == pytest.approx(scores["acc"], abs=1e-12)
    assert scores["gap_to_bayes_acc"] == pytest.approx(0.0, abs=1e-12)
    x = dm.test_set.x
    log_px = 0.0
    for b in range(x.shape[0]):
        n = int((x[b] >= 0).sum())
        log_px += float(_ref_forward_backward(log_emit[:, x[b, :n]].T, log_trans, log_start,
                                              torch.zeros(k, dtype=torch.float64))[2])
    n_tok = int((x >= 0).sum())
    assert scores["ll_per_token"] == pytest.approx(log_px / n_tok, rel=1e-9)  # log p(x) per token
    assert scores["true_ll_per_token"] == pytest.approx(log_px / n_tok, rel=1e-9)


# --------------------------------------------------------------------------- chain math, brute force
def _tiny_crf(seed: int = 0, K: int = 3, V: int = 5) -> LinearChainCRF:
    torch.manual_seed(seed)
    m = LinearChainCRF(V, num_tags=K, embed_dim=4, hidden=6).double()
    with torch.no_grad():
        for p in (m.trans, m.start, m.end):
            p.normal_()
    return m.eval()


def _ragged(seed: int = 1, B: int = 4, T: int = 4, K: int = 3, V: int = 5):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([T, 1, 3, 2][:B])
    mask = chain.lengths_to_mask(lengths, T)
    x = torch.randint(0, V, (B, T), generator=g).masked_fill(~mask, chain.PAD)
    y = torch.randint(0, K, (B, T), generator=g).masked_fill(~mask, chain.PAD)
    return x, y, mask


def test_crf_loss_is_the_brute_force_nll_per_token():
    model, (x, y, mask) = _tiny_crf(), _ragged()
    u = model.unary(x, mask).detach()
    trans, start, end = (p.detach() for p in (model.trans, model.start, model.end))
    total = 0.0
    for b in range(x.shape[0]):
        n = int(mask[b].sum())
        scores = [float(_ref_score(u[b, :n], trans, start, end, list(z)))
                  for z in itertools.product(range(3), repeat=n)]
        log_z = math.log(sum(math.exp(s) for s in scores))
        total -= float(_ref_score(u[b, :n], trans, start, end, y[b, :n].tolist())) - log_z
    n_tok = int(mask.sum())
    assert n_tok == 10
    assert float(model.loss(x, y, mask).detach()) == pytest.approx(total / n_tok, rel=1e-10)
    assert float(model.log_likelihood(x, mask, y).sum()) == pytest.approx(-total, rel=1e-10)


def test_crf_marginals_and_viterbi_match_brute_force():
    model, (x, _, mask) = _tiny_crf(seed=3), _ragged(seed=4)
    u = model.unary(x, mask).detach()
    trans, start, end = (p.detach() for p in (model.trans, model.start, model.end))
    marg = model.log_marginals(x, mask).exp().detach()
    path = model.decode(x, mask)
    for b in range(x.shape[0]):
        n = int(mask[b].sum())
        paths = list(itertools.product(range(3), repeat=n))
        w = torch.tensor([float(_ref_score(u[b, :n], trans, start, end, list(z))) for z in paths],
                         dtype=torch.float64)
        p = torch.softmax(w, 0)
        ref = torch.zeros(n, 3, dtype=torch.float64)
        for z, pz in zip(paths, p):
            ref[torch.arange(n), torch.tensor(z)] += pz
        torch.testing.assert_close(marg[b, :n], ref, atol=1e-10, rtol=1e-8)
        assert path[b, :n].tolist() == list(paths[int(w.argmax())])
        assert (path[b, n:] == chain.PAD).all()


def test_position_softmax_loss_is_mean_over_valid_tokens():
    torch.manual_seed(0)
    model, (x, y, mask) = PositionSoftmax(5, num_tags=3, embed_dim=4, hidden=6).double().eval(), _ragged()
    lp = torch.log_softmax(model.encoder(x), -1).detach()
    ref = -np.mean([float(lp[b, t, y[b, t]]) for b in range(4) for t in range(4) if mask[b, t]])
    assert float(model.loss(x, y, mask)) == pytest.approx(ref, rel=1e-10)
    ll = model.log_likelihood(x, mask, y).detach()
    assert float(-ll.sum() / mask.sum()) == pytest.approx(ref, rel=1e-10)


def test_confusion_helper_orientation_is_pred_rows_target_columns():
    # documented: C[i, j] counts pred == i and target == j (the matching's convention)
    pred = torch.tensor([[0, 0, 1, chain.PAD]])
    target = torch.tensor([[1, 1, 1, chain.PAD]])
    c = confusion(pred, target, 2, pred >= 0)
    assert c.tolist() == [[0, 2], [0, 1]]
    ref = confusion_matrix(target[0, :3].numpy(), pred[0, :3].numpy(), labels=[0, 1])
    np.testing.assert_array_equal(confusion(target, pred, 2).numpy(), ref)  # the summary's call
    # a position is counted only when both labels are valid and the mask allows it
    pred = torch.tensor([[0, 1, chain.PAD, 1, 0]])
    target = torch.tensor([[0, chain.PAD, 1, 1, 1]])
    assert confusion(pred, target, 2).tolist() == [[1, 1], [0, 1]]
    mask = torch.tensor([[True, True, True, False, True]])
    assert confusion(pred, target, 2, mask).tolist() == [[1, 1], [0, 0]]


def test_reliability_bins_and_ece_match_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(200, 4, generator=g), -1)
    probs[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # confidence exactly 1 lands in the last bin
    target = torch.randint(0, 4, (200,), generator=g)
    bins = 10
    r = calibration.reliability_bins(probs, target, bins)
    conf, pred = probs.max(1)
    count = np.zeros(bins)
    s_conf, s_acc = np.zeros(bins), np.zeros(bins)
    for c, p, t in zip(conf.tolist(), pred.tolist(), target.tolist()):
        b = min(int(math.floor(c * bins)), bins - 1)
        count[b] += 1
        s_conf[b] += c
        s_acc[b] += p == t
    np.testing.assert_array_equal(r["count"].numpy(), count)
    safe = np.maximum(count, 1)
    np.testing.assert_allclose(r["confidence"].numpy(), s_conf / safe, rtol=1e-6)
    np.testing.assert_allclose(r["accuracy"].numpy(), s_acc / safe, rtol=1e-12)
    ece = float(np.sum(count / count.sum() * np.abs(s_acc / safe - s_conf / safe)))
    assert calibration.expected_calibration_error(probs, target, bins) == pytest.approx(ece, rel=1e-6)


# --------------------------------------------------------------------------- epsilon-sharpness
@pytest.mark.parametrize("method", ["pgd", "lbfgsb"])
def test_epsilon_sharpness_closed_form_with_normalizer_not_one(method):
    """Convex quadratic plus a constant, away from its minimum: the box maximum is the corner
    ``y_i = sign(x_i) eps (|x_i| + 1)`` and the normalizer is ``1 + f(x) = 5.625``."""
    a = torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)
    x0 = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    c, eps = 2.0, 0.01
    w = x0.clone().requires_grad_(True)
    f = lambda v: 0.5 * (a * v * v).sum() + c  # noqa: E731
    f0 = float(f(x0))
    corner = x0 + torch.sign(x0) * eps * (x0.abs() + 1)
    expected = 100 * (float(f(corner)) - f0) / (1 + f0)
    assert 1 + f0 == pytest.approx(5.625)
    got = epsilon_sharpness(lambda: f(w), [w], eps=eps, steps=10, method=method,
                            generator=torch.Generator().manual_seed(0))
    assert got == pytest.approx(expected, rel=1e-6)
    assert torch.equal(w.detach(), x0)


def test_epsilon_sharpness_linear_loss_is_l1_of_the_scaled_gradient():
    g = torch.tensor([2.0, -1.0, 0.0, 4.0], dtype=torch.float64)
    x0 = torch.tensor([1.0, 0.0, -3.0, -0.5], dtype=torch.float64)
    w = x0.clone().requires_grad_(True)
    c, eps = 5.0, 0.002
    f0 = float(g @ x0 + c)  # = 5.0 -> normalizer 6
    expected = 100 * float((g.abs() * eps * (x0.abs() + 1)).sum()) / (1 + f0)
    got = epsilon_sharpness(lambda: g @ w + c, [w], eps=eps, steps=6, generator=torch.Generator().manual_seed(1))
    assert got == pytest.approx(expected, rel=1e-9)


def test_epsilon_sharpness_at_a_maximum_is_zero_not_negative():
    # concave: every point of the box is below f(x), so the best value is f(x) itself
    w = torch.tensor([0.0, 0.0], dtype=torch.float64, requires_grad=True)
    got = epsilon_sharpness(lambda: 1.0 - (w * w).sum(), [w], eps=0.1, steps=5,
                            generator=torch.Generator().manual_seed(0))
    assert got == 0.0


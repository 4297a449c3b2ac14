"""HMM / CRF models, Baum-Welch, matching, calibration and the hmm_sequences data module."""
from __future__ import annotations

import pytest
import torch

from shiftlab.trainers.data.hmm_sequences import HMMSequenceDataModule, sample_hmm_dataset
from shiftlab.trainers.models.chain import calibration, em, inference as chain, metrics
from shiftlab.trainers.models.crf import LinearChainCRF, PositionSoftmax
from shiftlab.trainers.models.hmm import HMM, make_hmm, true_model_scores
from shiftlab.trainers.models.chain.matching import apply_permutation, best_permutation, permute_marginals


def _data(n=300, T=12, K=3, V=6, noise=0.3, seed=0):
    params, x, z, lengths = sample_hmm_dataset(n, T, 4, K, V, 0.8, noise, seed)
    return params, x, z, lengths, x >= 0


def test_sampler_shapes_padding_and_seed():
    params, x, z, lengths, mask = _data()
    assert x.shape == z.shape == (300, 12) and x.dtype == torch.long
    assert torch.equal(mask, chain.lengths_to_mask(lengths, 12))
    assert ((x == chain.PAD) == ~mask).all() and ((z == chain.PAD) == ~mask).all()
    assert int(lengths.min()) >= 4 and int(lengths.max()) <= 12
    assert (x[mask] < 6).all() and (z[mask] < 3).all()
    for p in (params.start, params.trans, params.emit):
        assert torch.allclose(p.sum(-1), torch.ones(()).double())
    _, x2, z2, _, _ = _data()
    assert torch.equal(x, x2) and torch.equal(z, z2)
    _, x3, _, _, _ = _data(seed=1)
    assert not torch.equal(x, x3)


def test_sampler_follows_the_model():
    """Empirical transition frequencies of a large sample approach the true matrix."""
    params = make_hmm(3, 5, stickiness=0.6, emission_noise=0.4, seed=2)
    x, z, _ = params.sample(3000, 20, seed=3)
    counts = torch.zeros(3, 3, dtype=torch.float64)
    counts.index_put_((z[:, :-1].reshape(-1), z[:, 1:].reshape(-1)), torch.ones(3000 * 19, dtype=torch.float64),
                      accumulate=True)
    assert torch.allclose(counts / counts.sum(1, keepdim=True), params.trans, atol=0.02)


@pytest.mark.parametrize("key,value", [("stickiness", 1.0), ("emission_noise", -0.1)])
def test_bad_knobs_name_the_key(key, value):
    with pytest.raises(ValueError, match=f"data.{key}"):
        make_hmm(3, 5, **{key: value})


def test_data_module_token_label_noise_and_true_params():
    dm = HMMSequenceDataModule(num_sequences=200, length=10, min_length=5, num_states=3, num_symbols=6,
                               label_noise=0.25, seed=4)
    dm.setup()
    tr = dm.train_set
    valid = tr.y_true >= 0
    assert tr.corrupted.shape == tr.y.shape
    assert torch.equal(tr.corrupted, (tr.y != tr.y_true) & valid)
    assert abs(tr.corrupted[valid].float().mean().item() - 0.25) < 0.01
    assert ((tr.y == chain.PAD) == ~valid).all()
    assert torch.equal(dm.val_set.extras["lengths"], (dm.val_set.x >= 0).sum(1))
    assert dm.num_classes == 3 and dm.true_params.num_symbols == 6
    assert dm.describe()["corrupted_tokens"] == int(tr.corrupted.sum())


def test_baum_welch_never_decreases_likelihood():
    params, x, z, lengths, mask = _data(n=200)
    for seed in range(3):
        _, hist = em.baum_welch(x, mask, em.random_params(3, 6, seed), iterations=15)
        ll = torch.tensor(hist.log_likelihood)
        assert (ll[1:] - ll[:-1] >= -1e-8 * ll.abs()[1:]).all(), ll
        assert ll[-1] > ll[0] + 1.0


def test_hmm_gradient_matches_em_statistics():
    """Fisher identity: d log p(x) / d emission logits = E[counts] - E[state visits] * p."""
    params, x, z, lengths, mask = _data(n=40)
    init = em.random_params(3, 6, seed=5)
    model = HMM.from_params(init).double()
    model.log_likelihood(x, mask).sum().backward()
    stats, total = em.sufficient_statistics(init, x, mask)
    visits = stats["emit"].sum(1, keepdim=True)
    assert torch.allclose(model.emit_logits.grad, stats["emit"] - visits * init.emit, atol=1e-8)
    assert float(model.log_likelihood(x, mask).sum().detach()) == pytest.approx(total, rel=1e-6)


def test_true_model_is_the_bayes_decoder():
    """The HMM loaded with the true parameters reproduces the ceilings exactly."""
    params, x, z, lengths, mask = _data(n=100)
    scores, curves = metrics.evaluate(HMM.from_params(params).double(), x, z, params,
                                      perm=torch.arange(3))
    assert scores["acc"] == pytest.approx(scores["bayes_acc"])
    assert scores["ll_per_token"] == pytest.approx(scores["true_ll_per_token"], abs=1e-6)
    assert scores["gap_to_bayes_acc"] == pytest.approx(0.0, abs=1e-12)


def test_hungarian_matching_recovers_a_permutation():
    params, x, z, lengths, mask = _data(n=80, noise=0.1)
    perm = torch.tensor([2, 0, 1])  # learned state s is true state perm[s]
    inv = torch.argsort(perm)
    relabelled = apply_permutation(z, inv)  # what a learned model with permuted states outputs
    found = best_permutation(relabelled, z, 3, mask)
    assert torch.equal(found, perm)
    assert torch.equal(apply_permutation(relabelled, found), z)
    m = torch.randn(2, 4, 3).log_softmax(-1)
    pm = permute_marginals(m, found)
    assert torch.equal(pm[..., perm[0]], m[..., 0])


def test_ece_separates_calibrated_from_overconfident():
    g = torch.Generator().manual_seed(0)
    n, K = 20000, 3
    probs = torch.softmax(torch.randn(n, K, generator=g) * 2, -1)
    target = torch.multinomial(probs, 1, generator=g).squeeze(1)  # calibrated by construction
    ece_cal = calibration.expected_calibration_error(probs, target)
    sharp = torch.softmax(torch.log(probs) * 4, -1)  # same argmax, overconfident
    ece_over = calibration.expected_calibration_error(sharp, target)
    assert ece_cal < 0.02 < 0.1 < ece_over


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reliability_bins_agree_with_torchmetrics_calibration_error(seed):
    """The diagram's bins (hand-binned) and the ECE (torchmetrics) describe the same calibration."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(3000, 5, generator=g) * 3, -1)
    target = torch.randint(0, 5, (3000,), generator=g)
    r = calibration.reliability_bins(probs, target, 15)
    from_bins = float((r["count"] / r["count"].sum() * (r["accuracy"] - r["confidence"]).abs()).sum())
    assert calibration.expected_calibration_error(probs, target, 15) == pytest.approx(from_bins, abs=1e-6)


def test_reliability_plot_writes_png(tmp_path):
    probs = torch.softmax(torch.randn(500, 4), -1)
    target = torch.randint(0, 4, (500,))
    path = calibration.plot_reliability({"m": calibration.reliability_bins(probs, target)},
                                        tmp_path / "plots" / "rel.png")
    assert path.exists() and path.stat().st_size > 1000


def test_crf_and_softmax_losses_respect_masks():
    """Padding content and padded labels change nothing; the CRF NLL is >= 0 and finite."""
    torch.manual_seed(0)
    _, x, z, lengths, mask = _data(n=16)
    for cls in (LinearChainCRF, PositionSoftmax):
        model = cls(num_symbols=6, num_classes=3)
        loss = model.loss(x, z, mask)
        z2 = z.masked_fill(~mask, 1)
        assert torch.allclose(loss, model.loss(x, z2, mask))
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        assert float(loss.detach()) > 0
        path = model.decode(x, mask)
        assert ((path == chain.PAD) == ~mask).all()


def test_bayes_ceiling_beats_trained_models():
    """No model trained on the data decodes better than the true posterior (within noise)."""
    torch.manual_seed(0)
    params, x, z, lengths, mask = _data(n=700, T=16, noise=0.5)
    xtr, ztr, xte, zte = x[:500], z[:500], x[500:], z[500:]
    fitted, _ = em.baum_welch(xtr, xtr >= 0, em.random_params(3, 6, 0), iterations=40)
    trained = {"hmm_em": HMM.from_params(fitted).double()}
    for name, cls in (("crf", LinearChainCRF), ("softmax", PositionSoftmax)):
        model = cls(num_symbols=6, num_classes=3, hidden=32, embed_dim=16)
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        for epoch in range(8):
            for lo in range(0, 500, 50):
                xb, zb = xtr[lo:lo + 50], ztr[lo:lo + 50]
                opt.zero_grad()
                model.loss(xb, zb, xb >= 0).backward()
                opt.step()
        trained[name] = model.eval()
    bayes = true_model_scores(params, xte, xte >= 0)["log_marginals"].argmax(-1)
    bayes_acc = float((bayes == zte)[xte >= 0].double().mean())
    for name, model in trained.items():
        perm = metrics.fit_permutation(model, xtr, ztr) if not model.supervised else None
        s, _ = metrics.evaluate(model, xte, zte, params, perm)
        assert s["bayes_acc"] == pytest.approx(bayes_acc)
        assert s["acc"] > 0.5, (name, s)  # learned something (chance is ~1/3)
        assert s["acc"] <= bayes_acc + 0.01, (name, s)


def test_matched_accuracy_metric():
    from shiftlab.trainers.modules.sequence import MatchedAccuracy

    target = torch.tensor([[0, 1, 2, 2, chain.PAD]])
    pred = torch.tensor([[1, 2, 0, 0, 0]])  # a relabelling of the truth
    mask = target >= 0
    matched, plain = MatchedAccuracy(3, match=True), MatchedAccuracy(3, match=False)
    for m in (matched, plain):
        m.update(pred, target, mask)
    assert float(matched.compute()) == 1.0
    assert float(plain.compute()) == 0.0
    assert torch.isnan(MatchedAccuracy(3, match=True).compute())

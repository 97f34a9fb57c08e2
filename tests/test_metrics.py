import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import average_precision_score

from influcoder import metrics as M


@pytest.fixture
def mats():
    rng = np.random.default_rng(0)
    Y = rng.normal(size=(7, 40))
    S = Y + rng.normal(scale=0.8, size=Y.shape)
    S[0, :5] = S[0, 0]  # ties
    return Y, S


def test_per_anchor_spearman_matches_scipy(mats):
    Y, S = mats
    ref = [spearmanr(Y[i], S[i]).statistic for i in range(len(Y))]
    assert np.allclose(M.per_anchor_spearman(Y, S), ref)
    assert M.mean_per_anchor_spearman(Y, S) == pytest.approx(np.mean(ref))


def test_aggregated_spearman_averages_first(mats):
    Y, S = mats
    assert M.aggregated_spearman(Y, S) == pytest.approx(spearmanr(Y.mean(0), S.mean(0)).statistic)


def test_recall_and_ndcg_by_hand():
    Y = np.array([[5.0, 4, 3, 2, 1]])
    S = np.array([[1.0, 5, 4, 2, 3]])  # student's top-2: items 1, 2; teacher's: 0, 1
    assert M.recall_at_k(Y, S, 2) == 0.5
    rel = (Y[0] - 1) / 4  # min-max scaled: [1, .75, .5, .25, 0]
    got = rel[1] / np.log2(2) + rel[2] / np.log2(3)
    ideal = rel[0] / np.log2(2) + rel[1] / np.log2(3)
    assert M.ndcg_at_k(Y, S, 2) == pytest.approx(got / ideal)
    assert M.ndcg_at_k(Y, Y, 3) == pytest.approx(1.0)


def test_planted_retrieval_metrics_by_hand():
    labels = np.array([1, 0, 1, 0, 0, 1])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.1])
    # positives at ranks 1, 3, 6: precisions 1, 2/3, 3/6
    assert M.auprc(labels, scores) == pytest.approx((1 + 2 / 3 + 0.5) / 3)
    assert M.auprc(labels, scores) == pytest.approx(average_precision_score(labels, scores))
    assert M.precision_at_k(labels, scores, 2) == 0.5
    assert M.recall_of_planted_at_k(labels, scores, 3) == pytest.approx(2 / 3)

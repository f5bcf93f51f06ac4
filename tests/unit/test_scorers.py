"""tasks/data/scorers.py: lexical features and the SST-2 sentiment classifier."""

import numpy as np
import pytest
import torch

from latentpref.tasks.data import scorers

POSITIVE = "this movie is wonderful, i loved it"
NEGATIVE = "terrible, boring, awful film"


@pytest.fixture(scope="module")
def classifier():
    torch.set_num_threads(2)
    return scorers.train_sentiment_classifier(seed=0)  # ~3 s on 2 CPU cores


def test_sentiment_sign_on_known_sentences():
    s = scorers.score_texts([POSITIVE, NEGATIVE])
    assert s["sentiment"][0] > 0 > s["sentiment"][1]
    assert s["abs_sentiment"][1] == pytest.approx(-s["sentiment"][1])


def test_features_by_hand():
    """'I love it! Do you?': 5 words (i, love, it, do, you), one '!', one '?', first person: i."""
    s = scorers.score_texts(["I love it! Do you?", "", None, "Extraordinarily magnificent cinematography"])
    assert set(s) == set(scorers.FEATURES)
    for name, values in s.items():
        assert values.dtype == np.float32 and values.shape == (4,), name
    assert s["length_words"][0] == 5
    assert s["exclamation_rate"][0] == pytest.approx(1 / 5)
    assert s["question_rate"][0] == pytest.approx(1 / 5)
    assert s["first_person_rate"][0] == pytest.approx(1 / 5)
    assert s["long_word_rate"][0] == 0 and s["long_word_rate"][3] == 1
    assert s["unique_word_rate"][0] == 1
    for name in scorers.FEATURES:  # empty and None texts score 0
        assert s[name][1] == 0 and s[name][2] == 0, name
    assert scorers.score_texts(["the the the the"])["unique_word_rate"][0] == pytest.approx(0.25)


def test_classifier_accuracy_and_feature(classifier):
    assert classifier.metrics["sst2_test_accuracy"] > 0.78
    assert classifier.accuracy_on_sst2_test() == pytest.approx(classifier.metrics["sst2_test_accuracy"])
    logits = classifier.score([POSITIVE, NEGATIVE])
    assert logits.dtype == np.float32 and logits[0] > 0 > logits[1]
    s = scorers.score_texts([POSITIVE, NEGATIVE], classifier=classifier)
    np.testing.assert_allclose(s[scorers.CLASSIFIER_FEATURE], logits)
    assert scorers.CLASSIFIER_FEATURE not in scorers.score_texts([POSITIVE])


def test_classifier_save_load_roundtrip(classifier, tmp_path):
    classifier.save(str(tmp_path / "clf"))
    assert {p.name for p in (tmp_path / "clf").iterdir()} == {"weights.npz", "config.json"}
    loaded = scorers.SentimentClassifier.load(str(tmp_path / "clf"))
    texts = scorers.read_sst2("dev")[0][:50]
    np.testing.assert_array_equal(loaded.weight, classifier.weight)
    np.testing.assert_array_equal(loaded.idf, classifier.idf)
    assert loaded.bias == classifier.bias
    np.testing.assert_array_equal(loaded.score(texts), classifier.score(texts))
    assert loaded.config == classifier.config
    assert loaded.metrics["sst2_test_accuracy"] == classifier.metrics["sst2_test_accuracy"]


def test_classifier_training_is_deterministic_and_small_fit_works():
    torch.set_num_threads(2)
    cfg = scorers.ClassifierConfig(n_features=2**12, max_iter=20)
    a = scorers.train_sentiment_classifier(config=cfg, include_dev=False)
    b = scorers.train_sentiment_classifier(config=cfg, include_dev=False)
    np.testing.assert_array_equal(a.weight, b.weight)
    assert a.metrics["sst2_test_accuracy"] > 0.6


def test_read_sst2_rejects_unknown_split():
    with pytest.raises(ValueError, match="'validation'"):
        scorers.read_sst2("validation")

"""builtin:stdlib-docs: an offline, deterministic English text-classification dataset."""

from __future__ import annotations

import numpy as np

from maas import datasets
from maas.text import corpus


def test_every_family_has_the_same_number_of_distinct_texts() -> None:
    texts, labels = corpus.texts()
    assert len(texts) == len(corpus.LABELS) * corpus.PER_CLASS
    assert np.bincount(labels).tolist() == [corpus.PER_CLASS] * len(corpus.LABELS)
    assert len(set(texts)) == len(texts)
    assert all(len(t.split()) >= corpus.MIN_WORDS for t in texts)


def test_the_builtin_is_token_rows_of_the_encoders_width_and_the_same_every_time() -> None:
    data = datasets.load_builtin(corpus.NAME)
    again = datasets.load_builtin(corpus.NAME)
    assert data.task == "classification" and data.num_classes == len(corpus.LABELS)
    assert data.x_train.shape[1] == corpus.WIDTH
    np.testing.assert_array_equal(data.x_train, again.x_train)
    ids = data.x_train.astype(np.int64)
    assert (ids[:, 0] == 101).all()  # [CLS] opens every row
    assert ((ids != 0).sum(axis=1) <= corpus.TOKENS).all()  # cut to TOKENS, then zero padding

"""The embedded default dataset: scikit-learn's bundled 8x8 handwritten digits (no download)."""

from __future__ import annotations

from dataclasses import dataclass

from fedge.plugins.data.base import ArrayDataset, SplitConfig, split_train_test
from fedge.registry import plugin


@plugin("dataset", "digits")
class Digits:
    """Handwritten digits 0-9 as 1x8x8 images in [0, 1], bundled with scikit-learn (1,797 samples)."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config(SplitConfig):
        """Only the train/test split."""

    @staticmethod
    def load(config: Config) -> ArrayDataset:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = (bunch.images / 16.0).reshape(-1, 1, 8, 8)
        return split_train_test("digits", x, bunch.target, test_fraction=config.test_fraction, seed=config.seed)

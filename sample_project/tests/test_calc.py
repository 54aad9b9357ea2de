"""One passing and one failing test, so the quickstart shows both verdicts.

The failing one is deliberate: the quickstart's second commit fixes it."""

import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import calc  # noqa: E402


class TestCalc(unittest.TestCase):
    def test_add(self):
        self.assertEqual(calc.add(2, 3), 5)

    def test_mean(self):
        # Deliberately wrong until the quickstart's fix commit.
        self.assertEqual(calc.mean([1, 2, 3]), 3)

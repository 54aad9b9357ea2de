"""Projects the JUnit tests run, by hand and through the CI: tricky unittest
outcomes, modules that shadow the CI's own names, and a pytest suite."""

TRICKY_UNITTESTS = '''import unittest
import helpers


class TestMix(unittest.TestCase):
    def test_ok(self):
        self.assertEqual(helpers.WHO, "the project")

    def test_fail(self):
        self.assertEqual("left", "right")

    def test_error(self):
        raise KeyError("\\x00 bad \\ud800 text")

    @unittest.skip("not today")
    def test_skip(self):
        pass

    @unittest.expectedFailure
    def test_xfail(self):
        self.assertTrue(False)

    @unittest.expectedFailure
    def test_xpass(self):
        pass

    def test_subtests(self):
        for i in range(4):
            with self.subTest(i=i):
                self.assertLess(i, 2)


class TestTearDown(unittest.TestCase):
    def tearDown(self):
        raise RuntimeError("teardown")

    def test_fails_then_teardown_errors(self):
        self.fail("first")


class TestClassSetup(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        raise RuntimeError("no class today")

    def test_never_runs(self):
        pass
'''

SHADOWS = {name: f'WHO = "the project"\nNAME = "{name}"\n'
           for name in ("helpers", "results", "junit_capture", "unittest_recorder",
                        "dispatcher", "test_runner")}

SHADOW_TEST = '''import os
import sys
import unittest

import helpers
import junit_capture
import results
import unittest_recorder


class TestOwnModules(unittest.TestCase):
    def test_project_modules_come_first(self):
        for module in (helpers, junit_capture, results, unittest_recorder):
            self.assertEqual(module.WHO, "the project", module.__file__)
            self.assertEqual(os.path.dirname(module.__file__), os.getcwd())
        self.assertFalse(any("ci_support" in p for p in sys.path), sys.path)
'''

PYTEST_TESTS = '''import pytest

import helpers


def test_a():
    assert helpers.WHO == "the project"

def test_wrong():
    assert 2 * 2 == 5

@pytest.mark.skip(reason="not yet")
def test_later():
    pass

@pytest.mark.xfail(reason="known")
def test_known():
    assert False

@pytest.mark.xfail(reason="maybe")
def test_lucky():
    pass

@pytest.fixture
def broken():
    raise RuntimeError("fixture")

def test_uses_broken(broken):
    pass

@pytest.mark.parametrize("n", [1, 2, 3])
def test_param(n):
    assert n != 2
'''

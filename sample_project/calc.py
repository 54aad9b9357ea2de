"""A tiny project for the CI quickstart: the CI tests every commit of it."""


def add(a, b):
    return a + b


def mean(values):
    return sum(values) / len(values)

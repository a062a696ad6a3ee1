"""Builds the optional C kernel of compact-checkpoint loading; everything else is in pyproject.toml.

``optional=True``: where no C compiler (or no Python headers) is found, the
install goes on without it and ``fxprune.checkpoints.codec`` decodes with
torch ops to the same bits.
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("fxprune.checkpoints._expand", ["fxprune/checkpoints/_expand.c"],
                             extra_compile_args=["-O3"], optional=True)])

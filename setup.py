"""The one compiled part of lmcache; everything else is declared in pyproject.toml.

`lmcache.engine._blockcopy` copies KV blocks through a peer's shared memory and survives
the peer truncating it (its C source says why). Building it needs gcc and Python headers.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "lmcache.engine._blockcopy",
            sources=["src/lmcache/engine/_blockcopy.c"],
            depends=[
                "src/lmcache/engine/_blockcopy_pool.h",
                "src/lmcache/engine/_blockcopy_stream.h",
            ],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        )
    ]
)

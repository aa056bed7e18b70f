"""Sparsity patterns.

Convention (the Wanda/SparseGPT research code's): ``N:M`` zeroes the N lowest-scoring weights in every group of
M consecutive input weights of a row, so its sparsity is N/M. For 2:4 this is also NVIDIA's "2 non-zeros in
every 4"; for other shapes read N as the number pruned (4:8 prunes 4 of 8, 1:4 prunes 1 of 4).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ConfigError, PatternError

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class SparsityPattern:
    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, text: str) -> SparsityPattern:
        if text in ("unstructured", "", None):
            return cls()
        match = _NM.match(str(text))
        if not match:
            raise ConfigError(f"unknown pattern '{text}'; use 'unstructured' or N:M such as 2:4")
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise ConfigError(f"pattern {n}:{m} needs 0 < N < M")
        return cls(n, m)

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float:
        return self.n / self.m if self.is_nm else float("nan")

    def check_layer(self, name: str, in_features: int) -> None:
        if self.is_nm and in_features % self.m:
            raise PatternError(
                f"pattern {self} needs in_features divisible by {self.m}, but layer {name} has {in_features}"
            )

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"

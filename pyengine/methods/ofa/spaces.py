"""The OFA and MOOFA search spaces as data.

A space is a macro-architecture (``MBV3Arch``: widths, strides, activations, SE, and the elastic
choices of kernel size, expand ratio and depth) plus the input resolutions. The two published
spaces differ only in data:

* OFA (Cai et al., ICLR 2020): stage widths 24/40/80/112/160 (strides 2,2,2,1,2), expand
  {3, 4, 6}, stem 16, final expand 960, feature mix 1280.
* MOOFA (Girard et al., arXiv 2409.05900): widths from the memory-balancing rule
  (``memory_balanced_widths``) 24/96/288/360/384, all stages at stride 2, expand {2, 3, 4},
  stem 3 channels, first block 8, final expand and feature mix 392.

Both: kernels {3, 5, 7}, depths {2, 3, 4}, resolutions {128, 160, 192, 224}.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from pyengine.models.ofa_mbv3 import (
    MOOFA_ARCH,
    OFA_ARCH,
    MBV3Arch,
    canonical_subnet,
    scale_arch,
)
from pyengine.nn.elastic import make_divisible

__all__ = ["Space", "memory_balanced_widths", "ofa_space", "moofa_space", "get_space", "SPACE_NAMES",
           "PUBLISHED_RESOLUTIONS"]

PUBLISHED_RESOLUTIONS = (128, 160, 192, 224)
SPACE_NAMES = ("ofa", "moofa")


def memory_balanced_widths(first_width: int = 24, ref_size: float = 56, expand: float = 4, kernel: int = 7,
                           n_widths: int = 6, divisor: int = 8) -> list[int]:
    """MOOFA's stage widths: each new stage (at half the resolution of the previous one) gets the
    width that keeps a block's peak memory (elements) equal to the previous stage's.

    For a stage of width c at side S with expand ratio e and kernel k, a block's two candidate
    peaks are the depthwise conv, ``M_dw = e c S^2 + e c k^2 + e c S^2`` (input, weights, output),
    and the expansion 1x1, ``M_ex = c S^2 + e c^2 + e c S^2``. The next width c' (side S/2) solves
    "same peak as before" for whichever term dominated: when M_dw dominates, c' is the smaller of
    the depthwise solution ``2 c (S^2 + k^2) / (S^2/2 + k^2)`` (the authors' expression, code
    ``OFAMobileNetV3CtV3``) and the positive root of ``e c'^2 + (S^2/4)(1 + e) c' - M_dw = 0``;
    otherwise c' is the positive root of the same quadratic with ``M_ex``. Each width is rounded
    with ``make_divisible`` before the next step and S halves exactly (56 -> 28 -> ... -> 1.75),
    as published; with the defaults this gives 96, 288, 360, 384, 392, 392 (five stages after the
    24-channel one, then the final expand and feature-mix widths).
    """
    if first_width < 1 or ref_size <= 0 or expand <= 0 or kernel < 1 or n_widths < 1:
        raise ValueError("first_width, ref_size, expand, kernel and n_widths must be positive")
    c, s, e, k2 = float(first_width), float(ref_size), float(expand), float(kernel * kernel)
    out = []
    for _ in range(n_widths):
        m_dw = e * c * s * s + e * c * k2 + e * c * s * s
        m_ex = c * s * s + e * c * c + e * c * s * s
        lin = s * s / 4 + e * s * s / 4  # the linear coefficient of the quadratic at side S/2

        def root(m):
            return (-lin + (lin * lin + 4 * e * m) ** 0.5) / (2 * e)

        if m_dw > m_ex:
            c_dw = 2 * c * (s * s + k2) / (s * s / 2 + k2)
            c = min(c_dw, root(m_dw))
        else:
            c = root(m_ex)
        s /= 2
        c = float(make_divisible(c, divisor))
        out.append(int(c))
    return out


@dataclass(frozen=True)
class Space:
    """A search space: its name, macro-architecture and input resolutions."""

    name: str
    arch: MBV3Arch
    resolutions: tuple[int, ...] = PUBLISHED_RESOLUTIONS

    def __post_init__(self) -> None:
        if not self.resolutions or any(int(r) != r or r < 1 for r in self.resolutions):
            raise ValueError(f"resolutions must be positive integers, got {list(self.resolutions)}")
        object.__setattr__(self, "resolutions", tuple(sorted(set(int(r) for r in self.resolutions))))

    # -------------------------------------------------------------- data round trip

    def to_dict(self) -> dict:
        return {"name": self.name, "arch": self.arch.to_dict(), "resolutions": list(self.resolutions)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Space":
        return cls(d["name"], MBV3Arch.from_dict(d["arch"]), tuple(d["resolutions"]))

    # -------------------------------------------------------------- subnets

    def subnet(self, subnet: Mapping[str, Any] | None = None, resolution: int | None = None) -> dict:
        """A validated, canonical subnet with its resolution ``r`` (default the largest)."""
        sub = dict(subnet or {})
        if resolution is not None:
            sub["r"] = resolution
        sub.setdefault("r", max(self.resolutions))
        out = canonical_subnet(self.arch, sub)
        if out["r"] not in self.resolutions:
            raise ValueError(f"resolution {out['r']} is not one of the space's {list(self.resolutions)}")
        return out

    def uniform(self, kernel: int | None = None, expand: float | None = None, depth: int | None = None,
                resolution: int | None = None) -> dict:
        a = self.arch
        return self.subnet({"ks": kernel if kernel is not None else max(a.kernel_sizes),
                            "e": expand if expand is not None else max(a.expand_ratios),
                            "d": depth if depth is not None else max(a.depths)}, resolution)

    def max_subnet(self, resolution: int | None = None) -> dict:
        return self.uniform(resolution=resolution or max(self.resolutions))

    def min_subnet(self, resolution: int | None = None) -> dict:
        a = self.arch
        return self.uniform(min(a.kernel_sizes), min(a.expand_ratios), min(a.depths), resolution or min(self.resolutions))

    def random_subnet(self, rng: random.Random) -> dict:
        a = self.arch
        return self.subnet({"ks": [rng.choice(a.kernel_sizes) for _ in range(a.n_slots)],
                            "e": [rng.choice(a.expand_ratios) for _ in range(a.n_slots)],
                            "d": [rng.choice(a.depths) for _ in range(a.n_stages)]},
                           rng.choice(self.resolutions))


def ofa_space(width_mult: float = 1.0, resolutions: Sequence[int] = PUBLISHED_RESOLUTIONS,
              divisor: int | None = None) -> Space:
    return Space("ofa", scale_arch(OFA_ARCH, width_mult, divisor), tuple(resolutions))


def moofa_space(width_mult: float = 1.0, resolutions: Sequence[int] = PUBLISHED_RESOLUTIONS,
                divisor: int | None = None) -> Space:
    w = memory_balanced_widths(first_width=MOOFA_ARCH.stage_widths[0])
    arch = replace(MOOFA_ARCH, stage_widths=(MOOFA_ARCH.stage_widths[0], *w[:4]), final_expand=w[4], last_channel=w[5])
    return Space("moofa", scale_arch(arch, width_mult, divisor), tuple(resolutions))


def get_space(name: str, width_mult: float = 1.0, resolutions: Sequence[int] | None = None,
              divisor: int | None = None) -> Space:
    """"ofa" or "moofa", optionally narrower (``width_mult``) and at other resolutions."""
    builders = {"ofa": ofa_space, "moofa": moofa_space}
    if name not in builders:
        raise KeyError(f"unknown space {name!r}; choose {' or '.join(SPACE_NAMES)}")
    return builders[name](width_mult, tuple(resolutions or PUBLISHED_RESOLUTIONS), divisor)


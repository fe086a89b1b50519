"""The ranges stage: every range map a run fits, saved side by side: one :class:`~rangelens.ranges.maps.RangeMap` per
(mask site, data split, tau, p) (NeuronLens, Haider et al., arXiv 2502.06809, §1).

The ranges stage fits them once; the erasure experiment and the atlas only load them, so what the
atlas shows is what was erased. A *split* is the analysis train/test split (``"full"``) or one fold
of the erasure protocol's repeated stratified k-fold; ranges are fitted on the split's correctly
classified training rows when a classification task exists, else on all its training rows
(``Split.rows`` says which).

On disk (format ``rangelens.rangeset/1``), inside the ``ranges/`` stage::

    rangeset.json                      format, sites, splits (rows used), sweep points, metadata
    splits.safetensors                 <split>.train / .test / .fit row indices (int64)
    maps/<site>/<split>/tau<t>_p<p>/   a RangeMap (ranges.json + ranges.safetensors)
    maps/<site>/<split>/density<r>_p<p>/   density bands at likelihood ratio r (when the erasure
                                       experiment has a ``density`` condition), same neurons
    maps/<site>/<split>/replacement.safetensors   corpus "mean" (d,) and "complement_mean" (C, d)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors.numpy import load_file, save_file

from rangelens.artifacts import read_json, write_json
from rangelens.errors import RangelensError, choices
from rangelens.ranges.maps import RangeMap
from rangelens.ranges.splits import Split
from rangelens.ranges.stats import ConceptStats

if TYPE_CHECKING:
    pass

FORMAT_VERSION = "rangelens.rangeset/1"


def point_name(tau: float, p: float) -> str:
    return f"tau{tau:g}_p{p:g}"


def band_name(ratio: float, p: float) -> str:
    return f"density{ratio:g}_p{p:g}"


def sweep_points(tau: float, p: float, taus: Iterable[float], ps: Iterable[float]) -> list[tuple]:
    """Every (tau, p) to fit: the headline point and the grid of ``taus`` x ``ps`` around it."""
    all_taus = sorted({float(tau), *map(float, taus)})
    all_ps = sorted({float(p), *map(float, ps)})
    return [(t, q) for q in all_ps for t in all_taus]


def replacement_values(stats: ConceptStats) -> dict[str, np.ndarray]:
    """Per-neuron replacement values of the rows ``stats`` saw: the corpus ``mean`` ``(d,)`` and
    each concept's ``complement_mean`` ``(C, d)`` (mean over the other concepts' rows)."""
    return {
        "mean": np.asarray(stats.pooled().mean[0], dtype=np.float64),
        "complement_mean": np.stack([stats.complement(c)[0] for c in range(len(stats.concepts))]),
    }


@dataclass
class RangeSet:
    """Range maps by ``(site, split, tau, p)``, replacement values by ``(site, split)``, the splits."""

    splits: dict[str, Split] = field(default_factory=dict)
    maps: dict[tuple[str, str, float, float], RangeMap] = field(default_factory=dict)
    replacements: dict[tuple[str, str], dict[str, np.ndarray]] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    bands: dict[tuple[str, str, float, float], RangeMap] = field(default_factory=dict)

    @property
    def sites(self) -> list[str]:
        return list(dict.fromkeys(k[0] for k in self.maps))

    @property
    def points(self) -> list[tuple[float, float]]:
        return list(dict.fromkeys((k[2], k[3]) for k in self.maps))

    @property
    def ratios(self) -> list[float]:
        """Likelihood ratios with saved density bands (empty when none were fitted)."""
        return sorted({k[2] for k in self.bands})

    def band_map(self, site: str, split: str, ratio: float, p: float) -> RangeMap:
        """The density bands at ``ratio`` on the same neurons as the ``(site, split, p)`` maps."""
        key = (site, split, float(ratio), float(p))
        if key not in self.bands:
            raise RangelensError(
                f"no saved density bands for site {site}, split {split}, ratio {ratio:g}, "
                f"p {p:g}; saved ratios: {choices(f'{r:g}' for r in self.ratios)}"
            )
        return self.bands[key]

    def map(self, site: str, split: str, tau: float, p: float) -> RangeMap:
        key = (site, split, float(tau), float(p))
        if key not in self.maps:
            have = sorted({f"{k[0]}/{k[1]}/{point_name(k[2], k[3])}" for k in self.maps})
            raise RangelensError(
                f"no saved range map for site {site}, split {split}, tau {tau:g}, p {p:g}; "
                f"saved: {choices(have[:8])}{' ...' if len(have) > 8 else ''}"
            )
        return self.maps[key]

    def replacement(self, site: str, split: str, kind: str, concept: int) -> np.ndarray:
        """Replacement value of every neuron ``(d,)`` for masking ``concept``: zeros, the corpus
        mean or the concept's complement mean over the split's fitted rows."""
        values = self.replacements[(site, split)]
        if kind == "zero":
            return np.zeros_like(values["mean"])
        if kind == "mean":
            return values["mean"]
        if kind == "complement_mean":
            return np.asarray(values["complement_mean"][concept])
        raise RangelensError(
            f"unknown replacement {kind!r}; valid: 'zero', 'mean', 'complement_mean'"
        )

    def save(self, directory: Path) -> None:
        """Write every map, the replacement values, the split rows and the index."""
        directory = Path(directory)
        for (site, split, tau, p), range_map in self.maps.items():
            range_map.save(directory / "maps" / site / split / point_name(tau, p))
        for (site, split, ratio, p), range_map in self.bands.items():
            range_map.save(directory / "maps" / site / split / band_name(ratio, p))
        for (site, split), values in self.replacements.items():
            path = directory / "maps" / site / split / "replacement.safetensors"
            save_file({k: np.ascontiguousarray(v) for k, v in values.items()}, str(path))
        arrays = {
            f"{s.name}.{part}": np.asarray(getattr(s, part), dtype=np.int64)
            for s in self.splits.values()
            for part in ("train", "test", "fit")
        }
        save_file(arrays, str(directory / "splits.safetensors"))
        write_json(
            directory / "rangeset.json",
            {
                "format": FORMAT_VERSION,
                "sites": self.sites,
                "points": [list(pt) for pt in self.points],
                "ratios": self.ratios,
                "splits": {
                    s.name: {"rows": s.rows, "n_train": len(s.train), "n_fit": len(s.fit)}
                    for s in self.splits.values()
                },
                "metadata": self.metadata,
            },
        )

    @classmethod
    def load(cls, directory: Path) -> RangeSet:
        """Read a range set written by :meth:`save`."""
        directory = Path(directory)
        index_path = directory / "rangeset.json"
        if not index_path.is_file():
            raise RangelensError(f"{str(directory)!r} holds no range set (no rangeset.json)")
        index = read_json(index_path)
        if index.get("format") != FORMAT_VERSION:
            raise RangelensError(
                f"{str(index_path)!r} has format {index.get('format')!r}; valid: {FORMAT_VERSION!r}"
            )
        arrays = load_file(str(directory / "splits.safetensors"))
        out = cls(metadata=index.get("metadata", {}))
        for name, info in index["splits"].items():
            train, test, fit = (arrays[f"{name}.{part}"] for part in ("train", "test", "fit"))
            out.splits[name] = Split(name, train, test, fit, info["rows"])
        for site in index["sites"]:
            for name in out.splits:
                base = directory / "maps" / site / name
                for tau, p in index["points"]:
                    out.maps[(site, name, float(tau), float(p))] = RangeMap.load(
                        base / point_name(tau, p)
                    )
                    for ratio in index.get("ratios", []):
                        out.bands[(site, name, float(ratio), float(p))] = RangeMap.load(
                            base / band_name(ratio, p)
                        )
                out.replacements[(site, name)] = load_file(str(base / "replacement.safetensors"))
        return out

"""Segment: K-Means on the champion's fused embeddings, k by silhouette, names from profiles.

Fitting and the silhouette use seeded samples, so memory stays bounded at any size; every
customer is then assigned to the nearest centroid in chunks.

Naming: each segment's mean P(high) and mean churn probability are compared with the whole
population's. Value level: `high` if the segment's mean P(high) is at least 1.5x the
population's, `low` if at most 0.5x, else `mid`. Churn level: `at-risk` if its mean churn
probability is at least 1.2x the population's, `loyal` if at most 0.8x, else `steady`. The
name joins the two ("high-value loyal", "low-value at-risk", ...); segments with the same
name are numbered by size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import calinski_harabasz_score, silhouette_score

VALUE_WORDS = {"high": "high-value", "mid": "mid-value", "low": "low-value"}


@dataclass(frozen=True)
class Segmentation:
    model: KMeans
    k: int
    silhouette_by_k: dict[int, float]
    calinski_harabasz: float

    def assign(self, embeddings: np.ndarray, chunk: int = 100_000) -> np.ndarray:
        return np.concatenate(
            [
                self.model.predict(embeddings[i : i + chunk])
                for i in range(0, len(embeddings), chunk)
            ]
            or [np.array([], int)]
        )


def fit_segments(
    embeddings: np.ndarray,
    k_min: int,
    k_max: int,
    seed: int,
    fit_rows: int = 20_000,
    silhouette_rows: int = 5_000,
) -> Segmentation:
    rng = np.random.default_rng(seed)
    n = len(embeddings)
    if n < max(k_min, 2) + 1:
        raise ValueError(f"{n} customers are too few to segment into at least {k_min} groups")
    fit_sample = embeddings[np.sort(rng.choice(n, min(n, fit_rows), replace=False))]
    score_sample = embeddings[np.sort(rng.choice(n, min(n, silhouette_rows), replace=False))]
    candidates: dict[int, tuple[float, KMeans]] = {}
    for k in range(k_min, min(k_max, len(fit_sample) - 1) + 1):
        model = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(fit_sample)
        labels = model.predict(score_sample)
        if len(set(labels)) < 2:
            continue
        candidates[k] = (float(silhouette_score(score_sample, labels, random_state=seed)), model)
    if not candidates:
        raise ValueError("no k in the configured range gives at least two segments")
    best = max(candidates, key=lambda k: (candidates[k][0], -k))
    model = candidates[best][1]
    ch = float(calinski_harabasz_score(score_sample, model.predict(score_sample)))
    return Segmentation(model, best, {k: v[0] for k, v in candidates.items()}, ch)


def name_segments(
    segment: np.ndarray, p_high: np.ndarray, churn: np.ndarray
) -> dict[int, tuple[str, str, str]]:
    """segment id -> (name, value level, churn level), from the profiles (see module doc)."""
    overall_high, overall_churn = max(p_high.mean(), 1e-9), max(churn.mean(), 1e-9)
    levels = {}
    for s in np.unique(segment):
        chosen = segment == s
        value_ratio = p_high[chosen].mean() / overall_high
        churn_ratio = churn[chosen].mean() / overall_churn
        value = "high" if value_ratio >= 1.5 else "low" if value_ratio <= 0.5 else "mid"
        risk = "at-risk" if churn_ratio >= 1.2 else "loyal" if churn_ratio <= 0.8 else "steady"
        levels[int(s)] = (f"{VALUE_WORDS[value]} {risk}", value, risk, int(chosen.sum()))
    names: dict[int, tuple[str, str, str]] = {}
    by_name: dict[str, list[int]] = {}
    for s, (name, *_rest) in levels.items():
        by_name.setdefault(name, []).append(s)
    for name, members in by_name.items():
        members.sort(key=lambda s: -levels[s][3])
        for rank, s in enumerate(members, start=1):
            label = name if len(members) == 1 else f"{name} {rank}"
            names[s] = (label, levels[s][1], levels[s][2])
    return names

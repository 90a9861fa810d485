"""The scoring run's report: one self-contained HTML file (images inlined), opens offline."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import duckdb
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.decomposition import PCA

from ml.reasons import without_figures

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:1em}img{max-width:520px}
"""


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _img(data: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, float_format=lambda v: f"{v:,.3f}", border=0)


def segment_map(
    embeddings: np.ndarray,
    segment: np.ndarray,
    names: dict[int, str],
    seed: int = 0,
    rows: int = 5_000,
):
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(segment), min(rows, len(segment)), replace=False))
    points = PCA(n_components=2, random_state=seed).fit_transform(np.asarray(embeddings)[chosen])
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for s in np.unique(segment[chosen]):
        mask = segment[chosen] == s
        ax.scatter(points[mask, 0], points[mask, 1], s=6, alpha=0.6, label=names[int(s)])
    ax.set(title="customers by segment (PCA of the fused embedding)", xlabel="PC 1", ylabel="PC 2")
    ax.legend(markerscale=3, fontsize=8)
    return fig


def reason_drivers(texts: pd.Series, top: int = 8) -> pd.DataFrame:
    """The reasons that most often appear among customers' top three (reason codes as
    ``ml.reasons`` writes them, "; "-separated), each customer's figures replaced by N so that
    the same driver counts once whatever its value, with the share of customers it names."""
    lists = texts.dropna().str.split("; ")
    if lists.empty:
        return pd.DataFrame(columns=["driver", "customers", "share"])
    drivers = lists.map(lambda xs: sorted({without_figures(x) for x in xs}))
    counts = drivers.explode().value_counts().head(top)
    return pd.DataFrame(
        {
            "driver": counts.index,
            "customers": counts.to_numpy(),
            "share": counts.to_numpy() / len(lists),
        }
    ).round({"share": 3})


def _reasons_html(con: duckdb.DuckDBPyConnection) -> str:
    """Reason codes: what drives churn risk among high-risk customers and the tier among
    high-value ones, and the five riskiest customers' own reasons."""
    rows = con.execute(
        "select customer_id, churn_probability, churn_risk_band, value_tier, churn_reasons,"
        " tier_reasons from marts.customer_scores"
    ).df()
    if rows["churn_reasons"].isna().all():
        return "<p>No reason codes in this run (the setting VALUELOOP_SCORE_REASONS is off).</p>"
    risky = rows[rows["churn_risk_band"] == "high"]
    high = rows[rows["value_tier"] == "high"]
    riskiest = rows.nlargest(5, "churn_probability")[
        ["customer_id", "churn_probability", "churn_reasons", "tier_reasons"]
    ].round({"churn_probability": 3})
    return (
        f"<p>Each customer's three strongest drivers of churn risk and of tier are in "
        f"<code>marts.customer_scores</code> (<code>churn_reasons</code>, "
        f"<code>tier_reasons</code>). The drivers named most often, figures left out, among "
        f"the {len(risky):,} customers in the high churn-risk band:</p>"
        f"{_table(reason_drivers(risky['churn_reasons']))}"
        f"<p>and of the tier, among the {len(high):,} high-tier customers:</p>"
        f"{_table(reason_drivers(high['tier_reasons']))}"
        f"<p>The five customers most at risk:</p>{_table(riskiest)}"
    )


def write_report(
    con: duckdb.DuckDBPyConnection, run_id: str, stats: dict, map_png: Path, path: Path
) -> Path:
    """The HTML report of a published run; `stats` and `map_png` come from the scoring step."""
    scores = con.execute(
        "select value_tier, churn_probability, churn_risk_band, model_version,"
        " scored_at from marts.customer_scores"
    ).df()
    summary = con.execute(
        "select * exclude (scoring_run_id) from marts.segment_summary order by n_customers desc"
    ).df()
    summary.to_csv(path.with_name(f"{path.stem}_segments.csv"), index=False)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    tiers = scores["value_tier"].value_counts().reindex(["high", "active", "lapsed"]).fillna(0)
    tiers.plot.bar(ax=axes[0], color=["#2a9d8f", "#e9c46a", "#e76f51"], title="tier mix")
    axes[1].hist(scores["churn_probability"], bins=30, color="#264653")
    axes[1].set(title="churn probability", xlabel="probability", ylabel="customers")
    distributions = _png(fig)
    map_data = base64.b64encode(map_png.read_bytes()).decode()

    # The run scored last before this one (a rerun keeps its first time: runs made after it
    # are not what it changed from).
    previous = con.execute(
        """
        select scoring_run_id from marts.customer_scores_history where scoring_run_id <> ?
        group by 1
        having max(scored_at) < coalesce((select min(scored_at)
            from marts.customer_scores_history where scoring_run_id = ?), 'infinity'::timestamp)
        order by max(scored_at) desc limit 1""",
        [run_id, run_id],
    ).fetchall()
    if previous:
        changes = con.execute(
            """
            select coalesce(before.value_tier, '(new)') as previous_tier,
                   count(*) filter (where now.value_tier = 'high') as now_high,
                   count(*) filter (where now.value_tier = 'active') as now_active,
                   count(*) filter (where now.value_tier = 'lapsed') as now_lapsed
            from marts.customer_scores as now
            left join marts.customer_scores_history as before
                on now.customer_id = before.customer_id and before.scoring_run_id = ?
            group by 1 order by 1""",
            [previous[0][0]],
        ).df()
        changes_html = (
            f"<p>Compared with run <code>{html.escape(previous[0][0])}</code>: "
            f"customers by previous and current tier.</p>{_table(changes)}"
        )
    else:
        changes_html = "<p>First published run: nothing to compare with yet.</p>"

    version = html.escape(str(scores["model_version"].iloc[0]))
    bands = scores["churn_risk_band"].value_counts().reindex(["low", "medium", "high"]).fillna(0)
    silhouettes = ", ".join(f"k={k}: {v:.3f}" for k, v in stats["silhouette_by_k"].items())
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>ValueLoop scoring {html.escape(run_id)}</title><style>{STYLE}</style></head><body>
<h1>Scoring run {html.escape(run_id)}</h1>
<p>{len(scores):,} customers scored with model version {version} at
{scores["scored_at"].iloc[0]}. Churn-risk bands: low {int(bands["low"]):,}, medium
{int(bands["medium"]):,}, high {int(bands["high"]):,}.</p>
<h2>Tier mix and churn risk</h2>{_img(distributions, "tier mix and churn distribution")}
<h2>Segments</h2><p>K-Means on the fused embedding, k = {stats["k"]} chosen by silhouette
({silhouettes}); Calinski-Harabasz {stats["calinski_harabasz"]:,.1f}.</p>
{_table(summary)}<div class="grid">{_img(map_data, "segment map")}</div>
<h2>Why: reason codes</h2>{_reasons_html(con)}
<h2>Changes since the last run</h2>{changes_html}
</body></html>"""
    path.write_text(page)
    return path

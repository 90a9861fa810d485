"""The three suites, one function each: raw (after ingest), marts (after dbt), scores (before BI).

dbt tests cover per-model invariants (keys, relationships, accepted values); these are the
batch-level checks: schema, row-count change, null rates, value ranges, distributions, label
balance. Bounds are fixed (or set once in the settings); what moves (the previous batch, the
previous successful run, the time of the check) enters as a metric, a ratio or a difference
against it, so the suites themselves never change.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

import duckdb
import yaml

from valueloop.config import Settings, env_var
from valueloop.contract import ENTITIES, FEEDBACK_ENTITIES
from valueloop.ingest import ALREADY_LOADED
from valueloop.plausibility import IMPLAUSIBLE, PlausibleRange, moved_by, plausible_ranges
from valueloop.quality.checks import Check, schema_check, sql_literal, table_exists

SCORES_TABLE = "marts.customer_scores"
# The documented schema of the published scores (see README, "Scores for BI").
SCORES_COLUMNS = [
    "customer_id",
    "as_of",
    "value_tier",
    "p_high",
    "p_active",
    "p_lapsed",
    "churn_probability",
    "churn_risk_band",
    "segment_id",
    "segment_name",
    "next_best_action",
    "expected_cost",
    "action_policy",
    "expected_incremental_profit",
    "playbook_action",
    "churn_reasons",
    "tier_reasons",
    "model_name",
    "model_version",
    "model_run_id",
    "scoring_run_id",
    "scored_at",
]
TIERS = ("high", "active", "lapsed")
# Entities whose batches cover a stretch of time: their volume is compared per day covered.
TIME_COLUMNS = {"order_lines": "invoiced_at", "reviews": "reviewed_at"}
Baseline = dict[str, float]


def contract_columns(settings: Settings, model: str) -> list[str]:
    """Columns of a contracted dbt model, read from its YAML (the contract's one home)."""
    for path in (settings.dbt_project_dir / "models").rglob("*.yml"):
        for node in (yaml.safe_load(path.read_text()) or {}).get("models", []):
            if node["name"] == model:
                return [c["name"] for c in node.get("columns", [])]
    raise LookupError(f"no dbt model named {model} in {settings.dbt_project_dir}")


def _ratio(metric_sql: str, previous: float | None) -> str:
    return "null" if not previous else f"({metric_sql}) / {previous!r}"


def _difference(metric_sql: str, previous: float | None) -> str:
    return "null" if previous is None else f"abs(({metric_sql}) - {previous!r})"


def _batches(con: duckdb.DuckDBPyConnection, entity: str) -> list[dict]:
    """Every ingest batch of the entity still in the warehouse, newest first. A withdrawn
    batch's rows are in the quarantine, and so are all of a batch whose lines were all loaded
    before (a whole export sent again; its bad lines, if any, quarantined again for their own
    reasons, as they were the first time): nothing is left of either to judge."""
    withdrawn = (
        " and batch_id not in (select batch_id from raw.withdrawn_batches)"
        if table_exists(con, "raw.withdrawn_batches")
        else ""
    )
    already = sql_literal("%" + ALREADY_LOADED + "%")
    rows = con.execute(
        "select batch_id, rows_accepted, rows_read, loaded_at from raw.ingest_batches as b"
        f" where entity = ?{withdrawn} and not (rows_accepted = 0 and exists (select 1"
        f" from raw.quarantine as q where q._batch_id = b.batch_id and q.reason like {already}))"
        " order by loaded_at desc, batch_id desc",
        [entity],
    ).fetchall()
    return [{"batch_id": r[0], "rows": r[1], "read": r[2], "loaded_at": r[3]} for r in rows]


# --------------------------------------------------------------------------- raw


def raw_suite(
    con: duckdb.DuckDBPyConnection, settings: Settings, checked_at: datetime
) -> list[Check]:
    """The latest ingest batch of each entity, against the batch before it.

    Plausibility holds from the first batch on: a batch with too many rows quarantined as
    implausible stops, and no accepted row may lie outside the plausible ranges.
    """
    checks: list[Check] = []
    ranges = plausible_ranges(settings, checked_at)
    for entity in ENTITIES.values():
        checks.append(schema_check(con, entity.table, entity.column_names, f"{entity.name}.schema"))
        batches = _batches(con, entity.name)
        checks += _batch_checks(entity, *[*batches[:2], None, None][:2], ranges, settings)
    return checks


def latest_batch_ids(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    """Each entity's latest batch still in the warehouse, the one :func:`raw_suite` judges."""
    latest = {e: _batches(con, e) for e in ENTITIES}
    return {e: batches[0]["batch_id"] for e, batches in latest.items() if batches}


def raw_earlier_batches(
    con: duckdb.DuckDBPyConnection,
    settings: Settings,
    checked_at: datetime,
    since: datetime | None,
) -> list[tuple[str, list[Check]]]:
    """The batches loaded after ``since`` (the last raw run with no critical failure; None:
    every batch) other than each entity's latest, each with the checks :func:`raw_suite` runs
    on the latest, by the same names, against the batch before it. Several files landed at
    once are each a batch, and each is checked, not only the last one loaded."""
    ranges = plausible_ranges(settings, checked_at)
    earlier: list[tuple[str, list[Check]]] = []
    for entity in ENTITIES.values():
        batches = _batches(con, entity.name)
        for index in range(1, len(batches)):
            if since is not None and batches[index]["loaded_at"] <= since:
                break
            previous = batches[index + 1] if index + 1 < len(batches) else None
            checks = _batch_checks(entity, batches[index], previous, ranges, settings)
            earlier.append((batches[index]["batch_id"], checks))
    return earlier


def _batch_checks(
    entity,
    latest: dict | None,
    previous: dict | None,
    ranges: dict[str, tuple[PlausibleRange, ...]],
    settings: Settings,
) -> list[Check]:
    """One entity's checks of batch ``latest`` against ``previous`` (None: not applicable)."""
    table = entity.table
    # A source without this entity still gets every check, each not applicable (null),
    # so the suite is the same for every shop.
    batch = f"_batch_id = {sql_literal(latest['batch_id'])}" if latest else "false"
    ratio = _ratio("count(*)", previous and previous["rows"])
    if entity.name in TIME_COLUMNS and previous:
        # A month's feed after years of backfill: compare rows per day of data covered.
        ts = TIME_COLUMNS[entity.name]
        rate = f"count(*) / greatest(1, date_diff('day', min({ts}), max({ts})) + 1)"
        ratio = (
            f"({rate}) / (select {rate} from {table} where _batch_id = "
            f"{sql_literal(previous['batch_id'])})"
        )
    entity_checks = [
        Check(
            f"{entity.name}.row_count",
            table,
            "count(*)",
            "the batch has rows",
            min_value=1,
            where=batch,
        ),
        Check(
            f"{entity.name}.row_count_vs_previous_batch",
            table,
            ratio,
            "row count (per day covered, for dated entities) within 0.2x-5x of the previous batch",
            min_value=0.2,
            max_value=5.0,
            where=batch,
        ),
        Check(
            f"{entity.name}.row_count_drift",
            table,
            ratio,
            "row count (per day covered, for dated entities) within 0.5x-2x of the previous batch",
            min_value=0.5,
            max_value=2.0,
            severity="warning",
            where=batch,
        ),
        *_entity_checks(entity.name, table, batch, latest, previous),
        *_plausibility_checks(entity.name, table, batch, latest, ranges[entity.name], settings),
    ]
    if entity in FEEDBACK_ENTITIES:
        # Feedback batches follow campaign sizes: their row counts are not compared.
        entity_checks = [c for c in entity_checks if "row_count_" not in c.name]
    if latest is None:
        entity_checks = [replace(c, metric_sql="null") for c in entity_checks]
    return entity_checks


def _plausibility_checks(
    entity: str,
    table: str,
    batch: str,
    latest: dict | None,
    ranges: tuple[PlausibleRange, ...],
    settings: Settings,
) -> list[Check]:
    """The batch's share quarantined as implausible, and each ruled column's accepted values."""
    implausible = f"reason like {sql_literal('%' + IMPLAUSIBLE + '%')}"
    rows_read = latest["read"] if latest else 0
    checks = [
        Check(
            f"{entity}.implausible_row_share",
            "raw.quarantine",
            f"count(*) filter (where {implausible}) / nullif({rows_read}, 0)",
            "few of the batch's rows were quarantined as implausible "
            f"({env_var('implausible_share_max')})",
            max_value=settings.implausible_share_max,
            column="reason",
            where=batch,
            bad_rows=implausible,
        )
    ]
    by_column: dict[str, list[PlausibleRange]] = {}
    for plausible in ranges:
        by_column.setdefault(plausible.column, []).append(plausible)
    for column, column_ranges in by_column.items():
        outside = " or ".join(r.outside() for r in column_ranges)
        checks.append(
            Check(
                f"{entity}.{column}_outside_plausible_range",
                table,
                f"count(*) filter (where {outside})",
                f"no accepted {column} outside its plausible range ({moved_by(column_ranges)})",
                max_value=0,
                column=column,
                where=batch,
                bad_rows=outside,
            )
        )
    return checks


def _median_vs_previous_batch(column: str, table: str, previous: dict | None) -> str:
    """Median of the column's positive values, over that of the previous batch."""
    median = f"quantile_cont({column}, 0.5) filter (where {column} > 0)"
    if previous is None:
        return "null"
    before = f"(select {median} from {table} where _batch_id = {sql_literal(previous['batch_id'])})"
    return f"({median}) / nullif({before}, 0)"


def _entity_checks(
    entity: str, table: str, batch: str, latest: dict | None, previous: dict | None
) -> list[Check]:
    if entity == "order_lines":
        null_rate = "avg((customer_id is null)::int)"
        prev_null_rate = (
            f"(select {null_rate} from {table} where _batch_id = "
            f"{sql_literal(previous['batch_id'])})"
            if previous
            else None
        )
        duplicates = (
            "(count(*) - count(distinct (invoice_id, sku, description, quantity, unit_price,"
            " invoiced_at, customer_id, country))) / count(*)"
        )
        reversal = "upper(invoice_id) like 'C%' or upper(invoice_id) like 'R%'"
        # Ingest quarantines the lines an earlier batch loaded (overlapping exports, lines
        # re-exported under another name), so they are not counted twice; the share warns.
        already = f"reason like {sql_literal('%' + ALREADY_LOADED + '%')}"
        rows_read = latest["read"] if latest else 0
        return [
            Check(
                f"{entity}.lines_loaded_before",
                "raw.quarantine",
                f"count(*) filter (where {already}) / nullif({rows_read}, 0)",
                "no line of the batch repeats a line an earlier batch loaded (ingest quarantined"
                " those: exports that overlap, or lines sent again under another name)",
                max_value=0,
                severity="warning",
                column="reason",
                where=batch,
                bad_rows=already,
            ),
            Check(
                f"{entity}.customer_id_null_rate",
                table,
                null_rate,
                "at most half the lines are guest checkouts",
                max_value=0.5,
                column="customer_id",
                where=batch,
            ),
            Check(
                f"{entity}.customer_id_null_rate_change",
                table,
                "null" if prev_null_rate is None else f"abs({null_rate} - {prev_null_rate})",
                "guest share moves by at most 10 points from the previous batch",
                max_value=0.10,
                column="customer_id",
                where=batch,
            ),
            Check(
                f"{entity}.negative_quantity_without_reversal",
                table,
                f"count(*) filter (where quantity < 0 and unit_price > 0 and not ({reversal}))",
                "negative quantities only on cancellations and returns",
                max_value=0,
                column="invoice_id",
                where=batch,
                bad_rows=f"quantity < 0 and unit_price > 0 and not ({reversal})",
            ),
            *(
                Check(
                    f"{entity}.{column}_median_vs_previous_batch",
                    table,
                    _median_vs_previous_batch(column, table, previous),
                    f"median positive {column} within 0.1x-10x of the previous batch",
                    min_value=0.1,
                    max_value=10.0,
                    severity="warning",
                    column=column,
                    where=batch,
                )
                for column in ("quantity", "unit_price")
            ),
            Check(
                f"{entity}.duplicate_line_share",
                table,
                duplicates,
                "at most 5% of lines repeat another line exactly",
                max_value=0.05,
                column="invoice_id",
                where=batch,
            ),
            Check(
                f"{entity}.duplicate_line_drift",
                table,
                duplicates,
                "at most 0.5% of lines repeat another line exactly",
                max_value=0.005,
                severity="warning",
                column="invoice_id",
                where=batch,
            ),
        ]
    if entity == "campaign_outcomes":
        return [
            Check(
                f"{entity}.revenue_without_conversion",
                table,
                "count(*) filter (where revenue <> 0 and event <> 'converted')",
                "only converted events carry revenue",
                max_value=0,
                column="revenue",
                where=batch,
                bad_rows="revenue <> 0 and event <> 'converted'",
            ),
            Check(
                f"{entity}.conversion_share",
                table,
                "avg((event = 'converted')::int)",
                "at most half the events of a batch are conversions",
                max_value=0.5,
                severity="warning",
                column="event",
                where=batch,
            ),
        ]
    if entity == "customers":
        return [
            Check(
                f"{entity}.email_null_rate",
                table,
                "avg((email is null)::int)",
                "most accounts have an email",
                max_value=0.5,
                severity="warning",
                column="email",
                where=batch,
            ),
        ]
    return []


# --------------------------------------------------------------------------- marts

# Key features and the least each of their statistics can sensibly be.
KEY_FEATURES = {"recency_days": 0, "frequency": 1, "monetary_value": 0, "avg_order_value": 0}


def marts_suite(
    con: duckdb.DuckDBPyConnection, settings: Settings, checked_at: datetime, baseline: Baseline
) -> list[Check]:
    """The marts that feed training and scoring, against the previous successful run."""
    today = sql_literal(checked_at.date().isoformat())
    checks: list[Check] = [
        schema_check(con, f"marts.{model}", contract_columns(settings, model), f"{model}.schema")
        for model in ("customer_features", "customer_labels", "customer_documents")
    ]
    scoring, training = "marts.scoring_set", "marts.training_set"
    checks += [
        Check(
            "scoring_set.row_count",
            scoring,
            "count(*)",
            "there are customers to score",
            min_value=1,
        ),
        Check(
            "scoring_set.row_count_vs_previous_run",
            scoring,
            _ratio("count(*)", baseline.get("scoring_set.row_count")),
            "customers to score within 0.5x-2x of the previous run",
            min_value=0.5,
            max_value=2.0,
        ),
        Check(
            "scoring_set.as_of_not_in_the_future",
            scoring,
            f"count(*) filter (where as_of > {today}::date)",
            "as_of is not in the future",
            max_value=0,
            column="as_of",
            bad_rows=f"as_of > {today}::date",
        ),
        Check(
            "scoring_set.negative_recency",
            scoring,
            "count(*) filter (where recency_days < 0)",
            "recency is non-negative",
            max_value=0,
            column="recency_days",
            bad_rows="recency_days < 0",
        ),
        Check(
            "scoring_set.negative_tenure",
            scoring,
            "count(*) filter (where tenure_days < 0)",
            "tenure is non-negative",
            max_value=0,
            column="tenure_days",
            bad_rows="tenure_days < 0",
        ),
        Check(
            "scoring_set.document_null_rate",
            scoring,
            "avg((document is null)::int)",
            "every customer has a document",
            max_value=0,
            column="document",
        ),
    ]
    for feature, least in KEY_FEATURES.items():
        for stat, sql in (
            ("mean", f"avg({feature})"),
            ("p50", f"quantile_cont({feature}, 0.5)"),
            ("p95", f"quantile_cont({feature}, 0.95)"),
        ):
            name = f"scoring_set.{feature}_{stat}"
            checks += [
                Check(
                    name,
                    scoring,
                    sql,
                    f"{stat} of {feature} is at least {least} (and is the next run's baseline)",
                    min_value=least,
                    severity="warning",
                    column=feature,
                ),
                Check(
                    f"{name}_vs_previous_run",
                    scoring,
                    _ratio(sql, baseline.get(name)),
                    f"{stat} of {feature} within 0.5x-2x of the previous successful run",
                    min_value=0.5,
                    max_value=2.0,
                    severity="warning",
                    column=feature,
                ),
            ]
        checks.append(
            Check(
                f"scoring_set.{feature}_null_rate",
                scoring,
                f"avg(({feature} is null)::int)",
                f"{feature} is never null",
                max_value=0,
                column=feature,
            )
        )
    train = "split = 'train'"
    churn_rate = "avg(is_churned::int)"
    checks += [
        Check(
            "training_set.row_count", training, "count(*)", "there are labelled rows", min_value=1
        ),
        Check(
            "training_set.splits",
            training,
            "count(distinct split)",
            "train, validation and test splits are all present (it takes three labelled "
            "cutoffs, each at least horizon_days before the last day of data: with "
            "`valueloop transform --as-of`, give three or more such dates)",
            min_value=3,
            max_value=3,
        ),
        Check(
            "training_set.churn_rate",
            training,
            churn_rate,
            "churn is neither (almost) everyone nor no one",
            min_value=0.02,
            max_value=0.98,
            column="is_churned",
            where=train,
        ),
        Check(
            "training_set.high_tier_share",
            training,
            "avg((value_tier = 'high')::int)",
            "the high tier is a minority but present",
            min_value=0.005,
            max_value=0.5,
            column="value_tier",
            where=train,
        ),
        Check(
            "training_set.churn_rate_change",
            training,
            _difference(churn_rate, baseline.get("training_set.churn_rate")),
            "churn rate moves by at most 15 points from the previous run",
            max_value=0.15,
            severity="warning",
            column="is_churned",
            where=train,
        ),
        Check(
            "fct_order_lines.rows_minus_raw",
            "marts.fct_order_lines",
            "count(*) - (select count(*) from raw.order_lines)",
            "every raw order line reaches the fact table",
            min_value=0,
            max_value=0,
        ),
    ]
    return checks


# --------------------------------------------------------------------------- scores


def scores_suite(
    con: duckdb.DuckDBPyConnection, table: str = SCORES_TABLE, baseline: Baseline | None = None
) -> list[Check]:
    """Scores about to be published (``table`` may be a candidate table) against their schema."""
    baseline = baseline or {}
    probabilities = ("p_high", "p_active", "p_lapsed", "churn_probability")
    out_of_range = " or ".join(f"{p} not between 0 and 1" for p in probabilities)
    tiers = ", ".join(sql_literal(t) for t in TIERS)
    churn_mean = "avg(churn_probability)"
    return [
        schema_check(con, table, SCORES_COLUMNS, "customer_scores.schema"),
        Check(
            "customer_scores.rows_minus_scoring_set",
            table,
            "count(*) - (select count(*) from marts.scoring_set)",
            "every customer of the scoring set is scored once",
            min_value=0,
            max_value=0,
        ),
        Check(
            "customer_scores.probability_out_of_range",
            table,
            f"count(*) filter (where {out_of_range})",
            "probabilities are within [0, 1]",
            max_value=0,
            column="churn_probability",
            bad_rows=out_of_range,
        ),
        Check(
            "customer_scores.tier_probabilities_not_summing_to_one",
            table,
            "count(*) filter (where abs(p_high + p_active + p_lapsed - 1) > 1e-3)",
            "tier probabilities sum to 1",
            max_value=0,
            column="p_high",
            bad_rows="abs(p_high + p_active + p_lapsed - 1) > 1e-3",
        ),
        Check(
            "customer_scores.unknown_tier",
            table,
            f"count(*) filter (where value_tier is null or value_tier not in ({tiers}))",
            "tiers are high, active or lapsed",
            max_value=0,
            column="value_tier",
            bad_rows=f"value_tier is null or value_tier not in ({tiers})",
        ),
        Check(
            "customer_scores.missing_model_version",
            table,
            "count(*) filter (where model_version is null)",
            "every score names its model",
            max_value=0,
            column="model_version",
        ),
        Check(
            "customer_scores.churn_probability_mean",
            table,
            churn_mean,
            "mean churn probability is a probability (and the next run's baseline)",
            min_value=0,
            max_value=1,
            column="churn_probability",
        ),
        Check(
            "customer_scores.churn_probability_mean_change",
            table,
            _difference(churn_mean, baseline.get("customer_scores.churn_probability_mean")),
            "mean churn probability moves by at most 0.2 from the previous run",
            max_value=0.2,
            severity="warning",
            column="churn_probability",
        ),
    ]


def require_table(con: duckdb.DuckDBPyConnection, table: str, hint: str) -> None:
    if not table_exists(con, table):
        raise LookupError(f"{table} does not exist yet; {hint}")

"""Great Expectations checkpoints through the real GX context, DuckDB and dbt marts."""

from __future__ import annotations

import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import duckdb
import pytest

from tests import corpus
from tests.conftest import ONLINE_RETAIL_CSV, run_valueloop
from valueloop import jobs, transform
from valueloop.config import Settings, load_settings
from valueloop.ingest import IngestError
from valueloop.quality.runner import QualityError, run_checkpoint
from valueloop.quality.suites import SCORES_COLUMNS
from valueloop.simulator import SimulationConfig, generate


def rows_by_batch(settings: Settings) -> dict[str, tuple[list[int], list[int]]]:
    """Accepted and quarantined row numbers of every batch."""
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        batches = [r[0] for r in con.execute("select batch_id from raw.ingest_batches").fetchall()]
        return {
            b: (
                [
                    r[0]
                    for r in con.execute(
                        "select _row_number from raw.order_lines where _batch_id = ? order by 1",
                        [b],
                    ).fetchall()
                ],
                [
                    r[0]
                    for r in con.execute(
                        "select _row_number from raw.quarantine where _batch_id = ? order by 1", [b]
                    ).fetchall()
                ],
            )
            for b in batches
        }


def assert_nothing_lost_or_duplicated(settings: Settings) -> None:
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        read = dict(con.execute("select batch_id, rows_read from raw.ingest_batches").fetchall())
    for batch, (accepted, quarantined) in rows_by_batch(settings).items():
        assert not set(accepted) & set(quarantined), batch
        assert sorted(accepted + quarantined) == list(range(1, read[batch] + 1)), batch


def ingest(settings: Settings, path: Path):
    return jobs.ingest_path(settings, path, "online-retail")


@pytest.fixture
def with_good_batch(settings: Settings, tmp_path: Path) -> Settings:
    """A warehouse whose last batch was clean and passed the raw checkpoint."""
    ingest(settings, corpus.write_csv(tmp_path / "day1.csv", corpus.clean_batch(seed=1)))
    assert run_checkpoint(settings, "raw", run_id="day1").success
    return settings


def test_a_clean_batch_passes_and_results_are_stored(with_good_batch: Settings) -> None:
    settings = with_good_batch
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        stored = con.execute(
            "select count(*), bool_and(success), count(distinct checkpoint)"
            " from quality.validation_results where run_id = 'day1'"
        ).fetchone()
    assert stored[0] > 10 and stored[1] and stored[2] == 1


@pytest.mark.parametrize(
    ("case", "expectation", "sample"),
    [
        ("negative_without_cancellation", "order_lines.negative_quantity_without_reversal", "6"),
        ("null_customers", "order_lines.customer_id_null_rate_change", None),
        ("much_smaller", "order_lines.row_count_vs_previous_batch", None),
        ("duplicated_lines", "order_lines.duplicate_line_share", None),
    ],
)
def test_a_broken_batch_stops_the_pipeline_naming_the_expectation(
    with_good_batch: Settings, tmp_path: Path, case: str, expectation: str, sample: str | None
) -> None:
    settings = with_good_batch
    rows = corpus.MUTATIONS[case](corpus.clean_batch(seed=2))
    ingest(settings, corpus.write_csv(tmp_path / f"{case}.csv", rows))
    with pytest.raises(QualityError) as stopped:
        run_checkpoint(settings, "raw", run_id=case)
    message = str(stopped.value)
    assert f"[critical] {expectation} on raw.order_lines" in message
    assert "raw checkpoint stopped the pipeline (suite valueloop_raw" in message
    if sample:
        assert sample in message.split("sample bad values:")[1]
    failed = [r.check.name for r in stopped.value.report.critical_failures]
    assert failed == [expectation]
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        assert (
            con.execute(
                "select count(*) from quality.validation_results where run_id = ?"
                " and not success and check_name = ?",
                [case, expectation],
            ).fetchone()[0]
            == 1
        )
    assert_nothing_lost_or_duplicated(settings)


def test_every_batch_since_the_last_check_is_judged_and_a_bad_one_can_be_withdrawn(
    with_good_batch: Settings, tmp_path: Path
) -> None:
    """Two files land before the next check, the bad one first: the check judges both (before,
    only the latest, so the bad rows reached the marts); `valueloop withdraw` moves the bad
    batch to the quarantine, and the check passes over what is left."""
    settings = with_good_batch
    bad = corpus.MUTATIONS["negative_without_cancellation"](corpus.clean_batch(seed=2))
    ingest(settings, corpus.write_csv(tmp_path / "day2.csv", bad))
    ingest(settings, corpus.write_csv(tmp_path / "day3.csv", corpus.clean_batch(seed=3)))
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        [(bad_batch, read)] = con.execute(
            "select batch_id, rows_read from raw.ingest_batches where source_file like '%day2.csv'"
        ).fetchall()
    with pytest.raises(QualityError) as stopped:
        run_checkpoint(settings, "raw", run_id="day3")
    message = str(stopped.value)
    assert "[critical] order_lines.negative_quantity_without_reversal on raw.order_lines" in message
    assert f"batch {bad_batch}" in message and "valueloop withdraw" in message
    failed = [r.check.name for r in stopped.value.report.critical_failures]
    assert failed == ["order_lines.negative_quantity_without_reversal"]
    # Rerun as it was: the same batches, the same verdict.
    with pytest.raises(QualityError):
        run_checkpoint(settings, "raw", run_id="day3")

    done = run_valueloop(
        "withdraw", bad_batch, "--reason", "the shop sent refunds as sales", home=settings.home
    )
    assert done.returncode == 0, done.stderr
    moved = f"{bad_batch} ({tmp_path / 'day2.csv'}): {read:,} order_lines rows moved to raw."
    assert moved in done.stdout
    again = run_valueloop("withdraw", bad_batch, "--reason", "twice", home=settings.home)
    assert again.returncode == 0 and "was already withdrawn" in again.stdout
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        left = con.execute(
            "select count(*) from raw.order_lines where _batch_id = ?", [bad_batch]
        ).fetchone()[0]
        quarantined = con.execute(
            "select count(*), count(*) filter (where reason = 'batch withdrawn: the shop sent"
            " refunds as sales') from raw.quarantine where _batch_id = ?",
            [bad_batch],
        ).fetchone()
        counts = con.execute(
            "select rows_read, rows_accepted, rows_quarantined from raw.ingest_batches"
            " where batch_id = ?",
            [bad_batch],
        ).fetchone()
    assert left == 0 and quarantined == (read, read) and counts == (read, 0, read)
    assert_nothing_lost_or_duplicated(settings)
    assert run_checkpoint(settings, "raw", run_id="day3-after").success
    unknown = run_valueloop("withdraw", "order_lines-nope", "--reason", "x", home=settings.home)
    assert unknown.returncode != 0 and "no batch order_lines-nope" in unknown.stderr


def test_a_few_duplicates_are_a_warning_not_a_stop(
    with_good_batch: Settings, tmp_path: Path
) -> None:
    rows = corpus.duplicated_lines(corpus.clean_batch(seed=3), share=0.02)
    ingest(with_good_batch, corpus.write_csv(tmp_path / "dups.csv", rows))
    report = run_checkpoint(with_good_batch, "raw", run_id="dups")
    assert report.success
    assert [r.check.name for r in report.warnings] == ["order_lines.duplicate_line_drift"]
    assert "[warning] order_lines.duplicate_line_drift" in report.summary()


# The value each implausible case writes, as its quarantine reason and the samples show it.
IMPLAUSIBLE_VALUES = {
    "huge_quantities": "quantity: 999999999999 outside the plausible range [-100000, 100000]"
    " (VALUELOOP_PLAUSIBLE_QUANTITY_MAX)",
    "negative_product_prices": "outside the plausible range [0, 100000] on a product line",
    "far_future_dates": "invoiced_at: 2099-01-01 10:00:00 outside the plausible range [1990-01-01,",
    "dates_before_the_shop": "invoiced_at: 1900-01-01 10:00:00 outside the plausible range",
}


def quarantine_reasons(settings: Settings) -> list[str]:
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        return [r[0] for r in con.execute("select reason from raw.quarantine").fetchall()]


@pytest.mark.parametrize("case", sorted(corpus.IMPLAUSIBLE))
def test_a_first_batch_of_implausible_values_is_quarantined_and_stopped(
    settings: Settings, tmp_path: Path, case: str
) -> None:
    rows = corpus.IMPLAUSIBLE[case](corpus.clean_batch(seed=8))
    report = ingest(settings, corpus.write_csv(tmp_path / f"{case}.csv", rows))
    assert (report.rows_read, report.rows_accepted, report.rows_quarantined) == (2_000, 1_900, 100)
    reasons = quarantine_reasons(settings)
    assert len(reasons) == 100 and all(IMPLAUSIBLE_VALUES[case] in r for r in reasons)
    with pytest.raises(QualityError) as stopped:
        run_checkpoint(settings, "raw", run_id=case)
    failed = [r.check.name for r in stopped.value.report.critical_failures]
    assert failed == ["order_lines.implausible_row_share"]
    message = str(stopped.value)
    assert (
        "[critical] order_lines.implausible_row_share on raw.quarantine.reason: observed 0.05,"
        " expected <= 0.01" in message
    )
    assert IMPLAUSIBLE_VALUES[case] in message.split("sample bad values:")[1]
    assert_nothing_lost_or_duplicated(settings)


def test_one_implausible_row_among_many_is_quarantined_and_the_batch_passes(
    settings: Settings, tmp_path: Path
) -> None:
    rows = corpus.huge_quantities(corpus.clean_batch(seed=9), every=2_000)
    report = ingest(settings, corpus.write_csv(tmp_path / "one.csv", rows))
    assert (report.rows_accepted, report.rows_quarantined) == (1_999, 1)
    assert quarantine_reasons(settings) == [IMPLAUSIBLE_VALUES["huge_quantities"]]
    checked = run_checkpoint(settings, "raw", run_id="one")
    assert checked.success and not checked.warnings
    assert_nothing_lost_or_duplicated(settings)


def test_accepted_rows_outside_tightened_ranges_stop_the_pipeline(
    with_good_batch: Settings,
) -> None:
    # Ranges narrowed after the load: the rows already accepted are judged again.
    tightened = load_settings(
        env={"VALUELOOP_PLAUSIBLE_QUANTITY_MAX": "10"}, home=with_good_batch.home
    )
    with pytest.raises(QualityError) as stopped:
        run_checkpoint(tightened, "raw", run_id="tightened")
    assert [r.check.name for r in stopped.value.report.critical_failures] == [
        "order_lines.quantity_outside_plausible_range"
    ]
    samples = stopped.value.report.critical_failures[0].samples
    assert samples and all(abs(float(s)) > 10 for s in samples)


def test_a_median_price_shift_warns_but_does_not_stop(
    with_good_batch: Settings, tmp_path: Path
) -> None:
    rows = corpus.prices_times(corpus.clean_batch(seed=2), factor=20)
    ingest(with_good_batch, corpus.write_csv(tmp_path / "dearer.csv", rows))
    report = run_checkpoint(with_good_batch, "raw", run_id="dearer")
    assert report.success
    assert [r.check.name for r in report.warnings] == [
        "order_lines.unit_price_median_vs_previous_batch"
    ]
    assert "[warning] order_lines.unit_price_median_vs_previous_batch" in report.summary()


@pytest.mark.dataset
@pytest.mark.skipif(
    not ONLINE_RETAIL_CSV.exists(), reason=f"UCI Online Retail not found at {ONLINE_RETAIL_CSV}"
)
def test_the_default_ranges_hold_all_of_online_retail(settings: Settings) -> None:
    report = ingest(settings, ONLINE_RETAIL_CSV)
    assert (report.rows_read, report.rows_accepted, report.rows_quarantined) == (
        541_909,
        541_909,
        0,
    )
    assert run_checkpoint(settings, "raw", run_id="online_retail").success


def test_wrong_types_and_bad_bytes_are_quarantined_with_reasons(
    with_good_batch: Settings, tmp_path: Path
) -> None:
    settings = with_good_batch
    typed = ingest(
        settings,
        corpus.write_csv(tmp_path / "types.csv", corpus.wrong_types(corpus.clean_batch(seed=4))),
    )
    encoded = ingest(
        settings, corpus.mangled_encoding(tmp_path / "latin1.csv", corpus.clean_batch(seed=5))
    )
    assert (typed.rows_read, typed.rows_quarantined) == (2_000, 40)
    assert (encoded.rows_read, encoded.rows_quarantined) == (2_000, 8)
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        reasons = dict(
            con.execute("select column_name, count(*) from raw.quarantine group by 1").fetchall()
        )
    assert reasons == {"quantity": 20, "invoiced_at": 20, "description": 8}
    assert run_checkpoint(settings, "raw").success  # what was accepted is clean
    assert_nothing_lost_or_duplicated(settings)


def test_duplicated_files_are_loaded_once(with_good_batch: Settings, tmp_path: Path) -> None:
    path = corpus.write_csv(tmp_path / "again.csv", corpus.clean_batch(seed=1))
    report = ingest(with_good_batch, path)
    assert report.results[0].skipped
    assert len(rows_by_batch(with_good_batch)) == 1
    assert_nothing_lost_or_duplicated(with_good_batch)
    # The same lines under another name with the first one dropped (another file's bytes):
    # ingest quarantines every one as loaded before, so nothing is counted twice, and the
    # raw checkpoint has nothing of that batch to judge.
    # A line of it that does not parse is quarantined again for its own reason.
    first = corpus.clean_batch(seed=1)
    broken = {**first[0], "Quantity": "many"}
    resent = ingest(
        with_good_batch, corpus.write_csv(tmp_path / "resent.csv", [broken, *first[1:]])
    )
    [result] = resent.results
    assert (result.rows_read, result.rows_accepted, result.rows_quarantined) == (2_000, 0, 2_000)
    assert run_checkpoint(with_good_batch, "raw", run_id="resent").success
    # An export that overlaps the last one: its repeated lines are quarantined with the batch
    # they repeat, its new ones load, and the raw checkpoint warns with the repeated invoices.
    overlap = first[1_500:] + corpus.clean_batch(seed=2, day=datetime(2011, 3, 2))
    report = ingest(with_good_batch, corpus.write_csv(tmp_path / "overlap.csv", overlap))
    [result] = report.results
    assert (result.rows_read, result.rows_accepted, result.rows_quarantined) == (2_500, 2_000, 500)
    checked = run_checkpoint(with_good_batch, "raw", run_id="overlap")
    assert checked.success
    [warning] = [r for r in checked.warnings if r.check.name == "order_lines.lines_loaded_before"]
    assert warning.observed == pytest.approx(500 / 2_500)
    assert "already loaded by batch order_lines-" in warning.samples[0]
    assert_nothing_lost_or_duplicated(with_good_batch)
    with duckdb.connect(str(with_good_batch.warehouse_path), read_only=True) as con:
        counted = con.execute(
            "select count(*), count(distinct (invoice_id, sku, description, quantity,"
            " unit_price, invoiced_at, customer_id, country)) from raw.order_lines"
        ).fetchone()
        reasons = con.execute(
            "select distinct regexp_extract(reason, 'batch (order_lines-[0-9a-f]+)', 1)"
            " from raw.quarantine where reason like '%already loaded%'"
        ).fetchall()
        day1 = con.execute(
            "select batch_id from raw.ingest_batches order by loaded_at limit 1"
        ).fetchone()
    assert counted == (4_000, 4_000)  # day 1 and day 2, each line once
    assert reasons == [day1]  # every repeat names the batch that loaded it first


@pytest.mark.parametrize(
    ("drift", "error"),
    [
        (corpus.renamed_column, r"missing column\(s\) Quantity"),
        (corpus.missing_column, r"missing column\(s\) Country"),
    ],
)
def test_schema_drift_stops_ingest_naming_the_columns(
    with_good_batch: Settings, tmp_path: Path, drift, error: str
) -> None:
    rows, header = drift(corpus.clean_batch(seed=6))
    with pytest.raises(IngestError, match=error):
        ingest(with_good_batch, corpus.write_csv(tmp_path / "drift.csv", rows, header))
    assert len(rows_by_batch(with_good_batch)) == 1


def test_an_extra_column_is_reported_and_ignored(with_good_batch: Settings, tmp_path: Path) -> None:
    rows, header = corpus.extra_column(corpus.clean_batch(seed=7))
    report = ingest(with_good_batch, corpus.write_csv(tmp_path / "extra.csv", rows, header))
    assert report.results[0].ignored_columns == ("Channel",)
    assert "ignored extra column(s): Channel" in report.summary()
    assert report.rows_accepted == 2_000
    assert run_checkpoint(with_good_batch, "raw").success


# ----------------------------------------------------------------- marts and scores


@pytest.fixture(scope="module")
def marts(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    settings = load_settings(
        env={"VALUELOOP_PII_SALT": "s"}, home=tmp_path_factory.mktemp("quality_marts")
    )
    generate(settings.demo_dir, SimulationConfig(customers=1_200, seed=21))
    jobs.ingest_path(settings, settings.demo_dir, "simulator")
    transform.build(settings, quiet=True)
    return settings


def test_marts_checkpoint_passes_then_flags_drift_and_stops_on_bad_values(marts: Settings) -> None:
    first = run_checkpoint(marts, "marts", run_id="m1")
    assert first.success and not first.warnings
    with duckdb.connect(str(marts.warehouse_path)) as con:
        con.execute("update marts.scoring_set set monetary_value = monetary_value * 3")
    drifted = run_checkpoint(marts, "marts", run_id="m2")
    assert drifted.success
    assert "scoring_set.monetary_value_mean_vs_previous_run" in {
        r.check.name for r in drifted.warnings
    }
    with duckdb.connect(str(marts.warehouse_path)) as con:
        con.execute("update marts.scoring_set set recency_days = -5 where frequency = 1")
    with pytest.raises(
        QualityError,
        match=r"scoring_set.negative_recency on marts.scoring_set"
        r".recency_days: observed \d+.*sample bad values: -5",
    ):
        run_checkpoint(marts, "marts", run_id="m3")


def test_too_few_explicit_cutoffs_stop_the_marts_checks_naming_the_fix(
    marts: Settings, tmp_path: Path
) -> None:
    """`transform --as-of` with two labelled dates builds no train split: the marts checks
    stop and say to give three or more; with three they pass."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(marts.warehouse_path, home / marts.warehouse_path.name)
    with duckdb.connect(str(home / marts.warehouse_path.name), read_only=True) as con:
        days = [
            str(r[0])
            for r in con.execute(
                "select distinct as_of from marts.training_set order by as_of desc limit 3"
            ).fetchall()
        ]
    two = run_valueloop("transform", "--as-of", days[0], "--as-of", days[1], home=home)
    assert two.returncode == 0, two.stderr[-2000:]
    stopped = run_valueloop("check", "marts", home=home)
    assert stopped.returncode != 0
    assert "training_set.splits" in stopped.stderr
    assert "give three or more such dates" in stopped.stderr
    three = [a for d in days for a in ("--as-of", d)]
    assert run_valueloop("transform", *three, home=home).returncode == 0
    passed = run_valueloop("check", "marts", home=home)
    assert passed.returncode == 0, passed.stderr[-2000:]


def _publish_scores(settings: Settings, churn: str) -> None:
    with duckdb.connect(str(settings.warehouse_path)) as con:
        con.execute(f"""
            create or replace table marts.customer_scores as
            select customer_id, as_of, 'active' as value_tier, 0.2 as p_high, 0.5 as p_active,
                   0.3 as p_lapsed, {churn} as churn_probability, 'medium' as churn_risk_band,
                   0 as segment_id, 'steady' as segment_name, 'cross-sell' as next_best_action,
                   0.4 as expected_cost, 'playbook' as action_policy,
                   null::double as expected_incremental_profit, 'cross-sell' as playbook_action,
                   'no order in 120 days' as churn_reasons, 'spend up' as tier_reasons,
                   'valueloop-customer-model' as model_name, '1' as model_version,
                   'run' as model_run_id, 's1' as scoring_run_id, now() as scored_at
            from marts.scoring_set""")


def test_scores_suite_validates_the_documented_schema(marts: Settings) -> None:
    _publish_scores(marts, "0.4")
    assert run_checkpoint(marts, "scores", run_id="s1").success
    _publish_scores(marts, "case when frequency > 3 then 1.7 else 0.4 end")
    with pytest.raises(QualityError, match=r"customer_scores\.probability_out_of_range"):
        run_checkpoint(marts, "scores", run_id="s2")
    with duckdb.connect(str(marts.warehouse_path)) as con:
        con.execute("alter table marts.customer_scores drop column segment_name")
        con.execute("alter table marts.customer_scores drop column churn_reasons")
    with pytest.raises(
        QualityError,
        match=r"customer_scores\.schema.*sample bad values: segment_name, churn_reasons",
    ):
        run_checkpoint(marts, "scores", run_id="s3")
    assert {"segment_name", "churn_reasons"} <= set(SCORES_COLUMNS)


def test_data_docs_are_built(marts: Settings) -> None:
    report = run_checkpoint(marts, "marts", run_id="docs", raise_on_critical=False)
    assert report.data_docs and report.data_docs.exists()
    assert "valueloop_marts" in report.data_docs.read_text()


_TRY_LOCK = """
import fcntl, sys
with open(sys.argv[1], "w") as handle:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(3)
"""


def test_one_process_at_a_time_validates_through_the_file_context(tmp_path: Path) -> None:
    """Every home validates through the one GX folder; while one process holds it, another
    waits (gx_project.exclusive), and once it is released the next one gets it."""
    from valueloop.quality import gx_project

    lock = tmp_path / "gx" / "uncommitted" / "valueloop.lock"

    def other_process_gets_it() -> bool:
        result = subprocess.run([sys.executable, "-c", _TRY_LOCK, str(lock)], check=False)
        assert result.returncode in (0, 3)
        return result.returncode == 0

    with gx_project.exclusive(tmp_path):
        assert lock.exists()
        assert not other_process_gets_it()
    assert other_process_gets_it()

"""Data: the training and scoring marts, read-only, split by time, tokenised once, padded late."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

TIERS = ("high", "active", "lapsed")
ID_COLUMNS = ("customer_cutoff_id", "customer_id", "as_of")
CATEGORICAL_COLUMNS = ("country", "acquisition_channel", "top_category")
SNAPSHOT_META = "snapshot.json"
LABEL_COLUMNS = (
    "split",
    "future_orders",
    "future_spend",
    "value_tier",
    "is_churned",
    "label_source",  # lineage: `derived`, or the correction that set the row's labels
    "tier_corrected",  # a correction set value_tier (the backtest keeps it)
)
TEXT_COLUMN = "document"
# Each customer's latest events as JSON (marts.customer_event_sequences), the sequence model's.
SEQUENCE_COLUMN = "event_sequence"


def _relation(source: Path) -> tuple[duckdb.DuckDBPyConnection, str]:
    """A connection and the SQL name of a mart's rows: the warehouse (read-only) or a training
    snapshot folder's Parquet."""
    if not source.exists():
        raise FileNotFoundError(f"{source}: no warehouse; run `valueloop transform` first")
    if source.is_dir():
        return duckdb.connect(), "read_parquet('{}.parquet')"
    return duckdb.connect(str(source), read_only=True), "marts.{}"


def labels_fingerprint(source: Path) -> str:
    """The training set's rows and labels, from the warehouse or a training snapshot of it
    (the same data gives the same value in either; a label correction changes it): how a
    training run finds a backtest of the data it trains on (``ml.backtest.verdict``)."""
    con, relation = _relation(source)
    relation = relation.format(
        (source / "training_set").as_posix() if source.is_dir() else "training_set"
    )
    with con:
        rows, total = con.execute(
            "select count(*), coalesce(sum(hash(customer_cutoff_id, value_tier, is_churned)),"
            f" 0)::varchar from {relation}"
        ).fetchone()
    return f"{rows}-{total}"


def read_mart(source: Path, table: str) -> pd.DataFrame:
    """A mart from the warehouse (opened read-only) or from a training snapshot folder."""
    con, relation = _relation(source)
    relation = relation.format((source / table).as_posix() if source.is_dir() else table)
    with con:
        frame = con.execute(f"select * from {relation} order by customer_cutoff_id").df()
    if frame.empty:
        raise ValueError(f"{table} in {source} is empty; nothing to learn from")
    return frame


# At most ``cap`` customers per cutoff (as_of), the md5 draw stratified by value tier within
# each cutoff: what the rolling backtest reads, so that its memory is bounded by the number of
# cutoffs times the cap rather than by the shop's size.
_PER_CUTOFF_SQL = """
with keyed as (
    select
        customer_cutoff_id,
        row_number() over (
            partition by as_of, coalesce(value_tier, '')
            order by md5(customer_cutoff_id || ':' || $seed)
        ) as place,
        count(*) over (partition by as_of, coalesce(value_tier, '')) as stratum_rows,
        count(*) over (partition by as_of) as cutoff_rows
    from {relation}
),

kept as (
    select customer_cutoff_id from keyed
    where $cap is null or cutoff_rows <= $cap
        or place <= greatest(1, round(stratum_rows * $cap / cutoff_rows))
)

select {columns} from {relation} as rows
inner join kept using (customer_cutoff_id)
order by rows.customer_cutoff_id
"""


def read_per_cutoff(
    source: Path, cap: int | None, seed: int, without: tuple[str, ...] = ()
) -> pd.DataFrame:
    """The training set with at most ``cap`` rows per cutoff (every row when ``None``), drawn
    in DuckDB, ``without`` the named columns."""
    con, relation = _relation(source)
    relation = relation.format(
        (source / "training_set").as_posix() if source.is_dir() else "training_set"
    )
    with con:
        con.execute(f"set memory_limit = '{SAMPLE_MEMORY_LIMIT}'")
        present = {r[0] for r in con.execute(f"describe select * from {relation}").fetchall()}
        dropped = [c for c in without if c in present]
        columns = f"rows.* exclude ({', '.join(dropped)})" if dropped else "rows.*"
        frame = con.execute(
            _PER_CUTOFF_SQL.format(relation=relation, columns=columns),
            {"cap": cap, "seed": str(seed)},
        ).df()
    if frame.empty:
        raise ValueError(f"training_set in {source} is empty; nothing to learn from")
    return frame


def read_sequences(source: Path, keys: pd.Series) -> pd.Series:
    """The event sequences of the training-set rows ``keys`` (customer_cutoff_id), in their
    order: only these rows' JSON is read, so a sample costs what it holds, not the mart."""
    con, relation = _relation(source)
    relation = relation.format(
        (source / "training_set").as_posix() if source.is_dir() else "training_set"
    )
    wanted = pd.DataFrame(  # DuckDB reads it by name
        {"customer_cutoff_id": keys.astype(str).to_numpy(), "place": np.arange(len(keys))}
    )
    with con:
        con.execute(f"set memory_limit = '{SAMPLE_MEMORY_LIMIT}'")
        found = con.execute(
            f"select wanted.place, rows.{SEQUENCE_COLUMN} from wanted "
            f"inner join {relation} as rows using (customer_cutoff_id) order by wanted.place"
        ).df()
    if len(found) != len(keys):
        missing = sorted(
            set(wanted["customer_cutoff_id"])
            - set(wanted["customer_cutoff_id"].to_numpy()[found["place"].to_numpy()])
        )
        raise ValueError(
            f"{len(missing)} rows have no event sequence in {source}'s training_set "
            f"(first: {missing[:3]}); rebuild the marts (`valueloop transform`)"
        )
    return pd.Series(found[SEQUENCE_COLUMN].to_numpy(), index=keys.index, name=SEQUENCE_COLUMN)


def md5_sample(
    frame: pd.DataFrame, cap: int | None, seed: int | str, stratum: str | None = None
) -> pd.DataFrame:
    """At most ``cap`` rows, drawn as :func:`read_training_data` draws in DuckDB: rows in the
    order of md5(customer_cutoff_id:seed), within each ``stratum`` the first
    max(1, round(stratum rows x cap / rows)) kept. The same rows every run."""
    if cap is None or len(frame) <= cap:
        return frame
    place = pd.Series(  # positions, so that any index will do
        [hashlib.md5(f"{k}:{seed}".encode()).hexdigest() for k in frame["customer_cutoff_id"]]
    )
    groups = frame[stratum].fillna("").to_numpy() if stratum else np.zeros(len(frame))
    kept = []
    for _, members in place.groupby(groups):
        keep = max(1, int(np.floor(len(members) * cap / len(frame) + 0.5)))  # DuckDB's round
        kept.append(members.sort_values().index[:keep])
    return frame.iloc[np.sort(np.concatenate(kept))]


def horizon_days(source: Path) -> int:
    """The label horizon the training set was built with (warehouse or snapshot folder)."""
    if source.is_dir():
        return int(json.loads((source / SNAPSHOT_META).read_text())["horizon_days"])
    with duckdb.connect(str(source), read_only=True) as con:
        return int(con.execute("select max(horizon_days) from marts.customer_labels").fetchone()[0])


def high_value_share(source: Path) -> float:
    """The share of buyers the labels call high value (dbt var ``high_value_share``)."""
    stale = (
        f"{source} was built before the labels carried high_value_share: "
        "rebuild the marts (`valueloop transform`)"
    )
    if source.is_dir():
        meta = json.loads((source / SNAPSHOT_META).read_text())
        if "high_value_share" not in meta:
            raise ValueError(stale)
        return float(meta["high_value_share"])
    with duckdb.connect(str(source), read_only=True) as con:
        try:
            share = con.execute("select max(high_value_share) from marts.customer_labels")
        except duckdb.BinderException as error:
            raise ValueError(stale) from error
        value = share.fetchone()[0]
    if value is None:
        raise ValueError(f"marts.customer_labels in {source} is empty; nothing is labelled")
    return float(value)


# The corrections built into the labels (a dbt table): one loaded into raw but not yet built is
# not in the training set, so it must not count as trained on (valueloop.retraining counts the
# same table).
CORRECTIONS_BUILT = "select count(*) from marts.label_corrections"


def label_corrections(source: Path) -> int:
    """How many label corrections were built into the labels when this training data was
    taken (none before the marts have the table)."""
    if source.is_dir():
        return int(json.loads((source / SNAPSHOT_META).read_text()).get("label_corrections", 0))
    with duckdb.connect(str(source), read_only=True) as con:
        built = con.execute(
            "select count(*) from information_schema.tables"
            " where table_schema = 'marts' and table_name = 'label_corrections'"
        ).fetchone()[0]
        return int(con.execute(CORRECTIONS_BUILT).fetchone()[0]) if built else 0


def data_taken_at(source: Path) -> str:
    """When the training data was taken from the warehouse (ISO, UTC): the snapshot's time, or
    now for a warehouse read directly. Retraining reads drift measured after it as unanswered
    (the run itself may start long after its snapshot, queued for a worker)."""
    if source.is_dir():
        taken = json.loads((source / SNAPSHOT_META).read_text()).get("taken_at")
        if taken:
            return taken
        return datetime.fromtimestamp((source / SNAPSHOT_META).stat().st_mtime, UTC).isoformat()
    return datetime.now(UTC).isoformat()


def snapshot_training_data(warehouse: Path, folder: Path) -> Path:
    """Copy what training reads out of the warehouse, so that training, which takes minutes
    to hours, runs without holding the warehouse (Airflow's one-slot pool, DuckDB's lock)."""
    taken_at = datetime.now(UTC).isoformat()  # before the copy: what it holds is at least this old
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    target = (partial / "training_set.parquet").as_posix()
    with duckdb.connect(str(warehouse), read_only=True) as con:
        con.execute(f"copy marts.training_set to '{target}' (format parquet)")
        # The sequence model's texts, embedded (and cached) at training time.
        texts = (partial / "event_texts.parquet").as_posix()
        con.execute(f"copy marts.event_texts to '{texts}' (format parquet)")
    meta = {
        "horizon_days": horizon_days(warehouse),
        "high_value_share": high_value_share(warehouse),
        "warehouse": str(warehouse),
        "label_corrections": label_corrections(warehouse),
        "taken_at": taken_at,
    }
    (partial / SNAPSHOT_META).write_text(json.dumps(meta))
    shutil.rmtree(folder, ignore_errors=True)  # re-running a run replaces its snapshot
    partial.rename(folder)
    return folder


def numeric_columns(frame: pd.DataFrame) -> list[str]:
    """Every numeric feature of customer_features (labels and ids excluded)."""
    skip = {*ID_COLUMNS, *CATEGORICAL_COLUMNS, *LABEL_COLUMNS, TEXT_COLUMN, SEQUENCE_COLUMN}
    return [
        c
        for c in frame.columns
        if c not in skip
        and pd.api.types.is_numeric_dtype(frame[c])
        and not pd.api.types.is_bool_dtype(frame[c])
    ]


def to_model_input(frame: pd.DataFrame) -> pd.DataFrame:
    """What a model scores: ids, categoricals, numeric features as float64 (NA-safe), text."""
    out = frame.drop(columns=[c for c in LABEL_COLUMNS if c in frame.columns])
    for column in numeric_columns(out):
        out[column] = out[column].astype("float64")
    if SEQUENCE_COLUMN not in out:
        out[SEQUENCE_COLUMN] = "{}"  # a mart built before sequences: no events known
    for column in (
        *CATEGORICAL_COLUMNS,
        TEXT_COLUMN,
        SEQUENCE_COLUMN,
        "customer_cutoff_id",
        "customer_id",
    ):
        out[column] = out[column].astype(object).where(out[column].notna(), None)
    out["as_of"] = pd.to_datetime(out["as_of"])
    return out


# The sample, drawn inside DuckDB so that only the sampled rows (and their event sequences)
# ever reach Python: memory is bounded by the config's row caps, not by the size of the
# training set. A row's place in the draw is the md5 of its key and the seed (stable across
# DuckDB versions and runs); within each split and stratum the first rows of that order are
# kept, as many as the split's cap times the stratum's share (at least one).
_SAMPLE_SQL = """
with keyed as (
    select
        customer_cutoff_id,
        split,
        case when split = 'test' then '' else coalesce(value_tier, '') end as stratum,
        row_number() over (
            partition by split, stratum order by md5(customer_cutoff_id || ':' || $seed)
        ) as place,
        count(*) over (partition by split, stratum) as stratum_rows,
        count(*) over (partition by split) as split_rows,
        case split
            when 'train' then $train when 'validation' then $validation else $test
        end as cap
    from {relation}
    where split in ('train', 'validation', 'test')
),

kept as (
    select customer_cutoff_id from keyed
    where cap is null or split_rows <= cap
        or place <= greatest(1, round(stratum_rows * cap / split_rows))
)

select rows.* from {relation} as rows
inner join kept using (customer_cutoff_id)
order by rows.customer_cutoff_id
"""

# Every customer at the latest training cutoff (the validation split: every customer who had
# bought by then), a seeded sample of ``cap`` of them: the CoLES pretraining set.
_PRETRAIN_SQL = """
select event_sequence from (
    select customer_cutoff_id, event_sequence from {relation}
    where split = 'validation'
    order by md5(customer_cutoff_id || ':pretrain:' || $seed)
    limit coalesce($cap, 9223372036854775807)
) order by customer_cutoff_id
"""


SAMPLE_MEMORY_LIMIT = "256MB"


@dataclass
class TrainingData:
    """What a training run reads: the sampled splits and the pretraining sequences."""

    frames: dict[str, pd.DataFrame]
    pretrain_sequences: pd.Series


def read_training_data(source: Path, cfg) -> TrainingData:
    """Train on earlier cutoffs, validate and test on the latest (marts' ``split`` column),
    each split sampled in DuckDB to the config's caps (training and validation stratified by
    value tier). The test sample is the frozen holdout: the same rows for every model of a
    dataset."""
    con, relation = _relation(source)
    relation = relation.format(
        (source / "training_set").as_posix() if source.is_dir() else "training_set"
    )
    with con:
        # DuckDB spills the draw's sort to disk past this, rather than hold it in memory.
        con.execute(f"set memory_limit = '{SAMPLE_MEMORY_LIMIT}'")
        caps = {"train": cfg.max_train_rows, "validation": cfg.max_val_rows}
        params = {**caps, "test": cfg.holdout_rows, "seed": str(cfg.seed)}
        sample = con.execute(_SAMPLE_SQL.format(relation=relation), params).df()
        has_sequences = SEQUENCE_COLUMN in sample.columns
        pretrain = (
            con.execute(
                _PRETRAIN_SQL.format(relation=relation),
                {"seed": str(cfg.seed), "cap": cfg.pretrain_max_customers},
            ).df()[SEQUENCE_COLUMN]
            if has_sequences
            else pd.Series([], dtype=object, name=SEQUENCE_COLUMN)
        )
    frames = {
        name: sample[sample["split"] == name].reset_index(drop=True)
        for name in ("train", "validation", "test")
    }
    for name, part in frames.items():
        if part.empty:
            raise ValueError(
                f"the training set in {source} has no {name} rows; widen the data's time span"
            )
    return TrainingData(frames, pretrain)


def fingerprint(frames: dict[str, pd.DataFrame]) -> dict:
    """What the models saw: as_of dates, row counts and a hash of keys and labels."""
    digest = hashlib.sha256()
    info: dict[str, object] = {}
    for name, part in frames.items():
        info[f"{name}_rows"] = len(part)
        info[f"{name}_as_of"] = sorted(str(d)[:10] for d in part["as_of"].unique())
        for row in part[["customer_cutoff_id", "value_tier", "is_churned"]].itertuples(index=False):
            digest.update("|".join(map(str, row)).encode())
    info["sha256"] = digest.hexdigest()
    return info


@dataclass
class FeatureScaler:
    """Signed log1p then standardisation, fitted on train; missing values become the mean."""

    columns: list[str]
    mean: list[float]
    std: list[float]

    @staticmethod
    def _squash(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
        values = frame[columns].astype("float64").to_numpy()
        return np.sign(values) * np.log1p(np.abs(values))

    @classmethod
    def fit(cls, frame: pd.DataFrame, columns: list[str]) -> FeatureScaler:
        values = cls._squash(frame, columns)
        mean = np.nanmean(values, axis=0)
        std = np.nanstd(values, axis=0)
        return cls(
            columns,
            np.nan_to_num(mean).tolist(),
            np.where(np.nan_to_num(std) > 0, np.nan_to_num(std), 1.0).tolist(),
        )

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise KeyError(f"features missing from the input: {', '.join(missing)}")
        scaled = (self._squash(frame, self.columns) - np.array(self.mean)) / np.array(self.std)
        return np.nan_to_num(scaled, nan=0.0).astype("float32")

    def to_json(self) -> str:
        return json.dumps({"columns": self.columns, "mean": self.mean, "std": self.std})

    @classmethod
    def from_json(cls, text: str) -> FeatureScaler:
        return cls(**json.loads(text))


def tier_index(values: pd.Series) -> np.ndarray:
    lookup = {t: i for i, t in enumerate(TIERS)}
    return values.map(lookup).to_numpy(dtype="int64")


class CustomerDataset(Dataset):
    """Token ids (unpadded), standardised features and, when known, the two labels."""

    def __init__(
        self,
        token_ids: list[list[int]],
        numeric: np.ndarray,
        tiers: np.ndarray | None = None,
        churn: np.ndarray | None = None,
    ) -> None:
        self.token_ids, self.numeric, self.tiers, self.churn = token_ids, numeric, tiers, churn

    def __len__(self) -> int:
        return len(self.token_ids)

    def __getitem__(self, index: int) -> dict:
        item = {"input_ids": self.token_ids[index], "numeric": self.numeric[index]}
        if self.tiers is not None:
            item["tier"], item["churn"] = self.tiers[index], self.churn[index]
        return item


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest document of the batch, not to max_length."""
    width = max(len(item["input_ids"]) for item in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        ids[row, : len(item["input_ids"])] = torch.tensor(item["input_ids"])
        mask[row, : len(item["input_ids"])] = 1
    out = {
        "input_ids": ids,
        "attention_mask": mask,
        "numeric": torch.tensor(np.stack([i["numeric"] for i in batch])),
    }
    if "tier" in batch[0]:
        out["tier"] = torch.tensor([i["tier"] for i in batch], dtype=torch.long)
        out["churn"] = torch.tensor([i["churn"] for i in batch], dtype=torch.float32)
    return out


def tokenize(tokenizer, documents: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(documents, truncation=True, max_length=max_length)["input_ids"]


def load_splits(cfg, warehouse: Path) -> tuple[dict[str, pd.DataFrame], FeatureScaler]:
    """The training set split by time per the config, and the scaler fitted on train."""
    frames = read_training_data(warehouse, cfg).frames
    return frames, FeatureScaler.fit(frames["train"], numeric_columns(frames["train"]))


class CustomerDataModule(pl.LightningDataModule):
    """Owns tokenising (cached on disk, once per dataset and tokenizer) and the loaders."""

    def __init__(
        self,
        frames: dict[str, pd.DataFrame],
        tokenizer,
        scaler: FeatureScaler,
        max_length: int,
        batch_size: int,
        eval_batch_size: int,
        cache_dir: Path,
        seed: int,
    ) -> None:
        super().__init__()
        self.frames, self.tokenizer, self.scaler = frames, tokenizer, scaler
        self.max_length, self.batch_size, self.eval_batch_size = (
            max_length,
            batch_size,
            eval_batch_size,
        )
        self.cache_dir, self.seed = cache_dir, seed
        self.datasets: dict[str, CustomerDataset] = {}

    @classmethod
    def from_config(
        cls, frames: dict[str, pd.DataFrame], tokenizer, scaler: FeatureScaler, cfg, cache_dir: Path
    ) -> CustomerDataModule:
        return cls(
            frames,
            tokenizer,
            scaler,
            cfg.max_length,
            cfg.batch_size,
            cfg.eval_batch_size,
            cache_dir,
            cfg.seed,
        )

    def _cache_path(self, name: str) -> Path:
        digest = hashlib.sha256()
        digest.update(f"{self.tokenizer.name_or_path}|{self.max_length}|".encode())
        for doc in self.frames[name][TEXT_COLUMN]:
            digest.update(doc.encode())
        return self.cache_dir / f"tokens-{digest.hexdigest()[:20]}.json"

    def prepare_data(self) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for name, frame in self.frames.items():
            path = self._cache_path(name)
            if not path.exists():
                ids = tokenize(self.tokenizer, frame[TEXT_COLUMN].tolist(), self.max_length)
                path.write_text(json.dumps(ids))

    def setup(self, stage: str | None = None) -> None:
        for name, frame in self.frames.items():
            ids = json.loads(self._cache_path(name).read_text())
            self.datasets[name] = CustomerDataset(
                ids,
                self.scaler.transform(frame),
                tier_index(frame["value_tier"]),
                frame["is_churned"].to_numpy(dtype="float32"),
            )

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.datasets[name],
            batch_size=self.batch_size if shuffle else self.eval_batch_size,
            shuffle=shuffle,
            collate_fn=lambda b: collate(b, self.tokenizer.pad_token_id),
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

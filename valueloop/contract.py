"""The raw contract: the typed tables every loader writes into, declared once.

Loaders hand ingest string columns named as here; ingest types them inside DuckDB and sends
every value that does not parse to ``raw.quarantine``. The DDL, the typing SQL and the
documentation all come from these declarations.
"""

from __future__ import annotations

from dataclasses import dataclass

RAW_SCHEMA = "raw"
LINEAGE_COLUMNS = ("_source_file", "_row_number", "_loaded_at", "_batch_id")


@dataclass(frozen=True)
class Column:
    name: str
    sql_type: str
    required: bool = False
    description: str = ""


@dataclass(frozen=True)
class Entity:
    name: str
    columns: tuple[Column, ...]
    description: str

    @property
    def table(self) -> str:
        return f"{RAW_SCHEMA}.{self.name}"

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]


MONEY = "decimal(18, 4)"

ORDER_LINES = Entity(
    "order_lines",
    (
        Column("invoice_id", "varchar", True, "Invoice (order) number; 'C…' cancels, 'R…' returns"),
        Column("sku", "varchar", False, "Stock code of the product, or a non-product code"),
        Column("description", "varchar", False, "Product description as written on the line"),
        Column("quantity", MONEY, True, "Units; negative on cancellations and returns"),
        Column("unit_price", MONEY, True, "Price of one unit in the shop's currency"),
        Column("invoiced_at", "timestamp", True, "When the invoice was issued"),
        Column("customer_id", "varchar", False, "Customer id; empty for guest checkouts"),
        Column("country", "varchar", False, "Delivery country"),
    ),
    "One row per invoice line.",
)

CUSTOMERS = Entity(
    "customers",
    (
        Column("customer_id", "varchar", True, "Customer id"),
        Column("signed_up_at", "timestamp", True, "When the account was created"),
        Column("country", "varchar", False, "Country of the account"),
        Column("acquisition_channel", "varchar", False, "Channel that brought the customer"),
        Column("email", "varchar", False, "PII: pseudonymised in staging"),
        Column("full_name", "varchar", False, "PII: pseudonymised in staging"),
    ),
    "One row per customer account.",
)

PRODUCTS = Entity(
    "products",
    (
        Column("sku", "varchar", True, "Stock code"),
        Column("description", "varchar", False, "Product description"),
        Column("category", "varchar", False, "Product category"),
        Column("list_price", MONEY, False, "Catalogue price"),
    ),
    "One row per product in the catalogue.",
)

REVIEWS = Entity(
    "reviews",
    (
        Column("review_id", "varchar", True, "Review id"),
        Column("customer_id", "varchar", True, "Author"),
        Column("sku", "varchar", False, "Reviewed product"),
        Column("rating", "integer", True, "Stars, 1 to 5"),
        Column("review_text", "varchar", False, "Free text"),
        Column("reviewed_at", "timestamp", True, "When the review was written"),
    ),
    "One row per product review.",
)

# Feedback: what comes back from the activation tool and from people (valueloop/feedback.py).
OUTCOME_EVENTS = ("delivered", "opened", "clicked", "converted", "unsubscribed")
LABELS = {"is_churned": ("true", "false"), "value_tier": ("high", "active", "lapsed")}

CAMPAIGN_OUTCOMES = Entity(
    "campaign_outcomes",
    (
        Column("campaign_id", "varchar", True, "Campaign, as in the campaign export"),
        Column("customer_key", "varchar", True, "Pseudonymised customer id, as exported"),
        Column("event", "varchar", True, "delivered, opened, clicked, converted or unsubscribed"),
        Column("occurred_at", "timestamp", True, "When the activation tool saw the event"),
        Column("revenue", MONEY, False, "Order revenue of a converted event (else empty)"),
    ),
    "One row per event an activation tool (e-mail, CRM) reports for a campaign's customer.",
)

LABEL_FEEDBACK = Entity(
    "label_feedback",
    (
        Column("feedback_id", "varchar", True, "Id of the correction (unique)"),
        Column("customer_id", "varchar", True, "The customer the correction is about"),
        Column("label", "varchar", True, "is_churned or value_tier"),
        Column("corrected_value", "varchar", True, "true/false, or high/active/lapsed"),
        Column("valid_from", "date", True, "First cutoff (as_of) the correction applies to"),
        Column("valid_to", "date", False, "Last cutoff it applies to; empty: no end"),
        Column("reason", "varchar", False, "Why, in words"),
        Column("source", "varchar", True, "Who or what sent it (team, tool)"),
        Column("submitted_at", "timestamp", True, "When it was submitted; the latest wins"),
    ),
    "One row per correction of a derived label by people.",
)

SHOP_ENTITIES = (ORDER_LINES, CUSTOMERS, PRODUCTS, REVIEWS)
FEEDBACK_ENTITIES = (CAMPAIGN_OUTCOMES, LABEL_FEEDBACK)
ENTITIES: dict[str, Entity] = {e.name: e for e in (*SHOP_ENTITIES, *FEEDBACK_ENTITIES)}

QUARANTINE_DDL = f"""
create table if not exists {RAW_SCHEMA}.quarantine (
    _batch_id varchar not null,
    _source_file varchar not null,
    _row_number bigint not null,
    entity varchar not null,
    column_name varchar,
    reason varchar not null,
    raw_value varchar,
    raw_record varchar,
    _loaded_at timestamp not null
)
"""

BATCHES_DDL = f"""
create table if not exists {RAW_SCHEMA}.ingest_batches (
    batch_id varchar primary key,
    source_file varchar not null,
    content_sha256 varchar not null,
    entity varchar not null,
    source_format varchar not null,
    rows_read bigint not null,
    rows_accepted bigint not null,
    rows_quarantined bigint not null,
    loaded_at timestamp not null,
    unique (content_sha256, entity)
)
"""


def entity_ddl(entity: Entity) -> str:
    cols = [f"    {c.name} {c.sql_type}{' not null' if c.required else ''}" for c in entity.columns]
    cols += [
        "    _source_file varchar not null",
        "    _row_number bigint not null",
        "    _loaded_at timestamp not null",
        "    _batch_id varchar not null",
    ]
    return f"create table if not exists {entity.table} (\n" + ",\n".join(cols) + "\n)"


# Batches taken out after they were loaded (`valueloop withdraw`): their rows moved to the
# quarantine with the reason, the batch's counts moved with them.
WITHDRAWN_DDL = f"""
create table if not exists {RAW_SCHEMA}.withdrawn_batches (
    batch_id varchar primary key,
    entity varchar not null,
    rows_withdrawn bigint not null,
    reason varchar not null,
    withdrawn_at timestamp not null
)
"""


# What each feedback build covered (`valueloop.transform.build_feedback`): feedback batches
# loaded after the latest `loaded_through` have not reached the marts yet.
FEEDBACK_BUILDS_DDL = f"""
create table if not exists {RAW_SCHEMA}.feedback_builds (
    built_at timestamp not null,
    loaded_through timestamp
)
"""


# What each marts build of the scheduled DAG covered (`ingest_and_transform`'s check_marts):
# shop batches loaded after the latest `loaded_through` have not reached the marts yet.
MARTS_BUILDS_DDL = f"""
create table if not exists {RAW_SCHEMA}.marts_builds (
    built_at timestamp not null,
    loaded_through timestamp
)
"""


def all_ddl() -> list[str]:
    return [
        f"create schema if not exists {RAW_SCHEMA}",
        *(entity_ddl(e) for e in ENTITIES.values()),
        QUARANTINE_DDL,
        BATCHES_DDL,
        WITHDRAWN_DDL,
        FEEDBACK_BUILDS_DDL,
        MARTS_BUILDS_DDL,
    ]

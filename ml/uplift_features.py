"""What the uplift model sees of a customer: the published scores and behaviour at the cutoff,
frozen per campaign customer when a campaign is planned (``valueloop.campaigns``).

A module of its own, with no imports, so that the registered uplift model (which ships the
``ml`` package as its code) loads where the platform is not installed."""

UPLIFT_FEATURES = (
    "p_high",
    "churn_probability",
    "recency_days",
    "frequency",
    "monetary_value",
    "avg_order_value",
    "tenure_days",
    "orders_last_90d",
    "spend_last_90d",
    "spend_trend_90d",
    "return_rate",
    "avg_rating",
    "discounted_line_share",
)

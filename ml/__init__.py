"""ValueLoop's ML: a fine-tuned transformer for value tier and churn, baselines, registry."""

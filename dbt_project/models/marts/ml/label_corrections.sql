-- The label corrections from people as built into the labels: one row per feedback id (its
-- latest delivery). customer_labels reads them from this table, and retraining counts them
-- here (valueloop.retraining; the training snapshot's label_corrections), so a correction
-- loaded into raw but not yet built into the labels never counts as trained on.
select
    feedback_id,
    customer_id,
    label,
    corrected_value,
    valid_from,
    valid_to,
    reason,
    source,
    submitted_at
from {{ ref('stg_feedback__label_feedback') }}

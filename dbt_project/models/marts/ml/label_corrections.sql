-- The label corrections from people as built into the labels: one row per feedback id (its
-- latest delivery). customer_labels reads them from this table, and retraining counts them
-- here (valueloop.retraining; the training snapshot's label_corrections), so a correction
-- loaded into raw but not yet built into the labels never counts as trained on.
select
    feedback_id::varchar as feedback_id,
    customer_id::varchar as customer_id,
    label::varchar as label,
    corrected_value::varchar as corrected_value,
    valid_from::date as valid_from,
    valid_to::date as valid_to,
    reason::varchar as reason,
    source::varchar as source,
    submitted_at::timestamp as submitted_at
from {{ ref('stg_feedback__label_feedback') }}

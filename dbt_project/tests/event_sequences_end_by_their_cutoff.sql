-- No event on or after a cutoff's next day reaches that cutoff's sequence: every sequence's
-- latest event and every days_before in it are on or before as_of.
with

sequences as (
    select * from {{ ref('customer_event_sequences') }}
)

select
    customer_cutoff_id,
    as_of,
    last_event_on
from sequences
where
    last_event_on > as_of
    or list_min(json_extract(event_sequence, '$.days_before')::integer[]) < 0

-- Each customer's latest max_events events on or before the cutoff, oldest first, as one JSON
-- object of columns (the behaviour-sequence model's input; older history is summarised in
-- customer_features). Nothing after as_of: last_event_on <= as_of is tested.
with

cutoffs as (
    select * from {{ ref('int_customer_cutoffs') }}
),

events as (
    select * from {{ ref('customer_events') }}
),

recent as (
    select
        cutoffs.customer_cutoff_id,
        cutoffs.customer_id,
        cutoffs.as_of,
        events.event_id,
        events.event_kind,
        events.event_at,
        events.event_on,
        events.amount,
        events.quantity,
        events.n_lines,
        events.rating,
        events.category,
        events.text_keys,
        date_diff('day', events.event_on, cutoffs.as_of) as days_before
    from cutoffs
    inner join events
        on
            cutoffs.customer_id = events.customer_id
            and events.event_on <= cutoffs.as_of
    qualify row_number() over (
        partition by cutoffs.customer_cutoff_id
        order by events.event_at desc, events.event_kind desc, events.event_id desc
    ) <= {{ var('max_events') }}
),

sequences as (
    select
        customer_cutoff_id,
        any_value(customer_id) as customer_id,
        any_value(as_of) as as_of,
        count(*) as n_events,
        max(event_on) as last_event_on,
        to_json({
            'kind': list(event_kind order by event_at, event_kind, event_id),
            'days_before': list(days_before order by event_at, event_kind, event_id),
            'amount': list(amount order by event_at, event_kind, event_id),
            'quantity': list(quantity order by event_at, event_kind, event_id),
            'lines': list(n_lines order by event_at, event_kind, event_id),
            'rating': list(coalesce(rating, 0) order by event_at, event_kind, event_id),
            'category': list(category order by event_at, event_kind, event_id),
            'texts': list(text_keys order by event_at, event_kind, event_id)
        }) as event_sequence
    from recent
    group by customer_cutoff_id
),

final as (
    select
        customer_cutoff_id::varchar as customer_cutoff_id,
        customer_id::varchar as customer_id,
        as_of::date as as_of,
        n_events::integer as n_events,
        last_event_on::date as last_event_on,
        event_sequence::varchar as event_sequence
    from sequences
)

select * from final

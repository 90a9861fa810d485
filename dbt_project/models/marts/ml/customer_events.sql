-- One row per customer event: orders (their lines summarised), returns, cancellations and
-- reviews. The behaviour-sequence model reads each customer's latest events on or before a
-- cutoff (customer_event_sequences); text_keys point at event_texts, whose texts are embedded
-- once by the packaged sentence encoder (ml/sequence.py).
with

order_lines as (
    select * from {{ ref('int_order_lines_enriched') }}
    where not is_guest and is_merchandise
),

products as (
    select * from {{ ref('stg_shop__products') }}
),

reviews as (
    select * from {{ ref('stg_shop__reviews') }}
),

line_events as (
    select
        customer_id,
        invoice_id as event_id,
        case
            when is_cancellation then 'cancellation'
            when is_return then 'return'
            else 'order'
        end as event_kind,
        ordered_at,
        line_amount,
        quantity,
        category,
        description
    from order_lines
),

orders as (
    select
        customer_id,
        event_id,
        event_kind,
        min(ordered_at) as event_at,
        round(sum(line_amount), 2) as amount,
        sum(abs(quantity))::bigint as quantity,
        count(*)::integer as n_lines,
        null::integer as rating,
        -- The largest line's category; a tie goes to the last category by name (stable).
        arg_max(category, row(abs(line_amount), category)) as category,
        list(
            left(md5(lower(description)), 16) order by abs(line_amount) desc, description asc
        ) filter (where description is not null) as text_keys
    from line_events
    group by customer_id, event_id, event_kind
),

review_events as (
    select
        reviews.customer_id,
        reviews.review_id::varchar as event_id,
        'review' as event_kind,
        reviews.reviewed_at as event_at,
        0.0 as amount,
        0::bigint as quantity,
        0::integer as n_lines,
        reviews.rating::integer as rating,
        coalesce(products.category, 'uncategorised') as category,
        case
            when reviews.review_text is not null then [left(md5(reviews.review_text), 16)]
            else []
        end as text_keys
    from reviews
    left join products on reviews.sku = products.sku
    where reviews.customer_id is not null
),

unioned as (
    select * from orders
    union all
    select * from review_events
),

final as (
    select
        customer_id::varchar as customer_id,
        event_id::varchar as event_id,
        event_kind::varchar as event_kind,
        event_at::timestamp as event_at,
        event_at::date as event_on,
        amount::double as amount,
        quantity::bigint as quantity,
        n_lines::integer as n_lines,
        rating::integer as rating,
        category::varchar as category,
        list_slice(coalesce(text_keys, []), 1, 3)::varchar[] as text_keys
    from unioned
)

select * from final

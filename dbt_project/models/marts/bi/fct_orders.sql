with

order_lines as (
    select * from {{ ref('int_order_lines_enriched') }}
),

orders as (
    select
        invoice_id,
        -- An invoice belongs to one customer; min() keeps the grain if a source disagrees.
        min(customer_id) as customer_id,
        min(ordered_at) as ordered_at,
        min(ordered_on) as ordered_on,
        min(country) as country,
        count(*) as n_lines,
        sum(quantity) filter (where is_merchandise) as n_items,
        coalesce(sum(line_amount) filter (where is_merchandise), 0) as merchandise_amount,
        sum(line_amount) as total_amount,
        bool_or(is_cancellation) as is_cancellation,
        bool_or(is_return) and not bool_or(is_cancellation) as is_return,
        bool_and(is_guest) as is_guest
    from order_lines
    group by invoice_id
),

final as (
    select
        *,
        case
            when is_cancellation then 'cancellation'
            when is_return then 'return'
            else 'purchase'
        end as order_type
    from orders
)

select * from final

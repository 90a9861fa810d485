-- Point-in-time labels: only events in (as_of, as_of + horizon], for labelled cutoffs.
-- The high-value threshold is fixed on the train split, so later cutoffs do not move it.
with

customer_cutoffs as (
    select * from {{ ref('int_customer_cutoffs') }}
    where is_labelled
),

order_lines as (
    select * from {{ ref('int_order_lines_enriched') }}
    where not is_guest and is_merchandise
),

future_lines as (
    select
        customer_cutoffs.customer_cutoff_id,
        order_lines.invoice_id,
        order_lines.is_purchase,
        order_lines.line_amount
    from customer_cutoffs
    inner join order_lines
        on
            customer_cutoffs.customer_id = order_lines.customer_id
            and order_lines.ordered_on > customer_cutoffs.as_of
            and order_lines.ordered_on
            <= customer_cutoffs.as_of + to_days(customer_cutoffs.horizon_days)
),

future as (
    select
        customer_cutoffs.customer_cutoff_id,
        customer_cutoffs.customer_id,
        customer_cutoffs.as_of,
        customer_cutoffs.split,
        customer_cutoffs.horizon_days,
        count(distinct future_lines.invoice_id) filter (where future_lines.is_purchase)
            as future_orders,
        -- Net of returns and cancellations in the window; a refund of an earlier order
        -- cannot make future value negative.
        greatest(coalesce(sum(future_lines.line_amount), 0), 0) as future_spend
    from customer_cutoffs
    left join future_lines
        on customer_cutoffs.customer_cutoff_id = future_lines.customer_cutoff_id
    group by all
),

high_value_threshold as (
    select quantile_cont(future_spend, 1 - {{ var('high_value_share') }}) as threshold
    from future
    where split = 'train' and future_spend > 0
),

final as (
    select
        future.customer_cutoff_id::varchar as customer_cutoff_id,
        future.customer_id::varchar as customer_id,
        future.as_of::date as as_of,
        future.split::varchar as split,
        future.horizon_days::integer as horizon_days,
        future.future_orders::integer as future_orders,
        future.future_spend::double as future_spend,
        high_value_threshold.threshold::double as high_value_threshold,
        case
            when future.future_orders = 0 then 'lapsed'
            when future.future_spend >= high_value_threshold.threshold then 'high'
            else 'active'
        end::varchar as value_tier,
        (future.future_orders = 0)::boolean as is_churned
    from future
    cross join high_value_threshold
)

select * from final

with

order_lines as (
    select * from {{ ref('int_order_lines_enriched') }}
),

daily as (
    select
        ordered_on as revenue_on,
        coalesce(sum(line_amount) filter (where is_purchase), 0) as gross_revenue,
        coalesce(sum(line_amount) filter (where is_cancellation), 0) as cancelled_amount,
        coalesce(sum(line_amount) filter (where is_return), 0) as returned_amount,
        sum(line_amount) as net_revenue,
        coalesce(sum(line_amount) filter (where is_purchase and is_merchandise), 0)
            as merchandise_revenue,
        count(distinct invoice_id) filter (where is_purchase) as n_orders,
        count(distinct customer_id) filter (where is_purchase) as n_customers,
        count(distinct invoice_id) filter (where is_purchase and is_guest) as n_guest_orders
    from order_lines
    group by ordered_on
)

select * from daily

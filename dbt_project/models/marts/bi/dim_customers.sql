with

customers as (
    select * from {{ ref('int_customers_unified') }}
),

orders as (
    select * from {{ ref('fct_orders') }}
),

order_summary as (
    select
        customer_id,
        min(ordered_at) filter (where order_type = 'purchase') as first_order_at,
        max(ordered_at) filter (where order_type = 'purchase') as last_order_at,
        count(*) filter (where order_type = 'purchase') as n_orders,
        count(*) filter (where order_type = 'cancellation') as n_cancellations,
        count(*) filter (where order_type = 'return') as n_returns,
        sum(merchandise_amount) as lifetime_net_revenue
    from orders
    where customer_id is not null
    group by customer_id
),

final as (
    select
        customers.customer_id,
        customers.signed_up_at,
        customers.country,
        customers.acquisition_channel,
        customers.email_hash,
        customers.has_account,
        order_summary.first_order_at,
        order_summary.last_order_at,
        coalesce(order_summary.n_orders, 0) as n_orders,
        coalesce(order_summary.n_cancellations, 0) as n_cancellations,
        coalesce(order_summary.n_returns, 0) as n_returns,
        coalesce(order_summary.lifetime_net_revenue, 0) as lifetime_net_revenue
    from customers
    left join order_summary on customers.customer_id = order_summary.customer_id
)

select * from final

-- Published scores with the customer attributes BI filters by.
with

scores as (
    select * from {{ source('published', 'customer_scores') }}
),

customers as (
    select * from {{ ref('dim_customers') }}
),

joined as (
    select
        scores.*,
        customers.country,
        customers.acquisition_channel,
        customers.first_order_at,
        customers.last_order_at,
        customers.n_orders,
        customers.lifetime_net_revenue
    from scores
    inner join customers on scores.customer_id = customers.customer_id
)

select * from joined

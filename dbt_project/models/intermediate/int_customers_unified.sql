-- Accounts, plus customers known only from their orders (sources without a customer file).
with

customers as (
    select * from {{ ref('stg_shop__customers') }}
),

order_lines as (
    select * from {{ ref('stg_shop__order_lines') }}
),

seen_in_orders as (
    select
        customer_id,
        min(ordered_at) as first_seen_at,
        arg_min(country, strftime(ordered_at, '%Y%m%d%H%M%S') || country) as first_country
    from order_lines
    where not is_guest
    group by customer_id
),

unified as (
    select
        coalesce(customers.customer_id, seen_in_orders.customer_id) as customer_id,
        coalesce(customers.signed_up_at, seen_in_orders.first_seen_at) as signed_up_at,
        coalesce(customers.country, seen_in_orders.first_country, 'Unknown') as country,
        coalesce(customers.acquisition_channel, 'unknown') as acquisition_channel,
        customers.email_hash,
        customers.full_name_hash,
        customers.customer_id is not null as has_account
    from customers
    full outer join seen_in_orders on customers.customer_id = seen_in_orders.customer_id
)

select * from unified

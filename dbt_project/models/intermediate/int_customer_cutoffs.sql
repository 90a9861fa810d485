-- One row per customer and cutoff: customers with a merchandise purchase on or before it.
-- A table, unlike the rest of this layer: the ML marts all read these rows, and at 1M
-- customers computing them once beat recomputing them in each (BENCHMARKS.md).
{{ config(materialized='table') }}

with

customers as (
    select * from {{ ref('int_customers_unified') }}
),

cutoffs as (
    select * from {{ ref('int_cutoffs') }}
),

order_lines as (
    select * from {{ ref('int_order_lines_enriched') }}
),

first_purchases as (
    select
        customer_id,
        min(ordered_on) as first_purchase_on
    from order_lines
    where is_purchase and is_merchandise and not is_guest
    group by customer_id
),

customer_cutoffs as (
    select
        customers.customer_id || '@' || strftime(cutoffs.as_of, '%Y-%m-%d') as customer_cutoff_id,
        customers.customer_id,
        cutoffs.as_of,
        cutoffs.split,
        cutoffs.is_labelled,
        cutoffs.horizon_days,
        customers.signed_up_at,
        customers.country,
        customers.acquisition_channel
    from customers
    inner join first_purchases on customers.customer_id = first_purchases.customer_id
    inner join cutoffs on first_purchases.first_purchase_on <= cutoffs.as_of
)

select * from customer_cutoffs

-- Lines with their product's category and the purchase/merchandise flags the marts share.
-- A table, unlike the rest of this layer: seven marts read these lines, and at 1M
-- customers computing them once beat recomputing them in each (BENCHMARKS.md).
{{ config(materialized='table') }}

with

order_lines as (
    select * from {{ ref('stg_shop__order_lines') }}
),

products as (
    select * from {{ ref('stg_shop__products') }}
),

enriched as (
    select
        order_lines.*,
        coalesce(products.category, 'uncategorised') as category,
        not order_lines.is_cancellation and not order_lines.is_return as is_purchase,
        not order_lines.is_non_product as is_merchandise,
        order_lines.ordered_at::date as ordered_on
    from order_lines
    left join products on order_lines.sku = products.sku
)

select * from enriched

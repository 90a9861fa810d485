-- The catalogue plus every stock code seen on a line, described by its latest line.
with

products as (
    select * from {{ ref('stg_shop__products') }}
),

order_lines as (
    select * from {{ ref('int_order_lines_enriched') }}
),

seen_on_lines as (
    select
        sku,
        arg_max(description, strftime(ordered_at, '%Y%m%d%H%M%S') || coalesce(description, ''))
            as last_description,
        bool_or(is_non_product) as is_non_product,
        min(ordered_on) as first_sold_on,
        max(ordered_on) as last_sold_on,
        coalesce(sum(quantity) filter (where is_purchase), 0) as units_sold,
        coalesce(sum(line_amount), 0) as net_revenue
    from order_lines
    where sku is not null
    group by sku
),

final as (
    select
        coalesce(products.sku, seen_on_lines.sku) as sku,
        coalesce(products.description, seen_on_lines.last_description) as description,
        coalesce(products.category, 'uncategorised') as category,
        products.list_price,
        coalesce(seen_on_lines.is_non_product, false) as is_non_product,
        seen_on_lines.first_sold_on,
        seen_on_lines.last_sold_on,
        coalesce(seen_on_lines.units_sold, 0) as units_sold,
        coalesce(seen_on_lines.net_revenue, 0) as net_revenue
    from products
    full outer join seen_on_lines on products.sku = seen_on_lines.sku
)

select * from final

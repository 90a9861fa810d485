with

order_lines as (
    select * from {{ ref('int_order_lines_enriched') }}
),

final as (
    select
        order_line_id,
        invoice_id,
        customer_id,
        sku,
        description,
        category,
        quantity,
        unit_price,
        line_amount,
        ordered_at,
        ordered_on,
        country,
        is_cancellation,
        is_return,
        is_guest,
        is_non_product,
        is_purchase
    from order_lines
)

select * from final

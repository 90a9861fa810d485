with

source as (
    select * from {{ source('shop', 'order_lines') }}
),

non_product_codes as (
    select * from {{ ref('non_product_codes') }}
),

renamed as (
    select
        _batch_id || ':' || _row_number as order_line_id,
        invoice_id,
        nullif(trim(sku), '') as sku,
        nullif(trim(description), '') as description,
        quantity,
        unit_price,
        quantity * unit_price as line_amount,
        invoiced_at as ordered_at,
        nullif(trim(customer_id), '') as customer_id,
        coalesce(nullif(trim(country), ''), 'Unknown') as country,
        _source_file,
        _row_number,
        _batch_id,
        _loaded_at
    from source
),

flagged as (
    select
        renamed.*,
        upper(invoice_id) like 'C%' as is_cancellation,
        upper(invoice_id) like 'R%'
        or (quantity < 0 and upper(invoice_id) not like 'C%') as is_return,
        renamed.customer_id is null as is_guest,
        upper(coalesce(renamed.sku, '')) in (select stock_code from non_product_codes)
        or lower(coalesce(renamed.sku, '')) like 'gift\_%' escape '\' as is_non_product
    from renamed
)

select * from flagged

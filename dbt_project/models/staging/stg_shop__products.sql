with

source as (
    select * from {{ source('shop', 'products') }}
),

latest as (
    select *
    from source
    qualify row_number() over (
        partition by sku order by _loaded_at desc, _row_number desc
    ) = 1
),

renamed as (
    select
        trim(sku) as sku,
        nullif(trim(description), '') as description,
        coalesce(nullif(trim(category), ''), 'uncategorised') as category,
        list_price
    from latest
)

select * from renamed

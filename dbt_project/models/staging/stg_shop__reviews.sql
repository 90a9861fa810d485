with

source as (
    select * from {{ source('shop', 'reviews') }}
),

latest as (
    select *
    from source
    qualify row_number() over (
        partition by review_id order by _loaded_at desc, _row_number desc
    ) = 1
),

renamed as (
    select
        review_id,
        customer_id,
        nullif(trim(sku), '') as sku,
        rating,
        nullif(trim(review_text), '') as review_text,
        reviewed_at
    from latest
)

select * from renamed

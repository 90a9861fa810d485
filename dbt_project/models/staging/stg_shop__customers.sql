with

source as (
    select * from {{ source('shop', 'customers') }}
),

-- A customer file delivered twice keeps the latest record per id.
latest as (
    select *
    from source
    qualify row_number() over (
        partition by customer_id order by _loaded_at desc, _row_number desc
    ) = 1
),

pseudonymised as (
    select
        customer_id,
        signed_up_at,
        coalesce(nullif(trim(country), ''), 'Unknown') as country,
        coalesce(nullif(trim(acquisition_channel), ''), 'unknown') as acquisition_channel,
        {{ pseudonymise('email') }} as email_hash,
        {{ pseudonymise('full_name') }} as full_name_hash,
        _loaded_at
    from latest
)

select * from pseudonymised

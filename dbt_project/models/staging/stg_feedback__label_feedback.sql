-- Label corrections; a feedback id sent twice keeps its latest delivery.
with

source as (
    select * from {{ source('feedback', 'label_feedback') }}
),

latest as (
    select *
    from source
    qualify row_number() over (
        partition by feedback_id order by _loaded_at desc, _row_number desc
    ) = 1
),

renamed as (
    select
        feedback_id,
        customer_id,
        label,
        lower(trim(corrected_value)) as corrected_value,
        valid_from,
        coalesce(valid_to, date '9999-12-31') as valid_to,
        reason,
        source,
        submitted_at
    from latest
)

select * from renamed

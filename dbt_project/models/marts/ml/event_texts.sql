-- Every distinct product description and review text once, keyed as customer_events'
-- text_keys are: the sentence encoder embeds each once and caches the vectors by key.
with

order_lines as (
    select * from {{ ref('int_order_lines_enriched') }}
    where not is_guest and is_merchandise and description is not null
),

reviews as (
    select * from {{ ref('stg_shop__reviews') }}
    where review_text is not null and customer_id is not null
),

texts as (
    select distinct
        'product' as text_source,
        lower(description) as event_text
    from order_lines
    union all
    select distinct
        'review' as text_source,
        review_text as event_text
    from reviews
),

final as (
    select
        left(md5(event_text), 16)::varchar as text_key,
        min(text_source)::varchar as text_source,
        min(event_text)::varchar as event_text
    from texts
    group by text_key
)

select * from final

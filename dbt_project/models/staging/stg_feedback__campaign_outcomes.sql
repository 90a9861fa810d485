-- Activation-tool events; ingest has already refused duplicates, unknown campaigns and
-- customers, control-group contacts and events dated before the campaign went out.
with

source as (
    select * from {{ source('feedback', 'campaign_outcomes') }}
),

renamed as (
    select
        campaign_id,
        customer_key,
        event,
        occurred_at,
        coalesce(revenue, 0)::double as revenue,
        _batch_id
    from source
)

select * from renamed

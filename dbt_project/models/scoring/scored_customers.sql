-- The candidate scores in the published schema: churn-risk band and next best action added.
with

predictions as (
    select * from {{ source('scoring', 'candidate_predictions') }}
),

segments as (
    select * from {{ source('scoring', 'candidate_segments') }}
),

actions as (
    select * from {{ ref('next_best_actions') }}
),

banded as (
    select
        predictions.*,
        segments.segment_value_level,
        case
            when predictions.churn_probability >= {{ var('churn_band_high') }} then 'high'
            when predictions.churn_probability >= {{ var('churn_band_medium') }} then 'medium'
            else 'low'
        end as churn_risk_band
    from predictions
    inner join segments on predictions.segment_id = segments.segment_id
),

with_actions as (
    select
        banded.*,
        coalesce(exact.next_best_action, fallback.next_best_action, 'no_action')
            as next_best_action,
        coalesce(exact.expected_cost, fallback.expected_cost, 0)::double as expected_cost
    from banded
    left join actions as exact
        on
            banded.value_tier = exact.value_tier
            and banded.churn_risk_band = exact.churn_risk_band
            and banded.segment_value_level = exact.segment_value_level
    left join actions as fallback
        on
            banded.value_tier = fallback.value_tier
            and banded.churn_risk_band = fallback.churn_risk_band
            and fallback.segment_value_level = 'any'
),

final as (
    select
        customer_id,
        as_of,
        value_tier,
        p_high,
        p_active,
        p_lapsed,
        churn_probability,
        churn_risk_band,
        segment_id,
        segment_name,
        next_best_action,
        expected_cost,
        model_name,
        model_version,
        model_run_id,
        scoring_run_id,
        scored_at
    from with_actions
)

select * from final

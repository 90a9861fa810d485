-- Segment profiles of the candidate run, for BI and for the scoring report.
with

scored as (
    select * from {{ ref('scored_customers') }}
),

segments as (
    select * from {{ source('scoring', 'candidate_segments') }}
),

features as (
    select * from {{ ref('scoring_set') }}
),

profiles as (
    select
        scored.segment_id,
        count(*) as n_customers,
        avg(scored.p_high) as avg_p_high,
        avg(scored.churn_probability) as avg_churn_probability,
        avg(features.monetary_value) as avg_monetary_value,
        avg(features.frequency) as avg_frequency,
        avg(features.recency_days) as avg_recency_days,
        mode(scored.next_best_action) as most_common_action,
        sum(scored.expected_cost) as total_expected_cost
    from scored
    inner join features on scored.customer_id = features.customer_id
    group by scored.segment_id
),

final as (
    select
        segments.segment_id,
        segments.segment_name,
        segments.segment_value_level,
        segments.segment_churn_level,
        profiles.n_customers,
        profiles.n_customers / sum(profiles.n_customers) over () as share_of_customers,
        profiles.avg_p_high,
        profiles.avg_churn_probability,
        profiles.avg_monetary_value,
        profiles.avg_frequency,
        profiles.avg_recency_days,
        profiles.most_common_action,
        profiles.total_expected_cost,
        segments.scoring_run_id
    from segments
    inner join profiles on segments.segment_id = profiles.segment_id
)

select * from final

-- The campaign plan: customers and expected cost per action and segment.
with

scores as (
    select * from {{ source('published', 'customer_scores') }}
),

plan as (
    select
        next_best_action,
        segment_name,
        count(*) as n_customers,
        sum(expected_cost) as expected_cost,
        avg(churn_probability) as avg_churn_probability,
        avg(p_high) as avg_p_high
    from scores
    group by next_best_action, segment_name
)

select * from plan

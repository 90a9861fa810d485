-- The candidate scores in the published schema: churn-risk band and next best action added.
-- The action comes from the uplift champion when there is one, else from the playbook seed;
-- action_policy records which.
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

catalogue as (
    select * from {{ ref('campaign_actions') }}
),

-- Expected incremental profit of each action per customer, from the uplift champion; empty
-- until there is one (the playbook decides until enough randomised outcomes came back).
uplift as (
    select * from {{ source('scoring', 'candidate_uplift') }}
),

uplift_policy as (
    select max(action_policy) as action_policy from uplift
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

playbook as (
    select
        banded.*,
        coalesce(exact.next_best_action, fallback.next_best_action, 'no_action')
            as playbook_action,
        coalesce(exact.expected_cost, fallback.expected_cost, 0) as playbook_cost
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

-- The uplift policy: the eligible action with the highest expected incremental profit, or
-- no action (profit 0). The playbook's own choice gets the dbt var uplift_playbook_bonus on
-- top, so the policy departs from the playbook only where it expects that much more.
uplift_options as (
    select
        playbook.customer_id,
        uplift.action,
        uplift.expected_incremental_profit,
        uplift.expected_incremental_profit
        + case
            when uplift.action = playbook.playbook_action
                then {{ var('uplift_playbook_bonus') }}
            else 0
        end as preference
    from playbook
    inner join uplift on playbook.customer_id = uplift.customer_id
    inner join catalogue on uplift.action = catalogue.action
    where
        list_contains(string_split(catalogue.eligible_tiers, '|'), playbook.value_tier)
        and list_contains(
            string_split(catalogue.eligible_churn_bands, '|'), playbook.churn_risk_band
        )
    union all
    select
        customer_id,
        'no_action' as action,
        0 as expected_incremental_profit,
        case
            when playbook_action = 'no_action' then {{ var('uplift_playbook_bonus') }} else 0
        end as preference
    from playbook
),

uplift_choice as (
    select *
    from uplift_options
    qualify row_number() over (
        partition by customer_id
        order by preference desc, action asc
    ) = 1
),

with_actions as (
    select
        playbook.*,
        case
            when uplift_policy.action_policy is not null then uplift_choice.action
            else playbook.playbook_action
        end as next_best_action,
        case
            when uplift_policy.action_policy is not null
                then coalesce(chosen_cost.cost_per_contact, 0)
            else playbook.playbook_cost
        end::double as expected_cost,
        coalesce(uplift_policy.action_policy, 'playbook') as action_policy,
        case
            when uplift_policy.action_policy is not null
                then uplift_choice.expected_incremental_profit
        end as expected_incremental_profit
    from playbook
    cross join uplift_policy
    left join uplift_choice on playbook.customer_id = uplift_choice.customer_id
    left join catalogue as chosen_cost on uplift_choice.action = chosen_cost.action
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
        action_policy::varchar as action_policy,
        expected_incremental_profit::double as expected_incremental_profit,
        model_name,
        model_version,
        model_run_id,
        scoring_run_id,
        scored_at
    from with_actions
)

select * from final

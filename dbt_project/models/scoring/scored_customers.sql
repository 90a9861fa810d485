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
-- no action (profit 0); but it departs from the playbook's action only where the gain over it
-- is more than uplift_confidence_z standard errors of that gain, and keeps a playbook action
-- the uplift model has no estimate for. Two actions measured against the same controls share
-- those controls' noise (profit_shared_std_error), which cancels in the gain between them:
-- its variance is se_a^2 + se_b^2 - 2 shared_a shared_b (ml/uplift.py, choose). Where the
-- playbook does nothing, an action without a discount is taken on any positive expected
-- profit: it can lose at most its contact cost and the unsubscribes it causes, both already
-- taken off its expected_incremental_profit (ml/score.py, uplift_candidates).
playbook_estimate as (
    select
        playbook.customer_id,
        playbook.playbook_action,
        case
            when playbook.playbook_action = 'no_action' then 0
            else uplift.expected_incremental_profit
        end as playbook_profit,
        case
            when playbook.playbook_action = 'no_action' then 0
            else uplift.profit_std_error
        end as playbook_std_error,
        case
            when playbook.playbook_action = 'no_action' then 0
            else uplift.profit_shared_std_error
        end as playbook_shared_std_error
    from playbook
    left join uplift
        on
            playbook.customer_id = uplift.customer_id
            and playbook.playbook_action = uplift.action
),

uplift_candidates as (
    select
        playbook.customer_id,
        uplift.action,
        uplift.expected_incremental_profit,
        uplift.profit_std_error,
        uplift.profit_shared_std_error,
        catalogue.discount
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
        0 as profit_std_error,
        0 as profit_shared_std_error,
        null as discount
    from playbook
),

uplift_options as (
    select
        uplift_candidates.customer_id,
        uplift_candidates.action,
        uplift_candidates.expected_incremental_profit,
        case
            when uplift_candidates.action = playbook_estimate.playbook_action
                then coalesce(playbook_estimate.playbook_profit, 'infinity'::double)
            when playbook_estimate.playbook_profit is null then '-infinity'::double
            -- from no action, an action without a discount can lose at most its costs
            when
                playbook_estimate.playbook_action = 'no_action'
                and uplift_candidates.discount = 0
                then uplift_candidates.expected_incremental_profit
            else
                uplift_candidates.expected_incremental_profit
                - {{ var('uplift_confidence_z') }} * sqrt(greatest(
                    power(coalesce(uplift_candidates.profit_std_error, 0), 2)
                    + power(coalesce(playbook_estimate.playbook_std_error, 0), 2)
                    - 2 * coalesce(uplift_candidates.profit_shared_std_error, 0)
                    * coalesce(playbook_estimate.playbook_shared_std_error, 0),
                    0
                ))
        end as preference
    from uplift_candidates
    inner join playbook_estimate on uplift_candidates.customer_id = playbook_estimate.customer_id
    union all
    -- a playbook action without an estimate (not among the uplift model's actions) is kept
    select
        customer_id,
        playbook_action as action,
        null as expected_incremental_profit,
        'infinity'::double as preference
    from playbook_estimate
    where playbook_profit is null
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
        playbook_action::varchar as playbook_action,
        churn_reasons::varchar as churn_reasons,
        tier_reasons::varchar as tier_reasons,
        model_name,
        model_version,
        model_run_id,
        scoring_run_id,
        scored_at
    from with_actions
)

select * from final

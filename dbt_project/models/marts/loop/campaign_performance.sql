-- What each campaign did, per action, segment and predicted tier (and each action overall,
-- with segment and tier 'all'): treated against randomised control, over matured windows.
-- Uplift is the difference of the two groups' purchase rates, with an Agresti-Caffo 95%
-- interval (one buyer and one non-buyer added to each group: a Wald interval collapses where
-- a group's rate is 0 or 1); revenue uplift with a normal interval (Welch). Incremental
-- revenue = revenue uplift x treated customers;
-- incremental profit = margin x incremental revenue - the discount's cost - contact cost -
-- the unsubscribes' cost (unsubscribe_cost per unsubscribed treated customer: they leave
-- every later campaign). margin_rate is of the list price: an action's discount d comes off
-- the price, not the cost of the goods, so the treated orders keep margin - d of their list
-- value, and discount_cost = (1 - margin) x d / (1 - d) x the treated revenue (a discount on
-- orders placed anyway gives the shop's money away whole, not margin of it).
{%- set z = 1.959964 %}

with

results as (
    select * from {{ ref('int_campaign_results') }}
    where is_matured
),

discounts as (
    select
        action,
        discount
    from {{ ref('campaign_actions') }}
),

grouped as (
    select
        campaign_id,
        action,
        -- `all` only for the rollup; a segment or tier missing at planning time is `unknown`
        case
            when grouping(segment_name) = 1 then 'all'
            else coalesce(segment_name, 'unknown')
        end as segment_name,
        case
            when grouping(value_tier) = 1 then 'all'
            else coalesce(value_tier, 'unknown')
        end as value_tier,
        count(*) filter (where group_name = 'treatment') as treated,
        count(*) filter (where group_name = 'control') as control,
        avg(purchased::int) filter (where group_name = 'treatment') as conversion_treated,
        avg(purchased::int) filter (where group_name = 'control') as conversion_control,
        avg(revenue) filter (where group_name = 'treatment') as revenue_per_treated,
        avg(revenue) filter (where group_name = 'control') as revenue_per_control,
        var_samp(revenue) filter (where group_name = 'treatment') as revenue_var_treated,
        var_samp(revenue) filter (where group_name = 'control') as revenue_var_control,
        avg(unsubscribed::int) filter (where group_name = 'treatment') as unsubscribe_rate,
        sum(expected_cost) filter (where group_name = 'treatment') as contact_cost,
        sum(revenue) filter (where group_name = 'treatment') as treated_revenue
    from results
    group by grouping sets ((campaign_id, action, segment_name, value_tier), (campaign_id, action))
),

adjusted as (
    select
        *,
        (conversion_treated * treated + 1) / (treated + 2) as adjusted_treated,
        (conversion_control * control + 1) / (control + 2) as adjusted_control
    from grouped
),

measured as (
    select
        adjusted.*,
        -- an action not in the catalogue (a shop's own) is taken as having no discount
        (1 - {{ var('margin_rate') }}) * coalesce(discounts.discount, 0)
        / (1 - coalesce(discounts.discount, 0)) * coalesce(adjusted.treated_revenue, 0)
            as discount_cost,
        conversion_treated - conversion_control as uplift,
        adjusted_treated - adjusted_control as uplift_centre,
        sqrt(
            adjusted_treated * (1 - adjusted_treated) / (treated + 2)
            + adjusted_control * (1 - adjusted_control) / (control + 2)
        ) as uplift_se,
        revenue_per_treated - revenue_per_control as revenue_uplift,
        sqrt(
            coalesce(revenue_var_treated, 0) / nullif(treated, 0)
            + coalesce(revenue_var_control, 0) / nullif(control, 0)
        ) as revenue_uplift_se
    from adjusted
    left join discounts using (action)
),

final as (
    select
        campaign_id::varchar as campaign_id,
        action::varchar as action,
        segment_name::varchar as segment_name,
        value_tier::varchar as value_tier,
        treated::integer as treated,
        control::integer as control,
        conversion_treated::double as conversion_treated,
        conversion_control::double as conversion_control,
        uplift::double as uplift,
        (uplift_centre - {{ z }} * uplift_se)::double as uplift_ci_low,
        (uplift_centre + {{ z }} * uplift_se)::double as uplift_ci_high,
        revenue_per_treated::double as revenue_per_treated,
        revenue_per_control::double as revenue_per_control,
        revenue_uplift::double as revenue_uplift,
        (revenue_uplift - {{ z }} * revenue_uplift_se)::double as revenue_uplift_ci_low,
        (revenue_uplift + {{ z }} * revenue_uplift_se)::double as revenue_uplift_ci_high,
        (revenue_uplift * treated)::double as incremental_revenue,
        coalesce(contact_cost, 0)::double as contact_cost,
        discount_cost::double as discount_cost,
        (
            {{ var('margin_rate') }} * revenue_uplift * treated - discount_cost
            - coalesce(contact_cost, 0)
            - {{ var('unsubscribe_cost') }} * coalesce(unsubscribe_rate, 0) * treated
        )::double as incremental_profit,
        (revenue_uplift * treated / nullif(contact_cost, 0))::double as return_on_spend,
        coalesce(unsubscribe_rate, 0)::double as unsubscribe_rate,
        (
            coalesce(treated, 0) < {{ var('campaign_min_group_size') }}
            or coalesce(control, 0) < {{ var('campaign_min_group_size') }}
        )::boolean as is_too_small
    from measured
)

select * from final

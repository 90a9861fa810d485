-- One row per campaign customer: what they bought in the outcome window, treated or not.
-- The window is (assigned_at, assigned_at + window_days]; it has matured once the data
-- reaches its end. Orders come from the shop's own order lines, so control customers, whom
-- no activation tool sees, are measured exactly like treated ones.
with

assignments as (
    select * from {{ source('platform', 'campaign_assignments') }}
),

customers as (
    select distinct
        customer_id,
        {{ pseudonymise('customer_id') }} as customer_key
    from {{ ref('int_order_lines_enriched') }}
    where not is_guest
),

order_lines as (
    select * from {{ ref('int_order_lines_enriched') }}
    where not is_guest and is_merchandise
),

data_end as (
    select max(ordered_at) as last_event_at from order_lines
),

outcomes as (
    select * from {{ ref('stg_feedback__campaign_outcomes') }}
),

windowed as (
    select
        assignments.*,
        customers.customer_id,
        assignments.assigned_at + to_days(assignments.window_days) as window_end
    from assignments
    left join customers on assignments.customer_key = customers.customer_key
),

bought as (
    select
        windowed.campaign_id,
        windowed.customer_key,
        count(distinct order_lines.invoice_id) filter (where order_lines.is_purchase) as orders,
        coalesce(sum(order_lines.line_amount), 0) as revenue
    from windowed
    inner join order_lines
        on
            windowed.customer_id = order_lines.customer_id
            and order_lines.ordered_at > windowed.assigned_at
            and order_lines.ordered_at <= windowed.window_end
    group by all
),

reported as (
    select
        campaign_id,
        customer_key,
        bool_or(event = 'unsubscribed') as unsubscribed,
        bool_or(event = 'converted') as converted_reported,
        bool_or(event = 'opened') as opened
    from outcomes
    group by all
),

final as (
    select
        windowed.campaign_id,
        windowed.customer_key,
        windowed.customer_id,
        windowed.action,
        windowed.group_name,
        windowed.policy,
        windowed.segment_name,
        windowed.value_tier,
        windowed.churn_risk_band,
        windowed.expected_cost::double as expected_cost,
        windowed.assigned_at,
        windowed.window_end,
        (windowed.window_end - interval 1 day)::date <= data_end.last_event_at::date as is_matured,
        coalesce(bought.orders, 0)::integer as orders,
        coalesce(bought.orders, 0) > 0 as purchased,
        coalesce(bought.revenue, 0)::double as revenue,
        coalesce(reported.unsubscribed, false) as unsubscribed,
        coalesce(reported.converted_reported, false) as converted_reported,
        coalesce(reported.opened, false) as opened
    from windowed
    cross join data_end
    left join bought
        on
            windowed.campaign_id = bought.campaign_id
            and windowed.customer_key = bought.customer_key
    left join reported
        on
            windowed.campaign_id = reported.campaign_id
            and windowed.customer_key = reported.customer_key
)

select * from final

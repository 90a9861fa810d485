-- Point-in-time labels: only events in (as_of, as_of + horizon], for labelled cutoffs.
-- The high-value threshold is fixed on the train split, so later cutoffs do not move it
-- (the rolling backtest refits it at each of its cutoffs from the labels known there, with
-- high_value_share).
-- A correction from people (label_feedback) overrides the derived label of its customer at
-- the cutoffs in [valid_from, valid_to]; the latest submitted wins. The two labels stay
-- consistent: lapsed <=> churned. label_source names the correction that decided a row.
with

customer_cutoffs as (
    select * from {{ ref('int_customer_cutoffs') }}
    where is_labelled
),

order_lines as (
    select * from {{ ref('int_order_lines_enriched') }}
    where not is_guest and is_merchandise
),

future_lines as (
    select
        customer_cutoffs.customer_cutoff_id,
        order_lines.invoice_id,
        order_lines.is_purchase,
        order_lines.line_amount
    from customer_cutoffs
    inner join order_lines
        on
            customer_cutoffs.customer_id = order_lines.customer_id
            and order_lines.ordered_on > customer_cutoffs.as_of
            and order_lines.ordered_on
            <= customer_cutoffs.as_of + to_days(customer_cutoffs.horizon_days)
),

future as (
    select
        customer_cutoffs.customer_cutoff_id,
        customer_cutoffs.customer_id,
        customer_cutoffs.as_of,
        customer_cutoffs.split,
        customer_cutoffs.horizon_days,
        count(distinct future_lines.invoice_id) filter (where future_lines.is_purchase)
            as future_orders,
        -- Net of returns and cancellations in the window; a refund of an earlier order
        -- cannot make future value negative.
        greatest(coalesce(sum(future_lines.line_amount), 0), 0) as future_spend
    from customer_cutoffs
    left join future_lines
        on customer_cutoffs.customer_cutoff_id = future_lines.customer_cutoff_id
    group by all
),

high_value_threshold as (
    select quantile_cont(future_spend, 1 - {{ var('high_value_share') }}) as threshold
    from future
    where split = 'train' and future_spend > 0
),

corrections as (
    select * from {{ ref('label_corrections') }}
),

derived as (
    select
        future.*,
        high_value_threshold.threshold,
        case
            when future.future_orders = 0 then 'lapsed'
            when future.future_spend >= high_value_threshold.threshold then 'high'
            else 'active'
        end as derived_value_tier
    from future
    cross join high_value_threshold
),

latest_correction as (
    select
        derived.customer_cutoff_id,
        corrections.label,
        corrections.corrected_value,
        corrections.feedback_id
    from derived
    inner join corrections
        on
            derived.customer_id = corrections.customer_id
            and derived.as_of between corrections.valid_from and corrections.valid_to
    -- One correction decides a row, whichever label it corrects: the two labels are one
    -- (lapsed <=> churned), so a later "churned" overrides an earlier tier, and vice versa.
    qualify row_number() over (
        partition by derived.customer_cutoff_id
        order by corrections.submitted_at desc, corrections.feedback_id desc
    ) = 1
),

corrected as (
    select
        derived.*,
        latest_correction.feedback_id,
        case
            when latest_correction.label = 'value_tier' then latest_correction.corrected_value
            when latest_correction.corrected_value = 'true' then 'lapsed'
            when
                latest_correction.corrected_value = 'false'
                and derived.derived_value_tier = 'lapsed'
                then 'active'
            else derived.derived_value_tier
        end as value_tier,
        -- Whether the correction set the tier (a "did not churn" on a buyer leaves the
        -- derived one, which a threshold decides).
        coalesce(
            latest_correction.label = 'value_tier'
            or latest_correction.corrected_value = 'true'
            or (
                latest_correction.corrected_value = 'false'
                and derived.derived_value_tier = 'lapsed'
            ),
            false
        ) as tier_corrected
    from derived
    left join latest_correction
        on derived.customer_cutoff_id = latest_correction.customer_cutoff_id
),

final as (
    select
        corrected.customer_cutoff_id::varchar as customer_cutoff_id,
        corrected.customer_id::varchar as customer_id,
        corrected.as_of::date as as_of,
        corrected.split::varchar as split,
        corrected.horizon_days::integer as horizon_days,
        corrected.future_orders::integer as future_orders,
        corrected.future_spend::double as future_spend,
        corrected.threshold::double as high_value_threshold,
        {{ var('high_value_share') }}::double as high_value_share,
        corrected.value_tier::varchar as value_tier,
        corrected.tier_corrected::boolean as tier_corrected,
        (corrected.value_tier = 'lapsed')::boolean as is_churned,
        corrected.derived_value_tier::varchar as derived_value_tier,
        coalesce('feedback:' || corrected.feedback_id, 'derived')::varchar as label_source
    from corrected
)

select * from final

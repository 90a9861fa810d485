-- One row per campaign, action, segment and tier: a segment or tier missing at planning time
-- is `unknown`, never taken for the per-action rollup's `all`.
select
    campaign_id,
    action,
    segment_name,
    value_tier,
    count(*) as rows_of_the_group
from {{ ref('campaign_performance') }}
group by all
having count(*) > 1

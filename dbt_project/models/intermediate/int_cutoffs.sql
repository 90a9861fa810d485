-- The as_of dates of the ML marts and their role: labelled cutoffs split by time into
-- train / validation / test (latest labelled = test), and the last day of data to score.
-- Derived cutoffs go back cutoff_step_days at a time, as far as n_training_cutoffs and the
-- min_history_days of data each needs before it allow.
{%- set explicit = var('as_of_dates') %}
{%- set horizon = var('horizon_days') %}
{%- set min_history = 0 if explicit else var('min_history_days') %}

with

order_lines as (
    select * from {{ ref('stg_shop__order_lines') }}
),

data_window as (
    select
        min(ordered_at)::date as first_day,
        max(ordered_at)::date as last_day
    from order_lines
),

candidates as (
    {%- if explicit %}
        select unnest([
            {%- for day in explicit %}
                date '{{ day }}'{{ "," if not loop.last }}
            {%- endfor %}
        ]) as as_of
    {%- else %}
        select
            data_window.last_day
            - to_days(({{ horizon }} + steps.step * {{ var('cutoff_step_days') }})::integer)
                as as_of
        from data_window
        cross join range(0, {{ var('n_training_cutoffs') }}) as steps (step)
    {%- endif %}
    union
    select last_day as as_of from data_window
),

labelled as (
    select
        candidates.as_of,
        candidates.as_of + to_days({{ horizon }}) <= data_window.last_day as is_labelled
    from candidates
    cross join data_window
    where
        candidates.as_of > data_window.first_day
        and (
            candidates.as_of = data_window.last_day
            or candidates.as_of >= data_window.first_day + to_days({{ min_history }})
        )
),

ranked as (
    select
        as_of,
        is_labelled,
        row_number() over (partition by is_labelled order by as_of desc) as recency_rank
    from labelled
),

final as (
    select
        as_of::date as as_of,
        is_labelled,
        {{ horizon }} as horizon_days,
        case
            when not is_labelled and recency_rank = 1 then 'score'
            when not is_labelled then 'unlabelled'
            when recency_rank = 1 then 'test'
            when recency_rank = 2 then 'validation'
            else 'train'
        end as split
    from ranked
)

select * from final

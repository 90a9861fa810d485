-- One readable text per customer and as_of: the profile, recent products and review
-- snippets, all from on or before as_of, capped at document_max_chars.
with

features as (
    select * from {{ ref('customer_features') }}
),

order_lines as (
    select * from {{ ref('int_order_lines_enriched') }}
    where not is_guest and is_merchandise and is_purchase and description is not null
),

reviews as (
    select * from {{ ref('stg_shop__reviews') }}
    where review_text is not null
),

recent_products as (
    select
        features.customer_cutoff_id,
        order_lines.description,
        max(order_lines.ordered_at) as last_bought_at
    from features
    inner join order_lines
        on
            features.customer_id = order_lines.customer_id
            and order_lines.ordered_on <= features.as_of
    group by features.customer_cutoff_id, order_lines.description
    qualify row_number() over (
        partition by features.customer_cutoff_id
        order by last_bought_at desc, order_lines.description asc
    ) <= 5
),

product_lists as (
    select
        customer_cutoff_id,
        string_agg(lower(description), '; ' order by last_bought_at desc, description asc)
            as recent_products
    from recent_products
    group by customer_cutoff_id
),

recent_reviews as (
    select
        features.customer_cutoff_id,
        reviews.rating,
        left(reviews.review_text, 120) as snippet,
        reviews.reviewed_at,
        reviews.review_id
    from features
    inner join reviews
        on
            features.customer_id = reviews.customer_id
            and reviews.reviewed_at::date <= features.as_of
    qualify row_number() over (
        partition by features.customer_cutoff_id
        order by reviews.reviewed_at desc, reviews.review_id asc
    ) <= 2
),

review_lists as (
    select
        customer_cutoff_id,
        string_agg(
            rating || ' stars: "' || snippet || '"', ' ' order by reviewed_at desc, review_id asc
        ) as recent_reviews
    from recent_reviews
    group by customer_cutoff_id
),

documents as (
    select
        features.customer_cutoff_id,
        features.customer_id,
        features.as_of,
        concat_ws(
            ' | ',
            'customer for ' || features.tenure_days || ' days, ' || features.country
            || ', via ' || features.acquisition_channel,
            features.frequency || ' orders, last ' || features.recency_days || ' days ago',
            'spent ' || printf('%.2f', features.monetary_value) || ', average order '
            || printf('%.2f', features.avg_order_value),
            'last 90 days: ' || features.orders_last_90d || ' orders, '
            || printf('%.2f', features.spend_last_90d) || ' spent, trend '
            || case
                when features.spend_trend_90d > 0.2 then 'up'
                when features.spend_trend_90d < -0.2 then 'down'
                else 'flat'
            end,
            case
                when features.ipt_mean_days is not null
                    then 'buys every ' || round(features.ipt_mean_days)::integer || ' days'
            end,
            'returns ' || round(100 * coalesce(features.return_rate, 0))::integer
            || '%, cancellations '
            || round(100 * coalesce(features.cancellation_rate, 0))::integer || '%',
            'favourite ' || features.top_category || ' ('
            || round(100 * features.top_category_share)::integer || '%)',
            'recent: ' || product_lists.recent_products,
            'reviews: ' || review_lists.recent_reviews
        ) as full_text
    from features
    left join product_lists on features.customer_cutoff_id = product_lists.customer_cutoff_id
    left join review_lists on features.customer_cutoff_id = review_lists.customer_cutoff_id
),

final as (
    select
        customer_cutoff_id::varchar as customer_cutoff_id,
        customer_id::varchar as customer_id,
        as_of::date as as_of,
        left(full_text, {{ var('document_max_chars') }})::varchar as document,  -- noqa: RF04
        length(full_text)::integer as full_length
    from documents
)

select * from final

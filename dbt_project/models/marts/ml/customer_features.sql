-- Point-in-time features: for each customer and as_of, only events on or before as_of.
with

customer_cutoffs as (
    select * from {{ ref('int_customer_cutoffs') }}
),

order_lines as (
    select * from {{ ref('int_order_lines_enriched') }}
    where not is_guest and is_merchandise
),

reviews as (
    select * from {{ ref('stg_shop__reviews') }}
),

history as (
    select
        customer_cutoffs.as_of,
        order_lines.*,
        date_diff('day', order_lines.ordered_on, customer_cutoffs.as_of) as days_before
    from customer_cutoffs
    inner join order_lines
        on
            customer_cutoffs.customer_id = order_lines.customer_id
            and order_lines.ordered_on <= customer_cutoffs.as_of
),

orders as (
    select
        customer_id,
        as_of,
        invoice_id,
        min(ordered_at) as ordered_at,
        min(days_before) as days_before,
        sum(line_amount) as amount
    from history
    where is_purchase
    group by customer_id, as_of, invoice_id
),

order_gaps as (
    select
        customer_id,
        as_of,
        date_diff(
            'second',
            lag(ordered_at) over (partition by customer_id, as_of order by ordered_at, invoice_id),
            ordered_at
        ) / 86400.0 as gap_days
    from orders
),

order_stats as (
    select
        customer_id,
        as_of,
        count(*) as n_orders,
        min(days_before) as recency_days,
        max(days_before) as first_order_days_ago,
        sum(amount) as gross_spend,
        avg(amount) as avg_order_value,
        count(*) filter (where days_before < 30) as orders_last_30d,
        count(*) filter (where days_before < 90) as orders_last_90d,
        count(*) filter (where days_before < 180) as orders_last_180d,
        coalesce(sum(amount) filter (where days_before < 30), 0) as spend_last_30d,
        coalesce(sum(amount) filter (where days_before < 90), 0) as spend_last_90d,
        coalesce(sum(amount) filter (where days_before < 180), 0) as spend_last_180d,
        coalesce(sum(amount) filter (where days_before >= 90 and days_before < 180), 0)
            as spend_prior_90d,
        coalesce(sum(amount) filter (where days_before >= 180), 0) as spend_before_180d
    from orders
    group by customer_id, as_of
),

gap_stats as (
    select
        customer_id,
        as_of,
        avg(gap_days) as ipt_mean_days,
        stddev_samp(gap_days) as ipt_std_days,
        max(gap_days) as ipt_max_days
    from order_gaps
    where gap_days is not null
    group by customer_id, as_of
),

line_stats as (
    select
        customer_id,
        as_of,
        sum(line_amount) as net_spend,
        coalesce(-sum(line_amount) filter (where is_cancellation), 0) as cancelled_amount,
        coalesce(-sum(line_amount) filter (where is_return), 0) as returned_amount,
        count(distinct sku) filter (where is_purchase) as n_distinct_products,
        count(distinct category) filter (where is_purchase) as n_distinct_categories
    from history
    group by customer_id, as_of
),

-- A product's usual price up to as_of: the median of what its buyers paid until then.
usual_prices as (
    select
        sku,
        as_of,
        median(unit_price) as usual_price
    from history
    where is_purchase and unit_price > 0
    group by sku, as_of
),

price_stats as (
    select
        history.customer_id,
        history.as_of,
        avg((history.unit_price < 0.9 * usual_prices.usual_price)::integer)
            as discounted_line_share
    from history
    inner join usual_prices
        on history.sku = usual_prices.sku and history.as_of = usual_prices.as_of
    where history.is_purchase and history.unit_price > 0
    group by history.customer_id, history.as_of
),

category_spend as (
    select
        customer_id,
        as_of,
        category,
        sum(line_amount) as amount
    from history
    where is_purchase
    group by customer_id, as_of, category
),

top_category as (
    select
        customer_id,
        as_of,
        category as top_category,
        amount / nullif(sum(amount) over (partition by customer_id, as_of), 0)
            as top_category_share
    from category_spend
    qualify row_number() over (
        partition by customer_id, as_of order by amount desc, category asc
    ) = 1
),

review_stats as (
    select
        customer_cutoffs.customer_id,
        customer_cutoffs.as_of,
        count(*) as n_reviews,
        avg(reviews.rating) as avg_rating,
        min(reviews.rating) as min_rating
    from customer_cutoffs
    inner join reviews
        on
            customer_cutoffs.customer_id = reviews.customer_id
            and reviews.reviewed_at::date <= customer_cutoffs.as_of
    group by customer_cutoffs.customer_id, customer_cutoffs.as_of
),

final as (
    select
        customer_cutoffs.customer_cutoff_id::varchar as customer_cutoff_id,
        customer_cutoffs.customer_id::varchar as customer_id,
        customer_cutoffs.as_of::date as as_of,
        customer_cutoffs.country::varchar as country,
        customer_cutoffs.acquisition_channel::varchar as acquisition_channel,
        date_diff('day', customer_cutoffs.signed_up_at::date, customer_cutoffs.as_of)::integer
            as tenure_days,
        order_stats.recency_days::integer as recency_days,
        order_stats.first_order_days_ago::integer as first_order_days_ago,
        order_stats.n_orders::integer as frequency,
        coalesce(line_stats.net_spend, 0)::double as monetary_value,
        order_stats.gross_spend::double as gross_spend,
        order_stats.avg_order_value::double as avg_order_value,
        (line_stats.cancelled_amount / nullif(order_stats.gross_spend, 0))::double
            as cancellation_rate,
        (line_stats.returned_amount / nullif(order_stats.gross_spend, 0))::double as return_rate,
        price_stats.discounted_line_share::double as discounted_line_share,
        gap_stats.ipt_mean_days::double as ipt_mean_days,
        gap_stats.ipt_std_days::double as ipt_std_days,
        gap_stats.ipt_max_days::double as ipt_max_days,
        order_stats.orders_last_30d::integer as orders_last_30d,
        order_stats.orders_last_90d::integer as orders_last_90d,
        order_stats.orders_last_180d::integer as orders_last_180d,
        order_stats.spend_last_30d::double as spend_last_30d,
        order_stats.spend_last_90d::double as spend_last_90d,
        order_stats.spend_last_180d::double as spend_last_180d,
        order_stats.spend_prior_90d::double as spend_prior_90d,
        coalesce(
            (order_stats.spend_last_90d - order_stats.spend_prior_90d)
            / nullif(abs(order_stats.spend_last_90d) + abs(order_stats.spend_prior_90d), 0),
            0
        )::double as spend_trend_90d,
        (
            order_stats.spend_last_180d
            / nullif(
                order_stats.spend_before_180d
                * 180.0 / greatest(order_stats.first_order_days_ago - 179, 1),
                0
            )
        )::double as spend_rate_vs_before_180d,
        line_stats.n_distinct_products::integer as n_distinct_products,
        line_stats.n_distinct_categories::integer as n_distinct_categories,
        top_category.top_category::varchar as top_category,
        top_category.top_category_share::double as top_category_share,
        coalesce(review_stats.n_reviews, 0)::integer as n_reviews,
        review_stats.avg_rating::double as avg_rating,
        review_stats.min_rating::integer as min_rating
    from customer_cutoffs
    inner join order_stats
        on
            customer_cutoffs.customer_id = order_stats.customer_id
            and customer_cutoffs.as_of = order_stats.as_of
    left join gap_stats
        on
            customer_cutoffs.customer_id = gap_stats.customer_id
            and customer_cutoffs.as_of = gap_stats.as_of
    left join line_stats
        on
            customer_cutoffs.customer_id = line_stats.customer_id
            and customer_cutoffs.as_of = line_stats.as_of
    left join price_stats
        on
            customer_cutoffs.customer_id = price_stats.customer_id
            and customer_cutoffs.as_of = price_stats.as_of
    left join top_category
        on
            customer_cutoffs.customer_id = top_category.customer_id
            and customer_cutoffs.as_of = top_category.as_of
    left join review_stats
        on
            customer_cutoffs.customer_id = review_stats.customer_id
            and customer_cutoffs.as_of = review_stats.as_of
)

select * from final

-- Features, document and labels of every labelled cutoff, with its time split.
with

features as (
    select * from {{ ref('customer_features') }}
),

documents as (
    select * from {{ ref('customer_documents') }}
),

sequences as (
    select * from {{ ref('customer_event_sequences') }}
),

labels as (
    select * from {{ ref('customer_labels') }}
),

joined as (
    select
        features.*,
        documents.document,
        coalesce(sequences.event_sequence, '{}') as event_sequence,
        labels.split,
        labels.future_orders,
        labels.future_spend,
        labels.value_tier,
        labels.is_churned,
        labels.label_source,
        labels.tier_corrected
    from features
    inner join labels on features.customer_cutoff_id = labels.customer_cutoff_id
    inner join documents on features.customer_cutoff_id = documents.customer_cutoff_id
    left join sequences on features.customer_cutoff_id = sequences.customer_cutoff_id
)

select * from joined

-- Features and document of every customer at the latest day of data, to score.
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

cutoffs as (
    select * from {{ ref('int_cutoffs') }}
    where split = 'score'
),

joined as (
    select
        features.*,
        documents.document,
        coalesce(sequences.event_sequence, '{}') as event_sequence
    from features
    inner join cutoffs on features.as_of = cutoffs.as_of
    inner join documents on features.customer_cutoff_id = documents.customer_cutoff_id
    left join sequences on features.customer_cutoff_id = sequences.customer_cutoff_id
)

select * from joined

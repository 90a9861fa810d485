{#- A salted SHA-256 of a normalised identifier: joins stay possible, the PII is gone. -#}
{% macro pseudonymise(column) -%}
    case when nullif(trim({{ column }}), '') is not null
        then sha256('{{ var("pii_salt") }}' || lower(trim({{ column }})))
    end
{%- endmacro %}

-- Run once by the postgres image on an empty volume: one database per store.
create database airflow;
create database mlflow;

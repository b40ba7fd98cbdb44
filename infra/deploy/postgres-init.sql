-- MLflow's backend store beside Prefect's database (compose.yaml creates `prefect`).
CREATE DATABASE mlflow OWNER wildface;

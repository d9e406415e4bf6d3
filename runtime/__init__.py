"""The floor's runtime adapters every stage stands on: settings, Kafka, Postgres, the plan
catalog on Kafka, and the plumbing a stage uses to expose its commands."""

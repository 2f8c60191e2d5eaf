"""The archiver: stores PV monitor streams and repeating snapshots from Kafka, and answers queries on them."""
